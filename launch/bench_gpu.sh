#!/usr/bin/env bash
# Training throughput benchmark on this node's GPUs: ZeRO-3, bf16, the fused loss, LinUpper
# reweighting active from step 1, ~50 steps per model size (125m and 1.4b), on any prepared corpus
# (the natural mixture of the domains its manifest lists). For each size it writes or replaces one
# row of launch/results/<gpu>/train_bench.json, measured from the run's metrics.jsonl after the
# warm-up steps (python -m megareweight.train.bench): device, size, seq_len, micro_batch_size,
# world_size, tokens_per_s, mfu, max_memory_gib, loss_impl, activation_checkpointing, command.
#
#   launch/bench_gpu.sh PREPARED_DIR
#
# Environment (default):
#   SIZES ("125m 1.4b")   STEPS (50)   WARMUP (10 steps not timed)   SEQ_LEN (2048)
#   MBS_125M (16), MBS_1_4B (4), MBS (8, other sizes): micro-batch per GPU
#   CKPT_125M (none), CKPT_1_4B (none), CKPT (none): model.activation_checkpointing
#   COMPILE (true): train.compile        LOSS_IMPL (fused)        PRECISION (bf16)
#   DS_CONFIG (ds_configs/zero3_1.4b.json)   PEAK_TFLOPS (unset: the table for known GPUs)
#   RESULTS_DIR (launch/results)   NUM_ACCELERATORS (every visible GPU)   MASTER_PORT (29500)
#   KEEP_RUNS (unset: the run directories are removed)
#   DEEPSPEED (deepspeed): the launcher command, e.g. "python3 -m deepspeed.launcher.runner" where
#   DeepSpeed was installed without its console script (launch/gpu_check.sh does that)
# A CPU smoke run of the whole script (seconds, numbers meaningless):
#   DS_ACCELERATOR=cpu NUM_ACCELERATORS=1 SIZES=tiny STEPS=3 WARMUP=1 SEQ_LEN=32 MBS=2 COMPILE=false \
#     LOSS_IMPL=chunked PRECISION=fp32 DS_CONFIG=ds_configs/zero3_cpu_tiny.json RESULTS_DIR=/tmp/bench \
#     launch/bench_gpu.sh PREPARED_DIR
set -euo pipefail
if [ $# -ne 1 ] || [ ! -f "$1/manifest.json" ]; then
  echo "usage: $0 PREPARED_DIR   (a directory written by 'megareweight prepare', with manifest.json)" >&2
  exit 2
fi
prepared=$(cd "$1" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
steps=${STEPS:-50}
warmup=${WARMUP:-10}
seq=${SEQ_LEN:-2048}
ds_config=${DS_CONFIG:-ds_configs/zero3_1.4b.json}
results=${RESULTS_DIR:-launch/results}
python=${PYTHON:-python}
if [ -z "${NUM_ACCELERATORS:-}" ]; then
  NUM_ACCELERATORS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NUM_ACCELERATORS:-0}" -gt 0 ] || { echo "$0: no GPU visible (set NUM_ACCELERATORS)" >&2; exit 2; }
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}
runs=$(mktemp -d "${TMPDIR:-/tmp}/bench_gpu_XXXX")
[ -n "${KEEP_RUNS:-}" ] || trap 'rm -rf "$runs"' EXIT

for size in ${SIZES:-125m 1.4b}; do
  case $size in
    125m) mbs=${MBS_125M:-16}; ckpt=${CKPT_125M:-none} ;;
    1.4b) mbs=${MBS_1_4B:-4};  ckpt=${CKPT_1_4B:-none} ;;
    *)    mbs=${MBS:-8};       ckpt=${CKPT:-none} ;;
  esac
  out=$runs/$size
  read -r -a launcher <<< "${DEEPSPEED:-deepspeed}"
  cmd=("${launcher[@]}" --num_accelerators "$NUM_ACCELERATORS" --master_port "${MASTER_PORT:-29500}"
       --module megareweight.train --config megareweight/configs/1.4b_linupper.yaml
       --deepspeed "$ds_config" --out "$out" --quiet
       --set model.size="$size" --set model.activation_checkpointing="$ckpt"
       --set data.prepared="$prepared" --set data.mixture=natural --set data.seq_len="$seq"
       --set data.micro_batch_size="$mbs" --set data.eval_sequences=8
       --set train.max_steps="$steps" --set train.gradient_accumulation_steps=1
       --set train.precision="${PRECISION:-bf16}" --set train.compile="${COMPILE:-true}"
       --set train.log_interval=1 --set train.eval_interval=0 --set train.checkpoint_interval=0
       --set train.histogram_interval=0 --set loss.impl="${LOSS_IMPL:-fused}"
       --set reweight.strategy=linupper --set reweight.warmup_steps=0 --set optim.warmup_steps=10
       --set wandb.mode=disabled)
  [ -z "${PEAK_TFLOPS:-}" ] || cmd+=(--set train.peak_tflops="$PEAK_TFLOPS")
  echo "[bench_gpu] $size: ${cmd[*]}" >&2
  "${cmd[@]}"
  "$python" -m megareweight.train.bench "$out" --warmup "$warmup" --results-dir "$results" \
    --command "$(printf '%q ' "${cmd[@]}" | sed -e "s|$out|RUN_DIR|" -e 's/ $//')"
done
