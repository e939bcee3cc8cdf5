"""Packing sequences from many requests into token streams with `cu_seqlens`.

Sequences are grouped by adapter slot, so each adapter's tokens are one contiguous run, and the
stream is cut into batches of at most `max_batch_tokens` tokens (TEI's `FlashBatch` shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SequenceRef:
    """One sequence to embed and where its embedding goes back to."""

    request_index: int
    output_row: int  # row of the engine's pooled output this sequence fills
    token_ids: np.ndarray  # [length] int64, no padding
    adapter_slot: int  # 0 = base model


@dataclass(frozen=True)
class AdapterSegment:
    """A contiguous run of tokens (and of sequences) that all use one adapter slot."""

    slot: int
    token_start: int
    token_end: int


@dataclass
class PackedBatch:
    """The one batch shape the encoder knows. Tensors live on the model's device."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32
    token_sequence_index: torch.Tensor  # [T] int64: which sequence each token belongs to
    max_seqlen: int
    sequence_lengths: tuple[int, ...]  # host copy of the lengths, [B]
    adapter_segments: tuple[AdapterSegment, ...]  # host-side, ordered, covering [0, T)
    adapter_slots: torch.Tensor  # [B] int32, per sequence

    @classmethod
    def host_summary(cls, host: "HostPackedArrays") -> "PackedBatch":
        """The host-side fields only (lengths, adapter segments), for the bookkeeping of a batch
        whose device work runs elsewhere (a CUDA graph replay); its tensors are empty."""
        empty = torch.empty(0, dtype=torch.int64)
        return cls(
            input_ids=empty, position_ids=empty, cu_seqlens=empty, token_sequence_index=empty,
            max_seqlen=int(host.lengths.max()), sequence_lengths=tuple(host.lengths.tolist()),
            adapter_segments=adapter_segments(host.slots, host.cu_seqlens), adapter_slots=empty,
        )

    @property
    def num_tokens(self) -> int:
        return int(sum(self.sequence_lengths))

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)


def plan_batches(sequences: list[SequenceRef], max_batch_tokens: int) -> list[list[SequenceRef]]:
    """Order by adapter slot (stable, so arrival order within an adapter), then cut at the budget.

    Every sequence must be at most `max_batch_tokens` long (the config guarantees max_seq_len fits).
    """
    ordered = sorted(sequences, key=lambda sequence: sequence.adapter_slot)
    batches: list[list[SequenceRef]] = []
    current: list[SequenceRef] = []
    current_tokens = 0
    for sequence in ordered:
        length = len(sequence.token_ids)
        if length > max_batch_tokens:
            raise ValueError(f"a sequence of {length} tokens exceeds max_batch_tokens={max_batch_tokens}")
        if current and current_tokens + length > max_batch_tokens:
            batches.append(current)
            current, current_tokens = [], 0
        current.append(sequence)
        current_tokens += length
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class HostPackedArrays:
    """The integer arrays of a packed batch, on the host (numpy int64)."""

    input_ids: np.ndarray  # [T]
    position_ids: np.ndarray  # [T]
    sequence_index: np.ndarray  # [T]
    cu_seqlens: np.ndarray  # [B+1]
    slots: np.ndarray  # [B]
    lengths: np.ndarray  # [B]


def pack_host_arrays(sequences: list[SequenceRef], position_offset: int) -> HostPackedArrays:
    lengths = np.fromiter((len(s.token_ids) for s in sequences), dtype=np.int64, count=len(sequences))
    cu_seqlens = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    total = int(cu_seqlens[-1])
    input_ids = np.concatenate([s.token_ids for s in sequences]).astype(np.int64, copy=False)
    sequence_index = np.repeat(np.arange(len(sequences), dtype=np.int64), lengths)  # [T]
    # XLM-R counts positions from pad_token_id + 1 in every sequence (HF
    # create_position_ids_from_input_ids); BERT from 0.
    position_ids = np.arange(total, dtype=np.int64) - cu_seqlens[:-1][sequence_index] + position_offset
    slots = np.fromiter((s.adapter_slot for s in sequences), dtype=np.int64, count=len(sequences))
    return HostPackedArrays(input_ids, position_ids, sequence_index, cu_seqlens, slots, lengths)


def adapter_segments(slots: np.ndarray, cu_seqlens: np.ndarray) -> tuple[AdapterSegment, ...]:
    """Maximal runs of consecutive sequences with the same slot, as token ranges."""
    segments = []
    run_start = 0
    for index in range(1, len(slots) + 1):
        if index == len(slots) or slots[index] != slots[run_start]:
            segments.append(AdapterSegment(int(slots[run_start]), int(cu_seqlens[run_start]), int(cu_seqlens[index])))
            run_start = index
    return tuple(segments)


def build_packed_batch(sequences: list[SequenceRef], position_offset: int, device: torch.device) -> PackedBatch:
    """Concatenate sequences (already grouped by adapter) into one packed batch on `device`."""
    host = pack_host_arrays(sequences, position_offset)
    total, num_sequences = len(host.input_ids), len(sequences)
    # One host-to-device copy for all integer arrays.
    flat_host = torch.from_numpy(
        np.concatenate([host.input_ids, host.position_ids, host.sequence_index, host.cu_seqlens, host.slots])
    )
    if device.type == "cuda":
        flat_host = flat_host.pin_memory()
    flat = flat_host.to(device, non_blocking=True)
    return PackedBatch(
        input_ids=flat[:total],
        position_ids=flat[total : 2 * total],
        token_sequence_index=flat[2 * total : 3 * total],
        cu_seqlens=flat[3 * total : 3 * total + num_sequences + 1].to(torch.int32),
        adapter_slots=flat[3 * total + num_sequences + 1 :].to(torch.int32),
        max_seqlen=int(host.lengths.max()),
        sequence_lengths=tuple(host.lengths.tolist()),
        adapter_segments=adapter_segments(host.slots, host.cu_seqlens),
    )
