"""The PEFT on-disk contract for LoRA adapters, read without importing `peft`.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`, read
with `torch.load(weights_only=True)`). Weight keys are
`base_model.model.[roberta.|bert.]<module>.lora_A[.<adapter name>].weight` ([r, in_features]) and
`...lora_B...weight` ([out_features, r]); the delta of a module is `scaling * B @ A` with
`scaling = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora` (PEFT `tuners/lora/layer.py`).
Which modules an adapter targets, and their `r` and `lora_alpha`, follow PEFT 0.21's matching
rules (`is_targeted`, `pattern_value`), which tests check against PEFT's own functions.

Every problem of an adapter is collected and raised as one `AdapterError` (vLLM's `PEFTHelper`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checkpoint import BASE_MODEL_PREFIXES, IGNORED_KEY_PREFIXES
from ..errors import AdapterError

ADAPTER_CONFIG_FILE = "adapter_config.json"
SAFETENSORS_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, SAFETENSORS_WEIGHTS_FILE, PICKLED_WEIGHTS_FILE)

# Per-layer modules LoRA may target, by their HF names under `encoder.layer.{i}.`.
LORA_TARGET_MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
EMBEDDING_MODULES = ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings")
# Linear modules of HF heads that an embedding never passes through: LoRA weights on them are
# ignored (PEFT puts them there when e.g. target_modules=["dense"] also matches `pooler.dense`).
HEAD_LINEAR_MODULES = (
    "pooler.dense",
    "lm_head.dense",
    "lm_head.decoder",
    "cls.predictions.transform.dense",
    "cls.predictions.decoder",
    "classifier.dense",
    "classifier.out_proj",
    "classifier",
)
# LoraConfig fields that change the forward pass in ways plain LoRA cannot express: field -> name.
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "target_parameters",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
SUPPORTED_TARGETS_TEXT = "query, key, value, attention.output.dense, intermediate.dense, output.dense"
LISTED_PROBLEMS = 3  # per kind of problem, the rest is counted

BASE_MODEL_CHILDREN = ("encoder.", "embeddings.", "pooler.")  # what follows a task model's prefix
_LORA_WEIGHT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter_name>[^.]+))?\.weight$")
_LAYER_MODULE = re.compile(r"^encoder\.layer\.(?P<index>\d+)\.(?P<target>.+)$")


@dataclass(frozen=True)
class LoraModuleWeights:
    """LoRA factors of one base-model module, float32 on the CPU."""

    module: str  # base-model name, e.g. "encoder.layer.0.attention.self.query"
    lora_a: torch.Tensor  # [r, in_features]
    lora_b: torch.Tensor  # [out_features, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def scaled_lora_b(self) -> torch.Tensor:
        """`scaling * B`, [out_features, r]: the form device slots hold (scaling folded in)."""
        return self.lora_b * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A`, [out_features, in_features]: what merging adds to the base weight."""
        return self.scaled_lora_b() @ self.lora_a


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter: its factors per targeted base-model module."""

    adapter_id: str
    modules: Mapping[str, LoraModuleWeights]

    @property
    def max_rank(self) -> int:
        return max((weights.rank for weights in self.modules.values()), default=0)


def _summarize(items: list[str]) -> str:
    shown = "; ".join(items[:LISTED_PROBLEMS])
    return shown if len(items) <= LISTED_PROBLEMS else f"{shown}; and {len(items) - LISTED_PROBLEMS} more"


def _shape(tensor: torch.Tensor) -> str:
    return f"[{', '.join(str(size) for size in tensor.shape)}]"


# --- which modules an adapter targets, and their r / lora_alpha (PEFT's rules) ------------------
# Facts about PEFT 0.21 (`tuners_utils.check_target_module_exists`, `utils.other.get_pattern_key`),
# restated here; tests/unit/test_lora_layers.py checks these functions against PEFT's own.


def _names_module(name: str, module_name: str) -> bool:
    """A list entry names a module when it is the whole dotted name or its tail after a '.'."""
    return module_name == name or module_name.endswith("." + name)


def _dot_boundaries(module_name: str) -> list[int]:
    """Offsets where a dotted name component starts: 0 and just after every '.'."""
    return [0] + [offset + 1 for offset, char in enumerate(module_name) if char == "."]


def _layer_index(module_name: str, layers_pattern: str | list[str] | None) -> int | None:
    """The index of the layer holding a module, the number after the layer-list name
    (`encoder.layer.3.output.dense` -> 3); the first such number counts; None if there is none.

    Without `layers_pattern`, the layer-list name is any component after the first; with it, a
    regex (or the first of several regexes that matches) starting at a component boundary.
    """
    if not layers_pattern:
        parts = module_name.split(".")
        # The number must follow a name that is not the first component and be followed by more.
        for position in range(2, len(parts) - 1):
            if parts[position].isdecimal():
                return int(parts[position])
        return None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        # Grouped, so a '|' inside the regex separates layer-list names (PEFT splices the regex in
        # ungrouped; a top-level '|' there is a quirk, not a contract: lists of names are the way).
        after_pattern = re.compile(rf"(?:{pattern})\.(\d+)\.")
        for start in _dot_boundaries(module_name):
            found = after_pattern.match(module_name, start)
            if found:
                return int(found.group(1))
    return None


def is_targeted(config: Mapping[str, Any], module_name: str) -> bool:
    """Does a LoRA config (`adapter_config.json`) put LoRA on module `module_name` (full dotted name)?

    - `exclude_modules` wins: a regex that matches the whole name, or a list of names (whole or tail).
    - `target_modules` as a string is a regex that must match the whole name; as a list, an entry is
      the whole name or its tail after a '.'.
    - `layers_to_transform` (an int or a non-empty list) keeps only modules in those layers; it applies
      to tail matches of a list only (a string regex, or an entry that is the whole name, ignores it).
    """
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module_name):
                return False
        elif any(_names_module(name, module_name) for name in exclude):
            return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    if module_name in targets:
        return True
    if not any(_names_module(name, module_name) for name in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _layer_index(module_name, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """The value of `rank_pattern` / `alpha_pattern` for a module, else `default`.

    A pattern key is a regex that must match a tail of the name starting at a component boundary
    (`value` matches `encoder.layer.0.attention.self.value`); the first key in order that matches wins.
    """
    for key, value in patterns.items():
        compiled = re.compile(key)
        if any(compiled.fullmatch(module_name, start) for start in _dot_boundaries(module_name)):
            return value
    return patterns.get(module_name, default)


# --- reading -----------------------------------------------------------------------------------


def _read_config(folder: Path, problems: list[str]) -> dict[str, Any] | None:
    path = folder / ADAPTER_CONFIG_FILE
    if not path.is_file():
        problems.append(f"{ADAPTER_CONFIG_FILE} is missing")
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{ADAPTER_CONFIG_FILE} is not valid JSON ({error})")
        return None
    if not isinstance(config, dict):
        problems.append(f"{ADAPTER_CONFIG_FILE} is not a JSON object")
        return None
    return config


def _read_weights(folder: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    safetensors_path, pickled_path = folder / SAFETENSORS_WEIGHTS_FILE, folder / PICKLED_WEIGHTS_FILE
    if safetensors_path.is_file():  # preferred when both exist, as PEFT does
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_path), device="cpu")
        except Exception as error:  # safetensors raises its own error types; the text is what matters
            problems.append(f"{SAFETENSORS_WEIGHTS_FILE} is not a valid safetensors file ({str(error)[:200]})")
            return None
    if pickled_path.is_file():
        try:
            state = torch.load(pickled_path, map_location="cpu", weights_only=True)
        except Exception as error:
            problems.append(f"{PICKLED_WEIGHTS_FILE} cannot be loaded with weights_only=True ({str(error)[:200]})")
            return None
        if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
            problems.append(f"{PICKLED_WEIGHTS_FILE} is not a dictionary of tensors")
            return None
        return state
    problems.append(f"no weights: neither {SAFETENSORS_WEIGHTS_FILE} nor {PICKLED_WEIGHTS_FILE} is present")
    return None


def read_peft_adapter(
    folder: Path, adapter_id: str, module_shapes: Mapping[str, tuple[int, int]], max_lora_rank: int
) -> LoraAdapter:
    """Read and validate the PEFT adapter in `folder` against the base model.

    `module_shapes` maps each targetable base-model module ("encoder.layer.{i}.attention.self.query",
    ...) to its (in_features, out_features). Raises one `AdapterError` listing every problem.
    """
    problems: list[str] = []
    config = _read_config(folder, problems)
    state = _read_weights(folder, problems)
    if config is not None and state is not None:
        return parse_peft_adapter(config, state, adapter_id, module_shapes, max_lora_rank)
    if config is not None:  # the weights are unreadable: still report what the config gets wrong
        problems += _config_problems(config, max_lora_rank)[0]
    raise AdapterError(f"adapter {adapter_id!r} cannot be served: {'; '.join(problems)}")


def _config_problems(config: Mapping[str, Any], max_lora_rank: int) -> tuple[list[str], bool]:
    """Problems of the config alone, and whether its r/alpha/targets are well-formed enough to use."""
    problems = []
    well_formed = True
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        problems.append(f"peft_type {peft_type!r} is not supported (only LORA)")
    for field, name in UNSUPPORTED_FEATURES.items():
        if config.get(field):
            problems.append(f"{name} is not supported")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} is not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} is not supported (only 'none')")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            problems.append(f"{field} must be a JSON object")
            return problems, False
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 for rank in ranks):
        problems.append(f"r and rank_pattern values must be positive integers; got {ranks}")
        well_formed = False
    else:
        too_large = sorted({rank for rank in ranks if rank > max_lora_rank})
        if too_large:
            problems.append(
                f"rank {', '.join(map(str, too_large))} is above max_lora_rank={max_lora_rank}"
            )
    alphas = [config.get("lora_alpha", 8), *(config.get("alpha_pattern") or {}).values()]
    if not all(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) for alpha in alphas):
        problems.append(f"lora_alpha and alpha_pattern values must be numbers; got {alphas}")
        well_formed = False
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules must be a list of names or a regex string; got {targets!r}")
        well_formed = False
    regexes = [targets] if isinstance(targets, str) else []
    for field in ("exclude_modules", "layers_pattern"):
        value = config.get(field)
        regexes += [value] if isinstance(value, str) else []
    regexes += [*(config.get("rank_pattern") or {}), *(config.get("alpha_pattern") or {})]
    for pattern in regexes:
        try:
            re.compile(pattern)
        except re.error as error:
            problems.append(f"{pattern!r} is not a valid regular expression ({error})")
            well_formed = False
    return problems, well_formed


def _module_prefix(full_name: str) -> str | None:
    """The task-model prefix of a module name ('roberta.', 'bert.', ...), '' for none, None if odd."""
    for prefix in ("", *BASE_MODEL_PREFIXES):
        if full_name.startswith(prefix) and full_name[len(prefix) :].startswith(BASE_MODEL_CHILDREN):
            return prefix
    return None


def _candidate_modules(prefix: str, num_layers: int) -> list[str]:
    """Full names of the Linear/Embedding modules PEFT could have wrapped in the HF model."""
    names = [f"{prefix}encoder.layer.{i}.{target}" for i in range(num_layers) for target in LORA_TARGET_MODULES]
    names += [prefix + module for module in EMBEDDING_MODULES]
    names += [prefix + "pooler.dense", *(module for module in HEAD_LINEAR_MODULES if module != "pooler.dense")]
    return names


def _is_head_module(base_name: str) -> bool:
    return base_name.startswith(IGNORED_KEY_PREFIXES) or base_name in HEAD_LINEAR_MODULES


def _target_problems(config: Mapping[str, Any], candidates: list[str], prefix: str) -> tuple[list[str], set[str]]:
    """Problems with `target_modules`, and the base-model names of the supported modules it targets."""
    problems = []
    targets = config["target_modules"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        # PEFT expands "all-linear" to the last name component of every Linear but the output layer.
        targets = ["query", "key", "value", "dense"]
    matching_config = {**config, "target_modules": targets}
    targeted = [name for name in candidates if is_targeted(matching_config, name)]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in candidates):
            problems.append(
                f"target_modules {targets!r} matches no module of this encoder (supported: {SUPPORTED_TARGETS_TEXT})"
            )
    else:
        unknown = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in candidates)]
        if unknown:
            problems.append(
                f"unknown target_modules {', '.join(map(repr, unknown))} (supported: {SUPPORTED_TARGETS_TEXT})"
            )
    embeddings = [name for name in targeted if name[len(prefix) :] in EMBEDDING_MODULES]
    if embeddings:
        problems.append(f"embedding LoRA ({', '.join(embeddings)}) is not supported")
    supported = {name[len(prefix) :] for name in targeted if _LAYER_MODULE.match(name[len(prefix) :])}
    return problems, supported


def parse_peft_adapter(
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    adapter_id: str,
    module_shapes: Mapping[str, tuple[int, int]],
    max_lora_rank: int,
) -> LoraAdapter:
    """Validate a PEFT config and state dict (as read from disk) against the base model."""
    problems, config_usable = _config_problems(config, max_lora_rank)
    num_layers = 1 + max((int(_LAYER_MODULE.match(name).group("index")) for name in module_shapes), default=-1)

    # Group the tensors by module.
    factors: dict[str, dict[str, torch.Tensor]] = {}  # full module name -> {"A": ..., "B": ...}
    adapter_names: set[str] = set()
    embedding_keys, magnitude_keys, other_keys = [], [], []
    for key, tensor in state.items():
        name = key.removeprefix("base_model.model.")
        match = _LORA_WEIGHT_KEY.match(name)
        if match:
            module, module_prefix = match.group("module"), _module_prefix(match.group("module"))
            base_name = module if module_prefix is None else module[len(module_prefix) :]
            if _is_head_module(module) or _is_head_module(base_name):
                continue  # the embedding does not pass through heads
            factors.setdefault(module, {})[match.group("factor")] = tensor
            if match.group("adapter_name"):
                adapter_names.add(match.group("adapter_name"))
        elif ".lora_embedding_" in name:
            embedding_keys.append(name)
        elif ".lora_magnitude_vector" in name:
            magnitude_keys.append(name)
        else:
            other_keys.append(name)
    if magnitude_keys and not config.get("use_dora"):
        problems.append("DoRA magnitude vectors (lora_magnitude_vector) are not supported")
    explained = config.get("modules_to_save") or config.get("bias", "none") != "none" or config.get("lora_bias")
    if other_keys and not explained:
        problems.append(f"{len(other_keys)} tensors are not LoRA weights: {_summarize(sorted(other_keys))}")
    if len(adapter_names) > 1:
        problems.append(f"the weights hold several adapters ({', '.join(sorted(adapter_names))}); save one")
    if not factors and not embedding_keys:
        problems.append("the weights contain no LoRA tensors")

    prefixes = {_module_prefix(name) for name in factors}
    if None in prefixes:
        odd = sorted(name for name in factors if _module_prefix(name) is None)
        problems.append(f"LoRA weights for modules outside a BERT/XLM-R encoder: {_summarize(odd)}")
    prefixes.discard(None)
    if len(prefixes) > 1:
        problems.append(f"weight keys mix model prefixes {sorted(prefixes)}")
    prefix = next(iter(prefixes)) if len(prefixes) == 1 else ""

    targeted: set[str] = set()
    if config_usable:
        target_problems, targeted = _target_problems(config, _candidate_modules(prefix, num_layers), prefix)
        problems += target_problems
    if embedding_keys and not any(problem.startswith("embedding LoRA") for problem in problems):
        modules = sorted({key.split(".lora_embedding_")[0] for key in embedding_keys})
        problems.append(f"embedding LoRA ({', '.join(modules)}) is not supported")

    modules: dict[str, LoraModuleWeights] = {}
    missing_factor, beyond_layers, unsupported, untargeted, wrong_shape, non_finite = [], [], [], [], [], []
    for full_name, pair in sorted(factors.items()):
        module_prefix = _module_prefix(full_name)
        if module_prefix is None:
            continue
        base_name = full_name[len(module_prefix) :]
        layer = _LAYER_MODULE.match(base_name)
        if base_name not in module_shapes:
            if layer and layer.group("target") in LORA_TARGET_MODULES:
                beyond_layers.append(base_name)
            else:
                unsupported.append(base_name)
            continue
        if set(pair) != {"A", "B"}:
            missing_factor.append(f"{base_name} has only lora_{''.join(pair)}")
            continue
        if config_usable and base_name not in targeted:
            untargeted.append(base_name)
        lora_a, lora_b = pair["A"], pair["B"]
        in_features, out_features = module_shapes[base_name]
        rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
        if config_usable:
            rank = pattern_value(config.get("rank_pattern") or {}, full_name, config.get("r", 8))
        expected_a, expected_b = (rank, in_features), (out_features, rank)
        if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
            wrong_shape.append(
                f"{base_name} lora_A {_shape(lora_a)} / lora_B {_shape(lora_b)}, "
                f"expected [{rank}, {in_features}] / [{out_features}, {rank}]"
            )
            continue
        if not (lora_a.is_floating_point() and lora_b.is_floating_point()):
            wrong_shape.append(f"{base_name} has non-floating-point LoRA tensors ({lora_a.dtype}, {lora_b.dtype})")
            continue
        lora_a, lora_b = lora_a.to(torch.float32), lora_b.to(torch.float32)
        if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
            non_finite.append(base_name)
            continue
        if not config_usable:
            continue
        alpha_pattern = config.get("alpha_pattern") or {}
        alpha = pattern_value(alpha_pattern, full_name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[base_name] = LoraModuleWeights(base_name, lora_a.contiguous(), lora_b.contiguous(), float(scaling))

    if beyond_layers:
        problems.append(
            f"LoRA weights for layers the base model does not have ({num_layers} layers): {_summarize(beyond_layers)}"
        )
    if unsupported:
        problems.append(f"LoRA on unsupported modules (supported: {SUPPORTED_TARGETS_TEXT}): {_summarize(unsupported)}")
    if missing_factor:
        problems.append(f"incomplete LoRA weights: {_summarize(missing_factor)}")
    if wrong_shape:
        problems.append(f"shape mismatch with the base model: {_summarize(wrong_shape)}")
    if non_finite:
        problems.append(f"non-finite values (inf/nan) in the LoRA weights of {_summarize(non_finite)}")
    if untargeted:
        problems.append(f"weights for modules that target_modules does not target: {_summarize(untargeted)}")
    with_weights = {name[len(_module_prefix(name) or "") :] for name in factors}
    without_weights = sorted(targeted - with_weights)
    if without_weights and factors:
        problems.append(f"targeted modules without LoRA weights: {_summarize(without_weights)}")
    if problems:
        raise AdapterError(f"adapter {adapter_id!r} cannot be served: {'; '.join(problems)}")
    return LoraAdapter(adapter_id, modules)
