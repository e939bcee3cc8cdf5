"""The packed encoder, its attention and its pooling against references written elsewhere:
`transformers` (padded batches with an attention mask) + sentence-transformers pooling, the real
all-MiniLM-L6-v2 through `SentenceTransformer.encode`, and a naive per-sequence attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loraembed.attention import sdpa_reference_attention, select_attention_backend, varlen_attention
from loraembed.config import ServingConfig
from loraembed.engine import EncoderRequest
from loraembed.errors import ConfigurationError
from loraembed.tokenization import TextTokenizer

from tests.support.checkpoints import build_tiny_xlmr
from .conftest import TINY_XLMR_MAX_SEQ_LEN, hf_last_hidden_state, sentence_transformers_pooling

PARITY_ATOL = 1e-4  # DESIGN.md: fp32 on CPU, max abs diff <= 1e-4
INVARIANCE_ATOL = 1e-5

# Mixed lengths: the longest XLM-R input (max_position_embeddings - 2), a lone <s>, and others.
PARITY_LENGTHS = [TINY_XLMR_MAX_SEQ_LEN, 1, 7, 2, 23, 39, 12]


@pytest.fixture(scope="module", params=["xlmr", "bert"])
def parity_case(request, tiny_xlmr_path, tiny_bert_path, make_engine, token_sequences, pad_right):
    """(model path, padded ids, mask, HF last hidden state) for one tiny random checkpoint."""
    path = {"xlmr": tiny_xlmr_path, "bert": tiny_bert_path}[request.param]
    config = make_engine(path).settings.encoder_config
    sequences = token_sequences(config, PARITY_LENGTHS, seed=7)
    input_ids, attention_mask = pad_right(sequences, config.pad_token_id)
    return path, input_ids, attention_mask, hf_last_hidden_state(path, input_ids, attention_mask)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dimensions", [None, 8])
def test_pooled_output_matches_transformers(parity_case, make_engine, pooling, normalize, dimensions):
    path, input_ids, attention_mask, last_hidden_state = parity_case
    engine = make_engine(path, pooling=pooling)
    parameters = {"normalize": normalize} | ({"dimensions": dimensions} if dimensions else {})
    [embeddings] = engine.embed([EncoderRequest(input_ids, attention_mask, parameters=parameters)])
    expected = sentence_transformers_pooling(last_hidden_state, attention_mask, pooling, dimensions, normalize)
    assert embeddings.dtype == np.float32
    assert embeddings.shape == expected.shape == (len(PARITY_LENGTHS), dimensions or engine.hidden_size)
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=PARITY_ATOL)


def test_gelu_approximation_tanh_runs_transformers_tanh_gelu(tmp_path, make_engine, token_sequences, pad_right):
    """gelu_approximation=tanh runs a checkpoint's exact GELU ("gelu") as transformers'
    gelu_pytorch_tanh: the embeddings match transformers with that activation, ten times closer
    than the two activations' embeddings are to each other (weights of std 0.3, so that the
    intermediate values reach where the two differ)."""
    path = build_tiny_xlmr(tmp_path / "wide", max_seq_len=TINY_XLMR_MAX_SEQ_LEN, initializer_range=0.3)
    engine = make_engine(path, pooling="mean", gelu_approximation="tanh")
    assert engine.model.config.hidden_act == "gelu_pytorch_tanh"
    assert make_engine(path, pooling="mean").model.config.hidden_act == "gelu"  # auto on a CPU: exact
    input_ids, attention_mask = pad_right(token_sequences(engine.settings.encoder_config, PARITY_LENGTHS, seed=7), 1)
    [embeddings] = engine.embed([EncoderRequest(input_ids, attention_mask, parameters={"normalize": False})])
    expected, exact = (
        sentence_transformers_pooling(hf_last_hidden_state(path, input_ids, attention_mask, hidden_act=act),
                                      attention_mask, "mean", None, False)
        for act in ("gelu_pytorch_tanh", "gelu")
    )
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=PARITY_ATOL)
    assert np.abs(embeddings - expected).max() < 0.1 * np.abs(exact - expected).max()


def test_xlmr_limit_is_max_position_embeddings_minus_two(tiny_xlmr_path, make_engine):
    engine = make_engine(tiny_xlmr_path)
    config = engine.settings.encoder_config
    assert config.pad_token_id == 1
    assert engine.settings.max_seq_len == config.max_position_embeddings - 2 == TINY_XLMR_MAX_SEQ_LEN
    assert max(PARITY_LENGTHS) == engine.settings.max_seq_len  # the parity inputs reach the limit


# --- batch invariance: a row's embedding does not depend on what else is in its batch --------

INVARIANCE_LENGTHS = [5, 40, 1, 17, 2, 33, 9, 40, 3, 26, 11]


@pytest.fixture(scope="module", params=["xlmr-mean", "xlmr-cls", "bert-mean"])
def invariance_case(request, tiny_xlmr_path, tiny_bert_path, make_engine, token_sequences, pad_right):
    """(model path, pooling, sequences, each sequence embedded alone in its own call)."""
    model, pooling = request.param.split("-")
    path = {"xlmr": tiny_xlmr_path, "bert": tiny_bert_path}[model]
    engine = make_engine(path, pooling=pooling)
    sequences = token_sequences(engine.settings.encoder_config, INVARIANCE_LENGTHS, seed=11)
    alone = [engine.embed([EncoderRequest(*pad_right([sequence], 0))])[0][0] for sequence in sequences]
    return path, pooling, sequences, np.stack(alone)


def test_rows_of_one_padded_request_equal_each_row_alone(invariance_case, make_engine, pad_right):
    path, pooling, sequences, alone = invariance_case
    engine = make_engine(path, pooling=pooling)
    pad_id = engine.settings.encoder_config.pad_token_id
    [packed] = engine.embed([EncoderRequest(*pad_right(sequences, pad_id))])
    np.testing.assert_allclose(packed, alone, rtol=0, atol=INVARIANCE_ATOL)


def test_many_requests_in_one_call_equal_each_row_alone(invariance_case, make_engine, pad_right):
    path, pooling, sequences, alone = invariance_case
    engine = make_engine(path, pooling=pooling)
    pad_id = engine.settings.encoder_config.pad_token_id
    groups = [[0], [1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]  # 1 to 4 rows per request
    results = engine.embed([EncoderRequest(*pad_right([sequences[i] for i in group], pad_id)) for group in groups])
    for group, result in zip(groups, results):
        np.testing.assert_allclose(result, alone[group], rtol=0, atol=INVARIANCE_ATOL)


def test_batches_split_at_max_batch_tokens_equal_each_row_alone(invariance_case, make_engine, pad_right):
    path, pooling, sequences, alone = invariance_case
    engine = make_engine(path, pooling=pooling, max_batch_tokens=TINY_XLMR_MAX_SEQ_LEN, max_seq_len=TINY_XLMR_MAX_SEQ_LEN)
    pad_id = engine.settings.encoder_config.pad_token_id
    forward_token_counts = []
    hook = engine.model.register_forward_hook(lambda module, args, out: forward_token_counts.append(out.shape[0]))
    try:
        results = engine.embed([EncoderRequest(*pad_right(sequences[:6], pad_id)),
                                EncoderRequest(*pad_right(sequences[6:], pad_id))])
    finally:
        hook.remove()
    assert sum(forward_token_counts) == sum(INVARIANCE_LENGTHS)
    assert len(forward_token_counts) >= math.ceil(sum(INVARIANCE_LENGTHS) / TINY_XLMR_MAX_SEQ_LEN)
    assert max(forward_token_counts) <= TINY_XLMR_MAX_SEQ_LEN
    np.testing.assert_allclose(np.concatenate(results), alone, rtol=0, atol=INVARIANCE_ATOL)


# --- the real all-MiniLM-L6-v2 against sentence-transformers --------------------------------

MINILM_TEXTS = [
    "A man is eating food.",
    "Die Straßenbahn fährt über die Brücke, während es draußen regnet.",
    "東京は日本の首都です。今日はいい天気ですね。",
    "I love pizza 🍕🎉 and emoji 👍🏽 — naïve café façade",
    "x",
    " ".join(f"sentence number {index} talks about embeddings, tokenizers and Triton." for index in range(40)),
]


@pytest.fixture(scope="module")
def minilm_embeddings(minilm_path):
    """(loraembed with the default configuration, SentenceTransformer.encode, ST token counts)."""
    from loraembed.engine import EmbeddingEngine
    from sentence_transformers import SentenceTransformer

    engine = EmbeddingEngine(ServingConfig.from_parameters({}, environ={}), device="cpu")
    tokenizer = TextTokenizer(engine.settings.model_path, engine.settings.max_seq_len)
    [ours] = engine.embed([EncoderRequest(*tokenizer.encode(MINILM_TEXTS))])
    model = SentenceTransformer(str(minilm_path), device="cpu")
    reference = model.encode(MINILM_TEXTS, convert_to_numpy=True, batch_size=4)
    st_lengths = model.tokenize(MINILM_TEXTS)["attention_mask"].sum(1).tolist()
    return engine, ours, reference, st_lengths


def test_default_configuration_is_the_bundled_minilm(minilm_embeddings, minilm_path):
    engine, *_ = minilm_embeddings
    assert engine.settings.model_path.resolve() == minilm_path.resolve()
    assert (engine.settings.pooling, engine.settings.default_normalize, engine.settings.max_seq_len) == ("mean", True, 256)


def test_minilm_matches_sentence_transformers_encode(minilm_embeddings):
    _, ours, reference, _ = minilm_embeddings
    assert ours.shape == reference.shape == (len(MINILM_TEXTS), 384)
    cosine = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def test_minilm_long_text_is_truncated_like_sentence_transformers(minilm_embeddings, minilm_path):
    engine, _, _, st_lengths = minilm_embeddings
    tokenizer = TextTokenizer(minilm_path, engine.settings.max_seq_len)
    _, mask = tokenizer.encode(MINILM_TEXTS)
    assert mask.sum(1).tolist() == st_lengths
    assert st_lengths[-1] == 256  # the long text really was cut


# --- attention: the SDPA reference against softmax(QK^T / sqrt(d)) V, one sequence at a time ----


def naive_attention(query, key, value, lengths):
    outputs, start = [], 0
    for length in lengths:
        q, k, v = (t[start : start + length] for t in (query, key, value))  # [L, heads, d]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])  # [heads, L, L]
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))  # [L, heads, d]
        start += length
    return torch.cat(outputs)


ATTENTION_LENGTHS = [
    [1],
    [6],
    [1, 1, 1],
    [3, 1, 8, 1, 5],
    [1, 17, 2, 1, 11, 4],
]


@pytest.mark.parametrize("lengths", ATTENTION_LENGTHS + [None, None, None], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_sdpa_reference_equals_naive_attention(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    if lengths is None:  # random cu_seqlens with length-1 sequences mixed in
        count = int(torch.randint(2, 12, (1,), generator=generator))
        lengths = torch.randint(1, 20, (count,), generator=generator)
        lengths[torch.rand(count, generator=generator) < 0.3] = 1
        lengths = lengths.tolist()
    heads, head_dim, total = 3, 8, sum(lengths)
    query, key, value = (torch.randn(total, heads, head_dim, dtype=torch.float64, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    expected = naive_attention(query, key, value, lengths)
    for actual in (
        sdpa_reference_attention(query, key, value, cu_seqlens, max(lengths)),
        varlen_attention(
            query, key, value, cu_seqlens, max(lengths), torch.repeat_interleave(torch.tensor(lengths)), "sdpa"
        ),
    ):
        assert actual.shape == (total, heads, head_dim)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "requested, dtype, expected",
    [("auto", torch.float32, "sdpa"), ("auto", torch.bfloat16, "sdpa"), ("sdpa", torch.float32, "sdpa")],
)
def test_attention_backend_on_cpu(requested, dtype, expected):
    assert select_attention_backend(requested, torch.device("cpu"), dtype) == expected


@pytest.mark.parametrize(
    "requested, match",
    [
        ("flash_attn", r"attention='flash_attn' cannot run here .*flash-attn package"),
        ("torch_varlen", r"attention='torch_varlen' cannot run here .*needs CUDA"),
        ("triton_packed", r"attention='triton_packed' cannot run here .*needs CUDA"),
        ("xformers", r"attention='xformers' is not one of auto, triton_packed, flash_attn, torch_varlen, sdpa"),
    ],
)
def test_attention_backend_that_cannot_run_is_a_configuration_error(requested, match):
    with pytest.raises(ConfigurationError, match=match):
        select_attention_backend(requested, torch.device("cpu"), torch.float32)
