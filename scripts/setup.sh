#!/usr/bin/env bash
# Create ./.venv (or $VENV) with the CPU torch wheel first, then hf_koleo and its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
"$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[dev]"
# BENCH=1: lightly for the peer step of scripts/benchmark.py. --no-deps: its torchvision
# requirement would replace the CPU torch wheel; the DINO loss and head never use torchvision.
if [ "${BENCH:-0}" = 1 ]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "lightly==1.6.0"
fi
