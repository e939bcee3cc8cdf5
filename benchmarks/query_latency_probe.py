"""Latency of `EmbeddingEngine.embed` in-process for what one encoder execute gets at low
concurrency (one query, 32 passages, with and without adapters), with and without an adapter
registry (64 preloaded rank-16 adapters, as serve_bench.sh serves) and CUDA graphs, to tell
engine-side latency from the Triton stub's. Prints a table (card, date), then each case's host
profile on stderr.

    python benchmarks/query_latency_probe.py [--device cuda] [--model xlmr-base] [--adapters 64]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "backend_src"), str(Path(__file__).parent)]
import encoder_bench  # noqa: E402
from encoder_bench import build_checkpoint, write_random_adapter  # noqa: E402

from loraembed.config import ServingConfig  # noqa: E402
from loraembed.engine import EmbeddingEngine, EncoderRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="xlmr-base")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--only", help="run the configurations whose label contains one of these comma-separated parts")
    args = parser.parse_args()
    device = torch.device(args.device)
    encoder_bench.DEVICE = device
    work = Path(tempfile.mkdtemp(prefix="latency-probe-"))
    path = build_checkpoint(args.model, work)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    names = [f"a{i}" for i in range(args.adapters)]
    for seed, name in enumerate(names):
        write_random_adapter(work / "adapters" / name, config, 16, seed)
    base = {"model": str(path), "dtype": "bfloat16" if device.type == "cuda" else "float32", "pooling": "mean"}
    configurations = {
        "no registry": base,
        f"{args.adapters} adapters preloaded": {
            **base, "adapter_root": str(work / "adapters"), "adapter_preload": ",".join(names), "max_adapters": str(args.adapters),
        },
        # A batch of one adapter through the block-table plan instead of merging it per linear.
        f"{args.adapters} adapters, one adapter by block tables": {
            **base, "adapter_root": str(work / "adapters"), "adapter_preload": ",".join(names), "max_adapters": str(args.adapters),
        },
        f"{args.adapters} adapters, no CUDA graphs": {
            **base, "adapter_root": str(work / "adapters"), "adapter_preload": ",".join(names), "max_adapters": str(args.adapters),
            "cuda_graph_max_tokens": "0",
        },
    }
    rng = np.random.default_rng(0)
    query = np.array([[0, *range(1000, 1014), 2]], dtype=np.int64)
    passage_lengths = np.clip(rng.lognormal(np.log(120), 0.5, 32).astype(int), 16, 512)
    passages = np.ones((32, passage_lengths.max()), dtype=np.int64)
    for row, length in enumerate(passage_lengths):
        passages[row, :length] = [0, *rng.integers(4, config.vocab_size, length - 2), 2]
    passage_mask = (np.arange(passages.shape[1]) < passage_lengths[:, None]).astype(np.int64)
    # What one execute of the encoder model gets at concurrency 1 (one request), and a batch that
    # the dynamic batcher makes of four requests with different adapters.
    requests = {
        "one 16-token query": [EncoderRequest(query, np.ones_like(query))],
        "one query, one adapter": [EncoderRequest(query, np.ones_like(query), [names[0]] if names else None)],
        # Base batches between two CUDA-graph token buckets (the rows past the batch are computed too).
        f"32 passages ({passage_lengths.sum()} tokens)": [EncoderRequest(passages, passage_mask)],
        f"3 x 32 passages ({3 * passage_lengths.sum()} tokens)": [EncoderRequest(passages, passage_mask)] * 3,
        f"8 passages ({passage_lengths[:8].sum()} tokens), one adapter": [
            EncoderRequest(passages[:8], passage_mask[:8], [names[0]] if names else None)],
        f"32 passages ({passage_lengths.sum()} tokens), one adapter": [
            EncoderRequest(passages, passage_mask, [names[0]] if names else None)],
        f"4 x 32 passages ({4 * passage_lengths.sum()} tokens), one adapter": [
            EncoderRequest(passages, passage_mask, [names[0]] if names else None)] * 4,
        "4 queries, 4 adapters": [
            EncoderRequest(query, np.ones_like(query), [names[i % len(names)]] if names else None) for i in range(4)],
        f"4 x 2 passages ({passage_lengths[:8].sum()} tokens), 4 adapters": [
            EncoderRequest(passages[i:8:4], passage_mask[i:8:4], [names[i % len(names)]] if names else None)
            for i in range(4)],
        "4 x 8 passages, 4 adapters": [
            EncoderRequest(passages[i::4], passage_mask[i::4], [names[i % len(names)]] if names else None)
            for i in range(4)],
    }
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    # Each row is printed as soon as it is measured: a run cut short keeps what it measured.
    print(f"card: {card}   date: {datetime.date.today().isoformat()}   torch {torch.__version__}", "",
          "| configuration | request | p50 ms | p90 ms | host profile top (tottime) |", "|---|---|---|---|---|",
          sep="\n", flush=True)
    profiles = []
    for label, parameters in configurations.items():
        if args.only and not any(part in label for part in args.only.split(",")):
            continue
        engine = EmbeddingEngine(ServingConfig.from_parameters(parameters, environ={}), device)
        if "block tables" in label:
            engine.adapters.layers.merge_single_adapter = False
        for request_label, batch in requests.items():
            if "adapter" in request_label and "adapter_root" not in parameters:
                continue
            for _ in range(10):
                engine.embed(batch)
            times = []
            for _ in range(args.calls):
                start = time.perf_counter()
                engine.embed(batch)
                times.append((time.perf_counter() - start) * 1e3)
            profiler = cProfile.Profile()
            for _ in range(20):
                profiler.runcall(engine.embed, batch)
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
            stats.print_stats(12)
            top = max(stats.stats.items(), key=lambda item: item[1][2])[0]
            profiles.append(f"## {label}, {request_label}\n\n{text.getvalue()}")
            print(f"| {label} | {request_label} | {np.percentile(times, 50):.2f} | {np.percentile(times, 90):.2f} | "
                  f"{top[2]} ({Path(top[0]).name}:{top[1]}) |", flush=True)
        del engine
    print("\n\n".join(profiles), file=sys.stderr)


if __name__ == "__main__":
    main()
