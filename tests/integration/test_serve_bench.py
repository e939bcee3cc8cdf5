"""benchmarks/serve_bench.sh --tiny end to end on this machine: a real tritonserver on a tiny checkpoint,
the real perf_analyzer 2.41 (scripts/setup.sh unpacks it into .triton/perf/) for every scenario, the
in-process reference, and the report. Checks that each number in the tables is what perf_analyzer
measured, that the encoder was sent the tokenizer's ids, and that the knobs reach the served
configuration, so the GPU session only measures."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PERF_ANALYZER = ROOT / ".triton" / "perf" / "perf_analyzer"
SCENARIOS = ["embed-passages", "embed-queries", "embed-mixed", "encoder-passages", "encoder-mixed", "encoder-queries",
             "tokenizer-passages", "tokenizer1-passages"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PERF_ANALYZER.exists(), reason="no .triton/perf/perf_analyzer (scripts/setup.sh could not download it)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-bench")
    env = {key: value for key, value in os.environ.items() if not key.startswith("LORAEMBED_")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",  # the stub's python3: this venv's
        "HOST_PYTHON": sys.executable,
        "TMPDIR": str(tmp),
        **{f"BENCH_{name}_PORT": str(free_port()) for name in ("HTTP", "GRPC", "METRICS")},
    }
    env.pop("OUT", None)
    command = ["bash", str(ROOT / "benchmarks" / "serve_bench.sh"), "--tiny", "--out", str(tmp / "out"),
               "--work", str(tmp / "work"), "--tokenizer-instances", "1", "--encoder-queue-delay-us", "500"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (run,) = (tmp / "work").glob("run-*")
    return result, tmp / "out", tmp / "work", run


def test_writes_its_outputs_and_prints_the_report_last(bench):
    result, out, _, _ = bench
    # A superset check (a sorted list's >= compares lexicographically and passes with files missing).
    assert {p.name for p in out.iterdir()} >= {"RESULTS-serve.md", "serve_bench.csv", "serve_bench.json",
                                               "serve_bench.log", "serve_bench_raw.tar.gz"}
    report = (out / "RESULTS-serve.md").read_text()
    assert result.stdout.rstrip().endswith(report.rstrip())
    assert re.search(r"\[\d+ s\]: embed-passages c=1: Throughput: [\d.]+ infer/sec", result.stderr)  # progress with seconds
    assert "tritonserver 2.51.0, perf_analyzer 2.41.0 over gRPC" in report
    assert "Settings: tokenizer instances 1, tokenizer max_queue_delay 0 (repository) us, encoder max_queue_delay 500 us" in report
    # How long the server took to start, and each encoder instance's share, as its start-up log line says.
    start = re.search(r"^Server start: ready (\d+) s after it was started; encoder instances \(model load, adapter "
                      r"registry with its preloads, warm-up on a GPU, whole initialize\): (.*)\.$", report, re.M)
    assert start, report[:2000]
    phases = re.fullmatch(r"encoder_0_0: model ([\d.]+) s, adapters ([\d.]+) s, initialize ([\d.]+) s", start.group(2))
    assert phases, start.group(2)  # one CPU instance
    model_s, adapters_s, initialize_s = map(float, phases.groups())
    assert model_s + adapters_s <= initialize_s + 0.1 and initialize_s <= int(start.group(1)) + 1
    # The first requests once ready, timed one at a time (the tiny build has adapters: three of them).
    assert re.search(r"^First requests once ready \(one at a time, before other traffic, through `embed`\): one query [\d,]+ ms, "
                     r"32 passages [\d,]+ ms, 32 passages of one adapter [\d,]+ ms\.$", report, re.M), report[:3000]
    targets = report.split("## Targets (issue 5)")[1].split("##")[0]
    assert len(re.findall(r"\| (met|missed) \|$", targets, re.M)) == 4  # every target measured
    for name in SCENARIOS:
        assert f"(`{name}`)" in report
    with tarfile.open(out / "serve_bench_raw.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./server.log", "./runs.tsv", "./inprocess.json", "./embed-passages-c1.csv", "./embed-passages-c1.log"} <= names
    assert not any(name.endswith("_ids.json") for name in names)  # the large inputs stay out


def test_table_numbers_are_perf_analyzers(bench):
    _, out, _, run = bench
    rows = list(csv.DictReader(open(out / "serve_bench.csv")))
    assert sorted((r["scenario"], int(r["concurrency"])) for r in rows) == sorted(
        [(name, c) for name in SCENARIOS[:6] for c in (1, 2)] + [(name, 2) for name in SCENARIOS[6:]])
    stats = {name: json.loads((run / "inputs" / f"{name}_stats.json").read_text()) for name in ("queries", "passages")}
    report = (out / "RESULTS-serve.md").read_text()
    for row in rows:
        assert row["status"] == "0", row
        prefix = run / f"{row['scenario']}-c{row['concurrency']}"
        (measured,) = [r for r in csv.DictReader(open(f"{prefix}.csv")) if r["Concurrency"] == row["concurrency"]]
        texts_per_s = float(measured["Inferences/Second"])
        assert texts_per_s > 0 and float(row["texts_per_s"]) == texts_per_s
        assert float(row["requests_per_s"]) == pytest.approx(texts_per_s / int(row["batch"]))
        assert int(row["batch"]) == (1 if "queries" in row["scenario"] else 32)
        dataset = "queries" if "queries" in row["scenario"] else "passages"
        assert float(row["tokens_per_s"]) == pytest.approx(texts_per_s * stats[dataset]["mean_tokens"])
        assert float(row["p50_ms"]) == float(measured["p50 latency"]) / 1000 <= float(row["p99_ms"])
        assert float(row["p99_ms"]) == float(measured["p99 latency"]) / 1000
        log = Path(f"{prefix}.log").read_text()
        served = row["model"]
        assert f"Throughput: {measured['Inferences/Second']} infer/sec" in log
        # Per model, the server's own times, taken from perf_analyzer's printed output.
        parts = {"tokenizer": "tokenizer_i1" if served == "tokenizer_i1" else "tokenizer", "encoder": "encoder"}
        expected_models = {"embed": ["tokenizer", "encoder"], "encoder": ["encoder"]}.get(served, ["tokenizer"])
        for model in expected_models:
            if served == "embed":
                block = re.search(rf"  {parts[model]}, version: 1\n(.*?)\n\n", log + "\n\n", re.S).group(1)
            else:
                block = log.split("  Server:", 1)[1]
            infer_us = int(re.search(r"compute infer (\d+) usec", block).group(1))
            assert float(row[f"{model}_compute_infer_ms"]) == infer_us / 1000
            assert float(row[f"{model}_compute_ms"]) >= infer_us / 1000
        assert not row.get("encoder_queue_ms") if served.startswith("tokenizer") else row["encoder_queue_ms"]
        if not served.startswith("tokenizer"):  # the encoder's own count of the run's forward passes (metrics port)
            assert int(row["forward_passes"]) > 0 and int(row["graphed_passes"]) == 0, row  # the CPU: all eager
        share = float(row["share_of_inprocess"])
        assert 0 < share < 100
        assert f"| {row['concurrency']} | {float(row['requests_per_s']):,.0f} | {texts_per_s:,.0f} |" in report


def test_the_encoder_is_sent_the_tokenizers_ids(bench):
    _, _, work, run = bench
    from loraembed.tokenization import TextTokenizer

    texts = (work / "passages.txt").read_text().splitlines()
    input_ids, attention_mask = TextTokenizer(work / "model", 512).encode(texts)
    expected = [ids[:length].tolist() for ids, length in zip(input_ids, attention_mask.sum(1))]
    for name in ("passages", "passages_mixed"):
        entries = json.loads((run / "inputs" / f"{name}_ids.json").read_text())["data"]
        assert {len(e["INPUT_IDS"]["content"]) for e in entries} == {max(map(len, expected))}  # one shape: -b 32 works
        sent = [e["INPUT_IDS"]["content"][: sum(e["ATTENTION_MASK"]["content"])] for e in entries]
        assert sent == expected
    text_entries = json.loads((run / "inputs" / "passages_mixed_text.json").read_text())["data"]
    id_entries = json.loads((run / "inputs" / "passages_mixed_ids.json").read_text())["data"]
    adapters = [e["ADAPTER_ID"][0] for e in text_entries]
    assert adapters == [e["ADAPTER_ID"][0] for e in id_entries] and [e["TEXT"][0] for e in text_entries] == texts
    assert set(adapters) == {"a00", "a01", "a02", "a03"}  # --tiny: 4 adapters, drawn per text
    inprocess = json.loads((run / "inprocess.json").read_text())
    rows = {row["workload"]: row for row in inprocess["rows"]}
    assert rows["passages"]["tokens"] == rows["passages, mixed adapters"]["tokens"] == int(np.sum(attention_mask))


def test_knobs_reach_the_served_repository(bench):
    _, _, _, run = bench
    repository = run / "model_repository"
    assert "instance_group [ { kind: KIND_CPU, count: 1 } ]" in (repository / "tokenizer" / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 500" in (repository / "encoder" / "config.pbtxt").read_text()
    variant = (repository / "tokenizer_i1" / "config.pbtxt").read_text()
    assert 'name: "tokenizer_i1"' in variant and "count: 1 }" in variant
    assert (ROOT / "model_repository" / "encoder" / "config.pbtxt").read_text().count("max_queue_delay_microseconds: 0\n") == 1
    server_log = (run / "server.log").read_text()
    assert "successfully loaded 'tokenizer_i1'" in server_log and "loraembed encoder ready" in server_log
