#!/usr/bin/env bash
# pip-audit over requirements.lock (the exact versions setup.sh installs), in its own venv so
# that the auditor's dependencies stay out of the product's. Known findings that do not apply
# are listed in docs/security.md with the reason, and ignored here by id. --strict: a package
# that could not be checked (no route to the vulnerability service) fails the audit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-audit/bin/pip-audit ] || { python3 -m venv .venv-audit && .venv-audit/bin/pip install -q pip-audit; }
ignores=()
while read -r id; do ignores+=(--ignore-vuln "$id"); done < <(sed -n 's/^| *\(\(GHSA\|PYSEC\|CVE\)-[^ |]*\) *|.*/\1/p' docs/security.md)
exec .venv-audit/bin/pip-audit -r requirements.lock --no-deps --disable-pip --progress-spinner off --strict "${ignores[@]}" "$@"
