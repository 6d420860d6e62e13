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
# Preemption (docs/reliability.md): SIGUSR1 or SIGTERM to this script is forwarded as SIGUSR1 to
# the training processes, which agree to stop at the next step, write last.pth and exit 75; this
# script then exits 75 and, under SLURM, requeues the job (`scontrol requeue`, node rank 0 only;
# the job needs `#SBATCH --requeue`). The requeued job runs the same command and auto-resumes.
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
TORCHRUN_PID=$!

# torchrun itself is not told: it would take SIGUSR1 as fatal, and on SIGTERM it gives the
# workers only a short grace period. Its direct children are the training processes.
PREEMPTED=0
WORKERS=""
forward_stop() {
    PREEMPTED=1
    WORKERS="$(ps -o pid= --ppid "${TORCHRUN_PID}" 2>/dev/null || true)"
    echo "launch.sh: stop requested; forwarding SIGUSR1 to the training processes ${WORKERS//$'\n'/ }" >&2
    for pid in ${WORKERS}; do
        kill -USR1 "${pid}" 2>/dev/null || true
    done
}
trap forward_stop USR1 TERM
# Ctrl-C reaches torchrun and the workers from the terminal: this script only waits for them to
# save and exit (without the trap, bash would exit at once and leave them writing to the terminal).
trap ':' INT

STATUS=""
while [[ -z "${STATUS}" ]]; do
    if [[ "${PREEMPTED}" == 0 ]]; then
        wait "${TORCHRUN_PID}" && STATUS=0 || STATUS=$?
        if kill -0 "${TORCHRUN_PID}" 2>/dev/null; then
            STATUS=""  # wait was interrupted by a trapped signal
        fi
    elif kill -0 "${TORCHRUN_PID}" 2>/dev/null; then
        # Once the signalled workers have saved and exited, stop torchrun so that --max-restarts
        # does not start them again.
        alive=0
        for pid in ${WORKERS}; do
            if kill -0 "${pid}" 2>/dev/null; then alive=1; fi
        done
        if [[ "${alive}" == 0 ]]; then
            kill -TERM "${TORCHRUN_PID}" 2>/dev/null || true
        fi
        sleep 1
    else
        wait "${TORCHRUN_PID}" && STATUS=0 || STATUS=$?
    fi
done
trap - USR1 TERM INT

if [[ "${PREEMPTED}" == 1 ]]; then
    if [[ -n "${SLURM_JOB_ID:-}" && "${NODE_RANK}" == 0 ]] && command -v scontrol >/dev/null 2>&1; then
        echo "launch.sh: preempted; requeueing SLURM job ${SLURM_JOB_ID}" >&2
        scontrol requeue "${SLURM_JOB_ID}" || echo "launch.sh: scontrol requeue failed (is the job --requeue?)" >&2
    else
        echo "launch.sh: preempted; run the same command again to resume" >&2
    fi
    exit "${EXIT_PREEMPTED}"
fi
exit "${STATUS}"
