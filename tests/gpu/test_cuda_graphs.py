"""CUDA graph replays of small base-model batches equal the eager forward pass, across buckets,
repeated replays, both fast attention backends and both poolings; adapter batches stay eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
from tests.support.token_rows import xlmr_rows

pytestmark = pytest.mark.gpu


def make_engine(folder, backend, pooling, graph_tokens):
    return EmbeddingEngine(
        ServingConfig.from_parameters(
            {"model": str(folder), "dtype": "bfloat16", "attention": backend, "pooling": pooling,
             "cuda_graph_max_tokens": str(graph_tokens)},
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


def test_graphs_past_the_limit_evict_the_least_recently_replayed(xlmr_base_folder, monkeypatch):
    """More buckets than MAX_GRAPHS: a bucket seen a second time evicts the least recently replayed
    graph (one seen once runs eagerly), and every batch still equals the eager forward."""
    import loraembed.cuda_graphs as cuda_graphs

    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    graphed = make_engine(xlmr_base_folder, "triton_packed", "mean", 8192)
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
