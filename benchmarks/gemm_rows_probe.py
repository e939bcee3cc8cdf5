"""cuBLAS's time for XLM-R base's four linears at row counts near one full packed batch.

    python benchmarks/gemm_rows_probe.py [--rows 16106,16379,16383,16384,16385] [--out FILE]

A CUDA graph runs every row of its bucket, so the bucket's row count is the M that cuBLAS's
heuristics see, and they pick a kernel per (M, N, K). This prints, per row count, each linear's µs
(CUDA-graph replays, `lora_kernel_sweep.microseconds`), the kernel cuBLAS ran, the device memsets per
call, and the four linears' sum per layer in µs per 1,000 rows.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))

from lora_kernel_sweep import microseconds, write_table  # noqa: E402
from loraembed.fused_ops import linear_activation  # noqa: E402

# name -> (out features, in features, activation in the epilogue)
LINEARS = {
    "query/key/value": (2304, 768, None),
    "attention.output.dense": (768, 768, None),
    "intermediate.dense": (3072, 768, "gelu_pytorch_tanh"),
    "output.dense": (768, 3072, None),
}


def kernels_of(function) -> tuple[str, int]:
    """The longest kernel's name (shortened) and the memsets of one call, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        function()
        torch.cuda.synchronize()
    events = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    memsets = sum(1 for e in events if "memset" in e.name.lower())
    kernels = [e for e in events if "memset" not in e.name.lower()]
    longest = max(kernels, key=lambda e: e.device_time) if kernels else None
    name = longest.name.replace("nvjet_sm90_tst_", "")[:34] if longest else "-"
    return name, memsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16106,16379,16383,16384,16385")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    lines = [f"card: {torch.cuda.get_device_name()}   date: {datetime.date.today().isoformat()}   "
             f"torch {torch.__version__}   cuBLASLt via torch (bf16)", "",
             "| rows | linear | µs | TFLOP/s | kernel | memsets |", "|---|---|---|---|---|---|"]
    sums = []
    for rows in [int(r) for r in args.rows.split(",")]:
        total = 0.0
        for name, (out_features, in_features, activation) in LINEARS.items():
            x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
            weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
            bias = torch.randn(out_features, device=device, dtype=torch.bfloat16)
            if activation:
                def function(x=x, weight=weight, bias=bias, activation=activation):
                    return linear_activation(x, weight, bias, activation)
            else:
                def function(x=x, weight=weight, bias=bias):
                    return F.linear(x, weight, bias)
            us = microseconds(function)
            kernel, memsets = kernels_of(function)
            total += us
            flops = 2 * rows * out_features * in_features
            lines.append(f"| {rows} | {name} | {us:.1f} | {flops / us / 1e6:.0f} | {kernel} | {memsets} |")
        sums.append(f"| {rows} | {total:.1f} | {total / rows * 1000:.2f} |")
    lines += ["", "| rows | four linears, µs | µs per 1,000 rows |", "|---|---|---|", *sums]
    write_table("\n".join(lines), Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
