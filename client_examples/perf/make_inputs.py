"""perf_analyzer `--input-data` files for `embed` and `tokenizer` (texts) and `encoder` (token ids).

    python client_examples/perf/make_inputs.py TEXTS.txt --out-dir DIR [--name NAME]
        [--tokenizer MODEL/tokenizer.json] [--max-seq-len 512] [--no-pad]
        [--adapters a00,a01,... | --adapters-file IDS.txt] [--seed 0]

TEXTS.txt holds one text per line. Each entry of a file is one text: `perf_analyzer -b 32` sends
32 consecutive entries as one request of 32 texts, `-b 1` one text per request. Writes

- DIR/NAME_text.json: TEXT (+ ADAPTER_ID), for `embed` and `tokenizer`;
- DIR/NAME_ids.json (with --tokenizer): INPUT_IDS and ATTENTION_MASK (+ ADAPTER_ID) for `encoder`,
  the ids the `tokenizer` model makes (special tokens, cut to --max-seq-len). Every entry is
  right-padded to the longest text, because perf_analyzer refuses to batch entries of different
  shapes (padding never reaches the encoder's compute); --no-pad for -b 1;
- DIR/NAME_stats.json: the number of texts and their tokens (with --tokenizer).

With --adapters, each text gets one adapter id drawn at random (uniformly, --seed), the same in
both files. Example against `make serve` (gRPC on 8001):

    perf_analyzer -m embed -i grpc -u localhost:8001 -b 32 --input-data DIR/passages_text.json \\
        --concurrency-range 16:16 --measurement-interval 3000
    perf_analyzer -m encoder -i grpc -u localhost:8001 -b 32 --input-data DIR/passages_ids.json \\
        --concurrency-range 16:16 --measurement-interval 3000

Needs only `tokenizers` and `numpy`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_texts(path: Path) -> list[str]:
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise SystemExit(f"{path}: no texts (one per line)")
    return texts


def draw_adapters(adapter_ids: list[str], count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [adapter_ids[i] for i in rng.integers(0, len(adapter_ids), count)]


def tokenize(tokenizer_file: Path, texts: list[str], max_seq_len: int) -> tuple[list[list[int]], int]:
    """Token ids as the `tokenizer` model makes them (truncation keeps the special tokens), and the pad id."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_len)
    pad_id = next((tokenizer.token_to_id(t) for t in ("<pad>", "[PAD]") if tokenizer.token_to_id(t) is not None), 0)
    return [encoding.ids for encoding in tokenizer.encode_batch(texts)], pad_id


def text_entries(texts: list[str], adapters: list[str] | None) -> list[dict]:
    entries = [{"TEXT": [text]} for text in texts]
    if adapters is not None:
        for entry, adapter in zip(entries, adapters):
            entry["ADAPTER_ID"] = [adapter]
    return entries


def id_entries(ids: list[list[int]], pad_id: int, pad: bool, adapters: list[str] | None) -> list[dict]:
    width = max(map(len, ids))
    entries = []
    for row, tokens in enumerate(ids):
        padding = width - len(tokens) if pad else 0
        entry = {
            "INPUT_IDS": {"content": tokens + [pad_id] * padding, "shape": [len(tokens) + padding]},
            "ATTENTION_MASK": {"content": [1] * len(tokens) + [0] * padding, "shape": [len(tokens) + padding]},
        }
        if adapters is not None:
            entry["ADAPTER_ID"] = [adapters[row]]
        entries.append(entry)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", type=Path, help="one text per line")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--name", help="file name prefix (default: the texts file's stem)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json of the served model: also write NAME_ids.json")
    parser.add_argument("--max-seq-len", type=int, default=512, help="the server's max_seq_len (truncation)")
    parser.add_argument("--no-pad", action="store_true", help="ids entries of their own lengths (only for -b 1)")
    adapter_group = parser.add_mutually_exclusive_group()
    adapter_group.add_argument("--adapters", help="comma-separated adapter ids to draw from")
    adapter_group.add_argument("--adapters-file", type=Path, help="adapter ids to draw from, one per line")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts = read_texts(args.texts)
    name = args.name or args.texts.stem
    adapters = None
    if args.adapters or args.adapters_file:
        pool = args.adapters.split(",") if args.adapters else read_texts(args.adapters_file)
        adapters = draw_adapters([a.strip() for a in pool if a.strip()], len(texts), args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}_text.json").write_text(json.dumps({"data": text_entries(texts, adapters)}))
    stats = {"texts": len(texts)}
    if args.tokenizer:
        ids, pad_id = tokenize(args.tokenizer, texts, args.max_seq_len)
        entries = id_entries(ids, pad_id, not args.no_pad, adapters)
        (args.out_dir / f"{name}_ids.json").write_text(json.dumps({"data": entries}))
        lengths = np.array([len(tokens) for tokens in ids])
        stats.update(tokens=int(lengths.sum()), mean_tokens=float(lengths.mean()), median_tokens=float(np.median(lengths)),
                     max_tokens=int(lengths.max()), padded_to=int(lengths.max()) if not args.no_pad else None)
    (args.out_dir / f"{name}_stats.json").write_text(json.dumps(stats, indent=1))
    print(f"make_inputs: {name}: {stats}")


if __name__ == "__main__":
    main()
