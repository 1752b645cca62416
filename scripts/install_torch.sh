#!/usr/bin/env bash
# Install PyTorch into the given virtual environment before moeviz itself, so that the project's
# `torch>=2.4` requirement is already satisfied and pip never resolves it to a multi-GB CUDA wheel
# on a machine without a GPU.
#
# Order of preference:
#   1. torch already importable in the venv            -> nothing to do
#   2. $TORCH_SPEC / $TORCH_INDEX_URL set by the user  -> exactly that (e.g. a CUDA build)
#   3. an NVIDIA GPU is visible (nvidia-smi)           -> PyPI's default build (CUDA)
#   4. otherwise a CPU build: a local CPU wheel pip can find (find-links / local index, e.g.
#      torch==2.13.0+cpu), else PyTorch's CPU index.
set -euo pipefail
PY="${1:-.venv/bin/python}"
PIP=("$PY" -m pip install --disable-pip-version-check)

if "$PY" -c "import torch" >/dev/null 2>&1; then
    exit 0
fi
if [[ -n "${TORCH_SPEC:-}" || -n "${TORCH_INDEX_URL:-}" ]]; then
    echo "install_torch: ${TORCH_SPEC:-torch} ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}"
    "${PIP[@]}" "${TORCH_SPEC:-torch}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install_torch: NVIDIA GPU found, installing PyPI's default (CUDA) torch build"
    "${PIP[@]}" torch
    exit 0
fi
echo "install_torch: no GPU found, installing a CPU build of torch"
for spec in "torch==2.13.0+cpu"; do
    # A `+cpu` local version exists only as a CPU wheel that pip can see locally (find-links or a local
    # index, as on moeviz's CI machines); PyPI has none, so on other machines this fails at once
    # instead of falling through to a multi-GB CUDA wheel.
    if "${PIP[@]}" "$spec" >/dev/null 2>&1; then
        echo "install_torch: installed $spec from a local wheel"
        exit 0
    fi
done
"${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
