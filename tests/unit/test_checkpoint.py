"""Checkpoint files: every layout HF writes loads and matches `transformers` on the same folder;
a checkpoint that does not fit the architecture fails naming every bad key; the
sentence-transformers files decide pooling, normalization and length as `SentenceTransformer` does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraembed.checkpoint import read_sentence_transformers_settings, read_state_dict, resolve_model_path
from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest, ModelSettings
from loraembed.errors import CheckpointError, ConfigurationError
from loraembed.tokenization import TextTokenizer
from tests.support.checkpoints import write_sentence_transformers_files

from .conftest import hf_last_hidden_state, sentence_transformers_pooling

PARITY_ATOL = 1e-4
LENGTHS = [40, 1, 9, 23, 3]


def fresh_engine(model_path: Path, **parameters) -> EmbeddingEngine:
    parameters = {"model": str(model_path), **parameters}
    return EmbeddingEngine(ServingConfig.from_parameters(parameters, environ={}), device="cpu")


def assert_matches_transformers(model_path: Path, sequences, pad_right):
    engine = fresh_engine(model_path, pooling="mean", normalize="false")
    input_ids, attention_mask = pad_right(sequences, engine.settings.encoder_config.pad_token_id)
    [ours] = engine.embed([EncoderRequest(input_ids, attention_mask)])
    expected = sentence_transformers_pooling(
        hf_last_hidden_state(model_path, input_ids, attention_mask), attention_mask, "mean", None, False
    )
    np.testing.assert_allclose(ours, expected, rtol=0, atol=PARITY_ATOL)
    return ours


def copy_config(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "config.json", target / "config.json")
    return target


@pytest.fixture(scope="module")
def xlmr_sequences(tiny_xlmr_path, make_engine, token_sequences):
    return token_sequences(make_engine(tiny_xlmr_path).settings.encoder_config, LENGTHS, seed=3)


@pytest.fixture(scope="module")
def xlmr_state(tiny_xlmr_path) -> dict[str, torch.Tensor]:
    return load_file(tiny_xlmr_path / "model.safetensors")


# --- layouts that load ------------------------------------------------------------------------


def test_masked_lm_checkpoint_with_prefix_and_head(tiny_xlmr_mlm_path, xlmr_sequences, pad_right):
    keys = set(load_file(tiny_xlmr_mlm_path / "model.safetensors"))
    assert json.loads((tiny_xlmr_mlm_path / "config.json").read_text())["architectures"] == ["XLMRobertaForMaskedLM"]
    assert any(key.startswith("lm_head.") for key in keys)
    assert all(key.startswith(("roberta.", "lm_head.")) for key in keys)
    assert_matches_transformers(tiny_xlmr_mlm_path, xlmr_sequences, pad_right)


def test_sharded_safetensors(tiny_xlmr_path, tmp_path, xlmr_sequences, pad_right):
    from transformers import AutoModel

    AutoModel.from_pretrained(tiny_xlmr_path).save_pretrained(tmp_path, max_shard_size="20KB")
    shutil.copy(tiny_xlmr_path / "tokenizer.json", tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    sharded = assert_matches_transformers(tmp_path, xlmr_sequences, pad_right)
    np.testing.assert_array_equal(sharded, assert_matches_transformers(tiny_xlmr_path, xlmr_sequences, pad_right))


def test_pytorch_model_bin(tiny_xlmr_path, tmp_path, xlmr_state, xlmr_sequences, pad_right):
    # transformers 5 ignores safe_serialization=False; a .bin is what 4.x wrote: torch.save(state_dict).
    torch.save(xlmr_state, copy_config(tiny_xlmr_path, tmp_path) / "pytorch_model.bin")
    assert_matches_transformers(tmp_path, xlmr_sequences, pad_right)


def test_sharded_pytorch_model_bin(tiny_xlmr_path, tmp_path, xlmr_state, xlmr_sequences, pad_right):
    copy_config(tiny_xlmr_path, tmp_path)
    names = sorted(xlmr_state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({key: xlmr_state[key] for key in keys}, tmp_path / file)
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert read_state_dict(tmp_path).keys() == xlmr_state.keys()
    assert_matches_transformers(tmp_path, xlmr_sequences, pad_right)


def test_tf_style_layer_norm_names(tiny_xlmr_path, tmp_path, xlmr_state, xlmr_sequences, pad_right):
    renamed = {key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): tensor
               for key, tensor in xlmr_state.items()}
    assert any(key.endswith("gamma") for key in renamed)
    save_file(renamed, copy_config(tiny_xlmr_path, tmp_path) / "model.safetensors")
    assert_matches_transformers(tmp_path, xlmr_sequences, pad_right)


def test_bert_checkpoint_with_prefix_and_heads(tiny_bert_path, tmp_path, make_engine, token_sequences, pad_right):
    # As BertForPreTraining saves it: `bert.` before the base keys, `cls.` heads beside them.
    state = {"bert." + key: tensor for key, tensor in load_file(tiny_bert_path / "model.safetensors").items()}
    state["cls.predictions.bias"] = torch.zeros(8)
    state["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    save_file(state, copy_config(tiny_bert_path, tmp_path) / "model.safetensors")
    sequences = token_sequences(make_engine(tiny_bert_path).settings.encoder_config, LENGTHS, seed=4)
    prefixed = fresh_engine(tmp_path, pooling="mean", normalize="false")
    plain = make_engine(tiny_bert_path, pooling="mean", normalize="false")
    request = EncoderRequest(*pad_right(sequences, 0))
    np.testing.assert_array_equal(prefixed.embed([request])[0], plain.embed([request])[0])
    assert_matches_transformers(tiny_bert_path, sequences, pad_right)


# --- checkpoints that do not fit --------------------------------------------------------------


def _drop(*keys):
    return lambda state: {k: v for k, v in state.items() if k not in keys}


def _add(**tensors):
    return lambda state: state | {key.replace("__", "."): value for key, value in tensors.items()}


def _reshape(key, shape):
    return lambda state: state | {key: torch.zeros(shape)}


Q = "encoder.layer.1.attention.self.query.weight"
V = "encoder.layer.0.attention.self.value.weight"
K_BIAS = "encoder.layer.1.attention.self.key.bias"
WORDS = "embeddings.word_embeddings.weight"

BAD_CHECKPOINTS = {
    "missing query": (_drop(Q), rf"missing \['{Q}'\]; unexpected none; wrong shape none"),
    "missing layer norm": (_drop("embeddings.LayerNorm.bias"), r"missing \['embeddings.LayerNorm.bias'\]; unexpected none"),
    "missing a whole layer": (lambda s: {k: v for k, v in s.items() if ".layer.1." not in k},
                              r"missing \['encoder.layer.1.attention.output.LayerNorm.bias', .*'encoder.layer.1.output.dense.weight'\]"),
    "unexpected layer": (_add(encoder__layer__2__output__dense__weight=torch.zeros(32, 64)),
                         r"missing none; unexpected \['encoder.layer.2.output.dense.weight'\]; wrong shape none"),
    "unexpected module": (_add(embeddings__rotary__inv_freq=torch.zeros(4)), r"unexpected \['embeddings.rotary.inv_freq'\]"),
    "wrong vocab": (_reshape(WORDS, (300, 32)), rf"wrong shape \['{WORDS} \(300, 32\) \(expected \(236, 32\)\)'\]"),
    "wrong value in-features": (_reshape(V, (32, 16)), rf"wrong shape \['{V} \(32, 16\) \(expected \(32, 32\)\)'\]"),
    "wrong key bias": (_reshape(K_BIAS, (64,)), rf"missing none; unexpected none; wrong shape \['{K_BIAS} \(64,\) \(expected \(32,\)\)'\]"),
    "all three": (lambda s: _reshape(WORDS, (1, 32))(_add(extra__weight=torch.zeros(1))(_drop(Q)(s))),
                  rf"missing \['{Q}'\]; unexpected \['extra.weight'\]; wrong shape \['{WORDS} \(1, 32\)"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS.values(), ids=BAD_CHECKPOINTS.keys())
def test_checkpoint_that_does_not_fit_names_the_keys(tiny_xlmr_path, tmp_path, xlmr_state, case):
    mutate, match = case
    save_file(mutate(dict(xlmr_state)), copy_config(tiny_xlmr_path, tmp_path) / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint does not match the architecture: .*" + match):
        fresh_engine(tmp_path)


class NotATensor:
    pass


def test_pickle_that_needs_more_than_weights_only(tiny_xlmr_path, tmp_path):
    torch.save({"embeddings.word_embeddings.weight": NotATensor()}, copy_config(tiny_xlmr_path, tmp_path) / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin cannot be loaded with weights_only=True"):
        fresh_engine(tmp_path)


def test_folder_without_weights(tiny_xlmr_path, tmp_path):
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model.safetensors\(.index.json\) or pytorch_model.bin"):
        fresh_engine(copy_config(tiny_xlmr_path, tmp_path))


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json is missing"):
        fresh_engine(tmp_path)


@pytest.mark.parametrize("model", ["/nonexistent/model/folder", "./no-such-folder", "~/no-such-folder-either"])
def test_missing_local_folder(model):
    with pytest.raises(ConfigurationError, match=rf"model folder '{model}' does not exist"):
        resolve_model_path(model)


def test_unsupported_architecture_is_a_configuration_error(tiny_xlmr_path, tmp_path):
    config = json.loads((tiny_xlmr_path / "config.json").read_text()) | {"position_embedding_type": "relative_key_query"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigurationError, match=r"position_embedding_type 'relative_key_query' is not supported"):
        fresh_engine(tmp_path)


# --- sentence-transformers files -------------------------------------------------------------


def test_bundled_minilm_settings(minilm_path):
    settings = read_sentence_transformers_settings(minilm_path)
    assert (settings.pooling, settings.normalize, settings.max_seq_length) == ("mean", True, 256)


def test_no_sentence_transformers_files(tiny_xlmr_path):
    settings = read_sentence_transformers_settings(tiny_xlmr_path)
    assert (settings.pooling, settings.normalize, settings.max_seq_length) == (None, False, None)


@pytest.mark.parametrize("pooling, normalize", [("cls", True), ("mean", False)])
def test_auto_settings_equal_sentence_transformers(tiny_bert_path, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(tiny_bert_path / file, tmp_path / file)
    write_sentence_transformers_files(tmp_path, pooling, normalize, max_seq_length=16)
    texts = ["hello world", "a longer sentence that is more than sixteen word pieces long, so it is cut", "é"]
    engine = fresh_engine(tmp_path)  # pooling, normalize and max_seq_len all "auto"
    assert (engine.settings.pooling, engine.settings.default_normalize, engine.settings.max_seq_len) == (pooling, normalize, 16)
    tokenizer = TextTokenizer(tmp_path, engine.settings.max_seq_len)
    [ours] = engine.embed([EncoderRequest(*tokenizer.encode(texts))])
    reference = SentenceTransformer(str(tmp_path), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=PARITY_ATOL)


def _pooling_folder(folder: Path, modules=None, **pooling_config) -> Path:
    (folder / "1_Pooling").mkdir(parents=True)
    modules = modules or ["Transformer", "Pooling"]
    (folder / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": "" if name == "Transformer" else f"{i}_{name}",
         "type": f"sentence_transformers.models.{name}"} for i, name in enumerate(modules)
    ]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32} | pooling_config))
    return folder


@pytest.mark.parametrize(
    "modules, pooling_config, match",
    [
        (None, {"pooling_mode_max_tokens": True}, r"pooling \['max_tokens'\] is not supported \(cls or mean alone\)"),
        (None, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
         r"pooling \['cls_token', 'mean_tokens'\] is not supported"),
        (None, {}, r"pooling \[\] is not supported"),
        (None, {"pooling_mode_lasttoken": True}, r"pooling \['lasttoken'\]"),
        (None, {"pooling_mode_mean_tokens": True, "include_prompt": False}, r"include_prompt=false is not supported"),
        (["Transformer", "Pooling", "Dense", "Normalize"], {"pooling_mode_mean_tokens": True},
         r"modules sentence_transformers.models.Dense are not supported \(supported: .*Normalize"),
    ],
)
def test_unsupported_sentence_transformers_modules(tmp_path, modules, pooling_config, match):
    with pytest.raises(ConfigurationError, match=match):
        read_sentence_transformers_settings(_pooling_folder(tmp_path, modules, **pooling_config))


def test_max_seq_len_defaults_to_the_shorter_of_model_and_sentence_transformers(tiny_xlmr_path, tmp_path):
    for file in ("config.json", "model.safetensors"):
        (tmp_path / file).symlink_to(tiny_xlmr_path / file)
    write_sentence_transformers_files(tmp_path, "mean", True, max_seq_length=512)  # more than the model's 40
    settings = ModelSettings.resolve(ServingConfig.from_parameters({"model": str(tmp_path)}, environ={}))
    assert (settings.pooling, settings.default_normalize, settings.max_seq_len) == ("mean", True, 40)


def test_hub_model_id_resolves_from_the_offline_cache(tiny_xlmr_path, tmp_path, monkeypatch, xlmr_sequences, pad_right):
    """A hub id is fetched with huggingface_hub, which finds it in its cache with HF_HUB_OFFLINE."""
    import huggingface_hub.constants

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--acme--tiny-xlmr"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_xlmr_path, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    resolved = resolve_model_path("acme/tiny-xlmr")
    assert resolved == repo / "snapshots" / commit
    assert_matches_transformers(resolved, xlmr_sequences, pad_right)
    with pytest.raises(ConfigurationError, match="model 'acme/absent' .* is neither a local folder nor available"):
        resolve_model_path("acme/absent")
