"""Each fused CUDA kernel against its PyTorch reference, on random shapes."""

from __future__ import annotations

import pytest
import torch

from loraembed.fused_ops import add_layer_norm, add_layer_norm_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows, hidden", [(1, 384), (7, 768), (16384, 768), (1000, 1024), (33, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_add_layer_norm_matches_reference(rows, hidden, dtype):
    torch.manual_seed(rows + hidden)
    x, residual = (torch.randn(rows, hidden, device="cuda", dtype=dtype) * 3 for _ in range(2))
    weight = torch.randn(hidden, device="cuda", dtype=dtype)
    bias = torch.randn(hidden, device="cuda", dtype=dtype)
    out = add_layer_norm(x, residual, weight, bias, 1e-5)
    reference = add_layer_norm_reference(x.double(), residual.double(), weight.double(), bias.double(), 1e-5)
    assert not out.isnan().any()
    relative_error = ((out.double() - reference).norm() / reference.norm()).item()
    assert relative_error < (1e-5 if dtype == torch.float32 else 1e-2)
