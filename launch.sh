#!/usr/bin/env bash
# Launch main.py under torchrun on this node; every argument is passed through to main.py.
#
#   ./launch.sh --cfg configs/crossformerpp_b.yaml --data-path /data/imagenet       # all local GPUs
#   NPROC_PER_NODE=2 ./launch.sh --cfg configs/demo.yaml                              # CPU: 2 processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./launch.sh --cfg ...                   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 ./launch.sh --cfg ...                   # on node 1
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 ./launch.sh --cfg ...        # SLURM
#
# Environment: NPROC_PER_NODE (default: all visible GPUs, 1 without GPUs), NNODES (1),
# NODE_RANK (0), MASTER_ADDR, MASTER_PORT (29500). Under SLURM (one task per node) the node
# count, node rank and master address come from the allocation.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        awk -F, '{print NF}' <<<"${CUDA_VISIBLE_DEVICES}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_NODEID:-}" ]]; then
    NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID}}"
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
    fi
    # A port derived from the job id avoids clashes between jobs sharing a node.
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
fi

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$(count_gpus)"
    if [[ "${NPROC_PER_NODE}" -lt 1 ]]; then
        NPROC_PER_NODE=1
    fi
fi

if [[ "${NNODES}" -gt 1 ]]; then
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        echo "launch.sh: NNODES=${NNODES} needs MASTER_ADDR (the address of the node with NODE_RANK=0)" >&2
        exit 2
    fi
    RDZV=(--nnodes="${NNODES}" --node_rank="${NODE_RANK}" --master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}")
elif [[ -n "${MASTER_ADDR:-}" ]]; then
    RDZV=(--nnodes=1 --node_rank=0 --master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}")
else
    RDZV=(--standalone)  # a free port on this machine
fi

echo "launch.sh: ${NNODES} node(s) x ${NPROC_PER_NODE} process(es), node rank ${NODE_RANK}" >&2
exec torchrun --nproc_per_node="${NPROC_PER_NODE}" "${RDZV[@]}" main.py "$@"
