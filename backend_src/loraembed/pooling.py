"""Pooling by `cu_seqlens` (real tokens only), Matryoshka truncation and normalization."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import PackedBatch

POOLING_MODES = ("cls", "mean")


def pool(hidden: torch.Tensor, batch: PackedBatch, mode: str) -> torch.Tensor:
    """hidden [T, H] -> [B, H] in float32: the first token of each sequence, or the mean of its tokens."""
    if mode == "cls":
        return hidden[batch.cu_seqlens[:-1].long()].float()  # TEI/HF: the <s>/[CLS] token
    if mode == "mean":
        sums = torch.zeros(batch.num_sequences, hidden.shape[1], device=hidden.device, dtype=torch.float32)
        sums.index_add_(0, batch.token_sequence_index, hidden.float())  # [B, H]
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(torch.float32)  # [B]
        return sums / lengths[:, None]
    raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")


def finalize_embeddings(pooled: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Matryoshka: keep the first `dimensions` features, then L2-normalize if asked."""
    if dimensions is not None:
        pooled = pooled[:, :dimensions]
    if normalize:
        pooled = F.normalize(pooled, p=2, dim=-1)
    return pooled
