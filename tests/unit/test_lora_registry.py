"""The adapter registry through the engine: mixed-adapter batches, device slots with LRU eviction,
rejected ids and adapter folders (each answered alone, the rest served), reloads, hub adapters
from the offline cache, and the counters published as metrics."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
from loraembed.errors import AdapterError, ConfigurationError
from tests.support.checkpoints import build_tiny_xlmr
from tests.support.peft_adapters import last_hidden_state, pooled, save_peft_adapter

PARITY_ATOL = 1e-4  # DESIGN.md: fp32 on CPU, max abs diff <= 1e-4
INVARIANCE_ATOL = 1e-5  # the same row alone or in a batch: only summation order may differ
LENGTHS = [9, 1, 17, 4, 12, 30]
ALL_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# Three ranks on different target sets, so one batch mixes ranks and routes into different slices.
MIXED_ADAPTERS = {
    "rank-2": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "intermediate.dense"]},
    "rank-4": {"r": 4, "lora_alpha": 8, "target_modules": ALL_TARGETS},
    "rank-8": {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": ["key", "value", "output.dense"]},
}
EVICTION_ADAPTERS = [f"tenant-{index}" for index in range(5)]


def make_engine(model_path: Path, **parameters) -> EmbeddingEngine:
    """A fresh engine (registries hold state these tests count), cls pooling, no normalization."""
    parameters = {"model": str(model_path), "pooling": "cls", "normalize": "false", **parameters}
    return EmbeddingEngine(ServingConfig.from_parameters({k: str(v) for k, v in parameters.items()}, environ={}))


def raise_if_error(result):
    if isinstance(result, Exception):
        raise result
    return result


@dataclass
class Fixture:
    model_path: Path
    adapter_root: Path
    input_ids: np.ndarray
    attention_mask: np.ndarray
    expected: dict[str, np.ndarray]  # adapter id ("" = base) -> peft's cls embeddings [n, H]


def _row(fixture: Fixture, row: int) -> tuple[np.ndarray, np.ndarray]:
    length = int(fixture.attention_mask[row].sum())
    return fixture.input_ids[row : row + 1, :length], fixture.attention_mask[row : row + 1, :length]


def _build(model_path, root, adapters, token_sequences, pad_right) -> Fixture:
    config = make_engine(model_path).settings.encoder_config
    input_ids, attention_mask = pad_right(token_sequences(config, LENGTHS, seed=11), config.pad_token_id)
    expected = {}
    for seed, (name, options) in enumerate(adapters.items(), start=100):
        model = save_peft_adapter(root / name, model_path, seed=seed, **options)
        expected[name] = pooled(last_hidden_state(model, input_ids, attention_mask), attention_mask, "cls")
        expected[""] = pooled(last_hidden_state(model, input_ids, attention_mask, adapter=False), attention_mask, "cls")
    for name in adapters:  # each adapter really changes the output, so a mix-up cannot pass
        assert np.abs(expected[name] - expected[""]).max() > 1e-2
    return Fixture(model_path, root, input_ids, attention_mask, expected)


@pytest.fixture(scope="module", params=["xlmr", "bert"])
def mixed(request, tiny_xlmr_path, tiny_bert_path, tmp_path_factory, token_sequences, pad_right) -> Fixture:
    model_path = {"xlmr": tiny_xlmr_path, "bert": tiny_bert_path}[request.param]
    return _build(model_path, tmp_path_factory.mktemp("mixed"), MIXED_ADAPTERS, token_sequences, pad_right)


@pytest.fixture(scope="module")
def tenants(tiny_xlmr_path, tmp_path_factory, token_sequences, pad_right) -> Fixture:
    targets = [["query", "value", "intermediate.dense"], ["key", "attention.output.dense", "output.dense"]]
    adapters = {
        name: {"r": 2 + index, "lora_alpha": 8, "target_modules": targets[index % 2]}
        for index, name in enumerate(EVICTION_ADAPTERS)
    }
    return _build(tiny_xlmr_path, tmp_path_factory.mktemp("tenants"), adapters, token_sequences, pad_right)


# --- one batch, many adapters -------------------------------------------------------------------


def test_mixed_batch_equals_each_row_alone(mixed):
    engine = make_engine(mixed.model_path, adapter_root=mixed.adapter_root)
    plain = make_engine(mixed.model_path)
    ids, mask = mixed.input_ids, mixed.attention_mask
    per_text = ["rank-2", "", "rank-8", "rank-4", "", "rank-2"]  # one request, one adapter per text
    requests = [
        EncoderRequest(ids, mask, adapter_ids=per_text),
        EncoderRequest(ids[:3], mask[:3], adapter_ids=["rank-4"]),
        EncoderRequest(ids[3:], mask[3:]),
    ]
    results = [raise_if_error(result) for result in engine.embed(requests)]

    # The packed batch really mixed three adapter segments and base rows.
    usage = engine.adapters.snapshot().usage
    assert {name: usage[name].texts for name in ("", "rank-2", "rank-4", "rank-8")} == {
        "": 5, "rank-2": 2, "rank-4": 4, "rank-8": 1
    }
    for row, adapter_id in enumerate(per_text):
        [alone] = engine.embed([EncoderRequest(*_row(mixed, row), adapter_ids=[adapter_id])])
        np.testing.assert_allclose(results[0][row], raise_if_error(alone)[0], rtol=0, atol=INVARIANCE_ATOL)
        np.testing.assert_allclose(results[0][row], mixed.expected[adapter_id][row], rtol=0, atol=PARITY_ATOL)
        if adapter_id == "":
            [no_adapters] = plain.embed([EncoderRequest(*_row(mixed, row))])
            np.testing.assert_allclose(results[0][row], no_adapters[0], rtol=0, atol=INVARIANCE_ATOL)
    np.testing.assert_allclose(results[1], mixed.expected["rank-4"][:3], rtol=0, atol=PARITY_ATOL)
    [no_adapters] = plain.embed([EncoderRequest(ids[3:], mask[3:])])
    np.testing.assert_allclose(results[2], no_adapters, rtol=0, atol=INVARIANCE_ATOL)


def test_layers_no_adapter_targets_stay_plain(mixed):
    """Only linears some resident adapter targets get LoRA buffers; a base-only batch skips LoRA."""
    engine = make_engine(mixed.model_path, adapter_root=mixed.adapter_root)
    layers = engine.adapters.layers
    assert all(linear.rank_capacity == 0 for linear in layers.linears.values())
    raise_if_error(engine.embed([EncoderRequest(*_row(mixed, 0), adapter_ids=["rank-2"])])[0])
    capacity = {name.split(".", 3)[3]: linear.rank_capacity for name, linear in layers.linears.items()}
    assert capacity == {"attention.self.qkv": 2, "intermediate.dense": 2, "attention.output.dense": 0, "output.dense": 0}
    qkv = layers.linears["encoder.layer.0.attention.self.qkv"]
    slot = engine.adapters._resident["rank-2"].slot
    assert [ranks[slot] for ranks in qkv.slot_ranks] == [2, 0, 0]  # query only; key and value untouched


def test_grown_lora_buffers_are_not_kept_by_cached_descriptors(mixed):
    """The Gluon kernel caches the TMA descriptors of the weights and B buffers, and a descriptor holds
    its tensor. When a larger rank grows a linear's buffers, the cache is dropped, so the replaced
    buffer is freed. On the CPU no Gluon kernel runs: a stand-in descriptor holds the buffer."""
    import gc
    import types
    import weakref

    import loraembed.lora.lora_gemm_gluon as lora_gemm_gluon

    engine = make_engine(mixed.model_path, adapter_root=mixed.adapter_root)
    raise_if_error(engine.embed([EncoderRequest(*_row(mixed, 0), adapter_ids=["rank-2"])])[0])
    qkv = engine.adapters.layers.linears["encoder.layer.0.attention.self.qkv"]
    assert qkv.rank_capacity == 2
    replaced = weakref.ref(qkv.lora_b_cat)
    lora_gemm_gluon._STATIC_DESCRIPTORS[("stand-in",)] = types.SimpleNamespace(base=qkv.lora_b_cat)
    raise_if_error(engine.embed([EncoderRequest(*_row(mixed, 0), adapter_ids=["rank-8"])])[0])  # key, value: 8
    assert qkv.rank_capacity == 8
    gc.collect()
    assert replaced() is None
    assert ("stand-in",) not in lora_gemm_gluon._STATIC_DESCRIPTORS


# --- device slots ----------------------------------------------------------------------------------


def test_eviction_serves_five_adapters_with_two_slots(tenants):
    engine = make_engine(tenants.model_path, adapter_root=tenants.adapter_root, max_adapters=2)
    ids, mask = tenants.input_ids, tenants.attention_mask
    sequence = ["tenant-0", "tenant-1", "tenant-2", "tenant-0", "tenant-3", "tenant-4", "tenant-4", ""]
    for adapter_id in sequence:
        [result] = engine.embed([EncoderRequest(ids, mask, adapter_ids=[adapter_id])])
        np.testing.assert_allclose(raise_if_error(result), tenants.expected[adapter_id], rtol=0, atol=PARITY_ATOL)
    metrics = engine.adapters.snapshot()
    assert (metrics.loads, metrics.evictions, metrics.resident, metrics.capacity) == (6, 4, 2, 2)
    assert engine.adapters.resident_adapters() == ["tenant-3", "tenant-4"]

    # Interleaved in one call: the engine cuts it into groups of at most two adapters.
    interleaved = ["tenant-0", "tenant-3", "tenant-1", "tenant-4", "tenant-2", "tenant-0", ""]
    results = engine.embed([EncoderRequest(ids, mask, adapter_ids=[adapter_id]) for adapter_id in interleaved])
    for adapter_id, result in zip(interleaved, results):
        np.testing.assert_allclose(raise_if_error(result), tenants.expected[adapter_id], rtol=0, atol=PARITY_ATOL)
    # Per-text ids: two adapters in one request fit; three do not, and only that request fails.
    rows = len(LENGTHS)
    two = ["tenant-1", "tenant-2"] * (rows // 2)
    three = (["tenant-1", "tenant-2", "tenant-3"] * rows)[:rows]
    fits, too_many = engine.embed([EncoderRequest(ids, mask, adapter_ids=two), EncoderRequest(ids, mask, adapter_ids=three)])
    for row, adapter_id in enumerate(two):
        np.testing.assert_allclose(raise_if_error(fits)[row], tenants.expected[adapter_id][row], rtol=0, atol=PARITY_ATOL)
    message = "the request names 3 different adapters; at most max_adapters=2 fit on the device at once"
    with pytest.raises(AdapterError, match=f"^{re.escape(message)}$"):
        raise_if_error(too_many)

    metrics = engine.adapters.snapshot()
    assert metrics.resident == 2 and metrics.loads == metrics.evictions + metrics.resident
    tokens = int(mask.sum())
    assert metrics.usage["tenant-4"].requests == 3  # twice in sequence, once interleaved
    assert metrics.usage["tenant-4"].texts == 3 * rows and metrics.usage["tenant-4"].tokens == 3 * tokens
    assert metrics.usage["tenant-0"].requests == 4 and metrics.usage["tenant-0"].tokens == 4 * tokens
    assert metrics.usage["tenant-1"].texts == 2 * rows + len(two) // 2
    assert metrics.usage[""].requests == 2 and metrics.usage[""].texts == 2 * rows
    assert metrics.load_failures == 0 and metrics.load_seconds > 0


def test_a_reused_slot_keeps_nothing_of_its_previous_adapter(mixed):
    """One slot, adapters on different targets in turn: each sees only its own LoRA."""
    engine = make_engine(mixed.model_path, adapter_root=mixed.adapter_root, max_adapters=1)
    ids, mask = mixed.input_ids, mixed.attention_mask
    for adapter_id in ["rank-4", "rank-2", "rank-8", "rank-2", ""]:
        [result] = engine.embed([EncoderRequest(ids, mask, adapter_ids=[adapter_id])])
        np.testing.assert_allclose(raise_if_error(result), mixed.expected[adapter_id], rtol=0, atol=PARITY_ATOL)
    assert engine.adapters.snapshot().evictions == 3


def test_acquire_never_evicts_an_adapter_the_batch_uses(tenants):
    engine = make_engine(tenants.model_path, adapter_root=tenants.adapter_root, max_adapters=2)
    registry = engine.adapters
    first = registry.acquire({"tenant-0", "tenant-1"})
    assert sorted(first.values()) == [1, 2]
    third = registry.acquire({"tenant-2"})["tenant-2"]
    message = "adapter 'tenant-2' cannot be loaded: all max_adapters=2 device slots hold adapters of this batch"
    with pytest.raises(AdapterError, match=f"^{re.escape(message)}$"):
        raise third
    registry.release()
    assert registry.acquire({"tenant-2"})["tenant-2"] == first["tenant-0"]  # least recently used
    registry.release()
    assert registry.snapshot().evictions == 1


def test_preload_loads_at_start_and_rejects_bad_ids(tenants):
    engine = make_engine(
        tenants.model_path, adapter_root=tenants.adapter_root, max_adapters=3, adapter_preload="tenant-1,tenant-2"
    )
    assert sorted(engine.adapters.resident_adapters()) == ["tenant-1", "tenant-2"]
    assert engine.adapters.snapshot().loads == 2
    with pytest.raises(ConfigurationError, match=r"^adapter_preload failed: adapter 'nope' not found"):
        make_engine(tenants.model_path, adapter_root=tenants.adapter_root, adapter_preload="tenant-1,nope")
    with pytest.raises(ConfigurationError, match="^adapter_preload names 3 adapters, more than max_adapters=2$"):
        make_engine(tenants.model_path, adapter_root=tenants.adapter_root, max_adapters=2,
                    adapter_preload="tenant-0,tenant-1,tenant-2")


def test_warm_up_runs_each_kind_of_batch_and_leaves_no_trace(tenants, monkeypatch):
    """`warm_up` (the encoder model calls it on a GPU) embeds a query, a full batch, the full batch
    split between two resident adapters, two queries of two adapters and one of one, in requests
    within max_texts_per_request; afterwards the usage counters are empty (the preloads' loads stay)
    and requests still match peft."""
    engine = make_engine(tenants.model_path, adapter_root=tenants.adapter_root, max_adapters=3,
                         adapter_preload="tenant-1,tenant-2", max_texts_per_request=8, warmup="true")
    assert engine.warmup_enabled
    assert not make_engine(tenants.model_path).warmup_enabled  # "auto" on a CPU
    seen = []
    activate = engine.adapters.activate

    def spy(batch, plan_layers=True):
        seen.append((batch.num_tokens, tuple(segment.slot for segment in batch.adapter_segments)))
        return activate(batch, plan_layers)

    monkeypatch.setattr(engine.adapters, "activate", spy)
    seconds = engine.warm_up()
    assert seconds > 0 and engine.startup_seconds["warm-up"] == seconds
    slots = {name: engine.adapters.acquire({name})[name] for name in ("tenant-1", "tenant-2")}
    engine.adapters.release()
    full = engine.serving.max_batch_tokens // min(144, engine.settings.max_seq_len) * min(144, engine.settings.max_seq_len)
    first, second = sorted(slots.values())
    assert [slots for _, slots in seen] == [(0,), (0,), (first, second), (first, second), (slots["tenant-1"],)]
    assert [tokens for tokens, _ in seen] == [16, full, full, 32, 16]
    metrics = engine.metrics_snapshot()
    assert (metrics.forward_passes, metrics.forward_tokens, dict(metrics.usage)) == (0, 0, {})
    assert metrics.loads == 2
    ids, mask = _row(tenants, 2)
    [result] = engine.embed([EncoderRequest(ids, mask, ["tenant-1"])])
    np.testing.assert_allclose(raise_if_error(result)[0], tenants.expected["tenant-1"][2], atol=PARITY_ATOL)
    assert engine.metrics_snapshot().forward_passes == 1


# --- rejections --------------------------------------------------------------------------------------

GOOD = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}


@pytest.fixture(scope="module")
def rejections(tiny_xlmr_path, tmp_path_factory, token_sequences, pad_right):
    """An engine (max_lora_rank=8) over a root of good and bad adapters, and peft's answers."""
    root = tmp_path_factory.mktemp("rejections")
    fixture = _build(tiny_xlmr_path, root, {"good": GOOD}, token_sequences, pad_right)
    save_peft_adapter(root / "dora", tiny_xlmr_path, r=4, target_modules=["query"], use_dora=True)
    save_peft_adapter(root / "rank-16", tiny_xlmr_path, r=16, target_modules=["query"])
    save_peft_adapter(root / "modules-to-save", tiny_xlmr_path, r=4, target_modules=["query"], modules_to_save=["pooler"])
    save_peft_adapter(root / "bias", tiny_xlmr_path, r=4, target_modules=["query"], bias="all")
    save_peft_adapter(root / "embedding", tiny_xlmr_path, r=4, target_modules=["word_embeddings", "query"])
    other_size = build_tiny_xlmr(tmp_path_factory.mktemp("xlmr-48"), hidden_size=48, intermediate_size=96)
    save_peft_adapter(root / "hidden-48", other_size, **GOOD)

    shutil.copytree(root / "good", root / "corrupt")
    weights = (root / "corrupt" / "adapter_model.safetensors").read_bytes()
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])  # cut short
    shutil.copytree(root / "good", root / "unknown-target")
    config = json.loads((root / "unknown-target" / "adapter_config.json").read_text())
    (root / "unknown-target" / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["query", "value", "q_proj"]})
    )
    shutil.copytree(root / "good", root / "no-config")
    (root / "no-config" / "adapter_config.json").unlink()

    outside = tmp_path_factory.mktemp("outside-the-root")
    shutil.copytree(root / "good", outside / "good")
    (root / "escape").symlink_to(outside / "good", target_is_directory=True)
    (root / "file-link").mkdir()
    (root / "file-link" / "adapter_config.json").symlink_to(outside / "good" / "adapter_config.json")
    shutil.copy(root / "good" / "adapter_model.safetensors", root / "file-link")
    (root / "inner-link").symlink_to(root / "good", target_is_directory=True)  # inside: allowed

    engine = make_engine(tiny_xlmr_path, adapter_root=root, max_lora_rank=8)
    return engine, fixture


def _cannot_serve(adapter_id: str, problems: str) -> str:
    return f"^{re.escape(f'adapter {adapter_id!r} cannot be served: {problems}')}$"


NOT_A_PATH = "is not valid: adapter ids are names, not paths (A-Z a-z 0-9 . _ - only; org/name[@revision] for a hub adapter)"
REJECTIONS = [
    ("../x", "^" + re.escape(f"adapter id '../x' {NOT_A_PATH}") + "$"),
    ("/etc/passwd", "^" + re.escape(f"adapter id '/etc/passwd' {NOT_A_PATH}") + "$"),
    ("a/../b", "^" + re.escape(f"adapter id 'a/../b' {NOT_A_PATH}") + "$"),
    ("a\\b", "^" + re.escape(f"adapter id 'a\\\\b' {NOT_A_PATH}") + "$"),
    ("..", "^" + re.escape("adapter id '..' is not valid: '.' and '..' are not adapter names") + "$"),
    ("   ", "^" + re.escape(
        "adapter id '   ' is not valid: use 1 to 128 characters from A-Z a-z 0-9 . _ - "
        "(or org/name[@revision] for a hub adapter)") + "$"),
    ("x" * 300, "^" + re.escape(f"adapter id '{'x' * 40}'... is 300 characters long; the limit is 128") + "$"),
    ("org/name", "^" + re.escape(
        "adapter id 'org/name' names a hub adapter (org/name[@revision]), but allow_hub_adapters is off") + "$"),
    ("missing", "^" + re.escape("adapter 'missing' not found: adapter_root has no folder of that name") + "$"),
    ("escape", "^" + re.escape("adapter 'escape' resolves outside adapter_root; it is not served") + "$"),
    ("file-link", "^" + re.escape(
        "adapter 'file-link': adapter_config.json resolves outside adapter_root; it is not served") + "$"),
    ("corrupt", "^" + re.escape(
        "adapter 'corrupt' cannot be served: adapter_model.safetensors is not a valid safetensors file (")),
    ("no-config", _cannot_serve("no-config", "adapter_config.json is missing")),
    ("hidden-48", "^" + re.escape(
        "adapter 'hidden-48' cannot be served: shape mismatch with the base model: "
        "encoder.layer.0.attention.self.query lora_A [4, 48] / lora_B [48, 4], expected [4, 32] / [32, 4]; "
        "encoder.layer.0.attention.self.value lora_A [4, 48] / lora_B [48, 4], expected [4, 32] / [32, 4]; "
        "encoder.layer.1.attention.self.query lora_A [4, 48] / lora_B [48, 4], expected [4, 32] / [32, 4]; "
        "and 1 more") + "$"),
    ("dora", _cannot_serve("dora", "DoRA (use_dora) is not supported")),
    ("rank-16", _cannot_serve("rank-16", "rank 16 is above max_lora_rank=8")),
    ("modules-to-save", _cannot_serve("modules-to-save", "modules_to_save ['pooler'] is not supported")),
    ("bias", _cannot_serve("bias", "bias='all' is not supported (only 'none')")),
    ("embedding", _cannot_serve(
        "embedding", "embedding LoRA (embeddings.word_embeddings) is not supported")),
    ("unknown-target", _cannot_serve("unknown-target", (
        "unknown target_modules 'q_proj' (supported: query, key, value, attention.output.dense, "
        "intermediate.dense, output.dense)"))),
]


@pytest.mark.parametrize(("adapter_id", "message"), REJECTIONS, ids=[case[0][:20] for case in REJECTIONS])
def test_rejected_adapter_fails_alone(rejections, adapter_id, message):
    engine, fixture = rejections
    ids, mask = fixture.input_ids, fixture.attention_mask
    bad, good, base, inner = engine.embed([
        EncoderRequest(ids, mask, adapter_ids=[adapter_id]),
        EncoderRequest(ids, mask, adapter_ids=["good"]),
        EncoderRequest(ids, mask),
        EncoderRequest(ids, mask, adapter_ids=["inner-link"]),  # a symlink that stays inside the root
    ])
    with pytest.raises(AdapterError, match=message):
        raise_if_error(bad)
    np.testing.assert_allclose(raise_if_error(good), fixture.expected["good"], rtol=0, atol=PARITY_ATOL)
    np.testing.assert_allclose(raise_if_error(base), fixture.expected[""], rtol=0, atol=PARITY_ATOL)
    np.testing.assert_allclose(raise_if_error(inner), fixture.expected["good"], rtol=0, atol=PARITY_ATOL)
    # Asking again gives the same answer (from the failure cache for adapters whose files exist).
    with pytest.raises(AdapterError, match=message):
        raise_if_error(engine.embed([EncoderRequest(ids, mask, adapter_ids=[adapter_id])])[0])


def test_every_problem_is_listed_in_one_error(rejections, tmp_path):
    engine, fixture = rejections
    folder = Path(engine.serving.adapter_root) / "many-problems"
    shutil.copytree(Path(engine.serving.adapter_root) / "rank-16", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(use_dora=True, bias="lora_only", modules_to_save=["classifier"], target_modules=["query", "LayerNorm"])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    [result] = engine.embed([EncoderRequest(fixture.input_ids, fixture.attention_mask, adapter_ids=["many-problems"])])
    with pytest.raises(AdapterError, match=_cannot_serve("many-problems", (
        "DoRA (use_dora) is not supported; modules_to_save ['classifier'] is not supported; "
        "bias='lora_only' is not supported (only 'none'); rank 16 is above max_lora_rank=8; "
        "unknown target_modules 'LayerNorm' (supported: query, key, value, attention.output.dense, "
        "intermediate.dense, output.dense)"))):
        raise_if_error(result)


# --- reload, hub -------------------------------------------------------------------------------------


def test_changed_adapter_folder_is_reloaded(tenants, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tenants.adapter_root / "tenant-0", root / "live")
    engine = make_engine(tenants.model_path, adapter_root=root, max_adapters=2)
    ids, mask = tenants.input_ids, tenants.attention_mask

    def embed_live():
        return engine.embed([EncoderRequest(ids, mask, adapter_ids=["live"])])[0]

    np.testing.assert_allclose(raise_if_error(embed_live()), tenants.expected["tenant-0"], rtol=0, atol=PARITY_ATOL)
    np.testing.assert_allclose(raise_if_error(embed_live()), tenants.expected["tenant-0"], rtol=0, atol=PARITY_ATOL)
    assert engine.adapters.snapshot().loads == 1  # unchanged files are not read again

    for name in ("adapter_config.json", "adapter_model.safetensors"):  # other rank, targets and weights
        shutil.copy(tenants.adapter_root / "tenant-3" / name, root / "live" / name)
    np.testing.assert_allclose(raise_if_error(embed_live()), tenants.expected["tenant-3"], rtol=0, atol=PARITY_ATOL)
    assert (engine.adapters.snapshot().reloads, engine.adapters.snapshot().loads) == (1, 2)

    (root / "live" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)  # a broken copy: served no more
    with pytest.raises(AdapterError, match="adapter_model.safetensors is not a valid safetensors file"):
        raise_if_error(embed_live())
    assert engine.adapters.resident_adapters() == []
    shutil.copy(tenants.adapter_root / "tenant-1" / "adapter_model.safetensors", root / "live")
    shutil.copy(tenants.adapter_root / "tenant-1" / "adapter_config.json", root / "live")
    np.testing.assert_allclose(raise_if_error(embed_live()), tenants.expected["tenant-1"], rtol=0, atol=PARITY_ATOL)
    assert engine.adapters.snapshot().load_failures == 1

    shutil.rmtree(root / "live")  # removed: no longer served, its slot is freed
    with pytest.raises(AdapterError, match="^adapter 'live' not found"):
        raise_if_error(embed_live())
    assert engine.adapters.snapshot().resident == 0


def test_hub_adapter_from_the_offline_cache(tenants, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tenant-2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tenants.adapter_root / "tenant-2", repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    engine = make_engine(tenants.model_path, allow_hub_adapters="true")
    ids, mask = tenants.input_ids, tenants.attention_mask
    served, pinned, absent, local = engine.embed([
        EncoderRequest(ids, mask, adapter_ids=["acme/tenant-2"]),
        EncoderRequest(ids, mask, adapter_ids=[f"acme/tenant-2@{commit}"]),
        EncoderRequest(ids, mask, adapter_ids=["acme/absent"]),
        EncoderRequest(ids, mask, adapter_ids=["tenant-2"]),
    ])
    np.testing.assert_allclose(raise_if_error(served), tenants.expected["tenant-2"], rtol=0, atol=PARITY_ATOL)
    np.testing.assert_allclose(raise_if_error(pinned), tenants.expected["tenant-2"], rtol=0, atol=PARITY_ATOL)
    with pytest.raises(AdapterError, match="^hub adapter 'acme/absent' is not available from the hub or its offline cache"):
        raise_if_error(absent)
    with pytest.raises(AdapterError, match="^adapter 'tenant-2' is not available: no adapter_root is configured$"):
        raise_if_error(local)


def test_base_only_engine_counts_and_refuses_adapters(tenants):
    engine = make_engine(tenants.model_path)
    ids, mask = tenants.input_ids, tenants.attention_mask
    base, named = engine.embed([EncoderRequest(ids, mask), EncoderRequest(ids, mask, adapter_ids=["tenant-0"])])
    np.testing.assert_allclose(raise_if_error(base), tenants.expected[""], rtol=0, atol=PARITY_ATOL)
    with pytest.raises(AdapterError, match="this server has no adapters configured"):
        raise_if_error(named)
    usage = engine.adapters.snapshot().usage
    assert (usage[""].requests, usage[""].texts, usage[""].tokens) == (1, len(LENGTHS), int(mask.sum()))


def test_adapter_root_must_exist(tiny_xlmr_path, tmp_path):
    with pytest.raises(ConfigurationError, match="^adapter_root '.*/absent' is not a folder$"):
        make_engine(tiny_xlmr_path, adapter_root=tmp_path / "absent")
    with pytest.raises(ConfigurationError, match="^merge_adapter: adapter 'nope' not found"):
        make_engine(tiny_xlmr_path, adapter_root=tmp_path, merge_adapter="nope")


def test_a_failed_load_evicts_nothing(rejections, tenants):
    """With every slot taken, a broken adapter is answered with its error; the residents stay."""
    engine = make_engine(tenants.model_path, adapter_root=Path(rejections[0].serving.adapter_root), max_adapters=1)
    ids, mask = tenants.input_ids, tenants.attention_mask
    raise_if_error(engine.embed([EncoderRequest(ids, mask, adapter_ids=["good"])])[0])
    [broken] = engine.embed([EncoderRequest(ids, mask, adapter_ids=["dora"])])
    with pytest.raises(AdapterError, match="DoRA"):
        raise_if_error(broken)
    assert engine.adapters.resident_adapters() == ["good"]
    metrics = engine.adapters.snapshot()
    assert (metrics.loads, metrics.evictions, metrics.load_failures) == (1, 0, 1)


def test_one_pass_signature_equals_the_reference(tmp_path):
    """The locator's per-batch check (one lstat per path, resolving only links) gives the signature
    `file_signature` gives, for plain folders, folders and files linked inside the root, missing
    files and dangling links; a linked file's signature follows its target, so replacing the
    target is seen as a change."""
    from loraembed.lora.peft_format import ADAPTER_CONFIG_FILE, SAFETENSORS_WEIGHTS_FILE
    from loraembed.lora.registry import AdapterLocator, file_signature

    root = tmp_path / "root"
    plain = root / "plain"
    plain.mkdir(parents=True)
    (plain / ADAPTER_CONFIG_FILE).write_text("{}")
    (plain / SAFETENSORS_WEIGHTS_FILE).write_bytes(b"12345678")
    (root / "linked-folder").symlink_to(plain, target_is_directory=True)
    files = root / "linked-files"
    files.mkdir()
    (files / ADAPTER_CONFIG_FILE).symlink_to(plain / ADAPTER_CONFIG_FILE)
    (files / SAFETENSORS_WEIGHTS_FILE).symlink_to(root / "store" / "missing.safetensors")  # dangling, inside
    locator = AdapterLocator(str(root), allow_hub_adapters=False)
    for adapter_id in ("plain", "linked-folder", "linked-files"):
        folder, signature = locator.folder_and_signature(locator.parse(adapter_id))
        assert folder == str((root / adapter_id).resolve())
        assert signature == file_signature(Path(folder)), adapter_id
    before = locator.folder_and_signature(locator.parse("linked-files"))[1]
    (root / "store").mkdir()
    (root / "store" / "missing.safetensors").write_bytes(b"now here")
    after = locator.folder_and_signature(locator.parse("linked-files"))[1]
    assert after != before and after == file_signature(files)
    with pytest.raises(AdapterError, match="^adapter 'absent' not found: adapter_root has no folder of that name$"):
        locator.folder_and_signature(locator.parse("absent"))
    (root / "a-file").write_text("not a folder")
    with pytest.raises(AdapterError, match="^adapter 'a-file' not found"):
        locator.folder_and_signature(locator.parse("a-file"))
    (root / "through-a-file").symlink_to(root / "a-file" / "x")  # ENOTDIR, as the old check: not found
    with pytest.raises(AdapterError, match="^adapter 'through-a-file' not found"):
        locator.folder_and_signature(locator.parse("through-a-file"))
    # Ids are validated names, but the check does not rely on it: a path-like name never leaves the root.
    from loraembed.lora.registry import AdapterName

    (tmp_path / "outside").mkdir()
    for adapter_id in ("../outside", str(tmp_path / "outside"), "..", "."):
        with pytest.raises(AdapterError, match="resolves outside adapter_root"):
            locator.folder_and_signature(AdapterName(adapter_id))
