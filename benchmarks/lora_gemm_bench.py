"""The LoRA expand inside the base GEMM (`lora/lora_gemm_triton.py`) against the cuBLAS paths, per
linear of an XLM-R base layer, over one packed batch of 16,384 tokens whose rows are grouped into
64 rank-16 adapter segments of random lengths (the engine's layout), on one GPU.

    python benchmarks/lora_gemm_bench.py [--tokens 16384] [--adapters 64] [--rank 16]
        [--launches 128,64,4,3 256,64,8,3 ...] [--out FILE.md]

A launch is BLOCK_N cap, BLOCK_K, warps, stages[, BLOCK_M]; "code" is the code's own setting (LAUNCHES).

Per linear, the rows are:
- "cuBLAS, base": the base model's kernels (cuBLAS GEMM with the bias, and the tanh GELU, in its
  epilogue; the exact GELU as a separate pass; then the residual + LayerNorm kernel where that is
  the consumer), no LoRA;
- "cuBLAS, LoRA": cuBLAS, the shrink (`sgmv_triton`), and the expand, or the consumer kernel that
  adds the delta (`fused_ops`): the path of mixed-adapter batches before the fused GEMM;
- "fused" rows: the Triton GEMM for each launch setting (the first is the code's), followed by
  the plain consumer: without LoRA ("base"), and after the shrink with the expand in its epilogue
  ("LoRA"; both kernels timed).
The error column is the largest absolute difference of the linear's output (before the consumer)
from a float32 reference (F.linear, then `segmented.apply_segmented_lora`, then the activation).
Microseconds per call are GPU time from CUDA-graph replays (`lora_kernel_sweep.microseconds`);
"host µs" is the time the host takes to queue one call (50 in a row), which graphs hide. The table (card, date) prints last.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_kernel_sweep import microseconds, write_table  # noqa: E402
from loraembed import fused_ops  # noqa: E402
from loraembed.fused_ops import LoraDelta  # noqa: E402
from loraembed.lora import lora_gemm_triton as lg  # noqa: E402
from loraembed.lora.sgmv_triton import build_lora_batch_tables, lora_expand, lora_shrink  # noqa: E402
from loraembed.packing import AdapterSegment  # noqa: E402

HIDDEN, INTERMEDIATE = 768, 3072
# name, out, in, slices, activation, consumer
LINEARS = (
    ("attention.self.qkv", 3 * HIDDEN, HIDDEN, 3, "identity", "attention"),
    ("attention.output.dense", HIDDEN, HIDDEN, 1, "identity", "layer norm"),
    ("intermediate.dense, tanh GELU", INTERMEDIATE, HIDDEN, 1, "gelu_pytorch_tanh", "output.dense"),
    ("intermediate.dense, exact GELU", INTERMEDIATE, HIDDEN, 1, "gelu", "output.dense"),
    ("output.dense", HIDDEN, INTERMEDIATE, 1, "identity", "layer norm"),
)


def random_segments(tokens: int, adapters: int, rng: np.random.Generator) -> tuple[AdapterSegment, ...]:
    cuts = [0, *sorted(rng.choice(np.arange(1, tokens), adapters - 1, replace=False).tolist()), tokens]
    return tuple(AdapterSegment(slot + 1, start, end) for slot, (start, end) in enumerate(zip(cuts, cuts[1:])))


def host_microseconds(function, calls: int = 50) -> float:
    """Host time to queue one call: `calls` calls back to back, then one wait for the device."""
    function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--launches", nargs="+",
                        default=["code", "128,64,4,3", "128,64,8,3", "256,64,8,3", "128,64,4,4"])
    parser.add_argument("--linears", nargs="+", help="names of LINEARS to run (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    segments = random_segments(args.tokens, args.adapters, rng)
    block_table, token_slots, tile_slots = build_lora_batch_tables(segments, device, True, with_tile_slots=True)
    runs = int(tile_slots[:, 0].max())
    launches = [None if launch == "code" else tuple(int(v) for v in launch.split(",")) for launch in args.launches]
    slots = args.adapters + 1
    rows = []
    for name, out_features, in_features, slices, activation, consumer in LINEARS:
        if args.linears and name not in args.linears:
            continue
        width = out_features // slices
        x = torch.randn(args.tokens, in_features, device=device, dtype=dtype)
        weight = torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features**0.5
        bias = torch.randn(out_features, device=device, dtype=dtype) * 0.1
        lora_a = torch.randn(slots, slices * args.rank, in_features, device=device, dtype=dtype) / in_features**0.5
        lora_b = torch.randn(slots, out_features, args.rank, device=device, dtype=dtype) * 0.1
        lora_a[0].zero_()
        lora_b[0].zero_()
        residual = torch.randn(args.tokens, out_features, device=device, dtype=dtype)
        norm_weight = torch.ones(out_features, device=device, dtype=dtype)
        norm_bias = torch.zeros(out_features, device=device, dtype=dtype)
        reference = lg.lora_gemm_reference(
            x.float(), weight.float(), bias.float(), activation, lora_a.float(), lora_b.float(), width, segments
        )

        def consume(y):
            if consumer == "layer norm":
                return fused_ops.add_layer_norm(y, residual, norm_weight, norm_bias, 1e-5)
            return y

        def base():
            y = fused_ops.linear_activation(x, weight, bias, activation)
            return consume(y)

        def cublas_lora(through_layer_norm=True):
            """The path before the fused GEMM; without the LayerNorm: the linear's output + delta (the error)."""
            y = F.linear(x, weight, bias)
            shrunk = lora_shrink(x, lora_a, block_table)
            if slices > 1:
                lora_expand(shrunk, y, lora_b, args.rank, width, block_table)
                return y
            delta = LoraDelta(shrunk, lora_b, token_slots)
            if through_layer_norm and consumer == "layer norm":
                return fused_ops.add_layer_norm(y, residual, norm_weight, norm_bias, 1e-5, delta)
            return fused_ops.add_lora_activation(y, delta, activation)

        def error(y):
            return (y.float() - reference).abs().max().item()

        base_us = microseconds(base)
        cublas_lora_us = microseconds(cublas_lora)
        rows.append((name, "cuBLAS, base", base_us, None, host_microseconds(base)))
        rows.append((name, "cuBLAS, LoRA", cublas_lora_us, error(cublas_lora(through_layer_norm=False)),
                     host_microseconds(cublas_lora)))
        for launch in launches:
            label = "code's launch" if launch is None else (
                f"{launch[0]}x{launch[1]} w{launch[2]} s{launch[3]}" + (f" m{launch[4]}" if len(launch) > 4 else ""))
            for with_lora in (False, True):
                def run(launch=launch, with_lora=with_lora):
                    if not with_lora:
                        return lg.lora_gemm(x, weight, bias, activation, launch=launch)
                    shrunk = lora_shrink(x, lora_a, block_table)
                    return lg.lora_gemm(x, weight, bias, activation, lora_b, width, token_slots, tile_slots, shrunk, launch)
                try:
                    y = run()
                    us = microseconds(lambda run=run: consume(run()))
                except Exception as failure:  # out of shared memory or registers
                    print(f"{name} {label}: {type(failure).__name__}: {str(failure)[:200]}", file=sys.stderr)
                    continue
                rows.append((name, f"fused {label}, {'LoRA' if with_lora else 'base'}", us,
                             error(y) if with_lora else None, host_microseconds(lambda run=run: consume(run()))))
        print(f"{name} done", file=sys.stderr, flush=True)

    card = torch.cuda.get_device_name(device)
    lines = [
        f"# LoRA expand inside the base GEMM: {args.tokens} tokens, {args.adapters} rank-{args.rank} adapters in "
        f"segments of random lengths (at most {runs} per {lg.TILE_ROWS}-row tile)",
        "",
        f"card: {card}   date: {datetime.date.today()}   torch {torch.__version__}",
        "",
        "| linear (+ consumer) | path | µs per call | vs cuBLAS base | vs cuBLAS LoRA | max abs error vs fp32 | host µs per call |",
        "|---|---|---|---|---|---|---|",
    ]
    base_of = {name: us for name, path, us, *_ in rows if path == "cuBLAS, base"}
    cublas_lora_of = {name: us for name, path, us, *_ in rows if path == "cuBLAS, LoRA"}
    for name, path, us, err, host_us in rows:
        lines.append(
            f"| {name} | {path} | {us:.1f} | {base_of[name] / us:.2f}x | {cublas_lora_of[name] / us:.2f}x | "
            f"{'' if err is None else f'{err:.1e}'} | {host_us:.0f} |"
        )
    write_table("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
