#!/usr/bin/env bash
# Wheels the GPU machine lacks (it reaches no package index), made here into .whl/
# (git-ignored) for benchmarks/gpu_check.sh to install offline with --no-deps. The machine's
# image has torch, torchvision, numpy, safetensors, scikit-learn, matplotlib, tqdm, pillow,
# pyyaml, typing-extensions and pytest; contrast also needs these, at the versions of the
# environment that runs this script (the venv that passed `make test`), built for Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
pure=()
for name in hydra-core omegaconf pydantic annotated-types typing-inspection; do
    pure+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pure[@]}" "pydantic-core==$(version pydantic-core)"
# antlr4-python3-runtime (omegaconf's parser) is published as source only: build its wheel.
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls .whl
