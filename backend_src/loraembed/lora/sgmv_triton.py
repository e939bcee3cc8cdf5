"""Segmented LoRA as two Triton-language kernels (the SGMV shrink/expand of punica, as vLLM uses).

The packed batch is cut into blocks of at most BLOCK_T tokens that each lie inside one adapter
segment; a block table [blocks, 3] (token start, token end, slot) built once per batch drives both
kernels, so there is no host sync and no per-segment launch. Base-model tokens (slot 0) have no
blocks and cost nothing.

- shrink: shrunk[t, :] = x[t, :] @ A_cat[slot].T, one launch for all output slices of a fused
  projection (q | k | v), so the activations are read once.
- expand: output[t, slice i] += shrunk[t, i*R:(i+1)*R] @ B_cat[slot, slice i].T, accumulated in
  place into the base linear's output (no separate add). Where the output's consumer is an
  elementwise kernel (GELU, residual + LayerNorm), the layers skip this read-modify-write and hand
  the shrunk rows to that kernel instead (`fused_ops.LoraDelta`, indexed by per-token slots).

A third kernel serves the batches planned as merged (one adapter over many tokens): merge writes
W + B_cat[slot] A_cat[slot] per output slice in one pass over W, reading the slot from a device
index where a CUDA graph holds it.

`lora_shrink` / `lora_expand` / `lora_merge` pick the kernel on CUDA and the reference elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch

from .lora_gemm_triton import tile_slot_table
from .segmented import adapter_run_arrays, expand_reference, merge_reference, positions_in_groups, shrink_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: only the reference path exists
    triton = None

BLOCK_T = 64
# The shrink's step over the input features: 128 takes 49 us against 53 us for 64 over 3072 inputs
# (benchmarks/lora_kernel_sweep.py, H100, 16k tokens, 64 adapters).
SHRINK_BLOCK_K = 128


def build_block_table(segments, device: torch.device) -> torch.Tensor | None:
    """[blocks, 3] int32 (token start, token end, slot) for every non-base segment; None if none."""
    return build_lora_batch_tables(segments, device, with_token_slots=False)[0]


def lora_batch_table_arrays(segments, with_token_slots: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Host arrays of a batch's LoRA tables: the block table [blocks, 3] int64 (token start, token
    end, slot) of every non-base segment, cut into blocks of at most BLOCK_T tokens, and, if asked,
    the slot of every token [T] int64 (0 = base). No blocks when no token uses an adapter."""
    slots, starts, ends = adapter_run_arrays(segments)
    total = max((s.token_end for s in segments), default=0)
    token_slots = np.zeros(total, dtype=np.int64) if with_token_slots else None
    if not len(slots):
        return np.zeros((0, 3), dtype=np.int64), token_slots
    counts = (ends - starts + BLOCK_T - 1) // BLOCK_T  # blocks per segment
    block_starts = np.repeat(starts, counts) + BLOCK_T * positions_in_groups(counts)
    block_ends = np.minimum(block_starts + BLOCK_T, np.repeat(ends, counts))
    if token_slots is not None:
        for slot, start, end in zip(slots, starts, ends):
            token_slots[start:end] = slot
    return np.stack([block_starts, block_ends, np.repeat(slots, counts)], 1), token_slots


def max_lora_blocks(tokens: int, segments: int) -> int:
    """An upper bound on the blocks of a batch of `tokens` tokens in `segments` adapter segments
    (each segment adds at most one partial block): the size of a CUDA graph's fixed block table."""
    return -(-tokens // BLOCK_T) + segments


def build_lora_batch_tables(
    segments, device: torch.device, with_token_slots: bool, with_tile_slots: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The block table (see lora_batch_table_arrays), if asked the slot of every token [T] int32,
    and if asked the tile table of the fused GEMM (`lora_gemm_triton.tile_slot_table`, int32; None
    when a tile holds more adapters than it allows), on `device` in one host-to-device copy;
    (None, None, None) when no token uses an adapter."""
    table, token_slots = lora_batch_table_arrays(segments, with_token_slots or with_tile_slots)
    if not len(table):
        return None, None, None
    tiles = None
    if with_tile_slots:
        tiles = tile_slot_table(segments, len(token_slots))
    parts, offsets = [], []
    for array in (table, token_slots if with_token_slots or tiles is not None else None, tiles):
        offsets.append(sum(part.size for part in parts))
        if array is not None:
            parts += [array.ravel(), np.zeros(-array.size % 4, dtype=np.int64)]  # 16-byte aligned starts
    flat = torch.from_numpy(np.concatenate(parts).astype(np.int32))
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    block_table = flat[: table.size].view(-1, 3)
    slots_out = flat[offsets[1] : offsets[1] + len(token_slots)] if offsets[2] > offsets[1] else None
    tiles_out = flat[offsets[2] : offsets[2] + tiles.size].view(tiles.shape) if tiles is not None else None
    return block_table, slots_out, tiles_out


if triton is not None:

    @triton.jit
    def _sgmv_shrink_kernel(
        x_ptr, a_ptr, out_ptr, table_ptr,
        in_features, rank_total,
        stride_x, stride_a_slot, stride_a_rank, stride_out,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        block = tl.program_id(0)
        rank_block = tl.program_id(1)
        # Axis 2 cuts a table block into programs of BLOCK_T tokens (one when BLOCK_T is the table's).
        token_start = tl.load(table_ptr + 3 * block) + tl.program_id(2) * BLOCK_T
        token_end = tl.load(table_ptr + 3 * block + 1)
        if token_end <= token_start:  # an unused entry of a CUDA graph's fixed-size table
            return
        slot = tl.load(table_ptr + 3 * block + 2).to(tl.int64)
        tokens = token_start + tl.arange(0, BLOCK_T)  # [BT]
        ranks = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        token_mask = tokens < token_end
        rank_mask = ranks < rank_total
        x_rows = x_ptr + tokens.to(tl.int64)[:, None] * stride_x  # [BT, 1]
        a_rows = a_ptr + slot * stride_a_slot + ranks[None, :] * stride_a_rank  # [1, BR]
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k_start in range(0, in_features, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            k_mask = k < in_features
            x_tile = tl.load(x_rows + k[None, :], mask=token_mask[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
            a_tile = tl.load(a_rows + k[:, None], mask=k_mask[:, None] & rank_mask[None, :], other=0.0)  # [BK, BR]
            acc += tl.dot(x_tile, a_tile)
        out = out_ptr + tokens.to(tl.int64)[:, None] * stride_out + ranks[None, :]
        tl.store(out, acc, mask=token_mask[:, None] & rank_mask[None, :])

    @triton.jit
    def _sgmv_expand_kernel(
        shrunk_ptr, b_ptr, out_ptr, table_ptr,
        out_features, rank, slice_width,
        stride_shrunk, stride_b_slot, stride_b_row, stride_out,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        block = tl.program_id(0)
        column_block = tl.program_id(1)
        token_start = tl.load(table_ptr + 3 * block)
        token_end = tl.load(table_ptr + 3 * block + 1)
        if token_end <= token_start:
            return
        slot = tl.load(table_ptr + 3 * block + 2).to(tl.int64)
        tokens = token_start + tl.arange(0, BLOCK_T)  # [BT]
        columns = column_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN], all inside one slice
        slice_index = (column_block * BLOCK_N) // slice_width
        ranks = tl.arange(0, BLOCK_R)
        token_mask = tokens < token_end
        rank_mask = ranks < rank
        column_mask = columns < out_features
        shrunk = tl.load(
            shrunk_ptr + tokens.to(tl.int64)[:, None] * stride_shrunk + slice_index * rank + ranks[None, :],
            mask=token_mask[:, None] & rank_mask[None, :], other=0.0,
        )  # [BT, BR] float32
        b_tile = tl.load(
            b_ptr + slot * stride_b_slot + columns[None, :] * stride_b_row + ranks[:, None],
            mask=rank_mask[:, None] & column_mask[None, :], other=0.0,
        )  # [BR, BN]
        delta = tl.dot(shrunk.to(b_tile.dtype), b_tile)  # [BT, BN] float32
        out = out_ptr + tokens.to(tl.int64)[:, None] * stride_out + columns[None, :]
        mask = token_mask[:, None] & column_mask[None, :]
        base = tl.load(out, mask=mask, other=0.0)
        tl.store(out, (base.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["slot"])
    def _lora_merge_kernel(
        weight_ptr, a_ptr, b_ptr, out_ptr, slot_ptr, slot,
        out_features, in_features, rank, slice_width,
        stride_a_slot, stride_a_rank, stride_b_slot, stride_b_row,
        SLOT_ON_DEVICE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # One [BLOCK_M, BLOCK_N] tile of W + B A; BLOCK_M divides the slice width, so the tile's rows
        # lie in one slice and take that slice's rows of A.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] output features
        columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] input features
        slice_index = (tl.program_id(0) * BLOCK_M) // slice_width
        if SLOT_ON_DEVICE:
            slot = tl.load(slot_ptr)
        slot = slot.to(tl.int64)
        ranks = tl.arange(0, BLOCK_R)
        rank_mask = ranks < rank
        row_mask = rows < out_features
        column_mask = columns < in_features
        b_tile = tl.load(
            b_ptr + slot * stride_b_slot + rows.to(tl.int64)[:, None] * stride_b_row + ranks[None, :],
            mask=row_mask[:, None] & rank_mask[None, :], other=0.0,
        )  # [BM, BR]
        a_tile = tl.load(
            a_ptr + slot * stride_a_slot + (slice_index * rank + ranks)[:, None] * stride_a_rank + columns[None, :],
            mask=rank_mask[:, None] & column_mask[None, :], other=0.0,
        )  # [BR, BN]
        offsets = rows.to(tl.int64)[:, None] * in_features + columns[None, :]
        mask = row_mask[:, None] & column_mask[None, :]
        merged = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + tl.dot(b_tile, a_tile)
        tl.store(out_ptr + offsets, merged.to(out_ptr.dtype.element_ty), mask=mask)


def _column_block(slice_width: int) -> int | None:
    for block in (128, 64, 32, 16):
        if slice_width % block == 0:
            return block
    return None


def sgmv_supported(x: torch.Tensor, slice_width: int, rank: int) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and _column_block(slice_width) is not None
        and rank <= 128
    )


def sgmv_shrink(x: torch.Tensor, lora_a_cat: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """shrunk [T, slices * R] float32: x[t] @ A_cat[slot of t's block].T for every block's tokens; rows
    of tokens in no block (base tokens) are left unwritten. x: [T, in]; lora_a_cat: [slots, slices * R, in]."""
    rank_total = lora_a_cat.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    shrunk = torch.empty(x.shape[0], rank_total, device=x.device, dtype=torch.float32)  # [T, slices * R]
    block_r = min(64, max(16, triton.next_power_of_2(rank_total)))
    _sgmv_shrink_kernel[(block_table.shape[0], triton.cdiv(rank_total, block_r))](
        x, lora_a_cat, shrunk, block_table,
        x.shape[1], rank_total,
        x.stride(0), lora_a_cat.stride(0), lora_a_cat.stride(1), shrunk.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K, num_warps=4,
    )
    return shrunk


def sgmv_expand(
    shrunk: torch.Tensor, output: torch.Tensor, lora_b_cat: torch.Tensor, rank: int, slice_width: int,
    block_table: torch.Tensor,
) -> None:
    """output[t, slice i] += shrunk[t, i*rank:(i+1)*rank] @ B_cat[slot, slice i].T, in place, for
    every block's tokens. lora_b_cat: [slots, slices * slice_width, rank] (scaling folded in)."""
    out_features = lora_b_cat.shape[1]
    block_n = _column_block(slice_width)
    _sgmv_expand_kernel[(block_table.shape[0], out_features // block_n)](
        shrunk, lora_b_cat, output, block_table,
        out_features, rank, slice_width,
        shrunk.stride(0), lora_b_cat.stride(0), lora_b_cat.stride(1), output.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=4,
    )


def sgmv_lora(
    x: torch.Tensor,
    output: torch.Tensor,
    lora_a_cat: torch.Tensor,
    lora_b_cat: torch.Tensor,
    rank: int,
    slice_width: int,
    block_table: torch.Tensor,
) -> None:
    """output[t] += LoRA of the slot of t's block, for every block of `block_table`, in place.

    x: [T, in]; output: [T, slices * slice_width]; lora_a_cat: [slots, slices * rank, in] (slice i's
    A in rows i*rank..); lora_b_cat: [slots, slices * slice_width, rank] (scaling folded in).
    """
    sgmv_expand(sgmv_shrink(x, lora_a_cat, block_table), output, lora_b_cat, rank, slice_width, block_table)


def lora_shrink(x: torch.Tensor, lora_a_cat: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """`sgmv_shrink` on CUDA, `segmented.shrink_reference` elsewhere."""
    if x.is_cuda:
        return sgmv_shrink(x, lora_a_cat, block_table)
    return shrink_reference(x, lora_a_cat, block_table)


def lora_expand(
    shrunk: torch.Tensor, output: torch.Tensor, lora_b_cat: torch.Tensor, rank: int, slice_width: int,
    block_table: torch.Tensor,
) -> None:
    """`sgmv_expand` on CUDA, `segmented.expand_reference` elsewhere."""
    if output.is_cuda:
        sgmv_expand(shrunk, output, lora_b_cat, rank, slice_width, block_table)
    else:
        expand_reference(shrunk, output, lora_b_cat, rank, slice_width, block_table)


# The merge's tile over the weight [out, in]: 16 rows by 64 columns, 4 warps. 128 x 128 tiles made
# 108 programs or fewer, under one wave of 132 SMs. On an H200, with both in one process
# (benchmarks/lora_kernel_sweep.py --kernels merge, results/lora-merge-sweep-2026-11-28-h200.md,
# third run), the four XLM-R base shapes took 7.8 / 6.2 / 7.5 / 8.4 µs against 8.5 / 10.3 / 9.0 /
# 9.6 (a copy of W: 6.2 / 5.1 / 7.1 / 6.9).
MERGE_BLOCK_M = 16
MERGE_BLOCK_N = 64
MERGE_WARPS = 4


def merge_block_m(slice_width: int) -> int:
    """The merge tile's rows: MERGE_BLOCK_M, or the largest block that divides the slice width if
    smaller (a tile's rows lie in one slice)."""
    return min(MERGE_BLOCK_M, _column_block(slice_width))


def lora_merge_supported(weight: torch.Tensor, slice_width: int, rank: int) -> bool:
    return sgmv_supported(weight, slice_width, rank) and weight.is_contiguous()


def lora_merge(
    weight: torch.Tensor, lora_a_cat: torch.Tensor, lora_b_cat: torch.Tensor, slot: int | torch.Tensor,
    slice_width: int, out: torch.Tensor,
) -> torch.Tensor:
    """out = W + B_cat[slot, slice i] A_cat[slot, slice i] for every output slice i (the merged weight
    [out, in] of one adapter), `slot` an int or a device index [1] (a CUDA graph's input). The
    kernel on CUDA where `lora_merge_supported`, `segmented.merge_reference` elsewhere."""
    rank = lora_b_cat.shape[2]
    if not lora_merge_supported(weight, slice_width, rank):
        return merge_reference(weight, lora_a_cat, lora_b_cat, slot, slice_width, out)
    out_features, in_features = weight.shape
    block_m = merge_block_m(slice_width)
    on_device = isinstance(slot, torch.Tensor)
    _lora_merge_kernel[(out_features // block_m, triton.cdiv(in_features, MERGE_BLOCK_N))](
        weight, lora_a_cat, lora_b_cat, out, slot if on_device else weight, 0 if on_device else slot,
        out_features, in_features, rank, slice_width,
        lora_a_cat.stride(0), lora_a_cat.stride(1), lora_b_cat.stride(0), lora_b_cat.stride(1),
        SLOT_ON_DEVICE=on_device, BLOCK_M=block_m, BLOCK_N=MERGE_BLOCK_N,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=MERGE_WARPS,
    )
    return out
