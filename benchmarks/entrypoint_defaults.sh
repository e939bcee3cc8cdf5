# shellcheck shell=bash
# Sourced by the serving benchmarks (multi_gpu.sh, serve_bench.sh): the instance counts that
# docker/entrypoint.sh gives a GPU host, read from its one GPU_DEFAULTS line (so a report names the
# counts the server ran with, without a second copy of them; tests/unit/test_docker_entrypoint_gpus.py
# pins that line).
#
#   entrypoint_gpu_defaults ROOT    prints "ENCODER_INSTANCES_PER_GPU TOKENIZER_INSTANCES"

entrypoint_gpu_defaults() {
    local defaults
    # shellcheck disable=SC2016  # the ${...} are the entrypoint's text, matched literally
    defaults=$(sed -n 's/^ *per_gpu=\${per_gpu:-\([0-9][0-9]*\)} tokenizers=\${tokenizers:-\([0-9][0-9]*\)}$/\1 \2/p' \
        "$1/docker/entrypoint.sh")
    [[ $defaults =~ ^[0-9]+\ [0-9]+$ ]] || { echo "no GPU defaults line in $1/docker/entrypoint.sh" >&2; return 1; }
    echo "$defaults"
}
