"""The serving benchmark's synthetic tokenizer and texts (benchmarks/serve_bench_setup.py): an exact
vocabulary size, XLM-R's special ids, no unknown pieces, and lengths near the asked medians."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from serve_bench_setup import SyntheticLanguage  # noqa: E402


@pytest.fixture(scope="module")
def language():
    return SyntheticLanguage(words=20000)


def test_tokenizer_is_shaped_like_xlmr(language):
    tokenizer = language.tokenizer(8000)
    assert tokenizer.get_vocab_size() == 8000
    assert [tokenizer.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    encoding = tokenizer.encode("Ｆｕｌｌ  width")  # NFKC and runs of spaces, as XLM-R normalizes
    assert encoding.ids[0] == 0 and encoding.ids[-1] == 2
    assert tokenizer.decode(encoding.ids) == "Full width"


@pytest.mark.parametrize("workload, median", [("queries", None), ("passages", None), ("passages", 40)])
def test_texts_have_the_asked_lengths_and_no_unknown_pieces(language, workload, median):
    tokenizer = language.tokenizer(8000)
    texts = language.texts(workload, 300, np.random.default_rng(0), median)
    encodings = tokenizer.encode_batch(texts)
    assert all(3 not in e.ids for e in encodings)  # capitals and punctuation included
    lengths = [len(e.ids) for e in encodings]
    target = median or {"queries": 16, "passages": 120}[workload]
    assert 0.7 * target < np.median(lengths) < 1.5 * target  # a small vocabulary splits words more
    words = sum(len(text.split()) for text in texts)
    assert 1.0 < (sum(lengths) - 2 * len(texts)) / words < 2.0
