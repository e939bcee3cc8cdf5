"""docker/entrypoint.sh: the tritonserver command line it builds, and the instance groups it writes
(into a copy of the repository) for LORAEMBED_GPUS and on a GPU host, run against a stand-in
tritonserver and a stand-in nvidia-smi (no GPU unless a test says so)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
REPOSITORY = ROOT / "model_repository"
KIND = model_config_pb2.ModelInstanceGroup.Kind


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def without_instance_group(config: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig.FromString(config.SerializeToString())
    del config.instance_group[:]
    return config


NO_GPU = "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n"
ONE_GPU = "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"


@pytest.fixture
def run_entrypoint(tmp_path):
    """Run the entrypoint with `env` added (and `nvidia_smi`, the stand-in's script); returns
    (result, tritonserver's arguments or None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args_file = tmp_path / "tritonserver-args"
    fake = bin_dir / "tritonserver"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{args_file}"\n')
    fake.chmod(0o755)

    def run(env: dict[str, str], *args: str, nvidia_smi: str = NO_GPU):
        (bin_dir / "nvidia-smi").write_text(nvidia_smi)
        (bin_dir / "nvidia-smi").chmod(0o755)
        environ = {key: value for key, value in os.environ.items() if not key.startswith("LORAEMBED_")}
        environ |= {"PATH": f"{bin_dir}:{environ['PATH']}", "TMPDIR": str(tmp_path)} | env
        args_file.unlink(missing_ok=True)
        result = subprocess.run(["bash", str(ENTRYPOINT), *args], env=environ, capture_output=True, text=True, timeout=60)
        return result, (args_file.read_text().splitlines() if args_file.exists() else None)

    return run


def served_repository(argv: list[str]) -> Path:
    (flag,) = [arg for arg in argv if arg.startswith("--model-repository=")]
    return Path(flag.split("=", 1)[1])


def test_default_serves_the_repository_itself_with_the_documented_flags(run_entrypoint):
    result, argv = run_entrypoint({}, "--log-verbose=1")
    assert result.returncode == 0, result.stderr
    assert served_repository(argv) == REPOSITORY
    for flag in ["--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--disable-auto-complete-config",
                 "--backend-config=python,shm-default-byte-size=16777216", "--exit-on-error=true",
                 "--strict-readiness=true"]:
        assert flag in argv
    assert argv[-1] == "--log-verbose=1"  # the container's arguments come last, so they win


def test_ports_and_shared_memory_come_from_the_environment(run_entrypoint):
    result, argv = run_entrypoint({"LORAEMBED_HTTP_PORT": "9000", "LORAEMBED_GRPC_PORT": "9001",
                                   "LORAEMBED_METRICS_PORT": "9002", "LORAEMBED_SHM_DEFAULT_BYTE_SIZE": "1048576"})
    assert result.returncode == 0, result.stderr
    assert {"--http-port=9000", "--grpc-port=9001", "--metrics-port=9002",
            "--backend-config=python,shm-default-byte-size=1048576"} <= set(argv)


@pytest.mark.parametrize(
    ("env", "nvidia_smi", "count", "gpus", "tokenizers"),
    [
        ({"LORAEMBED_GPUS": "0,1"}, NO_GPU, 3, [0, 1], 4),  # the GPU defaults: 3 per GPU, 4 tokenizers
        ({"LORAEMBED_GPUS": "3"}, NO_GPU, 3, [3], 4),
        ({"LORAEMBED_GPUS": "1,0", "LORAEMBED_INSTANCES_PER_GPU": "1"}, NO_GPU, 1, [1, 0], 4),
        ({"LORAEMBED_INSTANCES_PER_GPU": "2"}, NO_GPU, 2, [], 2),  # count on each visible GPU
        ({}, ONE_GPU, 3, [], 4),  # nvidia-smi lists a GPU: the GPU defaults
        ({"LORAEMBED_GPUS": "all", "LORAEMBED_TOKENIZER_INSTANCES": "8"}, ONE_GPU, 3, [], 8),
    ],
)
def test_gpus_rewrite_only_the_instance_groups_of_a_copy(run_entrypoint, env, nvidia_smi, count, gpus, tokenizers):
    original = {path: path.read_bytes() for path in REPOSITORY.glob("*/config.pbtxt")}
    result, argv = run_entrypoint(env, nvidia_smi=nvidia_smi)
    assert result.returncode == 0, result.stderr
    copy = served_repository(argv)
    assert copy != REPOSITORY and copy.is_dir()
    encoder, tokenizer = (parse_config(copy / model / "config.pbtxt") for model in ("encoder", "tokenizer"))
    (group,) = encoder.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (KIND.KIND_GPU, count, gpus)
    (group,) = tokenizer.instance_group
    assert (group.kind, group.count) == (KIND.KIND_CPU, tokenizers)
    # Everything else is the repository's, byte for byte or field for field.
    for model, config in (("encoder", encoder), ("tokenizer", tokenizer)):
        assert without_instance_group(config) == without_instance_group(parse_config(REPOSITORY / model / "config.pbtxt"))
    if tokenizers == 2:
        assert (copy / "tokenizer" / "config.pbtxt").read_bytes() == (REPOSITORY / "tokenizer" / "config.pbtxt").read_bytes()
    assert (copy / "embed" / "config.pbtxt").read_bytes() == (REPOSITORY / "embed" / "config.pbtxt").read_bytes()
    assert (copy / "encoder" / "1" / "model.py").read_bytes() == (REPOSITORY / "encoder" / "1" / "model.py").read_bytes()
    assert {path: path.read_bytes() for path in REPOSITORY.glob("*/config.pbtxt")} == original


def test_tokenizer_instances(run_entrypoint):
    result, argv = run_entrypoint({"LORAEMBED_TOKENIZER_INSTANCES": "6"})
    assert result.returncode == 0, result.stderr
    copy = served_repository(argv)
    (group,) = parse_config(copy / "tokenizer" / "config.pbtxt").instance_group
    assert (group.kind, group.count) == (KIND.KIND_CPU, 6)
    assert parse_config(copy / "encoder" / "config.pbtxt") == parse_config(REPOSITORY / "encoder" / "config.pbtxt")


@pytest.mark.parametrize("value", ["", "all"])
def test_all_gpus_keeps_the_repository(run_entrypoint, value):
    result, argv = run_entrypoint({"LORAEMBED_GPUS": value})
    assert result.returncode == 0, result.stderr
    assert served_repository(argv) == REPOSITORY


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LORAEMBED_GPUS": "0,a"}, "LORAEMBED_GPUS must be GPU ids like 0,1"),
        ({"LORAEMBED_GPUS": "0,,1"}, "LORAEMBED_GPUS must be GPU ids like 0,1"),
        ({"LORAEMBED_GPUS": "-1"}, "LORAEMBED_GPUS must be GPU ids like 0,1"),
        ({"LORAEMBED_GPUS": "0 1"}, "LORAEMBED_GPUS must be GPU ids like 0,1"),
        ({"LORAEMBED_INSTANCES_PER_GPU": "0"}, "LORAEMBED_INSTANCES_PER_GPU must be a positive integer"),
        ({"LORAEMBED_TOKENIZER_INSTANCES": "two"}, "LORAEMBED_TOKENIZER_INSTANCES must be a positive integer"),
        ({"LORAEMBED_MODEL_REPOSITORY": "/no/such/repository"}, "no model repository"),
    ],
)
def test_bad_settings_stop_before_the_server_starts(run_entrypoint, env, message):
    result, argv = run_entrypoint(env)
    assert result.returncode == 2
    assert message in result.stderr
    assert argv is None


def test_a_repository_whose_instance_group_cannot_be_found_is_refused(run_entrypoint, tmp_path):
    repository = tmp_path / "repository"
    (repository / "encoder").mkdir(parents=True)
    (repository / "encoder" / "config.pbtxt").write_text('name: "encoder"\ninstance_group [\n  { kind: KIND_AUTO }\n]\n'
                                                         'instance_group [ { kind: KIND_CPU } ]\n')
    result, argv = run_entrypoint({"LORAEMBED_MODEL_REPOSITORY": str(repository), "LORAEMBED_GPUS": "0"})
    assert result.returncode == 2
    assert "has 2 lines starting with instance_group; expected exactly one" in result.stderr
    assert argv is None


def test_gpu_defaults_line_is_the_one_serve_bench_reads():
    """The serving benchmarks read the GPU defaults from this one line of the entrypoint
    (benchmarks/entrypoint_defaults.sh), so their reports name the counts without a second copy of
    them; the cases above pin the values."""
    script = (Path(__file__).resolve().parents[2] / "docker" / "entrypoint.sh").read_text()
    lines = re.findall(r"^ *per_gpu=\$\{per_gpu:-(\d+)\} tokenizers=\$\{tokenizers:-(\d+)\}$", script, re.M)
    assert lines == [("3", "4")]
