"""Speed and memory, side by side in one run.

- Model rows: inference and training-step (forward, backward, AdamW; fp16 with its loss scaler)
  images/s and the peak memory of a step, ours against the official formulation, through
  ``benchmarks.benchmark_model.measure`` (the two take turns inside every trial; the ratio is
  the median of per-trial ratios).
- Loader row: the DALI loader (``mixed`` on a GPU) against the PyTorch loader on the same
  generated JPEGs with the recipe's augmentation, alternating trials
  (``benchmarks.data_throughput.measure``).
- ``main.py`` row: a short training run with the DALI loader on those JPEGs; its progress lines'
  images/s and the share of time the loop waited for data.

Without DALI installed, the loader and ``main.py`` rows are skipped by name; the model rows run.
"""
from __future__ import annotations

import logging
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks.benchmark_model import measure, speedups
from benchmarks.data_throughput import measure as loader_rate
from data.toy import CLASSES

from .plan import DALI_MISSING, Context
from .report import Result, SpeedRow, check, skipped

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]

# Inference images/s the papers report for one GPU, by model: None where the figure is not transcribed
# here (CrossFormer: arXiv 2108.00154; CrossFormer++: arXiv 2303.06908). Fill in from the paper's table,
# with its GPU, batch and precision in the note.
PAPER_INFERENCE: Dict[str, Tuple[Optional[float], str]] = {
    "crossformerpp_s": (None, "arXiv 2303.06908, not transcribed"),
    "crossformerpp_b": (None, "arXiv 2303.06908, not transcribed"),
}


def model_rows(ctx: Context) -> List[SpeedRow]:
    """Ours vs the official formulation for every model and precision of the plan (bf16, fp16 on a GPU)."""
    plan, rows = ctx.plan, []
    for name, batch in plan.speed_models:
        for precision in plan.speed_precisions:
            setting = dict(name=name, batch_size=batch, img_size=plan.speed_img_size, precision=precision,
                           arch=plan.arch)
            measured = measure(setting, ["fast", "reference"], False, ctx.device, plan.speed_warmup,
                               plan.speed_trials)
            fast, official = (next(r for r in measured if r["impl"] == impl) for impl in ("fast", "reference"))
            ratio = speedups(measured)[0]
            where = f"batch {batch}, {plan.speed_img_size} px, median of {plan.speed_trials} alternating trials"
            paper, note = PAPER_INFERENCE.get(name, (None, ""))
            for kind in ("infer", "train"):
                detail = where + (f"; paper: {paper if paper is not None else '-'} img/s ({note})"
                                  if kind == "infer" else "")
                rows.append(SpeedRow(f"speed/{name}/{precision}/{kind}", "img/s", fast[f"{kind}_imgs_per_sec"],
                                     official[f"{kind}_imgs_per_sec"], ratio[f"{kind}_speedup"], detail))
                ours_mib, official_mib = fast[f"{kind}_peak_mib"], official[f"{kind}_peak_mib"]
                rows.append(SpeedRow(f"memory/{name}/{precision}/{kind}", "MiB", ours_mib, official_mib,
                                     ours_mib / official_mib if ours_mib and official_mib else None,
                                     "peak of one step beyond weights and optimizer state"
                                     if ctx.cuda else "CUDA allocator peak only: not measured on CPU"))
            if ctx.cuda:
                torch.cuda.empty_cache()
    return rows


def loader_row(ctx: Context) -> SpeedRow:
    """DALI vs PyTorch loader images/s on the same JPEGs, alternating trials (median of per-trial ratios)."""
    from .dali_checks import train_loader_config  # imports DALI: only where it is installed

    trials = 1 if ctx.quick else 2
    configs = {loader: train_loader_config(ctx, loader, ctx.plan.loader_randaugment) for loader in ("dali", "pytorch")}
    rates: Dict[str, List[float]] = {loader: [] for loader in configs}
    for _ in range(trials):
        for loader, cfg in configs.items():
            rates[loader].append(loader_rate(cfg, ctx.plan.loader_batches, ctx.device))
    ratio = statistics.median(d / p for d, p in zip(rates["dali"], rates["pytorch"]))
    cfg = configs["dali"]
    return SpeedRow("loader/train", "img/s", statistics.median(rates["dali"]), statistics.median(rates["pytorch"]),
                    ratio, f"ours = dali ({'mixed' if ctx.cuda else 'cpu'}), official = pytorch loader; "
                    f"{cfg.DATA.NUM_WORKERS} workers, batch {cfg.DATA.BATCH_SIZE}, {cfg.DATA.IMG_SIZE} px, "
                    f"{cfg.AUG.AUTO_AUGMENT or 'no RandAugment'}, erasing {cfg.AUG.REPROB}")


PROGRESS = re.compile(r"([\d.]+) img/s\s+data wait (\d+)%")


def main_py_run(ctx: Context) -> Tuple[Result, Optional[SpeedRow]]:
    """``main.py`` training on the generated JPEGs with the DALI loader: exit code, images/s, data-wait share."""
    from .dali_checks import generated_jpegs  # imports DALI: only where it is installed

    plan = ctx.plan
    data = generated_jpegs(ctx)
    batch = plan.e2e_batch
    steps_per_epoch = max(1, (plan.jpegs // len(CLASSES)) * len(CLASSES) // batch)
    opts = ["DATA.DATASET", "imagenet", "DATA.LOADER", "dali", "DATA.IMG_SIZE", str(plan.e2e_img_size),
            "DATA.FILE_LIST_CACHE", "False", "MODEL.NUM_CLASSES", str(len(CLASSES)),
            "TRAIN.EPOCHS", str(plan.e2e_epochs), "TRAIN.WARMUP_EPOCHS", "0",
            "PRINT_FREQ", str(max(1, steps_per_epoch // 2)), "TRAIN.AUTO_RESUME", "False", "SAVE_KEEP", "0",
            "TRAIN.AMP", "bf16" if ctx.cuda else "none"]
    if not plan.loader_randaugment:
        opts += ["AUG.AUTO_AUGMENT", "", "AUG.REPROB", "0.0"]
    if plan.arch:
        opts += ["MODEL.CROSSFORMER.EMBED_DIM", str(plan.arch["embed_dim"]),
                 "MODEL.CROSSFORMER.DEPTHS", str(list(plan.arch["depths"])),
                 "MODEL.CROSSFORMER.NUM_HEADS", str(list(plan.arch["num_heads"]))]
    output = ctx.out / "main_py"
    command = [sys.executable, str(ROOT / "main.py"), "--cfg", str(ROOT / "configs" / f"{plan.train_model}.yaml"),
               "--data-path", str(data), "--batch-size", str(batch), "--output", str(output), "--tag", "dali",
               "--opts", *opts]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = output / plan.train_model / "dali" / "log.txt"
    lines = PROGRESS.findall(log.read_text()) if log.exists() else []
    result = check("e2e/main_py_dali", done.returncode == 0 and bool(lines), f"exit {done.returncode}",
                   "exit 0 and progress lines", (done.stderr.strip().splitlines() or [""])[-1]
                   if done.returncode else f"{len(lines)} progress lines, log {log}")
    if not lines:
        return result, None
    measured = lines[1:] or lines  # the first window holds the pipeline build and warm-up
    waits = [float(wait) for _, wait in measured]
    row = SpeedRow("e2e/main.py dali", "img/s", statistics.median(float(rate) for rate, _ in measured), None, None,
                   f"data wait {statistics.median(waits):.0f}% (median of {len(measured)} progress lines; "
                   f"range {min(waits):.0f}-{max(waits):.0f}%), batch {batch}, {plan.e2e_img_size} px, "
                   f"{'bf16' if ctx.cuda else 'fp32'}, RandAugment {'on' if plan.loader_randaugment else 'off'}")
    return result, row


def check_speed(ctx: Context) -> Tuple[List[Result], List[SpeedRow]]:
    """The ``speed`` group: its one correctness row (main.py ran) and the measured rows."""
    if not ctx.dali:
        return [skipped("loader/train", DALI_MISSING), skipped("e2e/main_py_dali", DALI_MISSING)], model_rows(ctx)
    rows = model_rows(ctx) + [loader_row(ctx)]
    result, row = main_py_run(ctx)
    return [result], rows + ([row] if row is not None else [])
