# shellcheck shell=bash
# Sourced by the serving benchmarks (multi_gpu.sh, serve_bench.sh): wait for a tritonserver that
# this script started to answer ready, or stop with the end of its log.
#
#   wait_for_server PROGRAM PYTHON HTTP_PORT SERVER_PID LOG TIMEOUT_S POLL_S

wait_for_server() {
    local program=$1 python=$2 port=$3 pid=$4 log=$5 deadline=$((SECONDS + $6)) poll=$7
    until "$python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$port/v2/health/ready" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
            echo "$program: tritonserver did not become ready; the end of $log:" >&2
            tail -n 40 "$log" >&2
            exit 1
        fi
        sleep "$poll"
    done
}
