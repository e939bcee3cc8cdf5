"""The LoRA expand fused into its consumer (`fused_ops.add_lora_activation`, `add_layer_norm(lora=)`)
and the single-adapter merge, on the GPU, against the float64 references: random shapes, ranks
8/16/64 mixed with zero-rank slots, segment layouts with base-only and empty segments, token counts
that are not multiples of the block size. Base rows are never read from the shrunk rows (NaN there)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from loraembed.attention import select_attention_backend
from loraembed.fused_ops import (
    ACTIVATIONS,
    LORA_LAYER_NORM_MAX_BLOCK,
    LoraDelta,
    add_layer_norm,
    add_lora_activation,
)
from loraembed.lora.layers import LoraLayers
from loraembed.lora.segmented import apply_segmented_lora
from loraembed.lora.sgmv_triton import build_lora_batch_tables, sgmv_shrink
from loraembed.packing import AdapterSegment
from tests.support.lora_models import encoder_config, fill_random_adapters, packed_batch, random_encoder, set_plan

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
MODEL_DTYPE = torch.bfloat16
RANKS = (8, 16, 64)


def random_segments(total_tokens: int, num_slots: int, rng: random.Random) -> tuple[AdapterSegment, ...]:
    """Contiguous runs covering [0, T) with random slots (0 = base), plus an empty segment."""
    cuts = sorted(rng.sample(range(1, total_tokens), k=min(rng.randint(1, 12), total_tokens - 1)))
    bounds = [0, *cuts, total_tokens]
    segments = [AdapterSegment(rng.randrange(num_slots), start, end) for start, end in zip(bounds, bounds[1:])]
    empty_at = rng.choice(bounds)
    segments.insert(rng.randrange(len(segments) + 1), AdapterSegment(1, empty_at, empty_at))
    return tuple(sorted(segments, key=lambda s: (s.token_start, s.token_end)))


def layouts(tokens: int, slots: int, seed: int) -> dict[str, tuple[AdapterSegment, ...]]:
    rng = random.Random(seed)
    half = tokens // 2
    return {
        "random": random_segments(tokens, slots, rng) if tokens > 1 else (AdapterSegment(1, 0, 1),),
        "one adapter": (AdapterSegment(2, 0, tokens),),
        "one zero-rank adapter": (AdapterSegment(slots - 1, 0, tokens),),
        "base then adapter": (AdapterSegment(0, 0, half), AdapterSegment(1, half, tokens)),
        "base only": (AdapterSegment(0, 0, tokens),),
    }


def lora_stacks(in_features: int, out_features: int, slots: int, dtype, seed: int):
    """A [slots, R, in], B [slots, out, R] with R = 64: slot s has rank RANKS[s % 3] (zero-padded),
    the last slot has no LoRA (zero rank), slot 0 is the base model (NaN: must never be read)."""
    generator = torch.Generator().manual_seed(seed)
    capacity = max(RANKS)
    lora_a = torch.zeros(slots, capacity, in_features, dtype=torch.float64)
    lora_b = torch.zeros(slots, out_features, capacity, dtype=torch.float64)
    for slot in range(1, slots - 1):
        rank = RANKS[slot % len(RANKS)]
        lora_a[slot, :rank] = torch.randn(rank, in_features, generator=generator, dtype=torch.float64)
        lora_a[slot] /= in_features**0.5
        lora_b[slot, :, :rank] = torch.randn(out_features, rank, generator=generator, dtype=torch.float64) / rank**0.5
    lora_b[0] = float("nan")
    return lora_a.to(DEVICE, dtype), lora_b.to(DEVICE, dtype)


def delta_and_lora(tokens, in_features, out_features, slots, segments, dtype, seed):
    """The shrunk rows from the Triton shrink (NaN on base rows) as a LoraDelta, and the float64
    reference delta [T, out] from `apply_segmented_lora`."""
    torch.manual_seed(seed)
    x = torch.randn(tokens, in_features, device=DEVICE, dtype=dtype)
    lora_a, lora_b = lora_stacks(in_features, out_features, slots, dtype, seed)
    table, token_slots, _ = build_lora_batch_tables(segments, torch.device(DEVICE), with_token_slots=True)
    expected = torch.zeros(tokens, out_features, device=DEVICE, dtype=torch.float64)
    if table is None:  # base rows only (the layers never defer such a batch; the kernels still must cope)
        shrunk = torch.full((tokens, lora_a.shape[1]), float("nan"), device=DEVICE)
        return LoraDelta(shrunk, lora_b, torch.zeros(tokens, device=DEVICE, dtype=torch.int32)), expected
    shrunk = sgmv_shrink(x, lora_a, table)  # [T, 64] float32
    shrunk[token_slots == 0] = float("nan")
    a64 = lora_a.double().nan_to_num()
    apply_segmented_lora(x.double(), expected, [a64], [lora_b.double().nan_to_num()], segments)
    return LoraDelta(shrunk, lora_b, token_slots), expected


def base_rows(segments, tokens) -> torch.Tensor:
    mask = torch.ones(tokens, dtype=torch.bool)
    for segment in segments:
        if segment.slot:
            mask[segment.token_start : segment.token_end] = False
    return mask.to(DEVICE)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm().clamp_min(1e-12)).item()


ACTIVATION_CASES = [
    # tokens, in, out (intermediate.dense 768 -> 3072, MiniLM 384 -> 1536, odd widths, tiny batches)
    (1, 768, 3072),
    (63, 768, 3072),
    (1000, 768, 3072),
    (4097, 768, 3072),
    (333, 384, 1536),
    (130, 100, 200),
    (65, 1024, 4096),
]


@pytest.mark.parametrize("tokens, in_features, out_features", ACTIVATION_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_lora_activation_matches_reference(tokens, in_features, out_features, dtype):
    # Every activation in bf16; the model's exact GELU in fp16 too (fewer kernel variants to compile).
    activations = ("gelu", "gelu_new", "relu", "identity") if dtype == torch.bfloat16 else ("gelu",)
    for layout, segments in layouts(tokens, 6, tokens).items():
        lora, expected_delta = delta_and_lora(tokens, in_features, out_features, 6, segments, dtype, tokens)
        torch.manual_seed(tokens + 1)
        x = torch.randn(tokens, out_features, device=DEVICE, dtype=dtype)
        base = base_rows(segments, tokens)
        for activation in activations:
            got = add_lora_activation(x.clone(), lora, activation)
            expected = ACTIVATIONS[activation](x.double() + expected_delta)
            assert not got.isnan().any(), (layout, activation)
            error = relative_error(got, expected)
            assert error < 1e-2, (layout, activation, error)
            # Base rows: the plain activation of the same dtype (the exact erf GELU), to one unit
            # in the last place; identity and relu leave them bit for bit.
            plain = ACTIVATIONS[activation](x[base])
            if activation in ("identity", "relu"):
                assert torch.equal(got[base], plain), (layout, activation)
            else:
                torch.testing.assert_close(got[base], plain, rtol=torch.finfo(dtype).eps, atol=1e-6)


LAYER_NORM_CASES = [(1, 768), (15, 768), (16, 768), (1000, 768), (4097, 768), (333, 384), (130, 100), (257, 1024),
                    (70, 2048)]  # 2048 > LORA_LAYER_NORM_MAX_BLOCK: the delta in its own pass, then the plain kernel


@pytest.mark.parametrize("tokens, hidden", LAYER_NORM_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_layer_norm_with_lora_matches_reference(tokens, hidden, dtype):
    assert LORA_LAYER_NORM_MAX_BLOCK < 2048
    in_features = 3072 if hidden == 768 else hidden  # output.dense reads the intermediate
    for layout, segments in layouts(tokens, 5, tokens + hidden).items():
        lora, expected_delta = delta_and_lora(tokens, in_features, hidden, 5, segments, dtype, tokens)
        torch.manual_seed(hidden)
        x, residual = (torch.randn(tokens, hidden, device=DEVICE, dtype=dtype) * 2 for _ in range(2))
        weight = torch.randn(hidden, device=DEVICE, dtype=dtype)
        bias = torch.randn(hidden, device=DEVICE, dtype=dtype)
        got = add_layer_norm(x.clone(), residual, weight, bias, 1e-5, lora)
        expected = F.layer_norm(x.double() + expected_delta + residual.double(), (hidden,), weight.double(),
                                bias.double(), 1e-5)
        assert not got.isnan().any(), layout
        error = relative_error(got, expected)
        assert error < 1e-2, (layout, error)
        base = base_rows(segments, tokens)
        plain = add_layer_norm(x[base], residual[base], weight, bias, 1e-5)
        torch.testing.assert_close(got[base], plain, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)


# --- whole encoders: the plans against the float64 per-segment reference --------------------------

SLOT_RANKS = {1: 8, 2: 16, 3: 64, 4: 16, 5: 8}


def skip_some(slot: int, name: str) -> bool:
    """Slot 5 has no LoRA on intermediate.dense, output.dense and key: zero-rank slots there."""
    return slot == 5 and name.endswith(("intermediate.dense", ".output.dense", "attention.self.key"))


ENCODER_LAYOUTS = {
    # lengths, slots (consecutive equal slots form one segment)
    "mixed ranks, base rows": ([17, 120, 3, 300, 64, 45, 1, 200, 33, 90], [0, 1, 1, 2, 0, 3, 4, 5, 0, 2]),
    "one adapter": ([17, 120, 3, 300, 64, 45], [3, 3, 3, 3, 3, 3]),
    "one adapter without LoRA in some linears": ([300, 64, 45], [5, 5, 5]),
    "base only": ([17, 120, 300], [0, 0, 0]),
}


@pytest.fixture(scope="module")
def encoders():
    """(bf16 model, its LoraLayers), (float64 model, its LoraLayers): the same random weights."""
    config = encoder_config(hidden=768, intermediate=3072, layers=2, heads=12)
    pairs = []
    for dtype in (MODEL_DTYPE, torch.float64):
        model = random_encoder(config, dtype, DEVICE, attention="sdpa", seed=7)
        layers = LoraLayers(model, num_slots=6)
        fill_random_adapters(layers, SLOT_RANKS, seed=8, skip=skip_some)
        pairs.append((model, layers))
    return pairs


def run(model, layers, batch, plan) -> torch.Tensor:
    set_plan(layers, plan)
    layers.activate(batch.adapter_segments)
    try:
        with torch.inference_mode():
            return model(batch).double()
    finally:
        layers.deactivate()


@pytest.mark.parametrize("layout", list(ENCODER_LAYOUTS))
def test_encoder_plans_match_float64_reference(encoders, layout):
    (model, layers), (model64, layers64) = encoders
    lengths, slots = ENCODER_LAYOUTS[layout]
    batch = packed_batch(lengths, slots, DEVICE, seed=len(lengths))
    expected = run(model64, layers64, batch, "reference")
    base_batch = packed_batch(lengths, [0] * len(lengths), DEVICE, seed=len(lengths))  # the same tokens
    without_lora = run(model64, layers64, base_batch, "reference")
    errors = {plan: relative_error(run(model, layers, batch, plan), expected)
              for plan in ("reference", "tables", "deferred", "merged", "fused")}
    print(layout, {plan: f"{error:.2e}" for plan, error in errors.items()},
          f"LoRA effect {relative_error(without_lora, expected):.2e}")
    for plan in ("tables", "deferred", "merged", "fused"):  # the fast paths: no worse than the bf16 reference
        assert errors[plan] < max(1.5 * errors["reference"], errors["reference"] + 2e-3), (plan, errors)
    if any(slot not in (0, 5) for slot in slots):  # the adapters move the output well beyond the bf16 error
        assert relative_error(without_lora, expected) > 5 * max(errors.values())


def test_forward_does_not_sync_with_the_host(encoders):
    """Planning (activate) and the forward of each plan queue work without a device-to-host sync."""
    (model, layers), _ = encoders
    backend = next((b for b in ("triton_packed", "flash_attn", "torch_varlen") if _usable(b)), None)
    if backend is None:
        pytest.skip("needs triton_packed, flash_attn or torch_varlen (the SDPA reference attention syncs)")
    model.attention_backend = backend
    try:
        for layout in ("mixed ranks, base rows", "one adapter"):
            lengths, slots = ENCODER_LAYOUTS[layout]
            batch = packed_batch(lengths, slots, DEVICE)
            for plan in ("tables", "deferred", "merged", "fused"):
                set_plan(layers, plan)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    layers.activate(batch.adapter_segments)
                    with torch.inference_mode():
                        model(batch)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    layers.deactivate()
    finally:
        model.attention_backend = "sdpa"


def _usable(backend: str) -> bool:
    try:
        select_attention_backend(backend, torch.device(DEVICE), torch.bfloat16)
    except Exception:
        return False
    return True
