"""The LoRA batch plans of `LoraLayers` on the CPU, in float64: the block-table shrink/expand, the
expand deferred to the consumer (GELU / residual + LayerNorm, `fused_ops.LoraDelta`) and the
single-adapter merge all equal the per-segment reference, for every activation, mixed ranks,
zero-rank slots, base rows and empty segments; the tables they plan, and the fused GEMM's tile
table. (The same plans with the Triton kernels: tests/gpu/test_lora_fusion.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loraembed.encoder as encoder_module
import loraembed.lora.layers as layers_module
from loraembed.fused_ops import LoraDelta
from loraembed.lora import lora_gemm_triton
from loraembed.lora.layers import LoraLayers
from loraembed.lora.sgmv_triton import BLOCK_T, build_lora_batch_tables
from loraembed.packing import AdapterSegment
from tests.support.lora_models import encoder_config, fill_random_adapters, packed_batch, random_encoder, set_plan

SLOT_RANKS = {1: 2, 2: 8, 3: 5, 4: 3}


def skip_some(slot: int, name: str) -> bool:
    """Slot 3 has no LoRA on intermediate.dense and value: zero-rank slots in those linears."""
    return slot == 3 and name.endswith(("intermediate.dense", "attention.self.value"))


LAYOUTS = {
    "mixed": ([7, 3, 12, 1, 9, 30, 4], [0, 2, 2, 1, 0, 3, 4]),
    "one adapter": ([7, 3, 12, 70], [2, 2, 2, 2]),
    "adapter without LoRA in some linears": ([5, 9], [3, 3]),
    "base only": ([7, 3], [0, 0]),
    "adapter and base": ([66, 5], [1, 0]),
}


@pytest.fixture(scope="module", params=["gelu", "relu", "gelu_new"])
def model_and_layers(request):
    model = random_encoder(encoder_config(hidden=24, intermediate=40, layers=2, heads=4, hidden_act=request.param),
                           torch.float64, "cpu", seed=1)
    layers = LoraLayers(model, num_slots=5)
    fill_random_adapters(layers, SLOT_RANKS, seed=2, skip=skip_some)
    return model, layers


def run(model, layers, batch, plan, segments=None) -> torch.Tensor:
    set_plan(layers, plan)
    layers.activate(batch.adapter_segments if segments is None else segments)
    try:
        with torch.inference_mode():
            return model(batch)
    finally:
        layers.deactivate()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("plan", ["tables", "deferred", "merged"])
def test_plan_equals_reference(model_and_layers, layout, plan):
    model, layers = model_and_layers
    lengths, slots = LAYOUTS[layout]
    batch = packed_batch(lengths, slots, "cpu")
    expected = run(model, layers, batch, "reference")
    torch.testing.assert_close(run(model, layers, batch, plan), expected, rtol=1e-10, atol=1e-10)
    if layout == "mixed":  # the adapters change the output: the comparison is not vacuous
        assert not torch.allclose(expected, run(model, layers, batch, "reference", segments=()))


def test_empty_segments_change_nothing(model_and_layers):
    model, layers = model_and_layers
    batch = packed_batch([7, 20, 9], [1, 0, 2], "cpu")
    first, second, third = batch.adapter_segments
    segments = (AdapterSegment(3, 0, 0), first, second, AdapterSegment(4, 27, 27), third)
    expected = run(model, layers, batch, "reference")
    for plan in ("tables", "deferred"):
        torch.testing.assert_close(run(model, layers, batch, plan, segments), expected, rtol=1e-10, atol=1e-10)
    # One adapter and an empty segment of another: still a one-adapter batch, merged.
    one = packed_batch([7, 20], [2, 2], "cpu")
    expected = run(model, layers, one, "reference")
    merged_segments = (AdapterSegment(4, 0, 0), *one.adapter_segments)
    torch.testing.assert_close(run(model, layers, one, "merged", merged_segments), expected, rtol=1e-10, atol=1e-10)


def test_each_plan_takes_its_path(model_and_layers, monkeypatch):
    """Deferred: every single-slice linear hands a LoraDelta to its consumer and only Q/K/V expands.
    Merged: no shrink and no expand at all."""
    model, layers = model_and_layers
    calls = {"shrink": 0, "expand": 0, "activation": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(layers_module, "lora_shrink", counted("shrink", layers_module.lora_shrink))
    monkeypatch.setattr(layers_module, "lora_expand", counted("expand", layers_module.lora_expand))
    activation = counted("activation", encoder_module.add_lora_activation)
    monkeypatch.setattr(encoder_module, "add_lora_activation", activation)
    mixed = packed_batch([7, 3, 12], [0, 1, 2], "cpu")
    run(model, layers, mixed, "deferred")
    assert calls == {"shrink": 2 * 4, "expand": 2 * 1, "activation": 2}
    calls.update(shrink=0, expand=0, activation=0)
    run(model, layers, packed_batch([7, 3], [1, 1], "cpu"), "merged")
    assert calls == {"shrink": 0, "expand": 0, "activation": 0}


def test_linear_returns_the_delta_it_defers(model_and_layers):
    model, layers = model_and_layers
    batch = packed_batch([5, 6], [0, 2], "cpu")
    set_plan(layers, "deferred")
    layers.activate(batch.adapter_segments)
    linear = model.encoder.layer[0].intermediate.dense
    x = torch.randn(11, linear.in_features, dtype=torch.float64)
    try:
        output, lora = linear.forward_deferred(x)
        assert isinstance(lora, LoraDelta) and lora.token_slots.tolist() == [0] * 5 + [2] * 6
        assert lora.shrunk[:5].isnan().all()  # base rows: never computed, never read
        expected = linear(x)  # forward() adds the delta itself
        assert torch.equal(output[:5], expected[:5])
        delta = lora.shrunk[5:] @ lora.lora_b[2].T
        torch.testing.assert_close(output[5:] + delta, expected[5:], rtol=1e-12, atol=1e-12)
    finally:
        layers.deactivate()


def test_batch_tables():
    segments = (AdapterSegment(0, 0, 10), AdapterSegment(2, 10, 10), AdapterSegment(2, 10, 10 + 2 * BLOCK_T + 3),
                AdapterSegment(0, 10 + 2 * BLOCK_T + 3, 200), AdapterSegment(5, 200, 201))
    table, token_slots, tiles = build_lora_batch_tables(segments, torch.device("cpu"), with_token_slots=True,
                                                        with_tile_slots=True)
    end = 10 + 2 * BLOCK_T + 3
    assert table.tolist() == [[10, 10 + BLOCK_T, 2], [10 + BLOCK_T, 10 + 2 * BLOCK_T, 2], [10 + 2 * BLOCK_T, end, 2],
                              [200, 201, 5]]
    assert token_slots.dtype == torch.int32
    assert token_slots.tolist() == [0] * 10 + [2] * (end - 10) + [0] * (200 - end) + [5]
    assert token_slots.data_ptr() % 16 == 0
    # The fused GEMM's tile table: per 128-row tile the count of its adapters, then their slots.
    assert tiles.dtype == torch.int32 and tiles.data_ptr() % 16 == 0
    assert tiles[:, :3].tolist() == [[1, 2, 0], [2, 2, 5]]
    assert not tiles[:, 3:].any()
    assert build_lora_batch_tables(segments[:2], torch.device("cpu"), with_token_slots=True) == (None, None, None)
    assert build_lora_batch_tables(segments, torch.device("cpu"), with_token_slots=False)[1:] == (None, None)
    # The fused GEMM needs the token slots too, asked for or not.
    _, token_slots, tiles = build_lora_batch_tables(segments, torch.device("cpu"), False, with_tile_slots=True)
    assert token_slots.tolist() == [0] * 10 + [2] * (end - 10) + [0] * (200 - end) + [5] and tiles.shape == (2, 1 + lora_gemm_triton.MAX_RUNS)


def test_adapter_load_fills_slots_as_module_by_module_would():
    """`LoraLayers.load` lays an adapter's rows out on the host and copies them once; the slot
    buffers equal those of `set_slot` module by module: mixed ranks, a fused projection with some
    slices absent, and a slot reloaded with a smaller adapter (no stale rows left behind)."""
    from loraembed.lora.peft_format import LoraAdapter, LoraModuleWeights

    config = encoder_config(hidden=24, intermediate=40, layers=2, heads=4)
    generator = torch.Generator().manual_seed(5)

    def adapter(ranks: dict[str, int]) -> LoraAdapter:
        layers = LoraLayers(random_encoder(config, torch.float64, "cpu", seed=1), num_slots=3)
        modules = {}
        for name, rank in ranks.items():
            target = layers.targets[name]
            modules[name] = LoraModuleWeights(
                name, torch.randn(rank, target.in_features, generator=generator),
                torch.randn(target.out_features, rank, generator=generator), scaling=0.5,
            )
        return LoraAdapter("x", modules)

    wide = adapter({"encoder.layer.0.attention.self.query": 4, "encoder.layer.0.attention.self.value": 2,
                    "encoder.layer.1.intermediate.dense": 6, "encoder.layer.1.output.dense": 3})
    narrow = adapter({"encoder.layer.0.attention.self.key": 1})
    loaded = LoraLayers(random_encoder(config, torch.float64, "cpu", seed=1), num_slots=3)
    by_module = LoraLayers(random_encoder(config, torch.float64, "cpu", seed=1), num_slots=3)
    for slot, sequence in ((1, [wide]), (2, [wide, narrow])):
        for each in sequence:
            loaded.load(slot, each)
            by_module.clear(slot)
            for name, weights in each.modules.items():
                target = by_module.targets[name]
                by_module.linears[target.linear_name].set_slot(slot, target.slice_index, weights.lora_a,
                                                               weights.scaled_lora_b())
    for name, linear in loaded.linears.items():
        expected = by_module.linears[name]
        assert linear.rank_capacity == expected.rank_capacity, name
        if linear.rank_capacity:
            assert torch.equal(linear.lora_a_cat, expected.lora_a_cat), name
            assert torch.equal(linear.lora_b_cat, expected.lora_b_cat), name
        assert linear.slot_ranks == expected.slot_ranks and linear.slot_has_lora == expected.slot_has_lora, name
        assert linear.lora_slot_bits == expected.lora_slot_bits, name
    qkv = loaded.linears["encoder.layer.0.attention.self.qkv"]
    assert qkv.slot_ranks == [[0, 4, 0], [0, 0, 1], [0, 2, 0]]  # slot 2 holds only the narrow adapter's key


def test_tile_table_counts_each_tiles_adapters():
    rng = np.random.default_rng(1)
    for _ in range(100):
        tokens = int(rng.integers(1, 3000))
        cuts = sorted({0, tokens, *rng.integers(0, tokens, int(rng.integers(1, 60))).tolist()})
        runs = [(int(rng.integers(0, 9)), start, end) for start, end in zip(cuts, cuts[1:])]
        table = lora_gemm_triton.tile_slot_table([AdapterSegment(*run) for run in runs], tokens)
        expected = [sorted({slot for slot, start, end in runs if slot and start < (tile + 1) * lora_gemm_triton.TILE_ROWS
                            and end > tile * lora_gemm_triton.TILE_ROWS}) for tile in range(-(-tokens // lora_gemm_triton.TILE_ROWS))]
        if max(map(len, expected)) > lora_gemm_triton.MAX_RUNS:
            assert table is None
            continue
        assert table[:, 0].tolist() == list(map(len, expected))
        assert [sorted(row[1 : 1 + row[0]].tolist()) for row in table] == expected
        assert lora_gemm_triton.max_runs_bound(np.array([start for _, start, end in runs if end > start])) >= max(map(len, expected))


def test_fused_gemm_rules_take_the_measured_faster_path():
    """The two size rules of the mixed-adapter GEMM give the choices measured on an H200 (132 SMs;
    benchmarks/NOTES.md items 43-44): the fused GEMM only from one output tile per SM on, and
    128-column tiles only where 256-column ones leave a last round of programs mostly idle. Each
    choice below was the faster one measured but attention.output.dense's at 4,096 tokens (the
    separate path, 15.0 against 13.3 µs)."""
    from loraembed.lora.lora_gemm_gluon import narrow_tiles_pay

    sms = 132
    shapes = {"qkv": (2304, 768), "attention.output.dense": (768, 768), "intermediate.dense": (3072, 3072),
              "output.dense": (768, 768)}
    fused = {name: [lora_gemm_triton.fused_gemm_fills_gpu(torch.empty(tokens, 1), out, width, sms)
                    for tokens in (17, 1024, 4096, 16384)] for name, (out, width) in shapes.items()}
    assert fused == {"qkv": [False, False, True, True], "attention.output.dense": [False, False, False, True],
                     "intermediate.dense": [False, False, True, True], "output.dense": [False, False, False, True]}
    narrow = {name: [narrow_tiles_pay(tokens, out, sms) for tokens in (6144, 8192, 12288, 16384)]
              for name, (out, _) in shapes.items()}
    assert narrow == {"qkv": [False, False, False, False], "attention.output.dense": [True, True, False, False],
                      "intermediate.dense": [False, False, False, False], "output.dense": [True, True, False, False]}
