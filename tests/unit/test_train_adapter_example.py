"""client_examples/train_adapter.py: a few steps of training give a PEFT folder that our registry
serves, equal to `peft` loading the same folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from loraembed.engine import EncoderRequest
from tests.support.peft_adapters import last_hidden_state, pooled

SCRIPT = Path(__file__).resolve().parents[2] / "client_examples" / "train_adapter.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_adapter", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trained_adapter_is_served_like_peft_serves_it(tmp_path, make_engine, minilm_path, capsys):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    train_adapter = load_script()
    # A high learning rate, so three steps move the adapter far from the base model.
    train_adapter.main(["--output", str(tmp_path / "helpdesk"), "--steps", "3", "--learning-rate", "0.05"])
    printed = capsys.readouterr().out
    assert "mean of the pairs" in printed and "step    3/3" in printed
    assert {path.name for path in (tmp_path / "helpdesk").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    texts = [query for query, _ in train_adapter.HELPDESK_PAIRS[:4]]
    encoded = AutoTokenizer.from_pretrained(minilm_path)(texts, padding=True, return_tensors="np")
    ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    engine = make_engine(minilm_path, adapter_root=tmp_path)
    adapted, base = engine.embed([EncoderRequest(ids, mask, adapter_ids=["helpdesk"]), EncoderRequest(ids, mask)])
    assert not isinstance(adapted, Exception), adapted

    reference = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path, dtype=torch.float32), tmp_path / "helpdesk")
    expected = torch.nn.functional.normalize(
        torch.from_numpy(pooled(last_hidden_state(reference.eval(), ids, mask), mask, "mean")), dim=1
    ).numpy()
    np.testing.assert_allclose(adapted, expected, rtol=0, atol=1e-4)
    assert np.abs(adapted - base).max() > 1e-2  # the adapter really changed the embeddings


def test_pairs_from_a_tsv(tmp_path):
    train_adapter = load_script()
    (tmp_path / "pairs.tsv").write_text("a cat\ta kitten\n\nstocks fell\tmarkets dropped\n", encoding="utf-8")
    assert train_adapter.read_pairs(tmp_path / "pairs.tsv") == [("a cat", "a kitten"), ("stocks fell", "markets dropped")]
    (tmp_path / "one.tsv").write_text("only one\tpair\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="needs at least 2 tab-separated pairs"):
        train_adapter.read_pairs(tmp_path / "one.tsv")
