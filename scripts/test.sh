#!/usr/bin/env bash
# Install everything (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f scripts/install_deploy_tools.sh ] && . .venv/bin/activate && bash scripts/install_deploy_tools.sh
export FACTORLLM_CACHE=${FACTORLLM_CACHE:-$PWD/.cache/factorllm}
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
