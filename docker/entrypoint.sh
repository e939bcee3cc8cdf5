#!/usr/bin/env bash
# Run tritonserver on the loraembed model repository: the image's entrypoint, and what
# benchmarks/multi_gpu.sh starts on a bare GPU host (tritonserver on PATH).
#   LORAEMBED_MODEL_REPOSITORY   repository to serve (default: model_repository/ beside this script,
#                                as in the image, else the checkout's model_repository/)
#   LORAEMBED_GPUS               GPUs for the encoder, e.g. 0,1 (default: every visible GPU, or one CPU
#                                instance without GPUs: the repository's KIND_AUTO)
#   LORAEMBED_INSTANCES_PER_GPU  encoder instances on each of those GPUs (default 3 where there are
#                                GPUs; see GPU_DEFAULTS below)
#   LORAEMBED_TOKENIZER_INSTANCES  tokenizer (CPU) instances (default 4 where there are GPUs, else the
#                                repository's 2)
#   LORAEMBED_HTTP_PORT / LORAEMBED_GRPC_PORT / LORAEMBED_METRICS_PORT   default 8000 / 8001 / 8002
#   LORAEMBED_SHM_DEFAULT_BYTE_SIZE  the Python backend's initial shared memory per instance (16 MiB)
#   LORAEMBED_<PARAMETER>        read by the models themselves (exec keeps the environment)
#   TRITONSERVER                 the server binary (default: tritonserver on PATH)
# A GPU host (LORAEMBED_GPUS set, or nvidia-smi lists a GPU), or any of the three instance variables,
# serves a copy of the repository, in a new temporary folder, whose instance_group lines say so; the
# repository itself is never written. Without GPUs and without those variables: the repository as it is.
# Arguments are appended to tritonserver's command line (later flags win).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "entrypoint.sh: $*" >&2; exit 2; }

repository=${LORAEMBED_MODEL_REPOSITORY:-}
if [[ -z $repository ]]; then
    for candidate in "$here/model_repository" "$here/../model_repository"; do
        [[ -d $candidate ]] && { repository=$candidate; break; }
    done
fi
[[ -n $repository && -d $repository ]] || die "no model repository (set LORAEMBED_MODEL_REPOSITORY)"
repository=$(cd "$repository" && pwd)

gpus=${LORAEMBED_GPUS:-}
per_gpu=${LORAEMBED_INSTANCES_PER_GPU:-}
tokenizers=${LORAEMBED_TOKENIZER_INSTANCES:-}
[[ $gpus == all ]] && gpus=""
[[ -z $gpus || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || die "LORAEMBED_GPUS must be GPU ids like 0,1 (or all), not '$gpus'"
[[ -z $per_gpu || $per_gpu =~ ^[1-9][0-9]*$ ]] || die "LORAEMBED_INSTANCES_PER_GPU must be a positive integer, not '$per_gpu'"
[[ -z $tokenizers || $tokenizers =~ ^[1-9][0-9]*$ ]] || die "LORAEMBED_TOKENIZER_INSTANCES must be a positive integer, not '$tokenizers'"

# GPU_DEFAULTS: three encoder instances per GPU (while one instance's batch runs on the GPU, the
# others unpack, pack and copy the next) and four tokenizer instances. On one H200 of a 16-core
# host (benchmarks/results/serve-2026-11-28-h200-threads-instances-2-3.md, one call) three served
# 13,154 single queries/s through `embed` at p99 23 ms, where two served 8,949 at p99 36 ms; on
# 32-passage requests they gave 77% and 81% of the in-process tokens/s. The server was ready
# after 7 s with three and 9 s with two (64 adapters preloaded).
if [[ -n $gpus ]] || { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }; then
    per_gpu=${per_gpu:-3} tokenizers=${tokenizers:-4}
fi

# Replace the one line that starts with instance_group in MODEL/config.pbtxt of the copy.
set_instance_group() {
    local config=$1/config.pbtxt line=$2 count
    count=$(grep -c '^instance_group' "$config" || true)
    [[ $count == 1 ]] || die "$config has $count lines starting with instance_group; expected exactly one"
    awk -v line="$line" '/^instance_group/ { print line; next } { print }' "$config" >"$config.new"
    mv "$config.new" "$config"
}

if [[ -n $gpus || -n $per_gpu || -n $tokenizers ]]; then
    copy=$(mktemp -d "${TMPDIR:-/tmp}/loraembed-repository.XXXXXX")/model_repository
    cp -r "$repository" "$copy"
    if [[ -n $gpus ]]; then
        set_instance_group "$copy/encoder" "instance_group [ { kind: KIND_GPU, count: ${per_gpu:-1}, gpus: [ ${gpus//,/, } ] } ]"
    elif [[ -n $per_gpu ]]; then
        # No ids: KIND_GPU puts count instances on each visible GPU (there must be one).
        set_instance_group "$copy/encoder" "instance_group [ { kind: KIND_GPU, count: $per_gpu } ]"
    fi
    if [[ -n $tokenizers ]]; then
        set_instance_group "$copy/tokenizer" "instance_group [ { kind: KIND_CPU, count: $tokenizers } ]"
    fi
    echo "entrypoint.sh: serving $copy (instance groups from LORAEMBED_GPUS='$gpus'" \
        "LORAEMBED_INSTANCES_PER_GPU='$per_gpu' LORAEMBED_TOKENIZER_INSTANCES='$tokenizers')" >&2
    repository=$copy
fi

exec "${TRITONSERVER:-tritonserver}" \
    --model-repository="$repository" \
    --http-port="${LORAEMBED_HTTP_PORT:-8000}" \
    --grpc-port="${LORAEMBED_GRPC_PORT:-8001}" \
    --metrics-port="${LORAEMBED_METRICS_PORT:-8002}" \
    --disable-auto-complete-config \
    --backend-config=python,shm-default-byte-size="${LORAEMBED_SHM_DEFAULT_BYTE_SIZE:-16777216}" \
    --exit-on-error=true \
    --strict-readiness=true \
    "$@"
