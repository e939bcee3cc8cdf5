"""LoRA paths on one GPU: the layer stack of a random-weight XLM-R base (12 x 768, bf16) over one
packed batch of 16,384 tokens, for base rows only, every row on 1 adapter, and 64 rank-16 adapters
on all six targets mixed uniformly; three LoRA paths in the same run.

    python benchmarks/lora_fusion_bench.py [--workloads queries,passages] [--repeats 20]
        [--attention auto] [--gelu-approximation auto] [--out FILE.md]
    python benchmarks/lora_fusion_bench.py --device cpu --layers 2 --hidden 64 --tokens 500 --adapters 4
        (a smoke run of this program without a GPU: CPU reference paths, host clock only)

Paths (`LoraLayers` flags, see lora/layers.py): "old" = base GEMM, shrink and expand into every
output (read-modify-write), then GELU / residual + LayerNorm; "new" = the expand of
attention.output.dense, intermediate.dense and output.dense fused into their consumer kernel, and a
batch of one adapter merged per linear (W + B A into a scratch weight, one GEMM, no shrink/expand);
"fused" (the default on an sm_90 GPU) = "new", but mixed-adapter batches run the shrink and then
a Triton GEMM that adds the expand in its epilogue, activation after (lora/lora_gemm_triton.py).

Columns: "wall" = CUDA events around back-to-back forwards (what one stream gets, host launch gaps
included); "GPU" = the same forward queued behind a sleep kernel, so the device never waits for the
host (device time only); "host" = time to queue one forward (planning the batch included);
"kernels" = device operations per forward (profiler). Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))

from loraembed.attention import select_attention_backend  # noqa: E402
from loraembed.config import EncoderConfig  # noqa: E402
from loraembed.encoder import PackedEncoder  # noqa: E402
from loraembed.engine import resolve_gelu_approximation  # noqa: E402
from loraembed.lora.layers import LoraLayers  # noqa: E402
from loraembed.packing import SequenceRef, build_packed_batch  # noqa: E402

WORKLOADS = {  # as encoder_bench.py: lognormal token lengths
    "queries": dict(median=16, low=4, high=64, sigma=0.6),
    "passages": dict(median=120, low=16, high=512, sigma=0.7),
}
PATHS = {  # (use_block_tables, defer_expand, merge_single_adapter, fuse_expand)
    "old": (True, False, False, False),
    "new": (True, True, True, False),
    "fused": (True, True, True, True),
}


def draw_lengths(workload: str, total_tokens: int, rng: np.random.Generator) -> list[int]:
    spec = WORKLOADS[workload]
    lengths, used = [], 0
    while True:
        length = int(np.clip(round(rng.lognormal(math.log(spec["median"]), spec["sigma"])), spec["low"], spec["high"]))
        if used + length > total_tokens:
            return lengths
        lengths.append(length)
        used += length


DEVICE = torch.device("cuda")


def build_model(args) -> tuple[PackedEncoder, LoraLayers]:
    config = EncoderConfig.from_hf(dict(
        model_type="xlm-roberta", vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden, max_position_embeddings=514,
        type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
    ))
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    config = config.with_gelu_approximation(resolve_gelu_approximation(args.gelu_approximation, DEVICE, dtype))
    torch.manual_seed(0)
    with DEVICE:
        model = PackedEncoder(config, args.attention)
    model = model.to(torch.bfloat16 if DEVICE.type == "cuda" else torch.float32).eval().requires_grad_(False)
    layers = LoraLayers(model, num_slots=args.adapters + 1)
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    for slot in range(1, args.adapters + 1):  # rank-16 LoRA on all six targets of every layer
        for target in layers.targets.values():
            lora_a = torch.randn(args.rank, target.in_features, device=DEVICE, generator=generator)
            lora_b = torch.randn(target.out_features, args.rank, device=DEVICE, generator=generator) * 0.01
            lora_a /= target.in_features**0.5
            layers.linears[target.linear_name].set_slot(slot, target.slice_index, lora_a, lora_b)
    return model, layers


def make_batch(lengths: list[int], slots: list[int], rng: np.random.Generator):
    """Rows grouped by slot (stable), as the engine's planner orders them."""
    order = np.argsort(np.array(slots), kind="stable")
    refs = [SequenceRef(0, int(row), rng.integers(5, 1000, lengths[row]).astype(np.int64), int(slots[row]))
            for row in order]
    return build_packed_batch(refs, position_offset=2, device=DEVICE)


def measure(forward, repeats: int) -> dict:
    for _ in range(3):  # Triton compiles, cuBLAS picks algorithms
        forward()
    if DEVICE.type != "cuda":  # smoke run: the host clock
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward()
            times.append((time.perf_counter() - started) * 1e3)
        return dict(wall=statistics.median(times), gpu=float("nan"), host=statistics.median(times))
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):  # back to back, as a serving loop queues them
        start.record()
        forward()
        end.record()
    torch.cuda.synchronize()
    wall = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Hold the device for longer than the host needs to queue the forward (~2 GHz clock).
        torch.cuda._sleep(int(2e6 * (2 * (max(host) if host else 50.0) + 5)))
        start.record()
        queued = time.perf_counter()
        forward()
        host.append((time.perf_counter() - queued) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return dict(wall=wall, gpu=statistics.median(gpu), host=statistics.median(host))


def count_device_ops(forward) -> int:
    from torch.profiler import ProfilerActivity, profile

    if DEVICE.type != "cuda":
        return 0
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        forward()
        torch.cuda.synchronize()
    return sum(1 for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="queries,passages")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--attention", default="auto", help="as the engine's `attention` parameter")
    parser.add_argument("--out", default="", help="also write the table to this Markdown file")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gelu-approximation", default="auto", help="as the engine's `gelu_approximation` parameter")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type != "cuda":  # the smoke run: every LoRA path on its CPU reference
        args.repeats = min(args.repeats, 2)
    args.attention = select_attention_backend(args.attention, DEVICE, torch.bfloat16)  # "auto": the engine's pick

    model, layers = build_model(args)
    rng = np.random.default_rng(0)
    rows = []
    for workload in args.workloads.split(","):
        lengths = draw_lengths(workload, args.tokens, rng)
        modes = {
            "base": [0] * len(lengths),
            "1 adapter": [1] * len(lengths),
            f"{args.adapters} adapters": rng.integers(1, args.adapters + 1, len(lengths)).tolist(),
        }
        for mode, slots in modes.items():
            batch = make_batch(lengths, slots, rng)
            with torch.inference_mode():
                hidden = model.embeddings(batch.input_ids, batch.position_ids)  # [T, H]
            outputs = {}
            for path, flags in PATHS.items():
                if (mode == "base" and path != "old") or (mode == "1 adapter" and path == "fused"):
                    continue  # base batches take the plain path, one-adapter batches "new"'s merge, either way
                path = "plain" if mode == "base" else path
                layers.use_block_tables, layers.defer_expand, layers.merge_single_adapter, layers.fuse_expand = flags

                @torch.inference_mode()
                def forward(batch=batch, hidden=hidden):
                    layers.activate(batch.adapter_segments)  # per-batch planning, as the engine does
                    for layer in model.encoder.layer:
                        hidden = layer(hidden, batch, args.attention)
                    return hidden

                outputs[path] = forward().float()
                timing = measure(forward, args.repeats)
                timing["ops"] = count_device_ops(forward)
                rows.append(dict(workload=workload, mode=mode, path=path, tokens=sum(lengths), **timing))
                print(f"{workload:8s} {mode:12s} {path}: wall {timing['wall']:.2f} ms, GPU {timing['gpu']:.2f} ms, "
                      f"host {timing['host']:.2f} ms, {timing['ops']} device ops", flush=True)
            layers.deactivate()
            for path in ("new", "fused"):  # the paths compute the same thing
                if path in outputs:
                    old, other = outputs["old"], outputs[path]
                    print(f"         {mode}: {path} vs old relative difference "
                          f"{((other - old).norm() / old.norm()).item():.2e}")
    report(rows, args, model.config.hidden_act)


def report(rows: list[dict], args, activation: str) -> None:
    card = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (smoke run)"
    lines = [
        f"card: {card}   date: {datetime.date.today().isoformat()}   torch {torch.__version__}   "
        f"attention {args.attention}   activation {activation}   {args.layers} layers x {args.hidden}, rank {args.rank}, "
        f"{'bf16' if DEVICE.type == 'cuda' else 'fp32'}",
        "",
        "| workload | mode | path | tokens | wall ms | GPU ms | host ms | device ops | M tokens/s (wall) "
        "| % of base (wall) | % of base (GPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(r for r in rows if r["workload"] == row["workload"] and r["mode"] == "base")
        lines.append(
            f"| {row['workload']} | {row['mode']} | {row['path']} | {row['tokens']} | {row['wall']:.2f} | "
            f"{row['gpu']:.2f} | {row['host']:.2f} | {row['ops']} | {row['tokens'] / row['wall'] / 1e3:.2f} | "
            f"{base['wall'] / row['wall']:.0%} | {base['gpu'] / row['gpu']:.0%} |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# LoRA fusion benchmark (benchmarks/lora_fusion_bench.py)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
