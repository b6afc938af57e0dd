#!/usr/bin/env bash
# One machine, all its GPUs (or N CPU processes with DS_ACCELERATOR=cpu):
#   launch/train_single_node.sh CONFIG.yaml DS_CONFIG.json OUT_DIR [--resume] [--set key=value ...]
# NUM_ACCELERATORS (default: every visible GPU) and MASTER_PORT (default 29500) override.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 CONFIG.yaml DS_CONFIG.json OUT_DIR [extra megareweight train arguments]" >&2; exit 2
fi
config=$1 ds_config=$2 out=$3; shift 3
if [ -z "${NUM_ACCELERATORS:-}" ]; then
  NUM_ACCELERATORS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NUM_ACCELERATORS:-0}" -gt 0 ] || NUM_ACCELERATORS=1
fi
# The JIT-built DeepSpeed ops are cached across runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
# cuBLAS picks reduction schemes per stream from its workspace; a fixed workspace config makes its
# GEMMs bitwise repeatable (README "Determinism"). Costs a few MB per stream.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
exec deepspeed --num_accelerators "$NUM_ACCELERATORS" --master_port "${MASTER_PORT:-29500}" \
  --module megareweight.train --config "$config" --deepspeed "$ds_config" --out "$out" "$@"
