#!/usr/bin/env bash
# Qwen3-VL-4B: LLM + merger (and deepstack mergers) trained (upstream sft_qwen3_4b.sh), 8 cards.
# Qwen3 images use 32x32 merged patches: pixel bounds are multiples of 32*32.
# LR, BATCH, ACCUM, MODEL_PATH, DATASETS, OUTPUT_DIR, DTYPE, MSRUN_ARGS ... from the environment override the
# defaults below (see sft.sh and launch_msrun.sh); flags after the script name override any flag.
MODEL_PATH="${MODEL_PATH:-./models/Qwen3-VL-4B-Instruct}" LR="${LR:-1e-5}" BATCH="${BATCH:-4}" ACCUM="${ACCUM:-4}" \
  exec bash "$(dirname "$0")/sft.sh" --zero_stage "${ZERO_STAGE:-1}" --tune_mm_llm True --tune_mm_mlp True --tune_mm_vision False \
  --max_pixels $((256 * 32 * 32)) --min_pixels $((4 * 32 * 32)) "$@"
