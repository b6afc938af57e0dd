#!/usr/bin/env bash
# One command for a short GPU window (one H100/H200, no package index, a preinstalled CUDA torch):
# kernel table + training step benchmark in under 8 minutes, results as a few flat files.
#
#   make gpu-bundle                               # first, where PyPI is reachable: .gpu_bundle/
#   launch/gpu_check.sh OUT_DIR [BUNDLE_DIR]      # on the GPU node (BUNDLE_DIR: .gpu_bundle)
#   launch/gpu_check.sh --plan                    # stages and time budget; runs anywhere
#
# The node's torch is never replaced: missing packages install offline without dependencies into
# a private directory on PYTHONPATH. Details: megareweight/gpu_check.py.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m megareweight.gpu_check "$@"
