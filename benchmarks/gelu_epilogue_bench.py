"""The intermediate projection + GELU of a layer, three ways on one GPU: cuBLAS linear then an exact
GELU pass (what the encoder runs), cuBLASLt's GELU-bias epilogue in the GEMM
(`torch._addmm_activation(..., use_gelu=True)`, the tanh approximation), and cuBLAS linear alone
(the bound any fused GELU could reach). Also the error of each against float32 exact and tanh GELU.

    python benchmarks/gelu_epilogue_bench.py [--tokens 16384] [--out FILE.md]

Prints a table (card, date; microseconds per call, from CUDA-graph replays: lora_kernel_sweep.microseconds) last.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_kernel_sweep import microseconds, write_table  # this folder: the same timing and output

SHAPES = {"xlmr-base": (768, 3072), "xlmr-large": (1024, 4096), "minilm": (384, 1536)}


def intermediate_inputs(tokens: int, hidden: int, intermediate: int, device: torch.device, dtype: torch.dtype):
    """Random x, weight, bias of an intermediate projection, and float32 references of its output:
    (x, weight, bias, linear, exact GELU, tanh GELU)."""
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    weight = torch.randn(intermediate, hidden, device=device, dtype=dtype) / hidden**0.5
    bias = torch.randn(intermediate, device=device, dtype=dtype) * 0.1
    reference = F.linear(x.float(), weight.float(), bias.float())
    return x, weight, bias, reference, F.gelu(reference), F.gelu(reference, approximate="tanh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    lines = [f"card: {torch.cuda.get_device_name()}   date: {datetime.date.today().isoformat()}   torch {torch.__version__}",
             f"{args.tokens} tokens, bfloat16; error: max |y - y_fp32| over the output, against exact and tanh GELU in float32", "",
             "| model | way | µs | vs linear + exact GELU | max err vs exact | max err vs tanh |", "|---|---|---:|---:|---:|---:|"]
    for model, (hidden, intermediate) in SHAPES.items():
        x, weight, bias, _, exact, tanh = intermediate_inputs(args.tokens, hidden, intermediate, device, dtype)
        ways = {
            "cuBLAS linear alone (bound)": lambda: F.linear(x, weight, bias),
            "cuBLAS linear + exact GELU pass (the encoder)": lambda: F.gelu(F.linear(x, weight, bias)),
            "cuBLAS linear + tanh GELU pass": lambda: F.gelu(F.linear(x, weight, bias), approximate="tanh"),
            "cuBLASLt GELU-bias epilogue (tanh)": lambda: torch._addmm_activation(bias, x, weight.t(), use_gelu=True),
        }
        times = {way: microseconds(run) for way, run in ways.items()}
        baseline = times["cuBLAS linear + exact GELU pass (the encoder)"]
        for way, run in ways.items():
            y = run().float()
            errors = ("", "") if "alone" in way else (f"{(y - exact).abs().max():.1e}", f"{(y - tanh).abs().max():.1e}")
            lines.append(f"| {model} | {way} | {times[way]:.1f} | {baseline / times[way]:.2f}x | {errors[0]} | {errors[1]} |")
    write_table("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
