"""Text to token ids with the checkpoint's fast tokenizer (`tokenizer.json`), batched, in Rust.

Truncation keeps the special tokens: the text is cut to `max_seq_len` tokens including them, as
HF and sentence-transformers do. With `truncate=False` a longer text is an error naming its length.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import CheckpointError, InvalidInputError, SequenceTooLongError

# Batches of at most this many characters are encoded one text at a time on the calling thread:
# encode_batch hands even one text to the Rayon pool and waits for a worker to wake up (121 vs 77
# us for one ~25-token query on a 2-core CPU, idle between calls; more with more pool threads). The
# single-text `encode` also computes character offsets, which costs less than the wake-up at this size.
SERIAL_MAX_CHARS = 512


class TextTokenizer:
    def __init__(self, model_path: Path, max_seq_len: int, max_text_bytes: int = 1_000_000):
        tokenizer_file = model_path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{tokenizer_file} is missing (a fast tokenizer is required)")
        self.max_seq_len = max_seq_len
        self.max_text_bytes = max_text_bytes
        self._full = Tokenizer.from_file(str(tokenizer_file))
        self._full.no_padding()
        self._full.no_truncation()
        self._truncating = Tokenizer.from_file(str(tokenizer_file))
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=max_seq_len)
        self.pad_token_id = self._find_pad_id()

    def _find_pad_id(self) -> int:
        for token in ("<pad>", "[PAD]"):
            token_id = self._full.token_to_id(token)
            if token_id is not None:
                return token_id
        return 0

    def decode_texts(self, raw_texts: list[bytes | str]) -> list[str]:
        """UTF-8 bytes from the client to str, rejecting empty, oversized and invalid texts."""
        texts = []
        for index, raw in enumerate(raw_texts):
            try:
                # A str with lone surrogates has no UTF-8 form: as invalid as undecodable bytes.
                data = raw.encode("utf-8") if isinstance(raw, str) else raw
                if len(data) > self.max_text_bytes:
                    raise InvalidInputError(
                        f"text {index} is {len(data)} bytes, more than max_text_bytes={self.max_text_bytes}"
                    )
                raw = data.decode("utf-8")
            except UnicodeError as error:
                raise InvalidInputError(f"text {index} is not valid UTF-8: {error}") from None
            if not raw.strip():
                raise InvalidInputError(f"text {index} is empty")
            texts.append(raw)
        return texts

    def encode(self, texts: list[str], truncate: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, [n, L] int64 each, right-padded with the pad id."""
        result = self.encode_requests([texts], [truncate])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def encode_requests(
        self, requests: list[list[str]], truncate: list[bool]
    ) -> list[tuple[np.ndarray, np.ndarray] | SequenceTooLongError]:
        """Tokenize the texts of many requests in one parallel call per truncation setting."""
        results: list = [None] * len(requests)
        for tokenizer, wanted in ((self._truncating, True), (self._full, False)):
            indices = [index for index, flag in enumerate(truncate) if flag == wanted]
            texts = [text for index in indices for text in requests[index]]
            if not texts:
                continue
            if sum(map(len, texts)) <= SERIAL_MAX_CHARS:
                encodings = [tokenizer.encode(text, add_special_tokens=True) for text in texts]
            else:
                # encode_batch_fast: the same ids without character offsets, which we never read and
                # which cost 37% of the time on an XLM-R-sized Unigram vocabulary (1.27 -> 0.80
                # us/token; benchmarks/serve_bench_setup.py's tokenizer). Older tokenizers lack it.
                encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
                encodings = encode_batch(texts, add_special_tokens=True)
            offset = 0
            for index in indices:
                count = len(requests[index])
                results[index] = self._to_arrays(encodings[offset : offset + count])
                offset += count
        return results

    def _to_arrays(self, encodings) -> tuple[np.ndarray, np.ndarray] | SequenceTooLongError:
        if len(encodings) == 1:  # most requests (one query): no padding, 2 us instead of 12
            input_ids = np.array(encodings[0].ids, dtype=np.int64)[None, :]  # [1, L]
            if input_ids.shape[1] > self.max_seq_len:
                return self._too_long(0, input_ids.shape[1])
            return input_ids, np.ones_like(input_ids)
        ids = [encoding.ids for encoding in encodings]  # one list per text: the only per-token Python
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        too_long = np.flatnonzero(lengths > self.max_seq_len)
        if too_long.size:
            return self._too_long(int(too_long[0]), int(lengths[too_long[0]]))
        mask = np.arange(lengths.max())[None, :] < lengths[:, None]  # [n, L] right padding
        input_ids = np.full(mask.shape, self.pad_token_id, dtype=np.int64)
        input_ids[mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return input_ids, mask.astype(np.int64)

    def _too_long(self, index: int, length: int) -> SequenceTooLongError:
        return SequenceTooLongError(
            f"text {index} is {length} tokens, more than max_seq_len={self.max_seq_len}; send truncate=true to cut it"
        )
