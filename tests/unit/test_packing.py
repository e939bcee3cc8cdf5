"""Packing invariants: adapter grouping (contiguous, stable), splits at `max_batch_tokens`, and the
packed batch's position ids (checked against HF's XLM-R position rule), cu_seqlens and segments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraembed.packing import SequenceRef, build_packed_batch, plan_batches


def random_sequences(seed: int, count: int, max_length: int = 20, num_slots: int = 4) -> list[SequenceRef]:
    rng = np.random.default_rng(seed)
    return [
        SequenceRef(
            request_index=index // 3,
            output_row=index,
            token_ids=rng.integers(3, 250, size=int(rng.integers(1, max_length + 1))),  # never the pad id 1
            adapter_slot=int(rng.integers(0, num_slots)),
        )
        for index in range(count)
    ]


def tokens(sequences) -> int:
    return sum(len(sequence.token_ids) for sequence in sequences)


PLAN_CASES = [  # (seed, count, max_batch_tokens)
    (0, 1, 20),
    (1, 10, 20),
    (2, 30, 25),
    (3, 30, 1000),  # everything fits in one batch
    (4, 50, 64),
    (5, 17, 33),
]


@pytest.mark.parametrize("seed, count, max_batch_tokens", PLAN_CASES)
def test_plan_groups_by_adapter_stably_and_splits_greedily(seed, count, max_batch_tokens):
    sequences = random_sequences(seed, count)
    batches = plan_batches(sequences, max_batch_tokens)
    flat = [sequence for batch in batches for sequence in batch]

    # Adapter slots ascending, arrival order kept within each adapter, nothing lost or repeated.
    expected = [s for slot in sorted({s.adapter_slot for s in sequences}) for s in sequences if s.adapter_slot == slot]
    assert [s.output_row for s in flat] == [s.output_row for s in expected]
    # Each batch fits the budget and is cut only where the next sequence would not fit.
    assert all(batch and tokens(batch) <= max_batch_tokens for batch in batches)
    for batch, following in zip(batches, batches[1:]):
        assert tokens(batch) + len(following[0].token_ids) > max_batch_tokens
    if tokens(sequences) <= max_batch_tokens:
        assert len(batches) == 1


def test_plan_of_nothing_is_no_batch():
    assert plan_batches([], 16) == []


def test_sequence_longer_than_the_budget_is_rejected():
    sequences = [SequenceRef(0, 0, np.arange(3, 13), 0), SequenceRef(0, 1, np.arange(3, 20), 0)]
    with pytest.raises(ValueError, match="a sequence of 17 tokens exceeds max_batch_tokens=16"):
        plan_batches(sequences, 16)


def hf_xlmr_position_ids(token_ids: np.ndarray, padding_idx: int) -> np.ndarray:
    from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEmbeddings

    return XLMRobertaEmbeddings.create_position_ids_from_input_ids(torch.from_numpy(token_ids)[None], padding_idx)[0].numpy()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("model_type, position_offset", [("xlm-roberta", 2), ("bert", 0)])
def test_packed_batch_layout(seed, model_type, position_offset):
    sequences = [s for batch in plan_batches(random_sequences(seed, 12), 10_000) for s in batch]
    batch = build_packed_batch(sequences, position_offset, torch.device("cpu"))
    lengths = [len(s.token_ids) for s in sequences]
    total = sum(lengths)

    assert (batch.num_sequences, batch.num_tokens, batch.max_seqlen) == (len(sequences), total, max(lengths))
    assert batch.sequence_lengths == tuple(lengths)
    assert batch.input_ids.dtype == batch.position_ids.dtype == torch.int64
    assert batch.input_ids.tolist() == np.concatenate([s.token_ids for s in sequences]).tolist()
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert batch.token_sequence_index.tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    assert batch.adapter_slots.tolist() == [s.adapter_slot for s in sequences]

    for index, sequence in enumerate(sequences):
        start, end = batch.cu_seqlens[index].item(), batch.cu_seqlens[index + 1].item()
        positions = batch.position_ids[start:end].numpy()
        if model_type == "xlm-roberta":  # pad_token_id 1: HF counts from padding_idx + 1 in every sequence
            np.testing.assert_array_equal(positions, hf_xlmr_position_ids(sequence.token_ids, padding_idx=1))
        else:
            np.testing.assert_array_equal(positions, np.arange(len(sequence.token_ids)))


@pytest.mark.parametrize("seed", range(4))
def test_adapter_segments_cover_the_stream_in_maximal_runs(seed):
    sequences = [s for batch in plan_batches(random_sequences(seed, 15), 10_000) for s in batch]
    batch = build_packed_batch(sequences, 0, torch.device("cpu"))
    segments = batch.adapter_segments
    assert segments[0].token_start == 0 and segments[-1].token_end == batch.num_tokens
    for segment, following in zip(segments, segments[1:]):
        assert segment.token_end == following.token_start  # no gap, no overlap
        assert segment.slot != following.slot  # one run per adapter (the batch is grouped)
    assert len({segment.slot for segment in segments}) == len(segments)
    boundaries = set(batch.cu_seqlens.tolist())
    token_slots = batch.adapter_slots[batch.token_sequence_index]  # [T]
    for segment in segments:
        assert segment.token_start < segment.token_end
        assert {segment.token_start, segment.token_end} <= boundaries  # runs hold whole sequences
        assert (token_slots[segment.token_start : segment.token_end] == segment.slot).all()


def test_ungrouped_sequences_get_one_segment_per_run():
    # build_packed_batch does not reorder: alternating slots give alternating segments.
    sequences = [SequenceRef(0, i, np.arange(3, 3 + n), slot) for i, (n, slot) in enumerate([(2, 1), (3, 1), (1, 0), (4, 1)])]
    batch = build_packed_batch(sequences, 2, torch.device("cpu"))
    assert [(s.slot, s.token_start, s.token_end) for s in batch.adapter_segments] == [(1, 0, 5), (0, 5, 6), (1, 6, 10)]
    assert batch.position_ids.tolist() == [2, 3, 2, 3, 4, 2, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("graph_capacity", [False, True])
def test_query_tiles_cover_the_stream_and_give_long_sequences_their_own(seed, graph_capacity):
    """`query_tile_starts`: tiles of at most BLOCK_M tokens that cover [0, rows) in order; without a
    bound, every sequence of BLOCK_M tokens or more starts and ends at tile boundaries (so its tiles
    hold no other sequence); with a CUDA graph's bound the table never outgrows it."""
    from loraembed.packed_attention_triton import BLOCK_M, query_tile_capacity, query_tile_starts

    rng = np.random.default_rng(seed)
    high = [20, 300, 600][seed % 3]
    lengths = rng.integers(1, high, size=int(rng.integers(1, 200)))
    cu_seqlens = np.concatenate([[0], np.cumsum(lengths)])
    rows = int(cu_seqlens[-1]) + int(rng.integers(0, 200)) * graph_capacity  # padding rows in a graph
    capacity = query_tile_capacity(rows) if graph_capacity else None
    starts = query_tile_starts(cu_seqlens, rows, capacity)
    assert starts[0] == 0 and starts[-1] == rows
    assert np.all(np.diff(starts) > 0) and np.all(np.diff(starts) <= BLOCK_M)
    if capacity is not None:
        assert len(starts) - 1 <= capacity
    else:
        long = lengths >= BLOCK_M
        assert set(cu_seqlens[:-1][long]) <= set(starts) and set(cu_seqlens[1:][long]) <= set(starts)
        assert len(starts) - 1 <= np.ceil(rows / BLOCK_M) + 2 * np.count_nonzero(long)


def test_a_packed_batch_carries_its_query_tiles():
    from loraembed.packed_attention_triton import query_tile_starts

    sequences = random_sequences(7, 40, max_length=150)
    batch = build_packed_batch(sequences, 2, torch.device("cpu"))
    cu_seqlens = batch.cu_seqlens.numpy()
    np.testing.assert_array_equal(batch.query_tile_starts.numpy(), query_tile_starts(cu_seqlens, int(cu_seqlens[-1])))
    assert batch.query_tile_starts.dtype == torch.int64
