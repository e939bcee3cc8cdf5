"""docker/entrypoint.sh starting the real tritonserver (2.51, as in the 24.10 image): its flags are
accepted, a rewritten instance group is served, and Triton exports the metric the Kubernetes
HorizontalPodAutoscaler scales on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from triton_server import TRITON_HOME

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


@pytest.fixture(scope="module")
def entrypoint_server(tmp_path_factory):
    if not (TRITON_HOME / "bin" / "tritonserver").exists():
        pytest.skip("no tritonserver: run scripts/setup.sh")
    ports = {name: free_port() for name in ("HTTP", "GRPC", "METRICS")}
    env = {key: value for key, value in os.environ.items() if not key.startswith("LORAEMBED_")}
    env |= {f"LORAEMBED_{name}_PORT": str(port) for name, port in ports.items()}
    env |= {
        "LORAEMBED_TOKENIZER_INSTANCES": "1",  # exercises the rewritten copy on a CPU host
        "TMPDIR": str(tmp_path_factory.mktemp("entrypoint")),
        # The stub runs the first python3 on PATH; tritonserver comes from scripts/setup.sh.
        "PATH": f"{Path(sys.executable).parent}:{TRITON_HOME / 'bin'}:{env['PATH']}",
    }
    log_path = tmp_path_factory.mktemp("entrypoint-log") / "tritonserver.log"
    args = [f"--backend-directory={TRITON_HOME / 'backends'}", "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["bash", str(ROOT / "docker" / "entrypoint.sh"), *args], env=env,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    http = f"http://127.0.0.1:{ports['HTTP']}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"tritonserver exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            get(f"{http}/v2/health/ready")
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"not ready after 180 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)
    yield http, f"http://127.0.0.1:{ports['METRICS']}", log_path
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_serves_the_rewritten_repository(entrypoint_server):
    http, _, log_path = entrypoint_server
    tokenizer = json.loads(get(f"{http}/v2/models/tokenizer/config"))
    assert [(group["kind"], group["count"]) for group in tokenizer["instance_group"]] == [("KIND_CPU", 1)]
    encoder = json.loads(get(f"{http}/v2/models/encoder/config"))
    assert encoder["instance_group"][0]["kind"] == "KIND_CPU"  # KIND_AUTO on a host without GPUs
    assert "entrypoint.sh: serving" in log_path.read_text()

    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": ["hello", "world"]}]})
    request = urllib.request.Request(f"{http}/v2/models/embed/infer", data=body.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        (output,) = json.loads(response.read())["outputs"]
    assert output["shape"] == [2, 384]


def test_exports_the_autoscaling_metric(entrypoint_server):
    http, metrics, _ = entrypoint_server
    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["queue me"]}]})
    urllib.request.urlopen(urllib.request.Request(f"{http}/v2/models/embed/infer", data=body.encode(), method="POST"), timeout=60).read()
    text = get(f"{metrics}/metrics").decode()
    # deploy/kubernetes/prometheus-adapter/values.yaml divides these two counters of the encoder.
    for metric in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert any(line.startswith(f'{metric}{{model="encoder"') for line in text.splitlines()), f"no {metric} for the encoder"
