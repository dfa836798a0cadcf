#!/usr/bin/env bash
# Qwen3-VL-30B-A3B (MoE) with LoRA adapters on the LLM attention (upstream sft_30a3b_lora.sh); the base
# weights stay frozen, adapters are saved in PEFT format. Several nodes are usual for this size:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 IP> bash scripts/sft_qwen3vl_30b_a3b_lora.sh
# LR, BATCH, ACCUM, MODEL_PATH, DATASETS, OUTPUT_DIR, DTYPE, MSRUN_ARGS ... from the environment override the
# defaults below (see sft.sh and launch_msrun.sh); flags after the script name override any flag.
MODEL_PATH="${MODEL_PATH:-./models/Qwen3-VL-30B-A3B-Instruct}" \
  LR="${LR:-1e-5}" BATCH="${BATCH:-1}" ACCUM="${ACCUM:-4}" \
  exec bash "$(dirname "$0")/sft.sh" --zero_stage "${ZERO_STAGE:-3}" --lora_enable True --lora_r 64 --lora_alpha 128 --lora_dropout 0.05 \
  --tune_mm_llm False --tune_mm_mlp False --tune_mm_vision False \
  --max_pixels $((256 * 32 * 32)) --min_pixels $((4 * 32 * 32)) "$@"
