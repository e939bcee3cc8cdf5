"""Shared fixtures of the unit tests: tiny random checkpoints built once per session, the bundled
all-MiniLM-L6-v2, and engines cached by configuration (building one costs a checkpoint load)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraembed.checkpoint import bundled_model_path
from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine
from tests.support.checkpoints import build_tiny_bert, build_tiny_xlmr

TINY_XLMR_MAX_SEQ_LEN = 40  # max_position_embeddings 42 = pad_token_id + 1 + 40


# --- references: transformers and sentence-transformers semantics ----------------------------


def hf_last_hidden_state(model_path, input_ids: np.ndarray, attention_mask: np.ndarray, **config_overrides) -> torch.Tensor:
    """transformers' last hidden state in float32; `config_overrides` replace config.json values."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_path, attn_implementation="eager", dtype=torch.float32, **config_overrides).eval()
    with torch.no_grad():
        output = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return output.last_hidden_state  # [n, L, H]


def sentence_transformers_pooling(last_hidden_state, attention_mask, mode, dimensions, normalize) -> np.ndarray:
    """sentence-transformers `Pooling` (cls_token / mean_tokens), then Matryoshka, then `Normalize`."""
    mask = torch.as_tensor(attention_mask).unsqueeze(-1).to(last_hidden_state.dtype)  # [n, L, 1]
    if mode == "cls":
        pooled = last_hidden_state[:, 0]
    else:
        pooled = (last_hidden_state * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
    if dimensions is not None:
        pooled = pooled[:, :dimensions]
    if normalize:
        pooled = F.normalize(pooled, p=2, dim=1)
    return pooled.numpy()


@pytest.fixture(scope="session")
def tiny_xlmr_path(tmp_path_factory) -> Path:
    return build_tiny_xlmr(tmp_path_factory.mktemp("tiny-xlmr"), max_seq_len=TINY_XLMR_MAX_SEQ_LEN)


@pytest.fixture(scope="session")
def tiny_xlmr_mlm_path(tmp_path_factory) -> Path:
    """XLMRobertaForMaskedLM: keys carry the `roberta.` prefix and an `lm_head` is saved."""
    return build_tiny_xlmr(tmp_path_factory.mktemp("tiny-xlmr-mlm"), max_seq_len=TINY_XLMR_MAX_SEQ_LEN,
                           masked_lm=True, seed=1)


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), max_position_embeddings=64)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def make_engine():
    """``make_engine(model_path, **parameters)``: a CPU engine, shared by tests asking the same.

    Parameters go through `ServingConfig.from_parameters` with an empty environment, so
    `LORAEMBED_*` variables of the machine running the tests change nothing.
    """
    engines: dict[tuple, EmbeddingEngine] = {}

    def make(model_path: Path | str, **parameters) -> EmbeddingEngine:
        parameters = {"model": str(model_path), **{k: str(v) for k, v in parameters.items()}}
        key = tuple(sorted(parameters.items()))
        if key not in engines:
            engines[key] = EmbeddingEngine(ServingConfig.from_parameters(parameters, environ={}), device="cpu")
        return engines[key]

    return make


@pytest.fixture(scope="session")
def pad_right():
    """``pad_right(sequences, pad_id)`` -> (input_ids, attention_mask), [n, L] int64, as HF pads."""

    def pad(sequences, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(sequence) for sequence in sequences)
        input_ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), longest), dtype=np.int64)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
        return input_ids, attention_mask

    return pad


# (first, last) special tokens and the lowest ordinary id of each family's vocabulary.
_SPECIAL_TOKENS = {"xlm-roberta": (0, 2, 4), "bert": (101, 102, 999)}


@pytest.fixture(scope="session")
def token_sequences():
    """``token_sequences(encoder_config, lengths, seed)``: random ids framed like the tokenizer's
    output (<s> ... </s> or [CLS] ... [SEP]; a length-1 sequence is the first special token alone).
    Ordinary ids never equal the pad id, which HF's XLM-R uses to derive position ids."""

    def make(encoder_config, lengths, seed: int) -> list[np.ndarray]:
        first, last, lowest = _SPECIAL_TOKENS[encoder_config.model_type]
        rng = np.random.default_rng(seed)
        sequences = []
        for length in lengths:
            body = rng.integers(lowest, encoder_config.vocab_size, size=max(length - 2, 0))
            sequence = [first, *body, last][:length]
            sequences.append(np.asarray(sequence, dtype=np.int64))
        return sequences

    return make
