"""Which batches `GraphedForward` sends to a CUDA graph (the policy only: capture and replay need a
GPU and are tested in tests/gpu/test_cuda_graphs.py against the eager forward)."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest

import loraembed.cuda_graphs as cuda_graphs
from loraembed.cuda_graphs import GraphedForward
from loraembed.packing import PackingRows, pack_rows


def graphed(attention_backend: str, max_tokens: int = 8192) -> GraphedForward:
    # The bucket policy without __init__'s CUDA stream and memory pool.
    forward = GraphedForward.__new__(GraphedForward)
    forward.model = SimpleNamespace(attention_backend=attention_backend)
    forward.max_tokens, forward.max_seqlen = max_tokens, 512
    forward.graphs, forward._sightings = OrderedDict(), {}
    return forward


def host_batch(lengths, slots=None):
    lengths = np.asarray(lengths, dtype=np.int64)
    slots = np.zeros(len(lengths), dtype=np.int64) if slots is None else np.asarray(slots, dtype=np.int64)
    rows = PackingRows.concatenate([np.arange(int(lengths.sum()), dtype=np.int64) + 5], [lengths], [slots])
    return pack_rows(rows, np.arange(len(lengths)), 2)


def test_buckets_round_up_and_ignore_the_longest_sequence_for_triton_packed():
    assert graphed("triton_packed").bucket(host_batch([16])) == (64, 8, 512)
    assert graphed("triton_packed").bucket(host_batch([300] * 20)) == (8192, 32, 512)
    assert graphed("flash_attn").bucket(host_batch([16, 100])) == (128, 8, 128)


@pytest.mark.parametrize(
    "backend, lengths, slots",
    [("sdpa", [16], None), ("triton_packed", [16, 16], [0, 3]), ("triton_packed", [5000, 5000], None)],
    ids=["reference attention", "adapter rows", "over max_tokens"],
)
def test_batches_that_run_eagerly(backend, lengths, slots):
    assert graphed(backend).bucket(host_batch(lengths, slots)) is None


def test_when_full_a_bucket_is_graphed_from_its_second_sighting(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    forward = graphed("triton_packed")
    forward.graphs[(64, 8, 512)] = forward.graphs[(1024, 16, 512)] = object()  # full
    assert forward.bucket(host_batch([16])) == (64, 8, 512)  # already graphed
    new = host_batch([300] * 20)
    assert forward.bucket(new) is None  # first sighting: eager
    assert forward.bucket(new) == (8192, 32, 512)  # second: worth evicting for
