"""The short-sequence attention (dense SDPA over chunks and windows) equals the SDPA reference."""

from __future__ import annotations

import pytest
import torch

from loraembed.attention import LOCAL_WINDOW, local_window_attention, local_window_mask, sdpa_reference_attention


@pytest.mark.parametrize("seed", range(6))
def test_local_window_attention_matches_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 60, (1,), generator=generator))
    lengths = torch.randint(1, LOCAL_WINDOW + 2, (count,), generator=generator)  # up to WINDOW + 1 tokens
    lengths[0] = LOCAL_WINDOW + 1
    cu_seqlens = torch.zeros(count + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    total = int(cu_seqlens[-1])
    query, key, value = (torch.randn(total, 4, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    sequence_index = torch.repeat_interleave(torch.arange(count), lengths)
    ours = local_window_attention(query, key, value, local_window_mask(sequence_index))
    reference = sdpa_reference_attention(query, key, value, cu_seqlens, int(lengths.max()))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
