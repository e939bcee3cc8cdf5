"""What benchmarks/serve_bench.sh serves and sends, and the in-process figure it compares with.

    python benchmarks/serve_bench_setup.py build DIR [--model xlmr-base|tiny] [--adapters 64]
        [--vocab-size 250002] [--queries 1024] [--passages 2048] [--passage-tokens 120]
    python benchmarks/serve_bench_setup.py inprocess DIR --out FILE [--device cuda] [--repeats 5]
    python benchmarks/serve_bench_setup.py first-requests DIR --url HOST:PORT

`build` (any python with torch, transformers and tokenizers) writes DIR/model (random-weight
XLM-R of that size, bf16, with a tokenizer.json of the same vocabulary size), DIR/adapters
(rank-16 PEFT adapters on all six targets, encoder_bench.py's), DIR/queries.txt and
DIR/passages.txt (one text per line). It is skipped when DIR/build.json says the same.

The tokenizer is shaped like XLM-R's (Unigram over ~250k pieces, NFKC, Metaspace, <s>=0 <pad>=1
</s>=2 <unk>=3) on a synthetic language: words of 1-4 syllables drawn with Zipf frequencies, the
frequent ones whole pieces, the rare ones split into syllable pieces (1.3 tokens per word, like
XLM-R on English). A 250-piece toy vocabulary (tests/support/checkpoints.py) spells most words
letter by letter, which costs a Unigram tokenizer differently from a real vocabulary.

`inprocess` (the python the Triton stub runs: loraembed, numpy<2, flash-attn if any) measures
`EmbeddingEngine.embed` (encoder_bench.measure_engine) on the token ids of the perf_analyzer input
files that serve_bench.sh wrote (client_examples/perf/make_inputs.py: --inputs/*_ids.json), with
the server's settings, and the tokenizer alone (loraembed.tokenization.TextTokenizer) on the same
passages; it writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "backend_src")]

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 as in XLM-R
ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
          "ch", "sh", "th", "st", "tr", "pr", "br", "kr", "gl", "sp", "fl"]
VOWELS = ["a", "e", "i", "o", "u", "y", "ai", "ei", "ou", "ie", "ä", "é", "ö", "ü"]
CODAS = ["", "", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck"]
PUNCTUATION = [",", ".", "?", "!", ";", ":", "'", '"', "(", ")", "-"]
MODEL_SIZES = {"tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)}
WORKLOADS = {"queries": dict(median=16, low=4, high=64, sigma=0.6),  # encoder_bench.py's, in tokens
             "passages": dict(median=120, low=16, high=512, sigma=0.7)}
TOKENS_PER_WORD = 1.22


class SyntheticLanguage:
    """A lexicon of `words` word types (rank 0 most frequent) and Zipf word frequencies."""

    def __init__(self, words: int = 600_000, seed: int = 0):
        rng = np.random.default_rng(seed)
        syllables = sorted({o + v + c for o in ONSETS for v in VOWELS for c in CODAS})
        self.syllables = syllables
        lexicon: dict[str, None] = {}
        while len(lexicon) < words:
            count = words - len(lexicon)
            sizes = rng.choice([1, 2, 3, 4], size=count, p=[0.25, 0.4, 0.25, 0.1])
            picks = rng.integers(0, len(syllables), size=(count, 4))
            for size, row in zip(sizes, picks):
                lexicon.setdefault("".join(syllables[i] for i in row[:size]), None)
        # Short words are the frequent ones, as in natural languages.
        self.words = sorted(lexicon, key=lambda word: (len(word) + rng.random() * 6))
        ranks = np.arange(len(self.words), dtype=np.float64)
        weights = 1.0 / (ranks + 2.7) ** 1.07
        self.probabilities = weights / weights.sum()
        self._cumulative = np.cumsum(self.probabilities)

    def tokenizer(self, vocab_size: int):
        """A Unigram tokenizer with exactly `vocab_size` ids: special tokens, characters, syllables
        (word-initial and inner), then whole words by frequency, scores the log frequencies."""
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        letters = {ch for word in self.words[:20000] for ch in word}
        characters = sorted(letters | {ch.upper() for ch in letters} | set(PUNCTUATION) | set("0123456789"))
        pieces: dict[str, float] = {}
        for ch in characters:
            pieces.setdefault("▁" + ch, -12.0)
            pieces.setdefault(ch, -12.5)
        pieces.setdefault("▁", -11.0)
        for syllable in self.syllables:
            pieces.setdefault("▁" + syllable, -10.5)
            pieces.setdefault(syllable, -11.0)
        budget = vocab_size - len(SPECIAL_TOKENS)
        for rank, word in enumerate(self.words):
            if len(pieces) >= budget:
                break
            pieces.setdefault("▁" + word, math.log(self.probabilities[rank]))
        if len(pieces) < budget:
            raise ValueError(f"vocab_size={vocab_size} needs more than {len(self.words)} words")
        vocab = [(token, 0.0) for token in SPECIAL_TOKENS] + list(pieces.items())[:budget]
        tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3))
        tokenizer.add_special_tokens(SPECIAL_TOKENS)  # matched before the model runs, as in XLM-R's file
        # XLM-R's own: a precompiled NFKC-like character map, then runs of spaces to one.
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        return tokenizer

    def texts(self, workload: str, count: int, rng: np.random.Generator, median: float | None = None) -> list[str]:
        """`count` texts whose lengths in tokens follow encoder_bench.py's workload (about), or
        the same shape scaled to another median."""
        spec = dict(WORKLOADS[workload])
        if median:
            scale = median / spec["median"]
            spec.update(median=median, low=max(3, spec["low"] * scale), high=min(512, spec["high"] * scale))
        tokens = np.clip(rng.lognormal(math.log(spec["median"]), spec["sigma"], count), spec["low"], spec["high"])
        texts = []
        for target in tokens:
            n = max(1, int(round((target - 2) / TOKENS_PER_WORD)))
            picks = np.minimum(np.searchsorted(self._cumulative, rng.random(n)), len(self.words) - 1)
            words = [self.words[i] for i in picks]
            marks = rng.random(n)
            text = " ".join(word + ("," if m < 0.06 else "." if m < 0.11 else "") for word, m in zip(words, marks))
            texts.append(text[0].upper() + text[1:])
        return texts


def build_model(folder: Path, size: str, vocab_size: int) -> None:
    """A random-weight XLM-R (positions from pad_token_id + 1, 512 tokens) saved in bf16."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from encoder_bench import MODELS

    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=vocab_size, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2, **{**MODELS, **MODEL_SIZES}[size])
    XLMRobertaModel(config).to(torch.bfloat16).save_pretrained(folder)


def build(args) -> None:
    directory = Path(args.dir)
    vocab_size = args.vocab_size or (250002 if args.model != "tiny" else 8000)
    recipe = dict(model=args.model, vocab_size=vocab_size, adapters=args.adapters, rank=args.rank,
                  queries=args.queries, passages=args.passages, passage_tokens=args.passage_tokens, version=2)
    stamp = directory / "build.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == recipe:
        print(f"serve_bench_setup: reusing {directory}", file=sys.stderr)
        return
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    language = SyntheticLanguage(words=max(2 * vocab_size, 20000))
    tokenizer = language.tokenizer(vocab_size)
    model = directory / "model"
    build_model(model, args.model, vocab_size)
    tokenizer.save(str(model / "tokenizer.json"))

    from transformers import XLMRobertaConfig

    from encoder_bench import write_random_adapter  # rank-r LoRA on all six targets, bf16, PEFT format

    config = XLMRobertaConfig.from_pretrained(model)
    adapter_ids = [f"a{index:02d}" for index in range(args.adapters)]
    for seed, adapter_id in enumerate(adapter_ids):
        write_random_adapter(directory / "adapters" / adapter_id, config, args.rank, seed)
    rng = np.random.default_rng(1)
    stats = {}
    for workload, count in (("queries", args.queries), ("passages", args.passages)):
        texts = language.texts(workload, count, rng, args.passage_tokens if workload == "passages" else None)
        (directory / f"{workload}.txt").write_text("\n".join(texts) + "\n")
        lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
        stats[workload] = dict(texts=count, median_tokens=float(np.median(lengths)), mean_tokens=float(np.mean(lengths)))
    description = (f"synthetic XLM-R-shaped Unigram, {vocab_size} pieces, NFKC + Metaspace,"
                   f" {TOKENS_PER_WORD} tokens per word")
    stamp.write_text(json.dumps(dict(recipe=recipe, tokenizer=description, adapter_ids=adapter_ids, stats=stats), indent=1))
    print(f"serve_bench_setup: built {args.model} (vocabulary {vocab_size}), {args.adapters} adapters, texts {stats}"
          f" in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def read_ids(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """Token ids (padding removed) and adapter ids ("" when absent) of a perf_analyzer ids file."""
    sequences, adapters = [], []
    for entry in json.loads(path.read_text())["data"]:
        ids = np.asarray(entry["INPUT_IDS"]["content"], dtype=np.int64)
        mask = np.asarray(entry["ATTENTION_MASK"]["content"], dtype=np.int64)
        sequences.append(ids[: int(mask.sum())])
        adapters.append(entry.get("ADAPTER_ID", [""])[0])
    return sequences, adapters


def best_seconds(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` runs after a warm-up (a shared CPU's noise only ever adds time)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def inprocess(args) -> None:
    import encoder_bench
    from loraembed.config import ServingConfig
    from loraembed.engine import EmbeddingEngine, ModelSettings
    from loraembed.tokenization import TextTokenizer
    from loraembed.triton_params import instance_device

    directory = Path(args.dir)
    # The tokenizer alone first (before torch has a thread pool to keep busy), one call per
    # 32-text request as the tokenizer model makes for one request, and one call for all of them.
    build_info = json.loads((directory / "build.json").read_text())
    parameters = dict(model=str(directory / "model"), pooling="mean", adapter_root=str(directory / "adapters"),
                      max_adapters=str(max(1, len(build_info["adapter_ids"]))), **dict(args.parameter or []))
    serving = ServingConfig.from_parameters(parameters, environ={})
    tokenizer = TextTokenizer(directory / "model", ModelSettings.resolve(serving).max_seq_len)
    texts = (directory / "passages.txt").read_text().splitlines()
    requests = [texts[start:start + 32] for start in range(0, len(texts), 32)]
    per_request = best_seconds(lambda: [tokenizer.encode_requests([request], [True]) for request in requests])
    all_at_once = best_seconds(lambda: tokenizer.encode_requests(requests, [True] * len(requests)))
    tokenizer_result = dict(texts_per_s=len(texts) / per_request, texts_per_s_one_call=len(texts) / all_at_once,
                            requests=len(requests))
    print(f"serve_bench_setup: in-process tokenizer: {len(texts) / per_request:,.0f} passages/s in calls of 32,"
          f" {len(texts) / all_at_once:,.0f} in one call", file=sys.stderr)
    # The device as the encoder model takes it (a CPU instance: its share of the torch threads).
    device = instance_device("GPU" if args.device == "cuda" else "CPU", 0, serving.cpu_threads)
    encoder_bench.DEVICE = device  # its synchronize() and memory statistics follow this
    engine = EmbeddingEngine(serving, device)
    results = dict(engine=engine.describe(), parameters=parameters, rows=[], tokenizer=tokenizer_result)
    for name, file in (("passages", "passages_ids.json"), ("passages, mixed adapters", "passages_mixed_ids.json"),
                       ("queries", "queries_ids.json")):
        path = Path(args.inputs or directory / "inputs") / file
        if not path.is_file():
            continue
        sequences, adapters = read_ids(path)
        timing = encoder_bench.measure_engine(engine, sequences, adapters, args.repeats)
        tokens = int(sum(len(s) for s in sequences))
        results["rows"].append(dict(workload=name, texts=len(sequences), tokens=tokens,
                                    engine_tokens_per_s=tokens / timing["engine_s"],
                                    forward_tokens_per_s=tokens / timing["forward_s"],
                                    graphs_tokens_per_s=tokens / timing["graphs_s"] if timing["graphs_s"] else None))
        print(f"serve_bench_setup: in-process {name}: {tokens / timing['engine_s'] / 1e6:.3f}M tokens/s", file=sys.stderr)
    Path(args.out).write_text(json.dumps(results, indent=1))


def first_requests(args) -> None:
    import urllib.request

    directory = Path(args.dir)
    adapter_ids = json.loads((directory / "build.json").read_text()).get("adapter_ids") or []
    queries = (directory / "queries.txt").read_text().splitlines()
    passages = (directory / "passages.txt").read_text().splitlines()[:32]
    cases = [("one query", queries[:1], None), ("32 passages", passages, None)]
    if adapter_ids:
        cases.append(("32 passages of one adapter", passages, adapter_ids[0]))
    timings = []
    for label, texts, adapter_id in cases:
        inputs = [{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]
        if adapter_id is not None:
            inputs.append({"name": "ADAPTER_ID", "shape": [len(texts), 1], "datatype": "BYTES", "data": [adapter_id] * len(texts)})
        request = urllib.request.Request(f"http://{args.url}/v2/models/embed/infer", data=json.dumps({"inputs": inputs}).encode(),
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            output = json.loads(response.read())["outputs"][0]
        elapsed_ms = (time.perf_counter() - started) * 1000
        if output["shape"][0] != len(texts):
            raise SystemExit(f"first-requests: {label}: {output['shape'][0]} embeddings for {len(texts)} texts")
        timings.append(f"{label} {elapsed_ms:,.0f} ms")
    print(", ".join(timings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build")
    build_parser.add_argument("dir")
    build_parser.add_argument("--model", default="xlmr-base", choices=["xlmr-base", "xlmr-large", "tiny"])
    build_parser.add_argument("--adapters", type=int, default=64)
    build_parser.add_argument("--rank", type=int, default=16)
    build_parser.add_argument("--vocab-size", type=int, help="default 250002 (XLM-R's), 8000 for tiny")
    build_parser.add_argument("--queries", type=int, default=1024)
    build_parser.add_argument("--passages", type=int, default=2048)
    build_parser.add_argument("--passage-tokens", type=float, help="median passage length (default 120, as encoder_bench.py)")
    measure_parser = commands.add_parser("inprocess")
    measure_parser.add_argument("dir")
    measure_parser.add_argument("--inputs", help="the folder of make_inputs.py's files (default DIR/inputs)")
    measure_parser.add_argument("--out", required=True)
    measure_parser.add_argument("--device", default="cuda")
    measure_parser.add_argument("--repeats", type=int, default=5)
    measure_parser.add_argument("--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                                help="a serving parameter as the server has it (e.g. max_batch_tokens 16384)")
    first_parser = commands.add_parser("first-requests")
    first_parser.add_argument("dir")
    first_parser.add_argument("--url", required=True, help="the server's HTTP address, HOST:PORT")
    args = parser.parse_args()
    {"build": build, "inprocess": inprocess, "first-requests": first_requests}[args.command](args)


if __name__ == "__main__":
    main()
