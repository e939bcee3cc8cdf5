"""Attention kernels alone on packed 16k-token batches: flash-attn, PyTorch's varlen_attn and our
Triton kernel whose query tiles span several sequences (several tile shapes, with and without the
host's tile table that gives each sequence of a tile's length or more its own tiles), on the encoder
benchmark's workloads. Q/K/V are views of one fused [T, 3, heads, head_dim] projection, as the
encoder passes them. Prints a table (card, date; flash-attn is the baseline) of microseconds per
call, and each kernel's largest deviation from the SDPA reference on the first batch.

    python benchmarks/attention_bench.py [--heads 12] [--head-dim 64] [--kernels SUBSTRING,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "backend_src"), str(Path(__file__).parent)]
from encoder_bench import draw_lengths  # noqa: E402  the same length distributions
from lora_kernel_sweep import microseconds  # noqa: E402  the same timing

from loraembed.attention import sdpa_reference_attention, varlen_attention  # noqa: E402
from loraembed.packed_attention_triton import packed_attention, query_tile_starts  # noqa: E402

# (block_m, block_n, num_warps, num_stages, heads_inner, split_unmasked, tile table): packed_attention's
# launch arguments, and whether the host's tile table (query_tile_starts) cuts the tiles
TRITON_SHAPES = [
    (64, 64, 4, 3, False, False, False), (64, 64, 4, 3, True, False, False), (64, 64, 4, 3, True, True, False),
    (64, 32, 4, 3, True, False, False), (64, 32, 4, 3, True, True, False), (64, 32, 4, 2, True, True, False),
    (64, 32, 4, 4, True, True, False), (64, 16, 4, 3, True, True, False), (32, 32, 4, 3, True, True, False),
    (128, 32, 8, 3, True, True, False), (128, 64, 8, 3, True, True, False), (64, 32, 8, 3, True, True, False),
    (64, 32, 4, 3, True, False, True), (64, 32, 4, 3, True, True, True), (64, 64, 4, 3, True, True, True),
    (32, 32, 4, 3, True, True, True), (128, 32, 8, 3, True, True, True), (128, 64, 8, 3, True, True, True),
]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run under TRITON_INTERPRET=1


def packed_batch(lengths: list[int], heads: int, head_dim: int):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    sequence_index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    qkv = torch.randn(int(cu[-1]), 3, heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    return qkv, cu.to(DEVICE), sequence_index.to(DEVICE), max(lengths)


def cuda_time_us(fn) -> float:
    """GPU µs per call from CUDA-graph replays (lora_kernel_sweep.microseconds): timing launches one by
    one with events counted the host's ~100 µs per Triton launch on the H200 host."""
    if DEVICE == "cpu":
        return 1.0
    return microseconds(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--workloads", default="queries,passages,long")
    parser.add_argument("--kernels", default="", help="only kernels whose name holds one of these substrings")
    parser.add_argument("--out", default=None, help="also write the table to DIR/attention-bench.md")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    kernels = {"flash_attn": None, "torch_varlen": None}
    for shape in TRITON_SHAPES:
        name = "triton_packed %dx%d w%d s%d" % shape[:4] + " heads-inner" * shape[4] + " split" * shape[5]
        kernels[name + " tile-table" * shape[6]] = shape
    if args.kernels:
        kernels = {name: shape for name, shape in kernels.items() if any(part in name for part in args.kernels.split(","))}
    lines = [
        f"# Attention kernels alone ({args.heads} heads x {args.head_dim}, {args.tokens} tokens per batch, bf16)",
        "",
        f"card: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU (smoke run)'}   date: {datetime.date.today().isoformat()}   torch {torch.__version__}",
        "",
        "| workload | kernel | µs per call | vs flash_attn | max abs error vs SDPA |",
        "|---|---|---|---|---|",
    ]
    for workload in args.workloads.split(","):
        lengths = draw_lengths(workload, args.tokens, rng)
        while sum(lengths) > args.tokens:
            lengths.pop()
        qkv, cu, sequence_index, longest = packed_batch(lengths, args.heads, args.head_dim)
        q, k, v = qkv.unbind(1)
        reference = sdpa_reference_attention(q.float(), k.float(), v.float(), cu, longest)
        baseline = None
        for name, shape in kernels.items():
            try:
                if shape is None:
                    call = lambda name=name: varlen_attention(q, k, v, cu, longest, sequence_index, name)  # noqa: E731
                else:
                    block_m, block_n, num_warps, num_stages, heads_inner, split_unmasked, tiled = shape
                    tiles = (torch.from_numpy(query_tile_starts(cu.cpu().numpy(), len(sequence_index), None, block_m)).to(DEVICE)
                             if tiled else None)
                    call = lambda tiles=tiles, launch=dict(  # noqa: E731
                        block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                        heads_inner=heads_inner, split_unmasked=split_unmasked,
                    ): packed_attention(q, k, v, cu, sequence_index, tiles, **launch)
                error = float((call().float() - reference).abs().max())
                micros = cuda_time_us(call)
            except Exception as failure:  # e.g. flash-attn missing, or a tile shape out of shared memory
                print(f"{workload} {name}: {type(failure).__name__}: {str(failure)[:200]}", file=sys.stderr)
                continue
            baseline = baseline or micros
            lines.append(f"| {workload} ({len(lengths)} seqs) | {name} | {micros:.1f} | {baseline / micros:.2f}x | {error:.1e} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "attention-bench.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
