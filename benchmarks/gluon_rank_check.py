"""The fused LoRA GEMM's kernels (Triton, Gluon) at rank capacities 16 and 32: error against the
float64 reference on segment layouts with one or several adapters per 128-row tile, then GPU time
of the Gluon GEMM with and without the expand of 64 adapters at 16k tokens (CUDA-graph replay,
`lora_kernel_sweep.microseconds`). Written for NOTES item 39: the Gluon kernel once summed rank-32
tiles of several adapters wrong. Run on a GPU from the repository root:

    PYTHONPATH=backend_src:. python benchmarks/gluon_rank_check.py [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lora_kernel_sweep import microseconds  # noqa: E402

from loraembed.lora import lora_gemm_triton as lg  # noqa: E402
from loraembed.lora.sgmv_triton import build_lora_batch_tables, sgmv_shrink  # noqa: E402
from loraembed.packing import AdapterSegment  # noqa: E402
from tests.support.lora_models import random_segments  # noqa: E402

SHAPES = ((3072, 768), (768, 3072), (768, 768))  # in, out
LAYOUTS = ((333, 9, 5), (1000, 9, 60), (77, 3, 0), (4096, 9, 0))  # tokens, slots, cuts (0: one adapter per tile)


def problem(rank, in_features, out_features, tokens, slots, cuts, layout_seed, tensor_seed):
    rng = random.Random(layout_seed)
    torch.manual_seed(tensor_seed)
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) / in_features**0.5
    bias = torch.randn(out_features, device="cuda", dtype=torch.bfloat16) * 0.1
    lora_a = torch.randn(slots, rank, in_features, device="cuda", dtype=torch.bfloat16) / in_features**0.5
    lora_b = torch.randn(slots, out_features, rank, device="cuda", dtype=torch.bfloat16) / rank**0.5
    lora_a[0], lora_b[0] = 0, 0  # slot 0 is the base model
    if cuts:
        segments = random_segments(tokens, slots, rng, cuts)
    else:
        segments = tuple(AdapterSegment(1 + (start // 128) % (slots - 1), start, min(start + 128, tokens))
                         for start in range(0, tokens, 128))
    table, token_slots, tiles = build_lora_batch_tables(segments, x.device, False, with_tile_slots=True)
    shrunk = sgmv_shrink(x, lora_a, table)
    return x, weight, bias, lora_a, lora_b, segments, token_slots, tiles, shrunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [f"card: {torch.cuda.get_device_name()}   date: {datetime.date.today().isoformat()}   "
             f"torch {torch.__version__}", "",
             "Largest error against float64, in units of the tests' tolerance (fails above 1); rows off by more.", "",
             "| rank | in → out | tokens | most adapters in a tile | Triton | Gluon | Gluon rows off |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for rank in (16, 32):
        for in_features, out_features in SHAPES:
            for tokens, slots, cuts in LAYOUTS:
                x, weight, bias, lora_a, lora_b, segments, token_slots, tiles, shrunk = problem(
                    rank, in_features, out_features, tokens, slots, cuts, tokens + cuts, tokens)
                expected = lg.lora_gemm_reference(x.double(), weight.double(), bias.double(), "identity",
                                                  lora_a.double(), lora_b.double(), out_features, segments)
                tolerance = 0.02 * expected.abs().max().item() + 0.02
                cells = []
                for kernel in ("triton", "gluon"):
                    got = lg.lora_gemm(x, weight, bias, "identity", lora_b, out_features, token_slots, tiles, shrunk,
                                       kernel=kernel).double()
                    error = (got - expected).abs()
                    cells.append(f"{error.max().item() / tolerance:.2f}")
                rows_off = int((error > tolerance + 0.02 * expected.abs()).any(1).sum())
                lines.append(f"| {rank} | {in_features} → {out_features} | {tokens} | {int(tiles[:, 0].max())} | "
                             f"{cells[0]} | {cells[1]} | {rows_off} |")
    lines += ["", "Gluon GEMM, 16,384 tokens, 64 adapters in random segments; µs per call (CUDA-graph replay).", "",
              "| rank | in → out | without LoRA | with the expand | difference |", "|---:|---|---:|---:|---:|"]
    for rank in (16, 32):
        for in_features, out_features in SHAPES[:2]:
            x, weight, bias, _, lora_b, _, token_slots, tiles, shrunk = problem(
                rank, in_features, out_features, 16384, 65, 64, 1, 1)
            plain = microseconds(lambda: lg.lora_gemm(x, weight, bias, "identity", kernel="gluon"))
            fused = microseconds(lambda: lg.lora_gemm(x, weight, bias, "identity", lora_b, out_features, token_slots,
                                                      tiles, shrunk, kernel="gluon"))
            lines.append(f"| {rank} | {in_features} → {out_features} | {plain:.1f} | {fused:.1f} | "
                         f"{fused - plain:+.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
