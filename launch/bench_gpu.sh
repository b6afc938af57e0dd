#!/usr/bin/env bash
# GPU throughput benchmark (not run in CI: needs GPUs): ZeRO-3 bf16, ~50 steps each for the 125m
# and 1.4b models, on every visible GPU of this node. Writes launch/results/<size>_zero3_bf16.json
# with tokens/s (global and per GPU) and MFU = tokens/s/GPU * flops_per_token / peak FLOP/s, where
# flops_per_token comes from `megareweight model-info` (6*N_matmul + 12*L*d*T; PaLM's definition).
#   launch/bench_gpu.sh PREPARED_DIR [MICRO_BATCH]    (PEAK_TFLOPS: per-GPU bf16 dense peak, default
#   989 = H100 SXM; STEPS default 50; SEQ_LEN default 2048; the first 10 steps are not timed)
set -euo pipefail
prepared=${1:?usage: $0 PREPARED_DIR [MICRO_BATCH]}
mbs=${2:-8}
steps=${STEPS:-50}
seq=${SEQ_LEN:-2048}
peak=${PEAK_TFLOPS:-989}
gpus=${NUM_ACCELERATORS:-$(nvidia-smi -L | wc -l)}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$here/results"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
for size in 125m 1.4b; do
  ds=$here/../ds_configs/zero3_1.4b.json  # 125m: same buckets; zero_init is harmless at this size
  out=$(mktemp -d "${TMPDIR:-/tmp}/bench_${size}_XXXX")
  deepspeed --num_accelerators "$gpus" --master_port "${MASTER_PORT:-29500}" --module megareweight.train \
    --config "$here/../megareweight/configs/demo.yaml" --deepspeed "$ds" --out "$out" --quiet \
    --set model.size="$size" --set data.prepared="$prepared" --set data.seq_len="$seq" \
    --set data.micro_batch_size="$mbs" --set train.max_steps="$steps" --set train.precision=bf16 \
    --set train.eval_interval=0 --set data.eval_sequences=8 --set reweight.strategy=linupper \
    --set loss.impl=auto --set wandb.mode=disabled --set optim.warmup_steps=10
  python - "$out" "$size" "$seq" "$gpus" "$peak" "$here/results/${size}_zero3_bf16.json" "$prepared" <<'PY'
import json, platform, subprocess, sys
from megareweight.data.shards import PreparedData
from megareweight.model_info import model_info

out, size, seq, gpus, peak, dest = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if l.strip()]
timed = rows[10:] if len(rows) > 20 else rows[len(rows) // 2:]
tokens_per_step = rows[0]["tokens"]  # global tokens of one optimizer step
seconds = sum(r["step_seconds"] for r in timed)
tps = tokens_per_step * len(timed) / seconds
info = model_info(size, vocab_size=PreparedData.open(sys.argv[7]).vocab_size, seq_len=seq)
mfu = tps / gpus * info["flops_per_token"] / (peak * 1e12)
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.split("\n")[0]
result = {"size": size, "zero_stage": 3, "precision": "bf16", "gpus": gpus, "gpu": gpu, "seq_len": seq,
          "tokens_per_step": tokens_per_step, "timed_steps": len(timed), "tokens_per_s": tps,
          "tokens_per_s_per_gpu": tps / gpus, "flops_per_token": info["flops_per_token"],
          "peak_tflops_per_gpu": peak, "mfu": mfu, "final_loss": rows[-1]["loss"], "host": platform.node()}
json.dump(result, open(dest, "w"), indent=2)
print(json.dumps(result))
PY
  rm -rf "$out"
done
