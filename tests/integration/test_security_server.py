"""The security table through a real tritonserver (issue 6): adapter ids that are paths, absolute,
hub ids while disallowed, symlinks out of adapter_root, a pickle that would run code, and the
limits on texts per request and bytes per text. Each is answered with INVALID_ARG naming the
problem (never a server path), through `embed` and `encoder` alike, and good requests beside them
are served. The unit view of the same rules is tests/unit/test_security.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from safetensors.torch import load_file
from tritonclient.utils import InferenceServerException

from loraembed.checkpoint import bundled_model_path
from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
from loraembed.tokenization import TextTokenizer
from tests.support.peft_adapters import save_peft_adapter
from tests.support.triton_probes import bytes_input, embed, int_input, server_ready

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MAX_TEXTS_PER_REQUEST = 8
MAX_TEXT_BYTES = 64
ATOL = 1e-5
TEXTS = ["A man is eating food.", "The girl is carrying a baby."]


class TouchOnUnpickle:
    """Unpickling it creates the marker file: proof that a pickle ran code, if it ever exists."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    outside = tmp_path_factory.mktemp("outside-the-root")
    save_peft_adapter(root / "good", bundled_model_path(), seed=7, r=4, lora_alpha=8, target_modules=["query", "value"])
    shutil.copytree(root / "good", outside / "good")
    (root / "escape").symlink_to(outside / "good", target_is_directory=True)
    (root / "weights-link").mkdir()
    shutil.copy(root / "good" / "adapter_config.json", root / "weights-link")
    (root / "weights-link" / "adapter_model.safetensors").symlink_to(outside / "good" / "adapter_model.safetensors")
    marker = tmp_path_factory.mktemp("markers") / "payload-ran"
    (root / "payload").mkdir()
    shutil.copy(root / "good" / "adapter_config.json", root / "payload")
    state = load_file(str(root / "good" / "adapter_model.safetensors"))
    state[next(iter(state))] = TouchOnUnpickle(marker)
    torch.save(state, root / "payload" / "adapter_model.bin")
    return {"root": root, "outside": outside, "marker": marker}


@pytest.fixture(scope="module")
def server(triton_server_factory, world):
    env = {
        "LORAEMBED_ADAPTER_ROOT": str(world["root"]),
        "LORAEMBED_MAX_TEXTS_PER_REQUEST": str(MAX_TEXTS_PER_REQUEST),
        "LORAEMBED_MAX_TEXT_BYTES": str(MAX_TEXT_BYTES),
        "OMP_NUM_THREADS": "1",  # see test_load_and_faults.py
    }
    return triton_server_factory(REPOSITORY, env)


@pytest.fixture(scope="module")
def client(server):
    return grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture(scope="module")
def reference(world):
    """In-process embeddings of TEXTS with the base model and with "good"."""
    engine = EmbeddingEngine(ServingConfig.from_parameters({"adapter_root": str(world["root"])}, environ={}))
    tokenizer = TextTokenizer(engine.settings.model_path, engine.settings.max_seq_len)
    ids, mask = tokenizer.encode(TEXTS)
    base, good = engine.embed([EncoderRequest(ids, mask), EncoderRequest(ids, mask, ["good"])])
    return {"": base, "good": good, "input_ids": ids, "attention_mask": mask}


def assert_invalid_arg(call, message: str, world) -> str:
    with pytest.raises(InferenceServerException) as raised:
        call()
    text = raised.value.message()
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", text
    assert re.search(message, text), text
    for folder in (world["root"], world["outside"]):
        assert str(folder) not in text  # errors name ids, never the server's paths
    return text


NOT_A_PATH = r"is not valid: adapter ids are names, not paths"
ADAPTER_REJECTIONS = {
    "../good": r"adapter id '\.\./good' " + NOT_A_PATH,
    "good/../../etc": r"adapter id 'good/\.\./\.\./etc' " + NOT_A_PATH,
    "/etc/passwd": r"adapter id '/etc/passwd' " + NOT_A_PATH,
    "..": r"adapter id '\.\.' is not valid: '\.' and '\.\.' are not adapter names",
    "org/name": r"adapter id 'org/name' names a hub adapter \(org/name\[@revision\]\), but allow_hub_adapters is off",
    "escape": r"adapter 'escape' resolves outside adapter_root; it is not served",
    "weights-link": r"adapter 'weights-link': adapter_model.safetensors resolves outside adapter_root",
    "payload": r"adapter 'payload' cannot be served: adapter_model.bin cannot be loaded with weights_only=True",
    "absent": r"adapter 'absent' not found: adapter_root has no folder of that name",
}


@pytest.mark.parametrize("model", ["embed", "encoder"])
@pytest.mark.parametrize("adapter_id", ADAPTER_REJECTIONS)
def test_adapter_ids_that_reach_outside_or_run_code_are_refused(client, world, reference, model, adapter_id):
    def call():
        if model == "embed":
            return embed(client, TEXTS, [adapter_id] * len(TEXTS))
        inputs = [int_input("INPUT_IDS", reference["input_ids"]), int_input("ATTENTION_MASK", reference["attention_mask"]),
                  bytes_input("ADAPTER_ID", [adapter_id] * len(TEXTS))]
        return client.infer("encoder", inputs).as_numpy("EMBEDDING")

    assert_invalid_arg(call, ADAPTER_REJECTIONS[adapter_id], world)
    assert not world["marker"].exists()
    np.testing.assert_allclose(embed(client, TEXTS, ["good"] * len(TEXTS)), reference["good"], rtol=0, atol=ATOL)


def test_texts_per_request_limit(client, world, reference):
    texts = [f"text number {i}" for i in range(MAX_TEXTS_PER_REQUEST + 1)]
    assert embed(client, texts[:MAX_TEXTS_PER_REQUEST]).shape == (MAX_TEXTS_PER_REQUEST, 384)
    message = rf"{MAX_TEXTS_PER_REQUEST + 1} texts in one request, more than max_texts_per_request={MAX_TEXTS_PER_REQUEST}"
    assert_invalid_arg(lambda: embed(client, texts), message, world)
    ids = np.repeat(reference["input_ids"][:1], MAX_TEXTS_PER_REQUEST + 1, axis=0)
    mask = np.repeat(reference["attention_mask"][:1], MAX_TEXTS_PER_REQUEST + 1, axis=0)
    assert_invalid_arg(lambda: client.infer("encoder", [int_input("INPUT_IDS", ids), int_input("ATTENTION_MASK", mask)]),
                       message, world)
    np.testing.assert_allclose(embed(client, TEXTS), reference[""], rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "text, size",
    [("a" * (MAX_TEXT_BYTES + 1), MAX_TEXT_BYTES + 1), ("é" * (MAX_TEXT_BYTES // 2 + 1), MAX_TEXT_BYTES + 2)],
    ids=["ascii", "two-byte-characters"],
)
def test_bytes_per_text_limit(client, world, reference, text, size):
    assert embed(client, ["a" * MAX_TEXT_BYTES, "é" * (MAX_TEXT_BYTES // 2)]).shape == (2, 384)  # at the limit
    assert_invalid_arg(lambda: embed(client, ["fine", text]),
                       rf"text 1 is {size} bytes, more than max_text_bytes={MAX_TEXT_BYTES}", world)
    np.testing.assert_allclose(embed(client, TEXTS), reference[""], rtol=0, atol=ATOL)


def test_still_ready_and_nothing_ran(server, world):
    assert server_ready(server)
    assert not world["marker"].exists()
