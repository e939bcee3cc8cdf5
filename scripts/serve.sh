#!/usr/bin/env bash
# Set up (quietly, idempotent) and run tritonserver in the foreground on model_repository/.
#   LORAEMBED_HTTP_PORT / LORAEMBED_GRPC_PORT / LORAEMBED_METRICS_PORT   default 8000 / 8001 / 8002
#   LORAEMBED_MODEL_REPOSITORY   another model repository (default: model_repository/ of this repo)
#   LORAEMBED_<PARAMETER>        read by the models themselves (exec keeps the environment)
# Extra arguments are appended to tritonserver's command line, e.g. scripts/serve.sh --log-verbose=1
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/scripts/setup.sh" -q

SERVER=$ROOT/.triton/pytriton/tritonserver
REPO=$(realpath "${LORAEMBED_MODEL_REPOSITORY:-$ROOT/model_repository}")
# The Python backend's stub runs the first python3 on PATH: make it the venv's.
export PATH=$ROOT/.venv/bin:$PATH

exec "$SERVER/bin/tritonserver" \
    --model-repository="$REPO" \
    --backend-directory="$SERVER/backends" \
    --http-port="${LORAEMBED_HTTP_PORT:-8000}" \
    --grpc-port="${LORAEMBED_GRPC_PORT:-8001}" \
    --metrics-port="${LORAEMBED_METRICS_PORT:-8002}" \
    --disable-auto-complete-config \
    --backend-config=python,shm-default-byte-size=16777216 \
    --log-verbose=0 \
    --exit-on-error=true \
    "$@"
