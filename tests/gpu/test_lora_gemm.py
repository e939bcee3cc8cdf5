"""The GEMM with the LoRA expand in its epilogue (`lora/lora_gemm_triton.py`) against its reference
(F.linear, `apply_segmented_lora`, the activation) in float64, on random shapes, ranks, slice
counts, activations and segment layouts: base segments, empty segments, tiles that hold many
adapters, batches that end inside a tile. Without LoRA it is the plain GEMM + activation."""

from __future__ import annotations

import random

import pytest
import torch

from loraembed.lora import lora_gemm_triton as lg
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
    (129, 384, 384, 3, 16, 3, 5),
    (700, 768, 768, 1, 128, 5, 10),
    (2000, 768, 768, 1, 16, 40, 150),  # ~10 adapters per tile
    (2000, 768, 768, 1, 16, 40, 600),  # tiles of more than MAX_RUNS adapters: no table
]


def float64_reference(x, weight, bias, activation, lora_a, lora_b, width, segments):
    return lg.lora_gemm_reference(
        x.double(), weight.double(), bias.double(), activation, lora_a.double(), lora_b.double(), width, segments
    )


@pytest.mark.parametrize("tokens, in_features, width, slices, rank, slots, cuts", CASES)
@pytest.mark.parametrize("activation, dtype", [("identity", torch.bfloat16), ("gelu", torch.bfloat16),
                                               ("gelu_pytorch_tanh", torch.float16), ("relu", torch.bfloat16)])
def test_lora_gemm_matches_reference(tokens, in_features, width, slices, rank, slots, cuts, activation, dtype):
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

    table, token_slots, tiles = build_lora_batch_tables(segments, x.device, False, with_tile_slots=True)
    expected = float64_reference(x, weight, bias, activation, lora_a, lora_b, width, segments)
    without_lora = float64_reference(x, weight, bias, activation, lora_a, lora_b, width, ())
    plain = lg.lora_gemm(x, weight, bias, activation)
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
    ours = lg.lora_gemm(x, weight, bias, activation, lora_b, width, token_slots, tiles, shrunk)
    torch.testing.assert_close(ours.double(), expected, rtol=0.02, atol=tolerance)
    lora_rows = (token_slots != 0).nonzero().flatten()
    if len(lora_rows):  # the delta is well above that tolerance, so a missing or doubled delta fails
        assert (expected - without_lora)[lora_rows].abs().max().item() > 5 * tolerance


@pytest.mark.parametrize("launch", [(128, 64, 4, 3, 64), (256, 64, 8, 3), (64, 128, 4, 2)])
def test_lora_gemm_launch_settings_agree(launch):
    """Other launch settings (benchmarks/lora_gemm_bench.py sweeps them; 64-row output tiles read
    the table of their 128-row tile) give the code's result on a batch of ~10 adapters per tile."""
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
    torch.testing.assert_close(lg.lora_gemm(*args, launch=launch).double(), expected, rtol=0.02, atol=tolerance)
    torch.testing.assert_close(lg.lora_gemm(*args, launch=launch), lg.lora_gemm(*args), rtol=0.02, atol=tolerance)
