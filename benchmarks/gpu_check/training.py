"""Training steps under DDP at world size 1 (NCCL on a GPU, gloo on CPU), through the project's own loop.

For fp16 (with ``GradScaler``) and bf16: ``engine.train_one_epoch`` runs ``train_steps`` steps of
the configured model on synthetic data, once eager with ``DDP(model)`` and once with
``torch.compile(DDP(model))`` as ``trainer._wrap_for_training`` builds it for a distributed run.
The components are built with the trainer's own builders (``prepare_model``, ``build_criterion``,
``build_optimizer``, ``build_scheduler``, ``build_mixup``); drop path is off so that eager and
compiled runs draw no random numbers inside the model (inductor's RNG differs from eager's).
The eager run saves ``last.pth`` through ``resume.RunCheckpoints`` at ``resume_at``; a fresh set of
components resumes it (``MODEL.RESUME``) and trains to the end, which must continue the loss
curve. After ``warmup_steps`` the compiled run may not compile again (dynamo's graph counter),
and on CUDA the steps between warm-up and the last (logging) step run under
``torch.cuda.set_sync_debug_mode("error")``: a host synchronisation in the hot loop raises.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import traceback
from pathlib import Path
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel
from yacs.config import CfgNode

from config import get_config, parse_option
from data import build_loader, build_mixup
from optim import build_optimizer, build_scheduler, steps_per_epoch
from training.engine import Components, StopReason, train_one_epoch
from training.loss import build_criterion
from training.resume import RunCheckpoints
from training.train_state import TrainState
from training.trainer import prepare_model
from utils.checkpoint import LAST
from utils.distributed import DistInfo
from utils.precision import resolve_amp, set_tf32

from .plan import Context
from .report import Result, check, skipped

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
COMPILED_VS_EAGER_BOUND = 2e-2  # max over steps of |loss_compiled - loss_eager| / loss_eager
RESUME_BOUND = 1e-2  # max over the resumed steps of |loss_resumed - loss_uninterrupted| / loss_uninterrupted


def train_config(ctx: Context, amp: str, compiled: bool, run_dir: Path, resume: str = "") -> CfgNode:
    """The model's own YAML with the check's sizes: synthetic data, one epoch of ``train_steps`` batches."""
    plan = ctx.plan
    opts = ["DATA.DATASET", "synthetic", "DATA.IMG_SIZE", str(plan.train_img_size),
            "DATA.SYNTHETIC_TRAIN_SIZE", str(plan.train_batch * plan.train_steps),
            "DATA.SYNTHETIC_VAL_SIZE", str(plan.train_batch), "TRAIN.AMP", amp, "TRAIN.COMPILE", str(compiled),
            "TRAIN.COMPILE_BACKEND", plan.compile_backend, "MODEL.DROP_PATH_RATE", "0.0",
            "MODEL.NUM_CLASSES", str(plan.num_classes), "TRAIN.EPOCHS", "1",
            "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", str(plan.train_steps), "TRAIN.AUTO_RESUME", "False"]
    if resume:
        opts += ["MODEL.RESUME", resume]
    arch = plan.arch
    if arch:
        opts += ["MODEL.CROSSFORMER.EMBED_DIM", str(arch["embed_dim"]),
                 "MODEL.CROSSFORMER.DEPTHS", str(list(arch["depths"])),
                 "MODEL.CROSSFORMER.NUM_HEADS", str(list(arch["num_heads"]))]
    args = parse_option(["--cfg", str(ROOT / "configs" / f"{plan.train_model}.yaml"),
                         "--batch-size", str(plan.train_batch), "--output", str(run_dir.parent), "--tag", run_dir.name,
                         "--opts", *opts])
    return get_config(args, world_size=1)


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype:
    """``utils.precision.resolve_amp``; fp16 on CPU (refused there for users) runs the scaler path in --quick."""
    if amp == "fp16" and device.type == "cpu":
        return torch.float16
    return resolve_amp(amp, device)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A process group of one rank: NCCL on a GPU, gloo on CPU (left as found if one exists)."""
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


class RecordingLoss(torch.nn.Module):
    """The run's criterion, keeping each micro-batch loss as a device tensor (read once, after the run)."""

    def __init__(self, criterion: torch.nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.losses: List[torch.Tensor] = []

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(outputs, targets)
        self.losses.append(loss.detach().float())
        return loss


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (a recompilation adds one; frames it converts
    without a graph, such as DDP's Python between graph breaks, do not)."""
    return counters["stats"]["unique_graphs"]


def run_training(ctx: Context, amp: str, compiled: bool, run_dir: Path, save_at: int = 0,
                 resume: str = "") -> Dict[str, object]:
    """Train one epoch of the plan with the project's loop; returns losses, scale, recompiles, host-sync outcome.

    Args:
        ctx: The run context.
        amp: ``fp16`` or ``bf16``.
        compiled: ``torch.compile(DDP(model))`` instead of ``DDP(model)``.
        run_dir: Checkpoint directory.
        save_at: Save ``last.pth`` after this global step (0: never).
        resume: Checkpoint to resume from first ("" starts afresh).
    """
    plan, device = ctx.plan, ctx.device
    config = train_config(ctx, amp, compiled, run_dir, resume)
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    set_tf32(config.TRAIN.TF32, device)  # as Trainer.__init__ does
    amp_dtype = amp_dtype_for(amp, device)
    model = prepare_model(config, dist_info)
    loaders = build_loader(config, device)
    # What trainer._wrap_for_training builds for a distributed run; at world size 1 the trainer skips DDP.
    train_model = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    if compiled:
        train_model = torch.compile(train_model, backend=config.TRAIN.COMPILE_BACKEND)
    mixup = build_mixup(config)
    criterion = RecordingLoss(build_criterion(config, mixup is not None))
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch(len(loaders.train), 1))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    parts = Components(train_model=train_model, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                       scaler=scaler, ema=ema, mixup_fn=mixup, amp_dtype=amp_dtype)
    state = TrainState(device)
    manager = RunCheckpoints(str(run_dir), parts, state, config, dist_info)
    manager.resume(len(loaders.train))
    start_step = state.global_step
    loaders.train.set_epoch(state.epoch, start_batch=state.batch)
    compiles_at_warmup: List[int] = []
    sync_guard = device.type == "cuda"

    def after_step() -> None:
        step = state.global_step
        if sync_guard:
            torch.cuda.set_sync_debug_mode("default")
        if step == start_step + plan.warmup_steps:
            compiles_at_warmup.append(dynamo_graphs())
        if step == save_at:
            manager.save_last()
        # Guard the steps after warm-up up to the last one, which logs (a host sync by design).
        if sync_guard and start_step + plan.warmup_steps <= step < plan.train_steps - 1:
            torch.cuda.set_sync_debug_mode("error")

    try:
        reason = train_one_epoch(parts, loaders.train, state, config, after_step=after_step)
        sync_error = ""
    except RuntimeError as error:
        if not is_sync_error(error):
            raise
        reason, sync_error = None, sync_error_text(error)
    finally:
        if sync_guard:
            torch.cuda.set_sync_debug_mode("default")
    losses = torch.stack(criterion.losses).tolist() if criterion.losses else []
    return {"losses": losses, "completed": reason is StopReason.COMPLETED, "start_step": start_step,
            "scale": scaler.get_scale() if scaler is not None else None,
            "recompiles": dynamo_graphs() - compiles_at_warmup[0] if compiles_at_warmup else None,
            "sync_error": sync_error, "checkpoint": str(run_dir / LAST)}


def sync_error_text(error: BaseException) -> str:
    """A sync-debug error in one line, with the Python line that made the synchronising call."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    return " ".join(str(error).split())[:160] + where


def is_sync_error(error: BaseException) -> bool:
    """Whether ``error`` is CUDA's sync debug mode refusing a synchronising call."""
    return "synchroniz" in str(error)


def max_relative_difference(values: List[float], references: List[float]) -> float:
    """``max |v - r| / |r|`` over paired steps (inf when the lengths differ)."""
    if len(values) != len(references) or not values:
        return math.inf
    return max(abs(v - r) / max(abs(r), 1e-12) for v, r in zip(values, references))


def check_training(ctx: Context) -> List[Result]:
    """fp16 + GradScaler and bf16, eager and compiled DDP, resume: the rows of the ``training`` group."""
    plan = ctx.plan
    results = []
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    with process_group(ctx.device):
        for amp in ("fp16", "bf16"):
            prefix = f"training/{amp}"
            base = ctx.out / "training" / amp
            eager = run_training(ctx, amp, False, base / "eager", save_at=plan.resume_at)
            resumed = run_training(ctx, amp, False, base / "resumed", resume=eager["checkpoint"])
            compiled = run_training(ctx, amp, True, base / "compiled")
            for label, run in (("eager", eager), ("compiled", compiled)):
                losses = run["losses"]
                finite = run["completed"] and len(losses) == plan.train_steps and all(map(math.isfinite, losses))
                results.append(check(f"{prefix}/{label}/finite_losses", finite,
                                     f"{len(losses)} steps, last {losses[-1]:.4f}" if losses else "no step",
                                     f"{plan.train_steps} finite losses", f"first {losses[0]:.4f}" if losses else ""))
                if ctx.cuda:
                    results.append(check(f"{prefix}/{label}/no_host_sync", not run["sync_error"],
                                         run["sync_error"] or "none", "no sync after warm-up",
                                         "torch.cuda.set_sync_debug_mode('error') over the non-logging steps"))
                else:
                    results.append(skipped(f"{prefix}/{label}/no_host_sync",
                                           "needs CUDA: torch.cuda.set_sync_debug_mode"))
            difference = max_relative_difference(compiled["losses"], eager["losses"])
            results.append(check(f"{prefix}/compiled_vs_eager", difference <= COMPILED_VS_EAGER_BOUND, difference,
                                 f"<= {COMPILED_VS_EAGER_BOUND:g}", f"backend {plan.compile_backend}, "
                                 "max over steps of the relative loss difference"))
            recompiles = compiled["recompiles"]
            results.append(check(f"{prefix}/compiled/recompiles_after_warmup", recompiles == 0, recompiles, "== 0",
                                 f"graphs dynamo compiled after step {plan.warmup_steps}"))
            tail = eager["losses"][plan.resume_at:]
            difference = max_relative_difference(resumed["losses"], tail)
            results.append(check(f"{prefix}/resume_continues", resumed["start_step"] == plan.resume_at
                                 and difference <= RESUME_BOUND, difference, f"<= {RESUME_BOUND:g}",
                                 f"resumed at step {resumed['start_step']} (saved at {plan.resume_at}); "
                                 "steps after it vs the uninterrupted run"))
            if amp == "fp16":
                scale = eager["scale"]
                skipped_steps = round(math.log2(65536.0 / scale)) if scale and scale > 0 else None
                results.append(check(f"{prefix}/grad_scaler_scale", scale is not None and math.isfinite(scale)
                                     and scale > 0, scale, "finite, > 0",
                                     f"from 65536: about {skipped_steps} overflow step(s) skipped"))
            if ctx.cuda:
                torch.cuda.empty_cache()
    return results
