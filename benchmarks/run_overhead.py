"""A whole run's overhead beside its steps: ``main.py`` against a plain timm training loop.

Example (from the repository root)::

    python -m benchmarks.run_overhead --epochs 3 --trials 3 --workers 2 --json overhead.json

Both contenders train the demo model (``configs/demo.yaml``: CrossFormer++ with embed dim 32,
depths 1-1-2-1) on the same generated image folder (the toy shapes, ``--train-per-class`` and
``--val-per-class`` JPEGs of 32 px per class), with the same recipe: batch 64, AdamW with weight
decay, a per-step cosine schedule with one warm-up epoch, label smoothing 0.1, gradient clipping at
5, EMA 0.99, random-resized crop (scale 0.8-1) and flip, bicubic resizing, the same validation crop,
``--workers`` DataLoader workers, float32 on the CPU, one process. Each validates the weights and
the EMA after every epoch and writes its checkpoints.

- ``ours``: ``main.py --cfg configs/demo.yaml`` on the folder (every output it writes: checkpoints,
  ``metrics.jsonl``, TensorBoard, the end-of-run analysis).
- ``timm``: timm's own pieces assembled the way timm's ``train.py`` assembles them (``create_dataset``,
  ``create_loader`` with its default persistent workers and its prefetcher, ``create_optimizer_v2``,
  ``create_scheduler_v2``, ``ModelEmaV3``, ``CheckpointSaver``, ``update_summary``): its
  ``train_one_epoch`` / ``validate`` loop without the logging. timm's ``train.py`` itself is a
  script of timm's repository, not of the pip package, so it is not run.

Each child process stamps the end of every optimizer step (a global optimizer post-step hook); the
parent stamps the launch and the exit. With ``S`` the median time between two steps of one epoch:

- ``start``: launch to the end of the first step, less ``S``;
- ``between``: the end of an epoch's last step to the end of the next epoch's first step, less
  ``S`` (validation of the weights and the EMA, checkpoints, records, the next epoch's first batch);
- ``end``: the end of the last step to the process's exit (the last validation, checkpoints, the
  end of run);
- ``steps``: the rest of the wall time.

``--val-passes N`` measures instead the validation loader alone on the same folder (no model):
seconds per pass over the validation set with workers that live across passes (the loader's
design) against workers started for each pass (``TorchLoader.close`` after every pass), the two
alternating, N passes each, after one untimed pass of each.

The contenders alternate within every trial (the order flips each trial) and the table gives
each column's median over the trials and the median of the per-trial ratios ours / timm. A second
table gives each segment in steps of its own run (segment / ``S``): on a shared machine whose speed
drifts by several times within minutes, that is what compares across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
IMG_SIZE = 32
EMA_DECAY = 0.99
SEGMENTS = ("wall", "start", "between", "end", "steps", "step")


def _install_step_stamps(path: str) -> None:
    """Record the wall time of every optimizer step's end; write them to ``path`` at exit."""
    import atexit

    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: List[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.time()))
    # Registered before the run's own exit hooks, so it runs after them (atexit is last-in, first-out).
    atexit.register(lambda: Path(path).write_text(json.dumps(stamps)))


def _child_ours(argv: Sequence[str]) -> None:
    """``python main.py ARGV`` of the checkout in the working directory, in this process."""
    import runpy

    sys.argv = ["main.py", *argv]
    runpy.run_path(os.path.join(os.getcwd(), "main.py"), run_name="__main__")  # exits with main.py's code


def _child_timm(data: str, output: str, epochs: int, workers: int) -> int:
    """timm's train.py loop on the demo recipe (float32, CPU, one process)."""
    import torch
    from timm.data import create_dataset, create_loader
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.models import create_model
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import CheckpointSaver, ModelEmaV3, accuracy, dispatch_clip_grad, random_seed, update_summary

    import models  # noqa: F401 - registers the CrossFormer variants with timm

    device = torch.device("cpu")
    random_seed(0, 0)
    model = create_model("crossformerpp_s", num_classes=10, drop_path_rate=0.0, embed_dim=32, depths=[1, 1, 2, 1],
                         num_heads=[1, 2, 4, 8])
    dataset_train = create_dataset("", root=data, split="train", is_training=True)
    dataset_eval = create_dataset("", root=data, split="validation")
    common = dict(input_size=(3, IMG_SIZE, IMG_SIZE), batch_size=BATCH, interpolation="bicubic", num_workers=workers,
                  device=device, use_prefetcher=True)
    loader_train = create_loader(dataset_train, is_training=True, scale=(0.8, 1.0), color_jitter=None, **common)
    loader_eval = create_loader(dataset_eval, is_training=False, crop_pct=0.875, **common)
    optimizer = create_optimizer_v2(model, "adamw", lr=3.75e-4, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=epochs, warmup_epochs=1, warmup_lr=1e-6,
                                       min_lr=1e-5, step_on_epochs=False, updates_per_epoch=len(loader_train))
    ema = ModelEmaV3(model, decay=EMA_DECAY)
    criterion, eval_criterion = LabelSmoothingCrossEntropy(0.1), torch.nn.CrossEntropyLoss()
    saver = CheckpointSaver(model, optimizer, model_ema=ema, checkpoint_dir=output, recovery_dir=output,
                            decreasing=False, max_history=2)

    def validate(net: torch.nn.Module) -> Dict[str, float]:
        net.eval()
        sums = {"loss": 0.0, "top1": 0.0, "top5": 0.0}
        count = 0
        with torch.no_grad():
            for images, targets in loader_eval:
                output = net(images)
                top1, top5 = accuracy(output, targets, topk=(1, 5))
                n = images.shape[0]
                sums["loss"] += eval_criterion(output, targets).item() * n
                sums["top1"] += top1.item() * n
                sums["top5"] += top5.item() * n
                count += n
        return {key: value / count for key, value in sums.items()}

    updates = 0
    for epoch in range(epochs):
        model.train()
        losses = []
        for images, targets in loader_train:
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            dispatch_clip_grad(model.parameters(), 5.0)
            optimizer.step()
            updates += 1
            ema.update(model, step=updates)
            scheduler.step_update(num_updates=updates)
            losses.append(loss.detach())
        train_metrics = {"loss": torch.stack(losses).mean().item()}
        eval_metrics = validate(model)
        validate(ema.module)
        update_summary(epoch, train_metrics, eval_metrics, filename=str(Path(output) / "summary.csv"),
                       lr=optimizer.param_groups[0]["lr"], write_header=epoch == 0)
        saver.save_checkpoint(epoch, metric=eval_metrics["top1"])
    return 0


def _val_pass_seconds(data: Path, workers: int, passes: int) -> Dict[str, float]:
    """Median seconds per validation pass: workers kept across passes, and started for each pass."""
    import torch

    from config import _C
    from data import build_loader

    config = _C.clone()
    config.defrost()
    config.DATA.DATASET, config.DATA.DATA_PATH, config.DATA.IMG_SIZE = "imagenet", str(data), IMG_SIZE
    config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS, config.MODEL.NUM_CLASSES = BATCH, workers, 10
    config.DATA.LOADER, config.DATA.PIN_MEMORY = "pytorch", False
    loaders = {name: build_loader(config, torch.device("cpu")).val for name in ("kept", "per_pass")}
    seconds: Dict[str, List[float]] = {name: [] for name in loaders}
    for index in range(passes + 1):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for _ in loader:
                pass
            if name == "per_pass":
                loader.close()  # the next pass starts new workers
            if index:  # the first pass of each starts its workers: untimed
                seconds[name].append(time.perf_counter() - start)
    for loader in loaders.values():
        loader.close()
    return {name: statistics.median(values) for name, values in seconds.items()}


def _segments(launch: float, exit_: float, stamps: List[float], steps_per_epoch: int) -> Dict[str, float]:
    """Split one run's wall time into start, between epochs (median), end and steps (seconds)."""
    epochs = len(stamps) // steps_per_epoch
    within = [b - a for e in range(epochs) for a, b in zip(stamps[e * steps_per_epoch:(e + 1) * steps_per_epoch],
                                                           stamps[e * steps_per_epoch + 1:(e + 1) * steps_per_epoch])]
    step = statistics.median(within)
    between = [stamps[e * steps_per_epoch] - stamps[e * steps_per_epoch - 1] - step for e in range(1, epochs)]
    wall, start, end = exit_ - launch, stamps[0] - launch - step, exit_ - stamps[-1]
    return {"wall": wall, "start": start, "between": statistics.median(between), "end": end,
            "steps": wall - start - sum(between) - end, "step": step}


def _run(command: List[str], cwd: Path, stamps: Path, steps_per_epoch: int, epochs: int) -> Dict[str, float]:
    launch = time.time()
    done = subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    exit_ = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    times = json.loads(stamps.read_text())
    if len(times) != steps_per_epoch * epochs:
        raise RuntimeError(f"{command[4]} made {len(times)} optimizer steps, expected {steps_per_epoch} x {epochs}")
    return _segments(launch, exit_, times, steps_per_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of each loader")
    parser.add_argument("--train-per-class", type=int, default=160, help="toy training images per class (10 classes)")
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--contenders", nargs="+", default=["ours", "timm"], choices=["ours", "timm"])
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout of this project (e.g. `git archive COMMIT | tar -x -C DIR`): its "
                             "main.py runs as the contender 'before'")
    parser.add_argument("--val-passes", type=int, default=0,
                        help="measure the validation loader alone: N passes with kept / per-pass workers")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=["ours", "timm"], help=argparse.SUPPRESS)
    parser.add_argument("--stamps", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        sys.path.insert(0, os.getcwd())  # the checkout whose code runs (this one, or --baseline's)
        _install_step_stamps(args.stamps)
        if args.child == "ours":
            _child_ours(rest)
        sys.exit(_child_timm(args.data, args.output, args.epochs, args.workers))

    import torch

    from data.toy import ToySpec, ensure_toy_dataset

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = ensure_toy_dataset(tmp / "toy", ToySpec(args.train_per_class, args.val_per_class, IMG_SIZE))
        steps_per_epoch = (10 * args.train_per_class) // BATCH
        if steps_per_epoch < 2 and not args.val_passes:
            raise SystemExit(f"--train-per-class {args.train_per_class} gives {steps_per_epoch} step(s) of batch {BATCH} "
                             f"per epoch; the step time needs 2 or more: pass at least {-(-2 * BATCH // 10)}")
        if args.val_passes:
            times = _val_pass_seconds(data, args.workers, args.val_passes)
            print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; {10 * args.val_per_class} val images, "
                  f"batch {BATCH}, {args.workers} workers; median s per pass of {args.val_passes}: workers kept "
                  f"{times['kept']:.3f}, started per pass {times['per_pass']:.3f}, ratio "
                  f"{times['kept'] / times['per_pass']:.2f}")
            return
        contenders = list(args.contenders) + (["before"] if args.baseline else [])
        results: Dict[str, List[Dict[str, float]]] = {name: [] for name in contenders}
        for trial in range(args.trials):
            order = contenders if trial % 2 == 0 else contenders[::-1]
            for name in order:
                out = tmp / f"{name}-{trial}"
                stamps = tmp / f"{name}-{trial}.json"
                command = [sys.executable, str(Path(__file__).resolve()), "--child", "timm" if name == "timm" else "ours",
                           "--stamps", str(stamps), "--epochs", str(args.epochs), "--workers", str(args.workers)]
                if name != "timm":
                    command += ["--cfg", "configs/demo.yaml", "--data-path", str(data), "--output", str(out),
                                "--tag", "bench", "--opts", "DATA.DATASET", "imagenet", "TRAIN.EPOCHS",
                                str(args.epochs), "DATA.NUM_WORKERS", str(args.workers), "TRAIN.AUTO_RESUME", "False"]
                else:
                    out.mkdir()
                    command += ["--data", str(data), "--output", str(out)]
                cwd = args.baseline.resolve() if name == "before" else ROOT
                results[name].append(_run(command, cwd, stamps, steps_per_epoch, args.epochs))
                print(f"trial {trial} {name}: " + "  ".join(f"{k} {v:.2f}" for k, v in results[name][-1].items()),
                      flush=True)
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in SEGMENTS}
               for name, runs in results.items()}
    summary = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
               "epochs": args.epochs, "steps_per_epoch": steps_per_epoch, "workers": args.workers,
               "median_s": medians, "runs": results}
    print(f"\nCPU capability {summary['cpu_capability']}, {args.epochs} epochs x {steps_per_epoch} steps of batch "
          f"{BATCH}, {args.workers} workers; medians of {args.trials} trials, seconds")
    print("| contender | wall | start | between epochs | end | steps | s/step |")
    print("|---|---|---|---|---|---|---|")
    for name, row in medians.items():
        print(f"| {name} | " + " | ".join(f"{row[key]:.2f}" for key in SEGMENTS[:-1]) + f" | {row['step']:.3f} |")
    for other in ("timm", "before"):
        if "ours" not in results or other not in results:
            continue
        ratios = {key: statistics.median(o[key] / t[key] for o, t in zip(results["ours"], results[other]))
                  for key in SEGMENTS}
        summary[f"median_ratio_ours_over_{other}"] = ratios
        print(f"| ours / {other} | " + " | ".join(f"{ratios[key]:.2f}" for key in SEGMENTS[:-1]) +
              f" | {ratios['step']:.2f} |")
    in_steps = {name: {key: statistics.median(r[key] / r["step"] for r in runs) for key in SEGMENTS[:-1]}
                for name, runs in results.items()}
    summary["median_in_steps"] = in_steps
    print("\nin steps of each run's own median step time (segment / s/step), medians")
    print("| contender | wall | start | between epochs | end | steps |")
    print("|---|---|---|---|---|---|")
    for name, row in in_steps.items():
        print(f"| {name} | " + " | ".join(f"{row[key]:.2f}" for key in SEGMENTS[:-1]) + " |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
