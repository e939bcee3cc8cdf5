"""The embedding engine: validated requests in, one embedding array or one error per request out.

`model.py` of the Triton `encoder` model is a thin adapter around `EmbeddingEngine.embed`; tests
and benchmarks call the same method in-process.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .attention import select_attention_backend
from .checkpoint import read_encoder_config, read_sentence_transformers_settings, resolve_model_path
from .config import EncoderConfig, RequestOptions, ServingConfig
from .encoder import PackedEncoder, load_packed_encoder
from .fused_ops import EPILOGUE_ACTIVATIONS
from .errors import AdapterError, ConfigurationError, InvalidInputError, RequestError, WarmupError
from .lora.metrics import AdapterCounters, AdapterMetrics
from .lora.registry import BASE_ADAPTER_ID, create_adapter_registry
from .cublaslt import CublasLtError, TuningOutcome, forget_tuning, tune_linears, tuning_supported
from .cuda_graphs import GraphedForward
from .packing import HostPackedArrays, PackedBatch, PackingRows, offsets, pack_rows, plan_row_batches, to_device
from .pooling import finalize_embeddings, pool

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelSettings:
    """What the tokenizer and the encoder both need to agree on, resolved from the checkpoint."""

    model_path: Path
    encoder_config: EncoderConfig
    pooling: str
    default_normalize: bool
    max_seq_len: int

    @classmethod
    def resolve(cls, serving: ServingConfig) -> "ModelSettings":
        model_path = resolve_model_path(serving.model, serving.revision)
        encoder_config = read_encoder_config(model_path)
        st_settings = read_sentence_transformers_settings(model_path)
        pooling = serving.pooling if serving.pooling != "auto" else (st_settings.pooling or "cls")
        normalize = serving.normalize if serving.normalize is not None else st_settings.normalize
        model_limit = encoder_config.max_sequence_length
        default_len = min(model_limit, st_settings.max_seq_length or model_limit)
        max_seq_len = serving.max_seq_len or default_len
        if max_seq_len > model_limit:
            raise ConfigurationError(f"max_seq_len={max_seq_len} exceeds the model's limit of {model_limit} tokens")
        if max_seq_len > serving.max_batch_tokens:
            raise ConfigurationError(
                f"max_batch_tokens={serving.max_batch_tokens} must be at least max_seq_len={max_seq_len}"
            )
        return cls(model_path, encoder_config, pooling, normalize, max_seq_len)


@dataclass
class EncoderRequest:
    """Token ids of one request: [n, L] right-padded, one adapter id per row (or one for all)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    adapter_ids: Sequence[str] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _ValidRequest:
    token_ids: np.ndarray  # [sum of lengths] int64: the rows' real tokens, back to back
    lengths: np.ndarray  # [n]
    adapter_ids: list[str]
    options: RequestOptions


@dataclass
class _ValidRequests:
    """Validated requests in arrival order as flat arrays, so a call of many one-text requests
    costs no numpy call and no object per request (PackingRows' idea, one level up)."""

    indices: list[int]  # [R] each request's position in the embed call
    options: list[RequestOptions]  # [R]
    rows: np.ndarray  # [R] int64 texts per request
    token_ids: np.ndarray  # [T] int64 every row's real tokens, back to back
    lengths: np.ndarray  # [N] int64 tokens per row, N = rows.sum()
    row_adapters: list[str]  # [N] adapter id of each row

    @classmethod
    def concatenate(cls, parts: list["_ValidRequests"]) -> "_ValidRequests":
        if len(parts) == 1:
            return parts[0]
        return cls(
            [index for part in parts for index in part.indices],
            [options for part in parts for options in part.options],
            np.concatenate([part.rows for part in parts]),
            np.concatenate([part.token_ids for part in parts]),
            np.concatenate([part.lengths for part in parts]),
            [adapter_id for part in parts for adapter_id in part.row_adapters],
        )

    @classmethod
    def of_request(cls, index: int, request: _ValidRequest) -> "_ValidRequests":
        rows = np.array([len(request.lengths)], dtype=np.int64)
        return cls([index], [request.options], rows, request.token_ids, request.lengths, request.adapter_ids)

    def row_starts(self) -> np.ndarray:
        """[R+1] each request's first row, and N."""
        return offsets(self.rows)

    def adapter_ids_per_request(self) -> Iterable[Sequence[str]]:
        if len(set(self.row_adapters)) == 1:  # one adapter for every row (the base model, mostly)
            return itertools.repeat(self.row_adapters[:1], len(self.indices))
        starts = self.row_starts().tolist()
        return [self.row_adapters[start:end] for start, end in zip(starts, starts[1:])]

    def select(self, positions: list[int]) -> "_ValidRequests":
        """The requests at these positions (of this set), in this order."""
        row_starts = self.row_starts().tolist()
        token_starts = offsets(self.lengths)
        rows = [slice(row_starts[p], row_starts[p + 1]) for p in positions]
        return _ValidRequests(
            [self.indices[p] for p in positions],
            [self.options[p] for p in positions],
            self.rows[positions],
            np.concatenate([self.token_ids[token_starts[r.start] : token_starts[r.stop]] for r in rows] or [self.token_ids[:0]]),
            np.concatenate([self.lengths[r] for r in rows] or [self.lengths[:0]]),
            [adapter_id for r in rows for adapter_id in self.row_adapters[r]],
        )


class BaseModelOnly:
    """Adapter resolution when no LoRA registry is configured: only the base model is served.

    The interface every registry has (`lora.registry.AdapterRegistry`, `MergedAdapterRegistry`).
    """

    max_adapters_per_batch: int | None = None  # None: no limit on distinct adapters per group

    def __init__(self) -> None:
        self.counters = AdapterCounters()

    def acquire(self, adapter_ids: set[str]) -> dict[str, int | AdapterError]:
        return {
            adapter_id: 0
            if adapter_id == BASE_ADAPTER_ID
            else AdapterError(f"adapter {adapter_id!r} is not available: this server has no adapters configured")
            for adapter_id in adapter_ids
        }

    def activate(self, batch: PackedBatch, plan_layers: bool = True) -> None:  # no LoRA layers to point at the batch
        self.counters.count_batch(batch, lambda slot: BASE_ADAPTER_ID)

    def release(self) -> None:
        pass

    def count_requests(self, adapter_ids_per_request) -> None:
        self.counters.count_requests(adapter_ids_per_request)

    def snapshot(self) -> AdapterMetrics:
        return self.counters.snapshot(resident=0, capacity=0)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_gelu_approximation(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": "tanh" for bfloat16 on CUDA (cuBLASLt's GELU epilogue; the approximation's largest
    difference, 4.7e-4 at x = 2.70, is 1/16 of bfloat16's largest rounding error there), else "none"."""
    if name == "auto":
        return "tanh" if device.type == "cuda" and dtype == torch.bfloat16 else "none"
    return name


def _resolve_auto_bool(parameter: str, value: str, auto: bool) -> bool:
    """A parameter parsed to "auto", "true" or "false" (`config._parse_auto_bool`): `auto` for "auto"."""
    if value not in ("auto", "true", "false"):
        raise ConfigurationError(f"{parameter}={value!r} is not auto, true or false")
    return auto if value == "auto" else value == "true"


def resolve_warmup(name: str, device: torch.device) -> bool:
    """"auto": warm up on CUDA, where the first batches would otherwise compile kernels and capture
    graphs; not on a CPU, where there is nothing to compile. Else "true" or "false" (as parsed)."""
    return _resolve_auto_bool("warmup", name, device.type == "cuda")


def resolve_gemm_tuning(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """"auto": tune where cuBLASLt runs the linears (CUDA, 16-bit floats); "true" tunes there too
    and is a no-op elsewhere; "false" never tunes."""
    return _resolve_auto_bool("gemm_tuning", name, True) and tuning_supported(device, dtype)


def linear_shapes(config: EncoderConfig) -> list[tuple[int, int, str | None]]:
    """(out features, in features, epilogue) of each linear of a layer, as `cublaslt.tune_linears`
    takes them: Q/K/V, attention.output.dense, intermediate.dense (its activation in the epilogue
    where `fused_ops.linear_activation` puts it there) and output.dense."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    use_gelu = EPILOGUE_ACTIVATIONS.get(config.hidden_act)
    epilogue = None if use_gelu is None else "gelu" if use_gelu else "relu"
    return [(3 * hidden, hidden, None), (hidden, hidden, None), (intermediate, hidden, epilogue), (hidden, intermediate, None)]


class EmbeddingEngine:
    def __init__(self, serving: ServingConfig, device: torch.device | str = "cpu"):
        self.serving = serving
        self.device = torch.device(device)
        self.settings = ModelSettings.resolve(serving)
        # What a request without parameters gets (most requests): parsed once, not per request.
        self._default_options = RequestOptions.from_parameters({}, self.settings.default_normalize, self.hidden_size)
        self.dtype = resolve_dtype(serving.dtype, self.device)
        self.attention_backend = select_attention_backend(serving.attention, self.device, self.dtype)
        started = time.perf_counter()
        self.gelu_approximation = resolve_gelu_approximation(serving.gelu_approximation, self.device, self.dtype)
        self.model: PackedEncoder = load_packed_encoder(
            self.settings.model_path, self.settings.encoder_config.with_gelu_approximation(self.gelu_approximation),
            self.dtype, self.device, self.attention_backend,
        )
        loaded = time.perf_counter()
        self.adapters = create_adapter_registry(self.model, serving) or BaseModelOnly()
        # Seconds spent loading the checkpoint onto the device and the adapter registry (its
        # adapter_preload included); the encoder model logs them at start.
        self.startup_seconds = {"model": loaded - started, "adapters": time.perf_counter() - loaded}
        # Before any CUDA graph is captured: the graphs record the GEMMs' algorithms.
        # The kept algorithms are the process's (fused_ops' GEMMs have no engine): the last engine
        # built decides whether they run.
        self.gemm_tuning: list[TuningOutcome] = []
        self.gemm_tuning_error = ""  # why the tuning failed, if it did
        forget_tuning()
        if resolve_gemm_tuning(serving.gemm_tuning, self.device, self.dtype):
            tuning_started = time.perf_counter()
            try:
                self.gemm_tuning = tune_linears(
                    linear_shapes(self.model.config), serving.max_batch_tokens, self.device, self.dtype
                )
            except (CublasLtError, OSError, AttributeError) as error:  # a speed-up only: serve on torch's GEMMs
                forget_tuning()
                self.gemm_tuning_error = f"{type(error).__name__}: {error}"
            self.startup_seconds["GEMM tuning"] = time.perf_counter() - tuning_started
        self.graphed = None
        if self.device.type == "cuda" and serving.cuda_graph_max_tokens:
            self.graphed = GraphedForward(
                self.model, self.settings.pooling, self.settings.encoder_config.position_offset,
                min(serving.cuda_graph_max_tokens, serving.max_batch_tokens), self.settings.max_seq_len,
                getattr(self.adapters, "layers", None), serving.cuda_graph_max_graphs,
            )

    def describe(self) -> str:
        return (
            f"model={self.settings.model_path} device={self.device} dtype={str(self.dtype).removeprefix('torch.')} "
            f"attention={self.attention_backend} activation={self.model.config.hidden_act} pooling={self.settings.pooling} max_seq_len={self.settings.max_seq_len}"
            f" gemm_tuning={self.describe_gemm_tuning()}"
        )

    def describe_gemm_tuning(self) -> str:
        """"off", or each linear shape's time with torch's pick and with the fastest candidate."""
        if self.gemm_tuning_error:
            return f"failed ({self.gemm_tuning_error}), torch's GEMMs"
        if not self.gemm_tuning:
            return "off"
        return "[" + "; ".join(outcome.describe() for outcome in self.gemm_tuning) + "]"

    @property
    def warmup_enabled(self) -> bool:
        """Whether the server should call `warm_up` before it reports ready (the `warmup` parameter)."""
        return resolve_warmup(self.serving.warmup, self.device)

    def warm_up(self) -> float:
        """Embed one batch of each kind the server will see, so that the first requests do not pay
        for what a first batch costs: Triton compiles each kernel on its first call (unless its cache
        on disk has it), cuBLAS picks its algorithms, and a CUDA graph is captured per new bucket. The
        batches: one 16-token query, and a full batch of 144-token passages (at the default
        `max_batch_tokens`, 113 rows of 16,272 tokens: the graph bucket of full batches of passages
        that average 128 to 255 tokens); with adapters resident (`adapter_preload`), the same full
        batch split between two of them (the segmented LoRA kernels, the GEMMs with the expand in
        their epilogue), two queries of two adapters, and one query of one adapter (merged per
        linear). Every kernel is then compiled; batches of other buckets still capture their graph
        when first seen. The forward passes, texts and tokens the metrics publish start after it;
        the graphs it captured stay, and so do their counts. Raises WarmupError if a batch fails
        while the device still works (the encoder model logs it and serves without the warm-up),
        and the device's own error if it does not (the model then fails to load). Returns the
        seconds it took (also in `startup_seconds["warm-up"]`)."""
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        vocab_size = self.settings.encoder_config.vocab_size

        def requests(lengths: list[int], adapter_ids: list[str] | None = None) -> list[EncoderRequest]:
            """Rows of these lengths (and adapters), in requests of at most max_texts_per_request rows."""
            step = self.serving.max_texts_per_request
            batch = []
            for start in range(0, len(lengths), step):
                part = lengths[start : start + step]
                width = max(part)
                mask = (np.arange(width)[None, :] < np.array(part)[:, None]).astype(np.int64)
                ids = rng.integers(min(5, vocab_size - 1), vocab_size, (len(part), width)) * mask
                part_ids = None if adapter_ids is None else adapter_ids[start : start + step]
                batch.append(EncoderRequest(ids, mask, part_ids, {"normalize": False}))
            return batch

        passage_length = min(144, self.settings.max_seq_len)
        full_batch = [passage_length] * max(1, self.serving.max_batch_tokens // passage_length)
        query = [min(16, self.settings.max_seq_len)]
        batches = [requests(query), requests(full_batch)]
        resident = list(getattr(self.adapters, "resident_adapters", list)())
        if resident:
            pair = (resident + [BASE_ADAPTER_ID])[:2]  # two adapters, or one beside the base model
            half = len(full_batch) // 2
            batches += [
                requests(full_batch, [pair[0]] * half + [pair[1]] * (len(full_batch) - half)),
                requests(query * 2, list(pair)),
                requests(query, resident[:1]),
            ]
        try:
            for batch in batches:
                results = self.embed(batch)
                failed = next((result for result in results if isinstance(result, Exception)), None)
                if failed is not None:
                    rows = sum(len(request.input_ids) for request in batch)
                    raise WarmupError(f"the warm-up batch of {rows} texts failed: {failed}")
        except WarmupError:
            raise
        except Exception as error:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a device left broken raises here, not a WarmupError
            raise WarmupError(f"the warm-up failed: {type(error).__name__}: {error}") from error
        finally:
            self.adapters.counters.reset_usage()
            if self.graphed is not None:
                self.graphed.replays = 0
        seconds = time.perf_counter() - started
        self.startup_seconds["warm-up"] = seconds
        return seconds

    def metrics_snapshot(self) -> AdapterMetrics:
        """What the serving metrics publish: the adapter registry's counters and the CUDA graphs'."""
        snapshot = self.adapters.snapshot()
        graphed = self.graphed
        if graphed is None:
            return snapshot
        return replace(
            snapshot, graph_replays=graphed.replays, graph_captures=graphed.captures,
            graph_evictions=graphed.evictions, graphs_resident=len(graphed.graphs),
        )

    @property
    def hidden_size(self) -> int:
        return self.settings.encoder_config.hidden_size

    def validate(self, request: EncoderRequest) -> _ValidRequest:
        """Check one request's tensors and parameters; raise a RequestError naming the problem."""
        options = (
            self._default_options
            if not request.parameters
            else RequestOptions.from_parameters(request.parameters, self.settings.default_normalize, self.hidden_size)
        )
        ids, mask = np.asarray(request.input_ids), np.asarray(request.attention_mask)
        if ids.ndim != 2 or mask.ndim != 2:
            raise InvalidInputError(f"INPUT_IDS and ATTENTION_MASK must be [n, L]; got {ids.shape} and {mask.shape}")
        if ids.shape != mask.shape:
            raise InvalidInputError(f"INPUT_IDS shape {ids.shape} differs from ATTENTION_MASK shape {mask.shape}")
        if ids.dtype.kind not in "iu" or mask.dtype.kind not in "iu":  # integers (not bool)
            raise InvalidInputError(f"INPUT_IDS and ATTENTION_MASK must be integers; got {ids.dtype}, {mask.dtype}")
        rows, width = ids.shape
        if rows == 0 or width == 0:
            raise InvalidInputError(f"empty request: shape {ids.shape}")
        if rows > self.serving.max_texts_per_request:
            raise InvalidInputError(
                f"{rows} texts in one request, more than max_texts_per_request={self.serving.max_texts_per_request}"
            )
        mask_min, mask_max = mask.min(), mask.max()
        if mask_min < 0 or mask_max > 1:
            raise InvalidInputError("ATTENTION_MASK values must be 0 or 1")
        if mask_min == 1:  # no padding (one text, or texts of one length): every row is `width` tokens
            lengths = np.full(rows, width, dtype=np.int64)
            real_ids = ids.reshape(-1)
        else:
            lengths = mask.sum(axis=1)
            for row in np.flatnonzero(lengths == 0):
                raise InvalidInputError(f"row {row} has an all-zero attention mask (no tokens)")
            right_padded = mask == (np.arange(width)[None, :] < lengths[:, None])
            for row in np.flatnonzero(~right_padded.all(axis=1)):
                raise InvalidInputError(f"row {row}: ATTENTION_MASK must be ones followed by zeros (right padding)")
            real_ids = ids[mask.astype(bool)]
        for row in np.flatnonzero(lengths > self.settings.max_seq_len):
            raise InvalidInputError(
                f"row {row} is {lengths[row]} tokens, more than max_seq_len={self.settings.max_seq_len}"
            )
        vocab_size = self.settings.encoder_config.vocab_size
        if real_ids.min() < 0 or real_ids.max() >= vocab_size:
            raise InvalidInputError(
                f"token ids must be in [0, {vocab_size}); got values from {real_ids.min()} to {real_ids.max()}"
            )
        adapter_ids = list(request.adapter_ids) if request.adapter_ids is not None else [BASE_ADAPTER_ID]
        if len(adapter_ids) == 1:
            adapter_ids = adapter_ids * rows
        if len(adapter_ids) != rows:
            raise InvalidInputError(f"{len(adapter_ids)} adapter ids for {rows} texts (send one per text, or one)")
        return _ValidRequest(real_ids.astype(np.int64, copy=False), lengths.astype(np.int64), adapter_ids, options)

    def embed(self, requests: Sequence[EncoderRequest]) -> list[np.ndarray | RequestError]:
        """One float32 [n, dims] array per request, or the RequestError that request earned."""
        results: list[np.ndarray | RequestError | None] = [None] * len(requests)
        valid = self._validate_all(requests, results)
        for group in self._groups_within_adapter_slots(valid, results):
            self._embed_group(group, results)
        return results  # type: ignore[return-value]

    def _validate_all(self, requests: Sequence[EncoderRequest], results: list) -> _ValidRequests:
        """`validate` for every request, in arrival order. Requests without parameters, with one
        adapter id or one per row, and [n, L] signed-integer inputs ("plain": what the tokenizer
        sends, padded or not) are checked together, a few numpy calls for all of them; a plain
        request that fails those checks (a mask that is not right padding, an id out of range)
        goes through `validate`, which names its problem."""
        max_rows, max_len = self.serving.max_texts_per_request, self.settings.max_seq_len
        plain: list[int] = []
        ids_per_row = False  # some plain request names one adapter per row
        for index, request in enumerate(requests):
            ids, mask, adapter_ids = request.input_ids, request.attention_mask, request.adapter_ids
            if (
                not request.parameters
                and type(ids) is np.ndarray and type(mask) is np.ndarray and ids.ndim == 2 and ids.shape == mask.shape
                and ids.dtype.kind == "i" and mask.dtype.kind == "i"
                and 0 < ids.shape[0] <= max_rows and 0 < ids.shape[1] <= max_len
                and (adapter_ids is None or len(adapter_ids) == 1 or len(adapter_ids) == ids.shape[0])
            ):
                plain.append(index)
                ids_per_row = ids_per_row or (adapter_ids is not None and len(adapter_ids) > 1)
        plain_part, plain_ok = self._validate_plain([requests[index] for index in plain], plain, ids_per_row)
        if len(plain_ok) == len(requests):
            return plain_part
        parts, run_start, position = [], 0, 0  # plain_part's requests between others, as runs
        ok = set(plain_ok)
        for index, request in enumerate(requests):
            if index in ok:
                position += 1
                continue
            if position > run_start:
                parts.append(plain_part.select(list(range(run_start, position))))
            run_start = position
            try:
                parts.append(_ValidRequests.of_request(index, self.validate(request)))
            except RequestError as error:
                results[index] = error
        if position > run_start:
            parts.append(plain_part.select(list(range(run_start, position))))
        return _ValidRequests.concatenate(parts) if parts else plain_part.select([])

    def _validate_plain(
        self, requests: list[EncoderRequest], indices: list[int], ids_per_row: bool
    ) -> tuple[_ValidRequests, list[int]]:
        """The plain requests that `validate` accepts, checked together, and their indices: masks of
        0s and 1s, right padding, no empty row, real token ids in the vocabulary (padding
        positions may hold any id). Widths were checked against max_seq_len by the caller.
        `ids_per_row`: some request names one adapter per row (else one or none each)."""
        empty = np.zeros(0, dtype=np.int64)
        if not requests:
            return _ValidRequests([], [], empty, empty, empty, []), []
        rows = np.array([request.input_ids.shape[0] for request in requests], dtype=np.int64)  # [R]
        widths = np.array([request.input_ids.shape[1] for request in requests], dtype=np.int64)  # [R]
        ids = np.concatenate([request.input_ids.reshape(-1) for request in requests])  # [sum of n * L]
        mask = np.concatenate([request.attention_mask.reshape(-1) for request in requests])
        element_starts = offsets(rows * widths)  # [R+1] each request's first element, then the total
        starts = element_starts[:-1]
        mask_min = np.minimum.reduceat(mask, starts)  # [R]
        ok = (mask_min >= 0) & (np.maximum.reduceat(mask, starts) <= 1)
        if (mask_min == 0).any():  # some padding (or a bad mask)
            request_rows = offsets(rows)  # [R+1] each request's first row, then N
            row_starts = offsets(np.repeat(widths, rows))[:-1]  # [N] each row's first element
            real = mask != 0
            lengths = np.add.reduceat(real, row_starts, dtype=np.int64)  # [N]
            ok &= np.minimum.reduceat(lengths, request_rows[:-1]) > 0  # no all-zero row
            # Right padding: along the flat mask, a 0 followed by a 1 only where a new row starts.
            rises = np.flatnonzero(mask[1:] > mask[:-1]) + 1
            inside = rises[row_starts[np.searchsorted(row_starts, rises, side="right") - 1] != rises]
            ok[np.searchsorted(starts, inside, side="right") - 1] = False
            token_ids = ids[real]
            token_starts = offsets(np.add.reduceat(lengths, request_rows[:-1]))  # [R+1] over token_ids
        else:  # every row `width` tokens
            lengths = np.repeat(widths, rows)
            token_ids, token_starts = ids, element_starts
        # Real tokens' ids in the vocabulary (padding positions may hold any id). A request without
        # tokens (rejected above) may start at the end: it reads the last token instead.
        if len(token_ids):
            first_tokens = np.minimum(token_starts[:-1], len(token_ids) - 1)
            vocab_size = self.settings.encoder_config.vocab_size
            ok &= (np.minimum.reduceat(token_ids, first_tokens) >= 0) & (np.maximum.reduceat(token_ids, first_tokens) < vocab_size)
        if not ok.all():
            token_ids = token_ids[np.repeat(ok, np.diff(token_starts))]
            lengths = lengths[np.repeat(ok, rows)]
            rows = rows[ok]
            keep = np.flatnonzero(ok).tolist()
            indices, requests = [indices[k] for k in keep], [requests[k] for k in keep]
        first = [BASE_ADAPTER_ID if request.adapter_ids is None else request.adapter_ids[0] for request in requests]
        if not ids_per_row and np.all(rows == 1):  # one text per request (most calls): one row per adapter id
            row_adapters = first
        else:  # a request's own ids where it names one per row, else its one id (or none) on every row
            row_adapters = [
                adapter_id
                for request, first_id, n in zip(requests, first, rows.tolist())
                for adapter_id in (request.adapter_ids if ids_per_row and request.adapter_ids is not None
                                   and len(request.adapter_ids) == n else [first_id] * n)
            ]
        options = [self._default_options] * len(indices)
        valid = _ValidRequests(indices, options, rows, token_ids.astype(np.int64, copy=False), lengths.astype(np.int64, copy=False), row_adapters)
        return valid, indices

    def _groups_within_adapter_slots(self, valid: _ValidRequests, results: list) -> list[_ValidRequests]:
        """Requests in arrival order, cut so no group names more distinct adapters than fit in device
        slots at once; a request that alone names more gets an AdapterError."""
        if not valid.indices:
            return []
        limit = self.adapters.max_adapters_per_batch
        if limit is None or len(set(valid.row_adapters) - {BASE_ADAPTER_ID}) <= limit:
            return [valid]  # every request fits, and all of them together
        groups: list[list[int]] = []
        current: list[int] = []
        current_ids: set[str] = set()
        for position, request_ids in enumerate(valid.adapter_ids_per_request()):
            adapter_ids = set(request_ids) - {BASE_ADAPTER_ID}
            if len(adapter_ids) > limit:
                results[valid.indices[position]] = AdapterError(
                    f"the request names {len(adapter_ids)} different adapters; at most max_adapters={limit} "
                    "fit on the device at once"
                )
                continue
            if current and len(current_ids | adapter_ids) > limit:
                groups.append(current)
                current, current_ids = [], set()
            current.append(position)
            current_ids |= adapter_ids
        if current:
            groups.append(current)
        return [valid.select(group) for group in groups]

    def _embed_group(self, valid: _ValidRequests, results: list) -> None:
        """Resolve the group's adapters to slots, run its forward passes, fill in its results."""
        try:
            slots = self.adapters.acquire(set(valid.row_adapters))
            if any(isinstance(slot, AdapterError) for slot in slots.values()):
                keep = []
                for position, request_ids in enumerate(valid.adapter_ids_per_request()):
                    failures = [slots[a] for a in dict.fromkeys(request_ids) if isinstance(slots[a], AdapterError)]
                    if failures:
                        results[valid.indices[position]] = failures[0]
                    else:
                        keep.append(position)
                valid = valid.select(keep)
            pooled = self._forward(valid, slots)  # [N, H]
        finally:
            self.adapters.release()
        self.adapters.count_requests(valid.adapter_ids_per_request())
        row_starts = valid.row_starts().tolist()
        default = self._default_options
        shared = [position for position, options in enumerate(valid.options) if options is default or options == default]
        if len(shared) == len(valid.indices):  # every request has the default options: one normalization
            finalized = finalize_embeddings(pooled, None, default.normalize).numpy()
            for index, start, end in zip(valid.indices, row_starts, row_starts[1:]):
                results[index] = finalized[start:end]
            return
        # Requests with the default options share one normalization over all their rows.
        if len(shared) > 1:
            rows = np.concatenate([np.arange(row_starts[p], row_starts[p + 1]) for p in shared])
            finalized = finalize_embeddings(pooled[torch.from_numpy(rows)], None, default.normalize).numpy()
            start = 0
            for position in shared:
                end = start + row_starts[position + 1] - row_starts[position]
                results[valid.indices[position]] = finalized[start:end]
                start = end
        for position, (index, options) in enumerate(zip(valid.indices, valid.options)):
            if results[index] is None:
                request_rows = pooled[row_starts[position] : row_starts[position + 1]]
                results[index] = finalize_embeddings(request_rows, options.dimensions, options.normalize).numpy()

    @torch.inference_mode()
    def _forward(self, valid: _ValidRequests, slots: Mapping[str, int | AdapterError]) -> torch.Tensor:
        """Pooled float32 rows [N, H] in the requests' row order; the rows of all requests share forward passes."""
        count = len(valid.lengths)
        if count == 0:
            return torch.empty(0, self.hidden_size)
        adapter_ids = set(valid.row_adapters)
        if len(adapter_ids) == 1:
            row_slots = np.full(count, slots[next(iter(adapter_ids))], dtype=np.int64)
        else:
            row_slots = np.fromiter(map(slots.__getitem__, valid.row_adapters), dtype=np.int64, count=count)
        rows = PackingRows.of(valid.token_ids, valid.lengths, row_slots)
        # Rows stay on the device until the last batch is queued: no host sync between forward
        # passes, so packing the next batch overlaps the device running the previous one.
        pooled = torch.empty(count, self.hidden_size, device=self.device)  # [N, H], request order
        for selected in plan_row_batches(rows.lengths, rows.slots, self.serving.max_batch_tokens):
            host = pack_rows(rows, selected, self.settings.encoder_config.position_offset)
            pooled.index_copy_(0, torch.from_numpy(selected).to(self.device, non_blocking=True), self.pooled_batch(host))
        return pooled.cpu()

    @torch.inference_mode()
    def pooled_batch(self, host: HostPackedArrays) -> torch.Tensor:
        """[B, H] float32 on the device: one packed batch's pooled rows, from a CUDA graph replay of
        its bucket where one applies, else the eager forward. Its adapter slots must be acquired. A
        replay's rows are a view of its graph's output, which the next replay of that bucket
        overwrites: read or copy them (stream-ordered) before the next call."""
        graph_bucket = self.graphed.bucket(host) if self.graphed is not None else None
        if graph_bucket is not None:
            # Bookkeeping only: the graph takes the batch's adapters as device inputs.
            self.adapters.activate(PackedBatch.host_summary(host), plan_layers=False)
            return self.graphed.pooled(host, graph_bucket)
        batch = to_device(host, self.device)
        self.adapters.activate(batch)
        return pool(self.model(batch), batch, self.settings.pooling)
