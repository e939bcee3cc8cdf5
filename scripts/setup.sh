#!/usr/bin/env bash
# Set up everything `make serve` and `make test` need, from a fresh Debian 12 + Python 3.11 machine:
#   .venv/    Python packages (requirements-test.txt, which includes requirements.txt) and
#             backend_src installed editable, so the Triton stub (which ignores PYTHONPATH) imports loraembed
#   .triton/  tritonserver 2.51 + Python backend unpacked from the nvidia-pytriton wheel
# Idempotent: a step is skipped while its stamp (a hash of what it depends on) is unchanged.
# Usage: scripts/setup.sh [-q]   (-q: print nothing unless something fails; PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
TRITON=$ROOT/.triton
PYTRITON=nvidia-pytriton==0.7.0   # ships tritonserver 2.51.0 (NGC 24.10)
LOG=$ROOT/.cache/setup.log
QUIET=0; [[ ${1:-} == -q ]] && QUIET=1

mkdir -p "$ROOT/.cache"
: >"$LOG"
say() { ((QUIET)) || echo "setup: $*"; }
# Run a step with its output in $LOG; on failure show the log's tail and stop.
run() { "$@" >>"$LOG" 2>&1 || { echo "setup: FAILED: $*" >&2; tail -n 40 "$LOG" >&2; exit 1; }; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# 1. The virtual environment (recreated if its interpreter no longer runs, e.g. Python moved).
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    say "creating .venv"
    rm -rf "$VENV"
    run "${PYTHON:-python3}" -m venv "$VENV"
fi
PY=$VENV/bin/python
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# 2. Pinned requirements (torch==2.13.0 is the CPU build on disk here).
stamp=$VENV/.stamp-requirements
want="$PYVER $(hash_of requirements.txt requirements-test.txt)"
if [[ $(cat "$stamp" 2>/dev/null) != "$want" ]]; then
    say "installing requirements-test.txt (about a minute the first time)"
    run "$PY" -m pip install -q -r requirements-test.txt
    echo "$want" >"$stamp"
fi

# 3. loraembed, editable, without its (ranged) dependencies: the pins above provide them.
# The stub ignores PYTHONPATH and runs elsewhere: check from / with PYTHONPATH unset that loraembed
# resolves to backend_src/ (find_spec locates it without running its code, whose bugs are the tests' job).
finds_loraembed() {
    (cd / && env -u PYTHONPATH "$PY" -c 'import importlib.util, sys
spec = importlib.util.find_spec("loraembed")
sys.exit(not (spec and spec.origin.startswith(sys.argv[1])))' "$ROOT/backend_src/") >>"$LOG" 2>&1
}
stamp=$VENV/.stamp-loraembed
want=$(hash_of backend_src/pyproject.toml)
if [[ $(cat "$stamp" 2>/dev/null) != "$want" ]] || ! finds_loraembed; then
    say "installing backend_src (editable)"
    run "$PY" -m pip install -q --no-deps -e backend_src
    finds_loraembed || { echo "setup: .venv does not find loraembed in backend_src/" >&2; exit 1; }
    echo "$want" >"$stamp"
fi

# 4. tritonserver from the nvidia-pytriton wheel, unpacked (installing it would drag in its own pins).
stamp=$TRITON/.stamp
want="$PYTRITON $PYVER"
if [[ $(cat "$stamp" 2>/dev/null) != "$want" ]]; then
    say "unpacking tritonserver from $PYTRITON"
    run "$PY" -m pip download -q --no-deps -d "$ROOT/.cache/wheels" "$PYTRITON"
    rm -rf "$TRITON"
    # zipfile rather than unzip: one fewer Debian package to need.
    run "$PY" - "$ROOT/.cache/wheels" "${PYTRITON#*==}" "$TRITON" <<'EOF'
import glob, sys, zipfile
wheel_dir, version, dest = sys.argv[1:]
(wheel,) = glob.glob(f"{wheel_dir}/nvidia_pytriton-{version}-*.whl")
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist()
                        if n.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/"))])
EOF
    server=$TRITON/pytriton/tritonserver
    # backends/python/ is as deep as python_backend_stubs/X.Y/, so the stub's rpath still finds the libs.
    run cp "$server/python_backend_stubs/$PYVER/triton_python_backend_stub" "$server/backends/python/"
    chmod +x "$server/bin/"* "$server/backends/python/triton_python_backend_stub"
    echo "$want" >"$stamp"
fi
# 5. perf_analyzer (benchmarks/serve_bench.sh and its test): the last client wheel that ships it,
# unpacked; it links libb64.so.0d and libcudart.so.12, both in nvidia_pytriton.libs under hashed names.
# Optional: without a package index the serving benchmark's test skips, nothing else needs it.
PERF_CLIENT=tritonclient==2.41.0
stamp=$TRITON/perf/.stamp
if [[ $(cat "$stamp" 2>/dev/null) != "$PERF_CLIENT" ]]; then
    say "unpacking perf_analyzer from $PERF_CLIENT"
    rm -rf "$TRITON/perf"
    if "$PY" -m pip download -q --no-deps -d "$ROOT/.cache/wheels" "$PERF_CLIENT" >>"$LOG" 2>&1; then
        run "$PY" - "$ROOT/.cache/wheels" "${PERF_CLIENT#*==}" "$TRITON" <<'EOF'
import glob, os, sys, zipfile
wheel_dir, version, triton = sys.argv[1:]
(wheel,) = glob.glob(f"{wheel_dir}/tritonclient-{version}-*.whl")
os.makedirs(f"{triton}/perf/lib")
with zipfile.ZipFile(wheel) as z, open(f"{triton}/perf/perf_analyzer", "wb") as out:
    out.write(z.read(f"tritonclient-{version}.data/data/bin/perf_analyzer"))
os.chmod(f"{triton}/perf/perf_analyzer", 0o755)
for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
    (library,) = glob.glob(f"{triton}/nvidia_pytriton.libs/{pattern}")
    os.symlink(os.path.relpath(library, f"{triton}/perf/lib"), f"{triton}/perf/lib/{name}")
EOF
        run env LD_LIBRARY_PATH="$TRITON/perf/lib" "$TRITON/perf/perf_analyzer" --version
        echo "$PERF_CLIENT" >"$stamp"
    else
        echo "setup: could not download $PERF_CLIENT (no perf_analyzer: the serving benchmark's test will skip)" >&2
    fi
fi
say "ready: .venv (Python $PYVER), .triton/pytriton/tritonserver/bin/tritonserver, .triton/perf/perf_analyzer"
