"""benchmarks/serve_report.py: perf_analyzer 2.41's printed output parsed per composing model (on a
real H100 log), and the tables and targets derived from a raw folder, failed and skipped runs included.
The whole benchmark against a real server is tests/integration/test_serve_bench.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_report  # noqa: E402

H100_LOG = ROOT / "benchmarks" / "results" / "serve-quick-passages-2026-11-27-h100-perf.log"
CSV_HEADER = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
              "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
              "Avg latency,request/response,response wait")


def concurrency_block(text: str, concurrency: int) -> str:
    """One 'Request concurrency: N' block, as serve_bench.sh's one-level runs print it."""
    blocks = text.split("Request concurrency: ")
    (block,) = [b for b in blocks[1:] if b.startswith(f"{concurrency}\n")]
    return "Request concurrency: " + block


def test_composing_models_of_the_h100_ensemble_log():
    models = serve_report.parse_log(concurrency_block(H100_LOG.read_text(), 6), "embed")
    assert set(models) == {"embed", "encoder", "tokenizer"}
    assert models["embed"]["latency"] == 35.840 and models["embed"]["queue"] == 8.969
    assert models["embed"]["compute"] == 26.855 and models["embed"]["overhead"] == 0.016
    encoder = models["encoder"]
    assert (encoder["queue"], encoder["compute_input"], encoder["compute_infer"], encoder["compute_output"]) == (
        8.468, 0.140, 17.252, 0.642)
    assert encoder["compute"] == pytest.approx(0.140 + 17.252 + 0.642)
    assert encoder["requests_per_execution"] == pytest.approx(1596 / 664)
    tokenizer = models["tokenizer"]
    assert tokenizer["compute_infer"] == 8.526 and tokenizer["requests_per_execution"] == pytest.approx(1598 / 820)


def test_a_model_alone_has_its_times_in_the_server_block():
    log = """Request concurrency: 4
  Client: 
    Request count: 2627
    Throughput: 6981.16 infer/sec
  Server: 
    Inference count: 21016
    Execution count: 730
    Successful request count: 2627
    Avg request latency: 4151 usec (overhead 4 usec + queue 1062 usec + compute input 42 usec + compute infer 2707 usec + compute output 335 usec)

Inferences/Second vs. Client Average Batch Latency
"""
    models = serve_report.parse_log(log, "encoder")
    assert list(models) == ["encoder"]
    assert models["encoder"]["compute"] == pytest.approx(0.042 + 2.707 + 0.335)
    assert models["encoder"]["requests_per_execution"] == pytest.approx(2627 / 730)


def write_run(raw: Path, name: str, concurrency: int, texts_per_s: float, p50_us: int, p99_us: int, log: str = "") -> None:
    (raw / f"{name}-c{concurrency}.csv").write_text(
        f"{CSV_HEADER}\n{concurrency},{texts_per_s},1,2,3,4,5,6,7,{p50_us},{p50_us},{p99_us},{p99_us},{p50_us},1,1\n")
    (raw / f"{name}-c{concurrency}.log").write_text(log or "  Server: \n    Avg request latency: 10 usec (overhead 1 usec + queue 2 usec + compute input 3 usec + compute infer 4 usec + compute output 0 usec)\n")


@pytest.fixture
def raw(tmp_path):
    raw = tmp_path / "raw"
    (raw / "inputs").mkdir(parents=True)
    for name, mean in (("passages", 100.0), ("passages_mixed", 100.0), ("queries", 16.0)):
        (raw / "inputs" / f"{name}_stats.json").write_text(json.dumps(
            dict(texts=64, tokens=int(64 * mean), mean_tokens=mean, median_tokens=mean, max_tokens=200, padded_to=200)))
    (raw / "inprocess.json").write_text(json.dumps(dict(engine="model=m device=cuda", rows=[
        dict(workload="passages", texts=64, tokens=6400, engine_tokens_per_s=2e6, forward_tokens_per_s=2.2e6),
        dict(workload="passages, mixed adapters", texts=64, tokens=6400, engine_tokens_per_s=1.5e6, forward_tokens_per_s=1.6e6,
             graphs_tokens_per_s=1.75e6),
        dict(workload="queries", texts=64, tokens=1024, engine_tokens_per_s=1e6, forward_tokens_per_s=1.1e6)],
        tokenizer=dict(texts_per_s=10000.0))))
    runs = []
    for c, texts_per_s in ((1, 4000.0), (8, 16000.0), (64, 15000.0)):  # passages: 1.6M tokens/s at best, 80%
        write_run(raw, "embed-passages", c, texts_per_s, 10000 * c, 20000 * c)
        runs.append(("embed-passages", c, "0"))
    write_run(raw, "embed-mixed", 8, 15000.0, 80000, 160000)  # 1.5M: 6% below the base model
    runs += [("embed-mixed", 8, "0"), ("embed-mixed", 64, "skipped")]
    for c, rate, p50, p99 in ((1, 250.0, 4000, 7000), (32, 9000.0, 3500, 24000), (64, 9500.0, 7000, 30000)):
        write_run(raw, "embed-queries", c, rate, p50, p99)
        runs.append(("embed-queries", c, "0"))
    (raw / "encoder-queries-c1.log").write_text("Thread [0] had error: row 0 is 600 tokens, more than max_seq_len=512\n")
    runs.append(("encoder-queries", 1, "99"))
    write_run(raw, "tokenizer8-passages", 16, 30000.0, 1000, 2000)
    runs.append(("tokenizer8-passages", 16, "0"))
    runs.append(("encoder-passages", 2, "0"))  # exit status 0 but no CSV: reported, not fatal
    (raw / "runs.tsv").write_text("".join(f"{n}\t{c}\t{s}\n" for n, c, s in runs))
    return raw


def test_rows_are_derived_from_the_csvs(raw):
    rows, extra = serve_report.collect(raw)
    best = next(r for r in rows if r["scenario"] == "embed-passages" and r["concurrency"] == 8)
    assert best["texts_per_s"] == 16000.0 and best["requests_per_s"] == 500.0  # -b 32: perf_analyzer counts texts
    assert best["tokens_per_s"] == 1.6e6 and best["share_of_inprocess"] == pytest.approx(0.8)
    assert best["p50_ms"] == 80.0 and best["p99_ms"] == 160.0
    assert best["embed_compute_ms"] == pytest.approx(0.007)
    tokenizer = next(r for r in rows if r["scenario"] == "tokenizer8-passages")
    assert tokenizer["model"] == "tokenizer_i8" and tokenizer["share_of_inprocess"] == 3.0  # against 10,000 passages/s
    assert tokenizer["tokenizer_compute_infer_ms"] == 0.004
    skipped = next(r for r in rows if r["status"] == "skipped")
    assert skipped["error"] == "skipped: time budget"
    failed = next(r for r in rows if r["status"] == "99")
    assert "more than max_seq_len=512" in failed["error"]
    unreadable = next(r for r in rows if r["scenario"] == "encoder-passages")
    assert unreadable["status"] == "unreadable" and unreadable["error"].startswith("no CSV row")


def test_targets_met_and_missed(raw):
    rows, extra = serve_report.collect(raw)
    verdicts = {target.split(":")[0]: (measured, verdict) for target, measured, verdict in serve_report.targets(rows, extra["inprocess"])}
    assert verdicts["32 passages per request"] == ("1.600M at concurrency 8 vs 2.000M in-process: 80%", "met")
    # 9,500 requests/s has p99 30 ms: the best within 25 ms is 9,000.
    assert verdicts["Single-query requests"] == ("9,000 requests/s at concurrency 32 (p99 24.0 ms)", "met")
    assert verdicts["Concurrency 1, one ~16-token query"][1] == "met"
    assert verdicts["Concurrency 1, one ~16-token query"][0].startswith("p50 4.00 ms")
    assert verdicts["Mixed adapters cost ≤ 10% throughput against the base model through the server"] == (
        "peak 1.500M vs 1.600M tokens/s: 6% less", "met")


def test_missing_scenarios_are_not_measured(tmp_path):
    raw = tmp_path / "raw"
    (raw / "inputs").mkdir(parents=True)
    write_run(raw, "embed-passages", 1, 100.0, 1000, 2000)
    (raw / "runs.tsv").write_text("embed-passages\t1\t0\n")
    rows, extra = serve_report.collect(raw)
    verdicts = [verdict for _, _, verdict in serve_report.targets(rows, extra["inprocess"])]
    assert verdicts == ["–", "–", "–", "–"]


def test_report_writes_the_tables(raw, tmp_path, capsys, monkeypatch):
    (raw / "server.log").write_text("| server_version | 2.51.0 |\nloraembed encoder ready: model=m device=cuda:0\n")
    monkeypatch.setattr(sys, "argv", ["serve_report.py", "report", str(raw), "--out-dir", str(tmp_path / "out"),
                                      "--report-dir", str(tmp_path / "report"), "--meta", "card=Test GPU"])
    serve_report.main()
    text = (tmp_path / "report" / "RESULTS-serve.md").read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    assert "Test GPU" in text and "tritonserver 2.51.0" in text and "Server's encoder: `model=m device=cuda:0`" in text
    assert "| 8 | 500 | 16,000 | 1.600M | 80% | 80.0 | 160.0 |" in text
    assert "| 64 | skipped: time budget |" in text
    assert "| passages, mixed adapters | 64 | 6,400 | 1.500M | 1.600M | 1.750M |" in text  # CUDA graphs measured
    assert "| passages | 64 | 6,400 | 2.000M | 2.200M | – |" in text  # not measured (the CPU)
    rows = (tmp_path / "out" / "serve_bench.csv").read_text().splitlines()
    assert rows[0].startswith("scenario,model,batch,concurrency,status") and len(rows) == 1 + 11


def _metrics_text(passes: tuple[int, int], graphed: tuple[int, int], captures: tuple[int, int], evictions: int) -> str:
    """The encoder's metrics as Triton serves them: two instances, an adapter-labelled series, Triton's own."""
    lines = ['nv_inference_count{model="encoder",version="1"} 999']
    for instance in (0, 1):
        labels = f'instance="encoder_0_{instance}",model="encoder"'
        lines += [f"loraembed_forward_passes_total{{{labels}}} {passes[instance]}",
                  f"loraembed_forward_passes_graphed_total{{{labels}}} {graphed[instance]}",
                  f"loraembed_cuda_graph_captures_total{{{labels}}} {captures[instance]}",
                  f"loraembed_cuda_graph_evictions_total{{{labels}}} {evictions if instance else 0}",
                  f'loraembed_adapter_texts_total{{adapter="a",{labels}}} 12345']
    return "\n".join(lines) + "\n"


def test_each_run_reports_the_encoders_graph_replays(raw, tmp_path, monkeypatch):
    """The metrics scraped around a run become its forward passes, the share replayed as CUDA graphs,
    captures and evictions, summed over the instances; runs without scrapes report none."""
    (raw / "embed-mixed-c8.metrics-before").write_text(_metrics_text((100, 50), (90, 50), (3, 2), 0))
    (raw / "embed-mixed-c8.metrics-after").write_text(_metrics_text((300, 250), (280, 230), (5, 2), 1))
    rows, _ = serve_report.collect(raw)
    mixed = next(r for r in rows if r["scenario"] == "embed-mixed" and r["concurrency"] == 8)
    assert (mixed["forward_passes"], mixed["graphed_passes"], mixed["graph_captures"], mixed["graph_evictions"]) == (
        400, 370, 2, 1)
    assert "forward_passes" not in next(r for r in rows if r["scenario"] == "embed-passages")
    monkeypatch.setattr(sys, "argv", ["serve_report.py", "report", str(raw), "--out-dir", str(tmp_path / "out")])
    serve_report.main()
    text = (tmp_path / "out" / "RESULTS-serve.md").read_text()
    assert ("Encoder forward passes during each perf_analyzer run (the metrics port, all instances): c=8: 400, 92.5%"
            " replayed as CUDA graphs, 2 captures, 1 evictions.") in text
    assert text.count("Encoder forward passes during") == 1


def test_scenarios_lists_what_to_run(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["serve_report.py", "scenarios", "embed-passages,encoder-queries,tokenizer4-passages"])
    serve_report.main()
    assert capsys.readouterr().out.splitlines() == [
        "embed-passages\tembed\t32\tpassages_text.json",
        "encoder-queries\tencoder\t1\tqueries_ids.json",
        "tokenizer4-passages\ttokenizer_i4\t32\tpassages_text.json",
    ]
    monkeypatch.setattr(sys, "argv", ["serve_report.py", "scenarios", "embed-typo"])
    with pytest.raises(SystemExit, match="unknown scenario 'embed-typo'"):
        serve_report.main()
