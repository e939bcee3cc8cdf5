"""Typed configuration, read once: the checkpoint's `config.json`, the serving parameters
(`config.pbtxt` parameters overridden by `LORAEMBED_*` environment variables) and the per-request
parameters. Nothing below this module reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigurationError, InvalidParameterError

# model_type values whose positions start at pad_token_id + 1 (fairseq convention kept by HF's
# RobertaEmbeddings.create_position_ids_from_input_ids).
PADDING_OFFSET_POSITION_TYPES = ("xlm-roberta", "roberta", "camembert")
ZERO_BASED_POSITION_TYPES = ("bert",)
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class EncoderConfig:
    """The architecture of a BERT or XLM-R/RoBERTa encoder, from HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    def with_gelu_approximation(self, approximation: str) -> "EncoderConfig":
        """This config with an exact GELU ("gelu") replaced by its tanh approximation when
        `approximation` is "tanh" (ServingConfig.gelu_approximation); other activations unchanged."""
        if approximation == "tanh" and self.hidden_act == "gelu":
            return dataclasses.replace(self, hidden_act="gelu_pytorch_tanh")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """Position id of a sequence's first token: pad_token_id + 1 for XLM-R, 0 for BERT."""
        if self.model_type in PADDING_OFFSET_POSITION_TYPES:
            return self.pad_token_id + 1
        return 0

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> "EncoderConfig":
        model_type = hf_config.get("model_type", "")
        problems = []
        if model_type not in PADDING_OFFSET_POSITION_TYPES + ZERO_BASED_POSITION_TYPES:
            problems.append(
                f"model_type {model_type!r} is not supported "
                f"(supported: {', '.join(PADDING_OFFSET_POSITION_TYPES + ZERO_BASED_POSITION_TYPES)})"
            )
        position_type = hf_config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            problems.append(f"position_embedding_type {position_type!r} is not supported (only 'absolute')")
        hidden_act = hf_config.get("hidden_act", "gelu")
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            problems.append(f"hidden_act {hidden_act!r} is not supported ({', '.join(SUPPORTED_ACTIVATIONS)})")
        if hf_config.get("hidden_size", 0) % max(hf_config.get("num_attention_heads", 1), 1):
            problems.append("hidden_size is not a multiple of num_attention_heads")
        if problems:
            raise ConfigurationError("unsupported checkpoint config: " + "; ".join(problems))
        return cls(
            model_type=model_type,
            vocab_size=int(hf_config["vocab_size"]),
            hidden_size=int(hf_config["hidden_size"]),
            num_hidden_layers=int(hf_config["num_hidden_layers"]),
            num_attention_heads=int(hf_config["num_attention_heads"]),
            intermediate_size=int(hf_config["intermediate_size"]),
            hidden_act=hidden_act,
            max_position_embeddings=int(hf_config["max_position_embeddings"]),
            type_vocab_size=int(hf_config.get("type_vocab_size", 2)),
            layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(hf_config.get("pad_token_id") or 0),
        )


def _parse_auto_bool(name: str, value: Any) -> str:
    """"auto", "true" or "false" (any spelling `_parse_bool` takes)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return "true" if _parse_bool(name, value) else "false"
    except ValueError:
        raise ValueError(f"{name}={value!r} is not auto, true or false") from None


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean (true/false)")


def _parse_optional_bool(name: str, value: Any) -> bool | None:
    if str(value).strip().lower() in ("", "auto"):
        return None
    return _parse_bool(name, value)


def _parse_int(name: str, value: Any, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"{name}={number} is below the minimum {minimum}")
    return number


def _parse_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return text


def _parse_id_list(value: Any) -> tuple[str, ...]:
    return tuple(item.strip() for item in str(value).split(",") if item.strip())


@dataclass(frozen=True)
class ServingConfig:
    """Serving parameters shared by the tokenizer and encoder models (see DESIGN.md)."""

    model: str = ""  # empty: the bundled sentence-transformers/all-MiniLM-L6-v2
    revision: str = "main"
    dtype: str = "auto"
    pooling: str = "auto"
    normalize: bool | None = None  # None: from the sentence-transformers files
    max_batch_tokens: int = 16384
    max_seq_len: int = 0  # 0: the model's limit
    attention: str = "auto"
    adapter_root: str = ""
    adapter_preload: tuple[str, ...] = ()
    max_adapters: int = 64
    max_lora_rank: int = 64
    allow_hub_adapters: bool = False
    merge_adapter: str = ""
    max_text_bytes: int = 1_000_000
    max_texts_per_request: int = 4096
    cuda_graph_max_tokens: int = 16384  # batches up to this size (adapters too) replay CUDA graphs; 0: never
    cuda_graph_max_graphs: int = 32  # graphs kept per encoder instance (least recently replayed go first)
    cpu_threads: int = 0  # torch threads of an instance; 0: 1 on a GPU, half the cores on a CPU (tokenizers share them)
    # "tanh": a checkpoint's exact GELU ("gelu") runs as the tanh approximation, which cuBLASLt applies
    # in the intermediate GEMM's epilogue instead of a separate pass; "auto": tanh in bfloat16 on a
    # GPU, where bfloat16's rounding hides the difference (README), exact elsewhere; "none": exact.
    gelu_approximation: str = "auto"
    # Run each kind of batch once before the model reports ready (EmbeddingEngine.warm_up): "auto"
    # on a GPU (kernel compilation, CUDA graph capture), "false" on a CPU; "true" / "false" force it.
    warmup: str = "auto"
    # Time the cuBLASLt algorithms its heuristic offers for each linear at load and keep the fastest
    # (cublaslt.py): "auto" and "true" on a GPU in 16-bit floats. Off by default until its kept
    # algorithms have run on a GPU (benchmarks/NOTES.md item 53).
    gemm_tuning: str = "false"

    ENV_PREFIX = "LORAEMBED_"

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> "ServingConfig":
        """Build from `config.pbtxt` parameters; `LORAEMBED_<NAME>` in `environ` overrides each.

        Unknown parameter names are an error (a typo would otherwise be ignored silently).
        """
        environ = os.environ if environ is None else environ
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(parameters) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown parameters {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        raw: dict[str, Any] = dict(parameters)
        for name in known:
            env_value = environ.get(cls.ENV_PREFIX + name.upper())
            if env_value is not None:
                raw[name] = env_value
        parsers = {
            "model": str,
            "revision": lambda v: str(v) or "main",
            "dtype": lambda v: _parse_choice("dtype", v, ("auto", "bfloat16", "float16", "float32")),
            "pooling": lambda v: _parse_choice("pooling", v, ("auto", "cls", "mean")),
            "normalize": lambda v: _parse_optional_bool("normalize", v),
            "max_batch_tokens": lambda v: _parse_int("max_batch_tokens", v, 1),
            "max_seq_len": lambda v: _parse_int("max_seq_len", v, 0),
            "attention": lambda v: _parse_choice(
                "attention", v, ("auto", "triton_packed", "flash_attn", "torch_varlen", "sdpa")
            ),
            "adapter_root": str,
            "adapter_preload": _parse_id_list,
            "max_adapters": lambda v: _parse_int("max_adapters", v, 1),
            "max_lora_rank": lambda v: _parse_int("max_lora_rank", v, 1),
            "allow_hub_adapters": lambda v: _parse_bool("allow_hub_adapters", v),
            "merge_adapter": lambda v: str(v).strip(),
            "max_text_bytes": lambda v: _parse_int("max_text_bytes", v, 1),
            "max_texts_per_request": lambda v: _parse_int("max_texts_per_request", v, 1),
            "cuda_graph_max_tokens": lambda v: _parse_int("cuda_graph_max_tokens", v, 0),
            "cuda_graph_max_graphs": lambda v: _parse_int("cuda_graph_max_graphs", v, 1),
            "cpu_threads": lambda v: _parse_int("cpu_threads", v, 0),
            "gelu_approximation": lambda v: _parse_choice("gelu_approximation", v, ("auto", "none", "tanh")),
            "warmup": lambda v: _parse_auto_bool("warmup", v),
            "gemm_tuning": lambda v: _parse_auto_bool("gemm_tuning", v),
        }
        values = {}
        problems = []
        for name, value in raw.items():
            try:
                values[name] = parsers[name](value)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            raise ConfigurationError("invalid configuration: " + "; ".join(problems))
        return cls(**values)


@dataclass(frozen=True)
class RequestOptions:
    """Per-request parameters of the public contract."""

    normalize: bool
    truncate: bool = True
    dimensions: int | None = None

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, Any], default_normalize: bool, hidden_size: int
    ) -> "RequestOptions":
        """Parse Triton request parameters (values may be bool, int or string)."""
        known = ("normalize", "truncate", "dimensions")
        try:
            normalize = _parse_bool("normalize", parameters.get("normalize", default_normalize))
            truncate = _parse_bool("truncate", parameters.get("truncate", True))
            dimensions = None
            if parameters.get("dimensions") not in (None, ""):
                value = parameters["dimensions"]
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(f"dimensions={value!r} is not an integer")
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"dimensions={value!r} is not an integer")
                dimensions = _parse_int("dimensions", int(value) if isinstance(value, float) else value, 1)
                if dimensions > hidden_size:
                    raise ValueError(f"dimensions={dimensions} is larger than the embedding size {hidden_size}")
        except ValueError as error:
            raise InvalidParameterError(f"{error} (request parameters: {', '.join(known)})") from None
        return cls(normalize=normalize, truncate=truncate, dimensions=dimensions)
