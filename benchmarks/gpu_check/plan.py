"""Sizes of every check in the GPU run and in ``--quick``, the time budget of each group, and the run context.

The GPU budgets add up to 470 s on one H100 (the issue's limit is 8 minutes, including the
generated data); ``--quick`` runs the same code at sizes that take seconds on two CPU cores.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

# A CrossFormer shrunk to a few hundred thousand parameters (tests/helpers.py's TINY_YAML), for --quick.
TINY_ARCH: Dict[str, Any] = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))

# Seconds each group may take on one H100 (8 minutes in all is the limit; 470 s leaves a margin for start-up).
BUDGET_S: Dict[str, float] = {
    "data": 10.0,  # 1280 generated 500x375 JPEGs, written by one process per class before CUDA starts
    "models": 45.0,  # 2 models x 2 sizes x 3 precisions, fast and official, forward + backward at batch 4 / 2
    "sdpa": 15.0,  # profiled forward / backward, then each SDPA backend pinned alone
    "training": 170.0,  # fp16 and bf16: 30 eager steps, 15 resumed steps, 30 compiled steps (inductor compile)
    "dali": 45.0,  # generated JPEGs, val parity, RandAugment per-op parity on cuda, train pipeline, host syncs
    "recipes": 10.0,  # 4 optimizers x 3 fp16 steps, 2 distilled micro-batches, one mAP pass: tiny models
    "speed": 175.0,  # 2 models x 2 precisions x (ours, official) x (infer, train); loaders; main.py with DALI
}


@dataclass(frozen=True)
class Plan:
    """What every check runs; :func:`make_plan` gives the GPU sizes or the ``--quick`` ones.

    Args:
        arch: Constructor overrides of every model built (empty: the registered variant).
        parity_models: Models compared with the official formulation.
        parity_sizes: Input sides and the batch at each.
        precisions: Autocast settings compared (``fp32`` with TF32 off, ``bf16``, ``fp16``).
        num_classes: Classes of the models built (the training check's synthetic labels too).
        train_model, train_img_size, train_batch, train_steps: The DDP training check.
        resume_at: Global step saved and resumed from.
        warmup_steps: Steps after which no recompilation may happen.
        compile_backend: ``TRAIN.COMPILE_BACKEND`` of the compiled runs.
        val_size: Side of the DALI val parity images (the RandAugment parity runs at 224, as its test).
        jpegs: Generated training JPEGs (500x375) for the loader checks and measurements and main.py.
        loader_img_size, loader_batch, loader_batches: Output side, batch and timed batches of the
            training loader's check and measurement.
        loader_randaugment: RandAugment in the loader measurement, the guarded steps and main.py too
            (``dali/train_pipeline`` always runs it; building its DALI graph takes seconds on a CPU).
        speed_models: ``(model, batch)`` of the speed rows.
        speed_precisions: Autocast settings of the speed rows.
        speed_img_size, speed_warmup, speed_trials: Speed measurement sizes.
        e2e_img_size, e2e_batch, e2e_epochs: The main.py run with the DALI loader.
    """

    arch: Dict[str, Any]
    num_classes: int
    parity_models: Tuple[str, ...]
    parity_sizes: Tuple[Tuple[int, int], ...]
    precisions: Tuple[str, ...]
    train_model: str
    train_img_size: int
    train_batch: int
    train_steps: int
    resume_at: int
    warmup_steps: int
    compile_backend: str
    val_size: int
    jpegs: int
    loader_img_size: int
    loader_batch: int
    loader_batches: int
    loader_randaugment: bool
    speed_models: Tuple[Tuple[str, int], ...]
    speed_precisions: Tuple[str, ...]
    speed_img_size: int
    speed_warmup: int
    speed_trials: int
    e2e_img_size: int
    e2e_batch: int
    e2e_epochs: int


def make_plan(quick: bool) -> Plan:
    """The GPU plan, or with ``quick`` the same checks at tiny sizes (every code path, seconds on a CPU)."""
    if quick:
        # 96 px: stage 1 and 2 groups need padding, so the per-group mask path runs too. "eager":
        # dynamo's capture and recompile counting without AOT autograd's tracing (minutes on 2 cores).
        return Plan(arch=TINY_ARCH, num_classes=10, parity_models=("crossformerpp_s", "crossformer_t"),
                    parity_sizes=((96, 1),), precisions=("fp32", "bf16", "fp16"),
                    train_model="crossformerpp_s", train_img_size=32, train_batch=2, train_steps=4, resume_at=2,
                    warmup_steps=1, compile_backend="eager", val_size=224, jpegs=32, loader_img_size=64,
                    loader_batch=8, loader_batches=1, loader_randaugment=False, speed_models=(("crossformerpp_s", 2),),
                    speed_precisions=("fp16",), speed_img_size=64, speed_warmup=0,
                    speed_trials=1, e2e_img_size=32, e2e_batch=4, e2e_epochs=1)
    return Plan(arch={}, num_classes=1000, parity_models=("crossformerpp_s", "crossformer_t"),
                parity_sizes=((224, 4), (384, 2)),
                precisions=("fp32", "bf16", "fp16"), train_model="crossformerpp_s", train_img_size=224,
                train_batch=32, train_steps=30, resume_at=15, warmup_steps=1, compile_backend="inductor",
                val_size=224, jpegs=1280, loader_img_size=224, loader_batch=128, loader_batches=8,
                loader_randaugment=True,
                speed_models=(("crossformerpp_s", 128), ("crossformerpp_b", 64)),
                speed_precisions=("bf16", "fp16"), speed_img_size=224,
                speed_warmup=3, speed_trials=5, e2e_img_size=224, e2e_batch=64, e2e_epochs=2)


# The skip reason of every row that needs DALI, where it is not installed (the lent GPU machine's image has
# no DALI and cannot carry its wheel: docs/performance.md, "The GPU proof on the lent machine").
DALI_MISSING = "DALI not installed (nvidia.dali is not importable)"


def dali_installed() -> bool:
    """Whether ``nvidia.dali`` can be imported here (found without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace package at all
        return False


@dataclass
class Context:
    """What every check gets: the device, the plan, where to write, and the JPEGs made once per run.

    Args:
        device: ``cuda`` (the GPU run) or ``cpu`` (``--device cpu``).
        quick: Tiny sizes.
        plan: :func:`make_plan`'s plan.
        out: Output directory (the report, the generated data, the main.py run).
        dali: Whether DALI is installed; without it the rows that need it are skipped, by name.
    """

    device: torch.device
    quick: bool
    plan: Plan
    out: Path
    dali: bool = True
    cache: Dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        """Whether the checks run on a GPU."""
        return self.device.type == "cuda"
