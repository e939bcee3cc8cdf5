"""A warp-specialized, persistent Hopper GEMM in Gluon (Triton 3.6's lower-level language), against
cuBLAS at the four linear shapes of an XLM-R base layer, 16,384 tokens, bf16.

STATUS: a probe for benchmarks/NOTES.md "Next" 1, not used by the engine. Written on 2026-11-28 and
compiled for sm_90 on the CPU machine only (`--compile-only`, Triton 3.6.0 from PyPI); it has never
run on a GPU. Its first GPU run should check the error column before reading any time.

    python benchmarks/gluon_gemm_probe.py [--tokens 16384] [--configs 128,4 256,3] [--out FILE.md]
    python benchmarks/gluon_gemm_probe.py --compile-only   (no GPU needed: compiles every config for sm_90)

Why: the Triton GEMM with the LoRA expand in its epilogue (lora/lora_gemm_triton.py) runs one
program per output tile, 1 per SM at its shared-memory size, so nothing overlaps a tile's epilogue
or a separate shrink with tensor-core work (NOTES items 29-32). Here one warp only issues TMA loads
into a ring of STAGES buffers and the default partition (8 warps, two warpgroups on a 128-row tile)
only issues wgmma and runs the epilogue, whose TMA store overlaps the next tile's loads. If this
reaches cuBLAS at these shapes, the next step is the shrink of a row block computed once from the
same shared-memory tiles and kept for the block's output tiles.

The kernel: out[M, N] = x[M, K] @ weight[N, K].T + bias, programs = SMs, tiles in groups of GROUP_M
tile rows (L2 reuse of the weight), a config = BLOCK_N, STAGES (BLOCK_M 128, BLOCK_K 64, 8 warps).
Rows per shape: cuBLAS, the code's Triton GEMM without LoRA (`lora_gemm_triton.lora_gemm`), and each
config. The table (card, date, µs per call, TFLOP/s, max abs error against float32) prints last.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

BLOCK_M, BLOCK_K, NUM_WARPS, GROUP_M = 128, 64, 8, 8
HIDDEN, INTERMEDIATE = 768, 3072
SHAPES = {  # name: (out features, in features)
    "attention.self.qkv": (3 * HIDDEN, HIDDEN),
    "attention.output.dense": (HIDDEN, HIDDEN),
    "intermediate.dense": (INTERMEDIATE, HIDDEN),
    "output.dense": (HIDDEN, INTERMEDIATE),
}


@gluon.jit
def _tile_coordinates(tile, tiles_m, tiles_n, GROUP: gl.constexpr):
    """Output tile `tile` in groups of GROUP tile rows, column by column inside a group."""
    group_width = GROUP * tiles_n
    first_m = (tile // group_width) * GROUP
    group_rows = gl.minimum(tiles_m - first_m, GROUP)
    return first_m + (tile % group_width) % group_rows, (tile % group_width) // group_rows


@gluon.jit
def _loader(x_desc, w_desc, x_ring, w_ring, ready, empty, M, N, K,
            BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr):
    """One warp: TMA loads of each tile's x and weight blocks into the ring, one stage ahead of the
    MMAs as far as the ring allows."""
    tiles_m, tiles_n = gl.cdiv(M, BM), gl.cdiv(N, BN)
    issued = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        tile_m, tile_n = _tile_coordinates(tile, tiles_m, tiles_n, GROUP)
        for k in range(0, K, BK):
            stage = issued % STAGES
            # Free once the MMA that read it is done (the first pass finds every stage free).
            mbarrier.wait(empty.index(stage), ((issued // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(stage), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [tile_m * BM, k], ready.index(stage), x_ring.index(stage))
            tma.async_copy_global_to_shared(w_desc, [tile_n * BN, k], ready.index(stage), w_ring.index(stage))
            issued += 1


@gluon.jit
def _mma_epilogue(out_desc, bias_ptr, x_ring, w_ring, ready, empty, out_smem, M, N, K,
                  HAS_BIAS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  STAGES: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr):
    """The default partition: wgmma over the ring (one MMA in flight while the next waits for its
    data), then bias, bf16 and a TMA store that runs while the next tile's MMAs start."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN if BN <= 256 else 256, 16]
    )
    tiles_m, tiles_n = gl.cdiv(M, BM), gl.cdiv(N, BN)
    consumed = 0
    for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        tile_m, tile_n = _tile_coordinates(tile, tiles_m, tiles_n, GROUP)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=acc_layout)
        for k in range(0, K, BK):
            stage = consumed % STAGES
            mbarrier.wait(ready.index(stage), (consumed // STAGES) & 1)
            acc = warpgroup_mma(x_ring.index(stage), w_ring.index(stage).permute((1, 0)), acc, is_async=True)
            # At most this MMA in flight: the previous one is done, so its stage goes back to the loader.
            acc, _, _ = warpgroup_mma_wait(1, deps=(acc, x_ring.index(stage), w_ring.index(stage)))
            mbarrier.arrive(empty.index((consumed + STAGES - 1) % STAGES), pred=k > 0)
            consumed += 1
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((consumed + STAGES - 1) % STAGES))
        if HAS_BIAS:
            columns = tile_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
            acc = acc + gl.load(bias_ptr + columns).to(gl.float32)[None, :]
        tma.store_wait(0)  # the previous tile's store has read out_smem
        out_smem.store(acc.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [tile_m * BM, tile_n * BN], out_smem)
    tma.store_wait(0)


@gluon.jit
def gluon_linear_kernel(x_desc, w_desc, out_desc, bias_ptr, M, N, K, HAS_BIAS: gl.constexpr,
                        STAGES: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = out_desc.block_type.shape[0]
    BN: gl.constexpr = out_desc.block_type.shape[1]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    x_ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    out_smem = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=1)
    gl.warp_specialize(
        [
            (_mma_epilogue, (out_desc, bias_ptr, x_ring, w_ring, ready, empty, out_smem, M, N, K,
                             HAS_BIAS, BM, BN, BK, STAGES, GROUP, num_warps)),
            (_loader, (x_desc, w_desc, x_ring, w_ring, ready, empty, M, N, K, BM, BN, BK, STAGES, GROUP)),
        ],
        [1],  # the loader's warps
        [24],  # and registers per thread
    )


def shared_layouts(block_n: int):
    """The NVMMA shared layouts of the x, weight and output blocks (bf16)."""
    return (
        gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16),
        gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], gl.bfloat16),
        gl.NVMMASharedLayout.get_default_for([BLOCK_M, block_n], gl.bfloat16),
    )


# Registers per thread at launch: the loader warp (rounded to a warpgroup) plus the 8 MMA warps share
# the SM's 64k registers; the compiler moves the loader's unused ones to the MMA partition.
MAX_REGISTERS = 168


def gluon_linear(x, weight, bias, block_n: int = 128, stages: int = 4):
    """x [M, K] @ weight[N, K].T + bias on one GPU (sm_90), bf16 in and out."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    total, in_features = x.shape
    out = torch.empty(total, weight.shape[0], device=x.device, dtype=x.dtype)
    x_layout, w_layout, out_layout = shared_layouts(block_n)
    tiles = triton.cdiv(total, BLOCK_M) * triton.cdiv(weight.shape[0], block_n)
    programs = min(tiles, torch.cuda.get_device_properties(x.device).multi_processor_count)
    gluon_linear_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K], x_layout),
        TensorDescriptor.from_tensor(weight, [block_n, BLOCK_K], w_layout),
        TensorDescriptor.from_tensor(out, [BLOCK_M, block_n], out_layout),
        bias if bias is not None else weight, total, weight.shape[0], in_features,
        HAS_BIAS=bias is not None, STAGES=stages, GROUP=GROUP_M, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )
    return out


def compile_for_sm90(block_n: int, stages: int):
    """Compile the kernel for sm_90 without a GPU (Triton's own ptxas); returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    x_layout, w_layout, out_layout = shared_layouts(block_n)
    signature = {
        "x_desc": f"tensordesc<bf16[{BLOCK_M}, {BLOCK_K}],{x_layout!r}>",
        "w_desc": f"tensordesc<bf16[{block_n}, {BLOCK_K}],{w_layout!r}>",
        "out_desc": f"tensordesc<bf16[{BLOCK_M}, {block_n}],{out_layout!r}>",
        "bias_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
        "HAS_BIAS": "constexpr", "STAGES": "constexpr", "GROUP": "constexpr", "num_warps": "constexpr",
    }
    constexprs = {"HAS_BIAS": True, "STAGES": stages, "GROUP": GROUP_M, "num_warps": NUM_WARPS}
    source = GluonASTSource(gluon_linear_kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": NUM_WARPS, "maxnreg": MAX_REGISTERS})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--configs", nargs="+", default=["128,3", "128,4", "256,3"], help="BLOCK_N,STAGES")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    configs = [tuple(int(v) for v in config.split(",")) for config in args.configs]
    if args.compile_only:
        for block_n, stages in configs:
            kernel = compile_for_sm90(block_n, stages)
            print(f"BLOCK_N={block_n} STAGES={stages}: sm_90 cubin {len(kernel.asm['cubin'])} bytes, "
                  f"shared memory {kernel.metadata.shared} bytes")
        return

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))
    from lora_kernel_sweep import microseconds, write_table  # noqa: E402
    from loraembed.lora.lora_gemm_triton import lora_gemm  # noqa: E402

    device = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        x = torch.randn(args.tokens, in_features, device=device, dtype=torch.bfloat16)
        weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) / in_features**0.5
        bias = torch.randn(out_features, device=device, dtype=torch.bfloat16) * 0.1
        reference = F.linear(x.float(), weight.float(), bias.float())
        flops = 2 * args.tokens * in_features * out_features
        cublas_us = microseconds(lambda: F.linear(x, weight, bias))
        rows.append((name, "cuBLAS (F.linear)", cublas_us, flops,
                     (F.linear(x, weight, bias).float() - reference).abs().max().item()))
        rows.append((name, "Triton, one program per tile (lora_gemm without LoRA)",
                     microseconds(lambda: lora_gemm(x, weight, bias)), flops,
                     (lora_gemm(x, weight, bias).float() - reference).abs().max().item()))
        for block_n, stages in configs:
            if out_features % block_n:
                continue
            label = f"Gluon, BLOCK_N {block_n}, {stages} stages"
            try:
                error = (gluon_linear(x, weight, bias, block_n, stages).float() - reference).abs().max().item()
                us = microseconds(lambda: gluon_linear(x, weight, bias, block_n, stages))
            except Exception as failure:  # report and go on: this is a probe
                print(f"{name} {label}: {type(failure).__name__}: {str(failure)[:300]}", file=sys.stderr)
                continue
            rows.append((name, label, us, flops, error))
    card = torch.cuda.get_device_name(device)
    cublas_of = {name: us for name, label, us, *_ in rows if label.startswith("cuBLAS")}
    lines = [
        f"# A warp-specialized Gluon GEMM against cuBLAS: {args.tokens} tokens, bf16, bias",
        "",
        f"card: {card}   date: {datetime.date.today()}   torch {torch.__version__}   triton {triton.__version__}",
        "",
        "| linear | kernel | µs per call | TFLOP/s | vs cuBLAS | max abs error vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, label, us, flops, error in rows:
        lines.append(f"| {name} | {label} | {us:.1f} | {flops / us / 1e6:.0f} | {cublas_of[name] / us:.2f}x | {error:.1e} |")
    write_table("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
