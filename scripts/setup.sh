#!/usr/bin/env bash
# Creates .venv and installs llama4 with its test oracles. Idempotent: a second run with an
# unchanged pyproject.toml only checks a stamp file. No network beyond the package registries.
# A failed step stops the script (set -e) with a line naming the step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { STEP=$1; }
trap 'echo "scripts/setup.sh: error: step \"${STEP:-start}\" failed (exit $?); see the pip output above" >&2' ERR
step "create .venv"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=.venv/.llama4-installed
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    # The CPU build of torch first, so nothing later pulls a multi-GB CUDA build.
    step "install torch (CPU)"
    .venv/bin/pip install -q torch==2.13.0
    # fairscale is imported by Meta's llama-models reference (our oracle); its own metadata
    # would re-resolve torch, so it is installed without dependencies.
    step "install fairscale"
    .venv/bin/pip install -q fairscale==0.4.13 --no-deps
    step "install llama4[test]"
    .venv/bin/pip install -q -e ".[test]"
    # microsoft/mup, the reference for the μP rules our MetaP is tested against; its metadata
    # pulls torchvision, seaborn and a CUDA torch, and it only needs torch and pyyaml. Installed
    # last and without dependencies, so no later resolver run reports its unmet requirements.
    step "install mup"
    .venv/bin/pip install -q mup==1.0.0 --no-deps
    # transformers' Llama4ImageProcessor (an oracle) needs torchvision, whose PyPI wheel cannot be
    # imported beside the CPU torch; it lives outside the venv's path and only the test loads it.
    step "install torchvision (outside the venv's path)"
    .venv/bin/pip install -q --no-deps --upgrade --target .venv/oracles/torchvision torchvision==0.28.0
    # `pip check` must be clean except for mup's declared-but-unused requirements (seaborn for its
    # plots, torchvision for its examples; our tests use neither). Any other line is a real conflict.
    step "pip check"
    unexplained=$(.venv/bin/pip check 2>&1 | grep -v -E '^mup 1\.0\.0 requires (seaborn|torchvision), which is not installed\.$' \
                  | grep -v -E '^No broken requirements found\.$' || true)
    if [ -n "$unexplained" ]; then
        echo "scripts/setup.sh: error: pip check found broken requirements:" >&2
        echo "$unexplained" >&2
        exit 1
    fi
    echo "$WANT" > "$STAMP"
fi
# The arena's browser test (tests/arena/test_browser.py) drives Debian's Chromium through
# Playwright (never Playwright's own browser download). Installed when missing and apt-get can.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    step "install chromium"
    AS=""; [ "$(id -u)" -ne 0 ] && AS="sudo -n"
    { $AS apt-get install -y -qq chromium || { $AS apt-get update -qq && $AS apt-get install -y -qq chromium; }; } \
        >/dev/null 2>&1 || echo "scripts/setup.sh: warning: could not install chromium (apt-get install -y chromium);" \
        "tests/arena/test_browser.py fails until /usr/bin/chromium exists" >&2
fi
trap - ERR
