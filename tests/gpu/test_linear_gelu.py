"""On a CUDA device: the Triton GEMM with bias + GELU in its epilogue equals
`F.gelu(F.linear(...))` (float32 reference) within bf16/fp16 rounding, for erf and tanh GELU,
ragged token counts, and every tile shape the benchmark considers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraembed.linear_gelu_triton import DEFAULT_TILE, linear_gelu, linear_gelu_supported

pytestmark = pytest.mark.gpu

TILES = [DEFAULT_TILE, (128, 128, 64, 4, 4, False), (128, 128, 64, 4, 3, True)]


@pytest.mark.parametrize("tokens, in_features, out_features", [(1, 768, 3072), (777, 768, 3072), (16384, 768, 3072), (300, 1024, 4096), (65, 384, 1536), (5, 64, 104)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("tile", TILES, ids=str)
def test_linear_gelu_matches_reference(tokens, in_features, out_features, approximate, dtype, tile):
    torch.manual_seed(tokens + in_features)
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    weight = (torch.randn(out_features, in_features, device="cuda") * in_features**-0.5).to(dtype)
    bias = (torch.randn(out_features, device="cuda") * 0.1).to(dtype)
    assert linear_gelu_supported(x, weight)
    ours = linear_gelu(x, weight, bias, approximate, tile).float()
    reference = F.gelu(F.linear(x.float(), weight.float(), bias.float()), approximate=approximate)
    # The cuBLAS + PyTorch GELU path that this replaces, for the scale of bf16/fp16 rounding.
    usual = F.gelu(F.linear(x, weight, bias), approximate=approximate).float()
    ours_error = float((ours - reference).abs().max())
    usual_error = float((usual - reference).abs().max())
    assert ours_error <= max(2 * usual_error, 1e-3), (ours_error, usual_error)


def test_linear_gelu_is_not_offered_for_unsupported_inputs():
    x = torch.randn(10, 100, device="cuda", dtype=torch.bfloat16)  # in_features not a multiple of 64
    weight = torch.randn(3072, 100, device="cuda", dtype=torch.bfloat16)
    assert not linear_gelu_supported(x, weight)
    wide = torch.randn(10, 1024, device="cuda", dtype=torch.bfloat16)[:, :768]  # a strided view
    assert not linear_gelu_supported(wide, torch.randn(3072, 768, device="cuda", dtype=torch.bfloat16))
