"""Packing sequences from many requests into token streams with `cu_seqlens`.

Sequences are grouped by adapter slot, so each adapter's tokens are one contiguous run, and the
stream is cut into batches of at most `max_batch_tokens` tokens (TEI's `FlashBatch` shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packed_attention_triton import query_tile_starts


@dataclass(frozen=True)
class SequenceRef:
    """One sequence to embed and where its embedding goes back to."""

    request_index: int
    output_row: int  # row of the engine's pooled output this sequence fills
    token_ids: np.ndarray  # [length] int64, no padding
    adapter_slot: int  # 0 = base model


@dataclass(frozen=True)
class AdapterSegment:
    """A contiguous run of tokens (and of sequences) that all use one adapter slot."""

    slot: int
    token_start: int
    token_end: int


@dataclass
class PackedBatch:
    """The one batch shape the encoder knows. Tensors live on the model's device."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32
    token_sequence_index: torch.Tensor  # [T] int64: which sequence each token belongs to
    max_seqlen: int
    sequence_lengths: tuple[int, ...]  # host copy of the lengths, [B]
    adapter_segments: tuple[AdapterSegment, ...]  # host-side, ordered, covering [0, T)
    adapter_slots: torch.Tensor  # [B] int32, per sequence
    # [tiles + 1] int64: the query tiles of `triton_packed` attention (`query_tile_starts`); None:
    # tiles of BLOCK_M tokens from 0
    query_tile_starts: torch.Tensor | None = None

    @classmethod
    def host_summary(cls, host: "HostPackedArrays") -> "PackedBatch":
        """The host-side fields only (lengths, adapter segments), for the bookkeeping of a batch
        whose device work runs elsewhere (a CUDA graph replay); its tensors are empty."""
        empty = torch.empty(0, dtype=torch.int64)
        return cls(
            input_ids=empty, position_ids=empty, cu_seqlens=empty, token_sequence_index=empty,
            max_seqlen=int(host.lengths.max()), sequence_lengths=tuple(host.lengths.tolist()),
            adapter_segments=adapter_segments(host.slots, host.cu_seqlens), adapter_slots=empty,
        )

    @property
    def num_tokens(self) -> int:
        return int(sum(self.sequence_lengths))

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)


@dataclass(frozen=True)
class PackingRows:
    """The sequences of many requests as flat arrays: the engine's working form (no per-row objects)."""

    token_ids: np.ndarray  # [total] int64, the rows back to back in row order
    starts: np.ndarray  # [N] offset of each row in token_ids
    lengths: np.ndarray  # [N]
    slots: np.ndarray  # [N] adapter slot of each row (0 = base model)

    @classmethod
    def of(cls, token_ids: np.ndarray, lengths: np.ndarray, slots: np.ndarray) -> "PackingRows":
        """From the rows' tokens back to back, their lengths and slots (int64)."""
        return cls(token_ids, offsets(lengths)[:-1], lengths, slots)

    @classmethod
    def concatenate(cls, token_ids: list[np.ndarray], lengths: list[np.ndarray], slots: list[np.ndarray]) -> "PackingRows":
        """From per-request parts: each request's rows back to back, its lengths and slots."""
        return cls.of(np.concatenate(token_ids).astype(np.int64, copy=False),
                      np.concatenate(lengths).astype(np.int64, copy=False),
                      np.concatenate(slots).astype(np.int64, copy=False))


def offsets(counts: np.ndarray) -> np.ndarray:
    """[n+1] int64: where each of n back-to-back runs of `counts` items starts, then the total."""
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return starts


def plan_row_batches(lengths: np.ndarray, slots: np.ndarray, max_batch_tokens: int) -> list[np.ndarray]:
    """Row indices of each batch: rows ordered by adapter slot (stable, so arrival order within an
    adapter), cut greedily so no batch exceeds the token budget."""
    if len(lengths) == 0:
        return []
    if lengths.max() > max_batch_tokens:
        raise ValueError(f"a sequence of {lengths.max()} tokens exceeds max_batch_tokens={max_batch_tokens}")
    order = np.argsort(slots, kind="stable")
    cumulative = np.cumsum(lengths[order])  # [N]
    batches, start, used = [], 0, 0
    while start < len(order):
        end = int(np.searchsorted(cumulative, used + max_batch_tokens, side="right"))
        batches.append(order[start:end])
        start, used = end, int(cumulative[end - 1])
    return batches


def pack_rows(rows: PackingRows, selected: np.ndarray, position_offset: int) -> "HostPackedArrays":
    """The host arrays of one batch made of `selected` rows, in that order."""
    lengths = rows.lengths[selected]
    cu_seqlens = offsets(lengths)
    total = int(cu_seqlens[-1])
    starts = rows.starts[selected]
    sequence_start = np.repeat(cu_seqlens[:-1], lengths)  # [T]: where each token's sequence begins
    if len(selected) == 1 or np.all(np.diff(selected) == 1):  # consecutive rows: one slice, no gather
        input_ids = rows.token_ids[starts[0] : starts[0] + total]
    else:
        input_ids = rows.token_ids[np.repeat(starts, lengths) + np.arange(total) - sequence_start]
    # XLM-R counts positions from pad_token_id + 1 in every sequence (HF
    # create_position_ids_from_input_ids); BERT from 0.
    position_ids = np.arange(total, dtype=np.int64) - sequence_start + position_offset
    sequence_index = np.repeat(np.arange(len(selected), dtype=np.int64), lengths)
    return HostPackedArrays(input_ids, position_ids, sequence_index, cu_seqlens, rows.slots[selected], lengths)


def to_device(host: "HostPackedArrays", device: torch.device) -> PackedBatch:
    """The packed batch on `device`, from its host arrays, in one host-to-device copy."""
    total, num_sequences = len(host.input_ids), len(host.lengths)
    tile_starts = query_tile_starts(host.cu_seqlens, total)
    flat_host = torch.from_numpy(
        np.concatenate([host.input_ids, host.position_ids, host.sequence_index, host.cu_seqlens, host.slots, tile_starts])
    )
    if device.type == "cuda":
        flat_host = flat_host.pin_memory()
    flat = flat_host.to(device, non_blocking=True)
    return PackedBatch(
        input_ids=flat[:total],
        position_ids=flat[total : 2 * total],
        token_sequence_index=flat[2 * total : 3 * total],
        cu_seqlens=flat[3 * total : 3 * total + num_sequences + 1].to(torch.int32),
        adapter_slots=flat[3 * total + num_sequences + 1 : 3 * total + 2 * num_sequences + 1].to(torch.int32),
        query_tile_starts=flat[3 * total + 2 * num_sequences + 1 :],
        max_seqlen=int(host.lengths.max()),
        sequence_lengths=tuple(host.lengths.tolist()),
        adapter_segments=adapter_segments(host.slots, host.cu_seqlens),
    )


@dataclass(frozen=True)
class HostPackedArrays:
    """The integer arrays of a packed batch, on the host (numpy int64)."""

    input_ids: np.ndarray  # [T]
    position_ids: np.ndarray  # [T]
    sequence_index: np.ndarray  # [T]
    cu_seqlens: np.ndarray  # [B+1]
    slots: np.ndarray  # [B]
    lengths: np.ndarray  # [B]


def adapter_segments(slots: np.ndarray, cu_seqlens: np.ndarray) -> tuple[AdapterSegment, ...]:
    """Maximal runs of consecutive sequences with the same slot, as token ranges."""
    boundaries = [0, *(np.flatnonzero(np.diff(slots)) + 1).tolist(), len(slots)]
    return tuple(
        AdapterSegment(int(slots[start]), int(cu_seqlens[start]), int(cu_seqlens[end]))
        for start, end in zip(boundaries, boundaries[1:])
    )


# The same packing for a list of SequenceRef (tests, benchmarks).


def _rows_of(sequences: list[SequenceRef]) -> PackingRows:
    return PackingRows.concatenate(
        [s.token_ids for s in sequences] or [np.zeros(0, dtype=np.int64)],
        [np.array([len(s.token_ids) for s in sequences], dtype=np.int64)],
        [np.array([s.adapter_slot for s in sequences], dtype=np.int64)],
    )


def plan_batches(sequences: list[SequenceRef], max_batch_tokens: int) -> list[list[SequenceRef]]:
    """`plan_row_batches` for SequenceRefs. Every sequence must be at most `max_batch_tokens` long."""
    rows = _rows_of(sequences)
    return [[sequences[i] for i in batch] for batch in plan_row_batches(rows.lengths, rows.slots, max_batch_tokens)]


def pack_host_arrays(sequences: list[SequenceRef], position_offset: int) -> HostPackedArrays:
    return pack_rows(_rows_of(sequences), np.arange(len(sequences)), position_offset)


def build_packed_batch(sequences: list[SequenceRef], position_offset: int, device: torch.device) -> PackedBatch:
    """Concatenate sequences (already grouped by adapter) into one packed batch on `device`."""
    return to_device(pack_host_arrays(sequences, position_offset), device)
