#!/usr/bin/env bash
# The CPU demo: install, build a tiny random Qwen2.5-VL (its own small tokenizer, no download), train it
# on the bundled demo images for a few minutes, and end with a checkpoint and a summary (loss going down).
#
#   bash scripts/demo_cpu.sh [extra train_qwen.py flags]
#
# Everything goes to runs/demo/ (the tiny model in runs/demo/tiny-qwen2.5-vl, the run in runs/demo/output,
# which is started afresh each time). FAMILY=qwen3vl selects a tiny Qwen3-VL instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/install.sh")"
cd "$root"
export GLOG_v="${GLOG_v:-3}"  # MindSpore: errors only (no CPU-build warnings about Ascend libraries)
family="${FAMILY:-qwen2.5vl}"
model="runs/demo/tiny-$family"
out="runs/demo/output-$family"
if [[ ! -f "$model/config.json" ]]; then
  "$venv/bin/python" tools/make_tiny_model.py --out "$model" --family "$family" --corpus demo/demo_images.json
fi
rm -rf "$out"
"$venv/bin/python" qwenvl/train/train_qwen.py \
  --model_name_or_path "$model" \
  --dataset_use demo_images \
  --output_dir "$out" \
  --tune_mm_llm True --tune_mm_mlp True --tune_mm_vision True \
  --learning_rate 2e-3 --lr_scheduler_type cosine --warmup_ratio 0.1 --weight_decay 0.01 \
  --num_train_epochs 4 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
  --model_max_length 256 --logging_steps 6 --save_steps 24 --save_total_limit 2 \
  "$@"
echo "[demo] checkpoints and the final model are in $out (train_log.jsonl, train_summary.json)"
