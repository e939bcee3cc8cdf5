"""The pieces under the registry: PEFT's matching rules and scalings (checked against `peft`'s own
functions and the modules it actually wraps), the on-disk variants, and the segmented LoRA math
(checked against dense per-adapter delta weights)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from loraembed.errors import AdapterError
from loraembed.lora.layers import lora_module_shapes
from loraembed.lora.peft_format import is_targeted, parse_peft_adapter, pattern_value, read_peft_adapter
from loraembed.lora.segmented import apply_segmented_lora
from loraembed.packing import AdapterSegment
from tests.support.peft_adapters import make_peft_model

MODULE_NAMES = [
    f"{prefix}encoder.layer.{index}.{module}"
    for prefix in ("", "roberta.")
    for index in (0, 1, 11)
    for module in ("attention.self.query", "attention.self.value", "attention.output.dense", "intermediate.dense",
                   "output.dense")
] + ["pooler.dense", "embeddings.word_embeddings", "lm_head.dense", "layer.2.output.dense", "a..4.query", "h.3"]
TARGET_CONFIGS = [
    {"target_modules": ["output.dense"]},
    {"target_modules": ["query", "encoder.layer.0.output.dense"]},
    {"target_modules": ["dense"], "exclude_modules": ["attention.output.dense"]},
    {"target_modules": r".*layer\.1\..*(query|value)"},
    {"target_modules": r"encoder\.layer\.\d+\.output\.dense", "exclude_modules": r".*layer\.0\..*"},
    {"target_modules": ["query", "dense"], "layers_to_transform": [1, 11], "layers_pattern": "layer"},
    {"target_modules": ["query", "output.dense"], "layers_to_transform": 0},
    {"target_modules": ["value"], "layers_to_transform": [1], "layers_pattern": ["blocks", "layer"]},
    {"target_modules": ["dense", "query"], "layers_to_transform": [0, 2, 4], "layers_pattern": []},
    {"target_modules": ["output.dense"], "layers_to_transform": [11], "layers_pattern": r"lay.r"},
    {"target_modules": ["query"], "layers_to_transform": []},
    {"target_modules": ["encoder.layer.1.attention.self.query", "value"], "layers_to_transform": [0]},
    {"target_modules": ["dense"], "exclude_modules": r".*\.output\.dense"},
]


@pytest.mark.parametrize("config", TARGET_CONFIGS, ids=lambda config: json.dumps(config)[:60])
def test_target_matching_equals_peft(config):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists as peft_check

    peft_config = LoraConfig(**config)
    for name in MODULE_NAMES:
        assert is_targeted(config, name) == bool(peft_check(peft_config, name)), name


@pytest.mark.parametrize("patterns", [
    ["value", "layer.1.intermediate.dense"],
    ["output.dense", "query"],
    [r"encoder\.layer\.(0|11)\.attention\.self\.query", "dense"],
    [r"self\.(query|key)", "layer.1..*", "ense"],
    ["^encoder.layer.0.*", "roberta.encoder.layer.11.output.dense"],
])
def test_pattern_values_equal_peft(patterns):
    """rank_pattern/alpha_pattern lookups equal PEFT's `rank_pattern.get(get_pattern_key(...), r)`."""
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    values = {pattern: index + 100 for index, pattern in enumerate(patterns)}
    for name in MODULE_NAMES:
        expected = values.get(peft_get_pattern_key(values.keys(), name), 8)
        assert pattern_value(values, name, 8) == expected, name


ADAPTER_CONFIGS = {
    "suffix-output-dense": {"r": 3, "target_modules": ["output.dense"]},
    "regex": {"r": 2, "lora_alpha": 5, "target_modules": r".*layer\.1\.attention\.self\.(key|value)"},
    "all-linear": {"r": 2, "target_modules": "all-linear", "use_rslora": True},
    "layers": {"r": 2, "target_modules": ["query", "intermediate.dense"], "layers_to_transform": [1],
               "layers_pattern": "layer"},
    "exclude": {"r": 2, "target_modules": ["dense"], "exclude_modules": ["intermediate.dense"]},
    "patterns": {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["query", "key", "value"],
                 "rank_pattern": {"key": 2, "layer.0.attention.self.value": 7}, "alpha_pattern": {"value": 3}},
}


@pytest.mark.parametrize("name", list(ADAPTER_CONFIGS))
def test_adapter_reads_as_peft_wraps_it(name, tiny_xlmr_path, make_engine, tmp_path):
    """The modules, ranks and scalings we read are those of the LoRA layers PEFT built."""
    from peft.tuners.lora import LoraLayer

    model = make_peft_model(tiny_xlmr_path, seed=5, **ADAPTER_CONFIGS[name])
    model.save_pretrained(tmp_path)
    shapes = lora_module_shapes(make_engine(tiny_xlmr_path).model)
    adapter = read_peft_adapter(tmp_path, name, shapes, max_lora_rank=64)
    wrapped = {
        module_name.removeprefix("base_model.model."): module
        for module_name, module in model.named_modules()
        if isinstance(module, LoraLayer) and not module_name.removeprefix("base_model.model.").startswith("pooler.")
    }
    assert wrapped and set(adapter.modules) == set(wrapped)
    for module_name, module in wrapped.items():
        weights = adapter.modules[module_name]
        assert weights.rank == module.r["default"]
        assert weights.scaling == pytest.approx(module.scaling["default"], rel=1e-12)
        torch.testing.assert_close(weights.lora_a, module.lora_A["default"].weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(weights.lora_b, module.lora_B["default"].weight.detach(), rtol=0, atol=0)


def test_default_adapter_name_in_keys_and_pickled_weights(tiny_xlmr_path, make_engine, tmp_path):
    """Keys `...lora_A.default.weight` (some PEFT versions) and `adapter_model.bin` read the same."""
    model = make_peft_model(tiny_xlmr_path, seed=6, r=4, target_modules=["query", "value"])
    model.save_pretrained(tmp_path / "saved")
    shapes = lora_module_shapes(make_engine(tiny_xlmr_path).model)
    expected = read_peft_adapter(tmp_path / "saved", "saved", shapes, 64)
    state = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_bytes((tmp_path / "saved" / "adapter_config.json").read_bytes())
    torch.save({re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k): v for k, v in state.items()},
               tmp_path / "bin" / "adapter_model.bin")
    adapter = read_peft_adapter(tmp_path / "bin", "bin", shapes, 64)
    assert set(adapter.modules) == set(expected.modules) and len(adapter.modules) == 4
    for module_name, weights in adapter.modules.items():
        assert torch.equal(weights.lora_a, expected.modules[module_name].lora_a)
        assert torch.equal(weights.lora_b, expected.modules[module_name].lora_b)

    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterError, match=r"^adapter 'bin' cannot be served: adapter_model\.bin cannot be loaded with weights_only=True \("):
        read_peft_adapter(tmp_path / "bin", "bin", shapes, 64)


SHAPES = {f"encoder.layer.{i}.attention.self.query": (8, 8) for i in range(2)}
QUERY_0 = "base_model.model.encoder.layer.0.attention.self.query"
QUERY_1 = "base_model.model.encoder.layer.1.attention.self.query"


def _factors(key: str, rank: int = 2) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_A.weight": torch.ones(rank, 8), f"{key}.lora_B.weight": torch.ones(8, rank)}


@pytest.mark.parametrize(("config", "state", "problems"), [
    ({"r": 2, "target_modules": ["query"]},
     {**_factors(QUERY_0), f"{QUERY_1}.lora_A.weight": torch.ones(2, 8)},
     "incomplete LoRA weights: encoder.layer.1.attention.self.query has only lora_A"),
    ({"r": 2, "target_modules": ["query"]},
     {**_factors(QUERY_0), **_factors("base_model.model.encoder.layer.5.attention.self.query")},
     "LoRA weights for layers the base model does not have (2 layers): encoder.layer.5.attention.self.query; "
     "targeted modules without LoRA weights: encoder.layer.1.attention.self.query"),
    ({"r": 2, "target_modules": ["query"]},
     {**_factors(QUERY_0), f"{QUERY_1}.lora_A.weight": torch.full((2, 8), float("nan")),
      f"{QUERY_1}.lora_B.weight": torch.ones(8, 2)},
     "non-finite values (inf/nan) in the LoRA weights of encoder.layer.1.attention.self.query"),
    ({"r": 2, "target_modules": ["query"], "layers_to_transform": [0]},
     {**_factors(QUERY_0), **_factors(QUERY_1)},
     "weights for modules that target_modules does not target: encoder.layer.1.attention.self.query"),
    ({"r": 2, "target_modules": ["query"], "peft_type": "IA3"},
     {**_factors(QUERY_0), **_factors(QUERY_1)},
     "peft_type 'IA3' is not supported (only LORA)"),
    ({"r": 3, "target_modules": ["query"]},
     {**_factors(QUERY_0), **_factors(QUERY_1)},
     "shape mismatch with the base model: encoder.layer.0.attention.self.query lora_A [2, 8] / lora_B [8, 2], "
     "expected [3, 8] / [8, 3]; encoder.layer.1.attention.self.query lora_A [2, 8] / lora_B [8, 2], "
     "expected [3, 8] / [8, 3]"),
    ({"r": 2, "target_modules": ["query"]},
     {**_factors(QUERY_0), **_factors(QUERY_1), "base_model.model.encoder.layer.0.attention.self.query.weight": torch.ones(8, 8)},
     "1 tensors are not LoRA weights: encoder.layer.0.attention.self.query.weight"),
    ({"r": 2, "target_modules": ["query"]}, {}, "the weights contain no LoRA tensors"),
])
def test_parse_problems(config, state, problems):
    with pytest.raises(AdapterError, match=f"^{re.escape(f'adapter {chr(39)}x{chr(39)} cannot be served: {problems}')}$"):
        parse_peft_adapter(config, state, "x", SHAPES, max_lora_rank=64)


def test_layers_to_transform_reads_only_those_layers():
    adapter = parse_peft_adapter(
        {"r": 2, "lora_alpha": 6, "target_modules": ["query"], "layers_to_transform": 1, "layers_pattern": "layer"},
        _factors(QUERY_1), "x", SHAPES, max_lora_rank=64,
    )
    assert list(adapter.modules) == ["encoder.layer.1.attention.self.query"]
    assert adapter.modules["encoder.layer.1.attention.self.query"].scaling == 3.0


# --- segmented LoRA ------------------------------------------------------------------------------------


def test_segmented_lora_equals_dense_delta_weights():
    torch.manual_seed(0)
    tokens, in_features, widths, slots, max_rank = 40, 16, (12, 12, 12), 5, 6
    ranks = [[0, 6, 2, 0, 3], [0, 0, 4, 1, 3], [0, 5, 0, 6, 3]]  # per slice, per slot (slot 0 = base)
    lora_a = [torch.zeros(slots, max_rank, in_features, dtype=torch.float64) for _ in widths]
    lora_b = [torch.zeros(slots, width, max_rank, dtype=torch.float64) for width in widths]
    for index, width in enumerate(widths):
        for slot in range(1, slots):
            rank = ranks[index][slot]
            lora_a[index][slot, :rank] = torch.randn(rank, in_features, dtype=torch.float64)
            lora_b[index][slot, :, :rank] = torch.randn(width, rank, dtype=torch.float64)
    segments = [AdapterSegment(0, 0, 5), AdapterSegment(2, 5, 6), AdapterSegment(1, 6, 20),
                AdapterSegment(3, 20, 27), AdapterSegment(0, 27, 30), AdapterSegment(4, 30, 40)]
    x = torch.randn(tokens, in_features, dtype=torch.float64)
    base = torch.randn(tokens, sum(widths), dtype=torch.float64)

    expected = base.clone()
    for segment in segments:  # the delta weight [out, in] of the segment's adapter, all slices
        delta = torch.cat([lora_b[i][segment.slot] @ lora_a[i][segment.slot] for i in range(len(widths))])
        if segment.slot:
            expected[segment.token_start : segment.token_end] += x[segment.token_start : segment.token_end] @ delta.T

    rank_aware, padded = base.clone(), base.clone()
    apply_segmented_lora(x, rank_aware, lora_a, lora_b, segments, ranks)
    apply_segmented_lora(x, padded, lora_a, lora_b, segments)
    torch.testing.assert_close(rank_aware, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(rank_aware[:5], base[:5]) and torch.equal(rank_aware[27:30], base[27:30])  # base rows
    assert not torch.allclose(rank_aware[30:], base[30:])

    with pytest.raises(ValueError, match="^lora_b slices cover 24 output features, the output has 36$"):
        apply_segmented_lora(x, base.clone(), lora_a[:2], lora_b[:2], segments)


def test_invalid_regexes_are_problems_not_crashes():
    config = {"r": 2, "target_modules": "encoder.(query", "rank_pattern": {"[value": 4}}
    with pytest.raises(AdapterError, match=re.escape(
        "adapter 'x' cannot be served: 'encoder.(query' is not a valid regular expression "
        "(missing ), unterminated subpattern at position 8); '[value' is not a valid regular expression")):
        parse_peft_adapter(config, _factors(QUERY_0), "x", SHAPES, max_lora_rank=64)
