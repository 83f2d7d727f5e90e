#!/usr/bin/env bash
# Create .venv and install minconv_dist with everything it needs, from this repository's files only.
# Order matters: torch first (the pinned CPU wheel), then DeepSpeed without build isolation so pip
# does not fetch a second (CUDA) torch into DeepSpeed's build environment, then the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.installed-$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip setuptools wheel ninja
$PIP install "torch==2.13.0"
# DS_BUILD_OPS=0: no CUDA ops at install; DeepSpeed compiles the few it needs just in time.
DS_BUILD_OPS=0 $PIP install --no-build-isolation -c requirements/constraints.txt "deepspeed==0.19.8"
$PIP install -c requirements/constraints.txt -e ".[test]"
rm -f "$VENV"/.installed-*
touch "$STAMP"
