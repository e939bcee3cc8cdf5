"""Helpers for the Triton `model.py` files that need no Triton import: reading the model
configuration's `parameters`, request parameters and the instance's device."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch


def parameters_from_model_config(model_config: Mapping[str, Any]) -> dict[str, str]:
    """`parameters { key: "x" value: { string_value: "..." } }` as a plain dict."""
    return {name: value.get("string_value", "") for name, value in model_config.get("parameters", {}).items()}


# What `request.parameters()` returns for a request without parameters: callers skip parsing.
NO_PARAMETERS = frozenset({"", "{}"})


def request_parameters(parameters_json: str) -> dict[str, Any]:
    """A request's parameters (Triton passes them as a JSON object string)."""
    return json.loads(parameters_json) if parameters_json not in NO_PARAMETERS else {}


def instance_device(kind: str, device_id: str | int, cpu_threads: int = 0) -> torch.device:
    """The device of a Triton model instance; makes it current so every CUDA call lands there,
    and sets the instance's torch threads: `cpu_threads`, else one on a GPU, half the cores on a CPU.

    The instances of a server are processes that share the cores, and torch's default (one thread
    per core in each) oversubscribes them: its small CPU ops then wait on threads that another
    process holds. On a 2-core machine a second torch thread made small CPU batches many times
    slower (tests/integration/test_load_and_faults.py ran 352 s instead of 15 s). On a 16-core GPU
    host, two GPU instances with 16 threads each spent 158 s preloading 64 adapters, whose reading
    is a few hundred small CPU ops per adapter (benchmarks/NOTES.md, item 24). A GPU instance's
    CPU work is such small ops, so one thread serves it.
    """
    if kind == "GPU" and torch.cuda.is_available():
        torch.set_num_threads(cpu_threads or 1)
        device = torch.device("cuda", int(device_id))
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(cpu_threads or max(1, (os.cpu_count() or 2) // 2))
    return torch.device("cpu")


def decode_strings(array: Any) -> list[str]:
    """A BYTES tensor [n, 1] (or [n]) of UTF-8 ids to a list of str; undecodable bytes raise ValueError."""
    return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
