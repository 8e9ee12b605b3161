#!/usr/bin/env bash
# Install everything (idempotent) and serve the embedded default model, factorized.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/factorllm serve "$@"
