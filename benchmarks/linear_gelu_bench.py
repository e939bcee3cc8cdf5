"""The intermediate projection with GELU: cuBLAS (bias fused) + PyTorch's GELU pass, against our
Triton GEMM with bias and GELU in its epilogue (several tile shapes), on the encoder's shapes.
Prints a table (card, date; cuBLAS + GELU is the baseline) of microseconds per call, TFLOP/s, and
each kernel's largest deviation from the float32 reference.

    python benchmarks/linear_gelu_bench.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))
from loraembed.linear_gelu_triton import linear_gelu  # noqa: E402

SHAPES = {  # name -> (tokens, in_features, out_features)
    "xlmr-base 16k": (16384, 768, 3072),
    "xlmr-base 2k": (2048, 768, 3072),
    "xlmr-large 16k": (16384, 1024, 4096),
    "minilm 16k": (16384, 384, 1536),
}
TILES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, warp_specialize)
    (128, 256, 64, 8, 3, False), (128, 256, 64, 8, 4, False), (128, 128, 64, 8, 4, False),
    (128, 128, 64, 4, 4, False), (256, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, True),
    (128, 128, 64, 4, 3, True), (128, 128, 128, 8, 3, False),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run under TRITON_INTERPRET=1


def cuda_time_us(fn, repeats: int = 30) -> float:
    if DEVICE == "cpu":
        return 1.0
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None, help="also write the table to DIR/linear-gelu-bench.md")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    lines = [
        f"# Intermediate projection + exact GELU ({args.dtype})",
        "",
        f"card: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU (smoke run)'}   "
        f"date: {datetime.date.today().isoformat()}   torch {torch.__version__}",
        "",
        "| shape | kernel | µs per call | TFLOP/s | vs cuBLAS + GELU | max abs error vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.shapes.split(","):
        tokens, in_features, out_features = SHAPES[name]
        x = torch.randn(tokens, in_features, device=DEVICE).to(dtype)
        weight = (torch.randn(out_features, in_features, device=DEVICE) * in_features**-0.5).to(dtype)
        bias = torch.randn(out_features, device=DEVICE).to(dtype) * 0.1
        reference = F.gelu(F.linear(x.float(), weight.float(), bias.float()))
        flops = 2 * tokens * in_features * out_features
        kernels = {
            "cuBLAS linear only (no GELU)": lambda: F.linear(x, weight, bias),
            "cuBLAS linear + GELU": lambda: F.gelu(F.linear(x, weight, bias)),
        }
        for tile in TILES:
            kernels["triton %dx%dx%d w%d s%d ws%d" % tile] = lambda tile=tile: linear_gelu(x, weight, bias, "none", tile)
        baseline = None
        for kernel, call in kernels.items():
            try:
                result = call()
                error = float((result.float() - reference).abs().max()) if "GELU" in kernel or "triton" in kernel else float("nan")
                micros = cuda_time_us(call)
            except Exception as failure:  # e.g. a tile shape out of shared memory
                print(f"{name} {kernel}: {type(failure).__name__}: {str(failure)[:300]}", file=sys.stderr)
                continue
            if kernel == "cuBLAS linear + GELU":
                baseline = micros
            ratio = f"{baseline / micros:.2f}x" if baseline else ""
            lines.append(f"| {name} | {kernel} | {micros:.1f} | {flops / micros / 1e6:.0f} | {ratio} | {error:.1e} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out, "linear-gelu-bench.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
