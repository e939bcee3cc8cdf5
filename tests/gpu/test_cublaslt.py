"""The linears on a tuned cuBLASLt algorithm (cublaslt.py) against torch's GEMM of the same shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraembed import cublaslt
from loraembed.fused_ops import linear, linear_activation

pytestmark = pytest.mark.gpu

# (out features, in features, epilogue): XLM-R base's and large's linears, and a ReLU epilogue
SHAPES = [(2304, 768, None), (768, 768, None), (3072, 768, "gelu"), (768, 3072, None), (1024, 1024, None),
          (4096, 1024, "relu")]
TUNING_ROWS = 4096


@pytest.fixture(autouse=True)
def no_tuning_left_behind():
    yield
    cublaslt.forget_tuning()


def torch_linear(x, weight, bias, epilogue):
    if epilogue is None:
        return F.linear(x, weight, bias)
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=epilogue == "gelu")


def inputs(rows, out_features, in_features, dtype=torch.bfloat16, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, in_features, device="cuda", dtype=dtype, generator=generator)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype, generator=generator) * in_features ** -0.5
    bias = torch.randn(out_features, device="cuda", dtype=dtype, generator=generator)
    return x, weight, bias


@pytest.mark.parametrize("out_features, in_features, epilogue", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_algorithm_other_than_torchs_gives_torchs_answers(out_features, in_features, epilogue, dtype):
    """Kept at 4,096 rows: bit for bit torch's output there (other weights and bias than the tuning's),
    and torch's within rounding at other row counts from half of it up."""
    outcome = cublaslt.tune_linear(out_features, in_features, epilogue, TUNING_ROWS, torch.device("cuda"), dtype,
                                   other_than_first=True)
    if not outcome.kept:
        pytest.skip(f"the heuristic offered no second candidate without split-K: {outcome}")
    assert outcome.candidates >= 2 and outcome.first_us > 0 and outcome.best_us > 0
    for rows in (TUNING_ROWS, TUNING_ROWS // 2, 2053, 3001, 4099, 9000):
        x, weight, bias = inputs(rows, out_features, in_features, dtype, seed=rows)
        tuned = cublaslt.tuned_linear(x, weight, bias, epilogue)
        assert tuned is not None, rows
        expected = torch_linear(x, weight, bias, epilogue)
        if rows == TUNING_ROWS:
            assert torch.equal(tuned, expected)
        exact = x.double() @ weight.double().T + bias.double()
        if epilogue == "gelu":
            exact = F.gelu(exact, approximate="tanh")
        elif epilogue == "relu":
            exact = F.relu(exact)
        assert (tuned.double() - exact).abs().max() <= 2 * (expected.double() - exact).abs().max() + 1e-3, rows


def test_the_entry_points_use_the_kept_algorithm_only_where_it_applies():
    """fused_ops.linear / linear_activation: the kept algorithm from half the tuning rows up, torch's
    below, for other shapes, dtypes, non-contiguous inputs and inputs without a bias."""
    cublaslt.tune_linear(768, 768, None, TUNING_ROWS, torch.device("cuda"), torch.bfloat16, other_than_first=True)
    cublaslt.tune_linear(3072, 768, "gelu", TUNING_ROWS, torch.device("cuda"), torch.bfloat16, other_than_first=True)
    x, weight, bias = inputs(TUNING_ROWS, 768, 768)
    assert cublaslt.tuned_linear(x, weight, bias, None) is not None
    assert cublaslt.tuned_linear(x[: TUNING_ROWS // 2 - 1], weight, bias, None) is None  # too few rows
    assert cublaslt.tuned_linear(x, weight, None, None) is None  # no bias
    assert cublaslt.tuned_linear(x, weight, bias, "gelu") is None  # another epilogue for this shape
    assert cublaslt.tuned_linear(x.float(), weight.float(), bias.float(), None) is None  # float32
    wide = torch.randn(TUNING_ROWS, 1536, device="cuda", dtype=torch.bfloat16)
    assert cublaslt.tuned_linear(wide[:, :768], weight, bias, None) is None  # not contiguous
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    x, weight, bias = inputs(TUNING_ROWS, 3072, 768)
    assert cublaslt.tuned_linear(x, weight, bias, "gelu") is not None
    assert torch.equal(linear_activation(x, weight, bias, "gelu_pytorch_tanh"), torch_linear(x, weight, bias, "gelu"))
    cublaslt.forget_tuning()
    assert cublaslt.tuned_linear(x, weight, bias, "gelu") is None


def test_a_kept_algorithm_replays_in_a_cuda_graph():
    """Captured once, replayed on new inputs and another layer's weight and bias of the same shape:
    the eager answers."""
    cublaslt.tune_linear(2304, 768, None, TUNING_ROWS, torch.device("cuda"), torch.bfloat16, other_than_first=True)
    x, weight, bias = inputs(TUNING_ROWS, 2304, 768, seed=1)
    _, weight2, bias2 = inputs(TUNING_ROWS, 2304, 768, seed=2)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cublaslt.tuned_linear(static_x, weight, bias, None)  # descriptors built outside the capture
        cublaslt.tuned_linear(static_x, weight2, bias2, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        first = cublaslt.tuned_linear(static_x, weight, bias, None)
        second = cublaslt.tuned_linear(first[:, :768].contiguous(), weight2[:, :768].contiguous(), bias2, None)
    for seed in (3, 4):
        new_x, _, _ = inputs(TUNING_ROWS, 2304, 768, seed=seed)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected_first = F.linear(new_x, weight, bias)
        assert torch.equal(first, expected_first)
        torch.testing.assert_close(second, F.linear(expected_first[:, :768], weight2[:, :768], bias2), rtol=2e-2, atol=2e-2)


def test_engine_tunes_at_load_and_its_embeddings_match_an_untuned_engine(xlmr_base_folder):
    """gemm_tuning=true against false: the same embeddings of a full batch of passages (bf16)."""
    import numpy as np

    from loraembed.config import ServingConfig
    from loraembed.engine import EmbeddingEngine, EncoderRequest

    rng = np.random.default_rng(0)
    lengths = rng.integers(60, 260, 100)
    width = int(lengths.max())
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(5, 250, (len(lengths), width)) * mask
    results = {}
    for tuning in ("true", "false"):
        cublaslt.forget_tuning()
        engine = EmbeddingEngine(ServingConfig(model=str(xlmr_base_folder), gemm_tuning=tuning, warmup="false"), "cuda")
        if tuning == "true":
            assert len(engine.gemm_tuning) == 4 and "GEMM tuning" in engine.startup_seconds
            assert "gemm_tuning=[" in engine.describe()
        else:
            assert engine.gemm_tuning == [] and "gemm_tuning=off" in engine.describe()
        results[tuning] = engine.embed([EncoderRequest(ids, mask, None, {"normalize": False})])[0]
    np.testing.assert_allclose(results["true"], results["false"], rtol=0, atol=2e-2)
