"""LoRA applied to a `PackedEncoder` from outside (gpt-fast's module swap, vLLM's slot buffers).

`LoraLayers` swaps each LoRA-targetable `nn.Linear` of the encoder for a `SegmentedLoraLinear`
that keeps the same weight and bias (so names and state dict are unchanged) and adds per-slot
LoRA buffers: per output slice, A stacked [slots, rank_capacity, in] and B stacked
[slots, width, rank_capacity] with the scaling folded into B, zero-padded beyond each slot's rank.
Slot 0 is the base model and never holds LoRA. A linear gets buffers only when a loaded adapter
targets it, sized by the largest rank loaded into it so far; until then it is the plain linear.

The fused Q/K/V projection takes the LoRA of `query`, `key` and `value` in its three output
slices, routed by `encoder.FUSED_PROJECTIONS` (vLLM's packed_modules_mapping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import FUSED_PROJECTIONS, PackedEncoder
from ..packing import AdapterSegment
from .peft_format import LoraAdapter
from .segmented import apply_segmented_lora
from .sgmv_triton import build_block_table, sgmv_lora, sgmv_supported

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
    block_table: torch.Tensor | None = None  # for the GPU kernels; see sgmv_triton.build_block_table


class SegmentedLoraLinear(nn.Linear):
    """An `nn.Linear` (same weight and bias) plus per-slot LoRA applied per adapter segment."""

    def __init__(self, base: nn.Linear, slice_widths: tuple[int, ...], num_slots: int, batch_state: LoraBatchState):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.slice_widths = slice_widths
        self.num_slots = num_slots
        self.batch_state = batch_state
        self.rank_capacity = 0
        # Plain attributes, not buffers: they are not model state, and live where the weight lives.
        self.lora_a: tuple[torch.Tensor, ...] = ()  # per slice [slots, rank_capacity, in]
        self.lora_b: tuple[torch.Tensor, ...] = ()  # per slice [slots, width, rank_capacity]
        self.slot_ranks = [[0] * num_slots for _ in slice_widths]  # host copy: rank per slice, slot
        self.slot_has_lora = [False] * num_slots

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
        self.slot_ranks[slice_index][slot] = rank
        self.slot_has_lora[slot] = True

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        for a_stack, b_stack in zip(self.lora_a, self.lora_b):
            a_stack[slot].zero_()
            b_stack[slot].zero_()
        for ranks in self.slot_ranks:
            ranks[slot] = 0
        self.slot_has_lora[slot] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = F.linear(x, self.weight, self.bias)  # [T, out]
        if self.rank_capacity == 0:
            return output
        state = self.batch_state
        if not any(self.slot_has_lora[segment.slot] for segment in state.segments):
            return output
        width = self.slice_widths[0]
        if (
            state.block_table is not None
            and all(w == width for w in self.slice_widths)
            and sgmv_supported(x, width, self.rank_capacity)
        ):
            # Fast path: two Triton launches for all segments and slices (reference below).
            sgmv_lora(x, output, self.lora_a_cat, self.lora_b_cat, self.rank_capacity, width, state.block_table)
            return output
        segments = [segment for segment in state.segments if self.slot_has_lora[segment.slot]]
        apply_segmented_lora(x, output, self.lora_a, self.lora_b, segments, self.slot_ranks)
        return output


class LoraLayers:
    """The LoRA-wrapped linears of one `PackedEncoder`, filled and cleared slot by slot.

    Wrapping happens once, at construction (after the checkpoint is loaded and the model is on its
    device); slots 1..num_slots-1 hold adapters, slot 0 is the base model.
    """

    def __init__(self, model: PackedEncoder, num_slots: int):
        self.num_slots = num_slots
        self.device = model.embeddings.word_embeddings.weight.device
        self.targets = lora_targets(model)
        self.batch_state = LoraBatchState()
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

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Replace whatever `slot` held with `adapter` (validated against these shapes)."""
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot {slot} is not an adapter slot (1..{self.num_slots - 1})")
        self.clear(slot)
        for name, weights in adapter.modules.items():
            target = self.targets[name]
            self.linears[target.linear_name].set_slot(slot, target.slice_index, weights.lora_a, weights.scaled_lora_b())

    def clear(self, slot: int) -> None:
        for linear in self.linears.values():
            if linear.slot_has_lora[slot]:
                linear.clear_slot(slot)

    def activate(self, segments: tuple[AdapterSegment, ...]) -> None:
        self.batch_state.segments = segments
        self.batch_state.block_table = None
        if self.device.type == "cuda" and any(segment.slot for segment in segments):
            self.batch_state.block_table = build_block_table(segments, self.device)

    def deactivate(self) -> None:
        self.batch_state.segments = ()
        self.batch_state.block_table = None


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
