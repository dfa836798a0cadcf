#!/usr/bin/env bash
# Start qwenvl/train/train_qwen.py on every card of this node with msrun (MindSpore's torchrun).
#
#   NPROC_PER_NODE=8 bash scripts/launch_msrun.sh <train_qwen.py flags>
#
# One node:   NNODES=1 (default). Several nodes: run the same command on every node with
#   NNODES=<nodes> NODE_RANK=<0..NNODES-1> MASTER_ADDR=<IP of node 0> MASTER_PORT=<free port>
# msrun flags used:
#   --worker_num        all processes of the job (NNODES x NPROC_PER_NODE), one per card
#   --local_worker_num  processes started on this node (NPROC_PER_NODE)
#   --master_addr/_port where node 0's scheduler listens (every node must reach it)
#   --node_rank         this node's index (0 runs the scheduler)
#   --log_dir           one worker_<rank>.log per process (LOG_DIR; rank 0 also prints the progress bar there)
#   --join=True         wait for the workers and return their exit status
# MSRUN_ARGS adds msrun flags of your own, e.g. MSRUN_ARGS="--cluster_time_out 600 --bind_core True
# --tail_worker_log 0" (they go before the script, and a later flag of the same name wins).
# The command runs in your current directory: relative paths in the flags (model, data, output_dir)
# are yours, not the repository's. msrun is taken from PATH, else from the project's virtual environment
# (QWENVL_VENV, default ~/.venvs/qwenvl-ms, made by scripts/install.sh), whose python then runs the workers.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-8118}"
LOG_DIR="${LOG_DIR:-$root/logs/train}"
read -r -a msrun_args <<< "${MSRUN_ARGS:-}"
if ! command -v msrun >/dev/null 2>&1; then
  venv="${QWENVL_VENV:-$HOME/.venvs/qwenvl-ms}"
  if [[ ! -x "$venv/bin/msrun" ]]; then
    echo "[launch] error: msrun not found on PATH nor in $venv/bin: run 'bash $root/scripts/install.sh'" \
      "(or activate the environment that has MindSpore)" >&2
    exit 127
  fi
  export PATH="$venv/bin:$PATH"  # msrun starts its workers with the `python` found on PATH
fi
exec msrun \
  --worker_num=$((NNODES * NPROC_PER_NODE)) \
  --local_worker_num="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" \
  --node_rank="$NODE_RANK" \
  --log_dir="$LOG_DIR" \
  --join=True \
  ${msrun_args[@]+"${msrun_args[@]}"} \
  "$root/qwenvl/train/train_qwen.py" "$@"
