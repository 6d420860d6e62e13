"""``python -m benchmarks.gpu_check``: what only a GPU can show, in one command and one report.

Runs every check group on one CUDA device (or, with ``--device cpu --quick``, every check's code
path at tiny sizes, skipping by name what needs CUDA), writes ``gpu_check.json`` and
``gpu_check.md`` to ``--out`` (after every group, so that a run stopped by a time limit keeps
what it finished) and exits 1 when a check failed. It needs no file outside the repository and
no download: data and models are generated. Without DALI installed, the rows that need it are
skipped by name and the others run. The budget is 8 minutes on one H100; each group's budget is
in ``benchmarks/gpu_check/plan.py``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .plan import BUDGET_S, DALI_MISSING, Context, dali_installed, make_plan
from .report import FAIL, GroupTiming, Report, Result, SpeedRow, skipped

logger = logging.getLogger("gpu_check")

# Every check, by group, with what it proves (--help prints this list).
CHECKS: Dict[str, List[Tuple[str, str]]] = {
    "models": [
        ("models/<model>/<size>/<precision>/outputs", "training-mode logits, ours vs models/reference.py "
         "(crossformerpp_s, crossformer_t at 224 and 384; fp32 with TF32 off, bf16, fp16 autocast)"),
        ("models/<model>/<size>/<precision>/grads", "every parameter's gradient, ours vs the official formulation"),
        ("models/<model>/<size>/<precision>/eval_outputs", "inference path (cached bias) vs the official formulation"),
    ],
    "sdpa": [
        ("sdpa/<model>/<size>/bf16/{training,inference}/kernel", "the SDPA kernel our configuration runs "
         "(profiled; memory-efficient on CUDA, no silent math fallback)"),
        ("sdpa/<model>/<size>/bf16/pinned/<backend>", "each SDPA backend pinned alone: accepted or rejected "
         "for this bias shape, dtype and head dimension (efficient and math must accept)"),
    ],
    "training": [
        ("training/{fp16,bf16}/{eager,compiled}/finite_losses", "DDP at world size 1 (NCCL; gloo on CPU), "
         "engine.train_one_epoch, 30 steps of crossformerpp_s: every loss finite"),
        ("training/{fp16,bf16}/{eager,compiled}/no_host_sync", "no host synchronisation after warm-up "
         "(torch.cuda.set_sync_debug_mode 'error'; CUDA only)"),
        ("training/{fp16,bf16}/compiled_vs_eager", "torch.compile(DDP(model)) losses close to eager's"),
        ("training/{fp16,bf16}/compiled/recompiles_after_warmup", "dynamo compiles nothing after warm-up"),
        ("training/{fp16,bf16}/resume_continues", "RunCheckpoints save at step 15 and resume: the loss "
         "curve continues"),
        ("training/fp16/grad_scaler_scale", "GradScaler's scale after the run (finite, > 0)"),
    ],
    "dali": [
        ("dali/gpu_operators", "every operator of the GPU train / val graphs has an implementation on its device "
         "in the installed DALI"),
        ("dali/val_vs_pytorch", "mixed val pipeline vs the PyTorch loader on the same files (< 0.5/255)"),
        ("dali/randaugment_ops", "tests/test_parity.py's per-op RandAugment parity, pipeline on the GPU"),
        ("dali/train_pipeline", "mixed train pipeline (crop, RandAugment with warp_perspective, flip, "
         "normalise, erasing): shape, dtype, device, statistics"),
        ("dali/no_host_round_trip", "the training loop on the DALI loader under sync debug 'error' (CUDA only)"),
        ("dali/erasing_reproducible", "the train loader's batches (random erasing on every image) are the same "
         "after the global torch, CUDA, numpy and random generators are reseeded: pure in (seed, epoch, batch, "
         "rank, sample)"),
        ("dali/validation_syncs", "engine.evaluate over device batches (a smaller last one) under "
         "set_sync_debug_mode 'warn': the host synchronisations it makes (<= 1, the final read; CUDA only)"),
    ],
    "recipes": [
        ("recipes/optimizer/{adamw,lamb,lion,sgd}/skip_nonfinite", "fp16 + GradScaler through engine.optimizer_step: "
         "a non-finite step leaves weights and optimizer state bitwise unchanged and halves the scale, the next moves"),
        ("recipes/distill/{bf16,fp16}", "the teacher resizes and renormalises the batch on the device, runs under "
         "autocast; the distilled loss is finite, only the student gets gradients, the teacher is timed"),
        ("recipes/multilabel_map", "engine.evaluate_multilabel on device batches through the process group (NCCL "
         "all_gather_object) equals the float64 mAP of the same logits"),
    ],
    "speed": [
        ("speed/<model>/{bf16,fp16}/{infer,train}", "img/s ours vs official, crossformerpp_s batch 128, "
         "crossformerpp_b batch 64, alternating; paper inference figure alongside"),
        ("memory/<model>/{bf16,fp16}/{infer,train}", "peak memory of a step, ours vs official"),
        ("loader/train", "DALI (mixed) vs PyTorch loader img/s on the same JPEGs"),
        ("e2e/main_py_dali", "main.py trains with the DALI loader (exit 0); its img/s and data-wait share"),
    ],
}


def _run_groups(ctx: Context) -> Dict[str, Callable[[], Tuple[List[Result], List[SpeedRow]]]]:
    # Imported here so that --help answers without importing torch's and DALI's heavy parts.
    from .model_checks import check_models, check_sdpa
    from .recipe_checks import check_recipes
    from .speed import check_speed
    from .training import check_training

    def dali_group() -> Tuple[List[Result], List[SpeedRow]]:
        if not ctx.dali:
            return [skipped(name, DALI_MISSING) for name, _ in CHECKS["dali"]], []
        from .dali_checks import check_dali

        return check_dali(ctx), []

    return {"models": lambda: (check_models(ctx), []), "sdpa": lambda: (check_sdpa(ctx), []),
            "training": lambda: (check_training(ctx), []), "dali": dali_group,
            "recipes": lambda: (check_recipes(ctx), []),
            "speed": lambda: check_speed(ctx)}


def describe_checks() -> str:
    """The checks, one per line, by group (with each group's GPU budget)."""
    lines = [f"checks (group budget on one H100; generating the JPEGs first: {BUDGET_S['data']:.0f} s):"]
    for group, checks in CHECKS.items():
        lines.append(f"  {group} ({BUDGET_S[group]:.0f} s)")
        lines += [f"    {name}: {what}" for name, what in checks]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     epilog=describe_checks(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="report and scratch directory")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every code path in seconds")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (the GPU run) or cpu (with --quick: the CI mode; CUDA-only checks are skipped)")
    parser.add_argument("--groups", nargs="+", choices=list(CHECKS), default=list(CHECKS),
                        help="run only these groups")
    return parser.parse_args(argv)


def environment(device: torch.device) -> Dict[str, str]:
    """Versions and the device, for the report's header."""
    import timm

    dali = "not installed"
    if dali_installed():
        import nvidia.dali

        dali = nvidia.dali.__version__
    env = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "dali": dali,
           "timm": timm.__version__, "cpus": str(os.cpu_count())}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: Sequence[str] = ()) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.stderr.write("error: no CUDA device is visible; run on a GPU, or use --device cpu --quick\n")
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True  # as the trainer sets it
    ctx = Context(device=device, quick=args.quick, plan=make_plan(args.quick), out=args.out, dali=dali_installed())
    report = Report(device=environment(device).get("gpu", "cpu"), quick=args.quick, environment=environment(device),
                    pending=list(args.groups))
    if ctx.dali and {"dali", "speed"} & set(args.groups):
        # Made first: the writer processes are forked before this process starts CUDA.
        from .dali_checks import generated_jpegs

        start = time.perf_counter()
        generated_jpegs(ctx)
        report.timings.append(GroupTiming("data", time.perf_counter() - start, BUDGET_S["data"]))
    groups = _run_groups(ctx)
    for group in args.groups:
        logger.info("group %s (budget %.0f s)", group, BUDGET_S[group])
        start = time.perf_counter()
        try:
            results, rows = groups[group]()
        except Exception as error:  # noqa: BLE001 - a broken check is a failed row, the others still run
            logger.error("group %s failed:\n%s", group, traceback.format_exc())
            results, rows = [Result(f"{group}/error", FAIL, type(error).__name__,
                                    "no exception", " ".join(str(error).split())[:300])], []
        seconds = time.perf_counter() - start
        report.results += results
        report.speed += rows
        report.timings.append(GroupTiming(group, seconds, BUDGET_S[group]))
        report.pending.remove(group)
        for result in results:
            logger.info("%-4s %s %s", result.status, result.name, result.value)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report.write(args.out)
    sys.stdout.write(report.markdown())
    logger.info("wrote %s and %s", args.out / "gpu_check.json", args.out / "gpu_check.md")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
