"""The embedding engine: validated requests in, one embedding array or one error per request out.

`model.py` of the Triton `encoder` model is a thin adapter around `EmbeddingEngine.embed`; tests
and benchmarks call the same method in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .attention import select_attention_backend
from .checkpoint import read_encoder_config, read_sentence_transformers_settings, resolve_model_path
from .config import EncoderConfig, RequestOptions, ServingConfig
from .encoder import PackedEncoder, load_packed_encoder
from .errors import AdapterError, ConfigurationError, InvalidInputError, RequestError
from .lora.metrics import AdapterCounters, AdapterMetrics
from .lora.registry import BASE_ADAPTER_ID, create_adapter_registry
from .cuda_graphs import GraphedForward
from .packing import PackedBatch, PackingRows, pack_rows, plan_row_batches, to_device
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


class EmbeddingEngine:
    def __init__(self, serving: ServingConfig, device: torch.device | str = "cpu"):
        self.serving = serving
        self.device = torch.device(device)
        self.settings = ModelSettings.resolve(serving)
        # What a request without parameters gets (most requests): parsed once, not per request.
        self._default_options = RequestOptions.from_parameters({}, self.settings.default_normalize, self.hidden_size)
        self.dtype = resolve_dtype(serving.dtype, self.device)
        self.attention_backend = select_attention_backend(serving.attention, self.device, self.dtype)
        self.model: PackedEncoder = load_packed_encoder(
            self.settings.model_path, self.settings.encoder_config, self.dtype, self.device, self.attention_backend
        )
        self.adapters = create_adapter_registry(self.model, serving) or BaseModelOnly()
        self.graphed = None
        if self.device.type == "cuda" and serving.cuda_graph_max_tokens:
            self.graphed = GraphedForward(
                self.model, self.settings.pooling, self.settings.encoder_config.position_offset,
                min(serving.cuda_graph_max_tokens, serving.max_batch_tokens), self.settings.max_seq_len,
                getattr(self.adapters, "layers", None),
            )

    def describe(self) -> str:
        return (
            f"model={self.settings.model_path} device={self.device} dtype={str(self.dtype).removeprefix('torch.')} "
            f"attention={self.attention_backend} pooling={self.settings.pooling} max_seq_len={self.settings.max_seq_len}"
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
        valid: dict[int, _ValidRequest] = {}
        for index, request in enumerate(requests):
            try:
                valid[index] = self.validate(request)
            except RequestError as error:
                results[index] = error
        for group in self._groups_within_adapter_slots(valid, results):
            self._embed_group(group, results)
        return results  # type: ignore[return-value]

    def _groups_within_adapter_slots(
        self, valid: dict[int, _ValidRequest], results: list
    ) -> list[dict[int, _ValidRequest]]:
        """Requests in arrival order, cut so no group names more distinct adapters than fit in device
        slots at once; a request that alone names more gets an AdapterError."""
        limit = self.adapters.max_adapters_per_batch
        if limit is None:
            return [valid] if valid else []
        groups: list[dict[int, _ValidRequest]] = []
        current: dict[int, _ValidRequest] = {}
        current_ids: set[str] = set()
        for index, request in valid.items():
            adapter_ids = set(request.adapter_ids) - {BASE_ADAPTER_ID}
            if len(adapter_ids) > limit:
                results[index] = AdapterError(
                    f"the request names {len(adapter_ids)} different adapters; at most max_adapters={limit} "
                    "fit on the device at once"
                )
                continue
            if current and len(current_ids | adapter_ids) > limit:
                groups.append(current)
                current, current_ids = {}, set()
            current[index] = request
            current_ids |= adapter_ids
        if current:
            groups.append(current)
        return groups

    def _embed_group(self, valid: dict[int, _ValidRequest], results: list) -> None:
        """Resolve the group's adapters to slots, run its forward passes, fill in its results."""
        valid = dict(valid)
        wanted = {adapter_id for request in valid.values() for adapter_id in request.adapter_ids}
        try:
            slots = self.adapters.acquire(wanted)
            for index, request in list(valid.items()):
                failures = [slots[a] for a in dict.fromkeys(request.adapter_ids) if isinstance(slots[a], AdapterError)]
                if failures:
                    results[index] = failures[0]
                    del valid[index]
            pooled = self._forward(valid, slots)
        finally:
            self.adapters.release()
        self.adapters.count_requests(request.adapter_ids for request in valid.values())
        # Requests with the default options share one normalization over all their rows.
        shared = [index for index, request in valid.items() if request.options == self._default_options]
        if len(shared) > 1:
            finalized = finalize_embeddings(torch.cat([pooled[index] for index in shared]), None, self._default_options.normalize)
            for index, rows in zip(shared, finalized.split([len(valid[index].lengths) for index in shared])):
                results[index] = rows.numpy()
        for index, request in valid.items():
            if results[index] is None:
                embeddings = finalize_embeddings(pooled[index], request.options.dimensions, request.options.normalize)
                results[index] = embeddings.numpy()

    @torch.inference_mode()
    def _forward(self, valid: dict[int, _ValidRequest], slots: Mapping[str, int | AdapterError]) -> dict[int, torch.Tensor]:
        """Pooled float32 rows per request; the rows of all requests share forward passes."""
        if not valid:
            return {}
        first_row, count = {}, 0  # request index -> its first row in `pooled`
        slot_parts = []
        for index, request in valid.items():
            first_row[index] = count
            count += len(request.lengths)
            if len(set(request.adapter_ids)) == 1:
                slot_parts.append(np.full(len(request.lengths), slots[request.adapter_ids[0]], dtype=np.int64))
            else:
                slot_parts.append(np.array([slots[a] for a in request.adapter_ids], dtype=np.int64))
        rows = PackingRows.concatenate(
            [request.token_ids for request in valid.values()], [request.lengths for request in valid.values()], slot_parts
        )
        # Rows stay on the device until the last batch is queued: no host sync between forward
        # passes, so packing the next batch overlaps the device running the previous one.
        pooled = torch.empty(count, self.hidden_size, device=self.device)  # [N, H], request order
        for selected in plan_row_batches(rows.lengths, rows.slots, self.serving.max_batch_tokens):
            host = pack_rows(rows, selected, self.settings.encoder_config.position_offset)
            graph_bucket = self.graphed.bucket(host) if self.graphed is not None else None
            if graph_bucket is not None:
                # Bookkeeping only: the graph takes the batch's adapters as device inputs.
                self.adapters.activate(PackedBatch.host_summary(host), plan_layers=False)
                batch_rows = self.graphed.pooled(host, graph_bucket)  # [B, H] float32, a CUDA graph replay
            else:
                batch = to_device(host, self.device)
                self.adapters.activate(batch)
                batch_rows = pool(self.model(batch), batch, self.settings.pooling)  # [B, H] float32
            pooled.index_copy_(0, torch.from_numpy(selected).to(self.device, non_blocking=True), batch_rows)
        pooled = pooled.cpu()
        return {index: pooled[start : start + len(valid[index].lengths)] for index, start in first_row.items()}
