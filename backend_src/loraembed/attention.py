"""Non-causal attention over packed sequences, behind one entry point.

Backends: flash-attn's `flash_attn_varlen_func` (if importable, CUDA), PyTorch's
`torch.nn.attention.varlen.varlen_attn` (CUDA, torch >= 2.10), our Triton kernel whose query tiles
span several short sequences (`packed_attention_triton`, CUDA), and an SDPA reference that runs
everywhere and is what tests compare the others with. No padding token is ever attended: the
reference masks every key outside a query's own sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigurationError
from .packed_attention_triton import packed_attention, triton

# `auto` takes the first that can run. Measured on an H200 (benchmarks/attention_bench.py, 16k-token
# batches, CUDA-graph timing, 2026-11-28): triton_packed 6.1x flash-attn on queries, 1.18x on
# passages, 0.98x on 400-token texts (16 heads: 1.33x and 1.04x); flash-attn and varlen_attn next
# (the same FlashAttention-2 algorithm). In the model, flash-attn ran 0.73x on queries, 0.95x on
# passages and 1.00x on long texts (benchmarks/RESULTS.md).
ATTENTION_BACKENDS = ("triton_packed", "flash_attn", "torch_varlen", "sdpa")


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_attention_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve `auto` to the best available backend; fail loudly when a named one cannot run."""
    half = dtype in (torch.float16, torch.bfloat16)
    usable = {
        "flash_attn": device.type == "cuda" and half and _flash_attn_available(),
        "torch_varlen": device.type == "cuda" and half and _torch_varlen_available(),
        "triton_packed": device.type == "cuda" and half and triton is not None,
        "sdpa": True,
    }
    if requested == "auto":
        return next(name for name in ATTENTION_BACKENDS if usable[name])
    if requested not in usable:
        raise ConfigurationError(f"attention={requested!r} is not one of auto, {', '.join(ATTENTION_BACKENDS)}")
    if not usable[requested]:
        needs = {"flash_attn": "the flash-attn package", "torch_varlen": "torch >= 2.10", "triton_packed": "triton"}
        raise ConfigurationError(
            f"attention={requested!r} cannot run here (needs CUDA, float16/bfloat16 and {needs[requested]}; "
            f"device {device}, dtype {dtype})"
        )
    return requested


def sdpa_reference_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Reference: scatter the packed stream into [B, max_seqlen] with a key mask, run SDPA, gather back."""
    total_tokens, num_heads, head_dim = query.shape
    num_sequences = cu_seqlens.numel() - 1
    starts = cu_seqlens[:-1].long()  # [B]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    offsets = torch.arange(max_seqlen, device=query.device)  # [L]
    valid = offsets[None, :] < lengths[:, None]  # [B, L]
    token_index = (starts[:, None] + offsets[None, :]).clamp(max=total_tokens - 1)  # [B, L]

    def to_padded(packed: torch.Tensor) -> torch.Tensor:
        padded = packed[token_index]  # [B, L, heads, head_dim]
        return padded.transpose(1, 2)  # [B, heads, L, head_dim]

    key_mask = valid[:, None, None, :]  # [B, 1, 1, L]: a query sees only its own sequence's keys
    out = F.scaled_dot_product_attention(to_padded(query), to_padded(key), to_padded(value), attn_mask=key_mask)
    out = out.transpose(1, 2)  # [B, L, heads, head_dim]
    return out[valid].reshape(total_tokens, num_heads, head_dim)  # rows in packed order


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    token_sequence_index: torch.Tensor,
    backend: str,
    query_tile_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention within each sequence of a packed stream.

    query, key, value: [T, heads, head_dim]; cu_seqlens: [B+1] int32 on the same device;
    token_sequence_index: [T], the sequence of each token; query_tile_starts: `triton_packed`'s
    tiles (`PackedBatch.query_tile_starts`; other backends ignore it). Returns [T, heads, head_dim].
    """
    if backend == "triton_packed":
        return packed_attention(query, key, value, cu_seqlens, token_sequence_index, query_tile_starts)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False
        )
    if backend == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        # Default window and is_causal=False: full bidirectional attention within each sequence.
        return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    return sdpa_reference_attention(query, key, value, cu_seqlens, max_seqlen)
