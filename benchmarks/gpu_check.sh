#!/usr/bin/env bash
# One call's worth of GPU work on the lent host (it starts bare and goes back soon after a call):
# the GPU tests, then the benchmarks named on the command line, each logged under $OUT. Prints a
# short summary last.
#
#   OUT=... benchmarks/gpu_check.sh [tests[=PYTEST_ARGS]] [attention] [encoder[=ENCODER_BENCH_ARGS]]
#
#   tests       pytest tests/gpu (or the given pytest arguments), log OUT/gpu-tests.log
#   attention   benchmarks/attention_bench.py for XLM-R base and large head shapes
#   encoder     benchmarks/encoder_bench.py with the given arguments (default: everything), --out OUT
#   gemm-tuning encoder_bench.py on XLM-R large and base (passages, queries; base model) with
#               gemm_tuning=false, then =true (OUT/gemm-tuning-{false,true}/), then cuBLASLt's
#               candidates per linear (OUT/cublaslt-candidates.md); NOTES item 53. With
#               tests=tests/gpu/test_cublaslt.py before it: ~4 minutes on an H100
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
set +u
# shellcheck source=scripts/gpu_host_env.sh
source scripts/gpu_host_env.sh >"$OUT/setup.log" 2>&1
set -u
started=$(date +%s)
summary=()
note() { summary+=("[$(($(date +%s) - started)) s] $*"); echo "gpu_check [$(($(date +%s) - started)) s]: $*" >&2; }
note "card $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) date $(date -I)"
python3 -c 'import flash_attn; print("flash_attn", flash_attn.__version__)' >>"$OUT/setup.log" 2>&1 || note "no flash_attn"

for step in "$@"; do
    name=${step%%=*}
    arguments=""
    [[ $step == *=* ]] && arguments=${step#*=}
    case $name in
        tests)
            # The venv's python3 sees flash-attn; with the server bundle carried it also has numpy<2,
            # under which transformers does not import (2026-11-28: 21 errors): then the host's.
            test_python=python3
            python3 -c 'import transformers' >/dev/null 2>&1 || test_python=${HOST_PYTHON:-python3}
            # shellcheck disable=SC2086  # the arguments are a word list
            "$test_python" -m pytest -q -s -p no:cacheprovider ${arguments:-tests/gpu} >"$OUT/gpu-tests.log" 2>&1
            note "tests ($arguments): rc=$? $(tail -1 "$OUT/gpu-tests.log")"
            ;;
        attention)
            { python3 benchmarks/attention_bench.py --heads 12 && python3 benchmarks/attention_bench.py --heads 16 --workloads passages,long; } \
                >"$OUT/attention-bench.md" 2>"$OUT/attention-bench.err"
            note "attention bench: rc=$?"
            ;;
        encoder)
            # shellcheck disable=SC2086
            python3 benchmarks/encoder_bench.py --out "$OUT" $arguments >"$OUT/encoder-bench.log" 2>&1
            note "encoder bench ($arguments): rc=$?"
            ;;
        gemm-tuning)
            for tuning in false true; do
                python3 benchmarks/encoder_bench.py --models xlmr-large,xlmr-base --workloads passages,queries \
                    --attention triton_packed --modes "" --baselines "" --tokens 200000 --repeats 3 \
                    --parameter "gemm_tuning=$tuning" --out "$OUT/gemm-tuning-$tuning" >"$OUT/gemm-tuning-$tuning.log" 2>&1
                note "encoder bench, gemm_tuning=$tuning: rc=$?"
            done
            python3 benchmarks/cublaslt_algo_probe.py --out "$OUT/cublaslt-candidates.md" >"$OUT/cublaslt-probe.log" 2>&1
            note "cuBLASLt candidates: rc=$?"
            ;;
        *) note "unknown step $name" ;;
    esac
done
# Few files come back comfortably: the kernel profiles and plots go in one archive.
(cd "$OUT" && shopt -s nullglob && extra=(profile-*.txt *.err ./*.png ./*.json) && ((${#extra[@]})) && tar czf extras.tgz "${extra[@]}" && rm -f "${extra[@]}")
printf '%s\n' "${summary[@]}"
