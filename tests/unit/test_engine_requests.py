"""Request validation of `EmbeddingEngine.embed`: each bad request gets its own typed error naming
the problem, and the good requests of the same call are answered as if it were not there."""

from __future__ import annotations

import numpy as np
import pytest

from loraembed.engine import BaseModelOnly, EncoderRequest
from loraembed.errors import AdapterError, InvalidInputError, InvalidParameterError, RequestError

VOCAB_SIZE = 236  # the tiny XLM-R's (tests/support/checkpoints.py)
MAX_SEQ_LEN = 40
HIDDEN_SIZE = 32


@pytest.fixture(scope="module")
def engine(tiny_xlmr_path, make_engine):
    engine = make_engine(tiny_xlmr_path, pooling="mean")
    config = engine.settings.encoder_config
    assert (config.vocab_size, engine.settings.max_seq_len, engine.hidden_size) == (VOCAB_SIZE, MAX_SEQ_LEN, HIDDEN_SIZE)
    return engine


def ids_and_mask(lengths, width=None, pad_id=1):
    """Right-padded [len(lengths), width] ids (<s> w w ... </s>) and mask."""
    width = width or max(lengths)
    input_ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = [0, *range(10 + row, 10 + row + length - 2), 2][:length]
        mask[row, :length] = 1
    return input_ids, mask


def request(input_ids=None, attention_mask=None, adapter_ids=None, **parameters) -> EncoderRequest:
    default_ids, default_mask = ids_and_mask([5, 3])
    return EncoderRequest(
        default_ids if input_ids is None else input_ids,
        default_mask if attention_mask is None else attention_mask,
        adapter_ids,
        parameters,
    )


def embed_one(engine, encoder_request) -> np.ndarray:
    [result] = engine.embed([encoder_request])
    if isinstance(result, Exception):
        raise result
    return result


def with_id(input_ids, row, column, value):
    changed = input_ids.copy()
    changed[row, column] = value
    return changed


IDS, MASK = ids_and_mask([5, 3])

BAD_REQUESTS = {
    "1-D ids": (request(IDS[0], MASK[0]), InvalidInputError, r"must be \[n, L\]; got \(5,\) and \(5,\)"),
    "3-D mask": (request(IDS[None], MASK[None]), InvalidInputError, r"must be \[n, L\]; got \(1, 2, 5\)"),
    "shape mismatch": (request(IDS, MASK[:, :4]), InvalidInputError,
                       r"INPUT_IDS shape \(2, 5\) differs from ATTENTION_MASK shape \(2, 4\)"),
    "float ids": (request(IDS.astype(np.float32)), InvalidInputError, r"must be integers; got float32, int64"),
    "float mask": (request(attention_mask=MASK.astype(np.float64)), InvalidInputError, r"must be integers; got int64, float64"),
    "no rows": (request(IDS[:0], MASK[:0]), InvalidInputError, r"empty request: shape \(0, 5\)"),
    "no columns": (request(IDS[:, :0], MASK[:, :0]), InvalidInputError, r"empty request: shape \(2, 0\)"),
    "mask value 2": (request(attention_mask=MASK * 2), InvalidInputError, r"ATTENTION_MASK values must be 0 or 1"),
    "mask value -1": (request(attention_mask=-MASK), InvalidInputError, r"ATTENTION_MASK values must be 0 or 1"),
    "all-zero mask row": (request(attention_mask=MASK * [[1], [0]]), InvalidInputError,
                          r"row 1 has an all-zero attention mask"),
    "left padded": (request(attention_mask=MASK[:, ::-1].copy()), InvalidInputError,
                    r"row 1: ATTENTION_MASK must be ones followed by zeros \(right padding\)"),
    "hole in mask": (request(attention_mask=np.array([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]])), InvalidInputError,
                     r"row 0: ATTENTION_MASK must be ones followed by zeros"),
    "over max_seq_len": (request(*ids_and_mask([MAX_SEQ_LEN, MAX_SEQ_LEN + 1])), InvalidInputError,
                         rf"row 1 is {MAX_SEQ_LEN + 1} tokens, more than max_seq_len={MAX_SEQ_LEN}"),
    # Requests without padding (one text, or texts of one length) take a shorter validation path.
    "bool mask": (request(attention_mask=MASK.astype(bool)), InvalidInputError, r"must be integers; got int64, bool"),
    "over max_seq_len, unpadded": (request(*ids_and_mask([MAX_SEQ_LEN + 1])), InvalidInputError,
                                   rf"row 0 is {MAX_SEQ_LEN + 1} tokens, more than max_seq_len={MAX_SEQ_LEN}"),
    "id = vocab size, unpadded": (request(with_id(IDS[:1], 0, 2, VOCAB_SIZE), MASK[:1]), InvalidInputError,
                                  rf"token ids must be in \[0, {VOCAB_SIZE}\); got values from 0 to {VOCAB_SIZE}"),
    "negative id, unpadded": (request(with_id(IDS[:1], 0, 1, -3), MASK[:1]), InvalidInputError,
                              rf"token ids must be in \[0, {VOCAB_SIZE}\); got values from -3 to"),
    "id = vocab size": (request(with_id(IDS, 0, 2, VOCAB_SIZE)), InvalidInputError,
                        rf"token ids must be in \[0, {VOCAB_SIZE}\); got values from 0 to {VOCAB_SIZE}"),
    "huge id": (request(np.where(MASK == 1, 10**12, 1)), InvalidInputError, rf"token ids must be in \[0, {VOCAB_SIZE}\)"),
    "negative id": (request(with_id(IDS, 1, 1, -10)), InvalidInputError,
                    rf"token ids must be in \[0, {VOCAB_SIZE}\); got values from -10 to"),
    "3 adapter ids for 2 rows": (request(adapter_ids=["", "", ""]), InvalidInputError,
                                 r"3 adapter ids for 2 texts \(send one per text, or one\)"),
    "no adapter ids": (request(adapter_ids=[]), InvalidInputError, r"0 adapter ids for 2 texts"),
    "unknown adapter": (request(adapter_ids=["tenant-a"]), AdapterError, r"adapter 'tenant-a'"),
    "unknown adapter on one row": (request(adapter_ids=["", "tenant-b"]), AdapterError, r"'tenant-b'"),
    "normalize=maybe": (request(normalize="maybe"), InvalidParameterError, r"normalize='maybe' is not a boolean"),
    "dimensions=0": (request(dimensions=0), InvalidParameterError, r"dimensions=0 is below the minimum 1"),
    "dimensions > hidden": (request(dimensions=HIDDEN_SIZE + 1), InvalidParameterError,
                            rf"dimensions={HIDDEN_SIZE + 1} is larger than the embedding size {HIDDEN_SIZE}"),
    "dimensions=x": (request(dimensions="x"), InvalidParameterError, r"dimensions='x' is not an integer"),
    "dimensions=1.5": (request(dimensions=1.5), InvalidParameterError, r"dimensions=1.5 is not an integer"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_gets_its_error(engine, case):
    encoder_request, error_type, match = case
    with pytest.raises(error_type, match=match):
        embed_one(engine, encoder_request)


def test_too_many_texts_in_one_request(tiny_xlmr_path, make_engine):
    engine = make_engine(tiny_xlmr_path, pooling="mean", max_texts_per_request=3)
    embed_one(engine, request(*ids_and_mask([4, 4, 4])))
    with pytest.raises(InvalidInputError, match=r"4 texts in one request, more than max_texts_per_request=3"):
        embed_one(engine, request(*ids_and_mask([4, 4, 4, 4])))


# --- what is accepted, and how ----------------------------------------------------------------


def test_padding_positions_may_hold_any_id(engine):
    clean = embed_one(engine, request())
    garbage = np.where(MASK == 1, IDS, np.array([[-5], [10**9]]))  # out-of-range ids under mask 0 only
    np.testing.assert_array_equal(embed_one(engine, request(garbage)), clean)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_integer_dtypes_are_accepted(engine, dtype):
    np.testing.assert_array_equal(embed_one(engine, request(IDS.astype(dtype), MASK.astype(dtype))),
                                  embed_one(engine, request()))


@pytest.mark.parametrize("adapter_ids", [None, [""], ["", ""]])
def test_base_model_adapter_ids(engine, adapter_ids):
    np.testing.assert_array_equal(embed_one(engine, request(adapter_ids=adapter_ids)), embed_one(engine, request()))


def test_max_seq_len_tokens_are_accepted(engine):
    assert embed_one(engine, request(*ids_and_mask([MAX_SEQ_LEN, 1]))).shape == (2, HIDDEN_SIZE)


def test_extra_padding_columns_change_nothing(engine):
    wide = request(*ids_and_mask([5, 3], width=MAX_SEQ_LEN + 20))  # padding past max_seq_len is fine
    np.testing.assert_array_equal(embed_one(engine, wide), embed_one(engine, request()))


@pytest.mark.parametrize(
    "parameters, width, unit_norm",
    [({}, HIDDEN_SIZE, False), ({"normalize": True}, HIDDEN_SIZE, True), ({"dimensions": 8}, 8, False),
     ({"dimensions": "8", "normalize": "true"}, 8, True)],
)
def test_parameters_shape_the_output(engine, parameters, width, unit_norm):
    embeddings = embed_one(engine, request(**parameters))
    full = embed_one(engine, request())  # default_normalize is False for a checkpoint without ST files
    assert embeddings.shape == (2, width) and embeddings.dtype == np.float32
    norms = np.linalg.norm(embeddings, axis=1)
    if unit_norm:
        np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
        np.testing.assert_allclose(embeddings, full[:, :width] / np.linalg.norm(full[:, :width], axis=1, keepdims=True), atol=1e-6)
    else:
        np.testing.assert_array_equal(embeddings, full[:, :width])
        assert not np.allclose(norms, 1.0)


# --- one bad request among good ones ----------------------------------------------------------


def test_bad_requests_do_not_disturb_good_ones(engine):
    good = [
        request(*ids_and_mask([7, 2, 40])),
        request(*ids_and_mask([1]), adapter_ids=[""]),
        request(*ids_and_mask([12, 30]), normalize=True, dimensions=8),
        request(*ids_and_mask([3, 3, 9, 21])),
    ]
    bad = {
        1: (BAD_REQUESTS["id = vocab size"][0], InvalidInputError, "token ids must be in"),
        3: (BAD_REQUESTS["unknown adapter"][0], AdapterError, "'tenant-a'"),
        4: (BAD_REQUESTS["dimensions=x"][0], InvalidParameterError, "dimensions='x'"),
        6: (BAD_REQUESTS["all-zero mask row"][0], InvalidInputError, "all-zero attention mask"),
    }
    mixed = list(good)
    for position in sorted(bad):
        mixed.insert(position, bad[position][0])
    results = engine.embed(mixed)
    clean = engine.embed(good)

    assert len(results) == len(mixed)
    good_results = []
    for position, result in enumerate(results):
        if position in bad:
            _, error_type, text = bad[position]
            assert isinstance(result, error_type) and isinstance(result, RequestError)
            assert text in str(result)
        else:
            assert isinstance(result, np.ndarray)
            good_results.append(result)
    for result, expected, encoder_request in zip(good_results, clean, good):
        assert result.shape == expected.shape == (encoder_request.input_ids.shape[0], expected.shape[1])
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)


def test_a_call_with_only_bad_requests(engine):
    results = engine.embed([BAD_REQUESTS["unknown adapter"][0], BAD_REQUESTS["float ids"][0]])
    assert isinstance(results[0], AdapterError) and isinstance(results[1], InvalidInputError)
    assert engine.embed([]) == []


class SlotsWithoutWeights(BaseModelOnly):
    """Adapter resolution that hands out slots but changes no weight, so every row must still equal
    the base model's embedding of its text, whatever order the adapter grouping packs it in."""

    def __init__(self, slots: dict[str, int]):
        super().__init__()
        self.slots = slots
        self.activated_segments = []

    def acquire(self, adapter_ids):
        return {adapter_id: self.slots[adapter_id] for adapter_id in adapter_ids}

    def activate(self, batch, plan_layers=True):
        self.activated_segments.append([segment.slot for segment in batch.adapter_segments])
        super().activate(batch, plan_layers)


def test_rows_come_back_in_request_order_when_adapter_grouping_reorders_them(engine, monkeypatch):
    adapters = SlotsWithoutWeights({"": 0, "b": 1, "a": 2})
    monkeypatch.setattr(engine, "adapters", adapters)
    requests = [
        request(*ids_and_mask([6, 9, 4]), adapter_ids=["a", "", "b"]),
        request(*ids_and_mask([3]), adapter_ids=["b"]),
        request(*ids_and_mask([11, 2, 7, 5]), adapter_ids=["a", "a", "", "b"]),
    ]
    results = engine.embed(requests)
    assert adapters.activated_segments == [[0, 1, 2]]  # one packed batch, grouped by slot
    monkeypatch.undo()
    for encoder_request, result in zip(requests, results):
        alone = [embed_one(engine, request(encoder_request.input_ids[row : row + 1], encoder_request.attention_mask[row : row + 1]))
                 for row in range(encoder_request.input_ids.shape[0])]
        np.testing.assert_allclose(result, np.concatenate(alone), rtol=0, atol=1e-5)


def test_unpadded_and_padded_requests_give_the_same_rows(engine):
    """The no-padding validation path and the padded one see the same tokens."""
    unpadded_ids, unpadded_mask = ids_and_mask([6, 6])
    padded_ids, padded_mask = ids_and_mask([6, 6], width=9)
    single = [embed_one(engine, request(unpadded_ids[row : row + 1], unpadded_mask[row : row + 1])) for row in range(2)]
    np.testing.assert_array_equal(embed_one(engine, request(unpadded_ids, unpadded_mask)), embed_one(engine, request(padded_ids, padded_mask)))
    np.testing.assert_allclose(embed_one(engine, request(unpadded_ids, unpadded_mask)), np.concatenate(single), atol=1e-6, rtol=0)


def test_requests_with_and_without_parameters_in_one_call(engine):
    """Default-option requests are finalized together; others keep their own options."""
    flipped = not engine.settings.default_normalize
    plain, shortened, other = request(), request(dimensions=8), request(normalize=flipped)
    together = engine.embed([plain, shortened, other, request()])
    alone = [embed_one(engine, r) for r in (plain, shortened, other)]
    for got, expected in zip(together, alone + alone[:1]):
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert together[1].shape == (2, 8)
    normalized, unnormalized = (together[2], together[0]) if flipped else (together[0], together[2])
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(np.linalg.norm(unnormalized, axis=1), 1.0)


def test_many_one_text_requests_in_one_call_equal_each_alone(engine):
    """Requests without parameters are validated together (a few numpy calls for the whole call);
    each still gets its own rows, or the error it gets alone, whatever surrounds it."""
    rng = np.random.default_rng(3)
    requests = []
    for position in range(40):
        length = int(rng.integers(3, MAX_SEQ_LEN + 1))
        ids, mask = ids_and_mask([length])
        requests.append(request(ids.astype([np.int64, np.int32][position % 2]), mask, adapter_ids=[[""], None][position % 3 > 0]))
    padded_ids, padded_mask = ids_and_mask([7, 3, 5])
    requests[5] = request(padded_ids, padded_mask)  # padding
    requests[6] = BAD_REQUESTS["id = vocab size, unpadded"][0]
    requests[11] = BAD_REQUESTS["negative id, unpadded"][0]
    requests[12] = request(*ids_and_mask([4, 4]), normalize=True)  # parameters: validated alone
    requests[20] = BAD_REQUESTS["mask value 2"][0]
    requests[21] = request(np.asfortranarray(np.tile(IDS[:1, :5], (3, 1))), np.ones((3, 5), dtype=np.int64))
    requests[30] = BAD_REQUESTS["over max_seq_len, unpadded"][0]
    requests[31] = BAD_REQUESTS["unknown adapter"][0]
    requests[39] = BAD_REQUESTS["all-zero mask row"][0]
    together = engine.embed(requests)
    for encoder_request, got in zip(requests, together):
        [alone] = engine.embed([encoder_request])
        if isinstance(alone, Exception):
            assert type(got) is type(alone) and str(got) == str(alone)
        else:
            assert got.dtype == np.float32 and got.shape == alone.shape
            np.testing.assert_allclose(got, alone, rtol=0, atol=1e-6)


def test_plain_requests_checked_together_match_validate(engine, monkeypatch):
    """The check of plain requests together (padded or not; one adapter id, or one per row)
    accepts exactly the requests `validate` accepts, with the same tokens, lengths and adapter ids
    per row, and leaves the others to `validate`'s own errors."""
    rng = np.random.default_rng(11)
    requests = []
    for position in range(80):
        lengths = rng.integers(1, MAX_SEQ_LEN + 1, int(rng.integers(1, 6))).tolist()
        width = min(MAX_SEQ_LEN, max(lengths) + int(rng.integers(0, 4)))
        pad_id = int(rng.choice([1, VOCAB_SIZE, 10**9, -5]))  # padding positions may hold any id
        ids, mask = ids_and_mask(lengths, width, pad_id)
        dtype = [np.int64, np.int32][position % 2]
        adapter_ids = [None, [""], [""] * len(lengths), [f"tenant-{row}" for row in range(len(lengths))]][position % 4]
        requests.append(request(ids.astype(dtype), mask.astype(dtype), adapter_ids))
    requests[3] = BAD_REQUESTS["mask value 2"][0]
    requests[10] = BAD_REQUESTS["left padded"][0]
    requests[17] = BAD_REQUESTS["hole in mask"][0]
    requests[24] = BAD_REQUESTS["all-zero mask row"][0]
    requests[31] = BAD_REQUESTS["id = vocab size"][0]
    requests[38] = BAD_REQUESTS["negative id, unpadded"][0]
    requests[45] = BAD_REQUESTS["mask value -1"][0]
    requests[52] = request(adapter_ids=["", "", ""])  # 3 ids for 2 rows
    requests[59] = request(normalize=True)  # parameters: not plain
    results = [None] * len(requests)
    validated_alone = []
    validate = engine.validate
    positions = {id(encoder_request): index for index, encoder_request in enumerate(requests)}
    monkeypatch.setattr(engine, "validate", lambda r: validated_alone.append(positions[id(r)]) or validate(r))
    got = engine._validate_all(requests, results)
    monkeypatch.undo()
    assert validated_alone == [3, 10, 17, 24, 31, 38, 45, 52, 59]  # the good plain requests went together

    accepted, errors = [], {}
    for index, encoder_request in enumerate(requests):
        try:
            accepted.append((index, engine.validate(encoder_request)))
        except RequestError as error:
            errors[index] = error
    assert len(errors) == 8 and 59 not in errors
    for index, result in enumerate(results):
        if index in errors:
            assert type(result) is type(errors[index]) and str(result) == str(errors[index])
        else:
            assert result is None
    assert got.indices == [index for index, _ in accepted]
    np.testing.assert_array_equal(got.rows, [len(valid.lengths) for _, valid in accepted])
    np.testing.assert_array_equal(got.lengths, np.concatenate([valid.lengths for _, valid in accepted]))
    np.testing.assert_array_equal(got.token_ids, np.concatenate([valid.token_ids for _, valid in accepted]))
    assert got.token_ids.dtype == np.int64 and got.lengths.dtype == np.int64
    assert got.row_adapters == [adapter_id for _, valid in accepted for adapter_id in valid.adapter_ids]
