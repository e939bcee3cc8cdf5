# Source on the lent GPU host (see DEVELOPERS' notes): layers the carried bundles (.gpufa: flash-attn,
# .gpuhost: tritonserver + perf_analyzer + numpy<2) into one venv over the host's torch, and makes
# loraembed importable there through a .pth file (the Triton stub ignores PYTHONPATH).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export HOST_PYTHON=${HOST_PYTHON:-$(command -v python3)}
for bundle in "$ROOT/.gpufa" "$ROOT/.gpuhost"; do
  [ -f "$bundle/install.sh" ] && source "$bundle/install.sh"
done
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
echo "$ROOT/backend_src" > "$site/loraembed-src.pth"
# The venv's python (numpy<2) is for the Triton stub; the host's own python3 (numpy 2, which the
# host's transformers needs) stays available as $HOST_PYTHON for tests and checkpoint building.
export GPUHOST_VENV_BIN=$(dirname "$(command -v python3)")
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
