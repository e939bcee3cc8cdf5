"""The real tritonserver from .triton/ runs here: a throw-away Python-backend model, called over
gRPC and HTTP. Tests the TritonServer fixture itself, not loraembed's models."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from triton_server import TritonServer, TritonServerError

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 8
input [
  { name: "IN_FP32" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "IN_INT64" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "IN_BYTES" data_type: TYPE_STRING dims: [ -1 ] }
]
output [
  { name: "OUT_FP32" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "OUT_INT64" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "OUT_BYTES" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "STUB_INFO" data_type: TYPE_STRING dims: [ 2 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# OUT_FP32 = 2 * IN_FP32; INT64 and BYTES come back unchanged (numpy 2 breaks both in Triton 2.51's
# stub); STUB_INFO = [sys.prefix of the stub's Python, $SMOKE_ENV] shows which Python runs the model
# and that the server's environment reaches it.
ECHO_MODEL = """
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        assert np.__version__.startswith("1."), f"Triton 2.51's stub needs numpy<2, got {np.__version__}"
        if os.environ.get("SMOKE_FAIL"):
            raise RuntimeError("SMOKE_FAIL is set: refusing to load")

    def execute(self, requests):
        responses = []
        for request in requests:
            fp32 = pb_utils.get_input_tensor_by_name(request, "IN_FP32").as_numpy()
            int64 = pb_utils.get_input_tensor_by_name(request, "IN_INT64").as_numpy()
            text = pb_utils.get_input_tensor_by_name(request, "IN_BYTES").as_numpy()
            info = np.array([[sys.prefix.encode(), os.environ.get("SMOKE_ENV", "").encode()]] * len(fp32), dtype=object)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT_FP32", (2 * fp32).astype(np.float32)),
                pb_utils.Tensor("OUT_INT64", int64.copy()),
                pb_utils.Tensor("OUT_BYTES", text.copy()),
                pb_utils.Tensor("STUB_INFO", info),
            ]))
        return responses
"""

FP32 = np.array([[1.5, -2.0, 3.25], [0.0, 1e-3, 7.0]], dtype=np.float32)
INT64 = np.array([[1, 2, 3], [2**40, -5, 0]], dtype=np.int64)
TEXT = np.array([[b"hello", "h\u00e9llo w\u00f6rld".encode(), b""], [b"a", b"\x00\xffbin", b"x" * 1000]], dtype=object)


@pytest.fixture(scope="module")
def echo_repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("echo_repository")
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(textwrap.dedent(ECHO_MODEL))
    return repo


@pytest.fixture(scope="module")
def server(triton_server_factory, echo_repository):
    return triton_server_factory(echo_repository, env={"SMOKE_ENV": "from-the-test"})


def _check_outputs(result):
    np.testing.assert_array_equal(result.as_numpy("OUT_FP32"), 2 * FP32)
    assert result.as_numpy("OUT_FP32").dtype == np.float32
    np.testing.assert_array_equal(result.as_numpy("OUT_INT64"), INT64)
    assert result.as_numpy("OUT_BYTES").tolist() == TEXT.tolist()


def _inputs(module):
    inputs = [
        module.InferInput("IN_FP32", FP32.shape, "FP32"),
        module.InferInput("IN_INT64", INT64.shape, "INT64"),
        module.InferInput("IN_BYTES", TEXT.shape, "BYTES"),
    ]
    for infer_input, array in zip(inputs, (FP32, INT64, TEXT)):
        infer_input.set_data_from_numpy(array)
    return inputs


def test_grpc_roundtrip(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_ready() and client.is_model_ready("echo")
    _check_outputs(client.infer("echo", _inputs(grpcclient)))


def test_http_roundtrip(server):
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.is_server_ready() and client.is_model_ready("echo")
    _check_outputs(client.infer("echo", _inputs(httpclient)))


def test_stub_runs_in_this_venv_with_the_given_env(server):
    result = grpcclient.InferenceServerClient(server.grpc_url).infer("echo", _inputs(grpcclient))
    prefix, env_value = result.as_numpy("STUB_INFO")[0]
    assert prefix.decode() == sys.prefix
    assert env_value == b"from-the-test"


def test_metrics_and_log(server):
    import urllib.request

    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        assert b"nv_inference_request_success" in response.read()
    assert "successfully loaded 'echo'" in server.log_text()


def test_model_that_fails_to_load_raises_with_the_log(echo_repository, tmp_path):
    server = TritonServer(echo_repository, env={"SMOKE_FAIL": "1"}, log_dir=tmp_path)
    with pytest.raises(TritonServerError, match="SMOKE_FAIL is set: refusing to load"):
        server.start()
    assert server.process is None  # stopped: nothing left running


def test_context_manager_stops_the_server(echo_repository, tmp_path):
    with TritonServer(echo_repository, log_dir=tmp_path) as server:
        process = server.process
        assert httpclient.InferenceServerClient(server.http_url).is_model_ready("echo")
    assert process.poll() is not None
    assert server.process is None
