"""The base model's GEMM epilogues, measured kernel by kernel on one GPU (no LoRA):

- intermediate.dense + GELU: cuBLAS linear alone (the bound), the linear then an exact-GELU pass,
  cuBLASLt's GELU-bias epilogue (tanh, the encoder's default in bf16), and the Gluon GEMM of
  `lora/lora_gemm_gluon.py` without LoRA, with no, tanh and exact GELU in its epilogue;
- attention.output.dense and output.dense + residual + LayerNorm: the linear (bias in cuBLAS's
  epilogue) then the LayerNorm kernel reading output and residual (the encoder), against cuBLAS
  adding the residual as its C matrix (`torch.addmm`, beta 1) and the LayerNorm kernel adding the
  bias row instead, which reads one [T, H] tensor less; and the Gluon GEMM then the LayerNorm.

    python benchmarks/epilogue_probe.py [--tokens 16384] [--models xlmr-base,xlmr-large] [--out FILE.md]

Microseconds per call from CUDA-graph replays (lora_kernel_sweep.microseconds); errors are the
largest |y - y_fp32| over the output. Prints a table (card, date) last.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "backend_src"), str(Path(__file__).parent)]
from gelu_epilogue_bench import SHAPES, intermediate_inputs  # noqa: E402  the same inputs
from lora_kernel_sweep import microseconds, write_table  # noqa: E402  the same timing and output

from loraembed.fused_ops import add_layer_norm, linear_activation  # noqa: E402
from loraembed.lora.lora_gemm_gluon import gluon_lora_gemm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--models", default="xlmr-base,xlmr-large")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []  # (model, linear, way, µs, error)
    for model in args.models.split(","):
        hidden, intermediate = SHAPES[model]
        x, weight, bias, reference, exact, tanh = intermediate_inputs(args.tokens, hidden, intermediate, device, dtype)
        ways = {
            "cuBLAS linear alone (bound)": (lambda: F.linear(x, weight, bias), reference),
            "cuBLAS linear + exact GELU pass": (lambda: F.gelu(F.linear(x, weight, bias)), exact),
            "cuBLASLt GELU-bias epilogue, tanh (the encoder)": (
                lambda: linear_activation(x, weight, bias, "gelu_pytorch_tanh"), tanh),
            "Gluon GEMM, bias only": (lambda: gluon_lora_gemm(x, weight, bias), reference),
            "Gluon GEMM, tanh GELU epilogue": (lambda: gluon_lora_gemm(x, weight, bias, "gelu_pytorch_tanh"), tanh),
            "Gluon GEMM, exact GELU epilogue": (lambda: gluon_lora_gemm(x, weight, bias, "gelu"), exact),
        }
        for way, (run, expected) in ways.items():
            rows.append((model, "intermediate.dense", way, microseconds(run), (run().float() - expected).abs().max().item()))

        norm_weight = 1.0 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
        norm_bias = 0.1 * torch.randn(hidden, device=device, dtype=dtype)
        residual = torch.randn(args.tokens, hidden, device=device, dtype=dtype)
        for linear, in_features in (("attention.output.dense", hidden), ("output.dense", intermediate)):
            x = torch.randn(args.tokens, in_features, device=device, dtype=dtype)
            weight = torch.randn(hidden, in_features, device=device, dtype=dtype) / in_features**0.5
            bias = torch.randn(hidden, device=device, dtype=dtype) * 0.1
            expected = F.layer_norm(F.linear(x.float(), weight.float(), bias.float()) + residual.float(), (hidden,),
                                    norm_weight.float(), norm_bias.float(), 1e-5)
            ways = {
                "cuBLAS linear alone": (lambda: F.linear(x, weight, bias), None),
                "cuBLAS addmm with the residual as C, alone": (lambda: torch.addmm(residual, x, weight.t()), None),
                "residual + LayerNorm kernel alone": (
                    lambda: add_layer_norm(residual, residual, norm_weight, norm_bias, 1e-5), None),
                "bias row + LayerNorm kernel alone": (
                    lambda: add_layer_norm(residual, bias, norm_weight, norm_bias, 1e-5), None),
                "cuBLAS linear, then residual + LayerNorm (the encoder)": (
                    lambda: add_layer_norm(F.linear(x, weight, bias), residual, norm_weight, norm_bias, 1e-5), expected),
                "cuBLAS addmm (residual as C), then bias + LayerNorm": (
                    lambda: add_layer_norm(torch.addmm(residual, x, weight.t()), bias, norm_weight, norm_bias, 1e-5),
                    expected),
                "Gluon GEMM, then residual + LayerNorm": (
                    lambda: add_layer_norm(gluon_lora_gemm(x, weight, bias), residual, norm_weight, norm_bias, 1e-5),
                    expected),
            }
            for way, (run, expected_out) in ways.items():
                error = "" if expected_out is None else (run().float() - expected_out).abs().max().item()
                rows.append((model, linear, way, microseconds(run), error))
    lines = [
        f"# Base-model GEMM epilogues, {args.tokens} tokens, bf16",
        "",
        f"card: {torch.cuda.get_device_name()}   date: {datetime.date.today().isoformat()}   torch {torch.__version__}",
        "",
        "| model | linear | way | µs per call | max abs error vs fp32 |",
        "|---|---|---|---:|---:|",
    ]
    for model, linear, way, us, error in rows:
        error_text = f"{error:.1e}" if isinstance(error, float) else ""
        lines.append(f"| {model} | {linear} | {way} | {us:.1f} | {error_text} |")
    write_table("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
