#!/usr/bin/env bash
# Serving speed through Triton (issue 5): tritonserver with model_repository/ on a random-weight XLM-R
# (a realistic 250k-piece tokenizer, 64 rank-16 adapters on all six targets, preloaded), then
# perf_analyzer over gRPC against `embed` (texts), `encoder` (token ids) and `tokenizer`, a
# concurrency sweep per scenario; the in-process EmbeddingEngine.embed on the same token ids,
# measured in the same run on the same device, is the reference. Prints the report last on stdout.
#
#   benchmarks/serve_bench.sh [--tiny] [--device cuda|cpu] [--model xlmr-base|xlmr-large]
#       [--scenarios LIST] [--concurrency 1,2,4,8,16,32,64,128] [--tokenizer-concurrency 4,16,64]
#       [--window-ms 1000] [--warmup-ms 300] [--budget-s 420] [--tokenizer-instances N] [--encoder-instances N]
#       [--encoder-queue-delay-us N] [--tokenizer-queue-delay-us N] [--tokenizer-threads N]
#       [--param NAME=VALUE]... [--adapters 64] [--vocab N] [--passage-tokens 120] [--out DIR]
#       [--report-dir DIR] [--work DIR]
#
#   --scenarios   default embed-passages,embed-queries,embed-mixed,encoder-passages,encoder-mixed,
#                 encoder-queries,tokenizer-passages,tokenizer8-passages (in that order; see
#                 serve_report.py; tokenizerN-passages serves an extra copy of the tokenizer with N
#                 instances, measured alone)
#   --window-ms   perf_analyzer time window; each concurrency runs exactly 3 (no stability retries)
#   --budget-s    (420) concurrency levels that would end after this many seconds from the start are
#                 skipped (and marked so in the report), so the whole run stays within its slot
#   --tokenizer-instances / --encoder-queue-delay-us / --tokenizer-queue-delay-us: served from a copy
#                 of model_repository/ with those config.pbtxt values (default: the repository's; the
#                 tokenizer instances: LORAEMBED_TOKENIZER_INSTANCES, default 4 on a GPU as the entrypoint's)
#   --tokenizer-threads  RAYON_NUM_THREADS of the server (the fast tokenizer's threads per instance)
#   --encoder-instances  encoder instances per GPU (LORAEMBED_INSTANCES_PER_GPU; GPU only; default
#                 docker/entrypoint.sh's GPU default, 3)
#   --param       a serving parameter (LORAEMBED_NAME for the server, the same for the in-process run)
#   --vocab       the tokenizer's (and the checkpoint's) vocabulary size (default 250002; 8000 with --tiny)
#   --passage-tokens  median passage length in tokens (default 120; 40 with --tiny)
#   --tiny        a tiny checkpoint, 4 adapters, passages of ~40 tokens, concurrency 1,2, 300 ms windows,
#                 tokenizer1 instead of tokenizer8 (the plumbing, on CPU in seconds; implies --device cpu)
#   --out         CSV, JSON, RESULTS-serve.md, serve_bench.png, serve_bench.log and the raw logs as
#                 serve_bench_raw.tar.gz (default $OUT, else $TMPDIR/loraembed-bench/serve-out)
#   --report-dir  also write RESULTS-serve.md and serve_bench.png there (default benchmarks/, none with --tiny)
#   --work        checkpoint, adapters and texts, reused between runs (default $TMPDIR/loraembed-bench/serve-MODEL)
#
# Finds tritonserver, its backends and perf_analyzer from scripts/gpu_host_env.sh's bundle (sourced
# here with --device cuda when tritonserver is not on PATH), else from scripts/setup.sh's .triton/.
# Python: $HOST_PYTHON (else python3) builds the checkpoint and writes the report (transformers,
# matplotlib); python3 on PATH, the Triton stub's, runs the in-process engine. Ports: BENCH_HTTP_PORT,
# BENCH_GRPC_PORT, BENCH_METRICS_PORT (default 18000-18002).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
started=$(date +%s)

device="" tiny=0 scenarios_given=0 model=xlmr-base adapters="" window_ms="" warmup_ms="" budget_s=420 vocab="" passage_tokens=""
scenarios=embed-passages,embed-queries,embed-mixed,encoder-passages,encoder-mixed,encoder-queries,tokenizer-passages,tokenizer8-passages
concurrency="" tokenizer_concurrency="" tokenizer_instances="" encoder_delay="" tokenizer_delay="" tokenizer_threads=""
encoder_instances=""
out=${OUT:-${TMPDIR:-/tmp}/loraembed-bench/serve-out} report_dir=unset work="" params=()
while (($#)); do
    case $1 in
        --device) device=${2:?}; shift 2 ;;
        --tiny) tiny=1; shift ;;
        --model) model=${2:?}; shift 2 ;;
        --scenarios) scenarios=${2:?} scenarios_given=1; shift 2 ;;
        --concurrency) concurrency=${2:?}; shift 2 ;;
        --tokenizer-concurrency) tokenizer_concurrency=${2:?}; shift 2 ;;
        --window-ms) window_ms=${2:?}; shift 2 ;;
        --warmup-ms) warmup_ms=${2:?}; shift 2 ;;
        --budget-s) budget_s=${2:?}; shift 2 ;;
        --tokenizer-instances) tokenizer_instances=${2:?}; shift 2 ;;
        --encoder-instances) encoder_instances=${2:?}; shift 2 ;;
        --encoder-queue-delay-us) encoder_delay=${2:?}; shift 2 ;;
        --tokenizer-queue-delay-us) tokenizer_delay=${2:?}; shift 2 ;;
        --tokenizer-threads) tokenizer_threads=${2:?}; shift 2 ;;
        --param) params+=("${2:?}"); shift 2 ;;
        --adapters) adapters=${2:?}; shift 2 ;;
        --vocab) vocab=${2:?}; shift 2 ;;
        --passage-tokens) passage_tokens=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --report-dir) report_dir=${2:?}; shift 2 ;;
        --work) work=${2:?}; shift 2 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "serve_bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if ((tiny)); then
    model=tiny device=${device:-cpu} adapters=${adapters:-4} concurrency=${concurrency:-1,2}
    ((scenarios_given)) || scenarios=${scenarios/tokenizer8-passages/tokenizer1-passages}
    tokenizer_concurrency=${tokenizer_concurrency:-2} window_ms=${window_ms:-300} warmup_ms=${warmup_ms:-0}
    vocab=${vocab:-8000} passage_tokens=${passage_tokens:-40}
    [[ $report_dir == unset ]] && report_dir=""
fi
device=${device:-cuda} adapters=${adapters:-64} concurrency=${concurrency:-1,2,4,8,16,32,64,128}
instances_note=""
if [[ $device == cuda ]]; then  # docker/entrypoint.sh's GPU defaults, read from it and spelled out for the report
    [[ -z $encoder_instances$tokenizer_instances ]] && instances_note=" (instances: the entrypoint's GPU defaults)"
    # shellcheck source=benchmarks/entrypoint_defaults.sh
    source "$ROOT/benchmarks/entrypoint_defaults.sh"
    gpu_defaults=$(entrypoint_gpu_defaults "$ROOT") || exit 1
    encoder_instances=${encoder_instances:-${gpu_defaults% *}} tokenizer_instances=${tokenizer_instances:-${gpu_defaults#* }}
fi
tokenizer_concurrency=${tokenizer_concurrency:-4,16,64} window_ms=${window_ms:-1000} warmup_ms=${warmup_ms:-300}
[[ $report_dir == unset ]] && report_dir=$ROOT/benchmarks
work=${work:-${TMPDIR:-/tmp}/loraembed-bench/serve-$model}
for list in "$concurrency" "$tokenizer_concurrency"; do
    [[ $list =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "serve_bench.sh: concurrency lists look like 1,2,4" >&2; exit 2; }
done
for number in "$window_ms" "$warmup_ms" "$budget_s" "$adapters" ${vocab:+"$vocab"} ${passage_tokens:+"$passage_tokens"} \
    ${tokenizer_instances:+"$tokenizer_instances"} ${encoder_instances:+"$encoder_instances"} \
    ${encoder_delay:+"$encoder_delay"} ${tokenizer_delay:+"$tokenizer_delay"} ${tokenizer_threads:+"$tokenizer_threads"}; do
    [[ $number =~ ^[0-9]+$ ]] || { echo "serve_bench.sh: '$number' is not a whole number" >&2; exit 2; }
done

mkdir -p "$out"
: >"$out/serve_bench.log"
say() { echo "serve_bench.sh [$(($(date +%s) - started)) s]: $*" | tee -a "$out/serve_bench.log" >&2; }

# 1. Tools: on a GPU, the GPU host's bundle; else scripts/setup.sh's .triton/ and .venv/.
if [[ $device == cuda ]] && ! command -v tritonserver >/dev/null && [[ -f $ROOT/.gpuhost/install.sh ]]; then
    set +eu  # the environment scripts are written for interactive shells
    # shellcheck source=scripts/gpu_host_env.sh
    source "$ROOT/scripts/gpu_host_env.sh"
    set -eu
fi
if command -v tritonserver >/dev/null && [[ -n ${TRITON_BACKENDS:-} ]]; then
    tritonserver=$(command -v tritonserver) backends=$TRITON_BACKENDS
else
    tritonserver=$ROOT/.triton/pytriton/tritonserver/bin/tritonserver backends=$ROOT/.triton/pytriton/tritonserver/backends
    [[ -x $tritonserver ]] || { echo "serve_bench.sh: no tritonserver (source scripts/gpu_host_env.sh, or run scripts/setup.sh)" >&2; exit 1; }
    export PATH=$ROOT/.venv/bin:$PATH  # the stub runs the first python3 on PATH
fi
perf=${PERF_ANALYZER:-}
for candidate in "$(cd "$backends/../../.." 2>/dev/null && pwd)/perf" "$ROOT/.triton/perf"; do
    [[ -z $perf && -x $candidate/perf_analyzer ]] && perf=$candidate/perf_analyzer
done
perf=${perf:-$(command -v perf_analyzer || true)}
[[ -n $perf ]] || { echo "serve_bench.sh: no perf_analyzer (set PERF_ANALYZER, or run scripts/setup.sh)" >&2; exit 1; }
perf_analyzer() { LD_LIBRARY_PATH=$(dirname "$perf")/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$perf" "$@"; }
host_python=${HOST_PYTHON:-python3}
stub_python=$(command -v python3)
if [[ $device == cuda ]]; then
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0)
else
    card="CPU only"
fi
cpu="$( (grep -m1 'model name' /proc/cpuinfo || echo ': ?') | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores"
[[ -f /sys/fs/cgroup/cpu.max ]] && cpu+=" (cgroup cpu.max $(cat /sys/fs/cgroup/cpu.max))"
say "device $device ($card), $cpu; perf_analyzer $perf; work $work; out $out"

raw=$work/run-$(date +%Y%m%d-%H%M%S)
mkdir -p "$raw/inputs"
: >"$raw/runs.tsv"

# 2. Checkpoint, tokenizer, adapters, texts (reused while the recipe is the same).
say "building the checkpoint, tokenizer, adapters and texts in $work"
build_args=(--model "$model" --adapters "$adapters")
((tiny)) && build_args+=(--queries 128 --passages 256)
[[ -n $vocab ]] && build_args+=(--vocab-size "$vocab")
[[ -n $passage_tokens ]] && build_args+=(--passage-tokens "$passage_tokens")
"$host_python" "$ROOT/benchmarks/serve_bench_setup.py" build "$work" "${build_args[@]}" 2>&1 | tee -a "$out/serve_bench.log" >&2
adapter_ids=$("$host_python" -c 'import json, sys; print(",".join(json.load(open(sys.argv[1]))["adapter_ids"]))' "$work/build.json")

# 3. The repository copy with the knobs, and the server (it loads while the inputs are written).
repository=$raw/model_repository
cp -r "$ROOT/model_repository" "$repository"
set_line() {  # FILE REGEX LINE: replace the one line matching REGEX
    local count
    count=$(grep -c "$2" "$1" || true)
    [[ $count == 1 ]] || { echo "serve_bench.sh: $1 has $count lines matching $2" >&2; exit 1; }
    awk -v pattern="$2" -v line="$3" '$0 ~ pattern { print line; next } { print }' "$1" >"$1.new" && mv "$1.new" "$1"
}
[[ -n $tokenizer_instances ]] && set_line "$repository/tokenizer/config.pbtxt" '^instance_group' \
    "instance_group [ { kind: KIND_CPU, count: $tokenizer_instances } ]"
[[ -n $tokenizer_delay ]] && set_line "$repository/tokenizer/config.pbtxt" 'max_queue_delay_microseconds' \
    "  max_queue_delay_microseconds: $tokenizer_delay"
[[ -n $encoder_delay ]] && set_line "$repository/encoder/config.pbtxt" 'max_queue_delay_microseconds' \
    "  max_queue_delay_microseconds: $encoder_delay"
plan=$("$host_python" "$ROOT/benchmarks/serve_report.py" scenarios "$scenarios")
while IFS=$'\t' read -r name served _ _; do
    if [[ $served == tokenizer_i* ]]; then
        cp -r "$repository/tokenizer" "$repository/$served"
        set_line "$repository/$served/config.pbtxt" '^name:' "name: \"$served\""
        set_line "$repository/$served/config.pbtxt" '^instance_group' "instance_group [ { kind: KIND_CPU, count: ${served#tokenizer_i} } ]"
    fi
done <<<"$plan"

http=${BENCH_HTTP_PORT:-18000} grpc=${BENCH_GRPC_PORT:-18001} metrics=${BENCH_METRICS_PORT:-18002}
server_env=(LORAEMBED_MODEL_REPOSITORY="$repository" LORAEMBED_MODEL="$work/model" LORAEMBED_POOLING=mean
    LORAEMBED_ADAPTER_ROOT="$work/adapters" LORAEMBED_ADAPTER_PRELOAD="$adapter_ids" LORAEMBED_MAX_ADAPTERS="$adapters"
    LORAEMBED_HTTP_PORT="$http" LORAEMBED_GRPC_PORT="$grpc" LORAEMBED_METRICS_PORT="$metrics" TRITONSERVER="$tritonserver")
inprocess_params=()
for param in ${params[@]+"${params[@]}"}; do
    [[ $param =~ ^[a-z_]+=.*$ ]] || { echo "serve_bench.sh: --param takes NAME=VALUE, not '$param'" >&2; exit 2; }
    name=${param%%=*}
    server_env+=("LORAEMBED_${name^^}=${param#*=}")
    inprocess_params+=(--parameter "$name" "${param#*=}")
done
[[ -n $tokenizer_threads ]] && server_env+=(RAYON_NUM_THREADS="$tokenizer_threads")
[[ -n $encoder_instances ]] && server_env+=(LORAEMBED_INSTANCES_PER_GPU="$encoder_instances")
# Also to the entrypoint: on a GPU its own default would replace the count written into the copy.
[[ -n $tokenizer_instances ]] && server_env+=(LORAEMBED_TOKENIZER_INSTANCES="$tokenizer_instances")
server_pid=""
stop_server() {  # SIGTERM (models unload), then after 15 s SIGKILL for the server and its stubs (its group)
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        for _ in $(seq 30); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
trap stop_server EXIT
say "starting tritonserver ($(grep -h '^instance_group\|max_queue_delay' "$repository"/{tokenizer,encoder}/config.pbtxt | tr -s ' ' | paste -sd';' -);" \
    "encoder instances per GPU ${encoder_instances:-as in the repository}, set by the entrypoint)"
own_group=(setsid)
command -v setsid >/dev/null || own_group=()  # then the SIGKILL below reaches only what is left of the group
server_started=$(date +%s)
"${own_group[@]}" env "${server_env[@]}" "$ROOT/docker/entrypoint.sh" --backend-directory="$backends" --http-address=127.0.0.1 \
    --grpc-address=127.0.0.1 --metrics-address=127.0.0.1 --log-verbose=0 >"$raw/server.log" 2>&1 &
server_pid=$!  # setsid: its own process group, whose id is its pid

max_seq_len=$(grep -o '"max_position_embeddings": [0-9]*' "$work/model/config.json" | grep -o '[0-9]*$')
max_seq_len=$((max_seq_len - 2))  # XLM-R: positions start at pad_token_id + 1
make_inputs() { "$host_python" "$ROOT/client_examples/perf/make_inputs.py" "$@" --out-dir "$raw/inputs" \
    --tokenizer "$work/model/tokenizer.json" --max-seq-len "$max_seq_len" >>"$out/serve_bench.log"; }
make_inputs "$work/queries.txt" --name queries --no-pad
make_inputs "$work/passages.txt" --name passages
make_inputs "$work/passages.txt" --name passages_mixed --adapters "$adapter_ids" --seed 0
say "inputs written to $raw/inputs; waiting for the server"

# shellcheck source=benchmarks/wait_for_server.sh
source "$ROOT/benchmarks/wait_for_server.sh"
wait_for_server serve_bench.sh "$stub_python" "$http" "$server_pid" "$raw/server.log" 600 1
server_version=$("$stub_python" -c "import json, urllib.request, sys; print(json.load(urllib.request.urlopen(sys.argv[1]))['version'])" \
    "http://127.0.0.1:$http/v2")
server_start_s=$(($(date +%s) - server_started))
say "tritonserver $server_version ready ($server_start_s s after it was started)"
# The first requests, one at a time, before any other traffic: what a cold server costs its first
# users (kernel compilation, CUDA graph captures), unless the encoder's warm-up paid it at start.
first_requests=$("$stub_python" "$ROOT/benchmarks/serve_bench_setup.py" first-requests "$work" --url "127.0.0.1:$http" \
    2>>"$out/serve_bench.log") || first_requests="failed (see serve_bench.log)"
say "first requests once ready: $first_requests"

# 4. In-process reference (the server is idle: it holds its memory, computes nothing).
say "in-process EmbeddingEngine.embed on the same ids ($stub_python)"
"$stub_python" "$ROOT/benchmarks/serve_bench_setup.py" inprocess "$work" --inputs "$raw/inputs" --out "$raw/inprocess.json" \
    --device "$device" --repeats "$( ((tiny)) && echo 1 || echo 3)" ${inprocess_params[@]+"${inprocess_params[@]}"} \
    2>&1 | tee -a "$out/serve_bench.log" >&2 || say "the in-process measurement FAILED (see serve_bench.log); the report has no reference"

# 5. perf_analyzer: one run of 3 windows per scenario and concurrency.
levels_total=0
while IFS=$'\t' read -r _ served _ _; do
    list=$concurrency
    [[ $served == tokenizer* ]] && list=$tokenizer_concurrency
    levels_total=$((levels_total + $(tr ',' '\n' <<<"$list" | wc -l)))
done <<<"$plan"
say "perf_analyzer: $levels_total runs of 3 x $window_ms ms, about $((levels_total * (3 * window_ms + 1000) / 1000)) s" \
    "(+ warm-ups); levels that would end after ${budget_s} s from the start are skipped"
scrape_metrics() {  # FILE: the server's loraembed_* metrics now (serve_report.py reports each run's increments)
    "$stub_python" -c 'import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
open(sys.argv[2], "w").write("".join(line + "\n" for line in text.splitlines() if line.startswith("loraembed_")))' \
        "http://127.0.0.1:$metrics/metrics" "$1" 2>>"$out/serve_bench.log" || true
}
measure() {  # NAME MODEL BATCH INPUTS CONCURRENCY WINDOW_MS OUTPUT_PREFIX
    perf_analyzer -m "$2" -i grpc -u "127.0.0.1:$grpc" -b "$3" --input-data "$4" --concurrency-range "$5:$5" \
        --measurement-interval "$6" --stability-percentage 999 --max-trials 3 -f "$7.csv" --verbose-csv >"$7.log" 2>&1
}
while IFS=$'\t' read -r name served batch inputs; do
    levels=$concurrency
    [[ $served == tokenizer* ]] && levels=$tokenizer_concurrency
    if ((warmup_ms > 0 && $(date +%s) - started + 3 * window_ms / 1000 + 3 <= budget_s)); then
        for c in "${levels##*,}" "${levels%%,*}"; do
            measure "$name" "$served" "$batch" "$raw/inputs/$inputs" "$c" "$warmup_ms" "$raw/warmup-$name-c$c" || true
        done
    fi
    for c in ${levels//,/ }; do
        if (($(date +%s) - started + 3 * window_ms / 1000 + 3 > budget_s)); then
            say "$name c=$c: skipped (time budget of $budget_s s)"
            printf '%s\t%s\tskipped\n' "$name" "$c" >>"$raw/runs.tsv"
            continue
        fi
        status=0
        scrape_metrics "$raw/$name-c$c.metrics-before"
        measure "$name" "$served" "$batch" "$raw/inputs/$inputs" "$c" "$window_ms" "$raw/$name-c$c" || status=$?
        sleep 0.1  # the encoder publishes its metrics ~10 ms after a batch
        scrape_metrics "$raw/$name-c$c.metrics-after"
        printf '%s\t%s\t%s\n' "$name" "$c" "$status" >>"$raw/runs.tsv"
        say "$name c=$c: $(grep -m1 -o 'Throughput: [0-9.]* infer/sec' "$raw/$name-c$c.log" || echo "perf_analyzer failed ($status)")"
    done
done <<<"$plan"
stop_server
say "server stopped"

# 6. Report, raw logs.
pa_version=$(perf_analyzer --version 2>&1 | grep -o '[0-9][0-9.]*' | head -n 1 || true)
served_value() {  # MODEL KEY: the number after KEY in the served config.pbtxt, "(repository)" unless a flag set it
    grep -o "$2[: ]*[0-9]*" "$repository/$1/config.pbtxt" | grep -o '[0-9]*$' | head -n 1 | tr -d '\n' || true
    [[ $3 == "" ]] && printf ' (repository)'
    return 0
}
settings="tokenizer instances $(served_value tokenizer 'count' "$tokenizer_instances"),"
settings+=" tokenizer max_queue_delay $(served_value tokenizer max_queue_delay_microseconds "$tokenizer_delay") us,"
settings+=" encoder max_queue_delay $(served_value encoder max_queue_delay_microseconds "$encoder_delay") us,"
settings+=" RAYON_NUM_THREADS ${tokenizer_threads:-unset}, encoder instances per GPU ${encoder_instances:-1}"
settings+=$instances_note
settings+="${params[*]+, ${params[*]}}"
"$host_python" "$ROOT/benchmarks/serve_report.py" report "$raw" --out-dir "$out" ${report_dir:+--report-dir "$report_dir"} \
    --meta "card=$card" --meta "cpu=$cpu" --meta "server_version=$server_version" --meta "perf_analyzer=${pa_version:-?}" \
    --meta "model=$model" --meta "adapters=$adapters" --meta "settings=$settings" --meta "server_start_s=$server_start_s" --meta "first_requests=$first_requests" \
    --meta "tokenizer=$(grep -o '"tokenizer": "[^"]*"' "$work/build.json" | cut -d'"' -f4)" \
    --meta "windows=3 x $window_ms ms per concurrency (warm-up 2 x 3 x $warmup_ms ms per scenario)" \
    >"$raw/report.md" 2>>"$out/serve_bench.log"
cp "$work/build.json" "$raw/"
tar czf "$out/serve_bench_raw.tar.gz" -C "$raw" --exclude='*_text.json' --exclude='*_ids.json' --exclude=model_repository .
say "done: $out (RESULTS-serve.md, serve_bench.csv, serve_bench.json, serve_bench.png, serve_bench_raw.tar.gz)"
cat "$raw/report.md"
