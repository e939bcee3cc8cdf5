"""The packed BERT / XLM-R encoder. HF attribute names, so checkpoint keys and PEFT targets map
one to one; the only exception is the fused Q/K/V projection, described by `FUSED_PROJECTIONS`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .attention import varlen_attention
from .checkpoint import normalize_checkpoint_keys, read_state_dict
from .config import EncoderConfig
from .errors import CheckpointError
from .fused_ops import (
    ACTIVATIONS,
    LoraDelta,
    add_layer_norm,
    add_lora_activation,
    embeddings_layer_norm,
    linear,
    linear_activation,
)
from .packing import PackedBatch

# The one fusion table (vLLM's packed_modules_mapping): a fused module and the checkpoint modules
# whose output features it concatenates, in order. LoRA routing uses it too.
FUSED_PROJECTIONS = {
    "attention.self.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
}


def _add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm, lora: LoraDelta | None = None
) -> torch.Tensor:
    return add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, lora)


def _linear_activation(linear: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """activation(linear(x)), a LoRA delta added before the activation: one GEMM with the activation
    in its epilogue where the batch's weight is one plain matrix and the activation has an epilogue
    (`fused_ops.linear_activation`), or where the LoRA layer fuses the expand into its GEMM
    (`fused_lora_output`), else the GEMM and then one pass that adds the delta too."""
    batch_weight = getattr(linear, "batch_weight", None)
    weight = linear.weight if batch_weight is None else batch_weight()
    if weight is not None:
        return linear_activation(x, weight, linear.bias, activation)
    fused = linear.fused_lora_output(x, activation)  # the LoRA's expand in the GEMM's epilogue
    if fused is not None:
        return fused
    output, lora = linear.forward_deferred(x)
    if lora is None:  # the LoRA already added by the layer (a fused projection's path, the CPU reference)
        return ACTIVATIONS[activation](output)
    return add_lora_activation(output, lora, activation)


def _linear(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, LoraDelta | None]:
    """The linear's output and a LoRA delta still to be added to it: None for a plain `nn.Linear`.
    The LoRA layers (lora/layers.py, swapped in from outside) return one so that the consumer's
    elementwise kernel adds it in the pass it makes anyway."""
    forward_deferred = getattr(module, "forward_deferred", None)
    if forward_deferred is None:
        return linear(x, module.weight, module.bias), None
    return forward_deferred(x)


def _linear_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The linear's output with any LoRA delta already added (the fused Q/K/V projection)."""
    if getattr(module, "forward_deferred", None) is None:
        return linear(x, module.weight, module.bias)
    return module(x)


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # Single-segment inputs: every token has token type 0. One kernel on CUDA (fused_ops).
        return embeddings_layer_norm(
            input_ids, position_ids, self.word_embeddings.weight, self.position_embeddings.weight,
            self.token_type_embeddings.weight[0], self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
        )  # [T, H]


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # query | key | value


class AttentionOutput(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class Attention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(config)  # HF's name
        self.output = AttentionOutput(config)


class Intermediate(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class Output(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class Layer(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = Output(config)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.hidden_act = config.hidden_act

    def forward(self, hidden: torch.Tensor, batch: PackedBatch, attention_backend: str) -> torch.Tensor:
        total_tokens, hidden_size = hidden.shape  # [T, H]
        qkv = _linear_output(self.attention.self.qkv, hidden).view(total_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(1)  # each [T, heads, head_dim]
        context = varlen_attention(
            query, key, value, batch.cu_seqlens, batch.max_seqlen, batch.token_sequence_index, attention_backend,
            batch.query_tile_starts,
        )
        attended, lora = _linear(self.attention.output.dense, context.reshape(total_tokens, hidden_size))  # [T, H]
        hidden = _add_layer_norm(attended, hidden, self.attention.output.LayerNorm, lora)
        intermediate = _linear_activation(self.intermediate.dense, hidden, self.hidden_act)  # [T, I]
        output, lora = _linear(self.output.dense, intermediate)  # [T, H]
        return _add_layer_norm(output, hidden, self.output.LayerNorm, lora)  # [T, H]


class LayerStack(nn.Module):
    """HF's `encoder` module: holds `layer.{i}`."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))


class PackedEncoder(nn.Module):
    """BERT/XLM-R encoder over a packed token stream: returns the last hidden state [T, H]."""

    def __init__(self, config: EncoderConfig, attention_backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.embeddings = Embeddings(config)
        self.encoder = LayerStack(config)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        hidden = self.embeddings(batch.input_ids, batch.position_ids)  # [T, H]
        for layer in self.encoder.layer:
            hidden = layer(hidden, batch, self.attention_backend)
        return hidden

    def checkpoint_shapes(self) -> dict[str, torch.Size]:
        """Parameter names and shapes as the checkpoint spells them (fused modules split back into parts)."""
        shapes = {}
        for name, tensor in self.state_dict().items():
            module, _, parameter = name.rpartition(".")
            parts = next((parts for fused, parts in FUSED_PROJECTIONS.items() if module.endswith("." + fused)), None)
            if parts is None:
                shapes[name] = tensor.shape
                continue
            layer_prefix = module[: module.rindex(".attention.")]  # encoder.layer.{i}
            for part in parts:  # the fused output features are the parts' outputs, concatenated equally
                shapes[f"{layer_prefix}.{part}.{parameter}"] = torch.Size((tensor.shape[0] // len(parts), *tensor.shape[1:]))
        return shapes

    def load_checkpoint_state(self, checkpoint_state: dict[str, torch.Tensor]) -> None:
        """Load HF weights (any prefix), fusing Q/K/V; fail naming every missing/unexpected key."""
        state = normalize_checkpoint_keys(checkpoint_state)
        # Compare in the checkpoint's own names before fusing, so errors name the keys the user has
        # (e.g. a missing `query.weight`, not `qkv.weight`) and bad shapes never reach torch.cat.
        expected = self.checkpoint_shapes()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = sorted(
            f"{name} {tuple(state[name].shape)} (expected {tuple(expected[name])})"
            for name in set(state) & set(expected)
            if state[name].shape != expected[name]
        )
        if missing or unexpected or wrong_shape:
            raise CheckpointError(
                "checkpoint does not match the architecture: "
                f"missing {missing or 'none'}; unexpected {unexpected or 'none'}; wrong shape {wrong_shape or 'none'}"
            )
        for index in range(self.config.num_hidden_layers):
            for fused, parts in FUSED_PROJECTIONS.items():
                for parameter in ("weight", "bias"):
                    names = [f"encoder.layer.{index}.{part}.{parameter}" for part in parts]
                    state[f"encoder.layer.{index}.{fused}.{parameter}"] = torch.cat([state.pop(n) for n in names])
        self.load_state_dict(state, strict=True)


def load_packed_encoder(
    model_path: Path, config: EncoderConfig, dtype: torch.dtype, device: torch.device, attention_backend: str
) -> PackedEncoder:
    with torch.device("meta"):
        model = PackedEncoder(config, attention_backend)
    model = model.to_empty(device="cpu")
    model.load_checkpoint_state(read_state_dict(model_path))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
