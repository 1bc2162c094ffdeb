#!/usr/bin/env bash
# Creates .venv with everything fedtransfer needs (idempotent: re-runs only when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"  # the checkout itself, even through a symlink
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[test,timm]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
