"""LoRA adapters served by the engine against `peft` itself (PeftModel over transformers' BERT and
XLM-R, adapters saved by `save_pretrained` with random non-zero factors), and `merge_adapter`
against the same adapter unmerged."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loraembed.engine import EncoderRequest
from loraembed.errors import AdapterError
from tests.support.peft_adapters import last_hidden_state, pooled, save_peft_adapter

from .conftest import TINY_XLMR_MAX_SEQ_LEN

PARITY_ATOL = 1e-4  # DESIGN.md: fp32 on CPU, max abs diff <= 1e-4
MIN_ADAPTER_EFFECT = 1e-2  # every adapter moves the pooled output at least this much off the base
LENGTHS = [TINY_XLMR_MAX_SEQ_LEN, 1, 7, 2, 23, 12]
ALL_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
ADAPTERS = {
    "qv-r4": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
    "all-r12-rslora": {"r": 12, "lora_alpha": 16, "use_rslora": True, "target_modules": ALL_TARGETS},
    # Ranks and alphas per module by PEFT's pattern rules; "output.dense" also matches
    # attention.output.dense, "dense" also the pooler (whose LoRA the embedding never uses).
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["query", "key", "value", "dense"],
        "rank_pattern": {"value": 6, "layer.1.intermediate.dense": 2},
        "alpha_pattern": {"query": 32, "output.dense": 3},
    },
    # Saved over *ForMaskedLM: keys `base_model.model.roberta.`/`bert.`, plus LoRA on the MLM head.
    "task-prefix": {"masked_lm": True, "r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"]},
}


@dataclass
class Family:
    name: str
    model_path: Path
    adapter_root: Path
    input_ids: np.ndarray
    attention_mask: np.ndarray
    adapter_hidden: dict[str, torch.Tensor]  # adapter -> peft's last hidden state [n, L, H]
    base_hidden: torch.Tensor


@pytest.fixture(scope="module", params=["xlmr", "bert"])
def family(request, tiny_xlmr_path, tiny_bert_path, tmp_path_factory, make_engine, token_sequences, pad_right):
    model_path = {"xlmr": tiny_xlmr_path, "bert": tiny_bert_path}[request.param]
    adapter_root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    config = make_engine(model_path).settings.encoder_config
    input_ids, attention_mask = pad_right(token_sequences(config, LENGTHS, seed=3), config.pad_token_id)
    adapter_hidden = {}
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        model = save_peft_adapter(adapter_root / name, model_path, seed=seed, **options)
        adapter_hidden[name] = last_hidden_state(model, input_ids, attention_mask)
        base_hidden = last_hidden_state(model, input_ids, attention_mask, adapter=False)
    return Family(request.param, model_path, adapter_root, input_ids, attention_mask, adapter_hidden, base_hidden)


def test_saved_adapters_exercise_the_formats(family):
    """The fixtures really are what the parity tests claim: prefixes, patterns, head LoRA."""
    prefix = {"xlmr": "base_model.model.roberta.", "bert": "base_model.model.bert."}[family.name]
    prefixed_keys = load_file(family.adapter_root / "task-prefix" / "adapter_model.safetensors")
    assert all(key.startswith((prefix, "base_model.model.lm_head.", "base_model.model.cls.")) for key in prefixed_keys)
    assert any(".lm_head." in key or ".cls." in key for key in prefixed_keys)  # head LoRA, ignored
    plain_keys = load_file(family.adapter_root / "qv-r4" / "adapter_model.safetensors")
    assert all(re.match(r"base_model\.model\.encoder\.layer\.\d\.", key) for key in plain_keys)
    patterns = load_file(family.adapter_root / "patterns" / "adapter_model.safetensors")
    ranks = {key: tensor.shape[0] for key, tensor in patterns.items() if key.endswith("lora_A.weight")}
    assert ranks["base_model.model.encoder.layer.0.attention.self.value.lora_A.weight"] == 6
    assert ranks["base_model.model.encoder.layer.1.intermediate.dense.lora_A.weight"] == 2
    assert ranks["base_model.model.encoder.layer.0.intermediate.dense.lora_A.weight"] == 4
    config = json.loads((family.adapter_root / "patterns" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {"query": 32, "output.dense": 3}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_adapter_matches_peft(family, adapter, pooling, make_engine):
    engine = make_engine(family.model_path, adapter_root=family.adapter_root, pooling=pooling, normalize="false")
    request = EncoderRequest(family.input_ids, family.attention_mask, adapter_ids=[adapter])
    [embedding] = engine.embed([request])
    expected = pooled(family.adapter_hidden[adapter], family.attention_mask, pooling)
    base = pooled(family.base_hidden, family.attention_mask, pooling)
    assert np.abs(expected - base).max() > MIN_ADAPTER_EFFECT
    np.testing.assert_allclose(embedding, expected, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_base_rows_match_peft_with_adapter_disabled(family, pooling, make_engine):
    engine = make_engine(family.model_path, adapter_root=family.adapter_root, pooling=pooling, normalize="false")
    [embedding] = engine.embed([EncoderRequest(family.input_ids, family.attention_mask, adapter_ids=[""])])
    expected = pooled(family.base_hidden, family.attention_mask, pooling)
    np.testing.assert_allclose(embedding, expected, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("adapter", ["all-r12-rslora", "patterns"])
def test_merged_adapter_equals_unmerged(family, adapter, make_engine):
    options = {"adapter_root": family.adapter_root, "pooling": "mean", "normalize": "false"}
    merged = make_engine(family.model_path, merge_adapter=adapter, **options)
    unmerged = make_engine(family.model_path, **options)
    ids, mask = family.input_ids, family.attention_mask
    [expected] = unmerged.embed([EncoderRequest(ids, mask, adapter_ids=[adapter])])
    as_base, by_name, other = merged.embed(
        [EncoderRequest(ids, mask), EncoderRequest(ids, mask, adapter_ids=[adapter]), EncoderRequest(ids, mask, adapter_ids=["qv-r4"])]
    )
    np.testing.assert_allclose(as_base, expected, rtol=0, atol=PARITY_ATOL)
    np.testing.assert_allclose(by_name, expected, rtol=0, atol=PARITY_ATOL)
    np.testing.assert_allclose(by_name, pooled(family.adapter_hidden[adapter], mask, "mean"), rtol=0, atol=PARITY_ATOL)
    message = (
        f"adapter 'qv-r4' is not served: this server has adapter '{adapter}' merged into the base model "
        f"and serves only it ('' or '{adapter}')"
    )
    with pytest.raises(AdapterError, match=f"^{re.escape(message)}$"):
        raise other
    assert merged.adapters.snapshot().usage[adapter].texts == 2 * len(LENGTHS)
