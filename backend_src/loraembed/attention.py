"""Non-causal attention over packed sequences, behind one entry point.

Backends, fastest first: flash-attn's `flash_attn_varlen_func` (if importable, CUDA), PyTorch's
`torch.nn.attention.varlen.varlen_attn` (CUDA, torch >= 2.10), and an SDPA reference that runs
everywhere and is what tests compare the others with. No padding token is ever attended: the
reference masks every key outside a query's own sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigurationError

ATTENTION_BACKENDS = ("flash_attn", "torch_varlen", "sdpa")


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
        "sdpa": True,
    }
    if requested == "auto":
        return next(name for name in ATTENTION_BACKENDS if usable[name])
    if requested not in usable:
        raise ConfigurationError(f"attention={requested!r} is not one of auto, {', '.join(ATTENTION_BACKENDS)}")
    if not usable[requested]:
        raise ConfigurationError(
            f"attention={requested!r} cannot run here (needs CUDA, float16/bfloat16"
            f"{' and the flash-attn package' if requested == 'flash_attn' else ' and torch >= 2.10'}; "
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


# Short-sequence batches (queries): flash-attn runs one 128-row tile per sequence and head, mostly
# empty when sequences have ~16 tokens. Instead, every CHUNK consecutive query tokens attend, in one
# dense SDPA call, to the keys within WINDOW tokens on either side that belong to their own sequence.
# Exact whenever no sequence is longer than WINDOW + 1 tokens.
LOCAL_WINDOW = 64
LOCAL_CHUNK = 128


def local_window_mask(token_sequence_index: torch.Tensor) -> torch.Tensor:
    """[chunks, 1, CHUNK, CHUNK + 2*WINDOW] bool: query token may see key token (same sequence).

    Padding queries (past the last token) see the padding keys after it, so no row is empty.
    """
    total = token_sequence_index.numel()
    chunks = -(-total // LOCAL_CHUNK)
    padded = chunks * LOCAL_CHUNK
    query_ids = F.pad(token_sequence_index, (0, padded - total), value=-2).view(chunks, LOCAL_CHUNK)  # [n, C]
    key_ids = F.pad(token_sequence_index, (LOCAL_WINDOW, padded - total + LOCAL_WINDOW), value=-2)  # [P + 2W]
    key_windows = key_ids.unfold(0, LOCAL_CHUNK + 2 * LOCAL_WINDOW, LOCAL_CHUNK)  # [n, C + 2W]
    return (query_ids[:, :, None] == key_windows[:, None, :])[:, None]  # [n, 1, C, C + 2W]


def short_batch_mask(token_sequence_index: torch.Tensor, max_seqlen: int, backend: str) -> torch.Tensor | None:
    """The local-window mask when the fast path should use it for this batch, else None."""
    if backend in ("flash_attn", "torch_varlen") and max_seqlen <= LOCAL_WINDOW + 1:
        return local_window_mask(token_sequence_index)
    return None


def local_window_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention for batches of short sequences (<= LOCAL_WINDOW + 1 tokens); mask from local_window_mask."""
    total, heads, head_dim = query.shape
    chunks = mask.shape[0]
    padded = chunks * LOCAL_CHUNK
    window = LOCAL_CHUNK + 2 * LOCAL_WINDOW
    query_chunks = F.pad(query, (0, 0, 0, 0, 0, padded - total)).view(chunks, LOCAL_CHUNK, heads, head_dim)

    def windows(packed: torch.Tensor) -> torch.Tensor:
        padded_keys = F.pad(packed, (0, 0, 0, 0, LOCAL_WINDOW, padded - total + LOCAL_WINDOW))  # [P + 2W, h, d]
        row = heads * head_dim
        return padded_keys.as_strided((chunks, window, heads, head_dim), (LOCAL_CHUNK * row, row, head_dim, 1))

    out = F.scaled_dot_product_attention(
        query_chunks.transpose(1, 2), windows(key).transpose(1, 2), windows(value).transpose(1, 2), attn_mask=mask
    )  # [n, h, C, d]
    return out.transpose(1, 2).reshape(padded, heads, head_dim)[:total]


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: str,
    local_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention within each sequence of a packed stream.

    query, key, value: [T, heads, head_dim]; cu_seqlens: [B+1] int32 on the same device.
    `local_mask` (from `local_window_mask`, given only when every sequence is short enough) lets the
    fast backends use `local_window_attention`. Returns [T, heads, head_dim].
    """
    if local_mask is not None and backend in ("flash_attn", "torch_varlen"):
        return local_window_attention(query, key, value, local_mask)
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
