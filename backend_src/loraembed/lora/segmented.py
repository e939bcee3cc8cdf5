"""Segmented LoRA: each contiguous run of tokens of a packed batch gets its own adapter's delta.

One entry point, `apply_segmented_lora`. This is the reference path (any device, plain PyTorch
matmuls per segment); the GPU kernels (punica's SGMV shrink/expand, as vLLM uses, in
`sgmv_triton.py`) are tested against it. `shrink_reference` / `expand_reference` are the same
math split in two over a block table, the kernels' own interface, for the CPU; `merge_reference`
is the merge kernel's (W + B A of one slot). `adapter_run_arrays` and `positions_in_groups` build
the kernels' per-batch tables on the host.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..packing import AdapterSegment


def adapter_run_arrays(segments: Sequence[AdapterSegment]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots, token starts, token ends), int64 arrays over the segments that use an adapter and
    hold tokens, in order."""
    runs = [(s.slot, s.token_start, s.token_end) for s in segments if s.slot and s.token_end > s.token_start]
    return tuple(np.array(column, dtype=np.int64) for column in (zip(*runs) if runs else ((), (), ())))


def positions_in_groups(counts: np.ndarray) -> np.ndarray:
    """For groups of counts[i] items laid end to end: each item's position in its group
    (0 .. counts[i] - 1, group after group)."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


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


def shrink_reference(x: torch.Tensor, lora_a_cat: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """`sgmv_triton.sgmv_shrink` in PyTorch (syncs with the host): [T, slices * R] float32; rows of
    tokens in no block are NaN, so a consumer that reads them shows it."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 models
    shrunk = torch.full((x.shape[0], lora_a_cat.shape[1]), float("nan"), device=x.device, dtype=dtype)
    for start, end, slot in block_table.tolist():
        shrunk[start:end] = x[start:end].to(dtype) @ lora_a_cat[slot].to(dtype).T
    return shrunk


def expand_reference(
    shrunk: torch.Tensor, output: torch.Tensor, lora_b_cat: torch.Tensor, rank: int, slice_width: int,
    block_table: torch.Tensor,
) -> None:
    """`sgmv_triton.sgmv_expand` in PyTorch (syncs with the host), in place."""
    for start, end, slot in block_table.tolist():
        for index, column in enumerate(range(0, lora_b_cat.shape[1], slice_width)):
            columns = slice(column, column + slice_width)
            delta = shrunk[start:end, index * rank : (index + 1) * rank] @ lora_b_cat[slot, columns].to(shrunk.dtype).T
            output[start:end, columns] = (output[start:end, columns].to(shrunk.dtype) + delta).to(output.dtype)


def merge_reference(
    weight: torch.Tensor, lora_a_cat: torch.Tensor, lora_b_cat: torch.Tensor, slot: int | torch.Tensor,
    slice_width: int, out: torch.Tensor,
) -> torch.Tensor:
    """`sgmv_triton.lora_merge` in PyTorch: out = W + B_cat[slot] A_cat[slot] per output slice, one
    batched matmul for all slices; `slot` an int or a device index [1]."""
    slices, in_features, rank = weight.shape[0] // slice_width, weight.shape[1], lora_b_cat.shape[2]
    torch.baddbmm(
        weight.view(slices, slice_width, in_features),
        slot_of(lora_b_cat, slot).view(slices, slice_width, rank),
        slot_of(lora_a_cat, slot).view(slices, rank, in_features),
        out=out.view(slices, slice_width, in_features),
    )
    return out


def slot_of(stack: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
    """stack[slot] of a per-slot stack [slots, ...], `slot` an int or a device index [1] (a CUDA
    graph's input: selected on the device, no host sync)."""
    return stack[slot] if isinstance(slot, int) else stack.index_select(0, slot)[0]
