#!/usr/bin/env bash
# Throughput of the `embed` ensemble with the encoder on one GPU, then on two, under perf_analyzer
# (gRPC, 32 passages per request, a concurrency sweep). Both servers run in this one program, so the
# 1-GPU baseline comes from the same run. Prints a table with the card and the date and writes it to
# OUT/RESULTS-multi-gpu.md; the perf_analyzer CSVs and logs and the server logs go to RAW.
#
#   benchmarks/multi_gpu.sh [--model xlmr-large|xlmr-base|DIR] [--gpus 0,1] [--concurrency 8,32,64]
#       [--batch 32] [--measurement-ms 5000] [--tokenizer-instances N] [--out benchmarks]
#       [--raw $TMPDIR/loraembed-bench/multi-gpu]
#
#   --model    a random-weight checkpoint of that size, built once under $TMPDIR (weights do not
#              change the speed; the GPU host has no hub), or a checkpoint folder with tokenizer.json
#   --gpus     the two GPUs to compare (the first alone, then both)
#   --tokenizer-instances  CPU tokenizer instances (default: docker/entrypoint.sh's GPU default, 4; the
#              encoder gets its GPU default too, 3 instances per GPU)
#
# Needs tritonserver and perf_analyzer: on the lent GPU host, scripts/gpu_host_env.sh with the server
# bundle (.gpuhost) provides both and is sourced here when tritonserver is not on PATH; and a python
# ($HOST_PYTHON, else python3) with torch, transformers and tokenizers for the checkpoint.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

model=xlmr-large gpus=0,1 concurrency=8,32,64 batch=32 measurement_ms=5000 tokenizer_instances="" out=$ROOT/benchmarks
raw=${TMPDIR:-/tmp}/loraembed-bench/multi-gpu
while (($#)); do
    case $1 in
        --model) model=${2:?}; shift 2 ;;
        --gpus) gpus=${2:?}; shift 2 ;;
        --concurrency) concurrency=${2:?}; shift 2 ;;
        --batch) batch=${2:?}; shift 2 ;;
        --measurement-ms) measurement_ms=${2:?}; shift 2 ;;
        --tokenizer-instances) tokenizer_instances=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --raw) raw=${2:?}; shift 2 ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "multi_gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $gpus =~ ^[0-9]+,[0-9]+$ ]] || { echo "multi_gpu.sh: --gpus takes two ids, like 0,1" >&2; exit 2; }
[[ $concurrency =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "multi_gpu.sh: --concurrency takes a list like 8,32,64" >&2; exit 2; }

if ! command -v tritonserver >/dev/null; then
    set +eu  # the environment scripts are written for interactive shells
    # shellcheck source=scripts/gpu_host_env.sh
    source "$ROOT/scripts/gpu_host_env.sh"
    set -eu
fi
command -v tritonserver >/dev/null || { echo "multi_gpu.sh: no tritonserver on PATH (source scripts/gpu_host_env.sh)" >&2; exit 1; }
# The bundle's perf_analyzer (where its install.sh unpacked it, next to tritonserver) needs its libraries.
bundle=$(cd "${TRITON_BACKENDS:-/nonexistent}/../../.." 2>/dev/null && pwd || true)
if [[ -n $bundle && -x $bundle/perf/perf_analyzer ]]; then
    perf_analyzer() { LD_LIBRARY_PATH=$bundle/perf/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$bundle/perf/perf_analyzer" "$@"; }
fi
# The host's python (numpy 2, transformers) builds the checkpoint; the bundle's venv python3 (numpy<2)
# is the Triton stub's.
host_python=${HOST_PYTHON:-python3}
type perf_analyzer >/dev/null 2>&1 || { echo "multi_gpu.sh: no perf_analyzer (a command or the bundle's shell function)" >&2; exit 1; }
visible=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
((visible >= 2)) || { echo "multi_gpu.sh: needs two GPUs; nvidia-smi shows $visible" >&2; exit 1; }

work=$raw
mkdir -p "$work" "$out"
started=$(date +%s)
say() { echo "multi_gpu.sh [$(($(date +%s) - started)) s]: $*" >&2; }

# 1. The checkpoint and the passages (the same texts for both runs).
cache=${TMPDIR:-/tmp}/loraembed-bench
if [[ -d $model ]]; then
    checkpoint=$(cd "$model" && pwd)
else
    checkpoint=$cache/$model
    if [[ ! -f $checkpoint/tokenizer.json ]]; then
        say "building a random-weight $model checkpoint in $checkpoint"
        "$host_python" - "$ROOT" "$model" "$cache" <<'EOF'
import sys
from pathlib import Path
root, name, cache = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sys.path[:0] = [root, f"{root}/benchmarks"]
from encoder_bench import MODELS, build_checkpoint  # the encoder benchmark's sizes, bf16 safetensors
from tests.support.checkpoints import xlmr_tokenizer  # XLM-R's special ids; its pieces cover the passages

if name not in MODELS or name == "minilm":
    sys.exit(f"--model {name}: use xlmr-base, xlmr-large or a checkpoint folder")
path = build_checkpoint(name, cache)
xlmr_tokenizer(vocab_size=250).save(str(path / "tokenizer.json"))
EOF
    fi
fi
[[ -f $checkpoint/tokenizer.json ]] || { echo "multi_gpu.sh: $checkpoint has no tokenizer.json" >&2; exit 1; }

passages=$work/passages.json
"$host_python" - "$passages" <<'EOF'
import json, math, sys
import numpy as np
# Lengths like encoder_bench.py's "passages" workload (lognormal, median 120 tokens, 16 to 512),
# in words that XLM-R-like and BERT tokenizers keep as one token each.
rng = np.random.default_rng(0)
words = ["the", "a", "is", "of", "and", "to", "in", "text", "hello", "world"]
lengths = np.clip(np.round(rng.lognormal(math.log(120), 0.7, 2048)), 16, 500).astype(int)
texts = [" ".join(rng.choice(words, n - 2)) for n in lengths]
# perf_analyzer with -b N sends N consecutive entries per request, each a batch-1 TEXT of shape [1].
json.dump({"data": [{"TEXT": [text]} for text in texts]}, open(sys.argv[1], "w"))
print(f"{len(texts)} passages, median {int(np.median(lengths))} tokens, mean {lengths.mean():.0f}", file=sys.stderr)
EOF

http=${BENCH_HTTP_PORT:-18000} grpc=${BENCH_GRPC_PORT:-18001} metrics=${BENCH_METRICS_PORT:-18002}
server_pid=""
stop_server() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
    server_pid=""
}
trap stop_server EXIT
# shellcheck source=benchmarks/wait_for_server.sh
source "$ROOT/benchmarks/wait_for_server.sh"
# shellcheck source=benchmarks/entrypoint_defaults.sh
source "$ROOT/benchmarks/entrypoint_defaults.sh"
gpu_defaults=$(entrypoint_gpu_defaults "$ROOT") || exit 1  # what the entrypoint serves with: for the report

start_server() {  # $1: LORAEMBED_GPUS, $2: log file
    say "starting tritonserver with the encoder on GPU(s) $1"
    LORAEMBED_GPUS=$1 LORAEMBED_TOKENIZER_INSTANCES=$tokenizer_instances LORAEMBED_MODEL=$checkpoint \
        LORAEMBED_HTTP_PORT=$http LORAEMBED_GRPC_PORT=$grpc LORAEMBED_METRICS_PORT=$metrics \
        "$ROOT/docker/entrypoint.sh" --backend-directory="${TRITON_BACKENDS:?set by scripts/gpu_host_env.sh}" \
        --http-address=127.0.0.1 --grpc-address=127.0.0.1 --metrics-address=127.0.0.1 >"$2" 2>&1 &
    server_pid=$!
    wait_for_server multi_gpu.sh python3 "$http" "$server_pid" "$2" 900 2
    # The instance groups it really runs, as the server reports them.
    python3 - "http://127.0.0.1:$http/v2/models/encoder/config" "$1" <<'EOF' >&2
import json, sys, urllib.request
groups = json.load(urllib.request.urlopen(sys.argv[1]))["instance_group"]
print("multi_gpu.sh: encoder instance groups:", [(g["kind"], g["count"], g["gpus"]) for g in groups])
assert [gpu for g in groups for gpu in g["gpus"]] == [int(x) for x in sys.argv[2].split(",")], "not on the GPUs asked for"
EOF
}

measure() {  # $1: label; appends "label concurrency passages/s p50_us p99_us" lines to $work/results.txt
    say "warming up ($1)"
    perf_analyzer -m embed -i grpc -u "127.0.0.1:$grpc" -b "$batch" --input-data "$passages" \
        --concurrency-range "${concurrency##*,}:${concurrency##*,}" --measurement-interval 2000 --max-trials 3 >/dev/null 2>&1 || true
    local c
    for c in ${concurrency//,/ }; do
        say "$1: concurrency $c"
        local csv=$work/$1-c$c.csv
        if perf_analyzer -m embed -i grpc -u "127.0.0.1:$grpc" -b "$batch" --input-data "$passages" \
            --concurrency-range "$c:$c" --measurement-interval "$measurement_ms" --stability-percentage 10 \
            --max-trials 10 -f "$csv" >"$work/$1-c$c.log" 2>&1; then
            python3 - "$csv" "$1" "$c" <<'EOF' >>"$work/results.txt"
import csv, sys
path, label, concurrency = sys.argv[1:]
rows = list(csv.reader(open(path)))
header = rows[0]
(row,) = [r for r in rows[1:] if r and r[0] == concurrency][:1]  # the first block is the ensemble's
value = dict(zip(header, row))
# With -b, perf_analyzer's Inferences/Second counts batch items: passages per second.
print(label, concurrency, value["Inferences/Second"], value["p50 latency"], value["p99 latency"])
EOF
        else
            say "$1: perf_analyzer failed at concurrency $c (see $work/$1-c$c.log)"
            echo "$1 $c nan nan nan" >>"$work/results.txt"
        fi
    done
}

: >"$work/results.txt"
first=${gpus%%,*}
start_server "$first" "$work/server-1gpu.log"
measure 1gpu
stop_server
start_server "$gpus" "$work/server-2gpu.log"
measure 2gpu
stop_server

# 2. The table.
card=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$first")
engine=$(grep -o 'loraembed encoder ready: .*' "$work/server-2gpu.log" | head -n 1 | sed 's/^loraembed encoder ready: //; s/"$//')
python3 - "$work/results.txt" "$out/RESULTS-multi-gpu.md" "$card" "$model" "$batch" "$measurement_ms" \
    "${tokenizer_instances:-${gpu_defaults#* } (GPU default)}, encoder instances per GPU ${gpu_defaults% *} (GPU default)" \
    "$engine" "$gpus" <<'EOF'
import datetime, math, sys
results, report, card, model, batch, window_ms, tokenizers, engine, gpus = sys.argv[1:]
rows = {}
for line in open(results):
    label, c, throughput, p50, p99 = line.split()
    rows.setdefault(int(c), {})[label] = (float(throughput), float(p50) / 1000, float(p99) / 1000)
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
lines = [
    "## Multi-GPU throughput: the embed ensemble under perf_analyzer",
    "",
    f"{card} (GPUs {gpus}), {date}. Model {model}; {batch} passages per request (median 120 tokens);"
    f" gRPC; {window_ms} ms windows; tokenizer instances {tokenizers}. Encoder: {engine or 'see server logs'}.",
    "",
    "| concurrency (requests) | 1 GPU passages/s | 2 GPUs passages/s | ratio | 1 GPU p99 ms | 2 GPUs p99 ms |",
    "|---:|---:|---:|---:|---:|---:|",
]
for c in sorted(rows):
    one, two = rows[c].get("1gpu", (math.nan,) * 3), rows[c].get("2gpu", (math.nan,) * 3)
    lines.append(f"| {c} | {one[0]:.0f} | {two[0]:.0f} | {two[0] / one[0]:.2f}x | {one[2]:.1f} | {two[2]:.1f} |")
best_one = max((r["1gpu"][0] for r in rows.values() if "1gpu" in r and not math.isnan(r["1gpu"][0])), default=math.nan)
best_two = max((r["2gpu"][0] for r in rows.values() if "2gpu" in r and not math.isnan(r["2gpu"][0])), default=math.nan)
lines += ["", f"Peak: 1 GPU {best_one:.0f} passages/s, 2 GPUs {best_two:.0f} passages/s: {best_two / best_one:.2f}x"
              " (issue 7 asks for at least 1.8x)."]
text = "\n".join(lines) + "\n"
print(text)
open(report, "w").write(text)
EOF
say "done; raw results in $work"
