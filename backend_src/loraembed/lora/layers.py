"""LoRA applied to a `PackedEncoder` from outside (gpt-fast's module swap, vLLM's slot buffers).

`LoraLayers` swaps each LoRA-targetable `nn.Linear` of the encoder for a `SegmentedLoraLinear`
that keeps the same weight and bias (so names and state dict are unchanged) and adds per-slot
LoRA buffers: per output slice, A stacked [slots, rank_capacity, in] and B stacked
[slots, width, rank_capacity] with the scaling folded into B, zero-padded beyond each slot's rank.
Slot 0 is the base model and never holds LoRA. A linear gets buffers only when a loaded adapter
targets it, sized by the largest rank loaded into it so far; until then it is the plain linear.

The fused Q/K/V projection takes the LoRA of `query`, `key` and `value` in its three output
slices, routed by `encoder.FUSED_PROJECTIONS` (vLLM's packed_modules_mapping).

How a batch runs (`LoraLayers.activate` plans it once, on the host; nothing syncs in the forward):
- every row one adapter (no base rows): each linear merges W + B A of that slot into a scratch
  weight (one Triton pass over W; a batched addmm on the CPU) and runs one GEMM: no shrink, no expand;
- mixed adapters (and base rows), on a GPU with TMA (sm_90): the shrink over a block table, then
  one GEMM that adds each token's expand in its epilogue, with the activation after it
  (`lora_gemm_triton.lora_gemm`: the Gluon kernel of `lora_gemm_gluon.py` on sm_90 for bf16 and
  rank capacity 16 or 32, else its Triton kernel; the tile table is planned with the block table),
  for each linear whose output tiles are at least one per SM (`fused_gemm_fills_gpu`);
- mixed adapters elsewhere, on linears of fewer tiles, or in a batch with a tile of more adapters
  than that table holds: the base GEMM, the shrink, and the expand, which `forward_deferred` hands
  to the consumer's elementwise kernel (`fused_ops.LoraDelta`): the GELU pass for
  intermediate.dense, residual + LayerNorm for the two other dense layers. The fused Q/K/V output
  goes to attention, so its expand still accumulates into it;
- on the CPU, per-segment PyTorch matmuls (`apply_segmented_lora`), the reference.

A CUDA graph captures the same GPU plans with device-side inputs instead of host state
(`LoraLayers.capture`): the merged slot as a device index, and fixed-size block, token-slot and
tile tables; every linear that has LoRA buffers then runs its LoRA (slots without it there add zeros).
A replay stays valid while no linear's buffers are reallocated (`LoraBatchState.buffer_generation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..encoder import FUSED_PROJECTIONS, PackedEncoder
from ..fused_ops import LoraDelta, linear
from ..packing import AdapterSegment
from .peft_format import LoraAdapter
from .lora_gemm_gluon import forget_static_descriptors
from .lora_gemm_triton import fused_gemm_fills_gpu, lora_gemm, lora_gemm_supported
from .segmented import apply_segmented_lora, slot_of
from .sgmv_triton import build_lora_batch_tables, lora_expand, lora_merge, lora_shrink, sgmv_supported

# Linear modules under `encoder.layer.{i}.` that take LoRA -> the PEFT modules whose output
# features they hold, in order (one, or several for a fused projection).
LORA_LINEARS: dict[str, tuple[str, ...]] = {
    **FUSED_PROJECTIONS,
    "attention.output.dense": ("attention.output.dense",),
    "intermediate.dense": ("intermediate.dense",),
    "output.dense": ("output.dense",),
}


@dataclass(frozen=True)
class LoraTarget:
    """Where the LoRA of one PEFT module goes: a slice of the output features of one linear."""

    linear_name: str  # e.g. "encoder.layer.0.attention.self.qkv"
    slice_index: int  # position of the slice in the linear's output
    row_start: int  # first output feature (row of the weight) of the slice
    row_end: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.row_end - self.row_start


def lora_targets(model: PackedEncoder) -> dict[str, LoraTarget]:
    """Every LoRA-targetable PEFT module of `model` ("encoder.layer.{i}.attention.self.query", ...)."""
    targets = {}
    for index in range(len(model.encoder.layer)):
        for linear_suffix, parts in LORA_LINEARS.items():
            linear_name = f"encoder.layer.{index}.{linear_suffix}"
            linear = model.get_submodule(linear_name)
            width, remainder = divmod(linear.out_features, len(parts))
            if remainder:
                raise ValueError(f"{linear_name} has {linear.out_features} outputs, not {len(parts)} equal slices")
            for slice_index, part in enumerate(parts):
                targets[f"encoder.layer.{index}.{part}"] = LoraTarget(
                    linear_name, slice_index, slice_index * width, (slice_index + 1) * width, linear.in_features
                )
    return targets


def lora_module_shapes(model: PackedEncoder) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each targetable PEFT module: what adapters are checked against."""
    return {name: (target.in_features, target.out_features) for name, target in lora_targets(model).items()}


@dataclass
class LoraBatchState:
    """What the wrapped linears need to know about the batch being run (shared by all of them)."""

    segments: tuple[AdapterSegment, ...] = field(default_factory=tuple)
    slot_bits: int = 0  # bit s set: some token of the batch uses slot s
    block_table: torch.Tensor | None = None  # for the shrink/expand; see sgmv_triton.build_block_table
    token_slots: torch.Tensor | None = None  # [T] int32, set when expands are deferred or fused
    tile_slots: torch.Tensor | None = None  # the fused GEMM's tile table (lora_gemm_triton.tile_slot_table)
    merged_slot: int | torch.Tensor | None = None  # every token uses this slot: merge W + B A per linear
    # (a device index [1] int64 in a CUDA graph)
    graph_capture: bool = False  # capturing: every linear with LoRA buffers runs LoRA
    # Output tiles a linear's fused GEMM needs to be taken (`lora_gemm_triton.fused_gemm_fills_gpu`;
    # None: one per SM); 0 fuses every supported linear (tests of the fused kernels).
    fused_gemm_min_tiles: int | None = None
    buffer_generation: int = 0  # bumped whenever a linear's LoRA buffers are (re)allocated
    merge_buffers: dict = field(default_factory=dict)  # (shape, dtype, device) -> scratch weight

    def merge_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        """A scratch [out, in] weight shared by the linears of that shape: they run one after the
        other on one stream, so each merge is read by its GEMM before the next overwrites it."""
        key = (tuple(weight.shape), weight.dtype, weight.device)
        if key not in self.merge_buffers:
            self.merge_buffers[key] = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        return self.merge_buffers[key]


class SegmentedLoraLinear(nn.Linear):
    """An `nn.Linear` (same weight and bias) plus per-slot LoRA applied per adapter segment."""

    def __init__(self, base: nn.Linear, slice_widths: tuple[int, ...], num_slots: int, batch_state: LoraBatchState):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.slice_widths = slice_widths
        # Slices of one width (every linear of BERT/XLM-R): the Triton kernels and the one-launch
        # merge take all slices at once.
        self.uniform_slices = all(width == slice_widths[0] for width in slice_widths)
        self.num_slots = num_slots
        self.batch_state = batch_state
        self.rank_capacity = 0
        # Plain attributes, not buffers: they are not model state, and live where the weight lives.
        self.lora_a: tuple[torch.Tensor, ...] = ()  # per slice [slots, rank_capacity, in]
        self.lora_b: tuple[torch.Tensor, ...] = ()  # per slice [slots, width, rank_capacity]
        self.slot_ranks = [[0] * num_slots for _ in slice_widths]  # host copy: rank per slice, slot
        self.slot_has_lora = [False] * num_slots
        self.lora_slot_bits = 0  # bit s set: slot s holds LoRA here (one test per linear and batch)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slices={self.slice_widths}, rank_capacity={self.rank_capacity}"

    def _ensure_rank_capacity(self, rank: int) -> None:
        """Grow the buffers to `rank`. One A [slots, slices * rank, in] and one B [slots, out, rank]
        hold all slices (the per-slice tuples are views), so the GPU kernel reads them in one go."""
        if rank <= self.rank_capacity:
            return
        options = {"device": self.weight.device, "dtype": self.weight.dtype}
        old_capacity, slices = self.rank_capacity, len(self.slice_widths)
        lora_a_cat = torch.zeros(self.num_slots, slices * rank, self.in_features, **options)
        lora_b_cat = torch.zeros(self.num_slots, self.out_features, rank, **options)
        if old_capacity:
            for index in range(slices):
                lora_a_cat[:, index * rank : index * rank + old_capacity] = self.lora_a[index]
            lora_b_cat[:, :, :old_capacity] = self.lora_b_cat
        columns = [0]
        for width in self.slice_widths:
            columns.append(columns[-1] + width)
        self.lora_a_cat, self.lora_b_cat, self.rank_capacity = lora_a_cat, lora_b_cat, rank
        self.batch_state.buffer_generation += 1  # graphs that read the old buffers are stale
        forget_static_descriptors()  # cached Gluon descriptors would keep the old B buffer allocated
        self.lora_a = tuple(lora_a_cat[:, index * rank : (index + 1) * rank] for index in range(slices))
        self.lora_b = tuple(lora_b_cat[:, columns[i] : columns[i + 1]] for i in range(slices))

    # Inference mode throughout: slot tensors are only ever read by inference-mode forwards, and
    # creating and updating them the same way works whether or not the caller is in inference mode.
    @torch.inference_mode()
    def set_slot(self, slot: int, slice_index: int, lora_a: torch.Tensor, scaled_lora_b: torch.Tensor) -> None:
        """Put one module's factors (A [r, in], scaling * B [width, r]) into `slot` of a slice."""
        rank = lora_a.shape[0]
        self._ensure_rank_capacity(rank)
        a_stack, b_stack = self.lora_a[slice_index], self.lora_b[slice_index]
        a_stack[slot].zero_()
        b_stack[slot].zero_()
        a_stack[slot, :rank] = lora_a.to(a_stack.device, a_stack.dtype)
        b_stack[slot, :, :rank] = scaled_lora_b.to(b_stack.device, b_stack.dtype)
        self._record_slot(slot, {slice_index: rank})

    def _record_slot(self, slot: int, ranks: dict[int, int]) -> None:
        """The host's account of a slot that now holds LoRA: the rank of each slice in `ranks`."""
        for slice_index, rank in ranks.items():
            self.slot_ranks[slice_index][slot] = rank
        self.slot_has_lora[slot] = True
        self.lora_slot_bits |= 1 << slot

    @torch.inference_mode()
    def stage_slot(
        self, factors: list[tuple[int, torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
        """One slot's A [slices * R, in] and B [out, R] on the host, zero-padded, from the factors
        (slice index, A [r, in], scaling * B [width, r]) of the modules an adapter has here, and
        each slice's rank (0 where the adapter has none); grows the buffers to the largest r first
        (so R is the capacity `write_slot` will find)."""
        self._ensure_rank_capacity(max(lora_a.shape[0] for _, lora_a, _ in factors))
        capacity, dtype = self.rank_capacity, self.weight.dtype
        lora_a_rows = torch.zeros(len(self.slice_widths) * capacity, self.in_features, dtype=dtype)
        lora_b_rows = torch.zeros(self.out_features, capacity, dtype=dtype)
        ranks = dict.fromkeys(range(len(self.slice_widths)), 0)
        for slice_index, lora_a, scaled_lora_b in factors:
            rank, row = lora_a.shape[0], sum(self.slice_widths[:slice_index])
            lora_a_rows[slice_index * capacity : slice_index * capacity + rank] = lora_a
            lora_b_rows[row : row + self.slice_widths[slice_index], :rank] = scaled_lora_b
            ranks[slice_index] = rank
        return lora_a_rows, lora_b_rows, ranks

    @torch.inference_mode()
    def write_slot(self, slot: int, lora_a_rows: torch.Tensor, lora_b_rows: torch.Tensor, ranks: dict[int, int]) -> None:
        """Replace `slot` with `stage_slot`'s rows (on any device) and ranks: two copies for all slices."""
        self.lora_a_cat[slot].copy_(lora_a_rows)
        self.lora_b_cat[slot].copy_(lora_b_rows)
        self._record_slot(slot, ranks)

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        for a_stack, b_stack in zip(self.lora_a, self.lora_b):
            a_stack[slot].zero_()
            b_stack[slot].zero_()
        for ranks in self.slot_ranks:
            ranks[slot] = 0
        self.slot_has_lora[slot] = False
        self.lora_slot_bits &= ~(1 << slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear's output with the LoRA of each token's slot added (the fused Q/K/V path)."""
        return self.forward_deferred(x, defer=False)[0]

    def forward_deferred(self, x: torch.Tensor, defer: bool = True) -> tuple[torch.Tensor, LoraDelta | None]:
        """(output, LoRA delta still to add to it, or None). The encoder's layer asks for this where
        the output's consumer is a `fused_ops` kernel that adds the delta in its own pass; the
        delta is deferred only when the batch was planned for it (`LoraBatchState.token_slots`)."""
        state = self.batch_state
        weight = self.batch_weight()
        if weight is not None:
            return linear(x, weight, self.bias), None  # [T, out]
        fused = self.fused_lora_output(x, "identity")
        if fused is not None:
            return fused, None
        output = linear(x, self.weight, self.bias)  # [T, out]
        width = self.slice_widths[0]
        if (
            state.block_table is not None
            and self.uniform_slices
            and (not x.is_cuda or sgmv_supported(x, width, self.rank_capacity))
        ):
            # Two Triton launches for all segments and slices; one when the consumer expands.
            shrunk = lora_shrink(x, self.lora_a_cat, state.block_table)  # [T, slices * R] float32
            if defer and state.token_slots is not None and len(self.slice_widths) == 1:
                return output, LoraDelta(shrunk, self.lora_b_cat, state.token_slots)
            lora_expand(shrunk, output, self.lora_b_cat, self.rank_capacity, width, state.block_table)
            return output, None
        segments = [segment for segment in state.segments if self.slot_has_lora[segment.slot]]
        apply_segmented_lora(x, output, self.lora_a, self.lora_b, segments, self.slot_ranks)
        return output, None

    def fused_lora_output(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """activation(linear(x) + LoRA) from the shrink and the GEMM with the expand in its epilogue
        (`lora_gemm_triton.lora_gemm`), for a mixed-adapter batch planned with a tile table; None
        where that path does not apply (the caller takes another)."""
        state = self.batch_state
        if state.tile_slots is None or not self.uniform_slices or not self.rank_capacity:
            return None
        if not lora_gemm_supported(x, self.weight, self.slice_widths[0], self.rank_capacity):
            return None
        if not fused_gemm_fills_gpu(x, self.weight.shape[0], self.slice_widths[0], state.fused_gemm_min_tiles):
            return None  # too few tiles: cuBLAS and the separate expand are faster
        shrunk = lora_shrink(x, self.lora_a_cat, state.block_table)  # [T, slices * R] float32
        return lora_gemm(x, self.weight, self.bias, activation, self.lora_b_cat, self.slice_widths[0],
                         state.token_slots, state.tile_slots, shrunk)

    def batch_weight(self) -> torch.Tensor | None:
        """The weight [out, in] that gives this batch's output in one plain GEMM: the base weight when
        no token of the batch has a LoRA here, the merged W + B A of a batch planned as merged; None
        when the batch needs the segmented LoRA (`forward_deferred`)."""
        state = self.batch_state
        if not (self.rank_capacity if state.graph_capture else self.lora_slot_bits & state.slot_bits):
            return self.weight
        if state.merged_slot is not None:
            return self._merged_weight(state.merged_slot)
        return None

    def _merged_weight(self, slot: int | torch.Tensor) -> torch.Tensor:
        """W + B[slot] A[slot] per output slice, into the shared scratch weight [out, in]; `slot` is
        an int, or a device index [1] (a CUDA graph's input)."""
        merged = self.batch_state.merge_buffer(self.weight)
        if self.uniform_slices:  # one launch for all slices
            return lora_merge(self.weight, self.lora_a_cat, self.lora_b_cat, slot, self.slice_widths[0], merged)
        row = 0
        for index, width in enumerate(self.slice_widths):
            torch.addmm(self.weight[row : row + width], slot_of(self.lora_b[index], slot),
                        slot_of(self.lora_a[index], slot), out=merged[row : row + width])
            row += width
        return merged


class LoraLayers:
    """The LoRA-wrapped linears of one `PackedEncoder`, filled and cleared slot by slot.

    Wrapping happens once, at construction (after the checkpoint is loaded and the model is on its
    device); slots 1..num_slots-1 hold adapters, slot 0 is the base model.
    """

    def __init__(self, model: PackedEncoder, num_slots: int):
        self.num_slots = num_slots
        self.device = model.embeddings.word_embeddings.weight.device
        # How batches are planned (see the module docstring): on by default where the Triton kernels
        # run; off, the CPU runs the per-segment reference. Tests and benchmarks switch them.
        on_gpu = self.device.type == "cuda"
        self.use_block_tables = on_gpu  # shrink/expand over a block table (kernels; references on the CPU)
        self.defer_expand = on_gpu  # single-slice linears leave their expand to the consumer's kernel
        self.merge_single_adapter = on_gpu  # a batch of one adapter only: W + B A per linear, one GEMM
        self.fuse_expand = on_gpu  # mixed adapters: the expand in the GEMM's epilogue (where supported)
        self.targets = lora_targets(model)
        self.batch_state = LoraBatchState()
        self._kernels_cover = (-1, False)  # (buffer generation, whether the Triton kernels run every LoRA)
        self.linears: dict[str, SegmentedLoraLinear] = {}
        for target in self.targets.values():
            if target.linear_name in self.linears:
                continue
            parent_name, _, child_name = target.linear_name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child_name)
            slice_widths = tuple(
                t.out_features for t in self.targets.values() if t.linear_name == target.linear_name
            )
            wrapped = SegmentedLoraLinear(base, slice_widths, num_slots, self.batch_state)
            setattr(parent, child_name, wrapped)
            self.linears[target.linear_name] = wrapped

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (target.in_features, target.out_features) for name, target in self.targets.items()}

    @torch.inference_mode()
    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Replace whatever `slot` held with `adapter` (validated against these shapes). The
        adapter's rows are laid out on the host and cross to the device in one copy, then two
        device copies per linear: no host sync per module. (Each synchronous copy waits for the
        GPU, which other encoder instances on the same GPU share; 64 adapters made ~9,000 of them.)"""
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot {slot} is not an adapter slot (1..{self.num_slots - 1})")
        factors: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for name, weights in adapter.modules.items():
            target = self.targets[name]
            factors.setdefault(target.linear_name, []).append(
                (target.slice_index, weights.lora_a, weights.scaled_lora_b())
            )
        for name, linear in self.linears.items():  # the linears written below replace the whole slot
            if name not in factors and linear.slot_has_lora[slot]:
                linear.clear_slot(slot)
        staged = [(self.linears[name], *self.linears[name].stage_slot(parts)) for name, parts in factors.items()]
        if not staged:
            return
        flat = torch.cat([rows.reshape(-1) for _, a_rows, b_rows, _ in staged for rows in (a_rows, b_rows)])
        flat = flat.to(self.device)  # the one host-to-device copy
        offset = 0
        for linear, a_rows, b_rows, ranks in staged:
            a_part = flat[offset : offset + a_rows.numel()].view(a_rows.shape)
            offset += a_rows.numel()
            b_part = flat[offset : offset + b_rows.numel()].view(b_rows.shape)
            offset += b_rows.numel()
            linear.write_slot(slot, a_part, b_part, ranks)

    def clear(self, slot: int) -> None:
        for linear in self.linears.values():
            if linear.slot_has_lora[slot]:
                linear.clear_slot(slot)

    def activate(self, segments: tuple[AdapterSegment, ...]) -> None:
        """Plan the batch about to run (host only; one host-to-device copy when it uses tables)."""
        state = self.batch_state
        state.segments = segments
        state.block_table = state.token_slots = state.tile_slots = state.merged_slot = None
        used = {segment.slot for segment in segments if segment.token_end > segment.token_start}
        state.slot_bits = sum(1 << slot for slot in used)
        if not used - {0}:
            return
        if self.merge_single_adapter and len(used) == 1:
            state.merged_slot = next(iter(used))
        elif self.use_block_tables:
            state.block_table, state.token_slots, state.tile_slots = build_lora_batch_tables(
                segments, self.device, self.defer_expand, self.fuse_expand
            )

    def deactivate(self) -> None:
        self.activate(())
        self.batch_state.graph_capture = False

    @property
    def buffer_generation(self) -> int:
        return self.batch_state.buffer_generation

    def graph_plan(self, slots: np.ndarray) -> str | None:
        """How a CUDA graph would run a batch whose rows use `slots` (some nonzero): "merged" (one
        adapter, merged per linear), "tables" (block tables), or None: it cannot be captured (the
        CPU, or a linear whose LoRA the Triton kernels do not cover)."""
        if not self.use_block_tables:
            return None
        if self._kernels_cover[0] != self.buffer_generation:  # once per buffer layout, not per batch
            covered = all(
                sgmv_supported(linear.weight, linear.slice_widths[0], linear.rank_capacity) and linear.uniform_slices
                for linear in self.linears.values()
                if linear.rank_capacity
            )
            self._kernels_cover = (self.buffer_generation, covered)
        if not self._kernels_cover[1]:
            return None
        if self.merge_single_adapter and slots[0] != 0 and (slots == slots[0]).all():
            return "merged"
        return "tables"

    def capture(
        self, plan: str, merged_slot: torch.Tensor, block_table: torch.Tensor, token_slots: torch.Tensor,
        tile_slots: torch.Tensor | None = None,
    ) -> None:
        """Point every linear that has LoRA buffers at a CUDA graph's device-side inputs, for its
        warm-up and capture (`deactivate` after). `merged_slot` [1] int64 is used by the "merged"
        plan; `block_table` [blocks, 3] int32 (unused entries empty), `token_slots` [T] int32 and
        `tile_slots` [tiles, 1 + MAX_RUNS] int32 (unused tiles: no adapter) by "tables", whose
        expands are fused into the GEMMs when `tile_slots` is given."""
        state = self.batch_state
        state.segments, state.slot_bits, state.graph_capture = (), 0, True
        state.block_table = state.token_slots = state.tile_slots = state.merged_slot = None
        if plan == "merged":
            state.merged_slot = merged_slot
        else:
            state.block_table = block_table
            state.tile_slots = tile_slots if self.fuse_expand else None
            state.token_slots = token_slots if self.defer_expand or state.tile_slots is not None else None


@torch.no_grad()
def merge_lora_adapter(model: PackedEncoder, adapter: LoraAdapter) -> None:
    """Add `scaling * B @ A` of every module of `adapter` to the base weights (per q/k/v slice)."""
    targets = lora_targets(model)
    for name, weights in adapter.modules.items():
        target = targets[name]
        weight = model.get_submodule(target.linear_name).weight  # [out, in]
        rows = weight[target.row_start : target.row_end]  # [width, in]
        delta = weights.delta_weight().to(weight.device)  # [width, in] float32
        rows.copy_((rows.float() + delta).to(weight.dtype))
