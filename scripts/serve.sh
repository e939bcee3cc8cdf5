#!/usr/bin/env bash
# Set up (quietly, idempotent) and run tritonserver in the foreground on model_repository/, through
# the same entrypoint as the container (docker/entrypoint.sh), so both honour the same variables:
#   LORAEMBED_HTTP_PORT / LORAEMBED_GRPC_PORT / LORAEMBED_METRICS_PORT   default 8000 / 8001 / 8002
#   LORAEMBED_MODEL_REPOSITORY   another model repository (default: model_repository/ of this repo)
#   LORAEMBED_GPUS, LORAEMBED_INSTANCES_PER_GPU, LORAEMBED_TOKENIZER_INSTANCES   instance groups
#   LORAEMBED_<PARAMETER>        read by the models themselves (exec keeps the environment)
# Extra arguments are appended to tritonserver's command line, e.g. scripts/serve.sh --log-verbose=1
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/scripts/setup.sh" -q

SERVER=$ROOT/.triton/pytriton/tritonserver
# The Python backend's stub runs the first python3 on PATH: make it the venv's.
export PATH=$ROOT/.venv/bin:$SERVER/bin:$PATH
exec "$ROOT/docker/entrypoint.sh" --backend-directory="$SERVER/backends" --log-verbose=0 "$@"
