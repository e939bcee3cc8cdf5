"""The warp-specialized Gluon GEMM of the engine (`lora/lora_gemm_gluon.py`) against cuBLAS and the
Triton kernel (`lora/lora_gemm_triton.py`) at the four linear shapes of an XLM-R base layer, 16,384
tokens, bf16, with and without the LoRA expand in the epilogue.

    python benchmarks/gluon_gemm_probe.py [--tokens 16384] [--configs 256,3 128,4 128,3] [--adapters 64]
        [--rank 16] [--out FILE.md]
    python benchmarks/gluon_gemm_probe.py --compile-only   (no GPU needed: compiles every config for sm_90;
        with Triton 3.6.0 from PyPI on a CPU machine)

A config is BLOCK_N, STAGES (BLOCK_M 128, BLOCK_K 64, 8 MMA warps and one loader warp). Rows per
shape: cuBLAS; cuBLAS and then the separate expand (the layers' path for linears of few output
tiles); the Triton kernel without LoRA and with the expand in its epilogue (the engine's path
for mixed-adapter batches before the Gluon one); each Gluon config without and with the expand. The
LoRA rows time the GEMM only: the shrink (`lora_shrink`) runs once before. Times are GPU time from
CUDA-graph replays (`lora_kernel_sweep.microseconds`). The table (card, date, µs per call, TFLOP/s,
max abs error against float32) prints last.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))
from loraembed.lora.lora_gemm_gluon import (  # noqa: E402
    BLOCK_K,
    BLOCK_M,
    GROUP_M,
    LAUNCHES,
    MAX_REGISTERS,
    NUM_WARPS,
    _gluon_lora_gemm_kernel,
    shared_layouts,
)

HIDDEN, INTERMEDIATE = 768, 3072
SHAPES = {  # name: (out features, in features)
    "attention.self.qkv": (3 * HIDDEN, HIDDEN),
    "attention.output.dense": (HIDDEN, HIDDEN),
    "intermediate.dense": (INTERMEDIATE, HIDDEN),
    "output.dense": (HIDDEN, INTERMEDIATE),
}


def compile_for_sm90(block_n: int, stages: int, has_lora: bool):
    """Compile the kernel for sm_90 without a GPU (Triton's own ptxas); returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    x_layout, w_layout, out_layout, b_layout = shared_layouts(block_n, 16)
    signature = {
        "x_desc": f"tensordesc<bf16[{BLOCK_M}, {BLOCK_K}],{x_layout!r}>",
        "w_desc": f"tensordesc<bf16[{block_n}, {BLOCK_K}],{w_layout!r}>",
        "out_desc": f"tensordesc<bf16[{BLOCK_M}, {block_n}],{out_layout!r}>",
        "b_desc": f"tensordesc<bf16[{block_n}, 16],{b_layout!r}>",
        "bias_ptr": "*bf16", "token_slots_ptr": "*i32", "tile_slots_ptr": "*i32", "shrunk_ptr": "*fp32",
        "M": "i32", "N": "i32", "K": "i32", "slice_width": "i32", "rank_capacity": "i32",
        "stride_shrunk": "i32", "stride_tile": "i32",
        "HAS_BIAS": "constexpr", "HAS_LORA": "constexpr", "ACTIVATION": "constexpr", "RANK": "constexpr",
        "STAGES": "constexpr", "B_STAGES": "constexpr", "GROUP": "constexpr", "num_warps": "constexpr",
    }
    constexprs = {"HAS_BIAS": True, "HAS_LORA": has_lora, "ACTIVATION": 2, "RANK": 16, "STAGES": stages,
                  "B_STAGES": 2, "GROUP": GROUP_M, "num_warps": NUM_WARPS}
    source = GluonASTSource(_gluon_lora_gemm_kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": NUM_WARPS, "maxnreg": MAX_REGISTERS})


def flops_of(x, weight) -> int:
    return 2 * x.shape[0] * x.shape[1] * weight.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--configs", nargs="+", default=["256,3", "128,4", "128,3"], help="BLOCK_N,STAGES")
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
    from lora_gemm_bench import random_segments  # noqa: E402
    from lora_kernel_sweep import microseconds, write_table  # noqa: E402
    from loraembed.lora.lora_gemm_gluon import gluon_lora_gemm  # noqa: E402
    from loraembed.lora.lora_gemm_triton import block_n_for, lora_gemm, lora_gemm_reference  # noqa: E402
    from loraembed.lora.sgmv_triton import build_lora_batch_tables, lora_expand, lora_shrink  # noqa: E402

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
        if block_table is not None:  # the unfused path: cuBLAS, then the expand's read-modify-write
            rows.append((name, "cuBLAS + separate expand (sgmv_expand)",
                         microseconds(lambda: lora_expand(shrunk, F.linear(x, weight, bias), lora_b, args.rank, width,
                                                          block_table)), flops, 0.0))
        rows.append((name, "Triton kernel, one program per tile, no LoRA",
                     microseconds(lambda: lora_gemm(x, weight, bias, kernel="triton")), flops,
                     (lora_gemm(x, weight, bias, kernel="triton").float() - reference).abs().max().item()))
        rows.append((name, "Triton kernel + LoRA expand (the fused path before Gluon)",
                     microseconds(lambda: lora_gemm(x, weight, bias, "identity", *lora_args, kernel="triton")), flops,
                     (lora_gemm(x, weight, bias, "identity", *lora_args, kernel="triton").float()
                      - lora_reference).abs().max().item()))
        for block_n, stages in configs:
            if out_features % block_n:
                continue
            label = f"Gluon, BLOCK_N {block_n}, {stages} stages"
            if block_n == block_n_for(out_features, width) and stages == LAUNCHES[block_n]:
                label += " (the code's widest launch)"
            try:
                launch = (block_n, stages)
                error = (gluon_lora_gemm(x, weight, bias, launch=launch).float() - reference).abs().max().item()
                us = microseconds(lambda: gluon_lora_gemm(x, weight, bias, launch=launch))
            except Exception as failure:  # report and go on: this is a probe
                print(f"{name} {label}: {type(failure).__name__}: {str(failure)[:300]}", file=sys.stderr)
                continue
            rows.append((name, label, us, flops, error))
            try:
                error = (gluon_lora_gemm(x, weight, bias, "identity", *lora_args, launch=launch).float()
                         - lora_reference).abs().max().item()
                us = microseconds(lambda: gluon_lora_gemm(x, weight, bias, "identity", *lora_args, launch=launch))
            except Exception as failure:
                print(f"{name} {label} + LoRA: {type(failure).__name__}: {str(failure)[:300]}", file=sys.stderr)
                continue
            rows.append((name, label + " + LoRA expand", us, flops, error))
        chosen = lambda: gluon_lora_gemm(x, weight, bias, "identity", *lora_args)  # noqa: E731
        rows.append((name, "Gluon, the code's launch for this batch (launch=None) + LoRA expand",
                     microseconds(chosen), flops, (chosen().float() - lora_reference).abs().max().item()))
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
