"""Random-weight encoders with random LoRA adapters in their slots, and packed batches with chosen
adapter layouts: what the tests of the LoRA batch plans (merge, fused expand, references) share.
Weights come from seeded CPU generators, so the same call gives the same model in any dtype or
on any device (a float64 reference next to a bfloat16 run)."""

from __future__ import annotations

import random

import numpy as np
import torch

from loraembed.config import EncoderConfig
from loraembed.encoder import PackedEncoder
from loraembed.lora.layers import LoraLayers
from loraembed.packing import AdapterSegment, PackedBatch, SequenceRef, build_packed_batch


def encoder_config(hidden: int, intermediate: int, layers: int, heads: int, hidden_act: str = "gelu") -> EncoderConfig:
    return EncoderConfig.from_hf(dict(
        model_type="xlm-roberta", vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate, hidden_act=hidden_act,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
    ))


def random_encoder(
    config: EncoderConfig, dtype: torch.dtype, device: str, attention: str = "sdpa", seed: int = 0
) -> PackedEncoder:
    torch.manual_seed(seed)
    model = PackedEncoder(config, attention)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):  # not (1, 0): a wrong residual or norm shows
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def fill_random_adapters(layers: LoraLayers, slot_ranks: dict[int, int], seed: int, skip=lambda slot, name: False,
                         b_scale: float = 0.5) -> None:
    """Slot -> rank: every target of every layer gets random A [r, in] / sqrt(in) and scaled B
    [out, r] * b_scale / sqrt(r), except the (slot, PEFT module name) pairs `skip` names, which
    leave that slot without LoRA there (a zero-rank slot in that linear)."""
    generator = torch.Generator().manual_seed(seed)
    for slot, rank in slot_ranks.items():
        for name, target in layers.targets.items():
            if skip(slot, name):
                continue
            lora_a = torch.randn(rank, target.in_features, generator=generator, dtype=torch.float64)
            lora_b = torch.randn(target.out_features, rank, generator=generator, dtype=torch.float64)
            layers.linears[target.linear_name].set_slot(
                slot, target.slice_index, lora_a / target.in_features**0.5, lora_b * b_scale / rank**0.5
            )


def packed_batch(lengths: list[int], slots: list[int], device: str, seed: int = 0) -> PackedBatch:
    """Sequences of random ids, in the given order (consecutive rows of one slot are one segment)."""
    rng = np.random.default_rng(seed)
    refs = [
        SequenceRef(0, row, np.concatenate([[0], rng.integers(5, 1000, length - 1)])[:length].astype(np.int64), slot)
        for row, (length, slot) in enumerate(zip(lengths, slots))
    ]
    return build_packed_batch(refs, position_offset=2, device=torch.device(device))


def random_segments(
    total_tokens: int, num_slots: int, rng: random.Random, cuts: int | None = None
) -> tuple[AdapterSegment, ...]:
    """Contiguous runs covering [0, T) with random slots (0 = base), plus an empty segment; `cuts`
    cut points (more: more adapters per tile), a random 1-12 if None."""
    count = rng.randint(1, 12) if cuts is None else cuts
    inner = sorted(rng.sample(range(1, total_tokens), k=min(count, total_tokens - 1)))
    bounds = [0, *inner, total_tokens]
    segments = [AdapterSegment(rng.randrange(num_slots), start, end) for start, end in zip(bounds, bounds[1:])]
    empty_at = rng.choice(bounds)
    segments.append(AdapterSegment(1, empty_at, empty_at))
    return tuple(segments)


def set_plan(layers: LoraLayers, plan: str) -> None:
    """"reference" (per-segment matmuls), "tables" (shrink/expand over a block table), "deferred"
    (+ expand in the consumer's kernel), "merged" (+ one adapter per batch merged into W), "fused"
    (+ mixed-adapter expands in the GEMM's epilogue where the GPU runs that kernel: the GPU default,
    here on every linear, however few its output tiles)."""
    layers.use_block_tables = plan in ("tables", "deferred", "merged", "fused")
    layers.defer_expand = plan in ("deferred", "merged", "fused")
    layers.merge_single_adapter = plan in ("merged", "fused")
    layers.fuse_expand = plan == "fused"
    layers.batch_state.fused_gemm_min_tiles = 0  # the fused GEMM on every linear, however small the batch
