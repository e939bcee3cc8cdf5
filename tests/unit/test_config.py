"""Configuration read once: `EncoderConfig.from_hf` on HF's own config classes, `ServingConfig`
parameters with `LORAEMBED_*` overrides, request parameters, and settings resolved per model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loraembed.config import EncoderConfig, RequestOptions, ServingConfig
from loraembed.engine import ModelSettings
from loraembed.errors import ConfigurationError, InvalidParameterError


def hf_config(family: str, **overrides) -> dict:
    from transformers import BertConfig, CamembertConfig, RobertaConfig, XLMRobertaConfig

    classes = {"xlm-roberta": XLMRobertaConfig, "roberta": RobertaConfig, "camembert": CamembertConfig, "bert": BertConfig}
    return classes[family]().to_dict() | overrides


def hf_first_position(padding_idx: int) -> int:
    """Position id HF's RoBERTa-family embeddings give a sequence's first token."""
    from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEmbeddings

    return int(XLMRobertaEmbeddings.create_position_ids_from_input_ids(torch.tensor([[5, 6]]), padding_idx)[0, 0])


@pytest.mark.parametrize("model_type", ["xlm-roberta", "roberta", "camembert"])
@pytest.mark.parametrize("pad_token_id", [1, 0])
def test_roberta_family_positions_start_after_the_pad_id(model_type, pad_token_id):
    config = EncoderConfig.from_hf(hf_config(model_type, pad_token_id=pad_token_id))
    assert config.position_offset == hf_first_position(pad_token_id) == pad_token_id + 1
    assert config.max_sequence_length == config.max_position_embeddings - pad_token_id - 1


def test_bert_positions_start_at_zero():
    config = EncoderConfig.from_hf(hf_config("bert"))
    assert (config.position_offset, config.max_sequence_length) == (0, 512)
    assert (config.hidden_size, config.head_dim, config.hidden_act) == (768, 64, "gelu")


def test_xlmr_base_limit_is_512():
    config = EncoderConfig.from_hf(hf_config("xlm-roberta", max_position_embeddings=514, pad_token_id=1))
    assert config.max_sequence_length == 512


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model_type": "deberta-v2"}, r"model_type 'deberta-v2' is not supported \(supported: xlm-roberta, roberta"),
        ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported"),
        ({"position_embedding_type": "relative_key"}, r"position_embedding_type 'relative_key' is not supported \(only 'absolute'\)"),
        ({"position_embedding_type": "rotary"}, r"position_embedding_type 'rotary'"),
        ({"hidden_act": "silu"}, r"hidden_act 'silu' is not supported \(gelu, gelu_new"),
        ({"hidden_size": 30, "num_attention_heads": 4}, r"hidden_size is not a multiple of num_attention_heads"),
    ],
)
def test_unsupported_checkpoint_config(overrides, match):
    with pytest.raises(ConfigurationError, match=match):
        EncoderConfig.from_hf(hf_config("bert", **overrides))


def test_every_config_problem_is_named_at_once():
    with pytest.raises(ConfigurationError) as raised:
        EncoderConfig.from_hf(hf_config("bert", model_type="t5", position_embedding_type="relative_key", hidden_act="swish"))
    assert all(word in str(raised.value) for word in ("'t5'", "'relative_key'", "'swish'"))


# --- ServingConfig: config.pbtxt parameters, LORAEMBED_* overrides ---------------------------


def test_defaults_are_the_design_table():
    config = ServingConfig.from_parameters({}, environ={})
    assert config == ServingConfig()
    expected = dict(model="", revision="main", dtype="auto", pooling="auto", normalize=None, max_batch_tokens=16384,
                    max_seq_len=0, attention="auto", adapter_root="", adapter_preload=(), max_adapters=64,
                    max_lora_rank=64, allow_hub_adapters=False, merge_adapter="", gelu_approximation="auto",
                    cuda_graph_max_tokens=16384, cuda_graph_max_graphs=32, warmup="auto", gemm_tuning="false")
    assert {name: getattr(config, name) for name in expected} == expected


def test_parameters_are_parsed_to_types():
    config = ServingConfig.from_parameters(
        {"dtype": " BFloat16 ", "normalize": "true", "max_batch_tokens": "4096", "adapter_preload": "a, b,,c ",
         "allow_hub_adapters": "yes", "pooling": "MEAN", "max_seq_len": "0", "merge_adapter": " x "},
        environ={},
    )
    assert (config.dtype, config.normalize, config.max_batch_tokens, config.adapter_preload) == (
        "bfloat16", True, 4096, ("a", "b", "c"))
    assert (config.allow_hub_adapters, config.pooling, config.max_seq_len, config.merge_adapter) == (True, "mean", 0, "x")


@pytest.mark.parametrize("value, expected", [("auto", None), ("", None), ("true", True), ("0", False), ("OFF", False)])
def test_normalize_auto_or_bool(value, expected):
    assert ServingConfig.from_parameters({"normalize": value}, environ={}).normalize is expected


@pytest.mark.parametrize("value, expected", [(" Auto ", "auto"), ("true", "true"), ("1", "true"), ("OFF", "false")])
def test_warmup_auto_or_bool(value, expected):
    assert ServingConfig.from_parameters({"warmup": value}, environ={}).warmup == expected


@pytest.mark.parametrize("value, expected", [(" Auto ", "auto"), ("yes", "true"), ("0", "false")])
def test_gemm_tuning_auto_or_bool(value, expected):
    assert ServingConfig.from_parameters({"gemm_tuning": value}, environ={}).gemm_tuning == expected


def test_environment_overrides_every_parameter():
    environ = {"LORAEMBED_DTYPE": "float32", "LORAEMBED_MAX_ADAPTERS": "3", "LORAEMBED_MODEL": "/models/e5",
               "LORAEMBED_ADAPTER_PRELOAD": "tenant-a,tenant-b"}
    config = ServingConfig.from_parameters({"dtype": "float16", "max_adapters": "64"}, environ=environ)
    assert (config.dtype, config.max_adapters, config.model, config.adapter_preload) == (
        "float32", 3, "/models/e5", ("tenant-a", "tenant-b"))
    # Every field has its variable: LORAEMBED_<NAME>.
    for field in dataclasses.fields(ServingConfig):
        if field.type == "int":
            overridden = ServingConfig.from_parameters({}, environ={f"LORAEMBED_{field.name.upper()}": "7"})
            assert getattr(overridden, field.name) == 7, field.name


def test_variables_that_are_not_parameters_are_ignored():
    # make serve reads the port variables; they are not model parameters.
    environ = {"LORAEMBED_HTTP_PORT": "9000", "LORAEMBED_GRPC_PORT": "x", "DTYPE": "bogus", "loraembed_dtype": "bogus"}
    assert ServingConfig.from_parameters({}, environ=environ) == ServingConfig()


def test_explicit_environ_replaces_the_process_environment(monkeypatch):
    monkeypatch.setenv("LORAEMBED_MAX_BATCH_TOKENS", "2048")
    assert ServingConfig.from_parameters({}, environ={}).max_batch_tokens == 16384
    assert ServingConfig.from_parameters({}).max_batch_tokens == 2048  # default: os.environ


def test_unknown_parameter_names_are_rejected():
    with pytest.raises(ConfigurationError, match=r"unknown parameters max_batch_token, poolng \(known: adapter_preload, .*max_batch_tokens"):
        ServingConfig.from_parameters({"poolng": "cls", "max_batch_token": "8", "dtype": "auto"}, environ={})


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("dtype", "fp8", r"dtype='fp8' is not one of auto, bfloat16, float16, float32"),
        ("pooling", "max", r"pooling='max' is not one of auto, cls, mean"),
        ("attention", "xformers", r"attention='xformers' is not one of auto, triton_packed, flash_attn, torch_varlen, sdpa"),
        ("normalize", "maybe", r"normalize='maybe' is not a boolean"),
        ("allow_hub_adapters", "sure", r"allow_hub_adapters='sure' is not a boolean"),
        ("max_batch_tokens", "lots", r"max_batch_tokens='lots' is not an integer"),
        ("max_batch_tokens", "0", r"max_batch_tokens=0 is below the minimum 1"),
        ("max_seq_len", "-1", r"max_seq_len=-1 is below the minimum 0"),
        ("max_adapters", "2.5", r"max_adapters='2.5' is not an integer"),
        ("max_lora_rank", "0", r"max_lora_rank=0 is below the minimum 1"),
        ("gelu_approximation", "erf", r"gelu_approximation='erf' is not one of auto, none, tanh"),
        ("warmup", "later", r"warmup='later' is not auto, true or false"),
        ("gemm_tuning", "fast", r"gemm_tuning='fast' is not auto, true or false"),
        ("cuda_graph_max_graphs", "0", r"cuda_graph_max_graphs=0 is below the minimum 1"),
    ],
)
@pytest.mark.parametrize("source", ["parameter", "environment"])
def test_bad_values_are_configuration_errors(name, value, match, source):
    parameters, environ = ({name: value}, {}) if source == "parameter" else ({}, {f"LORAEMBED_{name.upper()}": value})
    with pytest.raises(ConfigurationError, match="invalid configuration: .*" + match):
        ServingConfig.from_parameters(parameters, environ=environ)


def test_every_parse_error_is_listed():
    environ = {"LORAEMBED_DTYPE": "fp8", "LORAEMBED_MAX_BATCH_TOKENS": "lots", "LORAEMBED_ALLOW_HUB_ADAPTERS": "sure"}
    with pytest.raises(ConfigurationError) as raised:
        ServingConfig.from_parameters({"pooling": "max"}, environ=environ)
    message = str(raised.value)
    assert all(text in message for text in ("dtype='fp8'", "max_batch_tokens='lots'", "allow_hub_adapters='sure'", "pooling='max'"))


# --- request parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameters, expected",
    [
        ({}, RequestOptions(normalize=True, truncate=True, dimensions=None)),
        ({"normalize": False}, RequestOptions(normalize=False)),
        ({"normalize": "false", "truncate": "false"}, RequestOptions(normalize=False, truncate=False)),
        ({"dimensions": 8}, RequestOptions(normalize=True, dimensions=8)),
        ({"dimensions": "8"}, RequestOptions(normalize=True, dimensions=8)),
        ({"dimensions": 8.0}, RequestOptions(normalize=True, dimensions=8)),
        ({"dimensions": 32}, RequestOptions(normalize=True, dimensions=32)),
        ({"dimensions": ""}, RequestOptions(normalize=True, dimensions=None)),
    ],
)
def test_request_options(parameters, expected):
    assert RequestOptions.from_parameters(parameters, default_normalize=True, hidden_size=32) == expected


def test_request_normalize_defaults_to_the_model_setting():
    assert RequestOptions.from_parameters({}, default_normalize=False, hidden_size=32).normalize is False


@pytest.mark.parametrize(
    "parameters, match",
    [
        ({"normalize": "maybe"}, r"normalize='maybe' is not a boolean"),
        ({"truncate": 2}, r"truncate=2 is not a boolean"),
        ({"dimensions": 0}, r"dimensions=0 is below the minimum 1"),
        ({"dimensions": -3}, r"dimensions=-3 is below the minimum 1"),
        ({"dimensions": 33}, r"dimensions=33 is larger than the embedding size 32"),
        ({"dimensions": "x"}, r"dimensions='x' is not an integer"),
        ({"dimensions": 2.5}, r"dimensions=2.5 is not an integer"),
        ({"dimensions": True}, r"dimensions=True is not an integer"),
        ({"dimensions": float("nan")}, r"dimensions=nan is not an integer"),
    ],
)
def test_bad_request_options(parameters, match):
    with pytest.raises(InvalidParameterError, match=match + r".*\(request parameters: normalize, truncate, dimensions\)"):
        RequestOptions.from_parameters(parameters, default_normalize=True, hidden_size=32)


# --- settings resolved from a checkpoint -----------------------------------------------------


def test_model_settings_without_sentence_transformers_files(tiny_xlmr_path):
    settings = ModelSettings.resolve(ServingConfig.from_parameters({"model": str(tiny_xlmr_path)}, environ={}))
    assert (settings.pooling, settings.default_normalize, settings.max_seq_len) == ("cls", False, 40)


@pytest.mark.parametrize("hidden_act, approximation, expected", [
    ("gelu", "tanh", "gelu_pytorch_tanh"), ("gelu", "none", "gelu"), ("gelu_new", "tanh", "gelu_new"), ("relu", "tanh", "relu"),
])
def test_gelu_approximation_replaces_only_the_exact_gelu(hidden_act, approximation, expected):
    config = EncoderConfig.from_hf({"model_type": "bert", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
                                    "num_attention_heads": 1, "intermediate_size": 8, "hidden_act": hidden_act,
                                    "max_position_embeddings": 8})
    assert config.with_gelu_approximation(approximation).hidden_act == expected


def test_model_settings_overrides(tiny_xlmr_path):
    parameters = {"model": str(tiny_xlmr_path), "pooling": "mean", "normalize": "true", "max_seq_len": "16"}
    settings = ModelSettings.resolve(ServingConfig.from_parameters(parameters, environ={}))
    assert (settings.pooling, settings.default_normalize, settings.max_seq_len) == ("mean", True, 16)


@pytest.mark.parametrize(
    "parameters, match",
    [
        ({"max_seq_len": "41"}, r"max_seq_len=41 exceeds the model's limit of 40 tokens"),
        ({"max_batch_tokens": "39"}, r"max_batch_tokens=39 must be at least max_seq_len=40"),
        ({"max_batch_tokens": "8", "max_seq_len": "9"}, r"max_batch_tokens=8 must be at least max_seq_len=9"),
    ],
)
def test_inconsistent_lengths_are_configuration_errors(tiny_xlmr_path, parameters, match):
    with pytest.raises(ConfigurationError, match=match):
        ModelSettings.resolve(ServingConfig.from_parameters({"model": str(tiny_xlmr_path), **parameters}, environ={}))
