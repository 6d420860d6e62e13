"""CPU precision and the demo on the machine at hand: float32 vs bf16 images/s, the demo's wall time.

    python -m benchmarks.cpu_precision [--model crossformerpp_s --batch-size 16 --threads 2 --trials 5]
    python -m benchmarks.cpu_precision --demo      # also run the README's demo command and time it

Every result line starts with the CPU capability torch reports (``AVX2``, ``AVX512``, ...) and
whether oneDNN runs bf16 natively here (``utils.precision.cpu_has_native_bf16``): where it does
not, bf16 autocast is an emulation, and ``TRAIN.AMP bf16`` resolves to float32 on this CPU. The
model rows time the fast path's inference and training step (forward, backward, AdamW) in float32
and under bf16 autocast, taking turns inside every trial; the ratio is the median of the per-trial
ratios (the machine's speed drifts by ±20 % within minutes on a shared VM). ``--demo`` runs
``torchrun --nproc_per_node=2 main.py --cfg configs/demo.yaml`` into a temporary directory and
reports its wall time (data generation included when the toy set is not cached) and its best
validation top-1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

import models
from benchmarks.benchmark_model import ROOT, build_setting, median_rate
from utils.precision import cpu_has_native_bf16

_logger = logging.getLogger("cpu_precision")


def cpu_description() -> str:
    """``torch CPU capability AVX2, native bf16 no`` (what every result line starts with)."""
    return (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
            f"{'yes' if cpu_has_native_bf16() else 'no'}")


def precision_ratios(model: str, batch_size: int, img_size: int, warmup: int, trials: int) -> Dict[str, object]:
    """Float32 and bf16 images/s of inference and training, alternating inside every trial.

    Args:
        model: A registered variant.
        batch_size: Images per step.
        img_size: Square input side.
        warmup: Untimed steps of each precision first.
        trials: Timed steps of each precision.
    """
    cpu = torch.device("cpu")
    steps = {precision: build_setting(model, batch_size, img_size, precision, "fast", False, cpu)
             for precision in ("fp32", "bf16")}
    result: Dict[str, object] = dict(model=model, batch_size=batch_size, img_size=img_size,
                                     threads=torch.get_num_threads(),
                                     capability=torch.backends.cpu.get_cpu_capability(),
                                     native_bf16=cpu_has_native_bf16())
    for kind in ("infer", "train"):
        rates: Dict[str, List[float]] = {"fp32": [], "bf16": []}
        for precision in rates:
            for _ in range(warmup):
                steps[precision][kind]()
        for trial in range(trials):
            for precision in (("fp32", "bf16") if trial % 2 == 0 else ("bf16", "fp32")):
                rates[precision].append(median_rate(steps[precision][kind], batch_size, 0, 1))
        for precision, values in rates.items():
            result[f"{kind}_{precision}_imgs_per_sec"] = statistics.median(values)
        result[f"{kind}_fp32_over_bf16"] = statistics.median(a / b for a, b in zip(rates["fp32"], rates["bf16"]))
    return result


def time_demo(output: Path) -> Dict[str, object]:
    """Run the README's demo command with ``--output output``; its wall time and accuracy.

    Args:
        output: An empty directory for the run.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "main.py", "--cfg",
               "configs/demo.yaml", "--output", str(output)]
    start = time.perf_counter()
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if finished.returncode != 0:
        raise SystemExit(f"the demo failed (exit {finished.returncode}): {finished.stderr.strip()[-2000:]}")
    metrics = next(output.rglob("metrics.jsonl"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return dict(demo_seconds=seconds, epochs=len(rows), best_val_acc1=max(r["val_acc1"] for r in rows),
                last_val_acc1=rows[-1]["val_acc1"], first_epoch_at_90=next(
                    (r["epoch"] for r in rows if r["val_acc1"] >= 90.0), None),
                capability=torch.backends.cpu.get_cpu_capability(), native_bf16=cpu_has_native_bf16())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="crossformerpp_s", choices=models.list_models())
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--demo", action="store_true", help="also time the README's demo command")
    parser.add_argument("--skip-model", action="store_true", help="only the demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: Dict[str, object] = {}
    if not args.skip_model:
        row = precision_ratios(args.model, args.batch_size, args.img_size, args.warmup, args.trials)
        results["precision"] = row
        for kind in ("infer", "train"):
            _logger.info("%s: %s batch %d @%d, %d threads: %s float32 %.2f img/s, bf16 %.2f img/s, float32/bf16 "
                         "x%.2f", cpu_description(), args.model, args.batch_size, args.img_size, row["threads"], kind,
                         row[f"{kind}_fp32_imgs_per_sec"], row[f"{kind}_bf16_imgs_per_sec"],
                         row[f"{kind}_fp32_over_bf16"])
    if args.demo:
        with tempfile.TemporaryDirectory() as tmp:
            demo = time_demo(Path(tmp))
        results["demo"] = demo
        _logger.info("%s: the demo (2 processes, %d epochs) took %.0f s; best val top-1 %.1f %%, first >= 90 %% at "
                     "epoch %s", cpu_description(), demo["epochs"], demo["demo_seconds"], demo["best_val_acc1"],
                     demo["first_epoch_at_90"])
    results["cpus"] = os.cpu_count()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
