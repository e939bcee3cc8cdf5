"""The intermediate projection with its activation in the GEMM's epilogue (Triton language).

cuBLAS fuses the bias but not HF's exact (erf) GELU, so the [T, 3072] output is written, read back
and written again by a separate GELU pass: 200 MB per layer per 16k-token batch, ~70 µs at the
H100's bandwidth, 13% of a base forward (benchmarks/NOTES.md). Here each output tile gets bias and
GELU while still in registers. cuBLASLt's own GELU epilogue is the tanh approximation, so it is
not used: this keeps the checkpoint's activation exactly (erf, or tanh where the config says so).

A persistent kernel (one program per SM walking the output tiles) that loads its tiles with the
Hopper tensor-memory accelerator (TMA descriptors) and stores through one too.

Reference: `F.gelu(F.linear(x, weight, bias))`, which the GPU tests compare this kernel with.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU machines: the reference path only
    triton = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, warp_specialize), chosen by
# benchmarks/linear_gelu_bench.py on an H100.
DEFAULT_TILE = (128, 256, 64, 8, 3, False)
GROUP_M = 8  # output tiles visited in groups of rows, so the weight tiles stay in L2
_SM_COUNT: dict[int, int] = {}


def linear_gelu_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and torch.cuda.get_device_capability(x.device)[0] >= 9  # TMA
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and x.shape[-1] % 64 == 0
        and weight.shape[0] % 8 == 0
        and x.is_contiguous()
        and weight.is_contiguous()
    )


if triton is not None:

    @triton.jit
    def _tile_position(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
        group_width = GROUP_M * tiles_n
        first_m = (tile // group_width) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (tile % group_width) % group_rows, (tile % group_width) // group_rows

    @triton.jit
    def _linear_gelu_kernel(
        x_desc, w_desc, bias_ptr, out_desc, M, N, K,
        TANH: tl.constexpr, NUM_PROGRAMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        k_steps = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=True,
                             warp_specialize=WARP_SPECIALIZE):
            tile_m, tile_n = _tile_position(tile, tiles_m, tiles_n, GROUP_M)
            row, column = tile_m * BLOCK_M, tile_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for step in range(k_steps):
                a = x_desc.load([row, step * BLOCK_K])  # [BM, BK]; rows past M read as zeros
                b = w_desc.load([column, step * BLOCK_K])  # [BN, BK]
                acc = tl.dot(a, b.T, acc)
            columns = column + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + columns, mask=columns < N, other=0.0).to(tl.float32)[None, :]
            if TANH:
                inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
                activated = 0.5 * acc * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
            else:
                activated = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
            out_desc.store([row, column], activated.to(out_desc.dtype))  # clipped at M, N


def linear_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str = "none",
    tile: tuple = DEFAULT_TILE,
) -> torch.Tensor:
    """gelu(x @ weight.T + bias) in one kernel. x: [T, in] contiguous with in % 64 == 0; weight:
    [out, in] contiguous; approximate: "none" (erf, HF's "gelu") or "tanh". Returns [T, out]."""
    block_m, block_n, block_k, num_warps, num_stages, warp_specialize = tile
    total, in_features = x.shape
    out_features = weight.shape[0]
    out = torch.empty(total, out_features, device=x.device, dtype=x.dtype)
    if total == 0:
        return out
    index = x.device.index if x.device.type == "cuda" else -1
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(x.device).multi_processor_count if index >= 0 else 4
    tiles = triton.cdiv(total, block_m) * triton.cdiv(out_features, block_n)
    programs = min(_SM_COUNT[index], tiles)
    _linear_gelu_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]),
        TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        bias,
        TensorDescriptor.from_tensor(out, [block_m, block_n]),
        total, out_features, in_features,
        TANH=approximate == "tanh", NUM_PROGRAMS=programs, WARP_SPECIALIZE=warp_specialize,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
