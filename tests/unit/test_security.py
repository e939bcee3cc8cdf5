"""No request reaches a file outside adapter_root, and no adapter file runs code: pickle-only
adapters (`adapter_model.bin`) load with `torch.load(weights_only=True)` or not at all, symlinks
are followed only while they stay inside the root (also after an adapter was served), ids are
names (also with hub adapters allowed), and errors never show the server's paths.

Complements tests/unit/test_lora_registry.py, which already rejects `../x`, `/etc/passwd`, `..`,
a folder or adapter_config.json symlinked out of the root, and hub ids while they are disallowed.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
from loraembed.errors import AdapterError
from tests.support.peft_adapters import last_hidden_state, pooled, save_peft_adapter

PARITY_ATOL = 1e-4
LENGTHS = [7, 3, 12]
GOOD = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}


class TouchOnUnpickle:
    """A pickle payload: unpickling it calls Path(marker).touch(), i.e. runs code of the file's choosing."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def make_engine(model_path: Path, **parameters) -> EmbeddingEngine:
    parameters = {"model": str(model_path), "pooling": "cls", "normalize": "false", **parameters}
    return EmbeddingEngine(ServingConfig.from_parameters({k: str(v) for k, v in parameters.items()}, environ={}))


@pytest.fixture(scope="module")
def world(tiny_xlmr_path, tmp_path_factory, token_sequences, pad_right):
    """An adapter root, a folder outside it, token ids, and peft's cls embeddings for "good"."""
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    model = save_peft_adapter(root / "good", tiny_xlmr_path, seed=5, **GOOD)
    config = make_engine(tiny_xlmr_path).settings.encoder_config
    input_ids, attention_mask = pad_right(token_sequences(config, LENGTHS, seed=3), config.pad_token_id)
    expected = pooled(last_hidden_state(model, input_ids, attention_mask), attention_mask, "cls")
    shutil.copytree(root / "good", outside / "good")
    return {"model": tiny_xlmr_path, "root": root, "outside": outside, "ids": input_ids, "mask": attention_mask,
            "expected": expected}


def embed_with(engine, world, adapter_id):
    [result] = engine.embed([EncoderRequest(world["ids"], world["mask"], adapter_ids=[adapter_id])])
    return result


def assert_refused(result, message: str, world) -> None:
    assert isinstance(result, AdapterError), result
    assert re.search(message, str(result)), str(result)
    for folder in (world["root"], world["outside"]):  # errors name ids, never the server's paths
        assert str(folder) not in str(result)


def assert_served(result, world) -> None:
    assert not isinstance(result, Exception), result
    np.testing.assert_allclose(result, world["expected"], rtol=0, atol=PARITY_ATOL)


# --- pickle-only adapters ------------------------------------------------------------------------------


def pickled_copy(world, name: str) -> Path:
    """`good` with its weights in adapter_model.bin (torch.save of the same tensors) instead."""
    folder = world["root"] / name
    folder.mkdir()
    shutil.copy(world["root"] / "good" / "adapter_config.json", folder)
    torch.save(load_file(str(world["root"] / "good" / "adapter_model.safetensors")), folder / "adapter_model.bin")
    return folder


def test_pickled_tensors_load_with_weights_only(world):
    pickled_copy(world, "pickled")
    assert_served(embed_with(make_engine(world["model"], adapter_root=world["root"]), world, "pickled"), world)


@pytest.mark.parametrize("container", ["torch.save", "pickle.dump"])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(world, tmp_path, container):
    marker = tmp_path / "payload-ran"
    folder = pickled_copy(world, f"payload-{container}")
    state = torch.load(folder / "adapter_model.bin", weights_only=True)
    state[next(iter(state))] = TouchOnUnpickle(marker)  # one LoRA factor replaced by the payload
    if container == "torch.save":
        torch.save(state, folder / "adapter_model.bin")
    else:  # the legacy format: a bare pickle stream
        (folder / "adapter_model.bin").write_bytes(pickle.dumps(state, protocol=2))

    engine = make_engine(world["model"], adapter_root=world["root"])
    assert_refused(embed_with(engine, world, folder.name),
                   rf"^adapter '{folder.name}' cannot be served: adapter_model.bin cannot be loaded with "
                   r"weights_only=True \(", world)
    assert_served(embed_with(engine, world, "good"), world)
    assert not marker.exists()

    # The payload is live: a plain torch.load would have run it.
    if container == "torch.save":
        torch.load(folder / "adapter_model.bin", weights_only=False)
    else:
        pickle.loads((folder / "adapter_model.bin").read_bytes())
    assert marker.exists()


NOT_TENSOR_DICTS = {"str-value": {"lora": "not a tensor"}, "int-value": {"lora": 3}, "list": [torch.zeros(2)],
                    "tensor": torch.zeros(2)}


@pytest.mark.parametrize("name", NOT_TENSOR_DICTS)
def test_weights_only_pickles_that_are_not_a_dict_of_tensors_are_refused(world, name):
    folder = pickled_copy(world, f"not-tensors-{name}")
    payload = NOT_TENSOR_DICTS[name]
    torch.save(payload, folder / "adapter_model.bin")
    engine = make_engine(world["model"], adapter_root=world["root"])
    assert_refused(embed_with(engine, world, folder.name),
                   rf"^adapter '{folder.name}' cannot be served: adapter_model.bin is not a dictionary of tensors$",
                   world)


def test_safetensors_is_preferred_so_a_pickle_beside_it_is_never_opened(world, tmp_path):
    marker = tmp_path / "payload-ran"
    folder = world["root"] / "both-files"
    shutil.copytree(world["root"] / "good", folder)
    torch.save({"payload": TouchOnUnpickle(marker)}, folder / "adapter_model.bin")
    assert_served(embed_with(make_engine(world["model"], adapter_root=world["root"]), world, "both-files"), world)
    assert not marker.exists()


# --- symlinks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["adapter_model.safetensors", "adapter_model.bin"])
def test_a_weights_file_linked_out_of_the_root_is_refused(world, file_name):
    folder = world["root"] / f"weights-link-{file_name}"
    folder.mkdir()
    shutil.copy(world["root"] / "good" / "adapter_config.json", folder)
    target = world["outside"] / "good" / "adapter_model.safetensors"
    if file_name == "adapter_model.bin":
        target = world["outside"] / "good.bin"
        torch.save(load_file(str(world["outside"] / "good" / "adapter_model.safetensors")), target)
    (folder / file_name).symlink_to(target)
    engine = make_engine(world["model"], adapter_root=world["root"])
    assert_refused(embed_with(engine, world, folder.name),
                   rf"^adapter '{folder.name}': {file_name} resolves outside adapter_root; it is not served$", world)


def test_a_served_adapter_swapped_for_a_link_out_of_the_root_is_dropped(world):
    """Every request re-resolves the id: replacing a served folder by a symlink that leaves the root
    stops serving it (and frees its device slot), even though its files are byte-for-byte the same."""
    shutil.copytree(world["root"] / "good", world["root"] / "swapped")
    engine = make_engine(world["model"], adapter_root=world["root"])
    assert_served(embed_with(engine, world, "swapped"), world)
    assert engine.adapters.resident_adapters() == ["swapped"]
    shutil.rmtree(world["root"] / "swapped")
    (world["root"] / "swapped").symlink_to(world["outside"] / "good", target_is_directory=True)
    assert_refused(embed_with(engine, world, "swapped"),
                   r"^adapter 'swapped' resolves outside adapter_root; it is not served$", world)
    assert engine.adapters.resident_adapters() == []


def test_links_to_the_root_itself_and_symlink_loops_are_refused(world):
    (world["root"] / "root-itself").symlink_to(world["root"], target_is_directory=True)
    (world["root"] / "loop").symlink_to(world["root"] / "loop")
    (world["root"] / "file-loop").mkdir()
    shutil.copy(world["root"] / "good" / "adapter_model.safetensors", world["root"] / "file-loop")
    (world["root"] / "file-loop" / "adapter_config.json").symlink_to(world["root"] / "file-loop" / "adapter_config.json")
    engine = make_engine(world["model"], adapter_root=world["root"])
    assert_refused(embed_with(engine, world, "root-itself"),
                   r"^adapter 'root-itself' resolves outside adapter_root; it is not served$", world)
    for name in ("loop", "file-loop"):  # RuntimeError from pathlib before the fix: the whole batch failed
        assert_refused(embed_with(engine, world, name),
                       rf"^adapter '{name}' cannot be resolved \(a symlink loop or an unreadable path\)", world)
    assert_served(embed_with(engine, world, "good"), world)


def test_an_adapter_root_that_is_itself_a_symlink_works(world, tmp_path):
    (tmp_path / "root-link").symlink_to(world["root"], target_is_directory=True)
    assert_served(embed_with(make_engine(world["model"], adapter_root=tmp_path / "root-link"), world, "good"), world)


# --- ids -----------------------------------------------------------------------------------------------

NOT_A_PATH = r"is not valid: adapter ids are names, not paths"
NOT_A_NAME = r"is not valid: use 1 to 128 characters from A-Z a-z 0-9 \. _ -"
ID_REJECTIONS = [
    # (id, allow_hub_adapters, message)
    (".", False, r"^adapter id '\.' is not valid: '\.' and '\.\.' are not adapter names$"),
    ("~", False, NOT_A_NAME),
    ("~root", False, NOT_A_NAME),
    ("$HOME", False, NOT_A_NAME),
    ("good\x00", False, NOT_A_NAME),
    ("good\n", False, NOT_A_NAME),
    ("C:\\Windows", False, NOT_A_PATH),
    ("\uff0e\uff0e", False, NOT_A_NAME),  # fullwidth dots
    ("%2e%2e%2fetc", False, NOT_A_NAME),
    ("good/", False, NOT_A_PATH),
    ("org/name@main", False, r"names a hub adapter \(org/name\[@revision\]\), but allow_hub_adapters is off"),
    # With hub adapters allowed, paths are still not ids.
    ("../good", True, NOT_A_PATH),
    ("/etc/passwd", True, NOT_A_PATH),
    ("org/..", True, NOT_A_PATH),
    ("../org/name", True, NOT_A_PATH),
    ("org/name@../../x", True, NOT_A_PATH),
    ("org/name@main/../../x", True, NOT_A_PATH),
    ("org/name/extra", True, NOT_A_PATH),
]


@pytest.fixture(scope="module")
def engines(world, tmp_path_factory):
    hub_cache = tmp_path_factory.mktemp("empty-hub-cache")
    with pytest.MonkeyPatch.context() as patch:  # never the network, never the machine's own cache
        import huggingface_hub.constants

        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield {allow: make_engine(world["model"], adapter_root=world["root"], allow_hub_adapters=str(allow).lower())
               for allow in (False, True)}


@pytest.mark.parametrize(("adapter_id", "allow_hub", "message"), ID_REJECTIONS,
                         ids=[f"{case[0]!r}{'-hub' if case[1] else ''}" for case in ID_REJECTIONS])
def test_ids_that_are_not_names_are_refused(engines, world, adapter_id, allow_hub, message):
    engine = engines[allow_hub]
    good, bad = engine.embed([EncoderRequest(world["ids"], world["mask"], adapter_ids=["good"]),
                              EncoderRequest(world["ids"], world["mask"], adapter_ids=[adapter_id])])
    assert_refused(bad, message, world)
    assert_served(good, world)


def test_an_allowed_hub_id_absent_from_the_offline_cache_is_refused(engines, world):
    assert_refused(embed_with(engines[True], world, "org/name"),
                   r"^hub adapter 'org/name' is not available from the hub or its offline cache", world)
