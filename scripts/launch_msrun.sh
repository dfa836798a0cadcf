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
#   --log_dir           one worker_<rank>.log per process (rank 0 also prints the progress bar there)
#   --join=True         wait for the workers and return their exit status
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-8118}"
LOG_DIR="${LOG_DIR:-$root/logs/train}"
cd "$root"
exec msrun \
  --worker_num=$((NNODES * NPROC_PER_NODE)) \
  --local_worker_num="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" \
  --node_rank="$NODE_RANK" \
  --log_dir="$LOG_DIR" \
  --join=True \
  qwenvl/train/train_qwen.py "$@"
