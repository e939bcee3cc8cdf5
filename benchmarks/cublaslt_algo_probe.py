"""Every cuBLASLt algorithm its heuristic offers for the encoder's linears, timed against torch's pick.

    python benchmarks/cublaslt_algo_probe.py [--rows 16384,16320] [--models xlmr-base,xlmr-large]
        [--candidates 8] [--out FILE]

torch's `F.linear` (bias epilogue) and `torch._addmm_activation` (GELU + bias epilogue) run the first
algorithm cuBLASLt's heuristic offers. This runs the engine's search (`cublaslt.tune_linear`, which
gemm_tuning does at load) at each row count and prints, per linear: torch's own time, the heuristic's
first candidate (torch's pick), the fastest candidate without split-K whose output equals torch's, and
whether the engine would keep it; then every timed candidate (heuristic rank, tile id, µs).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))

from lora_kernel_sweep import microseconds  # noqa: E402
from loraembed import cublaslt  # noqa: E402
from loraembed.fused_ops import linear_activation  # noqa: E402

# name -> (out features, in features, epilogue)
MODELS = {
    "xlmr-base": {"qkv": (2304, 768, None), "attention.output.dense": (768, 768, None),
                  "intermediate.dense": (3072, 768, "gelu"), "output.dense": (768, 3072, None)},
    "xlmr-large": {"qkv": (3072, 1024, None), "attention.output.dense": (1024, 1024, None),
                   "intermediate.dense": (4096, 1024, "gelu"), "output.dense": (1024, 4096, None)},
}


def torch_microseconds(rows: int, out_features: int, in_features: int, epilogue: str | None) -> float:
    """torch's own call (CUDA-graph replays, as the other probes time kernels)."""
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * in_features ** -0.5
    bias = torch.randn(out_features, device="cuda", dtype=torch.bfloat16) * 0.1
    if epilogue:
        return microseconds(lambda: linear_activation(x, weight, bias, "gelu_pytorch_tanh"))
    return microseconds(lambda: torch.nn.functional.linear(x, weight, bias))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16384,16320")
    parser.add_argument("--models", default="xlmr-base,xlmr-large")
    parser.add_argument("--candidates", type=int, default=cublaslt.CANDIDATES)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [f"card: {torch.cuda.get_device_name()}   date: {datetime.date.today().isoformat()}   torch {torch.__version__}"
             f"   bf16; candidates: CUDA events, median of {cublaslt.TIMED_ROUNDS} rounds of {cublaslt.CALLS_PER_ROUND} calls",
             "", "| model | linear | rows | torch µs (graph) | first candidate µs | fastest µs | fastest / first | TFLOP/s | kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    details = []
    for model in args.models.split(","):
        for name, (out_features, in_features, epilogue) in MODELS[model].items():
            for rows in [int(r) for r in args.rows.split(",")]:
                outcome = cublaslt.tune_linear(out_features, in_features, epilogue, rows, torch.device("cuda"),
                                               torch.bfloat16, candidates=args.candidates)
                torch_us = torch_microseconds(rows, out_features, in_features, epilogue)
                flops = 2 * rows * out_features * in_features
                lines.append(f"| {model} | {name} | {rows} | {torch_us:.1f} | {outcome.first_us:.1f} | {outcome.best_us:.1f} | "
                             f"{outcome.best_us / outcome.first_us:.3f} | {flops / outcome.best_us / 1e6:.0f} | "
                             f"{'yes' if outcome.kept else 'no'} |")
                details.append(f"{model} {name}, {rows} rows: " + ", ".join(
                    f"#{rank} (tile {tile}) {us:.1f}" for rank, tile, us in outcome.timings))
                print(lines[-1], flush=True)
    cublaslt.forget_tuning()
    text = "\n".join(lines + ["", "Timed candidates, fastest first (heuristic rank, tile id, µs):", ""]
                     + [f"- {d}" for d in details]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text("# cuBLASLt candidates against torch's pick (benchmarks/cublaslt_algo_probe.py)\n\n" + text)


if __name__ == "__main__":
    main()
