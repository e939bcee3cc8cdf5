"""Random XLM-R token rows for the GPU tests: <s> random ids </s>, right-padded with pad id 1."""

from __future__ import annotations

import numpy as np


def xlmr_rows(lengths, rng: np.random.Generator, vocab_size: int = 250002) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [rows, longest] int64, one row per length (each at least 2)."""
    ids = np.ones((len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = np.concatenate([[0], rng.integers(4, vocab_size, length - 2), [2]])
        mask[row, :length] = 1
    return ids, mask
