"""Each fused CUDA kernel against its PyTorch reference, on random shapes."""

from __future__ import annotations

import pytest
import torch

from loraembed.fused_ops import (
    add_layer_norm,
    add_layer_norm_reference,
    embeddings_layer_norm,
    embeddings_layer_norm_reference,
    linear_activation,
    linear_activation_reference,
)

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


@pytest.mark.parametrize("rows, hidden", [(1, 384), (7, 768), (16384, 768), (1000, 1024), (33, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_layer_norm_with_one_row_broadcast_matches_reference(rows, hidden, dtype):
    """The residual given as one row ([H], e.g. a bias) is added to every row."""
    torch.manual_seed(rows)
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype) * 3
    row, weight, bias = (torch.randn(hidden, device="cuda", dtype=dtype) for _ in range(3))
    out = add_layer_norm(x, row, weight, bias, 1e-5)
    reference = add_layer_norm_reference(x.double(), row.double(), weight.double(), bias.double(), 1e-5)
    relative_error = ((out.double() - reference).norm() / reference.norm()).item()
    assert relative_error < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rows, hidden", [(1, 384), (7, 768), (16384, 768), (1000, 1024), (33, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embeddings_layer_norm_matches_reference(rows, hidden, dtype):
    """Gathered word and position rows (ids anywhere in the tables, repeated), the type row, LayerNorm."""
    torch.manual_seed(rows + hidden)
    vocab, positions = 5000, 514
    word = torch.randn(vocab, hidden, device="cuda", dtype=dtype)
    position = torch.randn(positions, hidden, device="cuda", dtype=dtype)
    type_row, weight, bias = (torch.randn(hidden, device="cuda", dtype=dtype) for _ in range(3))
    input_ids = torch.randint(0, vocab, (rows,), device="cuda")
    input_ids[0] = vocab - 1
    position_ids = torch.randint(0, positions, (rows,), device="cuda")
    out = embeddings_layer_norm(input_ids, position_ids, word, position, type_row, weight, bias, 1e-5)
    reference = embeddings_layer_norm_reference(input_ids, position_ids, word.double(), position.double(),
                                                type_row.double(), weight.double(), bias.double(), 1e-5)
    assert out.shape == (rows, hidden) and out.dtype == dtype
    relative_error = ((out.double() - reference).norm() / reference.norm()).item()
    assert relative_error < (1e-5 if dtype == torch.float32 else 1e-2)
    # Row by row: a row normalized with another row's gather would pass the norm but not this.
    assert float((out.double() - reference).abs().amax(dim=1).max()) < (1e-4 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("rows, features", [(1, (768, 3072)), (7, (384, 1536)), (16384, (768, 3072)), (1000, (1024, 4096)), (33, (100, 36))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu_new", "relu", "gelu"])
def test_linear_activation_matches_reference(rows, features, dtype, activation):
    """cuBLASLt's epilogue (tanh GELU, ReLU) or the separate pass (exact GELU) against the float64
    reference of the same activation. (In 16-bit floats the rounding is larger than the gap between
    tanh and exact GELU; tests/unit/test_encoder_parity.py tells the two apart in float32.)"""
    torch.manual_seed(rows)
    in_features, out_features = features
    x = torch.randn(rows, in_features, device="cuda", dtype=dtype)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) / in_features**0.5
    bias = torch.randn(out_features, device="cuda", dtype=dtype)
    out = linear_activation(x, weight, bias, activation)
    reference = linear_activation_reference(x.double(), weight.double(), bias.double(), activation)
    assert out.dtype == dtype and out.shape == reference.shape
    relative_error = ((out.double() - reference).norm() / reference.norm()).item()
    assert relative_error < 1e-2
