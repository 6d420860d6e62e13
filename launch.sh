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
# NODE_RANK (0), MASTER_ADDR, MASTER_PORT (29500), MAX_RESTARTS (0: torchrun --max-restarts, to
# come back after a dead rank). Under SLURM (one task per node) the node count, node rank and
# master address come from the allocation. PYTHON (default: python, else python3) runs torchrun;
# TORCHRUN replaces that command.
#
# Preemption (docs/reliability.md): SIGUSR1 or SIGTERM, to this script alone or to every process
# of the job step at once (what SLURM does), makes the training processes agree on a step, write
# last.pth and exit 75. This script passes the stop on to the launcher (utils/launch.py), which
# waits for every training process; only then does it exit 75 and, under SLURM, requeue the job
# (`scontrol requeue`, node rank 0 only; the job needs `#SBATCH --requeue`). The requeued job runs
# the same command and auto-resumes.
#   #SBATCH --requeue
#   #SBATCH --signal=USR1@120          # with srun: every launch.sh task gets USR1 120 s before the end
#   srun --ntasks-per-node=1 ./launch.sh --cfg ...
# (`--signal=B:USR1@120` signals only the batch shell: use it when the batch script runs
# ./launch.sh itself, on one node, without srun.)
set -euo pipefail

EXIT_PREEMPTED=75

# Paths in the arguments resolve from where this script is run, as with torchrun itself.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MAIN="${REPO}/main.py"

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
# A job that cannot be requeued would end at its first preemption (last.pth is still written).
if [[ -n "${SLURM_JOB_ID:-}" && "${NODE_RANK}" == 0 ]] && command -v scontrol >/dev/null 2>&1 \
        && scontrol show job "${SLURM_JOB_ID}" 2>/dev/null | grep -q 'Requeue=0'; then
    echo "launch.sh: SLURM job ${SLURM_JOB_ID} cannot be requeued (Requeue=0): a preemption will save last.pth and \
end the job; submit it with #SBATCH --requeue" >&2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$(count_gpus)"
    if [[ "${NPROC_PER_NODE}" -lt 1 ]]; then
        NPROC_PER_NODE=1
    fi
fi

if ! [[ "${NNODES}" =~ ^[1-9][0-9]*$ && "${NODE_RANK}" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
    echo "launch.sh: NODE_RANK=${NODE_RANK} must be a whole number below NNODES=${NNODES} (node ranks are 0..NNODES-1, \
one per node); set NODE_RANK on each node, 0 on the node whose address is MASTER_ADDR" >&2
    exit 2
fi
if [[ "${NNODES}" -gt 1 ]]; then
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        echo "launch.sh: NNODES=${NNODES} needs MASTER_ADDR (the address of the node with NODE_RANK=0)" >&2
        exit 2
    fi
    RDZV=(--nnodes="${NNODES}" --node_rank="${NODE_RANK}" --master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}")
    # A fresh store for every --max-restarts attempt: a restart must not read the dead attempt's
    # addresses (pytorch/pytorch#135712; one node is handled in utils/distributed.py).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
elif [[ -n "${MASTER_ADDR:-}" ]]; then
    RDZV=(--nnodes=1 --node_rank=0 --master_addr="${MASTER_ADDR}" --master_port="${MASTER_PORT}")
else
    RDZV=(--standalone)  # a free port on this machine
fi

echo "launch.sh: ${NNODES} node(s) x ${NPROC_PER_NODE} process(es), node rank ${NODE_RANK}" >&2
# torchrun through utils/launch.py: the same launcher, but a run's end is one line, not a traceback.
if [[ -n "${TORCHRUN:-}" ]]; then
    LAUNCHER=("${TORCHRUN}")
else
    PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
    LAUNCHER=(env "PYTHONPATH=${REPO}${PYTHONPATH:+:${PYTHONPATH}}" "${PYTHON}" -m utils.launch)
fi
"${LAUNCHER[@]}" --nproc_per_node="${NPROC_PER_NODE}" --max-restarts="${MAX_RESTARTS:-0}" "${RDZV[@]}" "${MAIN}" "$@" &
LAUNCHER_PID=$!

# A stop signal is passed on to the launcher once, as SIGTERM (which plain torchrun handles too;
# it dies of SIGUSR1). The launcher passes it on to the training processes and exits only after
# every one of them has saved and exited; under SLURM they usually received the signal themselves.
STOP_SENT=0
forward_stop() {
    if [[ "${STOP_SENT}" == 0 ]]; then
        STOP_SENT=1
        echo "launch.sh: stop requested; waiting for the training processes to save last.pth and exit" >&2
        kill -TERM "${LAUNCHER_PID}" 2>/dev/null || true
    fi
}
trap forward_stop USR1 TERM
# Ctrl-C reaches the launcher and the workers from the terminal: this script only waits for them to
# save and exit (without the trap, bash would exit at once and leave them writing to the terminal).
trap ':' INT

# `wait` returns early when a trapped signal arrives: wait again until the launcher has exited.
while kill -0 "${LAUNCHER_PID}" 2>/dev/null; do
    wait "${LAUNCHER_PID}" || true
done
STATUS=0
wait "${LAUNCHER_PID}" || STATUS=$?
trap - USR1 TERM INT

if [[ "${STATUS}" == "${EXIT_PREEMPTED}" ]]; then
    if [[ -n "${SLURM_JOB_ID:-}" && "${NODE_RANK}" == 0 ]] && command -v scontrol >/dev/null 2>&1; then
        echo "launch.sh: preempted; every training process has exited; requeueing SLURM job ${SLURM_JOB_ID}" >&2
        scontrol requeue "${SLURM_JOB_ID}" || echo "launch.sh: scontrol requeue ${SLURM_JOB_ID} failed; the job \
ends here: submit it with #SBATCH --requeue, or run the same command again to resume" >&2
    else
        echo "launch.sh: preempted; run the same command again to resume" >&2
    fi
elif [[ "${STOP_SENT}" == 1 ]]; then
    echo "launch.sh: after the stop signal the launcher exited with ${STATUS}, not ${EXIT_PREEMPTED}; not requeued" >&2
fi
exit "${STATUS}"
