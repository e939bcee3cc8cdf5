"""Work of `triton_packed` attention counted on the host (no GPU): per workload of encoder_bench.py,
cut into the engine's 16k-token batches, the query tiles and key blocks the kernel visits with
plain tiles (BLOCK_M tokens from 0) and with the host's tile table (`query_tile_starts`, as eager
batches and, bounded by `query_tile_capacity`, CUDA graphs get it), split into masked and unmasked
blocks (with the unmasked split on). The ideal is each sequence's L^2 query-key pairs in blocks.

    python benchmarks/attention_tile_count.py [--tokens 200000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "backend_src"), str(Path(__file__).parent)]
from encoder_bench import draw_lengths  # noqa: E402  the same length distributions

from loraembed.packed_attention_triton import (  # noqa: E402
    BLOCK_M, BLOCK_N, plain_query_tile_starts, query_tile_capacity, query_tile_starts,
)
from loraembed.packing import offsets, plan_row_batches  # noqa: E402


def key_blocks(cu_seqlens: np.ndarray, starts: np.ndarray) -> tuple[int, int, int]:
    """(tiles, masked key blocks, unmasked key blocks) the kernel visits for one batch."""
    sequence = np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens))
    tiles = masked = unmasked = 0
    for start, end in zip(starts[:-1], starts[1:]):
        if start >= min(end, cu_seqlens[-1]):
            tiles += start < end  # padding rows only: no key
            continue
        first, last = sequence[start], sequence[min(end, cu_seqlens[-1]) - 1]
        keys = cu_seqlens[last + 1] - cu_seqlens[first]
        blocks = -(-keys // BLOCK_N)
        whole = keys // BLOCK_N if first == last else 0
        tiles, masked, unmasked = tiles + 1, masked + blocks - whole, unmasked + whole
    return tiles, masked, unmasked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| workload | tiling | tiles | masked blocks | unmasked blocks | all blocks | ideal blocks |")
    print("|---|---|---|---|---|---|---|")
    for workload in ("queries", "passages", "long"):
        lengths = np.array(draw_lengths(workload, args.tokens, rng))
        batches = [lengths[rows] for rows in plan_row_batches(lengths, np.zeros_like(lengths), args.max_batch_tokens)]
        ideal = sum(float((batch.astype(np.float64) ** 2).sum()) for batch in batches) / (BLOCK_M * BLOCK_N)
        tilings = {
            "plain": lambda cu, rows: plain_query_tile_starts(rows),
            "table": lambda cu, rows: query_tile_starts(cu, rows),
            "table, graph bucket of 16,384 rows": lambda cu, rows: query_tile_starts(
                cu, args.max_batch_tokens, query_tile_capacity(args.max_batch_tokens)),
        }
        for name, tiling in tilings.items():
            totals = np.zeros(3, dtype=np.int64)
            for batch in batches:
                cu_seqlens = offsets(batch)
                totals += key_blocks(cu_seqlens, tiling(cu_seqlens, int(cu_seqlens[-1])))
            tiles, masked, unmasked = totals.tolist()
            print(f"| {workload} | {name} | {tiles:,} | {masked:,} | {unmasked:,} | {masked + unmasked:,} | {ideal:,.0f} |")


if __name__ == "__main__":
    main()
