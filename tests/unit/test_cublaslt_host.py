"""cublaslt.py's host side on a CPU machine: the C struct it reads the heuristic's answers into, and
that without a kept algorithm every linear is torch's (the GPU side: tests/gpu/test_cublaslt.py)."""

from __future__ import annotations

import ctypes

import torch

from loraembed import cublaslt
from loraembed.fused_ops import linear


def test_heuristic_result_has_cublaslt_h_layout():
    """cublasLtMatmulHeuristicResult_t: a 64-byte algo, size_t workspaceSize, status, float wavesCount,
    int reserved[4]. A wrong size would make every candidate after the first unreadable."""
    assert ctypes.sizeof(cublaslt._HeuristicResult) == 96
    assert cublaslt._HeuristicResult.workspace_size.offset == 64
    assert cublaslt._HeuristicResult.waves.offset == 76


def test_epilogue_codes_are_cublaslt_h_values():
    assert cublaslt.EPILOGUES == {None: 4, "gelu": 36, "relu": 6}  # BIAS, GELU_BIAS, RELU_BIAS


def test_without_a_kept_algorithm_nothing_is_tuned():
    cublaslt.forget_tuning()
    x, weight, bias = torch.randn(8, 4), torch.randn(3, 4), torch.randn(3)
    for epilogue in (None, "gelu", "relu"):
        assert cublaslt.tuned_linear(x, weight, bias, epilogue) is None
    assert torch.equal(linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
    assert not cublaslt.tuning_supported(torch.device("cpu"), torch.bfloat16)
    assert not cublaslt.tuning_supported(torch.device("cuda", 0), torch.float32)
