"""The base GEMM with each token's LoRA expand inside it (Triton language).

    out[t] = activation(x[t] @ W.T + bias + shrunk[t] @ B[slot].T),  slot = token_slots[t],
    shrunk[t] = x[t] @ A[slot].T (`sgmv_triton.sgmv_shrink`, one read of x, run before)

Without it, a mixed-adapter batch runs the cuBLAS GEMM and then passes over the GEMM's output again
to add the delta: the expand's read-modify-write (the fused Q/K/V projection), or the consumer
kernel that adds it (the GELU pass, residual + LayerNorm). Here the delta goes into the GEMM's
accumulator before the bias, the activation (the checkpoint's exact GELU too, which cuBLASLt's
epilogue lacks) and the one store, so those batches get a GELU epilogue as base batches do.

The output is cut into TILE_ROWS-row tiles of the packed batch. The engine groups a batch's rows
by adapter, so a tile holds a few runs of slots. A table [tiles, 1 + MAX_RUNS] gives each tile's
count of distinct nonzero slots, then the slots. After the GEMM's loop, the tile's epilogue takes
each of its slots in turn: the shrunk rows of that slot (others masked to zero) times that slot's
B rows for the tile's columns, one small dot each.

A fused projection (q | k | v) has one A and B per output slice. BLOCK_N divides the slice width,
so a tile's columns lie in one slice, and it reads that slice's shrunk columns.

`lora_gemm`, the entry point, runs this kernel or, on sm_90 where it applies, the warp-specialized
one of `lora_gemm_gluon.py` (same arguments and table; 0.98-1.01x cuBLAS without LoRA against this
one's 0.94-0.97x, NOTES item 37). The reference is `lora_gemm_reference`: F.linear,
`segmented.apply_segmented_lora`, then the activation. The GPU tests compare both kernels with it.
Putting the shrink in the GEMM's loop too lost (benchmarks/NOTES.md, item 29): the extra
accumulator cost registers at every output tile.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..fused_ops import ACTIVATION_CODES, ACTIVATIONS
from .lora_gemm_gluon import gluon_lora_gemm, gluon_lora_gemm_supported, multiprocessor_count
from .segmented import adapter_run_arrays, apply_segmented_lora, positions_in_groups

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU machines: the reference path only
    triton = None

# The table's tile height, shared by every linear of a batch: the kernel's BLOCK_M.
TILE_ROWS = 128
# Distinct adapters one tile may hold; a batch with a tile that holds more takes the separate expand.
MAX_RUNS = 16


def tile_slot_table(segments, total_tokens: int) -> np.ndarray | None:
    """[tiles, 1 + MAX_RUNS] int64 over TILE_ROWS-row tiles of `total_tokens` tokens: each tile's
    number of distinct nonzero slots, then those slots (zero-padded); None if a tile holds more than
    MAX_RUNS. `segments`: the batch's AdapterSegments."""
    tiles = -(-total_tokens // TILE_ROWS)
    table = np.zeros((tiles, 1 + MAX_RUNS), dtype=np.int64)
    slots, starts, ends = adapter_run_arrays(segments)
    if not len(slots):
        return table
    first, last = starts // TILE_ROWS, (ends - 1) // TILE_ROWS
    counts = last - first + 1  # tiles per run
    tile = np.repeat(first, counts) + positions_in_groups(counts)
    pairs = np.unique(tile * (slots.max() + 1) + np.repeat(slots, counts))  # distinct (tile, slot), sorted
    tile, slot = np.divmod(pairs, slots.max() + 1)
    per_tile = np.bincount(tile, minlength=tiles)
    if per_tile.max() > MAX_RUNS:
        return None
    table[:, 0] = per_tile
    table[tile, 1 + positions_in_groups(per_tile)] = slot  # `tile` is sorted: its groups are per_tile
    return table


def max_runs_bound(segment_starts: np.ndarray) -> int:
    """An upper bound on the distinct slots of any tile, from the token starts of a batch's
    segments: one more than the most segments starting inside one tile."""
    return 1 + int(np.bincount(np.asarray(segment_starts) // TILE_ROWS).max(initial=0))


def fused_gemm_fills_gpu(x: torch.Tensor, out_features: int, slice_width: int, min_tiles: int | None = None) -> bool:
    """Whether `lora_gemm` on x has at least `min_tiles` output tiles (TILE_ROWS x BLOCK_N, BLOCK_N
    up to 256), by default one per SM of x's GPU. With fewer, fewer programs than SMs each walk the
    whole K: on the H200 the Gluon kernel with the expand took 1.5-3.2x the time of cuBLAS plus
    `sgmv_expand` on the narrow linears of batches of 17-1,024 tokens. From one tile per SM on it
    was faster on Q/K/V and intermediate.dense, and 2-12% slower on the narrow linears, where the
    layers' separate expand (the residual + LayerNorm kernel's) costs more than `sgmv_expand`
    (benchmarks/NOTES.md, items 43-44). Below, the layers take the separate path."""
    if min_tiles is None:
        min_tiles = multiprocessor_count(x.device)
    tiles = -(-x.shape[0] // TILE_ROWS) * (out_features // block_n_for(out_features, slice_width or out_features))
    return tiles >= min_tiles


def lora_gemm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
    lora_a_cat: torch.Tensor, lora_b_cat: torch.Tensor, slice_width: int, segments,
) -> torch.Tensor:
    """activation(F.linear(x, W, bias) + the segmented LoRA): what `lora_gemm` computes, in PyTorch.
    `segments`: the batch's AdapterSegments."""
    output = F.linear(x, weight, bias)
    slices, rank = lora_b_cat.shape[1] // slice_width, lora_b_cat.shape[2]
    lora_a = [lora_a_cat[:, i * rank : (i + 1) * rank] for i in range(slices)]
    lora_b = [lora_b_cat[:, i * slice_width : (i + 1) * slice_width] for i in range(slices)]
    apply_segmented_lora(x, output, lora_a, lora_b, segments)
    return ACTIVATIONS[activation](output)


def block_n_for(out_features: int, slice_width: int, cap: int = 256) -> int | None:
    """The widest output tile (up to `cap` columns: 256, 128 or 64) that lies inside one slice."""
    for block in (256, 128, 64):
        if block <= cap and slice_width % block == 0 and out_features % block == 0:
            return block
    return None


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    if device.index not in _CAPABILITY:
        _CAPABILITY[device.index] = torch.cuda.get_device_capability(device)
    return _CAPABILITY[device.index]


def lora_gemm_supported(x: torch.Tensor, weight: torch.Tensor, slice_width: int, rank: int) -> bool:
    if triton is None or not x.is_cuda:
        return False
    return (
        _capability(x.device)[0] >= 9  # TMA loads and stores
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.dim() == 2
        and x.shape[1] % 64 == 0
        and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0  # TMA: 16-byte aligned rows
        and weight.is_contiguous()
        and block_n_for(weight.shape[0], slice_width) is not None
        and rank <= 128
    )


if triton is not None:

    @triton.jit
    def _lora_gemm_kernel(
        x_desc, w_desc, out_desc, bias_ptr, b_ptr, token_slots_ptr, tile_slots_ptr, shrunk_ptr,
        M, N, K, slice_width, rank_capacity, stride_b_slot, stride_b_row, stride_shrunk, stride_tile,
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ACTIVATION: tl.constexpr, RANK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        TABLE_ROWS: tl.constexpr,
    ):
        # The TMA descriptors come from the host. Built by each program instead
        # (tl.make_tensor_descriptor), they cost up to 30 µs more GPU time per call (NOTES, item 29).
        # Output tiles in groups of GROUP_M tile rows, so a group's weight tiles stay in L2.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        group_width = GROUP_M * tiles_n
        first_m = (pid // group_width) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % group_width) % group_rows
        tile_n = (pid % group_width) // group_rows
        row = tile_m * BLOCK_M
        column = tile_n * BLOCK_N
        rows = row + tl.arange(0, BLOCK_M)
        columns = column + tl.arange(0, BLOCK_N)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            # TMA loads; rows past M read as zeros
            acc = tl.dot(x_desc.load([row, k]), w_desc.load([column, k]).T, acc)
        if HAS_LORA:
            row_slots = tl.load(token_slots_ptr + rows, mask=rows < M, other=0)
            ranks = tl.arange(0, RANK)
            rank_live = ranks < rank_capacity
            # This slice's shrunk columns: slice i's rank r is column i * rank_capacity + r.
            shrunk_columns = (column // slice_width) * rank_capacity + ranks
            shrunk_rows = shrunk_ptr + rows.to(tl.int64)[:, None] * stride_shrunk + shrunk_columns[None, :]
            tile_entry = tile_slots_ptr + (row // TABLE_ROWS) * stride_tile  # BLOCK_M divides TABLE_ROWS
            for run in range(tl.load(tile_entry)):
                slot = tl.load(tile_entry + 1 + run)
                shrunk = tl.load(shrunk_rows, mask=(row_slots == slot)[:, None] & rank_live[None, :], other=0.0)
                b_tile = tl.load(
                    b_ptr + slot.to(tl.int64) * stride_b_slot + columns[None, :] * stride_b_row + ranks[:, None],
                    mask=rank_live[:, None], other=0.0,
                )  # [RANK, BN]
                acc = tl.dot(shrunk.to(b_tile.dtype), b_tile, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + columns).to(tl.float32)[None, :]
        if ACTIVATION == 1:  # exact GELU
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        elif ACTIVATION == 2:  # tanh GELU: 0.5 (1 + tanh(u)) = sigmoid(2u)
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(2.0 * inner)
        elif ACTIVATION == 3:
            acc = tl.maximum(acc, 0.0)
        out_desc.store([row, column], acc.to(out_desc.dtype))  # clipped at M


# (BLOCK_N cap, BLOCK_K, num_warps, num_stages[, BLOCK_M]) per activation code, chosen by
# benchmarks/lora_gemm_bench.py (H200, 16k tokens, 64 adapters; results/lora-gemm-2026-11-28-h200.md
# and lora-gemm-sweep-2026-11-28-h200.md). Two stages for the three linears without an activation:
# with them the layer stack took ~2.5% less GPU time with 64 adapters than with three
# (results/lora-fusion-2026-11-28-h200-launch-s2.md).
LAUNCHES = {0: (128, 64, 4, 2), 1: (128, 64, 8, 3)}
DEFAULT_LAUNCH = (128, 64, 4, 3)
GROUP_M = 8


def lora_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "identity",
    lora_b_cat: torch.Tensor | None = None,
    slice_width: int = 0,
    token_slots: torch.Tensor | None = None,
    tile_slots: torch.Tensor | None = None,
    shrunk: torch.Tensor | None = None,
    launch: tuple | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """activation(x @ W.T + bias + shrunk[t] @ B[slot of t].T) in one kernel; no LoRA without `shrunk`.

    x: [T, in]; weight: [out, in] contiguous; lora_b_cat: [slots, out, R] with the scaling folded
    in (`layers.SegmentedLoraLinear`'s layout); slice_width: out / slices; token_slots: [T] int32;
    tile_slots: `tile_slot_table` of the batch as int32 on the device; shrunk: [T, slices * R]
    float32 (`sgmv_triton.sgmv_shrink`; rows of base tokens are never read). Needs
    `lora_gemm_supported`. kernel: "gluon" (`lora_gemm_gluon`, warp-specialized; needs
    `gluon_lora_gemm_supported`), "triton" (this module's), or "auto": the Gluon one where it
    applies when no `launch` is given (a launch setting is the chosen kernel's; benchmarks).
    Returns [T, out]."""
    total, in_features = x.shape
    out_features = weight.shape[0]
    rank = lora_b_cat.shape[2] if shrunk is not None else 0
    if kernel == "gluon" or (
        kernel == "auto" and launch is None
        and gluon_lora_gemm_supported(_capability(x.device), x, out_features, slice_width, rank)
    ):
        return gluon_lora_gemm(x, weight, bias, activation, lora_b_cat, slice_width, token_slots, tile_slots, shrunk,
                               launch)
    out = torch.empty(total, out_features, device=x.device, dtype=x.dtype)
    if total == 0:
        return out
    code = ACTIVATION_CODES[activation]
    block_cap, block_k, num_warps, num_stages, *rest = launch or LAUNCHES.get(code, DEFAULT_LAUNCH)
    block_m = rest[0] if rest else TILE_ROWS  # 64 or 128: a tile of the table holds whole output tiles
    block_k = block_k if in_features % block_k == 0 else 64
    slice_width = slice_width or out_features
    block_n = block_n_for(out_features, slice_width, block_cap)
    has_lora = shrunk is not None
    placeholder = weight  # pointers the kernel does not read
    grid = (triton.cdiv(total, block_m) * (out_features // block_n),)
    _lora_gemm_kernel[grid](
        TensorDescriptor.from_tensor(x, [block_m, block_k]),
        TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        TensorDescriptor.from_tensor(out, [block_m, block_n]),
        bias if bias is not None else placeholder,
        *((lora_b_cat, token_slots, tile_slots, shrunk) if has_lora else (placeholder,) * 4),
        total, out_features, in_features, slice_width, lora_b_cat.shape[2] if has_lora else 0,
        *((lora_b_cat.stride(0), lora_b_cat.stride(1), shrunk.stride(0), tile_slots.stride(0))
          if has_lora else (0,) * 4),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, ACTIVATION=code,
        RANK=max(16, triton.next_power_of_2(lora_b_cat.shape[2])) if has_lora else 16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M, TABLE_ROWS=TILE_ROWS,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
