"""CUDA graphs of the whole forward pass + pooling for base-model batches.

A 16-token query costs ~150 kernel launches; on a slow host CPU those launches, not the GPU, set
the latency. A graph replays them with one call. Graphs are captured lazily per bucket of
(tokens, sequences, longest sequence), each rounded up to a power of two, tokens past 4,096 to a
multiple of 2,048 instead (a batch of 9,000 tokens computes 10,240 rows, not 16,384); a batch is
copied into the bucket's static tensors with one host-to-device copy:

- tokens past the batch belong to no sequence (`cu_seqlens` ends at the real token count), so no
  attention kernel reads them and no real row attends to them; their rows are computed and dropped;
- sequences past the batch are empty (repeated `cu_seqlens`); the last one collects the padding
  tokens' pooling sums and is dropped.
- `triton_packed` attention's query tile table (that backend's graphs only) covers the bucket's
  rows, padding included, in a part of the staging buffer sized by `query_tile_capacity`; its
  unused tiles are empty.

At most `max_graphs` graphs are kept (the `cuda_graph_max_graphs` parameter, MAX_GRAPHS by default);
past that, a bucket seen for the second time evicts the least
recently replayed graph (serving found the limit the hard way: mixed passage traffic filled it, and
single queries that came after ran eagerly at 5-12x their graphed latency). A bucket seen once runs
eagerly, so traffic that never repeats a bucket cannot make every batch pay a capture. `triton_packed` attention does not depend on
the longest sequence, so for it that part of the key is constant (fewer buckets, fewer captures).

Batches with adapter rows are graphed too, under a fourth part of the key, the LoRA plan
(`LoraLayers.graph_plan`): "merged" (one adapter: its slot is a graph input, W + B A is merged per
linear inside the graph), "tables" (the block table and the per-token slots are graph inputs, of
a fixed size per bucket, unused entries empty) or "fused tables" (the same and the tile table of
the GEMMs that add the expand in their epilogue, `lora/lora_gemm_triton.py`). Loading an adapter
that reallocates LoRA buffers drops these graphs (they read the old buffers); loading one into
existing buffers does not (the graphs read the slots' current weights). The eager path
(`PackedEncoder.forward` + `pool`, with the layers planned on the host) is the reference the GPU
tests compare the replay with.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .encoder import PackedEncoder
from .lora.lora_gemm_triton import MAX_RUNS, TILE_ROWS, max_runs_bound, tile_slot_table
from .lora.sgmv_triton import lora_batch_table_arrays, max_lora_blocks
from .packed_attention_triton import plain_query_tile_starts, query_tile_capacity, query_tile_starts
from .packing import HostPackedArrays, PackedBatch, adapter_segments
from .pooling import pool

MIN_TOKENS, MIN_SEQUENCES, MIN_SEQLEN = 64, 8, 32
TOKEN_STEP = 2048  # token buckets past 2 * TOKEN_STEP are multiples of it
MAX_GRAPHS = 32  # the default of `cuda_graph_max_graphs`
BASE_PLAN = "base"  # the key's LoRA plan for base-model batches
FUSED_TABLES_PLAN = "fused tables"  # "tables" with the expands in the GEMMs' epilogues

GraphKey = tuple[int, int, int, str]  # (tokens, sequences, longest sequence, LoRA plan)


def _bucket(value: int, minimum: int) -> int:
    return max(minimum, 1 << (value - 1).bit_length())


def _token_bucket(tokens: int) -> int:
    """Powers of two up to 2 * TOKEN_STEP, then multiples of TOKEN_STEP: a graph computes every row of
    its bucket, so powers of two would waste up to half of a large batch's GPU time."""
    if tokens <= 2 * TOKEN_STEP:
        return _bucket(tokens, MIN_TOKENS)
    return -(-tokens // TOKEN_STEP) * TOKEN_STEP


@dataclass
class _CapturedGraph:
    graph: torch.cuda.CUDAGraph
    # Two pinned staging buffers, used in turn, int64 each (`_layout`): ids | positions | sequence
    # index | cu_seqlens, then for LoRA plans merged slot | block table | token slots. A buffer is
    # rewritten only after its last copy to the device has finished (its event).
    host_inputs: tuple[torch.Tensor, torch.Tensor]
    copied: tuple[torch.cuda.Event, torch.cuda.Event]
    device_input: torch.Tensor
    pooled: torch.Tensor  # [sequences, H] float32, written by each replay
    layout: dict[str, slice]  # where each input lies in the staging buffers (`GraphedForward._layout`)
    # Device tensors made before the capture that the graph reads and writes at every replay (the
    # int32 copies of the inputs, the batch's other tensors): a CUDA graph holds no reference to
    # them, and once freed the allocator handed their memory to other tensors, which replays then
    # overwrote (an index in `EmbeddingEngine._forward` came out of bounds).
    static_tensors: tuple
    turn: int = 0


class GraphedForward:
    """Runs planned batches of up to `max_tokens` tokens (base model, or adapters the LoRA kernels
    cover) as CUDA graph replays."""

    def __init__(
        self, model: PackedEncoder, pooling: str, position_offset: int, max_tokens: int, max_seqlen: int,
        lora_layers=None, max_graphs: int = MAX_GRAPHS,
    ):
        self._init_cache(model, max_tokens, max_seqlen, lora_layers, max_graphs)
        self.pooling = pooling
        self.position_offset = position_offset
        self.stream = torch.cuda.Stream()
        # One memory pool for all graphs: they replay one at a time on one stream, and each
        # replay's output is copied out (stream-ordered) before the next replay can reuse memory;
        # outputs stay referenced, so no capture hands out another graph's output block. The pool is
        # a MemPool held here rather than a bare handle: a handle lives only while some graph captured
        # into it does, and once every graph was dropped (evictions, grown LoRA buffers) while a block
        # of the pool was still alive, the next capture into it failed the allocator's internal assert
        # `use_count > 0` (torch 2.11, test_adapter_graph_replays_equal_the_eager_engine_...).
        self._memory_pool = torch.cuda.MemPool()
        self.memory_pool = self._memory_pool.id

    @classmethod
    def cache_rules_only(cls, model, max_tokens: int, max_seqlen: int, lora_layers=None,
                         max_graphs: int = MAX_GRAPHS) -> "GraphedForward":
        """The bucket, admission and eviction rules alone, without a CUDA stream or memory pool: for
        the CPU tests of those rules and benchmarks/graph_cache_sim.py. It captures nothing: stub
        `_capture` (which keeps what it makes in `graphs`) and `_drop` before `graph_of`."""
        cache = cls.__new__(cls)
        cache._init_cache(model, max_tokens, max_seqlen, lora_layers, max_graphs)
        return cache

    def _init_cache(self, model, max_tokens: int, max_seqlen: int, lora_layers, max_graphs: int) -> None:
        self.model = model
        self.lora_layers = lora_layers  # lora.layers.LoraLayers, or None: base-model batches only
        self._lora_generation = lora_layers.buffer_generation if lora_layers is not None else 0
        self.max_tokens = max_tokens
        self.max_seqlen = max_seqlen
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[GraphKey, _CapturedGraph] = OrderedDict()  # oldest replay first
        # Counted for the serving metrics (`EmbeddingEngine.metrics_snapshot`): batches replayed,
        # graphs captured, graphs evicted to make room.
        self.replays = self.captures = self.evictions = 0
        self._sightings: dict[GraphKey, int] = {}  # buckets seen while the cache was full

    def __del__(self) -> None:
        # The graphs go before their pool: some torch versions assert, when a MemPool is destroyed,
        # that no graph uses it any more.
        getattr(self, "graphs", {}).clear()

    def bucket(self, host: HostPackedArrays) -> GraphKey | None:
        """The graph bucket that runs this batch, or None: run it eagerly."""
        if self.model.attention_backend not in ("flash_attn", "torch_varlen", "triton_packed"):
            return None  # the SDPA reference syncs with the host: not capturable
        if len(host.input_ids) > self.max_tokens:
            return None
        self._drop_stale_lora_graphs()
        plan = BASE_PLAN
        if host.slots.any():
            plan = self._lora_plan(host.slots, host.cu_seqlens)
            if plan is None:
                return None
        key = self._key(len(host.input_ids), len(host.lengths), int(host.lengths.max()), plan)
        if key in self.graphs or len(self.graphs) < self.max_graphs:
            return key
        if len(self._sightings) > 4 * self.max_graphs:
            self._sightings.clear()
        self._sightings[key] = self._sightings.get(key, 0) + 1
        return key if self._sightings[key] >= 2 else None

    def _drop_stale_lora_graphs(self) -> None:
        """LoRA buffers reallocated since the last batch: the graphs that read the old ones go at once,
        whatever this batch is, so they hold no cache place and no pool memory."""
        if self.lora_layers is None or self.lora_layers.buffer_generation == self._lora_generation:
            return
        for key in [key for key in self.graphs if key[3] != BASE_PLAN]:
            self._drop(key)
        self._lora_generation = self.lora_layers.buffer_generation

    def _lora_plan(self, slots: np.ndarray, cu_seqlens: np.ndarray) -> str | None:
        if self.lora_layers is None:
            return None
        if np.count_nonzero(np.diff(slots)) + 1 > self._segment_capacity(_bucket(len(slots) + 1, MIN_SEQUENCES)):
            return None  # more adapter segments than the bucket's block table holds
        plan = self.lora_layers.graph_plan(slots)
        if plan == "tables" and self.lora_layers.fuse_expand:
            segment_starts = cu_seqlens[np.flatnonzero(np.diff(slots)) + 1]
            if max_runs_bound(np.append(segment_starts, 0)) <= MAX_RUNS:  # the tile table holds the batch
                return FUSED_TABLES_PLAN
        return plan

    def _segment_capacity(self, bucket_sequences: int) -> int:
        """Adapter segments a bucket's block table is sized for: the engine groups rows by slot, so a
        batch has at most one segment per slot."""
        return min(bucket_sequences, self.lora_layers.num_slots)

    def _key(self, tokens: int, sequences: int, longest: int, plan: str = BASE_PLAN) -> GraphKey:
        return (
            # + 1: at least one padding row, where empty sequences point
            min(_token_bucket(tokens + 1), self.max_tokens + 1),
            _bucket(sequences + 1, MIN_SEQUENCES),  # + 1: the sequence that takes the padding tokens
            self.max_seqlen
            if self.model.attention_backend == "triton_packed"
            else min(_bucket(longest, MIN_SEQLEN), self.max_seqlen),
            plan,
        )

    def _layout(self, key: GraphKey) -> dict[str, slice]:
        """Where each input lies in a bucket's staging buffer (int64 elements)."""
        tokens, sequences, _, plan = key
        sizes = {"input_ids": tokens, "position_ids": tokens, "sequence_index": tokens, "cu_seqlens": sequences + 1}
        if self.model.attention_backend == "triton_packed":  # its query tile table; other kernels tile by sequence
            sizes.update(query_tile_starts=query_tile_capacity(tokens) + 1)
        if plan != BASE_PLAN:
            blocks = max_lora_blocks(tokens, self._segment_capacity(sequences))
            sizes.update(merged_slot=1, block_table=3 * blocks, token_slots=tokens)
            if plan == FUSED_TABLES_PLAN:
                sizes.update(tile_slots=-(-tokens // TILE_ROWS) * (1 + MAX_RUNS))
        layout, offset = {}, 0
        for name, size in sizes.items():
            layout[name] = slice(offset, offset + size)
            offset += size
        return layout

    def pooled(self, host: HostPackedArrays, key: GraphKey) -> torch.Tensor:
        """[B, H] float32 on the device, equal to `pool(model(batch))` of the same packed batch;
        `key` is `bucket(host)`."""
        num_rows = len(host.lengths)
        captured = self.graph_of(key)
        num_sequences, plan = key[1], key[3]
        total = len(host.input_ids)
        turn = captured.turn
        captured.turn ^= 1
        captured.copied[turn].synchronize()
        view = captured.host_inputs[turn].numpy()
        layout = captured.layout

        def fill(name: str, values, padding) -> None:
            part = view[layout[name]]
            part[: len(values)] = values
            part[len(values) :] = padding

        fill("input_ids", host.input_ids, 0)
        fill("position_ids", host.position_ids, self.position_offset)
        fill("sequence_index", host.sequence_index, num_sequences - 1)  # padding tokens pool into the last
        fill("cu_seqlens", host.cu_seqlens, total)  # empty sequences
        if "query_tile_starts" in layout:
            bucket_tokens = key[0]  # the graph's rows; the tiles cover its padding rows too
            tile_starts = query_tile_starts(host.cu_seqlens, bucket_tokens, query_tile_capacity(bucket_tokens))
            fill("query_tile_starts", tile_starts, bucket_tokens)  # unused tiles: empty
        if plan == "merged":
            view[layout["merged_slot"]] = host.slots[0]
        elif plan != BASE_PLAN:
            segments = adapter_segments(host.slots, host.cu_seqlens)
            table, token_slots = lora_batch_table_arrays(segments, True)
            fill("block_table", table.ravel(), 0)  # unused entries: empty blocks
            fill("token_slots", token_slots, 0)  # padding tokens: the base model
            if plan == FUSED_TABLES_PLAN:  # over the bucket's tokens: padding tiles hold no adapter
                tiles = tile_slot_table(segments, key[0])
                fill("tile_slots", tiles.ravel(), 0)
        # Stream order: the copy runs after the previous replay has read its inputs.
        captured.device_input.copy_(captured.host_inputs[turn], non_blocking=True)
        captured.copied[turn].record()
        captured.graph.replay()
        self.replays += 1
        return captured.pooled[:num_rows]

    def graph_of(self, key: GraphKey) -> _CapturedGraph:
        """The bucket's graph, now the most recently replayed; captured first if the bucket has none,
        after evicting the least recently replayed graphs while the cache is full."""
        captured = self.graphs.get(key)
        if captured is None:
            while len(self.graphs) >= self.max_graphs:
                self._evict_least_recent()
            self._sightings.pop(key, None)
            captured = self._capture(key)
        self.graphs.move_to_end(key)
        return captured

    def _evict_least_recent(self) -> None:
        self._drop(next(iter(self.graphs)))
        self.evictions += 1

    def _drop(self, key: GraphKey) -> None:
        dropped = self.graphs.pop(key)
        # Its last replay's output may still be being copied out: let the device finish first.
        dropped.copied[0].synchronize()
        dropped.copied[1].synchronize()
        torch.cuda.current_stream().synchronize()

    def _capture(self, key: GraphKey) -> _CapturedGraph:
        tokens, num_sequences, longest, plan = key
        device = self.model.embeddings.word_embeddings.weight.device
        layout = self._layout(key)
        size = max(part.stop for part in layout.values())
        host_inputs = tuple(torch.zeros(size, dtype=torch.int64).pin_memory() for _ in range(2))
        device_input = torch.zeros(size, dtype=torch.int64, device=device)
        # The int32 inputs are converted inside the graph, from their int64 staging.
        int32_inputs = [name for name in ("cu_seqlens", "block_table", "token_slots", "tile_slots") if name in layout]
        int32 = {name: torch.zeros(layout[name].stop - layout[name].start, dtype=torch.int32, device=device)
                 for name in int32_inputs}
        batch = PackedBatch(
            input_ids=device_input[layout["input_ids"]],
            position_ids=device_input[layout["position_ids"]],
            token_sequence_index=device_input[layout["sequence_index"]],
            cu_seqlens=int32["cu_seqlens"],
            max_seqlen=longest,
            sequence_lengths=(0,) * num_sequences,
            adapter_segments=(),
            adapter_slots=torch.zeros(num_sequences, dtype=torch.int32, device=device),
            query_tile_starts=device_input[layout["query_tile_starts"]] if "query_tile_starts" in layout else None,
        )
        batch.position_ids.fill_(self.position_offset)  # valid positions for the warm-up runs
        if batch.query_tile_starts is not None:  # and valid tiles
            plain_tiles = torch.from_numpy(plain_query_tile_starts(tokens))
            batch.query_tile_starts.fill_(tokens)[: len(plain_tiles)].copy_(plain_tiles)

        if plan != BASE_PLAN:
            tile_slots = int32["tile_slots"].view(-1, 1 + MAX_RUNS) if "tile_slots" in int32 else None
            self.lora_layers.capture(
                plan, device_input[layout["merged_slot"]], int32["block_table"].view(-1, 3), int32["token_slots"],
                tile_slots,
            )

        def forward() -> torch.Tensor:
            for name, converted in int32.items():
                converted.copy_(device_input[layout[name]])  # int64 -> int32, inside the graph
            return pool(self.model(batch), batch, self.pooling)

        try:
            # Warm up on a side stream (kernels compile, cuBLAS picks its algorithms), then capture.
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream), torch.inference_mode():
                for _ in range(2):
                    forward()
            torch.cuda.current_stream().wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=self.memory_pool):
                pooled = forward()
        finally:
            if plan != BASE_PLAN:
                self.lora_layers.deactivate()
        events = (torch.cuda.Event(), torch.cuda.Event())
        for event in events:
            event.record()
        captured = _CapturedGraph(graph, host_inputs, events, device_input, pooled, layout, (batch, int32))
        self.graphs[key] = captured
        self.captures += 1
        return captured

