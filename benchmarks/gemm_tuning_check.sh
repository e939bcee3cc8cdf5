#!/usr/bin/env bash
# gemm_tuning on the GPU host in one call (~4 minutes on an H100): the GPU tests of the kept cuBLASLt
# algorithms (tests/gpu/test_cublaslt.py), then encoder_bench.py on XLM-R large and base (passages,
# queries; base model) with gemm_tuning=false and =true one after the other, then the candidates of
# each linear (cublaslt_algo_probe.py). NOTES item 53 says what to expect and what decides the default.
#   OUT=DIR bash benchmarks/gemm_tuning_check.sh   # writes DIR/gpu-tests.log, DIR/bench-{false,true}/,
#                                                   # DIR/cublaslt-candidates-<date>.md
# Sets up the host as gpu_check.sh does (scripts/gpu_host_env.sh: the carried flash-attn bundle).
# Every step runs even if one before it fails; the exit status is the first failure's.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/gemm-tuning}
mkdir -p "$OUT"
set +u
# shellcheck source=scripts/gpu_host_env.sh
source scripts/gpu_host_env.sh >"$OUT/setup.log" 2>&1
set -u
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$ROOT/backend_src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
start=$SECONDS
status=0
first_failure() { [ "$status" -ne 0 ] || status=$1; }

"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/gpu/test_cublaslt.py >"$OUT/gpu-tests.log" 2>&1 || first_failure $?
echo "tests: exit $status after $((SECONDS - start)) s"; tail -3 "$OUT/gpu-tests.log"

for tuning in false true; do
    "$PYTHON" benchmarks/encoder_bench.py --models xlmr-large,xlmr-base --workloads passages,queries \
        --attention triton_packed --modes "" --baselines "" --tokens 200000 --repeats 3 \
        --parameter "gemm_tuning=$tuning" --out "$OUT/bench-$tuning" >"$OUT/bench-$tuning.log" 2>&1 || first_failure $?
    echo "gemm_tuning=$tuning after $((SECONDS - start)) s:"
    grep -E '^\| xlmr|^- ' "$OUT/bench-$tuning/RESULTS.md" 2>/dev/null
done

"$PYTHON" benchmarks/cublaslt_algo_probe.py --out "$OUT/cublaslt-candidates-$(date +%F).md" >"$OUT/probe.log" 2>&1 \
    || first_failure $?
grep '^|' "$OUT/cublaslt-candidates-$(date +%F).md" 2>/dev/null
echo "total $((SECONDS - start)) s"
exit "$status"
