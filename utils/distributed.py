"""Process-group setup and the few collectives the engine needs.

Works under ``torchrun`` (any number of nodes; NCCL on GPUs, gloo on CPU) and as a plain
single process, where every helper degrades to a no-op.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Args:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        device: The device this process computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """True when a process group is in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and writes files."""
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, or run alone.

    Args:
        timeout_s: Collective timeout (``DIST.TIMEOUT_S``): a collective that a dead or hung rank
            never joins raises on the others after this long instead of blocking forever. gloo
            applies it to every collective, the side group of :func:`all_reduce_max_on_host`
            included; for NCCL the watchdog enforces it and tears the waiting process down (torch's
            ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, left as the environment sets it).
    """
    global _timeout
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                               "start at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    _timeout = datetime.timedelta(seconds=timeout_s)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        timeout = _timeout
        store = _restart_scoped_agent_store(world_size, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _restart_scoped_agent_store(world_size: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """torchrun's store, seen through a namespace of this restart; ``None`` where not needed.

    Under ``torchrun`` the elastic agent hosts one TCPStore for the whole job and every restart
    (``--max-restarts``) of the workers joins it again. The process group's keys (each rank's
    gloo address, NCCL's unique id) of the previous, dead attempt are still there, so a restarted
    rank can read its peer's stale address and fail with "connection refused" or hang
    (pytorch/pytorch#135712). On one node ``TORCHELASTIC_RESTART_COUNT`` is the same on every
    rank, so it names a fresh namespace. Across nodes it is not (each agent counts its own
    restarts), so there the fix is torchrun's own: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in
    the launcher's environment (``launch.sh`` sets it) gives every attempt a new store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if local_world_size != world_size:
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            logger.warning("torchrun --max-restarts on several nodes with a store shared across restarts: a restart "
                           "can read the dead attempt's addresses; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                           "before torchrun (launch.sh does)")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"crossformer/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def unanswered_ranks() -> Optional[List[int]]:
    """After a failed collective: the ranks that do not check in through the job's store in time.

    Every rank that survives a failed collective calls this: it writes its own key to the store the
    process group was built on and waits for the others' keys. A rank that died (its process or its
    node) or hangs never writes one. None when it cannot be told: alone, or the store itself is
    gone (it lives in torchrun's agent on node rank 0, so that node is the lost one).

    The wait is :data:`LOST_RANK_WAIT_S`, at most a quarter of ``DIST.TIMEOUT_S``.
    """
    if not is_distributed():
        return None
    wait_s = min(LOST_RANK_WAIT_S, _timeout.total_seconds() / 4)
    try:
        store = dist.distributed_c10d._get_default_store()
        rank, world_size = dist.get_rank(), dist.get_world_size()
        keys = [f"crossformer/after_failure/{other}" for other in range(world_size)]
        store.set(keys[rank], "1")
        deadline = time.monotonic() + wait_s
        missing = [other for other in range(world_size) if other != rank]
        while True:
            missing = [other for other in missing if not store.check([keys[other]])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - the store is unreachable: nothing more can be told
        return None


def claim(key: str, value: str) -> Optional[str]:
    """Set ``key`` in the job's store to ``value`` unless a process set it first; the value it holds.

    The job's store is the process group's or, before the group exists, the one torchrun's agent
    hosts for the job (``TORCHELASTIC_USE_AGENT_STORE``). The key is scoped to this attempt
    (``TORCHELASTIC_RESTART_COUNT``), so a restarted job starts with no claims.

    Args:
        key: What is claimed.
        value: This process's claim.

    Returns:
        ``value`` when this process was the first, another process's value when it was, None when
        there is no store to ask (one process, or the store is gone).
    """
    key = f"crossformer/claim/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{key}"
    try:
        if dist.is_available() and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=CLAIM_TIMEOUT_S), wait_for_workers=False)
        else:
            return None
        return store.compare_set(key, "", value).decode()
    except Exception:  # noqa: BLE001 - the store is unreachable: nobody can be asked
        return None


def cleanup() -> None:
    """Leave the process group (if any)."""
    global _host_group, _host_group_ready
    _host_group, _host_group_ready = None, False
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> Tuple[int, int]:
    """``(rank, world_size)`` of this process in the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op when alone)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged when alone).

    Args:
        tensor: On this rank's device (NCCL needs CUDA tensors).
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


_host_group: Any = None
_host_group_ready = False
# The run's collective timeout (DIST.TIMEOUT_S), for the groups created after init_distributed.
_timeout = datetime.timedelta(seconds=600)
LOST_RANK_WAIT_S = 10.0  # unanswered_ranks: how long the survivors of a failed collective wait for each other
CLAIM_TIMEOUT_S = 5.0  # claim: how long a process without a group waits for torchrun's store


def all_reduce_max_on_host(values: Sequence[int]) -> List[int]:
    """The element-wise MAX over ranks of a few integers, on the host (``values`` when alone).

    The all-reduce runs on a CPU (gloo) group: with NCCL that is a side group, created on the first
    call (a collective: the same call on every rank) with the run's timeout (``DIST.TIMEOUT_S``, not
    torch's 30-minute default for a new gloo group), so the call never waits for the GPU. Its cost
    is one small host-to-host all-reduce (tens of microseconds on one node, about a network round
    trip across nodes).

    Args:
        values: This rank's integers.
    """
    global _host_group, _host_group_ready
    if not is_distributed():
        return list(values)
    if not _host_group_ready:
        _host_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=_timeout)
        _host_group_ready = True
    tensor = torch.tensor(list(values), dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_host_group)  # host only: a CPU tensor
    return tensor.tolist()


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when alone).

    Args:
        obj: Any picklable object.
    """
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank.

    Args:
        obj: Any picklable object (ignored on the other ranks).
        src: Sending rank.
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
