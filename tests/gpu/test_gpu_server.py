"""On a GPU host with tritonserver (scripts/gpu_host_env.sh): the `embed` ensemble answers with a
KIND_GPU encoder (KIND_AUTO picks it), bf16, and matches fp32 `transformers` (cosine >= 0.999); its
forward passes replay CUDA graphs, as the metrics port counts them."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.checkpoints import xlmr_tokenizer
from triton_server import TritonServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from serve_report import metric_sums  # noqa: E402

pytestmark = pytest.mark.gpu
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture(scope="module")
def gpu_server(xlmr_base_folder, tmp_path_factory):
    backends = os.environ.get("TRITON_BACKENDS", "")
    if not (Path(backends).parent / "bin" / "tritonserver").is_file():
        pytest.skip("no tritonserver: source scripts/gpu_host_env.sh with the server bundle (.gpuhost)")
    env = {"LORAEMBED_MODEL": str(xlmr_base_folder), "LORAEMBED_POOLING": "mean"}
    if os.environ.get("GPUHOST_VENV_BIN"):  # the stub's python: the bundle's venv with numpy<2
        env["PATH"] = os.environ["GPUHOST_VENV_BIN"] + os.pathsep + os.environ["PATH"]
    server = TritonServer(
        REPOSITORY,
        env=env,
        log_dir=tmp_path_factory.mktemp("gpu-server"),
        triton_home=Path(backends).parent,
    ).start()
    yield server
    print(server.log_tail(40))
    server.stop()


def _infer_http(url: str, texts: list[str]) -> np.ndarray:
    """The `embed` ensemble over Triton's HTTP/JSON protocol (the host python has no tritonclient)."""
    body = {
        "inputs": [{"name": "TEXT", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}],
        "parameters": {"normalize": False},
    }
    request = urllib.request.Request(
        f"http://{url}/v2/models/embed/infer", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as response:
        output = json.loads(response.read())["outputs"][0]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def test_ensemble_answers_with_a_gpu_encoder(gpu_server, xlmr_base_folder):
    from transformers import AutoModel

    with urllib.request.urlopen(f"http://{gpu_server.http_url}/v2/models/encoder/config") as response:
        assert json.loads(response.read())["instance_group"][0]["kind"] == "KIND_GPU"
    texts = ["hello world", "the text is of the world", "äöü 日本語のテキスト " * 20, "a"]
    ours = _infer_http(gpu_server.http_url, texts)

    tokenizer = xlmr_tokenizer(vocab_size=250)
    encodings = tokenizer.encode_batch(texts)
    ids = np.full((len(texts), max(len(e.ids) for e in encodings)), 1)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    model = AutoModel.from_pretrained(xlmr_base_folder).cuda().float().eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids).cuda(), attention_mask=torch.tensor(mask).cuda()).last_hidden_state
    weights = torch.tensor(mask).cuda()[..., None].float()
    reference = ((hidden * weights).sum(1) / weights.sum(1)).cpu().numpy()
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"GPU server vs fp32 transformers: min cosine {cosine.min():.6f}")
    assert cosine.min() >= 0.999
    assert "device=cuda:0 dtype=bfloat16" in gpu_server.log_text()  # dtype auto: bf16 on the GPU


def _metric_sums(url: str) -> dict[str, float]:
    """Our metrics without an adapter label, summed over the encoder's instances (as serve_bench reads them)."""
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as response:
        return metric_sums(response.read().decode())


def test_gpu_forward_passes_replay_cuda_graphs_and_are_counted(gpu_server):
    """Batches within cuda_graph_max_tokens (16,384 by default) replay a graph, from the first one
    of a bucket on (a capture, then its replay, while fewer than 32 graphs are kept)."""
    before = _metric_sums(gpu_server.metrics_url)
    texts = ["a short query", "a longer passage about the weather in the mountains " * 8]
    for _ in range(3):
        _infer_http(gpu_server.http_url, texts)
    deadline = time.monotonic() + 10  # the encoder publishes from a thread ~10 ms after a batch
    while True:
        after = _metric_sums(gpu_server.metrics_url)
        passes = after["loraembed_forward_passes_total"] - before["loraembed_forward_passes_total"]
        graphed = after["loraembed_forward_passes_graphed_total"] - before["loraembed_forward_passes_graphed_total"]
        if (passes >= 3 and graphed >= passes) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert passes >= 3 and graphed == passes, (passes, graphed)
    assert after["loraembed_cuda_graph_captures_total"] >= 1
    assert after["loraembed_cuda_graphs_resident"] == after["loraembed_cuda_graph_captures_total"]  # none evicted
