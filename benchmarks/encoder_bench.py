"""In-process encoder throughput on one GPU, against `transformers` measured in the same run.

    python benchmarks/encoder_bench.py [--models xlmr-base,xlmr-large,minilm] [--modes base,...]
        [--attention flash_attn,torch_varlen] [--gelu-approximation auto,none] [--lora-expand fused,consumer]
        [--tokens 400000] [--out benchmarks]

Workloads (token lengths drawn once, arrival order random): queries (lognormal, median 16, 4-64),
passages (median 120, 16-512), long (median 400, up to 512). Our engine packs at most
--max-batch-tokens tokens per forward. Baselines: transformers fp16 + SDPA on padded batches of 64
in arrival order, and on length-sorted batches of 256 (what sentence-transformers does offline).
Each of our systems gets three rows: eager forward passes on pre-packed batches ("forward"), the
engine's batches replayed as the serving path's CUDA graphs ("forward, CUDA graphs"), and the
whole `embed()` call from id arrays ("engine"). Prints a table (tokens/s, sequences/s, share of the matmul bound, peak memory) with the card and
the date, and writes RESULTS.md and a PNG plot under --out. The engine's default GELU (auto: the
tanh approximation in the GEMM's epilogue in bf16 on a GPU) unless --gelu-approximation says others.
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

from loraembed.attention import select_attention_backend  # noqa: E402
from loraembed.config import ServingConfig  # noqa: E402
from loraembed.engine import EmbeddingEngine, EncoderRequest  # noqa: E402
from loraembed.packing import (  # noqa: E402
    PackingRows,
    SequenceRef,
    build_packed_batch,
    pack_rows,
    plan_batches,
    plan_row_batches,
)
from loraembed.pooling import pool  # noqa: E402

GELU_LABELS = {"auto": "", "none": ", exact GELU", "tanh": ", tanh GELU"}  # the system column per gelu_approximation
# The system column per --lora-expand: where mixed-adapter batches add the LoRA expand.
EXPAND_LABELS = {"fused": "", "consumer": ", expand in consumer kernels"}
# The system column's first words per measure_engine timing: eager forward passes on pre-packed
# batches, the same passes replayed as the serving path's CUDA graphs, and the whole embed() call.
KIND_LABELS = {"forward": "forward", "graphs": "forward, CUDA graphs", "engine": "engine"}
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


ALL_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
# mode -> (number of distinct adapters, their ranks cycled); "merged" merges one rank-16 adapter.
ADAPTER_MODES = {
    "base": (0, ()),
    "1 adapter": (1, (16,)),
    "8 adapters": (8, (16,)),
    "64 adapters": (64, (16,)),
    "ranks 8/16/64": (24, (8, 16, 64)),
    "merged": (1, (16,)),
}


def write_random_adapter(folder: Path, config, rank: int, seed: int) -> None:
    """A PEFT-format rank-`rank` LoRA on all six targets of every layer, with random A and B."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "attention.self.query": (config.hidden_size, config.hidden_size),
        "attention.self.key": (config.hidden_size, config.hidden_size),
        "attention.self.value": (config.hidden_size, config.hidden_size),
        "attention.output.dense": (config.hidden_size, config.hidden_size),
        "intermediate.dense": (config.hidden_size, config.intermediate_size),
        "output.dense": (config.intermediate_size, config.hidden_size),
    }
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.encoder.layer.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) / fan_in**0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.01).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(ALL_TARGETS),
        "bias": "none", "use_dora": False, "use_rslora": False, "modules_to_save": None,
    }))


def encoder_flops(config, lengths: list[int]) -> float:
    """Matmul FLOPs of one pass: 2*T*(4H^2 + 2HI) per layer for the linears + 4*H*sum(L^2) attention."""
    tokens = sum(lengths)
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    linear = 2 * tokens * (4 * hidden * hidden + 2 * hidden * inter)
    attention = 4 * hidden * sum(n * n for n in lengths)
    return layers * (linear + attention)


DEVICE = torch.device("cuda")  # --device cpu: a smoke run of this program on a machine without a GPU


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")


def empty_cache() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs, after one warm-up run."""
    fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
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

    reset_peak_memory()
    forward_seconds = timed(forward_only, repeats)
    peak = peak_memory_gib()

    # The same forward passes as the serving path runs them: the engine's batches, each replayed as
    # a CUDA graph of its bucket (captured in timed()'s warm-up run), without embed()'s validation,
    # its final copy to the host and normalization. Eager launches bound the "forward" row on hosts
    # whose CPU needs ~100 µs per Triton launch (NOTES item 45); this row is the device's rate.
    graphs_seconds = None
    if engine.graphed is not None:
        rows = PackingRows.of(np.concatenate(sequences).astype(np.int64), np.array([len(s) for s in sequences]),
                              np.array([slots[a] for a in adapter_ids], dtype=np.int64))
        hosts = [pack_rows(rows, selected, offset)
                 for selected in plan_row_batches(rows.lengths, rows.slots, engine.serving.max_batch_tokens)]

        def graphed_forward():
            for host in hosts:
                engine.pooled_batch(host)  # eager where no graph applies (see GraphedForward.bucket)

        graphed_forward()  # a bucket seen for the first time when the graph cache is full is run eagerly
        graphs_seconds = timed(graphed_forward, repeats)
    if profile_file is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            forward_only()
            synchronize()
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
    if profile_file is not None:  # the device kernels of embed() (CUDA graphs where they apply)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            engine.embed(requests)
            synchronize()
        table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        profile_file.with_name(profile_file.stem + "-engine.txt").write_text(table)
    if profile_file is not None:  # where the host's time goes in embed() (Python functions)
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(engine.embed, requests)
        synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        profile_file.with_name(profile_file.stem + "-host.txt").write_text(text.getvalue())
    return dict(forward_s=forward_seconds, graphs_s=graphs_seconds, engine_s=engine_seconds, peak_gib=peak)


def measure_transformers(path: Path, sequences: list[np.ndarray], batch_size: int, sort: bool, pad_id: int, repeats: int) -> dict:
    from transformers import AutoModel

    half = torch.float16 if DEVICE.type == "cuda" else torch.float32
    model = AutoModel.from_pretrained(path, dtype=half, attn_implementation="sdpa").to(DEVICE).eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i])) if sort else list(range(len(sequences)))
    padded = []
    for start in range(0, len(order), batch_size):
        chunk = [sequences[i] for i in order[start : start + batch_size]]
        ids = torch.full((len(chunk), max(map(len, chunk))), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = torch.from_numpy(tokens)
            mask[row, : len(tokens)] = 1
        padded.append((ids.to(DEVICE), mask.to(DEVICE)))

    @torch.inference_mode()
    def run():
        for ids, mask in padded:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask[..., None].to(hidden.dtype)
            (hidden * weights).sum(1) / weights.sum(1)

    reset_peak_memory()
    seconds = timed(run, repeats)
    peak = peak_memory_gib()
    del model
    empty_cache()
    return dict(forward_s=seconds, peak_gib=peak)


ENGINE_PARAMETERS: dict[str, str] = {}  # --parameter NAME=VALUE: serving parameters of every engine
GEMM_TUNING: dict[str, str] = {}  # model -> its first engine's gemm_tuning outcome (RESULTS.md)


def make_engine(path: Path, attention: str, max_batch_tokens: int, **parameters: str) -> EmbeddingEngine:
    return EmbeddingEngine(
        ServingConfig.from_parameters(
            {"model": str(path), "dtype": "bfloat16" if DEVICE.type == "cuda" else "float32", "attention": attention, "max_batch_tokens": str(max_batch_tokens),
             **ENGINE_PARAMETERS, **parameters},
            environ={},
        ),
        DEVICE,
    )


def adapter_engine(path: Path, mode: str, attention: str, max_batch_tokens: int, adapter_root: Path) -> tuple[EmbeddingEngine, list[str]]:
    """An engine for an adapter mode and the adapter ids its requests draw from."""
    count, ranks = ADAPTER_MODES[mode]
    names = [f"r{ranks[i % len(ranks)]}-{i}" for i in range(count)]
    if mode == "merged":
        return make_engine(path, attention, max_batch_tokens, merge_adapter=names[0], adapter_root=str(adapter_root)), [""]
    return make_engine(path, attention, max_batch_tokens, adapter_root=str(adapter_root), max_adapters="64"), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="xlmr-base,xlmr-large,minilm")
    parser.add_argument("--workloads", default="queries,passages,long")
    parser.add_argument("--attention", default="triton_packed,flash_attn", help="the first also runs the adapter modes")
    parser.add_argument("--modes", default=",".join(ADAPTER_MODES), help="adapter modes, run on --adapter-models")
    parser.add_argument("--adapter-models", default="xlmr-base")
    parser.add_argument("--adapter-workloads", default="queries,passages")
    parser.add_argument("--lora-expand", default="fused",
                        help="fused (the GEMM's epilogue, the engine's default on sm_90) and/or consumer (the GELU and "
                             "LayerNorm kernels, the path before it): a comma list, each run on the mixed-adapter modes")
    parser.add_argument("--tokens", type=int, default=400_000, help="tokens per workload")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baselines", default="arrival64,sorted256")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--profile", action="store_true", help="write a kernel profile of each forward measurement to --out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gelu-approximation", default="auto",
                        help="the engine's gelu_approximation, a comma list (auto,none): values after the first run with the first --attention only")
    parser.add_argument("--parameter", action="append", default=[], metavar="NAME=VALUE",
                        help="a serving parameter of every engine (e.g. gemm_tuning=false); repeatable")
    args = parser.parse_args()
    for item in args.parameter:
        name, _, value = item.partition("=")
        ENGINE_PARAMETERS[name] = value
    global DEVICE
    DEVICE = torch.device(args.device)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

    card = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (smoke run)"
    date = datetime.date.today().isoformat()
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    latencies: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="encoder-bench-"))
    attentions = []
    for attention in args.attention.split(","):
        try:
            select_attention_backend(attention, DEVICE, dtype)
            attentions.append(attention)
        except Exception as error:  # e.g. flash-attn not installed
            print(f"skip attention={attention}: {error}", file=sys.stderr)
    modes = [mode for mode in args.modes.split(",") if mode and mode != "base"]

    def add_row(model_name, workload, mode, system, lengths, seconds, flops, peak):
        rows.append(dict(model=model_name, workload=workload, mode=mode, system=system,
                         tokens_per_s=sum(lengths) / seconds, seqs_per_s=len(lengths) / seconds,
                         bound_share=flops / seconds / MATMUL_BOUND_FLOPS, peak_gib=peak))

    for model_name in args.models.split(","):
        path = build_checkpoint(model_name, workdir)
        adapter_root = None
        for workload in args.workloads.split(","):
            lengths = draw_lengths(workload, args.tokens, rng)
            if model_name == "minilm":
                lengths = [min(n, 256) for n in lengths]
            approximations = args.gelu_approximation.split(",")
            runs = [(attention, approximation) for approximation in approximations
                    for attention in (attentions if approximation == approximations[0] else attentions[:1])]
            for attention, approximation in runs:
                engine = make_engine(path, attention, args.max_batch_tokens, gelu_approximation=approximation)
                GEMM_TUNING.setdefault(model_name, engine.describe_gemm_tuning())
                config = engine.settings.encoder_config
                label = attention + GELU_LABELS[approximation]
                bos, eos = (0, 2) if config.position_offset else (101, 102)
                sequences = random_sequences(lengths, config.vocab_size, rng, bos, eos)
                flops = encoder_flops(config, lengths)
                profile_file = (Path(args.out) / f"profile-{model_name}-{workload}-{attention}-gelu-{approximation}.txt"
                                if args.profile else None)
                result = measure_engine(engine, sequences, [""] * len(sequences), args.repeats, profile_file)
                for kind in ("forward", "graphs", "engine"):
                    if result[f"{kind}_s"] is not None:
                        add_row(model_name, workload, "base", f"loraembed {KIND_LABELS[kind]} ({label})", lengths,
                                result[f"{kind}_s"], flops, result["peak_gib"])
                if workload == "queries":
                    latencies.append(dict(model=model_name, attention=label, **measure_latency(engine, bos, eos)))
                del engine
                empty_cache()
            if model_name in args.adapter_models.split(",") and workload in args.adapter_workloads.split(",") and modes:
                if adapter_root is None:
                    adapter_root = workdir / f"adapters-{model_name}"
                    names = {f"r{ranks[i % len(ranks)]}-{i}" for mode in modes for i in range(ADAPTER_MODES[mode][0])
                             for ranks in [ADAPTER_MODES[mode][1]]}
                    for seed, name in enumerate(sorted(names)):
                        write_random_adapter(adapter_root / name, config, int(name.split("-")[0][1:]), seed)
                expands = args.lora_expand.split(",")
                for mode, expand in [(mode, expand) for mode in modes for expand in expands]:
                    if expand != expands[0] and ADAPTER_MODES[mode][0] == 1:
                        continue  # one adapter: merged per linear either way
                    engine, names = adapter_engine(path, mode, attentions[0], args.max_batch_tokens, adapter_root)
                    if hasattr(engine.adapters, "layers"):  # not the merged mode's registry
                        engine.adapters.layers.fuse_expand = expand == "fused"
                    adapter_ids = [names[i] for i in rng.integers(0, len(names), len(sequences))]
                    profile_file = None
                    if args.profile and mode == "64 adapters":
                        profile_file = Path(args.out) / f"profile-{model_name}-{workload}-64-adapters-{expand}.txt"
                    result = measure_engine(engine, sequences, adapter_ids, args.repeats, profile_file)
                    for kind in ("forward", "graphs", "engine"):
                        if result[f"{kind}_s"] is not None:
                            add_row(model_name, workload, mode,
                                    f"loraembed {KIND_LABELS[kind]} ({attentions[0]}{EXPAND_LABELS[expand]})",
                                    lengths, result[f"{kind}_s"], flops, result["peak_gib"])
                    del engine
                    empty_cache()
            for baseline in args.baselines.split(","):
                if not baseline:
                    continue
                batch_size, sort = (64, False) if baseline == "arrival64" else (256, True)
                result = measure_transformers(path, sequences, batch_size, sort, 1 if model_name != "minilm" else 0, args.repeats)
                add_row(model_name, workload, "base", f"transformers fp16 {baseline}", lengths, result["forward_s"],
                        flops, result["peak_gib"])
            report(rows, latencies, card, date, Path(args.out))  # after every workload: a crash keeps what was measured


def measure_latency(engine: EmbeddingEngine, bos: int, eos: int) -> dict:
    """One 16-token query: median milliseconds of the forward pass and of the whole `embed` call."""
    tokens = np.array([[bos, *range(1000, 1014), eos]], dtype=np.int64)
    request = EncoderRequest(tokens, np.ones_like(tokens))
    refs = [SequenceRef(0, 0, tokens[0], 0)]
    batch = build_packed_batch(refs, engine.settings.encoder_config.position_offset, engine.device)

    @torch.inference_mode()
    def forward():
        pool(engine.model(batch), batch, engine.settings.pooling)

    forward_ms = [timed(forward, 1) * 1e3 for _ in range(50)]
    embed_ms = [timed(lambda: engine.embed([request]), 1) * 1e3 for _ in range(50)]
    return dict(forward_ms=float(np.median(forward_ms)), embed_ms=float(np.median(embed_ms)))


def report(rows: list[dict], latencies: list[dict], card: str, date: str, out: Path) -> None:
    header = f"card: {card}   date: {date}   torch {torch.__version__}"
    lines = [header, "", "| model | workload | mode | system | tokens/s | seqs/s | matmul bound | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['workload']} | {row['mode']} | {row['system']} | {row['tokens_per_s'] / 1e6:.2f}M | "
            f"{row['seqs_per_s']:,.0f} | {row['bound_share']:.0%} | {row['peak_gib']:.2f} |"
        )
    lines += ["", "One 16-token query (median of 50):", "", "| model | attention | forward ms | embed() ms |", "|---|---|---|---|"]
    lines += [f"| {l['model']} | {l['attention']} | {l['forward_ms']:.2f} | {l['embed_ms']:.2f} |" for l in latencies]
    parameters = ", ".join(f"{name}={value}" for name, value in ENGINE_PARAMETERS.items()) or "defaults"
    lines += ["", f"Engine parameters: {parameters}. GEMM tuning at load (torch's pick -> fastest candidate, per linear):", ""]
    lines += [f"- {model}: {outcome}" for model, outcome in GEMM_TUNING.items()]
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text("# Encoder benchmark (benchmarks/encoder_bench.py)\n\n" + text + "\n")
    (out / "encoder_bench.json").write_text(json.dumps(dict(card=card, date=date, rows=rows, latencies=latencies), indent=1))
    try:
        plot(rows, card, date, out / "encoder_bench.png")
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)


def plot(rows: list[dict], card: str, date: str, file: Path) -> None:
    """Left: base-model throughput per workload against the baselines. Right: throughput against
    the number of distinct adapters in the batch (forward pass, rank 16, all six targets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = [r for r in rows if r["mode"] == "base" and "engine" not in r["system"]]
    groups = sorted({(r["model"], r["workload"]) for r in base})
    systems = sorted({r["system"] for r in base})
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, len(groups) * 1.4 + 5), 4.8), width_ratios=[3, 1.3])
    width = 0.8 / max(len(systems), 1)
    for index, system in enumerate(systems):
        values = [next((r["tokens_per_s"] / 1e6 for r in base if (r["model"], r["workload"]) == g and r["system"] == system), 0)
                  for g in groups]
        left.bar([i + index * width for i in range(len(groups))], values, width, label=system)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{m}\n{w}" for m, w in groups])
    left.set_ylabel("million tokens/s")
    left.set_title("base model, bf16 (ours) vs transformers fp16")
    left.legend(fontsize=7)
    counts = {"base": 0, "1 adapter": 1, "8 adapters": 8, "64 adapters": 64}
    for model, workload in sorted({(r["model"], r["workload"]) for r in rows if r["mode"] != "base"}):
        ours = [r for r in rows if (r["model"], r["workload"]) == (model, workload) and r["system"].startswith("loraembed forward")]
        graphed = [r for r in ours if r["system"].startswith("loraembed " + KIND_LABELS["graphs"])]
        ours = graphed or ours  # the serving path's replays where measured (the eager rows measure the host)
        adapter_systems = {r["system"] for r in ours if r["mode"] != "base"  # the base point of the same system
                           and EXPAND_LABELS["consumer"] not in r["system"]}  # the engine's default path only
        points = sorted((counts[r["mode"]], r["tokens_per_s"] / 1e6) for r in ours
                        if r["mode"] in counts and r["system"] in adapter_systems)
        points = list(dict(points).items())
        right.plot([str(c) for c, _ in points], [v for _, v in points], marker="o", label=f"{model} {workload}")
    right.set_xlabel("distinct adapters in the batch")
    right.set_ylabel("million tokens/s")
    right.set_ylim(bottom=0)
    right.set_title("mixed adapters")
    right.legend(fontsize=7)
    fig.suptitle(f"loraembed encoder benchmark — {card}, {date}")
    fig.tight_layout()
    fig.savefig(file, dpi=110)


if __name__ == "__main__":
    main()
