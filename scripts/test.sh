#!/usr/bin/env bash
# The test command: set up (no-op when already done) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# OpenMP spin-waiting collapses throughput when cores are shared (PLATFORM.md); tests never need it.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -m pytest -q "$@"
