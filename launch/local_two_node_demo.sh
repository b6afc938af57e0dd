#!/usr/bin/env bash
# Two "nodes" on this machine over loopback: two DeepSpeed launchers, one process each, started
# with --no_ssh --node_rank 0|1 exactly as on a cluster without ssh (SLURM). Runs on CPU (gloo).
#   launch/local_two_node_demo.sh CONFIG.yaml DS_CONFIG.json OUT_DIR [extra arguments]
# MASTER_PORT (default 29531) selects the rendezvous port.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 CONFIG.yaml DS_CONFIG.json OUT_DIR [extra arguments]" >&2; exit 2
fi
config=$1 ds_config=$2 out=$3; shift 3
port=${MASTER_PORT:-29531}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
hostfile=$out/hostfile.local
printf 'nodeA slots=1\nnodeB slots=1\n' > "$hostfile"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -- -"$pid" 2>/dev/null || true; done
  rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$port"_*
}
trap cleanup EXIT
for node in 0 1; do
  setsid deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node" \
    --master_addr 127.0.0.1 --master_port "$port" --module megareweight.train \
    --config "$config" --deepspeed "$ds_config" --out "$out" "$@" > "$out/node$node.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
pids=()
[ "$status" -eq 0 ] || { tail -n 40 "$out"/node*.log >&2; exit "$status"; }
echo "two-node demo finished: $out/metrics.jsonl"
