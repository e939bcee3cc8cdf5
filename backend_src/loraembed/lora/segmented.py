"""Segmented LoRA: each contiguous run of tokens of a packed batch gets its own adapter's delta.

One entry point, `apply_segmented_lora`. This is the reference path (any device, plain PyTorch
matmuls per segment); a fused GPU kernel (punica's SGMV shrink/expand, as vLLM uses) will sit behind
the same function and be tested against it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..packing import AdapterSegment


def apply_segmented_lora(
    x: torch.Tensor,
    output: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    segments: Sequence[AdapterSegment],
    slot_ranks: Sequence[Sequence[int]] | None = None,
) -> None:
    """Add `x[seg] @ A[slot].T @ B[slot].T` to the rows of every segment, in place.

    x: [T, in_features], the linear's input. output: [T, sum of slice widths], the base linear's
    output, updated in place. The output is cut into column slices (q | k | v of a fused projection;
    one slice otherwise); per slice, lora_a[i] is [slots, max_rank, in_features] and lora_b[i] is
    [slots, width_i, max_rank] with the scaling folded in, zero-padded beyond each slot's rank.
    segments: contiguous token runs with their slot; slot 0 (the base model) is skipped.
    slot_ranks[i][slot]: the rank actually used by the slot in slice i (0: that slot leaves the
    slice alone); None uses the full padded max_rank.
    """
    if len(lora_a) != len(lora_b):
        raise ValueError(f"{len(lora_a)} lora_a slices but {len(lora_b)} lora_b slices")
    column = 0
    for slice_index, (a_stack, b_stack) in enumerate(zip(lora_a, lora_b)):
        width = b_stack.shape[1]
        for segment in segments:
            if segment.slot == 0 or segment.token_end <= segment.token_start:
                continue
            rank = a_stack.shape[1] if slot_ranks is None else slot_ranks[slice_index][segment.slot]
            if rank == 0:
                continue
            rows = slice(segment.token_start, segment.token_end)
            shrunk = x[rows] @ a_stack[segment.slot, :rank].T  # [t, rank]
            output[rows, column : column + width] += shrunk @ b_stack[segment.slot, :, :rank].T  # [t, width]
        column += width
    if column != output.shape[1]:
        raise ValueError(f"lora_b slices cover {column} output features, the output has {output.shape[1]}")
