"""Host-side cost of `EmbeddingEngine.embed` (validation, adapter bookkeeping, packing, result
assembly) with the device work replaced by a stub, on any machine (no GPU needed).

    python benchmarks/host_overhead_bench.py [--rows 12000] [--rows-per-request 32]
        [--requests-per-call N] [--torch-threads N] [--adapters 64]

With --adapters N (a tiny checkpoint and N PEFT adapters built under a temporary folder, all
preloaded), the workloads are also run with every row naming one of the adapters at random, as
serve_bench.sh's mixed scenarios do: the rows "(mixed adapters)" add the registry's per-batch work
(each named adapter's folder and files checked for changes on disk) to the same host work.

The GPU forward is asynchronous, so this host work adds to every batch's latency and, when the
host is slow, bounds throughput; this measures it alone, in microseconds per row and per token.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))

import loraembed.engine as engine_module  # noqa: E402
from loraembed.config import ServingConfig  # noqa: E402
from loraembed.engine import EmbeddingEngine, EncoderRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--rows-per-request", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--requests-per-call", type=int, default=0,
                        help="embed() calls of this many requests (a Triton execute's batch); 0: all in one call")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (the server's CPU instance: 1)")
    parser.add_argument("--adapters", type=int, default=0, help="also run with rows naming one of N adapters")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    adapter_ids: list[str] = []
    parameters: dict[str, str] = {}
    if args.adapters:  # serve_bench_setup's tiny checkpoint and adapters a00, a01, ...
        work = Path(tempfile.mkdtemp(prefix="host-overhead-"))
        subprocess.run([sys.executable, str(Path(__file__).with_name("serve_bench_setup.py")), "build", str(work),
                        "--model", "tiny", "--adapters", str(args.adapters)], check=True, stdout=subprocess.DEVNULL)
        adapter_ids = json.loads((work / "build.json").read_text())["adapter_ids"]
        parameters = dict(model=str(work / "model"), adapter_root=str(work / "adapters"), max_adapters=str(args.adapters),
                          adapter_preload=",".join(adapter_ids))
    engine = EmbeddingEngine(ServingConfig.from_parameters(parameters, environ={}))
    hidden = engine.hidden_size
    engine.model.forward = lambda batch: torch.empty(batch.input_ids.shape[0], hidden)  # no device work
    engine_module.pool = lambda states, batch, mode: torch.zeros(batch.num_sequences, hidden)
    rng = np.random.default_rng(0)
    rows = []
    workloads = [("queries", 16, 4, 64, False), ("passages", 120, 16, 256, False)]
    if adapter_ids:
        workloads += [("queries (mixed adapters)", 16, 4, 64, True), ("passages (mixed adapters)", 120, 16, 256, True)]
    for workload, median, low, high, mixed in workloads:
        lengths = np.clip(np.round(rng.lognormal(np.log(median), 0.6, args.rows)), low, high).astype(int)
        requests = []
        for start in range(0, len(lengths), args.rows_per_request):
            chunk = lengths[start : start + args.rows_per_request]
            ids = np.zeros((len(chunk), chunk.max()), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, length in enumerate(chunk):
                ids[row, :length] = rng.integers(1000, 2000, length)
                mask[row, :length] = 1
            adapters = rng.choice(adapter_ids, len(chunk)).tolist() if mixed else None
            requests.append(EncoderRequest(ids, mask, adapter_ids=adapters))
        per_call = args.requests_per_call or len(requests)
        calls = [requests[start : start + per_call] for start in range(0, len(requests), per_call)]
        for call in calls:
            engine.embed(call)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for call in calls:
                engine.embed(call)
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        rows.append((workload, len(requests), int(lengths.sum()), seconds))
    print(f"host: {platform.processor() or platform.machine()}   date: {datetime.date.today()}   (device work stubbed out)   "
          f"requests per call: {args.requests_per_call or 'all'}   torch threads: {torch.get_num_threads()}   "
          f"adapters: {args.adapters or 'none'}")
    print("| workload | requests | tokens | host ms | µs per row | host-bound tokens/s |\n|---|---|---|---|---|---|")
    for workload, requests, tokens, seconds in rows:
        print(f"| {workload} | {requests} | {tokens} | {seconds * 1e3:.1f} | {seconds / args.rows * 1e6:.2f} | "
              f"{tokens / seconds / 1e6:.1f}M |")


if __name__ == "__main__":
    main()
