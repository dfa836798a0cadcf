#!/usr/bin/env bash
# Supervised fine-tuning with upstream's sft.sh flags; the per-model scripts set the defaults of the
# variables below, and each one can be overridden from the environment:
#
#   MODEL_PATH  local checkpoint folder (config.json + safetensors + tokenizer/processor files)
#   DATASETS    --dataset_use value: registered names or .json/.jsonl paths, `name%50` samples 50%
#   OUTPUT_DIR  checkpoints, logs (train_log.jsonl, TensorBoard runs/) and the final model
#   LR BATCH ACCUM   learning rate, per-card micro-batch, micro-batches per optimizer step
#   ZERO_STAGE  ZeRO stage 0-3 (the per-model scripts default to the stage tools/estimate_memory.py picks)
#   DTYPE       bf16 (default on Ascend), fp16, or fp32 (default without an Ascend device: the CPU
#               backend has no bfloat16 kernels)
#   NPROC_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT LOG_DIR MSRUN_ARGS   see launch_msrun.sh
# Relative paths are relative to the directory you run this from. Extra flags after the script name
# are passed on (they override the ones here).
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
: "${MODEL_PATH:?set MODEL_PATH to a local model folder}"
DATASETS="${DATASETS:-demo_images}"
OUTPUT_DIR="${OUTPUT_DIR:-./output/$(basename "$MODEL_PATH")}"
BATCH="${BATCH:-4}"
device="${QWENVL_DEVICE:-}"
if [[ -z "$device" ]] && compgen -G "/dev/davinci[0-9]*" >/dev/null; then device=Ascend; fi  # Ascend card devices
if [[ -z "${DTYPE:-}" ]]; then
  if [[ "$device" == "Ascend" ]]; then
    DTYPE=bf16
  else
    DTYPE=fp32
    echo "[sft] no Ascend device: training in float32 (bfloat16 needs Ascend; DTYPE=fp16 for float16)" >&2
  fi
fi
case "$DTYPE" in
  bf16) dtype_flags=(--bf16 True) ;;   # bfloat16 compute, fp32 master weights in AdamW
  fp16) dtype_flags=(--fp16 True) ;;   # float16 compute with loss scaling, fp32 master weights
  fp32) dtype_flags=() ;;
  *) echo "[sft] error: DTYPE=$DTYPE: expected bf16, fp16 or fp32" >&2; exit 2 ;;
esac
args=(
  --model_name_or_path "$MODEL_PATH"
  --dataset_use "$DATASETS"
  --output_dir "$OUTPUT_DIR"
  --data_flatten True                 # one row per micro-batch, attention kept inside each sample
  ${dtype_flags[@]+"${dtype_flags[@]}"}
  --zero_stage "${ZERO_STAGE:-1}"     # ZeRO: 1 shards AdamW state, 2 also gradients, 3 also weights (docs/parallel.md)
  --num_train_epochs 0.5
  --per_device_train_batch_size "$BATCH"
  --per_device_eval_batch_size "$((2 * BATCH))"
  --gradient_accumulation_steps "${ACCUM:-4}"
  --learning_rate "${LR:-2e-7}"
  --max_pixels 50176 --min_pixels 784 # image pixel bounds after smart_resize (multiples of 28x28 / 32x32)
  --eval_strategy no
  --save_strategy steps --save_steps 1000 --save_total_limit 1
  --weight_decay 0 --warmup_ratio 0.03 --max_grad_norm 1 --lr_scheduler_type cosine
  --logging_steps 1
  --model_max_length 8192             # per-sample token limit; vision blocks are never cut
  --gradient_checkpointing True       # recompute each decoder layer / vision block in backward
  --dataloader_num_workers 4
  --report_to tensorboard
)
exec bash "$here/launch_msrun.sh" "${args[@]}" "$@"
