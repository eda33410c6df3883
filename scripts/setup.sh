#!/usr/bin/env bash
# Creates .venv and installs llama4 with its test oracles. Idempotent: a second run with an
# unchanged pyproject.toml only checks a stamp file. No network beyond the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=.venv/.llama4-installed
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    # The CPU build of torch first, so nothing later pulls a multi-GB CUDA build.
    .venv/bin/pip install -q torch==2.13.0
    # fairscale is imported by Meta's llama-models reference (our oracle); its own metadata
    # would re-resolve torch, so it is installed without dependencies.
    .venv/bin/pip install -q fairscale==0.4.13 --no-deps
    # microsoft/mup, the reference for the μP rules our MetaP is tested against; its metadata
    # pulls torchvision and a CUDA torch, and it only needs torch and pyyaml.
    .venv/bin/pip install -q mup==1.0.0 --no-deps
    .venv/bin/pip install -q -e ".[test]"
    # transformers' Llama4ImageProcessor (an oracle) needs torchvision, whose PyPI wheel cannot be
    # imported beside the CPU torch; it lives outside the venv's path and only the test loads it.
    .venv/bin/pip install -q --no-deps --upgrade --target .venv/oracles/torchvision torchvision==0.28.0
    echo "$WANT" > "$STAMP"
fi
