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



CONSUMER_CASES = [
    # tokens, in, out, consumer rank, slots, cuts
    (16384, 768, 3072, 16, 65, 64),  # XLM-R base's intermediate.dense feeding output.dense
    (1000, 768, 3072, 64, 9, 40),
    (513, 1024, 4096, 8, 4, 3),
    (2000, 768, 768, 16, 40, 150),  # ~10 adapters per tile
    (1, 768, 3072, 16, 3, 0),
]


@pytest.mark.parametrize("tokens, in_features, out_features, consumer_rank, slots, cuts", CONSUMER_CASES)
@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "identity"])
def test_lora_gemm_computes_the_consumers_shrink(tokens, in_features, out_features, consumer_rank, slots, cuts, activation):
    """The shrink of the linear that reads the output, added in the epilogue, equals that linear's
    own shrink kernel over the stored output (and float64 over it); the output is unchanged."""
    rng = random.Random(tokens + consumer_rank)
    torch.manual_seed(tokens * 3 + consumer_rank)
    dtype, rank = torch.bfloat16, 16
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) / in_features**0.5
    bias = torch.randn(out_features, device="cuda", dtype=dtype) * 0.1
    lora_a = torch.randn(slots, rank, in_features, device="cuda", dtype=dtype) / in_features**0.5
    lora_b = torch.randn(slots, out_features, rank, device="cuda", dtype=dtype) / rank**0.5
    consumer_a = torch.randn(slots, consumer_rank, out_features, device="cuda", dtype=dtype) / out_features**0.5
    lora_a[0], lora_b[0], consumer_a[0] = 0, 0, 0
    segments = random_segments(tokens, slots, rng, cuts) if tokens > 1 else (AdapterSegment(1, 0, 1),)
    assert lg.consumer_shrink_supported(consumer_a, out_features)
    table, token_slots, tiles = build_lora_batch_tables(segments, x.device, False, with_tile_slots=True)
    shrunk = sgmv_shrink(x, lora_a, table)
    alone = lg.lora_gemm(x, weight, bias, activation, lora_b, out_features, token_slots, tiles, shrunk)
    consumer_shrunk = torch.zeros(tokens, consumer_rank, device="cuda", dtype=torch.float32)
    output = lg.lora_gemm(x, weight, bias, activation, lora_b, out_features, token_slots, tiles, shrunk,
                          consumer_lora_a_cat=consumer_a, consumer_shrunk=consumer_shrunk)
    assert torch.equal(output, alone)
    lora_rows = (token_slots != 0).nonzero().flatten()
    assert len(lora_rows)
    expected = sgmv_shrink(output, consumer_a, table)[lora_rows]
    expected64 = torch.zeros(tokens, consumer_rank, device="cuda", dtype=torch.float64)
    for slot in token_slots.unique().tolist():
        rows = token_slots == slot
        expected64[rows] = output[rows].double() @ consumer_a[slot].double().T
    expected64 = expected64[lora_rows]
    scale = expected64.abs().max().item()
    torch.testing.assert_close(consumer_shrunk[lora_rows].double(), expected64, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(consumer_shrunk[lora_rows], expected, rtol=1e-4, atol=1e-4 * scale)
    assert not consumer_shrunk[token_slots == 0].any()  # base rows: nothing added
