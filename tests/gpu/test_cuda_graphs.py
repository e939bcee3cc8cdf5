"""CUDA graph replays of base-model batches equal the eager forward pass, across buckets, repeated
replays, the three fast attention backends and both poolings; evictions keep the most recently
replayed graphs; replays write only memory their graph keeps, and a capture after every graph was
evicted still works. Adapter graphs: tests/gpu/test_lora_gpu_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
from tests.support.token_rows import xlmr_rows

pytestmark = pytest.mark.gpu


def make_engine(folder, backend, pooling, graph_tokens, max_graphs=32):
    return EmbeddingEngine(
        ServingConfig.from_parameters(
            {"model": str(folder), "dtype": "bfloat16", "attention": backend, "pooling": pooling,
             "cuda_graph_max_tokens": str(graph_tokens), "cuda_graph_max_graphs": str(max_graphs)},
            environ={},
        ),
        "cuda",
    )


def requests_of(lengths, rng):
    ids, mask = xlmr_rows(lengths, rng)
    return [EncoderRequest(ids, mask, parameters={"normalize": False})]


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen", "triton_packed"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_graph_replays_equal_the_eager_forward(xlmr_base_folder, backend, pooling):
    try:
        graphed = make_engine(xlmr_base_folder, backend, pooling, 8192)
    except Exception as error:  # flash-attn missing
        pytest.skip(str(error))
    eager = make_engine(xlmr_base_folder, backend, pooling, 0)
    assert graphed.graphed is not None and eager.graphed is None
    rng = np.random.default_rng(0)
    batches = [[16], [3, 40, 17], [16], rng.integers(3, 64, 100).tolist(), [512, 5], [16], rng.integers(3, 200, 20).tolist(),
               rng.integers(4, 65, 400).tolist(), [512] * 15]  # the last two: ~14k and 7.7k tokens
    for lengths in batches * 2:  # the second round replays graphs captured in the first
        requests = requests_of(lengths, rng)
        ours = graphed.embed(requests)[0]
        reference = eager.embed(requests)[0]
        cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
        assert cosine.min() >= 0.9999, (lengths, cosine.min())
    assert 0 < len(graphed.graphed.graphs) <= len(batches)
    # A batch over the graph limit runs eagerly, and still equals the eager engine.
    big = requests_of([500] * 20, rng)  # 10,000 tokens > 8192: eager
    np.testing.assert_allclose(graphed.embed(big)[0], eager.embed(big)[0], atol=2e-2, rtol=0)


def test_graphs_past_the_limit_evict_the_least_recently_replayed(xlmr_base_folder):
    """More buckets than cuda_graph_max_graphs: a bucket seen a second time evicts the least recently
    replayed graph (one seen once runs eagerly), and every batch still equals the eager forward."""
    graphed = make_engine(xlmr_base_folder, "triton_packed", "mean", 8192, max_graphs=2)
    eager = make_engine(xlmr_base_folder, "triton_packed", "mean", 0)
    rng = np.random.default_rng(5)
    # Buckets (tokens, sequences): A = (64, 8), B = (1024, 16), C = (6144, 32).
    batches = [[16], [100] * 10, [16], [300] * 20, [16], [3, 5], [200] * 30, [16]]  # A B A C A A C A
    for lengths in batches:
        requests = requests_of(lengths, rng)
        ours, reference = graphed.embed(requests)[0], eager.embed(requests)[0]
        cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
        assert cosine.min() >= 0.9999, (lengths, cosine.min())
    # C ran eagerly the first time, and evicted B (never replayed) the second.
    assert graphed.graphed.evictions == 1
    assert [key[0] for key in graphed.graphed.graphs] == [6144, 64]  # least recently replayed first
    # The serving metrics count the same: 7 of 8 passes replayed, A B C captured, B evicted, A C kept.
    metrics = graphed.metrics_snapshot()
    assert (metrics.forward_passes, metrics.graph_replays, metrics.graph_captures) == (8, 7, 3)
    assert (metrics.graph_evictions, metrics.graphs_resident) == (1, 2)


def test_a_capture_after_every_graph_was_evicted_equals_the_eager_forward(xlmr_base_folder):
    """The graphs' memory pool outlives them. With one graph allowed, a second bucket evicts the only
    graph while a tensor of the pool is still referenced (here its output buffer; in the engine, any
    block handed out during a capture), and then captures into the pool. A bare pool handle failed
    the allocator's internal assert `use_count > 0` there (torch 2.11)."""
    graphed = make_engine(xlmr_base_folder, "triton_packed", "mean", 8192, max_graphs=1)
    eager = make_engine(xlmr_base_folder, "triton_packed", "mean", 0)
    rng = np.random.default_rng(11)
    kept = None
    for lengths in [[16, 30], [200] * 5, [200] * 5, [16, 30], [16, 30]]:  # A, B and A eager, B and A evict
        requests = requests_of(lengths, rng)
        ours, reference = graphed.embed(requests)[0], eager.embed(requests)[0]
        cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
        assert cosine.min() >= 0.9999, (lengths, cosine.min())
        if kept is None:
            kept = [captured.pooled for captured in graphed.graphed.graphs.values()]
    assert graphed.graphed.evictions == 2
    assert len(kept) == 1


def test_replays_write_only_memory_their_graph_keeps(xlmr_base_folder):
    """A graph converts its int64 inputs into int32 tensors made before its capture, and reads the
    batch's other tensors, at every replay; a CUDA graph holds no reference to them. Freed after the
    capture, their memory went to other tensors, which later replays overwrote (an index in
    `EmbeddingEngine._forward` came out of bounds in the adapter graph test)."""
    graphed = make_engine(xlmr_base_folder, "triton_packed", "mean", 8192)
    rng = np.random.default_rng(3)
    requests = requests_of([16, 40, 7], rng)
    first = graphed.embed(requests)[0]  # captures, then replays
    assert len(graphed.graphed.graphs) == 1
    # Small tensors, as the allocator hands out the blocks freed last: they would take those blocks.
    sentinels = [torch.full((size,), -7, dtype=torch.int32, device="cuda") for size in (16, 256, 4096) for _ in range(200)]
    again = graphed.embed(requests)[0]
    torch.cuda.synchronize()
    overwritten = sum(int((tensor != -7).any()) for tensor in sentinels)
    assert overwritten == 0, f"replays wrote into {overwritten} tensors the graph does not own"
    np.testing.assert_array_equal(again, first)
