"""Hostile input against the real `embed` and `encoder` models (hypothesis; bounded and
derandomized): random bytes and invalid UTF-8, huge, zero and odd-typed `dimensions`, negative and
out-of-vocabulary ids, masks of zeros or of values other than 0/1, mismatched shapes, wrong dtypes,
100k texts in one request. Each request gets exactly the answer of the in-process engine — its
embedding, or its error message as INVALID_ARGUMENT — or Triton's own clear rejection; after every
example the server is ready and a good request is still answered correctly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tritonclient.utils import InferenceServerException

from loraembed.config import RequestOptions, ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
from loraembed.errors import RequestError
from loraembed.tokenization import TextTokenizer
from tests.support.triton_probes import bytes_input, embed, int_input, server_ready

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
ATOL = 1e-5
VOCAB_SIZE = 30522  # all-MiniLM-L6-v2
GOOD_TEXTS = ["hello world", "a good request after a bad one"]
FUZZ = settings(
    max_examples=60,
    deadline=None,  # a round trip through the server, not a unit of pure code
    derandomize=True,  # the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Oracle:
    """The in-process engine and tokenizer with the server's default configuration."""

    def __init__(self):
        self.engine = EmbeddingEngine(ServingConfig.from_parameters({}, environ={}))
        self.settings = self.engine.settings
        self.tokenizer = TextTokenizer(self.settings.model_path, self.settings.max_seq_len)

    def embed_texts(self, raw_texts: list[bytes], parameters: dict) -> np.ndarray | str:
        """What `embed` must answer: the embeddings, or the message of the request's error."""
        try:
            # The tokenizer model checks the parameters, then the texts, in this order.
            RequestOptions.from_parameters(parameters, self.settings.default_normalize, self.engine.hidden_size)
            texts = self.tokenizer.decode_texts(raw_texts)
        except RequestError as error:
            return str(error)
        input_ids, attention_mask = self.tokenizer.encode(texts)
        return self.embed_ids(input_ids, attention_mask, None, parameters)

    def embed_ids(self, input_ids, attention_mask, adapter_ids: list[bytes] | None, parameters) -> np.ndarray | str:
        """What `encoder` must answer for a request that Triton itself accepts."""
        if adapter_ids is not None:
            try:
                adapter_ids = [raw.decode("utf-8") for raw in adapter_ids]
            except UnicodeDecodeError:
                return "ADAPTER_ID is not valid UTF-8"
        [result] = self.engine.embed([EncoderRequest(input_ids, attention_mask, adapter_ids, parameters)])
        return str(result) if isinstance(result, Exception) else result


@pytest.fixture(scope="module")
def server(triton_server_factory):
    return triton_server_factory(REPOSITORY)  # the default configuration, shared with test_embed_server


@pytest.fixture(scope="module")
def client(server):
    return grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle()


@pytest.fixture(scope="module")
def still_serving(server, client, oracle):
    """``still_serving()``: the server is ready and answers a good request correctly."""
    expected = oracle.embed_texts([text.encode() for text in GOOD_TEXTS], {})

    def check():
        assert server_ready(server)
        np.testing.assert_allclose(embed(client, GOOD_TEXTS), expected, rtol=0, atol=ATOL)

    return check


def as_sent(parameters: dict) -> dict:
    """The parameters as the models receive them: Triton passes strings as C strings, so a string
    parameter ends at its first NUL character."""
    return {name: value.split("\0")[0] if isinstance(value, str) else value for name, value in parameters.items()}


def error_kind(message: str) -> str:
    """The message without its values: 'text N is not valid UTF-8', 'dimensions=… is below the minimum N'."""
    kind = re.split(r"[:(]", message)[0]
    return re.sub(r"\d+", "N", re.sub(r"=\S+", "=…", re.sub(r"'[^']*'", "'…'", kind))).strip()


def check_answer(call, expected: np.ndarray | str) -> None:
    """`call()` answers `expected`: equal embeddings, or an INVALID_ARGUMENT error with that message."""
    # What the examples exercised, in --hypothesis-show-statistics: the error's kind or "embeddings".
    event(error_kind(expected) if isinstance(expected, str) else "embeddings")
    if isinstance(expected, str):
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", str(raised.value)
        assert expected in raised.value.message(), (expected, raised.value.message())
    else:
        result = call()
        assert result.shape == expected.shape
        np.testing.assert_allclose(result, expected, rtol=0, atol=ATOL)


# --- strategies ------------------------------------------------------------------------------------

ODD_TEXTS = [b"", b" \t\n", b"\xff", b"caf\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"a\x00b", "Grüße 東京 🤖".encode(),
             "\u200b\u00a0\u3000".encode(), b"\x1c\x1d", b"x" * 300]
sane_texts = st.text(min_size=1, max_size=48).filter(str.strip)  # what decode_texts accepts
# Mostly valid text (so that many requests get embeddings), else random bytes or a known oddity.
raw_texts = st.one_of(sane_texts.map(str.encode), sane_texts.map(str.encode), st.text(max_size=48).map(str.encode),
                      st.binary(max_size=48), st.sampled_from(ODD_TEXTS))
dimensions = st.one_of(
    st.integers(1, 384),
    st.integers(-5, 400),
    st.integers(-(2**63), 2**63 - 1),  # huge and negative: what an int64 request parameter can hold
    st.sampled_from([0, 1, 384, 385, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "0", "64", "1e3", " 7 ", "9" * 40, "\x0064"]),
    st.booleans(),
)
request_parameters = st.fixed_dictionaries(
    {}, optional={"dimensions": dimensions, "normalize": st.one_of(st.booleans(), st.sampled_from(["yes", "0", "x"])),
                  "truncate": st.sampled_from([True, "true", "maybe"])}
)


FLAWS = ["none", "id-out-of-vocabulary", "all-zero-row", "mask-value", "mask-width", "adapter-id"]


@st.composite
def encoder_inputs(draw, flaw: str):
    """INPUT_IDS and ATTENTION_MASK [n, L] (right-padded, in the vocabulary) and ADAPTER_ID (None:
    absent, else one per row), with one flaw of the given kind (which may turn out harmless)."""
    rows, width = draw(st.integers(1, 4)), draw(st.integers(1, 10))
    lengths = np.array(draw(st.lists(st.integers(1, width), min_size=rows, max_size=rows)))
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)  # [n, L]
    input_ids = draw(arrays(np.int64, (rows, width), elements=st.integers(0, VOCAB_SIZE - 1)))
    ids = draw(st.sampled_from([None, [b""]]))
    row, column = draw(st.integers(0, rows - 1)), draw(st.integers(0, width - 1))
    if flaw == "id-out-of-vocabulary":  # negative or >= vocab; harmless where it lands on padding
        input_ids[row, column] = draw(st.one_of(st.integers(-(2**63), -1), st.integers(VOCAB_SIZE, 2**63 - 1)))
    elif flaw == "all-zero-row":
        mask[row] = 0
    elif flaw == "mask-value":  # not 0/1, or a 0/1 that breaks the right padding
        mask[row, column] = draw(st.sampled_from([2, -1, 2**62, -(2**63), 0, 1]))
    elif flaw == "mask-width":  # Triton accepts it (the dims are [-1]); the engine must not
        mask = np.ones((rows, width + 1 if width == 1 else width + draw(st.sampled_from([-1, 1]))), dtype=np.int64)
    elif flaw == "adapter-id":  # random bytes, paths, hub ids: this server has no adapters
        ids = [draw(st.one_of(st.binary(max_size=12), st.sampled_from([b"../etc", b"/abs", b"\xff", b"org/name"])))]
    return input_ids, mask, None if ids is None else ids * rows


# --- embed -----------------------------------------------------------------------------------------


@FUZZ
@given(texts=st.lists(raw_texts, min_size=1, max_size=4), parameters=request_parameters)
def test_embed_answers_random_texts_and_parameters_like_the_engine(client, oracle, still_serving, texts, parameters):
    expected = oracle.embed_texts(texts, as_sent(parameters))
    check_answer(lambda: embed(client, texts, parameters=parameters or None), expected)
    still_serving()


@FUZZ
@given(texts=st.lists(sane_texts.map(str.encode), min_size=1, max_size=3),
       adapter_id=st.one_of(st.just(b""), st.binary(max_size=16), st.text(max_size=16).map(str.encode)))
def test_embed_answers_random_adapter_ids(client, oracle, still_serving, texts, adapter_id):
    ids = [adapter_id] * len(texts)
    input_ids, attention_mask = oracle.tokenizer.encode(oracle.tokenizer.decode_texts(texts))
    expected = oracle.embed_ids(input_ids, attention_mask, ids, {})  # the texts are fine: the id decides
    check_answer(lambda: embed(client, texts, ids), expected)
    still_serving()


# --- encoder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flaw", FLAWS)
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_encoder_answers_random_token_tensors_like_the_engine(client, oracle, still_serving, flaw, data):
    input_ids, attention_mask, ids = data.draw(encoder_inputs(flaw))
    parameters = data.draw(st.one_of(st.just({}), request_parameters) if flaw == "none" else st.just({}))
    inputs = [int_input("INPUT_IDS", input_ids), int_input("ATTENTION_MASK", attention_mask)]
    if ids is not None:
        inputs.append(bytes_input("ADAPTER_ID", ids))
    expected = oracle.embed_ids(input_ids, attention_mask, ids, as_sent(parameters))
    check_answer(lambda: client.infer("encoder", inputs, parameters=parameters or None).as_numpy("EMBEDDING"),
                 expected)
    still_serving()


WRONG_TYPES = {"INT64": np.int64, "INT32": np.int32, "INT8": np.int8, "UINT64": np.uint64, "FP32": np.float32, "FP64": np.float64,
               "BOOL": np.bool_, "FP16": np.float16}


@FUZZ
@given(name=st.sampled_from(["INPUT_IDS", "ATTENTION_MASK", "ADAPTER_ID", "TEXT"]),
       datatype=st.sampled_from([*WRONG_TYPES, "BYTES"]))
def test_wrong_dtypes_are_rejected_by_triton(client, still_serving, name, datatype):
    expected_type = {"INPUT_IDS": "INT64", "ATTENTION_MASK": "INT64", "ADAPTER_ID": "BYTES", "TEXT": "BYTES"}[name]
    if datatype == expected_type:
        datatype = "FP32"
    model = "embed" if name == "TEXT" else "encoder"
    ones = np.ones((1, 3), dtype=np.int64)
    width = 3 if expected_type == "INT64" else 1
    if datatype == "BYTES":
        wrong = bytes_input(name, [b"101"])
    else:
        wrong = int_input(name, np.ones((1, width), dtype=WRONG_TYPES[datatype]), datatype)
    inputs = {"INPUT_IDS": int_input("INPUT_IDS", ones), "ATTENTION_MASK": int_input("ATTENTION_MASK", ones)}
    inputs = [wrong] if model == "embed" else [*{**inputs, name: wrong}.values()]
    with pytest.raises(InferenceServerException,
                       match=rf"inference input '{name}' data-type is '{datatype}', but model '{model}' expects "
                             rf"'{expected_type}'"):
        client.infer(model, inputs)
    still_serving()


# --- shapes and sizes Triton refuses before the models see them ---------------------------------------

TRITON_REJECTIONS = {
    "rows-differ": (lambda: [int_input("INPUT_IDS", np.ones((2, 3), np.int64)),
                             int_input("ATTENTION_MASK", np.ones((3, 3), np.int64))],
                    r"input '\w+' batch size does not match other inputs for 'encoder'"),
    "adapter-rows-differ": (lambda: [int_input("INPUT_IDS", np.ones((2, 3), np.int64)),
                                     int_input("ATTENTION_MASK", np.ones((2, 3), np.int64)),
                                     bytes_input("ADAPTER_ID", [b""] * 3)],
                            r"batch size does not match other inputs for 'encoder'"),
    "no-batch-dimension": (lambda: [int_input("INPUT_IDS", np.ones(3, np.int64)),
                                    int_input("ATTENTION_MASK", np.ones(3, np.int64))],
                           r"unexpected shape for input '\w+' for model 'encoder'"),
    "three-dimensions": (lambda: [int_input("INPUT_IDS", np.ones((1, 2, 3), np.int64)),
                                  int_input("ATTENTION_MASK", np.ones((1, 2, 3), np.int64))],
                         r"unexpected shape for input '\w+' for model 'encoder'"),
    "mask-missing": (lambda: [int_input("INPUT_IDS", np.ones((1, 3), np.int64))],
                     r"missing required input\(s\) \['ATTENTION_MASK'\]"),
    "100k-rows": (lambda: [int_input("INPUT_IDS", np.full((100_000, 2), 101, np.int64)),
                           int_input("ATTENTION_MASK", np.ones((100_000, 2), np.int64))],
                  r"inference request batch-size must be <= 1024 for 'encoder'"),
}


@pytest.mark.parametrize("case", TRITON_REJECTIONS.values(), ids=TRITON_REJECTIONS.keys())
def test_encoder_shapes_triton_rejects(client, still_serving, case):
    inputs, message = case
    with pytest.raises(InferenceServerException, match=message):
        client.infer("encoder", inputs())
    still_serving()


def test_100k_texts_in_one_request_are_refused_with_a_clear_error(client, still_serving):
    texts = np.array([[f"text {i}".encode()] for i in range(100_000)], dtype=object)
    tensor = grpcclient.InferInput("TEXT", list(texts.shape), "BYTES")
    tensor.set_data_from_numpy(texts)
    with pytest.raises(InferenceServerException, match=r"inference request batch-size must be <= 1024 for 'embed'"):
        client.infer("embed", [tensor])
    still_serving()
    # 1024 texts, the largest request Triton accepts, are all answered.
    assert embed(client, [f"text {i}" for i in range(1024)]).shape == (1024, 384)
