"""The GEMM with the LoRA expand in its epilogue, both kernels (`lora/lora_gemm_triton.py` and the
warp-specialized Hopper one, `lora/lora_gemm_gluon.py`), against its reference (F.linear,
`apply_segmented_lora`, the activation) in float64, on random shapes, ranks, slice counts,
activations and segment layouts: base segments, empty segments, tiles that hold many adapters,
batches that end inside a tile. Without LoRA it is the plain GEMM + activation."""

from __future__ import annotations

import random

import pytest
import torch

from loraembed.lora import lora_gemm_triton as lg
from loraembed.lora.lora_gemm_gluon import gluon_lora_gemm_supported
from loraembed.lora.sgmv_triton import build_lora_batch_tables, sgmv_shrink
from loraembed.packing import AdapterSegment
from tests.support.lora_models import random_segments

pytestmark = pytest.mark.gpu


CASES = [
    # tokens, in, slice width, slices, rank, slots, cuts (more cuts: more adapters per tile)
    (1, 768, 768, 3, 16, 3, 0),
    (300, 768, 768, 3, 4, 5, 6),
    (1000, 768, 3072, 1, 64, 9, 40),
    (513, 3072, 768, 1, 8, 4, 3),
    (16384, 768, 768, 3, 16, 65, 64),
    (77, 1024, 1024, 3, 32, 2, 2),
    (1000, 768, 768, 3, 32, 9, 60),  # rank 32, several adapters per tile (the Gluon kernel once got these wrong)
    (333, 3072, 768, 1, 32, 9, 5),
    (129, 384, 384, 3, 16, 3, 5),
    (700, 768, 768, 1, 128, 5, 10),
    (2000, 768, 768, 1, 16, 40, 150),  # ~10 adapters per tile
    (2000, 768, 768, 1, 16, 40, 600),  # tiles of more than MAX_RUNS adapters: no table
]


def float64_reference(x, weight, bias, activation, lora_a, lora_b, width, segments):
    return lg.lora_gemm_reference(
        x.double(), weight.double(), bias.double(), activation, lora_a.double(), lora_b.double(), width, segments
    )


def skip_unless_gluon_applies(x, out_features, width, rank):
    if not gluon_lora_gemm_supported(torch.cuda.get_device_capability(), x, out_features, width, rank):
        pytest.skip("the Gluon kernel runs on sm_90, bf16, rank capacity 16 or 32 (the Triton kernel takes the rest)")


@pytest.mark.parametrize("tokens, in_features, width, slices, rank, slots, cuts", CASES)
@pytest.mark.parametrize("activation, dtype", [("identity", torch.bfloat16), ("gelu", torch.bfloat16),
                                               ("gelu_pytorch_tanh", torch.float16), ("relu", torch.bfloat16),
                                               ("gelu_pytorch_tanh", torch.bfloat16)])
@pytest.mark.parametrize("kernel", ["triton", "gluon"])
def test_lora_gemm_matches_reference(tokens, in_features, width, slices, rank, slots, cuts, activation, dtype, kernel):
    rng = random.Random(tokens * 7 + rank + cuts)
    torch.manual_seed(tokens + rank)
    out_features = slices * width
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) / in_features**0.5
    bias = torch.randn(out_features, device="cuda", dtype=dtype) * 0.1
    lora_a = torch.randn(slots, slices * rank, in_features, device="cuda", dtype=dtype) / in_features**0.5
    lora_b = torch.randn(slots, out_features, rank, device="cuda", dtype=dtype) / rank**0.5
    lora_a[0] = 0  # slot 0 is the base model
    lora_b[0] = 0
    segments = random_segments(tokens, slots, rng, cuts) if tokens > 1 else (AdapterSegment(1, 0, 1),)
    assert lg.lora_gemm_supported(x, weight, width, rank)
    if kernel == "gluon":
        skip_unless_gluon_applies(x, out_features, width, rank)

    table, token_slots, tiles = build_lora_batch_tables(segments, x.device, False, with_tile_slots=True)
    expected = float64_reference(x, weight, bias, activation, lora_a, lora_b, width, segments)
    without_lora = float64_reference(x, weight, bias, activation, lora_a, lora_b, width, ())
    plain = lg.lora_gemm(x, weight, bias, activation, kernel=kernel)
    # The rounding of the 16-bit output, and the GEMM's own: bf16 has 8 bits of mantissa.
    tolerance = 0.02 * without_lora.abs().max().item() + 0.02
    torch.testing.assert_close(plain.double(), without_lora, rtol=0.02, atol=tolerance)
    if table is None:
        return
    if tiles is None:  # a tile with more adapters than the table holds: the layers take the separate expand
        assert cuts > lg.MAX_RUNS
        return
    shrunk = sgmv_shrink(x, lora_a, table)
    shrunk[token_slots == 0] = float("nan")  # base rows of the shrink are never read
    ours = lg.lora_gemm(x, weight, bias, activation, lora_b, width, token_slots, tiles, shrunk, kernel=kernel)
    torch.testing.assert_close(ours.double(), expected, rtol=0.02, atol=tolerance)
    lora_rows = (token_slots != 0).nonzero().flatten()
    if len(lora_rows):  # the delta is well above that tolerance, so a missing or doubled delta fails
        assert (expected - without_lora)[lora_rows].abs().max().item() > 5 * tolerance


@pytest.mark.parametrize("kernel, launch", [("triton", (128, 64, 4, 3, 64)), ("triton", (256, 64, 8, 3)),
                                            ("triton", (64, 128, 4, 2)), ("gluon", (256, 3)), ("gluon", (128, 4)),
                                            ("gluon", (128, 3)), ("gluon", (256, 2))])
def test_lora_gemm_launch_settings_agree(kernel, launch):
    """Other launch settings (benchmarks/lora_gemm_bench.py and gluon_gemm_probe.py time them;
    64-row output tiles read the table of their 128-row tile) give the code's result on a batch of
    ~10 adapters per tile."""
    rng = random.Random(5)
    torch.manual_seed(5)
    tokens, in_features, out_features, rank, slots = 1000, 768, 3072, 16, 40
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) / in_features**0.5
    bias = torch.randn(out_features, device="cuda", dtype=torch.bfloat16) * 0.1
    lora_a = torch.randn(slots, rank, in_features, device="cuda", dtype=torch.bfloat16) / in_features**0.5
    lora_b = torch.randn(slots, out_features, rank, device="cuda", dtype=torch.bfloat16) / rank**0.5
    lora_a[0], lora_b[0] = 0, 0
    segments = random_segments(tokens, slots, rng, 60)
    table, token_slots, tiles = build_lora_batch_tables(segments, x.device, False, with_tile_slots=True)
    assert tiles is not None and int(tiles[:, 0].max()) > 4
    shrunk = sgmv_shrink(x, lora_a, table)
    args = (x, weight, bias, "gelu_pytorch_tanh", lora_b, out_features, token_slots, tiles, shrunk)
    expected = float64_reference(x, weight, bias, "gelu_pytorch_tanh", lora_a, lora_b, out_features, segments)
    tolerance = 0.02 * expected.abs().max().item()
    if kernel == "gluon":
        skip_unless_gluon_applies(x, out_features, out_features, rank)
    ours = lg.lora_gemm(*args, launch=launch, kernel=kernel)
    torch.testing.assert_close(ours.double(), expected, rtol=0.02, atol=tolerance)
    torch.testing.assert_close(ours, lg.lora_gemm(*args), rtol=0.02, atol=tolerance)


def test_auto_picks_gluon_on_hopper(monkeypatch):
    """On sm_90 the entry point runs the Gluon kernel for a bf16 rank-16 batch, the Triton one for
    rank 64; elsewhere the Triton one."""
    from loraembed.lora import lora_gemm_gluon

    taken = []
    gluon_kernel = lg.gluon_lora_gemm
    monkeypatch.setattr(lg, "gluon_lora_gemm", lambda *args: taken.append("gluon") or gluon_kernel(*args))
    x = torch.randn(300, 768, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(768, 768, device="cuda", dtype=torch.bfloat16)
    segments = (AdapterSegment(1, 0, 200),)
    table, token_slots, tiles = build_lora_batch_tables(segments, x.device, False, with_tile_slots=True)
    hopper = torch.cuda.get_device_capability() == (9, 0) and lora_gemm_gluon.gluon is not None
    for rank, gluon_expected in ((16, hopper), (64, False)):
        taken.clear()
        lora_a = torch.randn(2, rank, 768, device="cuda", dtype=torch.bfloat16)
        lora_b = torch.randn(2, 768, rank, device="cuda", dtype=torch.bfloat16)
        lg.lora_gemm(x, weight, None, "identity", lora_b, 768, token_slots, tiles, sgmv_shrink(x, lora_a, table))
        assert taken == (["gluon"] if gluon_expected else []), (rank, taken)
