"""Text to token ids: equal to HF's tokenizers (truncation keeps the special tokens), an error
naming the length when asked not to truncate, and clear errors for texts that cannot be served."""

from __future__ import annotations

import numpy as np
import pytest

from loraembed.config import ServingConfig
from loraembed.errors import CheckpointError, InvalidInputError, SequenceTooLongError
from loraembed.tokenization import TextTokenizer

LONG_TEXT = " ".join(f"Paragraph {index}: embeddings map text to vectors for retrieval." for index in range(60))
TEXTS = [
    "Hello world",
    "Die Straßenbahn fährt über die Brücke.",
    "東京は日本の首都です。",
    "I love pizza 🍕🎉 and emoji",
    LONG_TEXT,
    "a",
]


@pytest.fixture(scope="module")
def minilm_hf_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def hf_encode(hf_tokenizer, texts, max_length=None):
    if max_length is None:
        return hf_tokenizer(texts, add_special_tokens=True)["input_ids"]
    return hf_tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]


def rows(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[list[int]]:
    return [row[: int(length)].tolist() for row, length in zip(input_ids, attention_mask.sum(1))]


@pytest.mark.parametrize("max_seq_len", [256, 16, 3])
def test_truncation_equals_hf_on_the_bundled_model(minilm_path, minilm_hf_tokenizer, max_seq_len):
    input_ids, attention_mask = TextTokenizer(minilm_path, max_seq_len).encode(TEXTS)
    expected = hf_encode(minilm_hf_tokenizer, TEXTS, max_seq_len)
    assert rows(input_ids, attention_mask) == expected
    assert max(len(ids) for ids in expected) == max_seq_len  # some text really was cut
    cls_id, sep_id = minilm_hf_tokenizer.cls_token_id, minilm_hf_tokenizer.sep_token_id
    assert all(ids[0] == cls_id and ids[-1] == sep_id for ids in rows(input_ids, attention_mask))


def test_untruncated_texts_equal_hf(minilm_path, minilm_hf_tokenizer):
    texts = TEXTS[:4] + TEXTS[5:]
    input_ids, attention_mask = TextTokenizer(minilm_path, 256).encode(texts, truncate=False)
    assert rows(input_ids, attention_mask) == hf_encode(minilm_hf_tokenizer, texts)


def test_truncation_equals_hf_on_an_xlmr_tokenizer(tiny_xlmr_path):
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tiny_xlmr_path / "tokenizer.json"))
    texts = ["hello world", "the text of a longer sentence is cut here and there", "Größe"]
    input_ids, attention_mask = TextTokenizer(tiny_xlmr_path, 8).encode(texts)
    assert rows(input_ids, attention_mask) == hf_encode(hf_tokenizer, texts, 8)
    assert all(ids[0] == 0 and ids[-1] == 2 for ids in rows(input_ids, attention_mask))  # <s> ... </s>
    assert attention_mask.sum(1).max() == 8


@pytest.mark.parametrize("model, pad_id", [("minilm", 0), ("xlmr", 1)])
def test_output_is_right_padded_with_the_pad_id(minilm_path, tiny_xlmr_path, model, pad_id):
    tokenizer = TextTokenizer({"minilm": minilm_path, "xlmr": tiny_xlmr_path}[model], 32)
    input_ids, attention_mask = tokenizer.encode(["a", "hello world and the text", "the"])
    assert input_ids.dtype == attention_mask.dtype == np.int64
    assert input_ids.shape == attention_mask.shape
    lengths = attention_mask.sum(1)
    assert (attention_mask == (np.arange(input_ids.shape[1]) < lengths[:, None])).all()  # ones, then zeros
    assert (input_ids[attention_mask == 0] == pad_id).all()
    assert attention_mask[:, -1].any()  # no column of padding only


def test_too_long_without_truncation_names_the_length(minilm_path, minilm_hf_tokenizer):
    length = len(hf_encode(minilm_hf_tokenizer, [LONG_TEXT])[0])
    assert length > 256
    with pytest.raises(SequenceTooLongError, match=rf"text 1 is {length} tokens, more than max_seq_len=256; send truncate=true"):
        TextTokenizer(minilm_path, 256).encode(["short", LONG_TEXT], truncate=False)


def test_text_of_exactly_max_seq_len_tokens_needs_no_truncation(minilm_path, minilm_hf_tokenizer):
    text = "one two three four"
    length = len(hf_encode(minilm_hf_tokenizer, [text])[0])  # with [CLS] and [SEP]
    input_ids, _ = TextTokenizer(minilm_path, length).encode([text], truncate=False)
    assert input_ids.shape == (1, length)
    with pytest.raises(SequenceTooLongError, match=rf"text 0 is {length} tokens, more than max_seq_len={length - 1}"):
        TextTokenizer(minilm_path, length - 1).encode([text], truncate=False)


TEN_MEGABYTES = 10 * 1024 * 1024


@pytest.mark.parametrize(
    "raw, match",
    [
        ("", r"text 1 is empty"),
        (b"", r"text 1 is empty"),
        ("   \t\n ", r"text 1 is empty"),
        ("\u3000\u00a0", r"text 1 is empty"),  # ideographic and no-break spaces
        (b"caf\xe9", r"text 1 is not valid UTF-8: .*byte 0xe9 in position 3"),
        (b"\xff\xfe", r"text 1 is not valid UTF-8"),
        (b"abc\xe6\x97", r"text 1 is not valid UTF-8: .*unexpected end of data"),
        ("ok \ud800", r"text 1 is not valid UTF-8: .*surrogates not allowed"),  # a str with no UTF-8 form
        (b"a" * TEN_MEGABYTES, rf"text 1 is {TEN_MEGABYTES} bytes, more than max_text_bytes=1000000"),
        ("a" * TEN_MEGABYTES, rf"text 1 is {TEN_MEGABYTES} bytes, more than max_text_bytes=1000000"),
    ],
    ids=["empty", "empty-bytes", "whitespace", "unicode-whitespace", "latin-1", "bad-bytes", "cut-utf8", "lone-surrogate", "10MB-bytes", "10MB-str"],
)
def test_bad_texts_are_invalid_input(minilm_path, raw, match):
    tokenizer = TextTokenizer(minilm_path, 256, max_text_bytes=ServingConfig().max_text_bytes)
    with pytest.raises(InvalidInputError, match=match):
        tokenizer.decode_texts([b"fine", raw, b"also fine"])


def test_text_size_counts_utf8_bytes_not_characters(minilm_path):
    tokenizer = TextTokenizer(minilm_path, 256, max_text_bytes=12)
    assert tokenizer.decode_texts(["ä" * 6, "a" * 12]) == ["ä" * 6, "a" * 12]  # 12 bytes each: at the limit
    with pytest.raises(InvalidInputError, match=r"text 0 is 14 bytes, more than max_text_bytes=12"):
        tokenizer.decode_texts(["ä" * 7])
    with pytest.raises(InvalidInputError, match=r"text 0 is 13 bytes, more than max_text_bytes=12"):
        tokenizer.decode_texts([b"a" * 13])


def test_valid_texts_decode_to_str(minilm_path):
    raw = [text.encode("utf-8") for text in TEXTS] + ["already a str 🍕"]
    assert TextTokenizer(minilm_path, 256).decode_texts(raw) == TEXTS + ["already a str 🍕"]


def test_checkpoint_without_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer.json is missing \(a fast tokenizer is required\)"):
        TextTokenizer(tmp_path, 16)


@pytest.fixture(scope="module")
def normalizing_xlmr_path(tmp_path_factory):
    """The tiny XLM-R tokenizer with XLM-R's normalization (NFKC, runs of spaces to one): texts whose
    characters change under normalization are where offsets and ids could part ways."""
    from tokenizers import Regex, normalizers

    from tests.support.checkpoints import xlmr_tokenizer

    tokenizer = xlmr_tokenizer(vocab_size=250)
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    folder = tmp_path_factory.mktemp("normalizing-xlmr")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


NORMALIZED_TEXTS = ["ﬁne ﬂow", "Ｆｕｌｌ　ｗｉｄｔｈ", "spaces   between    words", "① ² ½", "e\u0301 café", "日本語のテキスト"]


@pytest.mark.parametrize("max_seq_len, truncate", [(64, True), (64, False), (6, True)])
def test_ids_equal_the_tokenizers_offset_tracking_encode(normalizing_xlmr_path, max_seq_len, truncate):
    # TextTokenizer uses encode_batch_fast (no character offsets); the ids must be encode_batch's.
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(normalizing_xlmr_path / "tokenizer.json"))
    if truncate:
        reference.enable_truncation(max_length=max_seq_len)
    expected = [encoding.ids for encoding in reference.encode_batch(NORMALIZED_TEXTS + TEXTS)]
    input_ids, attention_mask = TextTokenizer(normalizing_xlmr_path, max_seq_len).encode(
        NORMALIZED_TEXTS + TEXTS if truncate else NORMALIZED_TEXTS, truncate=truncate
    )
    assert rows(input_ids, attention_mask) == expected[: len(input_ids)]
    if max_seq_len == 6:
        assert attention_mask.sum(1).max() == 6 and len(reference.encode(LONG_TEXT).ids) == 6  # really cut


def test_requests_of_one_batch_are_padded_each_to_its_own_longest(tiny_xlmr_path):
    tokenizer = TextTokenizer(tiny_xlmr_path, 40)
    requests = [["a"], ["hello world and the text of it", "the"], ["the text"]]
    results = tokenizer.encode_requests(requests, [True, True, False])
    for texts, (input_ids, attention_mask) in zip(requests, results):
        alone_ids, alone_mask = tokenizer.encode(texts)
        np.testing.assert_array_equal(input_ids, alone_ids)
        np.testing.assert_array_equal(attention_mask, alone_mask)
        assert attention_mask[:, -1].any()


@pytest.mark.parametrize("max_seq_len, truncate", [(64, True), (6, True), (512, False)])
def test_small_batches_encoded_one_by_one_equal_the_batch_path(normalizing_xlmr_path, monkeypatch, max_seq_len, truncate):
    # Batches of at most SERIAL_MAX_CHARS characters skip the thread pool; the ids must not change.
    import loraembed.tokenization as tokenization

    texts = NORMALIZED_TEXTS + TEXTS[:4] + TEXTS[5:]
    requests = [[text] for text in texts] + [texts[:3], texts]
    tokenizer = TextTokenizer(normalizing_xlmr_path, max_seq_len)
    assert sum(map(len, texts)) <= tokenization.SERIAL_MAX_CHARS
    one_by_one = tokenizer.encode_requests(requests, [truncate] * len(requests))
    monkeypatch.setattr(tokenization, "SERIAL_MAX_CHARS", 0)
    batched = tokenizer.encode_requests(requests, [truncate] * len(requests))
    for (ids, mask), (batch_ids, batch_mask) in zip(one_by_one, batched):
        assert ids.dtype == mask.dtype == np.int64
        np.testing.assert_array_equal(ids, batch_ids)
        np.testing.assert_array_equal(mask, batch_mask)


def test_one_text_too_long_names_its_length(tiny_xlmr_path):
    with pytest.raises(SequenceTooLongError, match=r"text 0 is \d+ tokens, more than max_seq_len=4; send truncate=true"):
        TextTokenizer(tiny_xlmr_path, 4).encode(["hello world and the text of it"], truncate=False)
