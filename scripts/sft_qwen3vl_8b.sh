#!/usr/bin/env bash
# Qwen3-VL-8B: as the 4B recipe with half the micro-batch and twice the accumulation (same global batch).
# LR, BATCH, ACCUM, MODEL_PATH, DATASETS, OUTPUT_DIR, DTYPE, MSRUN_ARGS ... from the environment override the
# defaults below (see sft.sh and launch_msrun.sh); flags after the script name override any flag.
MODEL_PATH="${MODEL_PATH:-./models/Qwen3-VL-8B-Instruct}" LR="${LR:-1e-5}" BATCH="${BATCH:-2}" ACCUM="${ACCUM:-8}" \
  exec bash "$(dirname "$0")/sft.sh" --zero_stage "${ZERO_STAGE:-2}" --tune_mm_llm True --tune_mm_mlp True --tune_mm_vision False \
  --max_pixels $((256 * 32 * 32)) --min_pixels $((4 * 32 * 32)) "$@"
