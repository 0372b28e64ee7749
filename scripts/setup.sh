#!/usr/bin/env bash
# Create ./.venv (or $VENV) with the CPU torch wheel first, then hf_koleo and its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
"$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[dev]"
# lightly is the peer of scripts/benchmark.py's step comparison (and its test). --no-deps: its
# torchvision requirement would replace the CPU torch wheel; its DINO loss and head never use it.
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "lightly==1.6.0"
