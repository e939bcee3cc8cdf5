"""The intermediate projection with its activation in the GEMM's epilogue (Triton language).

cuBLAS fuses the bias but not HF's exact (erf) GELU, so the [T, 3072] output is written, read back
and written again by a separate GELU pass: 200 MB per layer per 16k-token batch, ~70 µs at the
H100's bandwidth, 13% of a base forward (benchmarks/NOTES.md). Here each output tile gets bias and
GELU while still in registers. cuBLASLt's own GELU epilogue is the tanh approximation, so it is
not used: this keeps the checkpoint's activation exactly (erf, or tanh where the config says so).

Reference: `F.gelu(F.linear(x, weight, bias))`, which the GPU tests compare this kernel with.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the reference path only
    triton = None

# Tile shape and launch options, chosen by benchmarks/linear_gelu_bench.py on an H100:
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
DEFAULT_TILE = (128, 256, 64, 8, 3)
GROUP_M = 8  # output tiles visited in groups of rows, so the weight tiles stay in L2


def linear_gelu_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and x.shape[-1] % 64 == 0
        and x.stride(-1) == 1
        and weight.is_contiguous()
    )


if triton is not None:

    @triton.jit
    def _linear_gelu_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K,
        stride_x, stride_w, stride_out,
        TANH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        group_width = GROUP_M * tiles_n
        group = pid // group_width
        first_m = group * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % group_width) % group_rows
        tile_n = (pid % group_width) // group_rows

        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        columns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        ks = tl.arange(0, BLOCK_K)
        row_valid = rows < M
        column_valid = columns < N
        x_tile = x_ptr + rows.to(tl.int64)[:, None] * stride_x + ks[None, :]  # [BM, BK]
        w_tile = w_ptr + columns.to(tl.int64)[None, :] * stride_w + ks[:, None]  # [BK, BN]: W^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K (checked by the caller)
            a = tl.load(x_tile, mask=row_valid[:, None], other=0.0)
            b = tl.load(w_tile, mask=column_valid[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            x_tile += BLOCK_K
            w_tile += BLOCK_K
        acc += tl.load(bias_ptr + columns, mask=column_valid, other=0.0).to(tl.float32)[None, :]
        if TANH:
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            activated = 0.5 * acc * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
        else:
            activated = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + columns[None, :]
        tl.store(out, activated.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & column_valid[None, :])


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str = "none",
    tile: tuple[int, int, int, int, int] = DEFAULT_TILE,
) -> torch.Tensor:
    """gelu(x @ weight.T + bias) in one kernel. x: [T, in] with in % 64 == 0; weight: [out, in]
    contiguous; approximate: "none" (erf, HF's "gelu") or "tanh". Returns [T, out] in x's dtype."""
    block_m, block_n, block_k, num_warps, num_stages = tile
    total, in_features = x.shape
    out_features = weight.shape[0]
    if in_features % block_k:
        raise ValueError(f"linear_gelu needs in_features divisible by {block_k}, got {in_features}")
    out = torch.empty(total, out_features, device=x.device, dtype=x.dtype)
    if total == 0:
        return out
    grid = (triton.cdiv(total, block_m) * triton.cdiv(out_features, block_n),)
    _linear_gelu_kernel[grid](
        x, weight, bias, out, total, out_features, in_features,
        x.stride(0), weight.stride(0), out.stride(0),
        TANH=approximate == "tanh",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
