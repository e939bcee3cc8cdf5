"""Fused elementwise operations of the encoder, each behind one entry point: a Triton-language
kernel on CUDA, the plain PyTorch reference elsewhere (and in the tests that check the kernel).

Two of them can also add a pending LoRA delta (`LoraDelta`) in the same pass: the LoRA layers
(lora/layers.py) run the base GEMM and the shrink, and hand the expand to the elementwise kernel
that reads the GEMM's output anyway, instead of a read-modify-write of that output:
`add_lora_activation` (the GELU after intermediate.dense) and `add_layer_norm`'s `lora` argument
(the residual + LayerNorm after attention.output.dense and output.dense).

The same kernels can also do the LoRA shrink of the linear that reads what they write
(`LoraShrink`): the rows are in registers when they are stored, so the shrink's own pass over
them (a launch that reads the whole activation again) goes away. The residual + LayerNorm after
attention.output.dense shrinks for intermediate.dense, the one after output.dense for the next
layer's Q/K/V, and the GELU pass for output.dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the reference path only
    triton = None

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf), as HF's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "identity": lambda x: x,  # add_lora_activation(x, lora, "identity"): only the delta
}
# The kernel's code for each activation (a constexpr: one compiled variant per activation).
_ACTIVATION_CODES = {"identity": 0, "gelu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2, "relu": 3}
LORA_LAYER_NORM_MAX_BLOCK = 1024  # whole rows of ROWS_PER_LORA_NORM rows in registers
ROWS_PER_LORA_NORM = 16  # tl.dot needs at least 16 rows
# Launch settings chosen by benchmarks/lora_kernel_sweep.py on an H100 (16k tokens, 64 adapters;
# results/lora-kernel-sweep-2026-11-28-h100.md): GELU + LoRA over [T, 3072] 106 us, against 123 us
# with 64 x 128 tiles and 8 warps; residual + LayerNorm + LoRA over [T, 768] 52 us, against 64 us
# with 16 warps.
LORA_ACTIVATION_LAUNCH = dict(BLOCK_T=32, BLOCK_N=128, num_warps=4, num_stages=2)
LORA_LAYER_NORM_LAUNCH = dict(num_warps=4, num_stages=1)
# The GELU pass that also shrinks for output.dense walks whole rows, BLOCK_N columns at a time. Not
# yet swept on a GPU: the plain kernel's tile.
LORA_ACTIVATION_SHRINK_LAUNCH = dict(BLOCK_T=32, BLOCK_N=128, num_warps=4, num_stages=2)
# Ranks go through the dots in chunks of 16 (tl.dot's smallest K; zero-padded beyond the rank):
# bounded shared memory and registers whatever the rank (ptxas on sm_90: no spills, <= 118 registers).
LORA_RANK_CHUNK = 16


@dataclass(frozen=True)
class LoraDelta:
    """A LoRA delta not yet added to a linear's output [T, out]: row t gets
    `shrunk[t, :rank] @ lora_b[token_slots[t]].T`, and nothing where token_slots[t] == 0 (the
    base model; those rows of `shrunk` are never read and may hold anything)."""

    shrunk: torch.Tensor  # [T, >= rank] float32, x @ A[slot].T (lora/sgmv_triton.py's shrink)
    lora_b: torch.Tensor  # [slots, out, rank], scaling folded in, zero-padded beyond each slot's rank
    token_slots: torch.Tensor  # [T] int32

    @property
    def rank(self) -> int:
        return self.lora_b.shape[2]


@dataclass(frozen=True)
class LoraShrink:
    """A LoRA shrink asked of the kernel that produces a linear's input y [T, in]: it writes
    `out[t] = y[t] @ lora_a[token_slots[t]].T` (y as stored, in its dtype) for every row whose slot
    is not 0; rows of slot 0 are left as they are (their consumers never read them)."""

    lora_a: torch.Tensor  # [slots, R, in] (all slices of a fused projection: R = slices * rank)
    token_slots: torch.Tensor  # [T] int32
    out: torch.Tensor  # [T, R] float32 (float64 for float64 models), written in place
    # How the linear would shrink y on its own ([T, R] float32), for producers no kernel covers
    # (e.g. hidden sizes over LORA_LAYER_NORM_MAX_BLOCK); None: `lora_shrink_reference`.
    separately: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]


def lora_shrink_reference(y: torch.Tensor, shrink: LoraShrink) -> None:
    """Fill `shrink.out` from y [T, in], one matmul per slot present (syncs with the host: reference only)."""
    for slot in shrink.token_slots.unique().tolist():
        if slot == 0:
            continue
        rows = shrink.token_slots == slot
        shrink.out[rows] = y[rows].to(shrink.out.dtype) @ shrink.lora_a[slot].to(shrink.out.dtype).T


def lora_delta_reference(lora: LoraDelta) -> torch.Tensor:
    """The delta [T, out] in shrunk's dtype (float32; float64 in float64 tests), one matmul per slot
    present (syncs with the host: reference only)."""
    shrunk = lora.shrunk
    delta = torch.zeros(shrunk.shape[0], lora.lora_b.shape[1], device=shrunk.device, dtype=shrunk.dtype)
    for slot in lora.token_slots.unique().tolist():
        if slot == 0:
            continue
        rows = lora.token_slots == slot
        delta[rows] = shrunk[rows, : lora.rank] @ lora.lora_b[slot].to(shrunk.dtype).T
    return delta


def add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def add_lora_activation_reference(x: torch.Tensor, lora: LoraDelta, activation: str) -> torch.Tensor:
    # The unfused path's roundings: the delta is added into the GEMM's output dtype, then activated.
    delta = lora_delta_reference(lora)
    return ACTIVATIONS[activation]((x.to(delta.dtype) + delta).to(x.dtype))


def _on_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def _lora_kernel_supported(x: torch.Tensor, lora: LoraDelta | None) -> bool:
    return lora is None or (
        _on_triton(x)
        and x.dtype in (torch.bfloat16, torch.float16)
        and lora.lora_b.dtype == x.dtype
        and lora.rank <= 128
        and lora.shrunk.dtype == torch.float32
        and lora.shrunk.stride(1) == 1
        and lora.lora_b.stride(2) == 1
    )


def _shrink_kernel_supported(y: torch.Tensor, shrink: LoraShrink | None, max_rank: int | None) -> bool:
    return shrink is None or (
        _on_triton(y)
        and y.dtype in (torch.bfloat16, torch.float16)
        and shrink.lora_a.dtype == y.dtype
        and shrink.lora_a.stride(2) == 1
        and shrink.out.dtype == torch.float32
        and shrink.out.stride(1) == 1
        and (max_rank is None or shrink.rank <= max_rank)
    )


def _shrink_separately(y: torch.Tensor, shrink: LoraShrink | None) -> None:
    """Where no kernel takes the shrink: the linear's own way (`LoraShrink.separately`), else the reference."""
    if shrink is None:
        return
    if shrink.separately is None:
        lora_shrink_reference(y, shrink)
    else:
        shrink.out.copy_(shrink.separately(y))


if triton is not None:

    @triton.jit
    def _add_layer_norm_kernel(
        x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, n_rows, n_cols, eps,
        BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):
        # ROWS rows per program, each row held whole in registers (hidden sizes up to BLOCK).
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
        mask = (rows < n_rows) & (cols < n_cols)
        offsets = rows.to(tl.int64) * n_cols + cols
        summed = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + tl.load(
            residual_ptr + offsets, mask=mask, other=0.0
        ).to(tl.float32)
        mean = tl.sum(summed, axis=1)[:, None] / n_cols
        centered = tl.where(mask, summed - mean, 0.0)
        variance = tl.sum(centered * centered, axis=1)[:, None] / n_cols
        normalized = centered * tl.rsqrt(variance + eps)
        weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (normalized * weight + bias).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lora_delta(
        rows, slots, cols, col_mask, shrunk_ptr, b_ptr, rank, stride_shrunk, stride_b_slot, stride_b_row,
        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """The LoRA delta [BLOCK_ROWS, BLOCK_COLS] float32 of rows `rows` (int64) with adapter slots
        `slots`, columns `cols`: one pass of dots per distinct slot among the rows (usually one; two
        or three where segments meet). Rows of other slots load a zero `shrunk`, so those dots add
        nothing to them; slot-0 rows are never loaded, and a block of base rows does no dot at all.
        The rank goes in chunks of BLOCK_R (bounded shared memory for wide rows)."""
        delta = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        slot = tl.min(tl.where(slots > 0, slots, 2147483647), axis=0)  # smallest adapter slot present
        while slot < 2147483647:
            in_slot = slots == slot
            b_slot = b_ptr + slot.to(tl.int64) * stride_b_slot
            for rank_start in range(0, rank, BLOCK_R):
                ranks = rank_start + tl.arange(0, BLOCK_R)
                rank_mask = ranks < rank
                shrunk = tl.load(
                    shrunk_ptr + rows[:, None] * stride_shrunk + ranks[None, :],
                    mask=in_slot[:, None] & rank_mask[None, :], other=0.0,
                )  # [BLOCK_ROWS, BLOCK_R] float32
                b_tile = tl.load(
                    b_slot + cols[None, :] * stride_b_row + ranks[:, None],
                    mask=rank_mask[:, None] & col_mask[None, :], other=0.0,
                )  # [BLOCK_R, BLOCK_COLS]
                delta = tl.dot(shrunk.to(b_tile.dtype), b_tile, delta)
            slot = tl.min(tl.where(slots > slot, slots, 2147483647), axis=0)  # the next slot present
        return delta

    @triton.jit
    def _lora_shrink_accumulate(
        acc, y, slots, cols, col_mask, ranks, rank_mask, a_ptr, stride_a_slot, stride_a_rank,
    ):
        """acc [rows, ranks] + y[:, cols] @ A[slot of the row][ranks, cols].T, y [rows, cols] as
        stored (half precision): one dot per distinct slot among the rows, over y with the rows of
        other slots zeroed, so each row gets its own adapter's A. Slot-0 rows get nothing."""
        slot = tl.min(tl.where(slots > 0, slots, 2147483647), axis=0)
        while slot < 2147483647:
            a_tile = tl.load(
                a_ptr + slot.to(tl.int64) * stride_a_slot + ranks[None, :] * stride_a_rank + cols[:, None],
                mask=col_mask[:, None] & rank_mask[None, :], other=0.0,
            )  # [cols, ranks]
            acc = tl.dot(tl.where((slots == slot)[:, None], y, 0.0).to(a_tile.dtype), a_tile, acc)
            slot = tl.min(tl.where(slots > slot, slots, 2147483647), axis=0)
        return acc

    @triton.jit
    def _activate(value, ACTIVATION: tl.constexpr):
        if ACTIVATION == 1:  # exact GELU (erf), as F.gelu
            value = 0.5 * value * (1.0 + tl.math.erf(value * 0.7071067811865476))
        elif ACTIVATION == 2:  # tanh GELU: 0.5 v (1 + tanh(z)) = v sigmoid(2z)
            inner = 0.7978845608028654 * (value + 0.044715 * value * value * value)
            value = value * tl.sigmoid(2.0 * inner)
        elif ACTIVATION == 3:
            value = tl.maximum(value, 0.0)
        return value

    # n_rows changes with every batch: no specialization on it (one compiled variant, not three).
    @triton.jit(do_not_specialize=["n_rows"])
    def _add_lora_activation_kernel(
        x_ptr, shrunk_ptr, b_ptr, slots_ptr, out_ptr, n_rows, n_cols, rank,
        stride_x, stride_shrunk, stride_b_slot, stride_b_row, stride_out,
        ACTIVATION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        row_mask = rows < n_rows
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)  # [BT]
        # The delta first, then x: with x loaded first (meant to overlap its traffic with the dots) the
        # sweep measured 122 us instead of 106 (H100, 16k x 3072; the LayerNorm kernel 86 instead of 52).
        value = _lora_delta(
            rows, slots, cols, col_mask, shrunk_ptr, b_ptr, rank, stride_shrunk, stride_b_slot, stride_b_row,
            BLOCK_T, BLOCK_N, BLOCK_R,
        )
        value += tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        value = _activate(value, ACTIVATION)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["n_rows"])
    def _lora_activation_shrink_kernel(
        x_ptr, shrunk_ptr, b_ptr, slots_ptr, out_ptr, a_ptr, shrunk_out_ptr, n_rows, n_cols, rank, rank_out,
        stride_x, stride_shrunk, stride_b_slot, stride_b_row, stride_out, stride_a_slot, stride_a_rank,
        stride_shrunk_out,
        ACTIVATION: tl.constexpr, HAS_DELTA: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_R_OUT: tl.constexpr,
    ):
        # _add_lora_activation_kernel over whole rows (BLOCK_T rows, BLOCK_N columns at a time), so
        # that the next linear's shrink of the activated rows adds up in registers, with no atomics.
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
        row_mask = rows < n_rows
        rows = rows.to(tl.int64)
        slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)  # [BT]
        ranks_out = tl.arange(0, BLOCK_R_OUT)
        rank_out_mask = ranks_out < rank_out
        shrunk_out = tl.zeros((BLOCK_T, BLOCK_R_OUT), dtype=tl.float32)
        for col_start in range(0, n_cols, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)  # [BN]
            col_mask = cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            if HAS_DELTA:
                value = _lora_delta(
                    rows, slots, cols, col_mask, shrunk_ptr, b_ptr, rank, stride_shrunk, stride_b_slot,
                    stride_b_row, BLOCK_T, BLOCK_N, BLOCK_R,
                )
                value += tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                value = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            activated = _activate(value, ACTIVATION).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], activated, mask=mask)
            shrunk_out = _lora_shrink_accumulate(
                shrunk_out, activated, slots, cols, col_mask, ranks_out, rank_out_mask, a_ptr, stride_a_slot,
                stride_a_rank,
            )
        tl.store(
            shrunk_out_ptr + rows[:, None] * stride_shrunk_out + ranks_out[None, :], shrunk_out,
            mask=(row_mask & (slots > 0))[:, None] & rank_out_mask[None, :],
        )

    @triton.jit(do_not_specialize=["n_rows"])
    def _add_lora_layer_norm_kernel(
        x_ptr, residual_ptr, weight_ptr, bias_ptr, shrunk_ptr, b_ptr, slots_ptr, out_ptr, a_ptr, shrunk_out_ptr,
        n_rows, n_cols, rank, rank_out, eps, stride_shrunk, stride_b_slot, stride_b_row, stride_a_slot,
        stride_a_rank, stride_shrunk_out,
        HAS_DELTA: tl.constexpr, HAS_SHRINK: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        # _add_layer_norm_kernel with the LoRA delta added to x + residual before the statistics
        # (HAS_DELTA), and the next linear's shrink of the normalized rows (HAS_SHRINK).
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
        cols = tl.arange(0, BLOCK)  # [BLOCK]
        row_mask = rows < n_rows
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)  # [ROWS]
        offsets = rows[:, None] * n_cols + cols[None, :]
        if HAS_DELTA:
            summed = _lora_delta(  # the delta first (see _add_lora_activation_kernel)
                rows, slots, cols, col_mask, shrunk_ptr, b_ptr, rank, stride_shrunk, stride_b_slot, stride_b_row,
                ROWS, BLOCK, BLOCK_R,
            )
            summed += tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        else:
            summed = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        summed += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(summed, axis=1)[:, None] / n_cols
        centered = tl.where(mask, summed - mean, 0.0)
        variance = tl.sum(centered * centered, axis=1)[:, None] / n_cols
        normalized = centered * tl.rsqrt(variance + eps)
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        out = (normalized * weight + bias).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, out, mask=mask)
        if HAS_SHRINK:  # rank chunks of BLOCK_R: an A tile of [BLOCK, BLOCK_R] at a time
            for rank_start in range(0, rank_out, BLOCK_R):
                ranks = rank_start + tl.arange(0, BLOCK_R)
                rank_mask = ranks < rank_out
                part = _lora_shrink_accumulate(
                    tl.zeros((ROWS, BLOCK_R), dtype=tl.float32), out, slots, cols, col_mask, ranks, rank_mask,
                    a_ptr, stride_a_slot, stride_a_rank,
                )
                tl.store(
                    shrunk_out_ptr + rows[:, None] * stride_shrunk_out + ranks[None, :], part,
                    mask=(row_mask & (slots > 0))[:, None] & rank_mask[None, :],
                )


# The activation kernel with a shrink holds BLOCK_T x BLOCK_R_OUT partial sums: ranks up to this.
LORA_ACTIVATION_SHRINK_MAX_RANK = 128


def add_lora_activation(
    x: torch.Tensor, lora: LoraDelta | None, activation: str, shrink: LoraShrink | None = None
) -> torch.Tensor:
    """activation(x + LoRA delta), x: [T, out] (a linear's output, whose memory is reused: do not
    read x afterwards). One pass over x on CUDA; `activation` is a name of ACTIVATIONS. With
    `shrink`, the activated rows' LoRA shrink for the next linear is written in the same pass."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if lora is None and shrink is None:
        return ACTIVATIONS[activation](x)
    if not (
        _on_triton(x)
        and _lora_kernel_supported(x, lora)
        and _shrink_kernel_supported(x, shrink, LORA_ACTIVATION_SHRINK_MAX_RANK)
    ):
        out = ACTIVATIONS[activation](x) if lora is None else add_lora_activation_reference(x, lora, activation)
        _shrink_separately(out, shrink)
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return x
    if shrink is None:
        launch = LORA_ACTIVATION_LAUNCH
        grid = (triton.cdiv(n_rows, launch["BLOCK_T"]), triton.cdiv(n_cols, launch["BLOCK_N"]))
        _add_lora_activation_kernel[grid](
            x, lora.shrunk, lora.lora_b, lora.token_slots, x, n_rows, n_cols, lora.rank,
            x.stride(0), lora.shrunk.stride(0), lora.lora_b.stride(0), lora.lora_b.stride(1), x.stride(0),
            ACTIVATION=_ACTIVATION_CODES[activation], BLOCK_R=LORA_RANK_CHUNK, **launch,
        )
        return x
    launch = LORA_ACTIVATION_SHRINK_LAUNCH
    # Without a delta, x stands in for its pointers and its rank is 0: that code is not compiled.
    shrunk, lora_b, rank = (lora.shrunk, lora.lora_b, lora.rank) if lora is not None else (x, x[None], 0)
    _lora_activation_shrink_kernel[(triton.cdiv(n_rows, launch["BLOCK_T"]),)](
        x, shrunk, lora_b, shrink.token_slots, x, shrink.lora_a, shrink.out, n_rows, n_cols, rank, shrink.rank,
        x.stride(0), shrunk.stride(0), lora_b.stride(0), lora_b.stride(1), x.stride(0),
        shrink.lora_a.stride(0), shrink.lora_a.stride(1), shrink.out.stride(0),
        ACTIVATION=_ACTIVATION_CODES[activation], HAS_DELTA=lora is not None, BLOCK_R=LORA_RANK_CHUNK,
        BLOCK_R_OUT=max(16, triton.next_power_of_2(shrink.rank)), **launch,
    )
    return x


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    lora: LoraDelta | None = None,
    shrink: LoraShrink | None = None,
) -> torch.Tensor:
    """LayerNorm(x + lora delta + residual) over the last dim; x, residual: [T, H]. One pass over
    memory on CUDA (with a LoRA delta or shrink: hidden sizes up to LORA_LAYER_NORM_MAX_BLOCK).
    With `shrink`, the normalized rows' LoRA shrink for the next linear is written in that pass."""
    if lora is not None or shrink is not None:
        if (
            _on_triton(x)
            and _lora_kernel_supported(x, lora)
            and _shrink_kernel_supported(x, shrink, None)
            and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[-1] <= LORA_LAYER_NORM_MAX_BLOCK
            and x.shape[0] > 0
        ):
            return _add_lora_layer_norm(x, residual, weight, bias, eps, lora, shrink)
        if lora is not None:  # the delta in its own pass, then the plain kernel
            x = add_lora_activation(x, lora, "identity")
        out = add_layer_norm(x, residual, weight, bias, eps)
        _shrink_separately(out, shrink)
        return out
    if triton is None or not x.is_cuda or x.shape[-1] > 8192:
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    x, residual = x.contiguous(), residual.contiguous()
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(n_cols)
    rows_per_program = max(1, min(16, 4096 // block))
    grid = (triton.cdiv(n_rows, rows_per_program),)
    _add_layer_norm_kernel[grid](
        x, residual, weight, bias, out, n_rows, n_cols, eps,
        BLOCK=block, ROWS=rows_per_program, num_warps=4 if block <= 1024 else 8,
    )
    return out


def _add_lora_layer_norm(x, residual, weight, bias, eps, lora: LoraDelta | None, shrink: LoraShrink | None):
    x, residual = x.contiguous(), residual.contiguous()
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    # Whichever part is off gets x for its pointers and zeros for its sizes: its code is not compiled.
    shrunk, lora_b, rank = (lora.shrunk, lora.lora_b, lora.rank) if lora is not None else (x, x[None], 0)
    lora_a, shrunk_out, rank_out = (shrink.lora_a, shrink.out, shrink.rank) if shrink is not None else (x[None], x, 0)
    _add_lora_layer_norm_kernel[(triton.cdiv(n_rows, ROWS_PER_LORA_NORM),)](
        x, residual, weight, bias, shrunk, lora_b, (lora or shrink).token_slots, out, lora_a, shrunk_out,
        n_rows, n_cols, rank, rank_out, eps, shrunk.stride(0), lora_b.stride(0), lora_b.stride(1),
        lora_a.stride(0), lora_a.stride(1), shrunk_out.stride(0),
        HAS_DELTA=lora is not None, HAS_SHRINK=shrink is not None,
        BLOCK=triton.next_power_of_2(n_cols), ROWS=ROWS_PER_LORA_NORM, BLOCK_R=LORA_RANK_CHUNK,
        **LORA_LAYER_NORM_LAUNCH,
    )
    return out
