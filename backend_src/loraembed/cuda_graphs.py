"""CUDA graphs of the whole forward pass + pooling for base-model batches.

A 16-token query costs ~150 kernel launches; on a slow host CPU those launches, not the GPU, set
the latency. A graph replays them with one call. Graphs are captured lazily per bucket of
(tokens, sequences, longest sequence), each rounded up to a power of two; a batch is copied into
the bucket's static tensors with one host-to-device copy:

- tokens past the batch belong to no sequence (`cu_seqlens` ends at the real token count), so no
  attention kernel reads them and no real row attends to them; their rows are computed and dropped;
- sequences past the batch are empty (repeated `cu_seqlens`); the last one collects the padding
  tokens' pooling sums and is dropped.

At most MAX_GRAPHS graphs are kept; past that, a bucket seen for the second time evicts the least
recently replayed graph (serving found the limit the hard way: mixed passage traffic filled it, and
single queries that came after ran eagerly at 5-12x their graphed latency). A bucket seen once runs
eagerly, so traffic that never repeats a bucket cannot make every batch pay a capture. `triton_packed` attention does not depend on
the longest sequence, so for it that part of the key is constant (fewer buckets, fewer captures).

Only batches whose rows all use the base model (or a merged adapter) are graphed: the LoRA layers'
per-batch segment layout is host-side state that a graph would freeze. The eager path
(`PackedEncoder.forward` + `pool`) is the reference the GPU tests compare the replay with.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .encoder import PackedEncoder
from .packing import HostPackedArrays, PackedBatch
from .pooling import pool

MIN_TOKENS, MIN_SEQUENCES, MIN_SEQLEN = 64, 8, 32
MAX_GRAPHS = 24


def _bucket(value: int, minimum: int) -> int:
    return max(minimum, 1 << (value - 1).bit_length())


@dataclass
class _CapturedGraph:
    graph: torch.cuda.CUDAGraph
    # Two pinned staging buffers, used in turn, [3 * tokens + sequences + 1] int64 each:
    # ids | positions | sequence index | cu_seqlens. A buffer is rewritten only after its last
    # copy to the device has finished (its event).
    host_inputs: tuple[torch.Tensor, torch.Tensor]
    copied: tuple[torch.cuda.Event, torch.cuda.Event]
    device_input: torch.Tensor
    pooled: torch.Tensor  # [sequences, H] float32, written by each replay
    turn: int = 0


class GraphedForward:
    """Runs planned base-model batches of up to `max_tokens` tokens as CUDA graph replays."""

    def __init__(self, model: PackedEncoder, pooling: str, position_offset: int, max_tokens: int, max_seqlen: int):
        self.model = model
        self.pooling = pooling
        self.position_offset = position_offset
        self.max_tokens = max_tokens
        self.max_seqlen = max_seqlen
        self.graphs: OrderedDict[tuple[int, int, int], _CapturedGraph] = OrderedDict()  # oldest replay first
        self.evictions = 0
        self._sightings: dict[tuple[int, int, int], int] = {}  # buckets seen while the cache was full
        self.stream = torch.cuda.Stream()
        # One memory pool for all graphs: they replay one at a time on one stream, and each
        # replay's output is copied out (stream-ordered) before the next replay can reuse memory;
        # outputs stay referenced, so no capture hands out another graph's output block.
        self.memory_pool = torch.cuda.graph_pool_handle()

    def bucket(self, host: HostPackedArrays) -> tuple[int, int, int] | None:
        """The graph bucket that runs this batch, or None: run it eagerly."""
        if self.model.attention_backend not in ("flash_attn", "torch_varlen", "triton_packed"):
            return None  # the SDPA reference syncs with the host: not capturable
        if host.slots.any() or len(host.input_ids) > self.max_tokens:
            return None
        key = self._key(len(host.input_ids), len(host.lengths), int(host.lengths.max()))
        if key in self.graphs or len(self.graphs) < MAX_GRAPHS:
            return key
        if len(self._sightings) > 4 * MAX_GRAPHS:
            self._sightings.clear()
        self._sightings[key] = self._sightings.get(key, 0) + 1
        return key if self._sightings[key] >= 2 else None

    def _key(self, tokens: int, sequences: int, longest: int) -> tuple[int, int, int]:
        return (
            # + 1: at least one padding row, where empty sequences point
            min(_bucket(tokens + 1, MIN_TOKENS), self.max_tokens + 1),
            _bucket(sequences + 1, MIN_SEQUENCES),  # + 1: the sequence that takes the padding tokens
            self.max_seqlen
            if self.model.attention_backend == "triton_packed"
            else min(_bucket(longest, MIN_SEQLEN), self.max_seqlen),
        )

    def pooled(self, host: HostPackedArrays, key: tuple[int, int, int]) -> torch.Tensor:
        """[B, H] float32 on the device, equal to `pool(model(batch))` of the same packed batch;
        `key` is `bucket(host)`."""
        num_rows = len(host.lengths)
        captured = self.graphs.get(key)
        if captured is None:
            while len(self.graphs) >= MAX_GRAPHS:
                self._evict_least_recent()
            self._sightings.pop(key, None)
            captured = self._capture(key)
        self.graphs.move_to_end(key)
        tokens, num_sequences, _ = key
        total = len(host.input_ids)
        turn = captured.turn
        captured.turn ^= 1
        captured.copied[turn].synchronize()
        view = captured.host_inputs[turn].numpy()
        view[:total] = host.input_ids
        view[total:tokens] = 0
        view[tokens : tokens + total] = host.position_ids
        view[tokens + total : 2 * tokens] = self.position_offset
        view[2 * tokens : 2 * tokens + total] = host.sequence_index
        view[2 * tokens + total : 3 * tokens] = num_sequences - 1  # padding tokens pool into the last
        cu = view[3 * tokens :]
        cu[: len(host.cu_seqlens)] = host.cu_seqlens
        cu[len(host.cu_seqlens) :] = total  # empty sequences
        # Stream order: the copy runs after the previous replay has read its inputs.
        captured.device_input.copy_(captured.host_inputs[turn], non_blocking=True)
        captured.copied[turn].record()
        captured.graph.replay()
        return captured.pooled[:num_rows]

    def _evict_least_recent(self) -> None:
        _, evicted = self.graphs.popitem(last=False)
        # Its last replay's output may still be being copied out: let the device finish first.
        evicted.copied[0].synchronize()
        evicted.copied[1].synchronize()
        torch.cuda.current_stream().synchronize()
        self.evictions += 1

    def _capture(self, key: tuple[int, int, int]) -> _CapturedGraph:
        tokens, num_sequences, longest = key
        device = self.model.embeddings.word_embeddings.weight.device
        size = 3 * tokens + num_sequences + 1
        host_inputs = tuple(torch.zeros(size, dtype=torch.int64).pin_memory() for _ in range(2))
        device_input = torch.zeros(size, dtype=torch.int64, device=device)
        cu_seqlens_int64 = device_input[3 * tokens :]
        cu_seqlens = torch.zeros(num_sequences + 1, dtype=torch.int32, device=device)
        batch = PackedBatch(
            input_ids=device_input[:tokens],
            position_ids=device_input[tokens : 2 * tokens],
            token_sequence_index=device_input[2 * tokens : 3 * tokens],
            cu_seqlens=cu_seqlens,
            max_seqlen=longest,
            sequence_lengths=(0,) * num_sequences,
            adapter_segments=(),
            adapter_slots=torch.zeros(num_sequences, dtype=torch.int32, device=device),
        )
        batch.position_ids.fill_(self.position_offset)  # valid positions for the warm-up runs

        def forward() -> torch.Tensor:
            cu_seqlens.copy_(cu_seqlens_int64)  # int64 -> int32, inside the graph
            return pool(self.model(batch), batch, self.pooling)

        # Warm up on a side stream (kernels compile, cuBLAS picks its algorithms), then capture.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), torch.inference_mode():
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.memory_pool):
            pooled = forward()
        events = (torch.cuda.Event(), torch.cuda.Event())
        for event in events:
            event.record()
        captured = _CapturedGraph(graph, host_inputs, events, device_input, pooled)
        self.graphs[key] = captured
        return captured

