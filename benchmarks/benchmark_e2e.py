"""Framework overhead: end-to-end training images/s of ``main.py`` against the bare model step.

Example (from the repository root)::

    python -m benchmarks.benchmark_e2e --cfg configs/crossformerpp_s.yaml --batch-size 16 --img-size 224 \
        --steps 8 --amp none --json e2e.json

``main.py`` runs one process on ``synthetic`` data for two epochs of ``--steps`` optimizer
steps each (the config's recipe otherwise: mixup/cutmix, label smoothing, gradient clipping,
AdamW, the per-step LR schedule, checkpointing at epoch ends excluded from the timing); its
second epoch's ``train_imgs_per_sec`` from ``metrics.jsonl`` is compared with the median
images/s of a bare step (forward, cross-entropy, backward, AdamW step) of the same model, batch
and precision measured here in-process after a warm-up (``benchmark_model.median_rate``).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.benchmark_model import median_rate
from config import get_config, parse_option
from models import build_model

_logger = logging.getLogger("benchmark_e2e")

ROOT = Path(__file__).resolve().parents[1]
AMP = {"none": None, "bf16": torch.bfloat16}


def main_py_rate(cfg: str, batch_size: int, img_size: int, steps: int, amp: str, output: Path) -> float:
    """Second-epoch training images/s of ``main.py`` on synthetic data (one process)."""
    opts = ["DATA.DATASET", "synthetic", "DATA.IMG_SIZE", str(img_size), "TRAIN.AMP", amp,
            "DATA.SYNTHETIC_TRAIN_SIZE", str(batch_size * steps), "DATA.SYNTHETIC_VAL_SIZE", str(batch_size),
            "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1", "PRINT_FREQ", str(steps), "TRAIN.AUTO_RESUME", "False"]
    command = [sys.executable, str(ROOT / "main.py"), "--cfg", cfg, "--batch-size", str(batch_size),
               "--output", str(output), "--tag", "e2e", "--opts", *opts]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    metrics = sorted(output.glob("*/e2e/metrics.jsonl"))[0].read_text().splitlines()
    return float(json.loads(metrics[-1])["train_imgs_per_sec"])


def bare_step_rate(cfg: str, batch_size: int, img_size: int, amp: str, warmup: int, trials: int) -> float:
    """Median images/s of forward + loss + backward + AdamW step of the configured model."""
    args = parse_option(["--cfg", cfg, "--opts", "DATA.DATASET", "synthetic", "DATA.IMG_SIZE", str(img_size)])
    config = get_config(args, world_size=1)
    torch.manual_seed(0)
    model = build_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as build_optimizer
    x = torch.randn(batch_size, 3, img_size, img_size)
    target = torch.randint(0, config.MODEL.NUM_CLASSES, (batch_size,))
    dtype = AMP[amp]

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_rate(step, batch_size, warmup, trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="configs/crossformerpp_s.yaml")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per epoch of the main.py run")
    parser.add_argument("--amp", default="none", choices=list(AMP))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    bare = bare_step_rate(args.cfg, args.batch_size, args.img_size, args.amp, warmup=2, trials=args.trials)
    with tempfile.TemporaryDirectory() as tmp:
        end_to_end = main_py_rate(args.cfg, args.batch_size, args.img_size, args.steps, args.amp, Path(tmp))
    result = dict(cfg=args.cfg, batch_size=args.batch_size, img_size=args.img_size, amp=args.amp,
                  threads=torch.get_num_threads(), bare_step_imgs_per_sec=bare,
                  main_py_imgs_per_sec=end_to_end, ratio=end_to_end / bare)
    _logger.info("bare step %.2f img/s, main.py %.2f img/s, ratio %.3f", bare, end_to_end, end_to_end / bare)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
