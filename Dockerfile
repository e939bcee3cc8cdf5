# loraembed: the Triton Inference Server image with this model repository and its Python package.
#   docker build -t loraembed .
#   docker run --gpus all --shm-size=1g -p 8000-8002:8000-8002 loraembed
# Build arguments:
#   TRITON_IMAGE_TAG    the nvcr.io/nvidia/tritonserver release (default 24.10-py3 = Triton 2.51,
#                       Python 3.10, the release the tests run against). Newer ones work the same;
#                       numpy<2 is only required by 2.51's Python stub, and the pinned 1.26.4 suits all.
#                       A release with another Python needs docker/requirements-gpu.txt locked for it
#                       (docker/lock_gpu_requirements.sh --python-version 3.12).
#   FLASH_ATTN          auto (default) | prebuilt | source | none; see docker/install.sh. auto takes
#                       flash-attn's release wheel when the build can download it, else none; without it
#                       the encoder uses PyTorch's varlen_attn, measured as fast on the H100.
#   FLASH_ATTN_VERSION  flash-attn release for prebuilt/source (default 2.8.3.post2)
#   MAX_JOBS            parallel compile jobs for FLASH_ATTN=source (each nvcc job needs ~4 GB of RAM)
#   FLASH_ATTN_CUDA_ARCHS  GPU architectures for FLASH_ATTN=source (default 90: H100)
ARG TRITON_IMAGE_TAG=24.10-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_IMAGE_TAG}

ARG FLASH_ATTN=auto
ARG FLASH_ATTN_VERSION=2.8.3.post2
ARG MAX_JOBS=8
ARG FLASH_ATTN_CUDA_ARCHS=90

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/loraembed
# The same script and pins CI runs (tests/unit/test_docker_install.py), into a virtual environment:
# the Python backend's stub runs the first python3 on PATH, so the venv's packages are the models'.
COPY docker/install.sh docker/requirements-*.txt docker/
COPY backend_src/ backend_src/
RUN FLASH_ATTN="$FLASH_ATTN" FLASH_ATTN_VERSION="$FLASH_ATTN_VERSION" MAX_JOBS="$MAX_JOBS" \
        FLASH_ATTN_CUDA_ARCHS="$FLASH_ATTN_CUDA_ARCHS" \
        docker/install.sh --venv /opt/loraembed/venv --requirements docker/requirements-gpu.txt \
    && rm -rf backend_src
ENV PATH=/opt/loraembed/venv/bin:$PATH

COPY model_repository/ model_repository/
COPY docker/entrypoint.sh entrypoint.sh

# A user of its own with a home for the Hugging Face cache (models given as hub ids) and the
# Triton kernel cache.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin loraembed
USER 10001:10001
ENV HOME=/home/loraembed \
    HF_HOME=/home/loraembed/.cache/huggingface \
    LORAEMBED_MODEL_REPOSITORY=/opt/loraembed/model_repository

EXPOSE 8000 8001 8002
# Ready = every model loaded (--strict-readiness). Loading a hub model the first time can take
# minutes, hence the long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/bin/bash", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${LORAEMBED_HTTP_PORT:-8000}/v2/health/ready || exit 1"]

# NVIDIA's entrypoint first (driver and CUDA compatibility checks, the banner), then ours, which
# honours LORAEMBED_GPUS and the ports and appends the container's arguments to tritonserver's.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/loraembed/entrypoint.sh"]
CMD []
