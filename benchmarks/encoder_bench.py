"""In-process encoder throughput on one GPU, against `transformers` measured in the same run.

    python benchmarks/encoder_bench.py [--models xlmr-base,xlmr-large,minilm] [--modes base,...]
        [--attention flash_attn,torch_varlen] [--tokens 400000] [--out benchmarks]

Workloads (token lengths drawn once, arrival order random): queries (lognormal, median 16, 4-64),
passages (median 120, 16-512), long (median 400, up to 512). Our engine packs at most
--max-batch-tokens tokens per forward. Baselines: transformers fp16 + SDPA on padded batches of 64
in arrival order, and on length-sorted batches of 256 (what sentence-transformers does offline).
Prints a table (tokens/s, sequences/s, share of the matmul bound, peak memory) with the card and
the date, and writes RESULTS-encoder.md and a PNG plot under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend_src"))

from loraembed.config import ServingConfig  # noqa: E402
from loraembed.engine import EmbeddingEngine, EncoderRequest  # noqa: E402
from loraembed.packing import SequenceRef, build_packed_batch, plan_batches  # noqa: E402
from loraembed.pooling import pool  # noqa: E402

MATMUL_BOUND_FLOPS = 790e12  # bf16 dense matmul measured on the H100 (ENVIRONMENT.md)
WORKLOADS = {
    "queries": dict(median=16, low=4, high=64, sigma=0.6),
    "passages": dict(median=120, low=16, high=512, sigma=0.7),
    "long": dict(median=400, low=64, high=512, sigma=0.3),
}
MODELS = {
    "xlmr-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "xlmr-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def draw_lengths(workload: str, total_tokens: int, rng: np.random.Generator) -> list[int]:
    spec = WORKLOADS[workload]
    lengths: list[int] = []
    while sum(lengths) < total_tokens:
        draw = rng.lognormal(math.log(spec["median"]), spec["sigma"], 4096)
        lengths += np.clip(np.round(draw), spec["low"], spec["high"]).astype(int).tolist()
    out, running = [], 0
    for length in lengths:
        if running >= total_tokens:
            break
        out.append(length)
        running += length
    return out


def random_sequences(lengths: list[int], vocab_size: int, rng: np.random.Generator, bos: int, eos: int) -> list[np.ndarray]:
    return [np.concatenate([[bos], rng.integers(5, vocab_size, n - 2), [eos]]).astype(np.int64) for n in lengths]


def build_checkpoint(name: str, folder: Path) -> Path:
    """Random-weight checkpoints of the real sizes (weights do not change the speed; the GPU host
    has no copy of all-MiniLM-L6-v2, so "minilm" is a random BERT with its config)."""
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    if name == "minilm":
        config = BertConfig(vocab_size=30522, max_position_embeddings=512, **MODELS[name])
        model = BertModel(config)
    else:
        config = XLMRobertaConfig(
            vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, **MODELS[name]
        )
        model = XLMRobertaModel(config)
    path = folder / name
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def encoder_flops(config, lengths: list[int]) -> float:
    """Matmul FLOPs of one pass: 2*T*(4H^2 + 2HI) per layer for the linears + 4*H*sum(L^2) attention."""
    tokens = sum(lengths)
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    linear = 2 * tokens * (4 * hidden * hidden + 2 * hidden * inter)
    attention = 4 * hidden * sum(n * n for n in lengths)
    return layers * (linear + attention)


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs, after one warm-up run."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_engine(
    engine: EmbeddingEngine, sequences: list[np.ndarray], adapter_ids: list[str], repeats: int, profile_file: Path | None = None
) -> dict:
    """Forward passes on pre-packed batches ("forward") and the full `embed` path from id arrays ("engine")."""
    refs = [SequenceRef(0, row, tokens, 0) for row, tokens in enumerate(sequences)]
    slots = engine.adapters.acquire(set(adapter_ids))
    refs = [SequenceRef(0, row, tokens, slots[adapter_ids[row]]) for row, tokens in enumerate(sequences)]
    offset = engine.settings.encoder_config.position_offset
    batches = [build_packed_batch(group, offset, engine.device) for group in plan_batches(refs, engine.serving.max_batch_tokens)]

    @torch.inference_mode()
    def forward_only():
        for batch in batches:
            engine.adapters.activate(batch)
            pool(engine.model(batch), batch, engine.settings.pooling)

    torch.cuda.reset_peak_memory_stats()
    forward_seconds = timed(forward_only, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30
    if profile_file is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            forward_only()
            torch.cuda.synchronize()
        profile_file.write_text(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    engine.adapters.release()

    # The serving path: requests of 32 rows each, right-padded arrays as the encoder model gets them.
    requests = []
    for start in range(0, len(sequences), 32):
        chunk = sequences[start : start + 32]
        ids = np.zeros((len(chunk), max(map(len, chunk))), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        requests.append(EncoderRequest(ids, mask, adapter_ids[start : start + 32]))
    engine_seconds = timed(lambda: engine.embed(requests), repeats)
    return dict(forward_s=forward_seconds, engine_s=engine_seconds, peak_gib=peak)


def measure_transformers(path: Path, sequences: list[np.ndarray], batch_size: int, sort: bool, pad_id: int, repeats: int) -> dict:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float16, attn_implementation="sdpa").cuda().eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i])) if sort else list(range(len(sequences)))
    padded = []
    for start in range(0, len(order), batch_size):
        chunk = [sequences[i] for i in order[start : start + batch_size]]
        ids = torch.full((len(chunk), max(map(len, chunk))), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = torch.from_numpy(tokens)
            mask[row, : len(tokens)] = 1
        padded.append((ids.cuda(), mask.cuda()))

    @torch.inference_mode()
    def run():
        for ids, mask in padded:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask[..., None].to(hidden.dtype)
            (hidden * weights).sum(1) / weights.sum(1)

    torch.cuda.reset_peak_memory_stats()
    seconds = timed(run, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return dict(forward_s=seconds, peak_gib=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="xlmr-base,xlmr-large,minilm")
    parser.add_argument("--workloads", default="queries,passages,long")
    parser.add_argument("--attention", default="flash_attn,torch_varlen")
    parser.add_argument("--tokens", type=int, default=400_000, help="tokens per workload")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baselines", default="arrival64,sorted256")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--profile", action="store_true", help="write a kernel profile of each forward measurement to --out")
    args = parser.parse_args()

    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    rng = np.random.default_rng(0)
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="encoder-bench-"))
    for model_name in args.models.split(","):
        path = build_checkpoint(model_name, workdir)
        for workload in args.workloads.split(","):
            lengths = draw_lengths(workload, args.tokens, rng)
            if model_name == "minilm":
                lengths = [min(n, 256) for n in lengths]
            tokens = sum(lengths)
            for attention in args.attention.split(","):
                try:
                    engine = EmbeddingEngine(
                        ServingConfig.from_parameters(
                            {"model": str(path), "dtype": "bfloat16", "attention": attention,
                             "max_batch_tokens": str(args.max_batch_tokens)}, environ={}),
                        "cuda",
                    )
                except Exception as error:  # e.g. flash-attn not installed
                    print(f"skip {model_name}/{attention}: {error}", file=sys.stderr)
                    continue
                config = engine.settings.encoder_config
                sequences = random_sequences(lengths, config.vocab_size, rng, 0 if config.position_offset else 101, 2 if config.position_offset else 102)
                flops = encoder_flops(config, lengths)
                profile_file = Path(args.out) / f"profile-{model_name}-{workload}-{attention}.txt" if args.profile else None
                result = measure_engine(engine, sequences, [""] * len(sequences), args.repeats, profile_file)
                for kind in ("forward", "engine"):
                    seconds = result[f"{kind}_s"]
                    rows.append(dict(model=model_name, workload=workload, mode="base", system=f"loraembed {kind} ({attention})",
                                     tokens_per_s=tokens / seconds, seqs_per_s=len(lengths) / seconds,
                                     bound_share=flops / seconds / MATMUL_BOUND_FLOPS, peak_gib=result["peak_gib"]))
                del engine
                torch.cuda.empty_cache()
            for baseline in args.baselines.split(","):
                if not baseline:
                    continue
                batch_size, sort = (64, False) if baseline == "arrival64" else (256, True)
                sequences = random_sequences(lengths, 30000, rng, 0, 2)
                result = measure_transformers(path, sequences, batch_size, sort, 1 if model_name != "minilm" else 0, args.repeats)
                seconds = result["forward_s"]
                rows.append(dict(model=model_name, workload=workload, mode="base", system=f"transformers fp16 {baseline}",
                                 tokens_per_s=tokens / seconds, seqs_per_s=len(lengths) / seconds,
                                 bound_share=encoder_flops(config, lengths) / seconds / MATMUL_BOUND_FLOPS,
                                 peak_gib=result["peak_gib"]))
            report(rows, card, date, Path(args.out))  # after every workload: a crash keeps what was measured


def report(rows: list[dict], card: str, date: str, out: Path) -> None:
    header = f"card: {card}   date: {date}   torch {torch.__version__}"
    lines = [header, "", "| model | workload | mode | system | tokens/s | seqs/s | matmul bound | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['workload']} | {row['mode']} | {row['system']} | {row['tokens_per_s'] / 1e6:.2f}M | "
            f"{row['seqs_per_s']:,.0f} | {row['bound_share']:.0%} | {row['peak_gib']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS-encoder.md").write_text("# Encoder benchmark (benchmarks/encoder_bench.py)\n\n" + text + "\n")
    (out / "encoder_bench.json").write_text(json.dumps(dict(card=card, date=date, rows=rows), indent=1))
    try:
        plot(rows, card, date, out / "encoder_bench.png")
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)


def plot(rows: list[dict], card: str, date: str, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["workload"]) for r in rows if r["mode"] == "base"})
    systems = sorted({r["system"] for r in rows if r["mode"] == "base"})
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 1.4), 4.5))
    width = 0.8 / max(len(systems), 1)
    for index, system in enumerate(systems):
        values = [next((r["tokens_per_s"] / 1e6 for r in rows if (r["model"], r["workload"]) == g and r["system"] == system and r["mode"] == "base"), 0) for g in groups]
        ax.bar([i + index * width for i in range(len(groups))], values, width, label=system)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{m}\n{w}" for m, w in groups])
    ax.set_ylabel("million tokens/s")
    ax.set_title(f"Encoder throughput, base model ({card}, {date})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


if __name__ == "__main__":
    main()
