"""A warp-specialized, persistent Hopper GEMM in Gluon (Triton 3.6's lower-level language), against
cuBLAS at the four linear shapes of an XLM-R base layer, 16,384 tokens, bf16.

STATUS: a probe for benchmarks/NOTES.md "Next" 1, not used by the engine. Written on 2026-11-28 and
compiled for sm_90 on the CPU machine only (`--compile-only`, Triton 3.6.0 from PyPI); it has never
run on a GPU. Its first GPU run should check the error column before reading any time.

    python benchmarks/gluon_gemm_probe.py [--tokens 16384] [--configs 128,3 128,4 256,3] [--adapters 64]
        [--rank 16] [--out FILE.md]
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
Rows per shape: cuBLAS, the code's Triton GEMM without LoRA (`lora_gemm_triton.lora_gemm`) and with
the LoRA expand in its epilogue (the engine's path for mixed-adapter batches), and each config
without and with the same expand (`_add_lora_expand`: one wgmma per adapter of the tile, the shrunk
rows from registers, that adapter's B through shared memory). The LoRA rows time the GEMM only:
the shrink (`sgmv_shrink`) runs once before. The table (card, date, µs per call, TFLOP/s, max abs
error against float32) prints last.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
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
def _add_lora_expand(acc, lora, b_smem, tile_m, tile_n, M, BM: gl.constexpr, BN: gl.constexpr,
                     RANK: gl.constexpr, acc_layout: gl.constexpr, num_warps: gl.constexpr):
    """acc[t] += shrunk[t] @ B[slot of t].T for the tile's rows, one wgmma per adapter of the tile
    (from the table of `lora_gemm_triton.tile_slot_table`): the shrunk rows of that slot (others
    zero) from registers, that slot's B columns through `b_smem`. As lora_gemm_triton's epilogue."""
    (b_ptr, token_slots_ptr, tile_slots_ptr, shrunk_ptr, slice_width, rank_capacity,
     stride_b_slot, stride_b_row, stride_shrunk, stride_tile) = lora
    rows_layout: gl.constexpr = gl.BlockedLayout([1, RANK], [32, 1], [num_warps, 1], [1, 0])  # [rows, RANK]
    rows = tile_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, rows_layout))
    ranks = gl.arange(0, RANK, layout=gl.SliceLayout(0, rows_layout))
    row_slots = gl.load(token_slots_ptr + rows, mask=rows < M, other=0)
    # This slice's shrunk columns: slice i's rank r is column i * rank_capacity + r.
    shrunk_rows = shrunk_ptr + rows.to(gl.int64)[:, None] * stride_shrunk + ((tile_n * BN) // slice_width) * rank_capacity
    columns = tile_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, rows_layout))
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    tile_entry = tile_slots_ptr + tile_m * stride_tile  # the table's tiles are BM = 128 rows
    for run in range(gl.load(tile_entry)):
        slot = gl.load(tile_entry + 1 + run)
        shrunk = gl.load(shrunk_rows + ranks[None, :],
                         mask=(row_slots == slot)[:, None] & (ranks < rank_capacity)[None, :], other=0.0)
        b_tile = gl.load(b_ptr + slot.to(gl.int64) * stride_b_slot + columns.to(gl.int64)[:, None] * stride_b_row
                         + ranks[None, :], mask=(ranks < rank_capacity)[None, :], other=0.0)  # [BN, RANK]
        b_smem.store(b_tile)
        fence_async_shared()
        gl.thread_barrier()  # every warp's part of B stored before the MMA reads it
        acc = warpgroup_mma(gl.convert_layout(shrunk.to(gl.bfloat16), a_layout), b_smem.permute((1, 0)), acc)
        gl.thread_barrier()  # read before the next run overwrites it
    return acc


@gluon.jit
def _mma_epilogue(out_desc, bias_ptr, x_ring, w_ring, ready, empty, out_smem, M, N, K, lora, b_smem,
                  HAS_BIAS: gl.constexpr, HAS_LORA: gl.constexpr, RANK: gl.constexpr,
                  BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                  STAGES: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr):
    """The default partition: wgmma over the ring (one MMA in flight while the next waits for its
    data), then the LoRA expand if any, bias, bf16 and a TMA store that runs while the next tile's
    MMAs start."""
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
        if HAS_LORA:
            acc = _add_lora_expand(acc, lora, b_smem, tile_m, tile_n, M, BM, BN, RANK, acc_layout, num_warps)
        if HAS_BIAS:
            columns = tile_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
            acc = acc + gl.load(bias_ptr + columns).to(gl.float32)[None, :]
        tma.store_wait(0)  # the previous tile's store has read out_smem
        out_smem.store(acc.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [tile_m * BM, tile_n * BN], out_smem)
    tma.store_wait(0)


@gluon.jit
def gluon_linear_kernel(x_desc, w_desc, out_desc, bias_ptr, M, N, K, lora, HAS_BIAS: gl.constexpr,
                        HAS_LORA: gl.constexpr, RANK: gl.constexpr, B_LAYOUT: gl.constexpr,
                        STAGES: gl.constexpr, GROUP: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = out_desc.block_type.shape[0]
    BN: gl.constexpr = out_desc.block_type.shape[1]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    x_ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    out_smem = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
    b_smem = gl.allocate_shared_memory(out_desc.dtype, [BN, RANK], B_LAYOUT)  # one adapter's B columns
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)
        mbarrier.init(empty.index(stage), count=1)
    gl.warp_specialize(
        [
            (_mma_epilogue, (out_desc, bias_ptr, x_ring, w_ring, ready, empty, out_smem, M, N, K, lora, b_smem,
                             HAS_BIAS, HAS_LORA, RANK, BM, BN, BK, STAGES, GROUP, num_warps)),
            (_loader, (x_desc, w_desc, x_ring, w_ring, ready, empty, M, N, K, BM, BN, BK, STAGES, GROUP)),
        ],
        [1],  # the loader's warps
        [24],  # and registers per thread
    )


def shared_layouts(block_n: int, rank: int = 16):
    """The NVMMA shared layouts of the x, weight, output and LoRA B blocks (bf16)."""
    return (
        gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16),
        gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], gl.bfloat16),
        gl.NVMMASharedLayout.get_default_for([BLOCK_M, block_n], gl.bfloat16),
        gl.NVMMASharedLayout.get_default_for([block_n, rank], gl.bfloat16),
    )


# Registers per thread at launch: the loader warp (rounded to a warpgroup) plus the 8 MMA warps share
# the SM's 64k registers; the compiler moves the loader's unused ones to the MMA partition.
MAX_REGISTERS = 168


def gluon_linear(x, weight, bias, block_n: int = 128, stages: int = 4, lora_b_cat=None, slice_width: int = 0,
                 token_slots=None, tile_slots=None, shrunk=None):
    """x [M, K] @ weight[N, K].T + bias on one GPU (sm_90), bf16 in and out; with `shrunk`, plus the
    LoRA expand of `lora_gemm_triton.lora_gemm` (same arguments and layouts) in the epilogue."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    total, in_features = x.shape
    out = torch.empty(total, weight.shape[0], device=x.device, dtype=x.dtype)
    has_lora = shrunk is not None
    rank = max(16, triton.next_power_of_2(lora_b_cat.shape[2])) if has_lora else 16
    x_layout, w_layout, out_layout, b_layout = shared_layouts(block_n, rank)
    tiles = triton.cdiv(total, BLOCK_M) * triton.cdiv(weight.shape[0], block_n)
    programs = min(tiles, torch.cuda.get_device_properties(x.device).multi_processor_count)
    lora = ((lora_b_cat, token_slots, tile_slots, shrunk, slice_width or weight.shape[0], lora_b_cat.shape[2],
             lora_b_cat.stride(0), lora_b_cat.stride(1), shrunk.stride(0), tile_slots.stride(0)) if has_lora
            else (weight, weight, weight, weight, 1, 1, 0, 0, 0, 0))
    gluon_linear_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K], x_layout),
        TensorDescriptor.from_tensor(weight, [block_n, BLOCK_K], w_layout),
        TensorDescriptor.from_tensor(out, [BLOCK_M, block_n], out_layout),
        bias if bias is not None else weight, total, weight.shape[0], in_features, lora,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, RANK=rank, B_LAYOUT=b_layout, STAGES=stages, GROUP=GROUP_M,
        num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )
    return out


def compile_for_sm90(block_n: int, stages: int, has_lora: bool):
    """Compile the kernel for sm_90 without a GPU (Triton's own ptxas); returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    x_layout, w_layout, out_layout, b_layout = shared_layouts(block_n)
    signature = {
        "x_desc": f"tensordesc<bf16[{BLOCK_M}, {BLOCK_K}],{x_layout!r}>",
        "w_desc": f"tensordesc<bf16[{block_n}, {BLOCK_K}],{w_layout!r}>",
        "out_desc": f"tensordesc<bf16[{BLOCK_M}, {block_n}],{out_layout!r}>",
        "bias_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
        # B, token slots, tile table, shrunk, slice width, rank capacity, 4 strides
        "lora": ("*bf16", "*i32", "*i32", "*fp32", "i32", "i32", "i64", "i64", "i64", "i64"),
        "HAS_BIAS": "constexpr", "HAS_LORA": "constexpr", "RANK": "constexpr", "B_LAYOUT": "constexpr",
        "STAGES": "constexpr", "GROUP": "constexpr", "num_warps": "constexpr",
    }
    constexprs = {"HAS_BIAS": True, "HAS_LORA": has_lora, "RANK": 16, "B_LAYOUT": b_layout, "STAGES": stages,
                  "GROUP": GROUP_M, "num_warps": NUM_WARPS}
    source = GluonASTSource(gluon_linear_kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": NUM_WARPS, "maxnreg": MAX_REGISTERS})


def flops_of(x, weight) -> int:
    return 2 * x.shape[0] * x.shape[1] * weight.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--configs", nargs="+", default=["128,3", "128,4", "256,3"], help="BLOCK_N,STAGES")
    parser.add_argument("--adapters", type=int, default=64, help="rank-R adapters in segments of random lengths")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    configs = [tuple(int(v) for v in config.split(",")) for config in args.configs]
    if args.compile_only:
        for block_n, stages in configs:
            for has_lora in (False, True):
                kernel = compile_for_sm90(block_n, stages, has_lora)
                print(f"BLOCK_N={block_n} STAGES={stages} LoRA={has_lora}: sm_90 cubin {len(kernel.asm['cubin'])} bytes, "
                      f"shared memory {kernel.metadata.shared} bytes")
        return

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))
    from lora_gemm_bench import random_segments  # noqa: E402
    from lora_kernel_sweep import microseconds, write_table  # noqa: E402
    from loraembed.lora.lora_gemm_triton import lora_gemm, lora_gemm_reference  # noqa: E402
    from loraembed.lora.sgmv_triton import build_lora_batch_tables, lora_shrink  # noqa: E402

    segments = random_segments(args.tokens, args.adapters, np.random.default_rng(0))
    block_table, token_slots, tile_slots = build_lora_batch_tables(segments, torch.device("cuda"), True, with_tile_slots=True)

    device = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        x = torch.randn(args.tokens, in_features, device=device, dtype=torch.bfloat16)
        weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) / in_features**0.5
        bias = torch.randn(out_features, device=device, dtype=torch.bfloat16) * 0.1
        reference = F.linear(x.float(), weight.float(), bias.float())
        slices = 3 if name == "attention.self.qkv" else 1
        width = out_features // slices
        lora_a = torch.randn(args.adapters + 1, slices * args.rank, in_features, device=device, dtype=torch.bfloat16)
        lora_a = lora_a / in_features**0.5
        lora_b = torch.randn(args.adapters + 1, out_features, args.rank, device=device, dtype=torch.bfloat16) * 0.1
        lora_a[0], lora_b[0] = 0, 0
        shrunk = lora_shrink(x, lora_a, block_table)  # the same shrink for both LoRA kernels, not timed
        lora_args = (lora_b, width, token_slots, tile_slots, shrunk)
        lora_reference = lora_gemm_reference(x.float(), weight.float(), bias.float(), "identity", lora_a.float(),
                                             lora_b.float(), width, segments)
        flops = flops_of(x, weight)
        rows.append((name, "cuBLAS (F.linear)", microseconds(lambda: F.linear(x, weight, bias)), flops,
                     (F.linear(x, weight, bias).float() - reference).abs().max().item()))
        rows.append((name, "Triton, one program per tile (lora_gemm without LoRA)",
                     microseconds(lambda: lora_gemm(x, weight, bias)), flops,
                     (lora_gemm(x, weight, bias).float() - reference).abs().max().item()))
        rows.append((name, "Triton + LoRA expand (lora_gemm, the code's fused path)",
                     microseconds(lambda: lora_gemm(x, weight, bias, "identity", *lora_args)), flops,
                     (lora_gemm(x, weight, bias, "identity", *lora_args).float() - lora_reference).abs().max().item()))
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
            try:
                error = (gluon_linear(x, weight, bias, block_n, stages, *lora_args).float() - lora_reference).abs().max().item()
                us = microseconds(lambda: gluon_linear(x, weight, bias, block_n, stages, *lora_args))
            except Exception as failure:
                print(f"{name} {label} + LoRA: {type(failure).__name__}: {str(failure)[:300]}", file=sys.stderr)
                continue
            rows.append((name, label + " + LoRA expand", us, flops, error))
    card = torch.cuda.get_device_name(device)
    cublas_of = {name: us for name, label, us, *_ in rows if label.startswith("cuBLAS")}
    lines = [
        f"# A warp-specialized Gluon GEMM against cuBLAS: {args.tokens} tokens, bf16, bias; LoRA rows: "
        f"{args.adapters} rank-{args.rank} adapters in segments of random lengths, the expand only (one shrink "
        "before, not timed), against float32 F.linear + apply_segmented_lora",
        "",
        "\"vs cuBLAS\" is against cuBLAS without LoRA.",
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
