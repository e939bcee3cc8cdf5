"""Attention over a packed stream whose query tiles span several sequences (Triton language).

flash-attn and PyTorch's varlen kernel give every sequence its own 128-row query tile per head: a
batch of ~1,000 queries of ~16 tokens launches ~12,000 mostly empty tiles and spends 70% of the
GEMM time on 1% of the FLOPs (benchmarks/NOTES.md). Here a tile is BLOCK_M consecutive tokens of
the packed stream, whatever sequences they belong to; it visits only the keys from the start of
its first token's sequence to the end of its last token's, and masks every key outside a query's
own sequence (block-diagonal attention). Short sequences fill tiles; a long one costs what it
would cost in flash-attn.

Where the host passes a tile table (`query_tile_starts`), tiles are cut at the start and end of
every sequence of at least a tile's length, so such a sequence's tiles hold its tokens only: they
visit only its keys, and all but its last key block need no mask. Short sequences still share
tiles. On the benchmark's passages this drops ~10% of the key blocks and three quarters of the
masked ones (benchmarks/NOTES.md item 49).

Non-causal, no dropout, exact softmax (online, float32); the reference is
`attention.sdpa_reference_attention`, which the GPU tests compare this kernel with.
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the reference path only
    triton = None

# Launch settings, from benchmarks/attention_bench.py on an H200 (CUDA-graph timing, 16k tokens, 12
# heads of 64; results/attention-2026-11-28-h200.md): 64 queries per tile against 32 keys per step,
# the heads of a tile launched side by side. Queries 47.7 -> 39.3 µs, passages 83.2 -> 78.9, long
# texts 112.6 -> 108.1 (with the unmasked key blocks below) against 64 x 64 tiles in head-major order.
BLOCK_M = 64  # query tokens per tile
BLOCK_N = 32  # keys per step
# Whole key blocks of a tile whose queries share one sequence skip the mask; that costs short
# sequences (queries +2 µs, their tiles never lie in one sequence) and pays for long ones (-8 µs on
# texts of ~400 tokens). So it is on when the batch's mean sequence is at least a tile long.
SPLIT_UNMASKED_MIN_MEAN_LENGTH = BLOCK_M
MASKED_SCORE = -1.0e30  # finite, so a tile whose keys are all masked so far never computes inf - inf
# A CUDA graph's grid is fixed: its tile table has room for this share of tiles beyond one per
# BLOCK_M tokens (the benchmark's passages need ~20% more; where a batch would need more, fewer
# sequences get tiles of their own, see query_tile_starts).
EXTRA_TILE_SHARE = 4  # room for ceil(tokens / BLOCK_M / EXTRA_TILE_SHARE) extra tiles


def query_tile_capacity(total_tokens: int, block_m: int = BLOCK_M) -> int:
    """The tile count a table for `total_tokens` tokens never exceeds (a CUDA graph's grid)."""
    tiles = -(-total_tokens // block_m)
    return tiles + -(-tiles // EXTRA_TILE_SHARE)


def plain_query_tile_starts(total_tokens: int, block_m: int = BLOCK_M) -> np.ndarray:
    """Tiles of block_m tokens from 0, as `query_tile_starts` gives them (the kernel's tiling without
    a table)."""
    return np.append(np.arange(0, total_tokens, block_m, dtype=np.int64), total_tokens)


def _cut_into_tiles(cuts: np.ndarray, block_m: int) -> np.ndarray:
    """Tile starts: each stretch [cuts[i], cuts[i+1]) cut into tiles of block_m from its start."""
    tiles = -(-np.diff(cuts) // block_m)  # per stretch
    first = np.cumsum(tiles) - tiles
    within = np.arange(int(tiles.sum())) - np.repeat(first, tiles)
    return np.repeat(cuts[:-1], tiles) + block_m * within


def query_tile_starts(
    cu_seqlens: np.ndarray, total_tokens: int, max_tiles: int | None = None, block_m: int = BLOCK_M
) -> np.ndarray:
    """The query tiles of a packed batch as boundaries [tiles + 1] (int64; tile i is
    [starts[i], starts[i+1]), at most block_m tokens, and the last boundary is total_tokens).

    A sequence of at least `block_m` tokens gets tiles of its own, cut from its start; the shorter
    sequences between two such sequences share tiles. total_tokens may exceed cu_seqlens[-1] (a CUDA
    graph's padding rows). Where that gives more than `max_tiles` tiles, only sequences of at least
    2, 4, ... tiles' length get their own, down to plain tiles of block_m tokens from 0 (never more
    than max_tiles once max_tiles >= ceil(total_tokens / block_m))."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    lengths = np.diff(cu)
    threshold = block_m
    while total_tokens and lengths.size and threshold <= lengths.max():
        own = lengths >= threshold
        cuts = np.unique(np.concatenate(([0, total_tokens], cu[:-1][own], cu[1:][own])))
        starts = _cut_into_tiles(cuts, block_m)
        if max_tiles is None or len(starts) <= max_tiles:
            return np.append(starts, total_tokens)
        threshold *= 2
    return plain_query_tile_starts(total_tokens, block_m)


if triton is not None:
    MASKED = tl.constexpr(MASKED_SCORE)

    @triton.jit
    def _attend_key_block(
        q, k_ptr, v_ptr, head, block_start, keys_end, own_start, own_end, row_max, row_sum, acc, scale_log2,
        stride_k_token, stride_k_head, stride_v_token, stride_v_head,
        MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        """One online-softmax step over keys [block_start, block_start + BLOCK_N). MASK: whether some
        key of the block lies outside some query's sequence (else no mask is computed)."""
        keys = block_start + tl.arange(0, BLOCK_N)  # [BN]
        key_rows = keys.to(tl.int64)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        load_mask = dims < HEAD_DIM
        if MASK:
            load_mask = load_mask & (keys < keys_end)[:, None]
        k = tl.load(k_ptr + key_rows * stride_k_token + head * stride_k_head + dims, mask=load_mask, other=0.0)
        v = tl.load(v_ptr + key_rows * stride_v_token + head * stride_v_head + dims, mask=load_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale_log2  # [BM, BN], log2 units
        if MASK:
            same_sequence = (keys[None, :] >= own_start[:, None]) & (keys[None, :] < own_end[:, None])
            scores = tl.where(same_sequence, scores, MASKED)
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A masked score gives exp2(MASKED - new_max) = 0 once the row has seen one of its own keys.
        # Before that (keys of an earlier sequence of the tile), the row's max is MASKED too and it
        # sums ones; the first own key rescales those by exp2(MASKED - real max) = 0.
        probabilities = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probabilities, axis=1)
        acc = acc * correction[:, None] + tl.dot(probabilities.to(v.dtype), v)
        return new_max, row_sum, acc

    # The token count changes with every batch: no specialization on it (one compiled variant).
    @triton.jit(do_not_specialize=["total_tokens"])
    def _packed_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, sequence_index_ptr, cu_seqlens_ptr, tile_starts_ptr,
        total_tokens, scale_log2,
        stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
        stride_out_token, stride_out_head,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEADS_INNER: tl.constexpr, SPLIT_UNMASKED: tl.constexpr, TILE_TABLE: tl.constexpr,
    ):
        if HEADS_INNER:  # the heads of one query tile run side by side: they read the same token rows
            head = tl.program_id(0).to(tl.int64)
            tile = tl.program_id(1)
        else:
            tile = tl.program_id(0)
            head = tl.program_id(1).to(tl.int64)
        if TILE_TABLE:  # tile i is [starts[i], starts[i + 1]); a table's unused tiles are empty
            tile_start = tl.load(tile_starts_ptr + tile)
            tile_end = tl.load(tile_starts_ptr + tile + 1)
        else:
            tile_start = tile * BLOCK_M
            tile_end = total_tokens
        queries = tile_start + tl.arange(0, BLOCK_M)  # [BM] token positions
        query_valid = queries < tile_end
        dims = tl.arange(0, BLOCK_D)
        dim_valid = dims < HEAD_DIM
        # Each query's own sequence [start, end): keys outside it are masked.
        sequence = tl.load(sequence_index_ptr + queries, mask=query_valid, other=0)
        own_start = tl.load(cu_seqlens_ptr + sequence, mask=query_valid, other=0)  # [BM]
        own_end = tl.load(cu_seqlens_ptr + sequence + 1, mask=query_valid, other=0)
        keys_start = tl.min(tl.where(query_valid, own_start, total_tokens), axis=0)
        keys_end = tl.max(tl.where(query_valid, own_end, 0), axis=0)
        own_start = tl.where(query_valid, own_start, total_tokens)  # padding rows see no key
        own_end = tl.where(query_valid, own_end, 0)

        rows = queries.to(tl.int64)[:, None]
        q = tl.load(
            q_ptr + rows * stride_q_token + head * stride_q_head + dims[None, :],
            mask=query_valid[:, None] & dim_valid[None, :], other=0.0,
        )  # [BM, BD]
        row_max = tl.full((BLOCK_M,), MASKED, dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        masked_start = keys_start
        if SPLIT_UNMASKED:
            # All the tile's tokens in one sequence (padding rows aside, whose output is dropped):
            # whole key blocks inside it need no mask.
            one_sequence = keys_start == tl.max(tl.where(query_valid, own_start, 0), axis=0)
            if one_sequence:
                masked_start = keys_start + ((keys_end - keys_start) // BLOCK_N) * BLOCK_N
            for block_start in range(keys_start, masked_start, BLOCK_N):
                row_max, row_sum, acc = _attend_key_block(
                    q, k_ptr, v_ptr, head, block_start, keys_end, own_start, own_end, row_max, row_sum, acc,
                    scale_log2, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
                    False, BLOCK_N, BLOCK_D, HEAD_DIM,
                )
        for block_start in range(masked_start, keys_end, BLOCK_N):
            row_max, row_sum, acc = _attend_key_block(
                q, k_ptr, v_ptr, head, block_start, keys_end, own_start, own_end, row_max, row_sum, acc,
                scale_log2, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
                True, BLOCK_N, BLOCK_D, HEAD_DIM,
            )
        row_sum = tl.where(row_sum > 0.0, row_sum, 1.0)  # a tile of padding tokens only visits no key
        out = acc / row_sum[:, None]
        tl.store(
            out_ptr + rows * stride_out_token + head * stride_out_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=query_valid[:, None] & dim_valid[None, :],
        )


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    token_sequence_index: torch.Tensor,
    tile_starts: torch.Tensor | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 3,
    heads_inner: bool = True,
    split_unmasked: bool | None = None,
) -> torch.Tensor:
    """query, key, value: [T, heads, head_dim] (any strides with a contiguous last dim, e.g. views of
    one fused QKV output); cu_seqlens: [B+1] int32; token_sequence_index: [T], the sequence of each
    token (tokens past cu_seqlens[-1] may name an empty sequence); tile_starts: None (tiles of
    block_m tokens from 0) or `query_tile_starts(...)` for this block_m on the device, int64, whose
    last entry may be followed by empty tiles. Returns [T, heads, head_dim].
    The tile sizes and launch options are for benchmarks/attention_bench.py; the defaults are its
    pick. heads_inner: program (head, tile) instead of (tile, head). split_unmasked: None = when the
    mean sequence (from sizes the host knows, no sync) is at least SPLIT_UNMASKED_MIN_MEAN_LENGTH."""
    total_tokens, num_heads, head_dim = query.shape
    if split_unmasked is None:
        sequences = max(1, cu_seqlens.numel() - 1)
        split_unmasked = total_tokens >= SPLIT_UNMASKED_MIN_MEAN_LENGTH * sequences
    out = torch.empty(total_tokens, num_heads, head_dim, device=query.device, dtype=query.dtype)
    if total_tokens == 0:
        return out
    for tensor in (query, key, value):
        if tensor.stride(-1) != 1:
            raise ValueError("packed_attention needs the head dimension contiguous")
    tiles = triton.cdiv(total_tokens, block_m) if tile_starts is None else tile_starts.numel() - 1
    grid = (num_heads, tiles) if heads_inner else (tiles, num_heads)
    _packed_attention_kernel[grid](
        query, key, value, out, token_sequence_index, cu_seqlens, cu_seqlens if tile_starts is None else tile_starts,
        total_tokens, (1.0 / math.sqrt(head_dim)) * 1.4426950408889634,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HEAD_DIM=head_dim,
        HEADS_INNER=heads_inner, SPLIT_UNMASKED=split_unmasked, TILE_TABLE=tile_starts is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return out
