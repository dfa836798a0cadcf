#!/usr/bin/env bash
# Qwen2.5-VL-7B: LLM + merger trained, vision tower frozen (upstream sft_7b.sh), one node of 8 cards.
# Several nodes: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 IP> bash scripts/sft_qwen2.5vl_7b.sh
# LR, BATCH, ACCUM, MODEL_PATH, DATASETS, OUTPUT_DIR, DTYPE, MSRUN_ARGS ... from the environment override the
# defaults below (see sft.sh and launch_msrun.sh); flags after the script name override any flag.
MODEL_PATH="${MODEL_PATH:-./models/Qwen2.5-VL-7B-Instruct}" LR="${LR:-2e-7}" BATCH="${BATCH:-4}" ACCUM="${ACCUM:-4}" \
  exec bash "$(dirname "$0")/sft.sh" --zero_stage "${ZERO_STAGE:-2}" --tune_mm_llm True --tune_mm_mlp True --tune_mm_vision False "$@"
