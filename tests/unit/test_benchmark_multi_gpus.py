"""benchmarks/multi_gpu.sh end to end on a CPU machine, with stand-ins for tritonserver,
perf_analyzer and nvidia-smi: its flow (two servers on the GPUs asked for, a perf_analyzer sweep
per server, the CSV parsing and the table) is checked here so the GPU session only measures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_TRITONSERVER = r'''
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

flags = dict(arg[2:].split("=", 1) for arg in sys.argv[1:] if arg.startswith("--") and "=" in arg)
config = text_format.Parse((Path(flags["model-repository"]) / "encoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
groups = [json_format.MessageToDict(group, preserving_proto_field_name=True) for group in config.instance_group]
for group in groups:
    group["gpus"] = [int(gpu) for gpu in group.get("gpus", [])]
print("loraembed encoder ready: fake engine on", groups, flush=True)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/v2/health/ready": b"", "/v2/models/encoder/config": json.dumps({"instance_group": groups}).encode()}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass

# perf_analyzer's stand-in asks the "gRPC" port which GPUs the encoder has.
servers = [ThreadingHTTPServer(("127.0.0.1", int(flags[name])), Handler) for name in ("http-port", "grpc-port")]
threading.Thread(target=servers[1].serve_forever, daemon=True).start()
servers[0].serve_forever()
'''

FAKE_PERF_ANALYZER = r'''
import json, sys, urllib.request
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
assert value("-m") == "embed" and value("-i") == "grpc" and value("-b") == "32"
data = json.load(open(value("--input-data")))["data"]
assert len(data) >= 32 and all(list(entry) == ["TEXT"] and len(entry["TEXT"]) == 1 for entry in data)
start, end = value("--concurrency-range").split(":")
assert start == end
groups = json.load(urllib.request.urlopen(f"http://{value('-u')}/v2/models/encoder/config"))["instance_group"]
gpus = sum(len(group["gpus"]) for group in groups)
if "-f" in args:
    c = int(start)
    header = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
              "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency")
    with open(value("-f"), "w") as f:
        f.write(f"{header}\n{c},{1000 * gpus * c},1,2,3,4,5,6,7,8000,9000,9500,12000\n\n")
        f.write(f"{header}\n{c},1,1,2,3,4,5,6,7,1,1,1,1\n")  # a composing model's block after the ensemble's
'''

FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *index*) printf '0\\n1\\n' ;;
  *name*) echo "Fake GPU 80GB" ;;
esac
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_benchmark_compares_one_gpu_with_two(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, source in (("tritonserver", FAKE_TRITONSERVER), ("perf_analyzer", FAKE_PERF_ANALYZER)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{source}")
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")  # the stand-in server never reads the model
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if not key.startswith("LORAEMBED_")}
    env |= {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}",
        "TRITON_BACKENDS": str(tmp_path / "backends"),
        "TMPDIR": str(tmp_path),
        **{f"BENCH_{name}_PORT": str(free_port()) for name in ("HTTP", "GRPC", "METRICS")},
    }
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "multi_gpu.sh"), "--model", str(model), "--gpus", "1,0",
                             "--concurrency", "2,4", "--measurement-ms", "100", "--out", str(out),
                             "--raw", str(tmp_path / "raw")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "encoder instance groups: [('KIND_GPU', 3, [1])]" in result.stderr
    assert "encoder instance groups: [('KIND_GPU', 3, [1, 0])]" in result.stderr
    report = (out / "RESULTS-multi-gpu.md").read_text()
    assert report in result.stdout
    assert "Fake GPU 80GB (GPUs 1,0)" in report and "fake engine" in report
    assert "| 2 | 2000 | 4000 | 2.00x | 12.0 | 12.0 |" in report
    assert "| 4 | 4000 | 8000 | 2.00x | 12.0 | 12.0 |" in report
    assert "Peak: 1 GPU 4000 passages/s, 2 GPUs 8000 passages/s: 2.00x" in report
    passages = json.loads((tmp_path / "raw" / "passages.json").read_text())["data"]
    assert len(passages) == 2048
