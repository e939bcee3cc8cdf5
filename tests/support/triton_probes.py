"""Looking at a running tritonserver from outside: readiness, the Python-backend stub processes of
a model, their memory, and the client calls the reliability tests share. Linux /proc only."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

STUB_BINARY = "triton_python_backend_stub"


def http_status(server, path: str, method: str = "GET") -> int:
    """The HTTP status of ``path`` on the server (e.g. /v2/health/ready); 0 if it does not answer."""
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=b"" if method == "POST" else None,
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def server_ready(server) -> bool:
    return http_status(server, "/v2/health/ready") == 200


def metric_total(server, name: str, **labels: str) -> float:
    """The sum of every series of metric ``name`` (those with ``labels``) on the metrics port."""
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{key}="{wanted}"' in series for key, wanted in labels.items()):
            total += float(value)
    return total


def settled_metric_total(server, name: str, **labels: str) -> float:
    """``metric_total`` once it has stopped changing: the encoder publishes its loraembed_* metrics
    from a thread ~10 ms after each batch, so a read right after a response can miss that batch."""
    time.sleep(0.05)
    value = metric_total(server, name, **labels)
    for _ in range(50):
        time.sleep(0.2)
        value, previous = metric_total(server, name, **labels), value
        if value == previous:
            break
    return value


def stub_pids(server, model: str) -> list[int]:
    """Pids of the stub processes (one per instance) that tritonserver started for ``model``.

    A stub's command line is ``triton_python_backend_stub <repository>/<model>/<version>/model.py ...``.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if parent != server.process.pid or not command[0].endswith(STUB_BINARY.encode()):
            continue
        model_file = Path(command[1].decode())
        if model_file.parent.parent.name == model:
            pids.append(int(entry.name))
    return sorted(pids)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int) -> int:
    """Reset the process's peak resident set size (VmHWM) to its current RSS; return that, in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def bytes_input(name: str, values) -> grpcclient.InferInput:
    """A BYTES input [n, 1] from str (UTF-8 encoded) or bytes values."""
    array = np.array([[v if isinstance(v, bytes) else v.encode("utf-8")] for v in values], dtype=object)
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def int_input(name: str, array: np.ndarray, datatype: str = "INT64") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def embed(client, texts, adapter_ids=None, parameters=None) -> np.ndarray:
    """`embed` ensemble: texts (and, if given, ADAPTER_ID per text) -> EMBEDDING [n, d]."""
    inputs = [bytes_input("TEXT", texts)]
    if adapter_ids is not None:
        inputs.append(bytes_input("ADAPTER_ID", adapter_ids))
    return client.infer("embed", inputs, parameters=parameters).as_numpy("EMBEDDING")


class ClientPerThread:
    """One gRPC client per thread (a client's channel is not meant to be shared by busy threads)."""

    def __init__(self, url: str):
        self.url = url
        self._local = threading.local()

    def get(self) -> grpcclient.InferenceServerClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = grpcclient.InferenceServerClient(self.url)
        return client
