from __future__ import annotations

import os
from pathlib import Path

import pytest

from triton_server import TritonServer

GPU_TESTS = Path(__file__).parent / "gpu"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    # Everything under tests/gpu is a GPU test; GPU tests are skipped on machines without CUDA.
    for item in items:
        if GPU_TESTS in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _cuda_available():  # import torch only when there are GPU tests
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def triton_server_factory(tmp_path_factory):
    """Start (or reuse) a real tritonserver: ``factory(model_repository, env=None, args=())``.

    Servers are shared for the session: the same repository, env and args give the same running
    server (started again if it died), so several test modules pay for one start-up. All are
    stopped at the end of the session.
    """
    servers: dict[tuple, TritonServer] = {}

    def start(model_repository: str | os.PathLike, env: dict | None = None, args=()) -> TritonServer:
        key = (str(Path(model_repository).resolve()), tuple(sorted((env or {}).items())), tuple(args))
        server = servers.get(key)
        if server is None or server.process is None or server.process.poll() is not None:
            log_dir = tmp_path_factory.mktemp("tritonserver")
            servers[key] = server = TritonServer(model_repository, env, args, log_dir=log_dir).start()
        return server

    yield start
    for server in servers.values():
        server.stop()
