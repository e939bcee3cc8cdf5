"""How serve_bench.sh's passage traffic meets the encoder's CUDA graph cache, on the CPU (no GPU, no
server): the buckets replayed, the captures and evictions, the share of tokens that run eagerly.

    python benchmarks/graph_cache_sim.py [--max-graphs 32] [--instances 3] [--seed 1]

The traffic: requests of 32 passages (token lengths lognormal, median 116, sigma 0.7, 16 to 512: ~146
on average, like serve_bench's passages), each request of the mixed scenario naming one of 64
adapters. Executions hold a Poisson number of requests (means of 25, 6 and 25: perf_analyzer's
requests per execution at concurrency 128 and 64 in NOTES item 50, for a warm-up and the two
levels), each sent to a random instance. Base, then mixed, as serve_bench runs them, on the same
instances. Each execution is planned into forward passes by the engine's own `plan_row_batches` and
`pack_rows`; each pass goes through the real `GraphedForward.bucket` and `graph_of` (the admission and
eviction rules), with captures stubbed and a LoRA stand-in whose kernels cover every adapter with the
fused expand (sm_90). Captures are counted, not timed: on a GPU each runs the forward twice and
captures it once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))

from loraembed.cuda_graphs import MAX_GRAPHS, GraphedForward  # noqa: E402
from loraembed.lora.layers import LoraLayers  # noqa: E402
from loraembed.packing import PackingRows, pack_rows, plan_row_batches  # noqa: E402

MAX_BATCH_TOKENS, MAX_SEQ_LEN, ADAPTERS, TEXTS_PER_REQUEST = 16384, 512, 64, 32
PHASES = ((25, 60), (6, 250), (25, 60))  # (mean requests per execution, executions)


class CoveringLoraLayers:
    """`LoraLayers.graph_plan` where the kernels cover every adapter (no weights), fused expand on."""

    num_slots = ADAPTERS + 1
    buffer_generation = 0
    use_block_tables = merge_single_adapter = fuse_expand = True
    graph_plan = LoraLayers.graph_plan

    def __init__(self) -> None:
        self.linears, self._kernels_cover = {}, (-1, False)


def graph_cache(max_graphs: int, counts: dict) -> GraphedForward:
    """A GraphedForward with its real bucket and admission rules and nothing on a device."""
    cache = GraphedForward.cache_rules_only(SimpleNamespace(attention_backend="triton_packed"), MAX_BATCH_TOKENS,
                                            MAX_SEQ_LEN, CoveringLoraLayers(), max_graphs)

    def capture(key):  # as `_capture`, which keeps the graph it makes
        counts["captures"] += 1
        cache.graphs[key] = key
        return key

    cache._capture = capture
    cache._drop = cache.graphs.pop
    return cache


def run(mixed: bool, caches: list[GraphedForward], counts: dict, rng: np.random.Generator) -> set:
    keys = set()
    for mean_requests, executions in PHASES:
        for _ in range(executions):
            requests = max(1, rng.poisson(mean_requests))
            lengths = np.clip(rng.lognormal(np.log(116), 0.7, TEXTS_PER_REQUEST * requests), 16, MAX_SEQ_LEN).astype(np.int64)
            adapters = rng.integers(1, ADAPTERS + 1, requests) if mixed else np.zeros(requests, dtype=np.int64)
            slots = np.repeat(adapters, TEXTS_PER_REQUEST)
            rows = PackingRows.concatenate([np.full(int(lengths.sum()), 5, dtype=np.int64)], [lengths], [slots])
            cache = caches[rng.integers(len(caches))]
            for selected in plan_row_batches(rows.lengths, rows.slots, MAX_BATCH_TOKENS):
                host = pack_rows(rows, selected, 2)
                tokens = len(host.input_ids)
                key = cache.bucket(host)
                counts["tokens"] += tokens
                if key is None:
                    counts["eager_tokens"] += tokens
                    continue
                keys.add(key)
                cache.graph_of(key)
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-graphs", type=int, default=MAX_GRAPHS, help="cuda_graph_max_graphs")
    parser.add_argument("--instances", type=int, default=3, help="encoder instances (the entrypoint's GPU default)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    counts = {}
    caches = [graph_cache(args.max_graphs, counts) for _ in range(args.instances)]
    print(f"cuda_graph_max_graphs={args.max_graphs}, {args.instances} instances, seed {args.seed}\n")
    print("| scenario | buckets replayed | captures | evictions | tokens run eagerly |")
    print("|---|---:|---:|---:|---:|")
    for mixed in (False, True):
        counts.update(captures=0, tokens=0, eager_tokens=0)
        evictions_before = sum(cache.evictions for cache in caches)
        keys = run(mixed, caches, counts, rng)
        evictions = sum(cache.evictions for cache in caches) - evictions_before
        print(f"| {'mixed adapters' if mixed else 'base'} | {len(keys)} | {counts['captures']} | {evictions} |"
              f" {counts['eager_tokens'] / counts['tokens']:.1%} |")


if __name__ == "__main__":
    main()
