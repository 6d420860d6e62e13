"""The DALI loader on the device: ``mixed`` decoding and GPU augmentation on generated JPEGs.

- ``dali/gpu_operators``: every operator of the GPU training and validation graphs is implemented
  on the device the graph puts it on, in the installed DALI (the graph is defined without a GPU,
  so this row runs on CPU too).
- ``dali/val_vs_pytorch``: the val pipeline's images against the PyTorch loader's (timm's eval
  transform) for the same files, tests/test_parity.py's set (odd and even sizes, grayscale, CMYK,
  PNG, palette, EXIF) at ``val_size``; the CPU bound of 0.5/255 (mean absolute difference).
- ``dali/randaugment_ops``: tests/test_parity.py's per-op parity with timm's PIL ops, the DALI
  ops running in a pipeline on the check's device (``gpu`` on CUDA), each op within the
  tolerance table of that test.
- ``dali/train_pipeline``: the training loader (mixed decode + random resized crop, RandAugment
  with ``warp_perspective``, flip, normalisation, then random erasing on the device): batches of
  the right shape, dtype and device, finite, normalised.
- ``dali/erasing_reproducible``: the training loader with random erasing on every image gives the
  same first batch after every global generator (torch, CUDA, numpy, random) is reseeded: the
  erasing is pure in (seed, epoch, batch, rank, sample) on the device it runs on.
- ``dali/validation_syncs``: ``engine.evaluate`` over batches already on the device (the last one
  smaller) under ``torch.cuda.set_sync_debug_mode("warn")``: the synchronisations it makes, at most
  the one final read of the sums (CUDA only).
- ``dali/no_host_round_trip``: the project's training loop (``engine.train_one_epoch``) takes
  its batches from that loader and steps, and after one warm-up step the loader's hand-over and
  the step run under ``torch.cuda.set_sync_debug_mode("error")``: a copy through the host or a
  synchronisation of torch's stream raises (CUDA only).
"""
from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import List, Tuple

import numpy as np
import nvidia.dali
import pytest
import torch
from nvidia.dali import backend as dali_backend
from nvidia.dali import fn, pipeline_def, types
from yacs.config import CfgNode

import models
from benchmarks.data_throughput import loader_config, make_images
from config import _C
from data import build_loader
from data.dali_loader import _train_graph, _val_graph
from data.toy import CLASSES
from optim import build_optimizer
from tests.test_parity import OP_TOLERANCE, parity_config, parity_dataset, rand_augment_op_differences, to_pixels
from training.engine import Components, evaluate, train_one_epoch
from training.train_state import TrainState

from .plan import Context
from .report import Result, check, skipped
from .training import is_sync_error, sync_error_text

logger = logging.getLogger(__name__)

VAL_BOUND = 0.5  # mean absolute difference on 0..255, as tests/test_parity.py holds the CPU pipeline

Operator = Tuple[str, str]  # (DALI schema name, device: "cpu", "gpu" or "mixed")


def gpu_graph_operators(train: bool, config: CfgNode) -> List[Operator]:
    """The operators of the loader's GPU training or validation graph (``data.dali_loader``), found by
    defining the pipeline for device 0 and building its graph only: no GPU is needed."""
    @pipeline_def(enable_conditionals=train, batch_size=2, num_threads=1, device_id=0)
    def pipeline():
        encoded, labels = fn.external_source(source=lambda: None, num_outputs=2, batch=True,
                                             dtype=[types.UINT8, types.INT64])
        images = _train_graph(encoded, config) if train else _val_graph(encoded, config, "mixed")
        return images, labels.gpu()

    pipe = pipeline()
    pipe._build_graph()  # DALI's graph definition step (what build() does before touching a device)
    return sorted({(op._op._schema.Name(), op._op.device) for op in pipe._ops})


def missing_implementations(operators: List[Operator]) -> List[Operator]:
    """The operators that the installed DALI does not implement on the device the graph puts them on."""
    registered = {"cpu": set(dali_backend.RegisteredCPUOps()), "gpu": set(dali_backend.RegisteredGPUOps()),
                  "mixed": set(dali_backend.RegisteredMixedOps())}
    return [(name, device) for name, device in operators if name not in registered[device]]


def check_gpu_operators() -> Result:
    """Every operator of the GPU graphs has an implementation on its device in this DALI (runs on CPU too)."""
    cfg = _C.clone()  # the recipe: RandAugment rand-m9-mstd0.5-inc1 with warp_perspective
    operators = gpu_graph_operators(True, cfg) + gpu_graph_operators(False, cfg)
    missing = missing_implementations(operators)
    on_device = sorted({name for name, device in operators if device != "cpu"})
    return check("dali/gpu_operators", not missing, f"{len(missing)} missing" + (
        ": " + ", ".join(f"{n} ({d})" for n, d in missing) if missing else ""),
        "every operator implemented on its device in this DALI",
        f"DALI {nvidia.dali.__version__}; on the GPU: {', '.join(on_device)}")


def generated_jpegs(ctx: Context) -> Path:
    """The run's training JPEGs (500x375, toy shapes with noise; ``benchmarks.data_throughput``), made once."""
    if "jpegs" not in ctx.cache:
        root = ctx.out / "data" / "jpegs"
        make_images(root, ctx.plan.jpegs, workers=min(len(CLASSES), os.cpu_count() or 1))
        ctx.cache["jpegs"] = root
    return ctx.cache["jpegs"]


def workers(ctx: Context) -> int:
    """DALI threads / DataLoader workers: this machine's cores, at most 8 (data.build's automatic choice)."""
    return 1 if ctx.quick else min(8, os.cpu_count() or 1)


def train_loader_config(ctx: Context, loader: str, randaug: bool = True) -> CfgNode:
    """The recipe's augmentation (RandAugment rand-m9-mstd0.5-inc1, erasing 0.25) on the generated JPEGs."""
    args = SimpleNamespace(toy=False, data_path=generated_jpegs(ctx), img_size=ctx.plan.loader_img_size,
                           batch_size=ctx.plan.loader_batch)
    cfg = loader_config(args, loader, workers(ctx), randaug)
    cfg.DATA.PIN_MEMORY = ctx.cuda
    cfg.DATA.FILE_LIST_CACHE = False  # no file outside the output directory
    return cfg


def check_val_parity(ctx: Context) -> Result:
    """DALI val images vs the PyTorch loader's, same files, on the check's device."""
    root = ctx.out / "data" / "parity"
    names = parity_dataset(root)
    outputs = {}
    for loader in ("pytorch", "dali"):
        cfg = parity_config(root, loader, ctx.plan.val_size)
        cfg.DATA.FILE_LIST_CACHE = False
        cfg.AUG.AUTO_AUGMENT = ""  # build_loader builds a train pipeline too; this check does not use it
        batches = [images for images, _ in build_loader(cfg, ctx.device).val]
        assert all(b.device.type == ctx.device.type for b in batches), f"{loader} val batches not on {ctx.device}"
        outputs[loader] = to_pixels(torch.cat(batches).cpu())
    differences = [float(np.abs(a.astype(np.float64) - b).mean()) for a, b in zip(outputs["pytorch"], outputs["dali"])]
    worst = int(np.argmax(differences))
    return check("dali/val_vs_pytorch", max(differences) < VAL_BOUND, max(differences), f"< {VAL_BOUND}/255",
                 f"{len(differences)} images at {ctx.plan.val_size}, worst {sorted(names)[worst]}; "
                 f"{'mixed' if ctx.cuda else 'cpu'} decoder")


def check_rand_augment_ops(ctx: Context) -> Result:
    """tests/test_parity.py's per-op RandAugment parity, the DALI pipeline on the check's device."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        differences = rand_augment_op_differences(monkeypatch, "gpu" if ctx.cuda else "cpu")
    finally:
        monkeypatch.undo()
    share = {key: value / OP_TOLERANCE[key[0]] if OP_TOLERANCE[key[0]] else (0.0 if value == 0 else float("inf"))
             for key, value in differences.items()}
    (name, level, negate), worst = max(share.items(), key=lambda item: item[1])
    over = [f"{n} l{lv}{'-' if neg else '+'} {differences[(n, lv, neg)]:.3f}"
            for (n, lv, neg), s in share.items() if s > 1]
    return check("dali/randaugment_ops", not over, f"worst {name} level {level}{' negated' if negate else ''}: "
                 f"{differences[(name, level, negate)]:.3f}/255", "each op within tests/test_parity.py's OP_TOLERANCE",
                 ("over: " + ", ".join(over)) if over else f"{len(differences)} op/level/sign cases, "
                 f"pipeline on {'gpu' if ctx.cuda else 'cpu'}")


def check_train_pipeline(ctx: Context) -> Result:
    """Two training batches: shape, dtype, device, finite, and normalised statistics."""
    cfg = train_loader_config(ctx, "dali")
    loader = build_loader(cfg, ctx.device).train
    loader.set_epoch(0)
    size, seen = ctx.plan.loader_img_size, []
    for images, labels in loader:
        seen.append((tuple(images.shape), images.dtype, images.device.type, labels.device.type,
                     bool(torch.isfinite(images).all()), float(images.mean()), float(images.std())))
        if len(seen) == 2:
            break
    expected = ((ctx.plan.loader_batch, 3, size, size), torch.float32, ctx.device.type, ctx.device.type, True)
    ok = len(seen) == 2 and all(s[:5] == expected and abs(s[5]) < 1.5 and 0.2 < s[6] < 2.0 for s in seen)
    value = "; ".join(f"{s[0]} {str(s[1])[6:]} on {s[2]}, mean {s[5]:.2f} std {s[6]:.2f}" for s in seen)
    return check("dali/train_pipeline", ok, value,
                 "(B, 3, S, S) float32 on the device, finite, |mean| < 1.5, 0.2 < std < 2",
                 f"{'mixed' if ctx.cuda else 'cpu'} decode, {cfg.AUG.AUTO_AUGMENT}, erasing {cfg.AUG.REPROB}")


def run_guarded_steps(ctx: Context, steps: int = 3) -> str:
    """``engine.train_one_epoch`` on the DALI loader for up to ``steps`` steps; from the end of the first step
    to the start of the last (which logs, a host sync by design) the loader's hand-over and the steps run
    with CUDA's sync debug mode at "error". Returns the sync error, "" if none."""
    cfg = train_loader_config(ctx, "dali", ctx.plan.loader_randaugment)
    loader = build_loader(cfg, ctx.device).train
    loader.set_epoch(0)
    steps = min(steps, len(loader))
    cfg.TRAIN.STOP_AFTER_STEPS, cfg.PRINT_FREQ = steps, 10 ** 6  # no progress line before the epoch's end
    model = models.create_model(ctx.plan.train_model, num_classes=len(CLASSES), **ctx.plan.arch).to(ctx.device)
    parts = Components(train_model=model, criterion=torch.nn.CrossEntropyLoss(),
                       optimizer=build_optimizer(cfg, model), scheduler=_NoSchedule(),
                       amp_dtype=torch.bfloat16 if ctx.cuda else None)
    state = TrainState(ctx.device)

    def after_step() -> None:
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("error" if state.global_step < steps - 1 else "default")

    try:
        train_one_epoch(parts, loader, state, cfg, after_step=after_step)
    except RuntimeError as error:
        if not is_sync_error(error):
            raise
        return sync_error_text(error)
    finally:
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("default")
    return ""


class _NoSchedule:
    """A scheduler that keeps the optimizer's LR (the step, not the schedule, is under test)."""

    def step_update(self, num_updates: int) -> None:
        pass


def check_erasing_reproducible(ctx: Context) -> Result:
    """The first training batch, with erasing on every image, twice: the global generators reseeded between."""
    cfg = train_loader_config(ctx, "dali", randaug=False)
    cfg.AUG.REPROB = 1.0
    firsts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        if ctx.cuda:
            torch.cuda.manual_seed_all(seed)
        loader = build_loader(cfg, ctx.device).train
        loader.set_epoch(0)
        firsts.append(next(iter(loader))[0].cpu())
    difference = float((firsts[0] - firsts[1]).abs().max())
    return check("dali/erasing_reproducible", difference == 0.0, difference, "== 0 (bitwise)",
                 f"erasing probability 1 on the {ctx.device.type} batch, global generators seeded 1 then 2")


def check_validation_syncs(ctx: Context) -> Result:
    """``engine.evaluate`` on device batches under CUDA's sync debug mode: how many synchronisations."""
    if not ctx.cuda:
        return skipped("dali/validation_syncs", "needs CUDA: torch.cuda.set_sync_debug_mode")
    size = ctx.plan.loader_img_size
    model = models.create_model(ctx.plan.train_model, num_classes=len(CLASSES), **ctx.plan.arch).to(ctx.device)
    batches = [(torch.randn(n, 3, size, size, device=ctx.device), torch.randint(0, len(CLASSES), (n,),
                                                                                 device=ctx.device))
               for n in (8, 8, 5)]
    evaluate(model, batches, ctx.device, torch.bfloat16)  # warm-up: kernels and caches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            evaluate(model, batches, ctx.device, torch.bfloat16)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return check("dali/validation_syncs", len(syncs) <= 1, len(syncs), "<= 1 (the final read of the sums)",
                 "; ".join(syncs[:3]) or "3 batches of 8, 8, 5 on the device, bf16")


def check_dali(ctx: Context) -> List[Result]:
    """The rows of the ``dali`` group."""
    results = [check_gpu_operators(), check_val_parity(ctx), check_rand_augment_ops(ctx), check_train_pipeline(ctx),
               check_erasing_reproducible(ctx), check_validation_syncs(ctx)]
    error = run_guarded_steps(ctx)
    if ctx.cuda:
        results.append(check("dali/no_host_round_trip", not error, error or "none", "no sync after the first step",
                             "engine.train_one_epoch on the mixed DALI loader under set_sync_debug_mode('error')"))
    else:
        results.append(skipped("dali/no_host_round_trip", "needs CUDA: torch.cuda.set_sync_debug_mode "
                               "(the loop ran on the CPU pipelines)"))
    return results
