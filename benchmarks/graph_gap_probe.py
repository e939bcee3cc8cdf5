"""Where a CUDA-graph replay of one packed batch spends its time: kernels against the gaps between them.

    python benchmarks/graph_gap_probe.py [--workloads queries,passages] [--modes base,64 adapters]
        [--replays 20] [--trace-dir DIR]

For each workload it draws ~4 batches' worth of sequences (encoder_bench's lengths, random-weight
XLM-R base), keeps the batches that fill the token budget, and replays each one's CUDA graph (the
serving path's `EmbeddingEngine.pooled_batch`). It prints, per batch: the replay's wall time between
CUDA events, the sum of its kernels' durations and the idle time between them under the profiler,
the kernel count, and the kernels after the longest idle times. The eager forward of the same batch
is timed too, as encoder_bench's "forward" row runs it.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))

import encoder_bench  # noqa: E402
from loraembed.packing import PackingRows, pack_rows, plan_row_batches, to_device  # noqa: E402
from loraembed.pooling import pool  # noqa: E402


def full_batches(engine, workload: str, slots_for, rng) -> list:
    """Host arrays of the batches (at least 90% of the token budget) of ~4 budgets of `workload`."""
    budget = engine.serving.max_batch_tokens
    config = engine.settings.encoder_config
    lengths = encoder_bench.draw_lengths(workload, 4 * budget, rng)
    sequences = encoder_bench.random_sequences(lengths, config.vocab_size, rng, 0, 2)
    slots = slots_for(len(sequences))
    rows = PackingRows.of(np.concatenate(sequences).astype(np.int64), np.array(lengths), slots)
    hosts = [pack_rows(rows, selected, config.position_offset)
             for selected in plan_row_batches(rows.lengths, rows.slots, budget)]
    return [host for host in hosts if len(host.input_ids) >= 0.9 * budget]


def event_microseconds(fn, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / calls


def kernel_timeline(fn, calls: int, trace_file: Path) -> dict:
    """Kernel sum, idle time and the kernels that follow the idle time, per call, from a chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    profiler.export_chrome_trace(str(trace_file))
    events = json.loads(trace_file.read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and e.get("ph") == "X"),
                     key=lambda e: e["ts"])
    busy = sum(e["dur"] for e in kernels)
    idle_after = collections.Counter()
    idle = 0.0
    for before, after in zip(kernels, kernels[1:]):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > 0:
            idle += gap
            idle_after[after["name"][:48]] += gap
    memsets = [e for e in kernels if e.get("cat") == "gpu_memset"]
    return dict(busy=busy / calls, idle=idle / calls, kernels=len(kernels) / calls, memsets=len(memsets) / calls,
                memset_us=sum(e["dur"] for e in memsets) / calls,
                top=[(name, gap / calls) for name, gap in idle_after.most_common(6)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="queries,passages")
    parser.add_argument("--modes", default="base,64 adapters")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--trace-dir", default=None)
    args = parser.parse_args()
    encoder_bench.DEVICE = torch.device("cuda")
    workdir = Path(tempfile.mkdtemp(prefix="graph-gap-"))
    trace_dir = Path(args.trace_dir) if args.trace_dir else workdir
    trace_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = encoder_bench.build_checkpoint("xlmr-base", workdir)
    rng = np.random.default_rng(0)
    print(f"card: {torch.cuda.get_device_name()}   date: {datetime.date.today().isoformat()}   torch {torch.__version__}\n")
    print("| mode | workload | tokens | replay µs (events) | kernels µs | idle µs | kernels | memsets (µs) | eager µs | idle before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        if mode == "base":
            engine = encoder_bench.make_engine(checkpoint, "triton_packed", 16384)
            names = None
        else:
            adapters = workdir / "adapters"
            count, ranks = encoder_bench.ADAPTER_MODES[mode]
            config = AutoConfig.from_pretrained(checkpoint)
            for seed in range(count):
                name = f"r{ranks[seed % len(ranks)]}-{seed}"
                if not (adapters / name).exists():
                    encoder_bench.write_random_adapter(adapters / name, config, ranks[seed % len(ranks)], seed)
            engine, names = encoder_bench.adapter_engine(checkpoint, mode, "triton_packed", 16384, adapters)
        for workload in args.workloads.split(","):
            if names is None:
                def slots_for(count):
                    return np.zeros(count, dtype=np.int64)
            else:  # the adapters mixed uniformly over the rows
                slots = engine.adapters.acquire(set(names))

                def slots_for(count):
                    return np.array([slots[names[i % len(names)]] for i in rng.permutation(count)], dtype=np.int64)
            for number, host in enumerate(full_batches(engine, workload, slots_for, rng)[:2]):
                with torch.inference_mode():
                    for _ in range(3):  # the first call captures the graph (the second, once the cache is full)
                        engine.pooled_batch(host)
                    replay = event_microseconds(lambda: engine.pooled_batch(host), args.replays)
                    timeline = kernel_timeline(lambda: engine.pooled_batch(host), 5,
                                               trace_dir / f"trace-{mode.replace(' ', '-')}-{workload}-{number}.json")
                    batch = to_device(host, engine.device)

                    def eager():
                        engine.adapters.activate(batch)
                        pool(engine.model(batch), batch, engine.settings.pooling)

                    eager_us = event_microseconds(eager, 5)
                top = "; ".join(f"{name} {gap:.0f}" for name, gap in timeline["top"][:3])
                print(f"| {mode} | {workload} | {len(host.input_ids)} | {replay:.0f} | {timeline['busy']:.0f} | "
                      f"{timeline['idle']:.0f} | {timeline['kernels']:.0f} | {timeline['memsets']:.0f} ({timeline['memset_us']:.0f}) | "
                      f"{eager_us:.0f} | {top} |", flush=True)
            if names is not None:
                engine.adapters.release()


if __name__ == "__main__":
    main()
