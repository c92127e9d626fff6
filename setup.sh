#!/usr/bin/env bash
# One-command set-up on a fresh Debian/Ubuntu machine:
#   WordNet (Debian's wordnet-base, the offline text data), a virtualenv in .venv, fedpeft.
# TORCH_SPEC picks the torch build (default: torch==2.13.0; on a GPU box, e.g. "torch").
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/wordnet/data.noun ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq wordnet-base
  else
    echo "setup.sh: no apt-get; install WordNet 3.0 so that /usr/share/wordnet/data.noun exists" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q -e '.[dev,tracking]'
echo "fedpeft installed in .venv: run '.venv/bin/fedpeft run' (quickstart) or '.venv/bin/pytest'"
