"""Which batches `GraphedForward` sends to a CUDA graph (the policy only: capture and replay need a
GPU and are tested in tests/gpu/test_cuda_graphs.py against the eager forward)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import loraembed.cuda_graphs as cuda_graphs
from loraembed.cuda_graphs import GraphedForward
from loraembed.lora.layers import LoraLayers
from loraembed.lora import lora_gemm_triton
from loraembed.lora.sgmv_triton import BLOCK_T, lora_batch_table_arrays
from loraembed.packed_attention_triton import query_tile_capacity, query_tile_starts
from loraembed.packing import PackingRows, pack_rows


def graphed(attention_backend: str, max_tokens: int = 8192, lora_layers=None) -> GraphedForward:
    return GraphedForward.cache_rules_only(SimpleNamespace(attention_backend=attention_backend), max_tokens, 512, lora_layers)


class KernelLoraLayers:
    """`LoraLayers.graph_plan`'s answer on a GPU whose kernels cover every adapter, without weights."""

    num_slots = 5
    buffer_generation = 0
    use_block_tables = merge_single_adapter = True
    fuse_expand = False  # the GPU's default is on where the fused GEMM runs; tested apart below
    graph_plan = LoraLayers.graph_plan

    def __init__(self):
        self.linears, self._kernels_cover = {}, (-1, False)


def host_batch(lengths, slots=None):
    lengths = np.asarray(lengths, dtype=np.int64)
    slots = np.zeros(len(lengths), dtype=np.int64) if slots is None else np.asarray(slots, dtype=np.int64)
    rows = PackingRows.concatenate([np.arange(int(lengths.sum()), dtype=np.int64) + 5], [lengths], [slots])
    return pack_rows(rows, np.arange(len(lengths)), 2)


def test_buckets_round_up_and_ignore_the_longest_sequence_for_triton_packed():
    assert graphed("triton_packed").bucket(host_batch([16])) == (64, 8, 512, "base")
    assert graphed("triton_packed").bucket(host_batch([300] * 20)) == (6144, 32, 512, "base")
    assert graphed("triton_packed").bucket(host_batch([300] * 13)) == (4096, 16, 512, "base")
    assert graphed("flash_attn").bucket(host_batch([16, 100])) == (128, 8, 128, "base")


def test_large_batches_take_token_buckets_of_2048_rows_up_to_the_budget():
    """Past 4,096 tokens a bucket is a multiple of 2,048, not a power of two (a graph computes every
    row of its bucket); a full batch takes the budget plus the one padding row."""
    forward = graphed("triton_packed", max_tokens=16384)
    assert forward.bucket(host_batch([450] * 20))[0] == 10240  # 9,000 tokens, not 16,384
    assert forward.bucket(host_batch([512] * 24))[0] == 14336  # 12,288 + the padding row
    assert forward.bucket(host_batch([512] * 32))[0] == 16385


@pytest.mark.parametrize(
    "backend, lengths, slots",
    [("sdpa", [16], None), ("triton_packed", [16, 16], [0, 3]), ("triton_packed", [5000, 5000], None)],
    ids=["reference attention", "adapter rows without LoRA layers", "over max_tokens"],
)
def test_batches_that_run_eagerly(backend, lengths, slots):
    assert graphed(backend).bucket(host_batch(lengths, slots)) is None


def test_adapter_batches_are_graphed_by_plan():
    forward = graphed("triton_packed", lora_layers=KernelLoraLayers())
    assert forward.bucket(host_batch([16], [3])) == (64, 8, 512, "merged")  # one adapter: merged per linear
    assert forward.bucket(host_batch([16, 16, 16], [0, 3, 4])) == (64, 8, 512, "tables")
    assert forward.bucket(host_batch([16, 16], [2, 2])) == (64, 8, 512, "merged")
    assert forward.bucket(host_batch([16, 16], [0, 2])) == (64, 8, 512, "tables")  # base rows too
    forward.lora_layers.merge_single_adapter = False
    assert forward.bucket(host_batch([16], [3])) == (64, 8, 512, "tables")
    forward.lora_layers.use_block_tables = False  # the CPU reference plan: host state, not capturable
    assert forward.bucket(host_batch([16], [3])) is None


def test_a_batch_with_more_segments_than_its_block_table_holds_runs_eagerly():
    forward = graphed("triton_packed", lora_layers=KernelLoraLayers())  # 5 slots
    # Nine rows alternating between slots: nine segments (the engine would have grouped them).
    assert forward.bucket(host_batch([16] * 9, [1, 2] * 4 + [1])) is None
    assert forward.bucket(host_batch([16] * 9, [1] * 4 + [2] * 5)) == (256, 16, 512, "tables")


def test_mixed_adapter_batches_fuse_the_expand_while_the_tile_table_holds_them():
    forward = graphed("triton_packed", lora_layers=KernelLoraLayers())
    forward.lora_layers.fuse_expand = True
    assert forward.bucket(host_batch([16, 16, 16], [0, 3, 4])) == (64, 8, 512, "fused tables")
    assert forward.bucket(host_batch([16], [3])) == (64, 8, 512, "merged")  # one adapter: still merged
    # 17 segments starting inside the first 128-row tile: more than the tile table may hold.
    forward.lora_layers.num_slots = 40
    many = host_batch([4] * (lora_gemm_triton.MAX_RUNS + 1), list(range(1, lora_gemm_triton.MAX_RUNS + 2)))
    assert forward.bucket(many) == (128, 32, 512, "tables")


@pytest.mark.parametrize("lengths, slots", [([16], [3]), ([200, 5, 64, 300], [0, 1, 1, 4]), ([64] * 30 + [1], [2] * 31)])
@pytest.mark.parametrize("fuse_expand", [False, True])
def test_the_staging_layout_holds_every_batch_of_its_bucket(lengths, slots, fuse_expand):
    forward = graphed("triton_packed", lora_layers=KernelLoraLayers())
    forward.lora_layers.fuse_expand = fuse_expand
    host = host_batch(lengths, slots)
    key = forward.bucket(host)
    layout = forward._layout(key)
    assert [part.start for part in layout.values()][1:] == [part.stop for part in layout.values()][:-1]  # back to back
    table, token_slots = lora_batch_table_arrays(
        cuda_graphs.adapter_segments(host.slots, host.cu_seqlens), with_token_slots=True
    )
    assert table.size <= layout["block_table"].stop - layout["block_table"].start
    assert len(token_slots) <= layout["token_slots"].stop - layout["token_slots"].start == key[0]
    assert (table[:, 1] - table[:, 0]).max() <= BLOCK_T
    if key[3] == "fused tables":  # the tile table over the bucket's tokens
        tiles = lora_gemm_triton.tile_slot_table(cuda_graphs.adapter_segments(host.slots, host.cu_seqlens), key[0])
        assert tiles.size == layout["tile_slots"].stop - layout["tile_slots"].start
    # triton_packed attention's query tiles over the bucket's rows, padding rows included
    query_tiles = query_tile_starts(host.cu_seqlens, key[0], query_tile_capacity(key[0]))
    assert query_tiles[-1] == key[0]
    assert len(query_tiles) <= layout["query_tile_starts"].stop - layout["query_tile_starts"].start


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_only_triton_packed_graphs_stage_a_query_tile_table(backend):
    """The other attention kernels tile by sequence: their graphs neither stage nor fill the table."""
    forward = graphed(backend)
    assert "query_tile_starts" not in forward._layout(forward.bucket(host_batch([200, 5, 64], [0, 0, 0])))


def test_when_full_a_bucket_is_graphed_from_its_second_sighting():
    forward = graphed("triton_packed")
    forward.max_graphs = 2  # cuda_graph_max_graphs
    forward.graphs[(64, 8, 512, "base")] = forward.graphs[(1024, 16, 512, "base")] = object()  # full
    assert forward.bucket(host_batch([16])) == (64, 8, 512, "base")  # already graphed
    new = host_batch([300] * 20)
    assert forward.bucket(new) is None  # first sighting: eager
    assert forward.bucket(new) == (6144, 32, 512, "base")  # second: worth evicting for


def test_grown_lora_buffers_drop_the_adapter_graphs_before_any_batch():
    """Graphs that read LoRA buffers since reallocated go at the next batch, a base-model one too, so
    they hold no place in the cache; base-model graphs stay."""
    layers = KernelLoraLayers()
    forward = graphed("triton_packed", lora_layers=layers)
    forward._drop = forward.graphs.pop  # dropping a real graph waits on the GPU first
    for key in [(64, 8, 512, "base"), (64, 8, 512, "merged"), (128, 8, 512, "tables")]:
        forward.graphs[key] = object()
    assert forward.bucket(host_batch([16])) == (64, 8, 512, "base")
    assert len(forward.graphs) == 3  # same generation: nothing dropped
    layers.buffer_generation = 1
    assert forward.bucket(host_batch([16])) == (64, 8, 512, "base")
    assert list(forward.graphs) == [(64, 8, 512, "base")]
