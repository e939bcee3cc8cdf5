#!/usr/bin/env bash
# The fused LoRA paths on the GPU host in one call (~2-3 minutes on an H100): the GPU parity tests of
# the kernels and plans (fused expand, single-adapter merge, shrink/expand, LayerNorm, peft parity),
# then the layer-stack benchmark (old path vs new, base / 1 / 64 adapters). The same plans on the
# CPU references: tests/unit/test_lora_batch_plans.py (CI).
#   OUT=DIR bash benchmarks/lora_fusion_check.sh   # writes DIR/gpu-tests.log, DIR/lora-fusion-<date>.md
# Sets up the host as gpu_check.sh does (scripts/gpu_host_env.sh: the carried flash-attn bundle).
# The benchmark runs even if a test fails; the exit status is the tests' (then the benchmark's).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/lora-fusion}
mkdir -p "$OUT"
set +u
# shellcheck source=scripts/gpu_host_env.sh
source scripts/gpu_host_env.sh >"$OUT/setup.log" 2>&1
set -u
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$ROOT/backend_src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true
start=$SECONDS

"$PYTHON" -m pytest -q -s -rs --durations=8 -p no:cacheprovider \
  tests/gpu/test_lora_fusion.py tests/gpu/test_sgmv_kernels.py tests/gpu/test_fused_ops.py \
  tests/gpu/test_lora_gpu_parity.py 2>&1 | tee "$OUT/gpu-tests.log"
tests_status=${PIPESTATUS[0]}
echo "tests: exit $tests_status after $((SECONDS - start)) s"

"$PYTHON" benchmarks/lora_fusion_bench.py --repeats 15 --out "$OUT/lora-fusion-$(date +%F).md"
bench_status=$?
echo "benchmark: exit $bench_status, total $((SECONDS - start)) s"
[ "$tests_status" -eq 0 ] && exit "$bench_status"
exit "$tests_status"
