"""The tables and the plot of benchmarks/serve_bench.sh, from perf_analyzer's CSVs and logs.

    python benchmarks/serve_report.py scenarios LIST      # what serve_bench.sh runs, one TSV line each
    python benchmarks/serve_report.py report RAW --out-dir DIR [--report-dir DIR] [--meta KEY=VALUE ...]

RAW is serve_bench.sh's raw folder: runs.tsv (scenario, concurrency, perf_analyzer's exit status),
SCENARIO-cN.csv (perf_analyzer -f --verbose-csv) and SCENARIO-cN.log (its output) per run,
inputs/*_stats.json (tokens per text), inprocess.json (serve_bench_setup.py inprocess), server.log,
and SCENARIO-cN.metrics-before / -after: the encoder's `loraembed_*` metrics scraped around the run
(forward passes, the share of them replayed as CUDA graphs, captures, evictions).

perf_analyzer 2.41's CSV has the client's throughput and latency percentiles and, for an ensemble,
only the ensemble's own server times; each composing model's queue, compute and overhead times are
in its printed output ("Composing models:"), which is parsed here. Writes serve_bench.csv (one row
per run), serve_bench.json, RESULTS-serve.md and serve_bench.png to --out-dir, and the last two to
--report-dir too. Prints the markdown.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import re
import sys
from pathlib import Path

# name -> (model, texts per request, input file stem, dataset, in-process row, title)
SCENARIOS = {
    "embed-queries": ("embed", 1, "queries_text", "queries", "queries", "embed (text in), one query per request"),
    "embed-passages": ("embed", 32, "passages_text", "passages", "passages", "embed (text in), 32 passages per request, base model"),
    "embed-mixed": ("embed", 32, "passages_mixed_text", "passages", "passages, mixed adapters",
                    "embed (text in), 32 passages per request, each with one of the adapters"),
    "encoder-queries": ("encoder", 1, "queries_ids", "queries", "queries", "encoder (ids in), one query per request"),
    "encoder-passages": ("encoder", 32, "passages_ids", "passages", "passages", "encoder (ids in), 32 passages per request, base model"),
    "encoder-mixed": ("encoder", 32, "passages_mixed_ids", "passages", "passages, mixed adapters",
                      "encoder (ids in), 32 passages per request, each with one of the adapters"),
    "tokenizer-passages": ("tokenizer", 32, "passages_text", "passages", "tokenizer",
                           "tokenizer alone (the repository's instances), 32 passages per request"),
}
TOKENIZER_VARIANT = re.compile(r"tokenizer(\d+)-passages")  # tokenizer8-passages: a copy with 8 instances
MODELS = ("tokenizer", "encoder")
TIMES = ("queue", "compute_input", "compute_infer", "compute_output", "overhead")
# The encoder's metrics (README, Metrics) reported per run, summed over its instances: row key -> metric.
GRAPH_METRICS = {
    "forward_passes": "loraembed_forward_passes_total",
    "graphed_passes": "loraembed_forward_passes_graphed_total",
    "graph_captures": "loraembed_cuda_graph_captures_total",
    "graph_evictions": "loraembed_cuda_graph_evictions_total",
}


def metric_sums(text: str) -> dict[str, float]:
    """Prometheus text -> the value of each `loraembed_*` metric without an adapter label, summed over
    the encoder's instances."""
    sums: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(loraembed_\w+)\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        if "adapter=" not in labels:
            sums[name] = sums.get(name, 0.0) + float(value)
    return sums


def metrics_of_run(raw: Path, name: str, concurrency: int) -> dict:
    """What the encoder counted during one run: GRAPH_METRICS' increments; {} without both scrapes."""
    files = [raw / f"{name}-c{concurrency}.metrics-{when}" for when in ("before", "after")]
    if not all(file.is_file() for file in files):
        return {}
    before, after = (metric_sums(file.read_text()) for file in files)
    if GRAPH_METRICS["forward_passes"] not in after:
        return {}
    return {key: int(after.get(metric, 0) - before.get(metric, 0)) for key, metric in GRAPH_METRICS.items()}


def scenario(name: str) -> tuple:
    if name in SCENARIOS:
        return SCENARIOS[name]
    match = TOKENIZER_VARIANT.fullmatch(name)
    if match:
        count = int(match.group(1))
        return (f"tokenizer_i{count}", 32, "passages_text", "passages", "tokenizer",
                f"tokenizer alone, {count} instances, 32 passages per request")
    raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}, tokenizerN-passages")


def parse_latency(text: str) -> dict:
    """'Avg request latency: 11578 usec (overhead 4 usec + queue 1167 usec + compute input 56 usec + ...)'."""
    parts = {}
    match = re.search(r"Avg request latency: (\d+) usec \(([^)]*)\)", text)
    if not match:
        return {}
    parts["latency"] = float(match.group(1)) / 1000
    for key, value in re.findall(r"(overhead|queue|compute input|compute infer|compute output|compute) (\d+) usec", match.group(2)):
        parts[key.replace(" ", "_")] = float(value) / 1000
    return parts


def parse_counts(text: str) -> dict:
    counts = {}
    for key, name in (("Inference count", "inferences"), ("Execution count", "executions"),
                      ("Successful request count", "requests")):
        match = re.search(rf"{key}: (\d+)", text)
        if match:
            counts[name] = int(match.group(1))
    return counts


def parse_log(text: str, model: str) -> dict[str, dict]:
    """Server-side times (ms) and counts per model: the model itself, or each composing model."""
    server = text.split("  Server:", 1)[1] if "  Server:" in text else ""
    own, _, composing = server.partition("Composing models:")
    models = {model: {**parse_counts(own), **parse_latency(own)}}
    for block in re.split(r"\n\s*\n", composing):
        match = re.search(r"^\s*(\S+), version: \S+", block, re.M)
        if match:
            models[match.group(1)] = {**parse_counts(block), **parse_latency(block)}
    for values in models.values():
        if "compute" not in values and "compute_infer" in values:
            values["compute"] = values["compute_input"] + values["compute_infer"] + values["compute_output"]
        if values.get("executions"):
            values["requests_per_execution"] = values["requests"] / values["executions"]
    return models


def read_csv_row(path: Path, concurrency: int) -> dict:
    """perf_analyzer's CSV row for this concurrency (the first block; later ones would be per model)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    for row in rows[1:]:
        if row and row[0] == str(concurrency):
            return dict(zip(header, row))
    raise ValueError(f"{path}: no row for concurrency {concurrency}")


def error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower() or "failed" in line.lower()]
    return lines[-1][:200] if lines else "no output"


def collect(raw: Path) -> tuple[list[dict], dict]:
    stats = {path.name.removesuffix("_stats.json"): json.loads(path.read_text())
             for path in sorted((raw / "inputs").glob("*_stats.json"))}
    inprocess_file = raw / "inprocess.json"
    inprocess = json.loads(inprocess_file.read_text()) if inprocess_file.is_file() else {}
    reference = {row["workload"]: row["engine_tokens_per_s"] for row in inprocess.get("rows", [])}
    rows = []
    for line in (raw / "runs.tsv").read_text().splitlines():
        name, concurrency, status = line.split("\t")
        concurrency = int(concurrency)
        model, batch, inputs, _, inprocess_key, _ = scenario(name)
        row = dict(scenario=name, model=model, batch=batch, concurrency=concurrency, status=status)
        rows.append(row)
        if status != "0":
            log = raw / f"{name}-c{concurrency}.log"
            row["error"] = "skipped: time budget" if status == "skipped" else error_line(log.read_text() if log.is_file() else "")
            continue
        try:
            values = read_csv_row(raw / f"{name}-c{concurrency}.csv", concurrency)
        except (OSError, ValueError, IndexError) as error:  # one unreadable run must not lose the others
            row.update(status="unreadable", error=f"no CSV row: {error}"[:200])
            continue
        mean_tokens = stats.get(inputs.rsplit("_", 1)[0], {}).get("mean_tokens", math.nan)  # passages_text -> passages
        texts_per_s = float(values["Inferences/Second"])  # with -b N perf_analyzer counts texts
        row.update(texts_per_s=texts_per_s, requests_per_s=texts_per_s / batch, tokens_per_s=texts_per_s * mean_tokens,
                   mean_tokens=mean_tokens,
                   **{f"{p}_ms": float(values[f"{p} latency"]) / 1000 for p in ("p50", "p90", "p95", "p99")},
                   avg_ms=float(values.get("Avg latency", "nan")) / 1000)
        if inprocess_key == "tokenizer":
            reference_texts = inprocess.get("tokenizer", {}).get("texts_per_s")
            row["share_of_inprocess"] = texts_per_s / reference_texts if reference_texts else math.nan
        else:
            reference_tokens = reference.get(inprocess_key)
            row["share_of_inprocess"] = row["tokens_per_s"] / reference_tokens if reference_tokens else math.nan
        row.update(metrics_of_run(raw, name, concurrency))
        per_model = parse_log((raw / f"{name}-c{concurrency}.log").read_text(), model)
        for part_model, values_ms in per_model.items():
            prefix = "tokenizer" if part_model.startswith("tokenizer") else part_model
            for key in (*TIMES, "compute", "latency", "requests_per_execution"):
                if key in values_ms:
                    row[f"{prefix}_{key}" + ("" if key == "requests_per_execution" else "_ms")] = values_ms[key]
    return rows, dict(stats=stats, inprocess=inprocess)


def fmt(value, spec: str = ".1f", empty: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def model_cell(row: dict, model: str) -> str:
    if f"{model}_queue_ms" not in row:
        return "–"
    return (f"{fmt(row[f'{model}_queue_ms'])} / {fmt(row[f'{model}_compute_ms'])} / {fmt(row[f'{model}_overhead_ms'])}"
            f" ({fmt(row.get(f'{model}_requests_per_execution'), '.1f')})")


def targets(rows: list[dict], inprocess: dict) -> list[tuple[str, str, str]]:
    """Issue 5's four targets: (target, measured, verdict)."""
    def ok(name):
        return [r for r in rows if r["scenario"] == name and r["status"] == "0"]

    reference = {row["workload"]: row["engine_tokens_per_s"] for row in inprocess.get("rows", [])}
    out = []
    passages = ok("embed-passages")
    if passages and reference.get("passages"):
        best = max(passages, key=lambda r: r["tokens_per_s"])
        share = best["tokens_per_s"] / reference["passages"]
        out.append(("32 passages per request: peak ensemble tokens/s ≥ 75% of the in-process encoder's",
                    f"{best['tokens_per_s'] / 1e6:.3f}M at concurrency {best['concurrency']} vs "
                    f"{reference['passages'] / 1e6:.3f}M in-process: {share:.0%}", "met" if share >= 0.75 else "missed"))
    else:
        out.append(("32 passages per request: peak ensemble tokens/s ≥ 75% of the in-process encoder's", "not measured", "–"))
    queries = ok("embed-queries")
    if queries:
        within = [r for r in queries if r["p99_ms"] <= 25]
        if within:
            best = max(within, key=lambda r: r["requests_per_s"])
            measured = (f"{best['requests_per_s']:,.0f} requests/s at concurrency {best['concurrency']} "
                        f"(p99 {best['p99_ms']:.1f} ms)")
            verdict = "met" if best["requests_per_s"] >= 8000 else "missed"
        else:
            measured, verdict = "no concurrency with p99 ≤ 25 ms", "missed"
        out.append(("Single-query requests: ≥ 8,000 requests/s at the best concurrency with p99 ≤ 25 ms", measured, verdict))
        first = [r for r in queries if r["concurrency"] == 1]
        if first:
            p50 = first[0]["p50_ms"]
            out.append(("Concurrency 1, one ~16-token query: p50 ≤ 6 ms end to end",
                        f"p50 {p50:.2f} ms (p99 {first[0]['p99_ms']:.2f} ms; queries of {first[0]['mean_tokens']:.1f} tokens on average)",
                        "met" if p50 <= 6 else "missed"))
        else:
            out.append(("Concurrency 1, one ~16-token query: p50 ≤ 6 ms end to end", "not measured", "–"))
    else:
        out.append(("Single-query requests: ≥ 8,000 requests/s at the best concurrency with p99 ≤ 25 ms", "not measured", "–"))
        out.append(("Concurrency 1, one ~16-token query: p50 ≤ 6 ms end to end", "not measured", "–"))
    mixed = ok("embed-mixed")
    if passages and mixed:
        base = max(r["tokens_per_s"] for r in passages)
        with_adapters = max(r["tokens_per_s"] for r in mixed)
        cost = 1 - with_adapters / base
        out.append(("Mixed adapters cost ≤ 10% throughput against the base model through the server",
                    f"peak {with_adapters / 1e6:.3f}M vs {base / 1e6:.3f}M tokens/s: {cost:.0%} less",
                    "met" if cost <= 0.10 else "missed"))
    else:
        out.append(("Mixed adapters cost ≤ 10% throughput against the base model through the server", "not measured", "–"))
    return out


def markdown(rows: list[dict], extra: dict, meta: dict) -> str:
    inprocess = extra["inprocess"]
    stats = extra["stats"]
    lines = ["# Serving benchmark (benchmarks/serve_bench.sh)", ""]
    lines.append(f"{meta.get('card', '?')}, {meta.get('date', '?')}; tritonserver {meta.get('server_version', '?')},"
                 f" perf_analyzer {meta.get('perf_analyzer', '?')} over gRPC; host CPU: {meta.get('cpu', '?')}.")
    lines.append(f"Model {meta.get('model', '?')} (random weights, mean pooling), tokenizer: {meta.get('tokenizer', '?')};"
                 f" {meta.get('adapters', '?')} rank-{meta.get('rank', 16)} adapters on all six targets, preloaded.")
    lines.append(f"Settings: {meta.get('settings', '?')}. Windows: {meta.get('windows', '?')}.")
    if inprocess.get("engine"):
        lines.append(f"In-process engine (same device, same run, while the server was idle): `{inprocess['engine']}`.")
    if meta.get("server_engine"):
        lines.append(f"Server's encoder: `{meta['server_engine']}`.")
    if meta.get("server_start_s") or meta.get("encoder_startup"):
        lines.append(f"Server start: ready {meta.get('server_start_s', '?')} s after it was started; encoder "
                     f"instances (model load, adapter registry with its preloads, warm-up on a GPU, whole initialize): "
                     f"{meta.get('encoder_startup', 'not logged')}.")
    if meta.get("first_requests"):
        lines.append(f"First requests once ready (one at a time, before other traffic, through `embed`): {meta['first_requests']}.")
    for name, values in stats.items():
        if "mean_tokens" in values:
            lines.append(f"- `{name}`: {values['texts']} texts, {values['mean_tokens']:.1f} tokens on average"
                         f" (median {values['median_tokens']:.0f}, longest {values['max_tokens']}"
                         + (f"; ids padded to {values['padded_to']}" if values.get("padded_to") else "") + ")")
    lines += ["", "## Targets (issue 5)", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {verdict} |" for target, measured, verdict in targets(rows, inprocess)]
    lines += ["", "## In-process (EmbeddingEngine.embed on the same token ids, requests of 32 rows)", "",
              "| workload | texts | tokens | embed() tokens/s | forward only, eager tokens/s | forward as CUDA graphs tokens/s |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in inprocess.get("rows", []):
        graphs = row.get("graphs_tokens_per_s")  # none on the CPU
        lines.append(f"| {row['workload']} | {row['texts']} | {row['tokens']:,} | {row['engine_tokens_per_s'] / 1e6:.3f}M |"
                     f" {row['forward_tokens_per_s'] / 1e6:.3f}M | {f'{graphs / 1e6:.3f}M' if graphs else '–'} |")
    if inprocess.get("tokenizer"):
        one_call = inprocess["tokenizer"].get("texts_per_s_one_call")
        lines.append(f"| tokenizer alone (TextTokenizer, one call per 32 passages; all in one call) | | | "
                     f"{inprocess['tokenizer']['texts_per_s']:,.0f} passages/s | {fmt(one_call, ',.0f')} passages/s | |")
    lines += ["", "## Through the server", "",
              "Per model: queue / compute / overhead in ms, per request as Triton counts it (a batched execution's"
              " compute counts for each of its requests), and in brackets requests per execution.", ""]
    for name in dict.fromkeys(r["scenario"] for r in rows):
        model, batch, *_, title = scenario(name)
        lines += [f"### {title} (`{name}`)", "",
                  "| concurrency | requests/s | texts/s | tokens/s | share of in-process | p50 ms | p99 ms |"
                  " tokenizer q / c / o ms | encoder q / c / o ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for row in (r for r in rows if r["scenario"] == name):
            if row["status"] != "0":
                lines.append(f"| {row['concurrency']} | {row['error']} | | | | | | | |")
                continue
            lines.append(f"| {row['concurrency']} | {row['requests_per_s']:,.0f} | {row['texts_per_s']:,.0f} |"
                         f" {row['tokens_per_s'] / 1e6:.3f}M | {fmt(row['share_of_inprocess'], '.0%')} |"
                         f" {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {model_cell(row, 'tokenizer')} | {model_cell(row, 'encoder')} |")
        counted = [row for row in rows if row["scenario"] == name and row.get("forward_passes")]
        if counted:
            lines += ["", "Encoder forward passes during each perf_analyzer run (the metrics port, all instances): " + "; ".join(
                f"c={row['concurrency']}: {row['forward_passes']:,}, {row['graphed_passes'] / row['forward_passes']:.1%}"
                f" replayed as CUDA graphs, {row['graph_captures']} captures, {row['graph_evictions']} evictions"
                for row in counted) + "."]
        lines.append("")
    lines.append("Share of in-process: tokens/s against the in-process embed() on the same ids (for the tokenizer"
                 " alone: passages/s against one in-process TextTokenizer).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], inprocess: dict, meta: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = {row["workload"]: row["engine_tokens_per_s"] for row in inprocess.get("rows", [])}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    groups = (("passages", "tokens_per_s", 1e6, "million tokens/s"), ("queries", "requests_per_s", 1e3, "thousand requests/s"))
    for (dataset, metric, scale, unit), (left, right) in zip(groups, axes):
        concurrencies: set[int] = set()
        for name in dict.fromkeys(r["scenario"] for r in rows):
            if scenario(name)[3] != dataset:
                continue
            points = sorted((r["concurrency"], r[metric] / scale, r["p50_ms"], r["p99_ms"])
                            for r in rows if r["scenario"] == name and r["status"] == "0")
            if not points:
                continue
            c, value, p50, p99 = zip(*points)
            concurrencies.update(c)
            line, = left.plot(c, value, marker="o", linestyle=":" if name.startswith("tokenizer") else "-", label=name)
            right.plot(c, p50, marker="o", color=line.get_color(), label=f"{name} p50")
            right.plot(c, p99, marker="x", linestyle="--", color=line.get_color(), label=f"{name} p99")
        if dataset == "passages":
            for key, style in (("passages", ":"), ("passages, mixed adapters", "-.")):
                if key in reference:
                    left.axhline(reference[key] / scale, color="gray", linestyle=style, label=f"in-process {key}")
        else:
            right.axhline(25, color="red", linewidth=0.8, linestyle=":", label="target p99 25 ms")
            right.axhline(6, color="red", linewidth=0.8, linestyle="-.", label="target p50 6 ms (c=1)")
            left.axhline(8, color="red", linewidth=0.8, linestyle=":", label="target 8k requests/s")
        for axis in (left, right):
            axis.set_xscale("log", base=2)
            if concurrencies:
                axis.set_xticks(sorted(concurrencies), [str(c) for c in sorted(concurrencies)])
            axis.set_xlabel("concurrency (requests in flight)")
            axis.grid(alpha=0.3)
        left.set_ylabel(unit)
        left.set_ylim(bottom=0)
        left.set_title(f"{dataset}: throughput")
        right.set_yscale("log")
        right.set_ylabel("latency ms")
        right.set_title(f"{dataset}: p50 (solid) and p99 (dashed)")
        left.legend(fontsize=7)
        right.legend(fontsize=6, ncol=2)
    fig.suptitle(f"loraembed through tritonserver — {meta.get('card', '?')}, {meta.get('date', '?')}")
    fig.tight_layout()
    fig.savefig(file, dpi=100)


def report(args) -> None:
    raw = Path(args.raw)
    meta = dict(item.split("=", 1) for item in args.meta or [])
    meta.setdefault("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    server_log = raw / "server.log"
    if server_log.is_file():
        text = server_log.read_text(errors="replace")
        version = re.search(r"\|\s*server_version\s*\|\s*(\S+)", text)
        engine = re.search(r"loraembed encoder ready: ([^\n\"]*)", text)
        if version:
            meta.setdefault("server_version", version.group(1))
        if engine:
            meta.setdefault("server_engine", engine.group(1).strip())
        startups = re.findall(r"loraembed encoder start-up of ([^\n\"]*)", text)
        if startups:
            meta.setdefault("encoder_startup", "; ".join(startup.strip() for startup in startups))
    rows, extra = collect(raw)
    text = markdown(rows, extra, meta)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "serve_bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "serve_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows, **extra,
                                                          targets=targets(rows, extra["inprocess"])), indent=1))
    destinations = [out] + ([Path(args.report_dir)] if args.report_dir else [])
    for destination in destinations:
        destination.mkdir(parents=True, exist_ok=True)
        (destination / "RESULTS-serve.md").write_text(text)
    try:
        plot(rows, extra["inprocess"], meta, out / "serve_bench.png")
        for destination in destinations[1:]:
            (destination / "serve_bench.png").write_bytes((out / "serve_bench.png").read_bytes())
    except ImportError:
        print("serve_report: matplotlib missing: no plot", file=sys.stderr)
    except Exception as error:  # the tables matter more than the picture
        print(f"serve_report: the plot failed: {type(error).__name__}: {error}", file=sys.stderr)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    list_parser = commands.add_parser("scenarios")
    list_parser.add_argument("names")
    report_parser = commands.add_parser("report")
    report_parser.add_argument("raw")
    report_parser.add_argument("--out-dir", required=True)
    report_parser.add_argument("--report-dir")
    report_parser.add_argument("--meta", action="append", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.command == "scenarios":
        for name in args.names.split(","):
            model, batch, inputs, *_ = scenario(name)
            print(f"{name}\t{model}\t{batch}\t{inputs}.json")
    else:
        report(args)


if __name__ == "__main__":
    main()
