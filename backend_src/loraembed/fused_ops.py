"""Fused elementwise operations of the encoder, each behind one entry point: a Triton-language
kernel on CUDA, the plain PyTorch reference elsewhere (and in the tests that check the kernel).

`linear_activation` is the intermediate projection and its activation: cuBLASLt applies tanh GELU
and ReLU in the GEMM's epilogue on CUDA (there is no exact-GELU epilogue), the separate pass elsewhere.

Two of them can also add a pending LoRA delta (`LoraDelta`) in the same pass: the LoRA layers
(lora/layers.py) run the base GEMM and the shrink, and hand the expand to the elementwise kernel
that reads the GEMM's output anyway, instead of a read-modify-write of that output:
`add_lora_activation` (the GELU after intermediate.dense) and `add_layer_norm`'s `lora` argument
(the residual + LayerNorm after attention.output.dense and output.dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cublaslt import tuned_linear

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
# The kernels' code for each activation (a constexpr: one compiled variant per activation); the
# fused LoRA GEMM (lora/lora_gemm_triton.py) uses the same codes.
ACTIVATION_CODES = {"identity": 0, "gelu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2, "relu": 3}
# The activations cuBLASLt's GEMM epilogue computes (torch._addmm_activation: use_gelu or ReLU).
EPILOGUE_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "relu": False}  # name: use_gelu
LORA_LAYER_NORM_MAX_BLOCK = 1024  # whole rows of ROWS_PER_LORA_NORM rows in registers
ROWS_PER_LORA_NORM = 16  # tl.dot needs at least 16 rows
# Launch settings chosen by benchmarks/lora_kernel_sweep.py on an H100 (16k tokens, 64 adapters;
# results/lora-kernel-sweep-2026-11-28-h100.md): GELU + LoRA over [T, 3072] 106 us, against 123 us
# with 64 x 128 tiles and 8 warps; residual + LayerNorm + LoRA over [T, 768] 52 us, against 64 us
# with 16 warps.
LORA_ACTIVATION_LAUNCH = dict(BLOCK_T=32, BLOCK_N=128, num_warps=4, num_stages=2)
LORA_LAYER_NORM_LAUNCH = dict(num_warps=4, num_stages=1)
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


def linear_activation_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    return ACTIVATIONS[activation](F.linear(x, weight, bias))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias: on the cuBLASLt algorithm `cublaslt.tune_linears` kept for this shape
    where it kept one, else `F.linear` (the same answers, bit for bit)."""
    tuned = tuned_linear(x, weight, bias, None)
    return F.linear(x, weight, bias) if tuned is None else tuned


def linear_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """activation(x @ weight.T + bias), x: [T, in]. One cuBLASLt GEMM with the bias and the activation
    in its epilogue for tanh GELU and ReLU on CUDA (16-bit floats; on the algorithm
    `cublaslt.tune_linears` kept, if it kept one); the reference elsewhere."""
    if (
        activation in EPILOGUE_ACTIVATIONS
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.dim() == 2
        and bias is not None
    ):
        use_gelu = EPILOGUE_ACTIVATIONS[activation]
        tuned = tuned_linear(x, weight, bias, "gelu" if use_gelu else "relu")
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=use_gelu) if tuned is None else tuned
    return linear_activation_reference(x, weight, bias, activation)


def add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def embeddings_layer_norm_reference(
    input_ids: torch.Tensor, position_ids: torch.Tensor, word: torch.Tensor, position: torch.Tensor,
    type_row: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
) -> torch.Tensor:
    """HF's BERT / XLM-R embeddings of single-segment inputs: LayerNorm(word + position + token type 0)."""
    embedded = F.embedding(input_ids, word) + F.embedding(position_ids, position) + type_row
    return F.layer_norm(embedded, (word.shape[1],), weight, bias, eps)


def add_lora_activation_reference(x: torch.Tensor, lora: LoraDelta, activation: str) -> torch.Tensor:
    # The unfused path's roundings: the delta is added into the GEMM's output dtype, then activated.
    delta = lora_delta_reference(lora)
    return ACTIVATIONS[activation]((x.to(delta.dtype) + delta).to(x.dtype))


def _on_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def _lora_kernel_supported(x: torch.Tensor, lora: LoraDelta) -> bool:
    return (
        _on_triton(x)
        and x.dtype in (torch.bfloat16, torch.float16)
        and lora.lora_b.dtype == x.dtype
        and lora.rank <= 128
        and lora.shrunk.dtype == torch.float32
        and lora.shrunk.stride(1) == 1
        and lora.lora_b.stride(2) == 1
    )


if triton is not None:

    @triton.jit
    def _layer_norm_rows(summed, mask, cols, n_cols, weight_ptr, bias_ptr, eps):
        """LayerNorm of rows `summed` [ROWS, BLOCK] float32 (zero where `mask` is off), cols [1, BLOCK]:
        the float32 result times the weight, plus the bias. The kernels below share it."""
        mean = tl.sum(summed, axis=1)[:, None] / n_cols
        centered = tl.where(mask, summed - mean, 0.0)
        variance = tl.sum(centered * centered, axis=1)[:, None] / n_cols
        normalized = centered * tl.rsqrt(variance + eps)
        weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        return normalized * weight + bias

    @triton.jit
    def _add_layer_norm_kernel(
        x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, n_rows, n_cols, stride_residual, eps,
        BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):
        # ROWS rows per program, each row held whole in registers (hidden sizes up to BLOCK).
        # stride_residual 0: one row added to every row (a linear's bias, when the GEMM added the residual).
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
        mask = (rows < n_rows) & (cols < n_cols)
        offsets = rows.to(tl.int64) * n_cols + cols
        summed = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + tl.load(
            residual_ptr + rows.to(tl.int64) * stride_residual + cols, mask=mask, other=0.0
        ).to(tl.float32)
        normalized = _layer_norm_rows(summed, mask, cols, n_cols, weight_ptr, bias_ptr, eps)
        tl.store(out_ptr + offsets, normalized.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["n_rows"])
    def _embeddings_layer_norm_kernel(
        ids_ptr, positions_ptr, word_ptr, position_ptr, type_ptr, weight_ptr, bias_ptr, out_ptr, n_rows, n_cols,
        stride_word, stride_position, eps, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):
        # _add_layer_norm_kernel over gathered rows: word[id] + position[position id] + the type row.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
        row_mask = rows < n_rows
        mask = row_mask & (cols < n_cols)
        ids = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        positions = tl.load(positions_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        summed = tl.load(word_ptr + ids * stride_word + cols, mask=mask, other=0.0).to(tl.float32)
        summed += tl.load(position_ptr + positions * stride_position + cols, mask=mask, other=0.0).to(tl.float32)
        summed += tl.load(type_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        normalized = _layer_norm_rows(summed, mask, cols, n_cols, weight_ptr, bias_ptr, eps)
        tl.store(out_ptr + rows.to(tl.int64) * n_cols + cols, normalized.to(out_ptr.dtype.element_ty), mask=mask)

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
        if ACTIVATION == 1:  # exact GELU (erf), as F.gelu
            value = 0.5 * value * (1.0 + tl.math.erf(value * 0.7071067811865476))
        elif ACTIVATION == 2:  # tanh GELU: 0.5 v (1 + tanh(z)) = v sigmoid(2z)
            inner = 0.7978845608028654 * (value + 0.044715 * value * value * value)
            value = value * tl.sigmoid(2.0 * inner)
        elif ACTIVATION == 3:
            value = tl.maximum(value, 0.0)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["n_rows"])
    def _add_lora_layer_norm_kernel(
        x_ptr, residual_ptr, weight_ptr, bias_ptr, shrunk_ptr, b_ptr, slots_ptr, out_ptr,
        n_rows, n_cols, rank, eps, stride_shrunk, stride_b_slot, stride_b_row,
        BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # _add_layer_norm_kernel with the LoRA delta added to x + residual before the statistics.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
        cols = tl.arange(0, BLOCK)  # [BLOCK]
        row_mask = rows < n_rows
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        slots = tl.load(slots_ptr + rows, mask=row_mask, other=0)  # [ROWS]
        summed = _lora_delta(  # the delta first (see _add_lora_activation_kernel)
            rows, slots, cols, col_mask, shrunk_ptr, b_ptr, rank, stride_shrunk, stride_b_slot, stride_b_row,
            ROWS, BLOCK, BLOCK_R,
        )
        offsets = rows[:, None] * n_cols + cols[None, :]
        summed += tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        summed += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        normalized = _layer_norm_rows(summed, mask, cols[None, :], n_cols, weight_ptr, bias_ptr, eps)
        tl.store(out_ptr + offsets, normalized.to(out_ptr.dtype.element_ty), mask=mask)


def add_lora_activation(x: torch.Tensor, lora: LoraDelta, activation: str) -> torch.Tensor:
    """activation(x + LoRA delta), x: [T, out] (a linear's output, whose memory is reused: do not
    read x afterwards). One pass over x on CUDA; `activation` is a name of ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if not _lora_kernel_supported(x, lora):
        return add_lora_activation_reference(x, lora, activation)
    x = x if x.stride(-1) == 1 else x.contiguous()
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return x
    launch = LORA_ACTIVATION_LAUNCH
    grid = (triton.cdiv(n_rows, launch["BLOCK_T"]), triton.cdiv(n_cols, launch["BLOCK_N"]))
    _add_lora_activation_kernel[grid](
        x, lora.shrunk, lora.lora_b, lora.token_slots, x, n_rows, n_cols, lora.rank,
        x.stride(0), lora.shrunk.stride(0), lora.lora_b.stride(0), lora.lora_b.stride(1), x.stride(0),
        ACTIVATION=ACTIVATION_CODES[activation], BLOCK_R=LORA_RANK_CHUNK, **launch,
    )
    return x


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    lora: LoraDelta | None = None,
) -> torch.Tensor:
    """LayerNorm(x + lora delta + residual) over the last dim; x: [T, H], residual: [T, H], or [H]
    added to every row without a LoRA delta (benchmarks/epilogue_probe.py measures a linear's bias
    added here). One pass over memory on CUDA (with a LoRA delta: hidden sizes up to
    LORA_LAYER_NORM_MAX_BLOCK)."""
    if lora is not None:
        if _lora_kernel_supported(x, lora) and x.shape[-1] <= LORA_LAYER_NORM_MAX_BLOCK and x.shape[0] > 0:
            return _add_lora_layer_norm(x, residual, weight, bias, eps, lora)
        x = add_lora_activation(x, lora, "identity")  # the delta in its own pass, then the plain kernel
    if triton is None or not x.is_cuda or x.shape[-1] > 8192:
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    x = x.contiguous()
    residual = residual.expand_as(x)
    if residual.stride(-1) != 1 or residual.stride(0) not in (0, x.shape[-1]):
        residual = residual.contiguous()
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    launch = _layer_norm_launch(n_cols)
    _add_layer_norm_kernel[(triton.cdiv(n_rows, launch["ROWS"]),)](
        x, residual, weight, bias, out, n_rows, n_cols, residual.stride(0), eps, **launch,
    )
    return out


def _layer_norm_launch(n_cols: int) -> dict:
    """BLOCK, ROWS and num_warps of the two plain LayerNorm kernels: each row whole in registers,
    up to 4,096 values per program."""
    block = triton.next_power_of_2(n_cols)
    return dict(BLOCK=block, ROWS=max(1, min(16, 4096 // block)), num_warps=4 if block <= 1024 else 8)


def embeddings_layer_norm(
    input_ids: torch.Tensor, position_ids: torch.Tensor, word: torch.Tensor, position: torch.Tensor,
    type_row: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
) -> torch.Tensor:
    """LayerNorm(word[input_ids] + position[position_ids] + type_row), [T, H]: one pass on CUDA instead of
    two gathers, two adds and a LayerNorm (~100 µs per 16k-token batch on an H200, NOTES item 45).
    The ids must be in range (the engine validates them)."""
    n_cols = word.shape[1]
    if triton is None or not word.is_cuda or n_cols > 8192 or word.stride(1) != 1 or position.stride(1) != 1:
        return embeddings_layer_norm_reference(input_ids, position_ids, word, position, type_row, weight, bias, eps)
    n_rows = input_ids.shape[0]
    out = torch.empty(n_rows, n_cols, device=word.device, dtype=word.dtype)
    if n_rows == 0:
        return out
    launch = _layer_norm_launch(n_cols)
    _embeddings_layer_norm_kernel[(triton.cdiv(n_rows, launch["ROWS"]),)](
        input_ids.contiguous(), position_ids.contiguous(), word, position, type_row.contiguous(), weight, bias, out, n_rows, n_cols,
        word.stride(0), position.stride(0), eps, **launch,
    )
    return out


def _add_lora_layer_norm(x, residual, weight, bias, eps, lora: LoraDelta) -> torch.Tensor:
    x, residual = x.contiguous(), residual.contiguous()
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(n_cols)
    _add_lora_layer_norm_kernel[(triton.cdiv(n_rows, ROWS_PER_LORA_NORM),)](
        x, residual, weight, bias, lora.shrunk, lora.lora_b, lora.token_slots, out,
        n_rows, n_cols, lora.rank, eps, lora.shrunk.stride(0), lora.lora_b.stride(0), lora.lora_b.stride(1),
        BLOCK=block, ROWS=ROWS_PER_LORA_NORM, BLOCK_R=LORA_RANK_CHUNK, **LORA_LAYER_NORM_LAUNCH,
    )
    return out
