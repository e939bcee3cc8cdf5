"""The helpers model.py uses: parameters, request parameters, the instance's device and threads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from loraembed.triton_params import decode_strings, instance_device, parameters_from_model_config, request_parameters


def test_model_config_parameters_become_a_plain_dict():
    config = {"parameters": {"model": {"string_value": "/m"}, "dtype": {"string_value": "float32"}}}
    assert parameters_from_model_config(config) == {"model": "/m", "dtype": "float32"}
    assert parameters_from_model_config({}) == {}


def test_request_parameters_from_json():
    assert request_parameters('{"normalize": false, "dimensions": 64}') == {"normalize": False, "dimensions": 64}
    assert request_parameters("") == {}


def test_adapter_ids_are_decoded_and_bad_utf8_raises():
    assert decode_strings(np.array([[b"a"], [b""]], dtype=object)) == ["a", ""]
    with pytest.raises(UnicodeDecodeError):
        decode_strings(np.array([[b"\xff"]], dtype=object))


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("requested, expected", [(1, 1), (3, 3), (0, max(1, (os.cpu_count() or 2) // 2))])
def test_cpu_instance_threads(restore_threads, requested, expected):
    assert instance_device("CPU", "0", requested) == torch.device("cpu")
    assert torch.get_num_threads() == expected


@pytest.mark.parametrize("requested, expected", [(0, 1), (4, 4)])
def test_gpu_instance_threads(restore_threads, monkeypatch, requested, expected):
    """A GPU instance's few CPU ops get one torch thread unless asked: the instances are processes
    that share the cores (the default, one thread per core in each, oversubscribes them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    torch.set_num_threads(2)
    assert instance_device("GPU", "1", requested) == torch.device("cuda", 1)
    assert torch.get_num_threads() == expected
