#!/usr/bin/env bash
# Several machines reachable by password-less ssh (pdsh), listed in a hostfile (see hostfile.example);
# run on the first host, from a checkout at the same path on every host:
#   HOSTFILE=launch/hostfile MASTER_ADDR=node01 launch/train_multi_node.sh CONFIG.yaml DS_CONFIG.json OUT_DIR
# OUT_DIR must be on a shared filesystem: every rank writes its checkpoint shards there.
# Without ssh (e.g. under SLURM), start one launcher per node instead: see slurm_train.sbatch.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: HOSTFILE=... MASTER_ADDR=... $0 CONFIG.yaml DS_CONFIG.json OUT_DIR [extra arguments]" >&2; exit 2
fi
config=$1 ds_config=$2 out=$3; shift 3
: "${HOSTFILE:?set HOSTFILE (lines: 'hostname slots=GPUS')}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first host's address}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
# cuBLAS picks reduction schemes per stream from its workspace; a fixed workspace config makes its
# GEMMs bitwise repeatable (README "Determinism"). Costs a few MB per stream.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module megareweight.train --config "$config" --deepspeed "$ds_config" --out "$out" "$@"
