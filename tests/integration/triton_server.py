"""A real tritonserver (the one scripts/setup.sh unpacks into .triton/) for integration tests.

Generic: it knows nothing about loraembed's models. Usage::

    with TritonServer(repo, env={"LORAEMBED_DTYPE": "float32"}) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_HOME = REPO_ROOT / ".triton" / "pytriton" / "tritonserver"


class TritonServerError(RuntimeError):
    """The server exited or never became ready; the message ends with the tail of its log."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM the server if pytest dies without tearing down.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonServer:
    """Start tritonserver on ``model_repository`` on free loopback ports and wait until it is ready.

    ``env`` is added to (a value of None removes from) this process's environment; PATH gets the
    venv's bin/ first, since the Python backend's stub runs the first ``python3`` on PATH.
    ``args`` are appended to the command line (later flags override earlier ones).
    The log (stdout and stderr) goes to ``log_dir/tritonserver-<http port>.log``.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        env: Mapping[str, str | None] | None = None,
        args: Sequence[str] = (),
        *,
        log_dir: str | os.PathLike | None = None,
        startup_timeout: float = 180.0,
        triton_home: str | os.PathLike = TRITON_HOME,
    ):
        self.model_repository = Path(model_repository).resolve()
        self.env = dict(env or {})
        self.args = list(args)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tritonserver-"))
        self.startup_timeout = startup_timeout
        self.triton_home = Path(triton_home)
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.log_path: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TritonServer({str(self.model_repository)!r}, http={self.http_url}, log={self.log_path})"

    def start(self) -> TritonServer:
        """Start the server and block until ``/v2/health/ready`` answers 200."""
        binary = self.triton_home / "bin" / "tritonserver"
        if not binary.exists():
            raise TritonServerError(f"{binary} is missing: run scripts/setup.sh")
        # The ports are free when picked but not reserved; another process may take one before
        # the server binds it, so retry with fresh ports when that is why it failed.
        for attempt in range(3):
            try:
                self._launch(binary)
                self._wait_ready()
                return self
            except TritonServerError as e:
                self.stop()
                if attempt == 2 or "already in use" not in str(e):
                    raise

    def _launch(self, binary: Path) -> None:
        self.http_port, self.grpc_port, self.metrics_port = (_free_port() for _ in range(3))
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.triton_home / 'backends'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            "--log-verbose=0",
            "--backend-config=python,shm-default-byte-size=16777216",
            *self.args,
        ]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"tritonserver-{self.http_port}.log"
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() can kill the stubs too
                preexec_fn=_die_with_parent,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(f"tritonserver exited with {code} before it was ready\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 400 while models load
            if time.monotonic() > deadline:
                raise TritonServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.25)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, lines: int = 100) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful: unloads the models), then SIGKILL the whole process group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                # Still alive, so its pid is still its group's id: kill it and its stubs.
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
