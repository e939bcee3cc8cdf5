"""On a CUDA device: the bf16 packed encoder with each fast attention backend matches fp32
`transformers` on XLM-R-base-sized random weights (cosine >= 0.999), and the fast backends match
the SDPA reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraembed.attention import select_attention_backend, sdpa_reference_attention, varlen_attention
from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest

pytestmark = pytest.mark.gpu

FAST_BACKENDS = ("flash_attn", "torch_varlen", "triton_packed")


def _usable(backend: str) -> bool:
    try:
        select_attention_backend(backend, torch.device("cuda"), torch.bfloat16)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def xlmr_base(xlmr_base_folder):
    from transformers import AutoModel

    return xlmr_base_folder, AutoModel.from_pretrained(xlmr_base_folder)


def _random_batch(rng: np.random.Generator, lengths: list[int], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(lengths), max(lengths)), 1, dtype=np.int64)  # pad id 1
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = np.concatenate([[0], rng.integers(4, vocab, length - 2), [2]])
        mask[row, :length] = 1
    return ids, mask


def _transformers_pooled(model, ids, mask, pooling):
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids).cuda(), attention_mask=torch.tensor(mask).cuda()).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0].float().cpu().numpy()
    weights = torch.tensor(mask).cuda()[..., None].float()
    return ((hidden * weights).sum(1) / weights.sum(1)).float().cpu().numpy()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bf16_packed_encoder_matches_fp32_transformers(xlmr_base, backend, pooling):
    if not _usable(backend):
        pytest.skip(f"{backend} is not available here")
    folder, reference_model = xlmr_base
    reference_model = reference_model.cuda().float().eval()
    engine = EmbeddingEngine(
        ServingConfig.from_parameters(
            {"model": str(folder), "dtype": "bfloat16", "attention": backend, "pooling": pooling, "max_batch_tokens": "4096"},
            environ={},
        ),
        "cuda",
    )
    assert engine.attention_backend == backend
    rng = np.random.default_rng(1)
    lengths = [3, 16, 17, 64, 127, 128, 300, 512, 512, 40]
    ids, mask = _random_batch(rng, lengths, 250002)
    ours = engine.embed([EncoderRequest(ids, mask, parameters={"normalize": False})])[0]
    reference = _transformers_pooled(reference_model, ids, mask, pooling)
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"{backend} {pooling}: min cosine {cosine.min():.6f}")
    assert cosine.min() >= 0.999


def test_gelu_approximation_tanh_matches_transformers_tanh_gelu(xlmr_base_folder):
    """gelu_approximation=tanh (the cuBLASLt GELU epilogue; what auto picks in bf16 on a GPU) in bf16
    against fp32 transformers with hidden_act gelu_pytorch_tanh, and against fp32 transformers with
    the checkpoint's exact GELU as closely as the exact path (printed: the approximation's cost next
    to bf16's own)."""
    from transformers import AutoModel

    rng = np.random.default_rng(2)
    ids, mask = _random_batch(rng, [3, 16, 17, 64, 127, 128, 300, 512, 512, 40], 250002)
    embeddings = {}
    for approximation in ("none", "auto"):
        engine = EmbeddingEngine(
            ServingConfig.from_parameters({"model": str(xlmr_base_folder), "dtype": "bfloat16", "pooling": "mean",
                                           "gelu_approximation": approximation, "max_batch_tokens": "4096"}, environ={}),
            "cuda",
        )
        assert engine.model.config.hidden_act == ("gelu" if approximation == "none" else "gelu_pytorch_tanh")
        embeddings[approximation] = engine.embed([EncoderRequest(ids, mask, parameters={"normalize": False})])[0]
        del engine
    references = {
        act: _transformers_pooled(AutoModel.from_pretrained(xlmr_base_folder, hidden_act=act).cuda().float().eval(), ids, mask, "mean")
        for act in ("gelu", "gelu_pytorch_tanh")
    }

    def cosine(a, b):
        return ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min()

    for ours, reference in (("none", "gelu"), ("auto", "gelu"), ("auto", "gelu_pytorch_tanh")):
        print(f"gelu_approximation={ours} bf16 against fp32 transformers {reference}: "
              f"min cosine {cosine(embeddings[ours], references[reference]):.6f}, "
              f"max abs {np.abs(embeddings[ours] - references[reference]).max():.2e}")
    assert cosine(embeddings["auto"], references["gelu_pytorch_tanh"]) >= 0.999
    assert cosine(embeddings["auto"], references["gelu"]) >= 0.999  # the bar of the exact path's test above


ATTENTION_CASES = {
    "mixed": [1, 7, 128, 129, 512, 2, 300],
    "short queries": [int(n) for n in np.random.default_rng(3).integers(1, 40, 300)],
    "one long": [511],
    "ones": [1] * 70,
}


def _lengths_to_sequence_index(lengths: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("head_dim", [64, 32, 128])
def test_fast_attention_matches_sdpa_reference(backend, case, head_dim):
    """Q/K/V as views of one fused [T, 3, heads, head_dim] projection, as the encoder passes them."""
    if not _usable(backend):
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(2)
    lengths = torch.tensor(ATTENTION_CASES[case])
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    total = int(cu_seqlens[-1])
    qkv = torch.randn(total, 3, 12, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    cu_seqlens = cu_seqlens.cuda()
    sequence_index = _lengths_to_sequence_index(lengths).cuda()
    fast = varlen_attention(q, k, v, cu_seqlens, int(lengths.max()), sequence_index, backend).float()
    reference = sdpa_reference_attention(q.double(), k.double(), v.double(), cu_seqlens, int(lengths.max())).float()
    relative_error = (fast - reference).norm() / reference.norm()
    print(f"{backend} {case} d={head_dim}: relative error {relative_error:.2e}")
    assert relative_error < 1e-2
    # Row by row too: a sequence that attended to a neighbour would fail here even if the norm passed.
    row_error = (fast - reference).abs().amax(dim=(1, 2))
    assert float(row_error.max()) < 0.05


def test_triton_packed_attention_ignores_padding_tokens():
    """The CUDA-graph layout: tokens past cu_seqlens[-1] name an empty last sequence; real rows
    must not see them, and they must not produce NaN."""
    torch.manual_seed(4)
    lengths = torch.tensor([5, 9, 33])
    total, padding = int(lengths.sum()), 17
    qkv = torch.randn(total + padding, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    cu_seqlens = torch.tensor([0, 5, 14, 47, 47], dtype=torch.int32, device="cuda")
    sequence_index = torch.cat([_lengths_to_sequence_index(lengths), torch.full((padding,), 3)]).cuda()
    q, k, v = qkv.unbind(1)
    out = varlen_attention(q, k, v, cu_seqlens, 33, sequence_index, "triton_packed").float()
    reference = sdpa_reference_attention(q[:total].double(), k[:total].double(), v[:total].double(), cu_seqlens[:4], 33)
    assert torch.isfinite(out).all()
    assert float((out[:total] - reference.float()).abs().max()) < 0.05


@pytest.mark.parametrize("launch", [
    dict(heads_inner=True), dict(split_unmasked=True), dict(heads_inner=True, split_unmasked=True),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=2, heads_inner=True, split_unmasked=True),
    dict(block_m=32, block_n=64, split_unmasked=True),
], ids=lambda launch: ",".join(f"{key}={value}" for key, value in launch.items()))
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_packed_attention_launch_options_match_sdpa_reference(launch, case):
    """Every launch option of the Triton kernel (grid order, unmasked key blocks of one-sequence
    tiles, tile shapes), with rows past cu_seqlens[-1] as in a CUDA-graph batch."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from loraembed.packed_attention_triton import packed_attention

    torch.manual_seed(5)
    lengths = torch.tensor(ATTENTION_CASES[case])
    total, padding = int(lengths.sum()), 9
    cu_seqlens = torch.zeros(len(lengths) + 2, dtype=torch.int32)
    cu_seqlens[1:-1] = lengths.cumsum(0)
    cu_seqlens[-1] = total  # the empty sequence the padding rows name
    sequence_index = torch.cat([_lengths_to_sequence_index(lengths), torch.full((padding,), len(lengths))]).cuda()
    qkv = torch.randn(total + padding, 3, 12, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    fast = packed_attention(q, k, v, cu_seqlens.cuda(), sequence_index, **launch).float()
    reference = sdpa_reference_attention(q[:total].double(), k[:total].double(), v[:total].double(),
                                         cu_seqlens[:-1].cuda(), int(lengths.max())).float()
    assert torch.isfinite(fast).all()
    row_error = (fast[:total] - reference).abs().amax(dim=(1, 2))
    assert float(row_error.max()) < 0.05


@pytest.mark.parametrize("launch", [
    dict(), dict(split_unmasked=True), dict(split_unmasked=False),
    dict(block_m=128, block_n=64, num_warps=8, num_stages=2, split_unmasked=True),
], ids=lambda launch: ",".join(f"{key}={value}" for key, value in launch.items()) or "defaults")
@pytest.mark.parametrize("graph_capacity", [False, True], ids=["exact table", "graph-sized table"])
@pytest.mark.parametrize("case", [*ATTENTION_CASES, "long among short"])
def test_packed_attention_tile_table_matches_sdpa_reference(launch, graph_capacity, case):
    """Tiles from the host's table (`query_tile_starts`: sequences of a tile's length or more get
    tiles of their own), with padding rows past cu_seqlens[-1]; the graph-sized table is filled to
    `query_tile_capacity` with empty tiles, as a CUDA graph's staging buffer is. Padding rows must be
    finite only: their output is dropped."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from loraembed.packed_attention_triton import BLOCK_M, packed_attention, query_tile_capacity, query_tile_starts

    torch.manual_seed(6)
    block_m = launch.get("block_m", BLOCK_M)
    lengths = torch.tensor(ATTENTION_CASES.get(case) or [3, 200, 5, 64, 63, 65, 1, 128, 2, 2, 400, 9])
    total, padding = int(lengths.sum()), 9
    cu_seqlens = torch.zeros(len(lengths) + 2, dtype=torch.int32)
    cu_seqlens[1:-1] = lengths.cumsum(0)
    cu_seqlens[-1] = total
    rows = total + padding
    capacity = query_tile_capacity(rows, block_m) if graph_capacity else None
    tiles = query_tile_starts(cu_seqlens.numpy(), rows, capacity, block_m)
    if capacity is not None:
        tiles = np.concatenate([tiles, np.full(capacity + 1 - len(tiles), rows)])
    sequence_index = torch.cat([_lengths_to_sequence_index(lengths), torch.full((padding,), len(lengths))]).cuda()
    qkv = torch.randn(rows, 3, 12, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    fast = packed_attention(q, k, v, cu_seqlens.cuda(), sequence_index, torch.from_numpy(tiles).cuda(), **launch).float()
    reference = sdpa_reference_attention(q[:total].double(), k[:total].double(), v[:total].double(),
                                         cu_seqlens[:-1].cuda(), int(lengths.max())).float()
    assert torch.isfinite(fast).all()
    row_error = (fast[:total] - reference).abs().amax(dim=(1, 2))
    assert float(row_error.max()) < 0.05
