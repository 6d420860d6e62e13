"""Model speed: inference and training images/s of the fast path against the official formulation.

Example (from the repository root; 2 CPU threads)::

    python -m benchmarks.benchmark_model --model crossformerpp_s crossformerpp_b --batch-size 16 \
        --precision fp32 bf16 --impl fast reference --threads 2 --json benchmark.json

``reference`` is the official formulation (``models/reference.py``, selected by
``model.set_reference_attention``: pad then project every token, explicit
softmax(QK^T*scale + bias) V materialising each attention matrix, position-bias MLP re-run in
every block on every forward); ``fast`` is ours (SDPA with one additive bias in the query dtype,
grouping of the C-wide tokens with q/k/v as strided views, bias cached in eval mode, fc1+GELU as
one oneDNN call in CPU inference, the CPU forms ``models/kernel_choice.py`` picks per dtype);
``fast-fp32-forms`` is ours with the CPU forms tuned in float32 forced everywhere (SDPA in
inference, the stem's space-to-depth convolutions), the fast path before that switch. All run the
same weights on the same
input. Each number is the median over ``--trials`` timed trials after ``--warmup`` untimed ones;
the implementations take turns inside every trial, and the speedup is the median of the
per-trial ratios, so that a drifting machine speed (±20 % within minutes on a shared VM) hits
both alike. A trial times one step with ``torch.utils.benchmark.Timer`` (which runs two
untimed steps first and synchronises the accelerator).
Training = forward, backward and AdamW step (torch's fused kernel, as training uses; fp16 with a loss scaler).
Every ratio line and the JSON name the processor (on a CPU the capability torch reports and whether
oneDNN runs bf16 natively). On a CPU that other processes load, ``--threads 1 --clock cpu`` times
process CPU seconds, which leave out the waits for a core that wall time includes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional
from unittest import mock

import torch
from torch.utils import benchmark

import models
from models import kernel_choice

_logger = logging.getLogger("benchmark_model")

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ["fast", "reference", "fast-fp32-forms"]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_rate(step: Callable[[], None], items: int, warmup: int, trials: int, clock: str = "wall") -> float:
    """Median of ``items / seconds`` over ``trials`` timed calls of ``step`` after ``warmup`` calls.

    Each trial times one call with ``torch.utils.benchmark.timer`` (the clock ``Timer`` uses: it
    synchronises the accelerator). ``Timer.timeit`` itself would add two untimed calls to every
    trial, tripling the run of alternating single steps. ``clock="cpu"`` times the process's CPU
    seconds instead (``time.process_time``, CPU only): with one thread on a machine that other
    processes load, it leaves out the time the process waits for a core, which wall time does not.

    Args:
        step: One training or inference step.
        items: Images per step.
        warmup: Untimed calls first.
        trials: Timed calls.
        clock: "wall" or "cpu".
    """
    timer = time.process_time if clock == "cpu" else benchmark.timer
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(trials):
        start = timer()
        step()
        rates.append(items / (timer() - start))
    return statistics.median(rates)


def _proc_status_mib(key: str) -> float:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def cuda_step_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Memory one call of ``step`` needs on top of what is already allocated (activations and
    temporaries; weights, optimizer state and the other implementation's model excluded), in MiB:
    the CUDA caching allocator's peak."""
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - resident) / 2**20


def cpu_step_peak_mib(setting: Dict[str, object], kind: str, warmup: int) -> Optional[float]:
    """The same on CPU (Linux), measured in a fresh process: the growth of its resident-set
    high-water mark over one step after ``warmup`` steps (reset through /proc/self/clear_refs).

    glibc would keep freed activations in its heap once its dynamic mmap threshold has grown, so
    the child fixes the threshold at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): large tensors are then
    mapped and unmapped, and the resident set follows them. A separate process keeps that
    allocator setting out of the timed runs. None where /proc is not available.

    Args:
        setting: :func:`build_setting`'s keyword arguments (device "cpu", no compile).
        kind: "infer" or "train".
        warmup: untimed steps first (the first step allocates optimizer state and caches).
    """
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    request = json.dumps(dict(setting=setting, kind=kind, warmup=warmup, threads=torch.get_num_threads()))
    done = subprocess.run([sys.executable, "-m", __spec__.name, "--child-peak", request], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True)
    value = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
    return None if value is None else float(value)


def _child_peak(request: str) -> None:
    """Body of :func:`cpu_step_peak_mib`'s child process: prints ``{"peak_mib": ...}``."""
    args = json.loads(request)
    torch.set_num_threads(args["threads"])
    step = build_setting(**args["setting"], device=torch.device("cpu"), compile_model=False)[args["kind"]]
    for _ in range(args["warmup"]):
        step()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set
        resident = _proc_status_mib("VmRSS")
    except (OSError, KeyError):
        print(json.dumps({"peak_mib": None}))
        return
    step()
    print(json.dumps({"peak_mib": _proc_status_mib("VmHWM") - resident}))


def build_setting(name: str, batch_size: int, img_size: int, precision: str, impl: str, compile_model: bool,
                  device: torch.device, arch: Optional[Dict[str, object]] = None) -> Dict[str, Callable[[], None]]:
    """Inference and training step closures of one implementation (weights from seed 0).

    Args:
        name: registered model name.
        batch_size: images per step.
        img_size: square input side.
        precision: "fp32" or "bf16" (autocast).
        impl: "fast", "reference" or "fast-fp32-forms".
        compile_model: wrap the model in torch.compile.
        device: where to run.
        arch: constructor overrides (e.g. a shrunk model for a quick run).
    """
    torch.manual_seed(0)
    model = models.create_model(name, **(arch or {})).to(device)
    model.set_reference_attention(impl == "reference")
    # "fast-fp32-forms": the fast path with the forms tuned in float32 everywhere (SDPA in CPU
    # inference, the stem's space-to-depth convolutions), i.e. without models.kernel_choice's choice.
    forms = (mock.patch.multiple(kernel_choice, cpu_inference_uses_sdpa=lambda dtype: True,
                                 cpu_stem_uses_space_to_depth=lambda *args: True)
             if impl == "fast-fp32-forms" else contextlib.nullcontext())
    runner = torch.compile(model) if compile_model else model
    generator = torch.Generator().manual_seed(1)  # same input for every implementation
    x = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
    target = torch.randint(0, model.num_classes, (batch_size,), generator=generator).to(device)
    dtype = PRECISIONS[precision]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), autocast(), forms:
            runner(x)

    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None  # fp16 trains with one

    def train() -> None:
        model.train()
        with autocast(), forms:
            loss = torch.nn.functional.cross_entropy(runner(x), target)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return {"infer": infer, "train": train}


def measure(setting: Dict[str, object], impls: List[str], compile_model: bool, device: torch.device, warmup: int,
            trials: int, cpu_memory: bool = False, clock: str = "wall") -> List[Dict[str, object]]:
    """Rows of the table for one setting: every implementation, timed in alternation.

    The implementations take turns inside every trial (fast, reference, fast, ...), so a drift
    of the machine's speed hits them alike; each row holds the median images/s and every
    trial's rate, from which :func:`speedups` takes per-trial ratios. Peak memory is what one
    step needs beyond the resident weights and optimizer state: always on CUDA
    (:func:`cuda_step_peak_mib`), on CPU with ``cpu_memory`` (:func:`cpu_step_peak_mib`, eager only).

    Args:
        setting: :func:`build_setting`'s ``name``, ``batch_size``, ``img_size`` and ``precision``.
        impls: "fast" and / or "reference".
        compile_model: wrap the models in torch.compile.
        device: where to run.
        warmup: untimed steps of each implementation before its peak memory and the trials.
        trials: timed steps of each implementation.
        cpu_memory: on CPU, also measure the peak memory (one extra process per implementation and kind).
        clock: "wall" or "cpu" (:func:`median_rate`).
    """
    settings = {impl: dict(setting, impl=impl) for impl in impls}
    steps = {impl: build_setting(**settings[impl], compile_model=compile_model, device=device) for impl in impls}
    rows = {impl: dict(model=setting["name"], batch_size=setting["batch_size"], img_size=setting["img_size"],
                       precision=setting["precision"], impl=impl, compiled=compile_model, device=str(device))
            for impl in impls}
    for kind in ("infer", "train"):
        rates: Dict[str, List[float]] = {impl: [] for impl in impls}
        peaks: Dict[str, Optional[float]] = {}
        for impl in impls:
            for _ in range(warmup):
                steps[impl][kind]()
            peaks[impl] = None
            if device.type == "cuda":
                peaks[impl] = cuda_step_peak_mib(steps[impl][kind], device)
            elif cpu_memory and not compile_model:
                peaks[impl] = cpu_step_peak_mib(settings[impl], kind, max(warmup, 1))
        for trial in range(trials):
            order = impls if trial % 2 == 0 else impls[::-1]
            for impl in order:
                rates[impl].append(median_rate(steps[impl][kind], setting["batch_size"], 0, 1, clock))
        for impl in impls:
            rows[impl][f"{kind}_imgs_per_sec"] = statistics.median(rates[impl])
            rows[impl][f"{kind}_trials"] = rates[impl]
            rows[impl][f"{kind}_peak_mib"] = peaks[impl]
    return list(rows.values())


def speedups(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Ratios of every implementation (``fast``, ``fast-fp32-forms``) to the reference, per setting
    measured with both.

    ``*_speedup`` is the median of the per-trial ratios (each trial times both back to back).
    """
    out = []
    for ours in (r for r in rows if r["impl"] != "reference"):
        for ref in rows:
            same = all(ref[k] == ours[k] for k in ("model", "batch_size", "img_size", "precision", "compiled"))
            if ref["impl"] == "reference" and same:
                ratio = dict(model=ours["model"], precision=ours["precision"], compiled=ours["compiled"],
                             impl=ours["impl"])
                for kind in ("infer", "train"):
                    per_trial = [a / b for a, b in zip(ours[f"{kind}_trials"], ref[f"{kind}_trials"])]
                    ratio[f"{kind}_speedup"] = statistics.median(per_trial)
                    ratio[f"{kind}_speedup_trials"] = per_trial
                out.append(ratio)
    return out


def device_description(device: torch.device) -> str:
    """What the numbers were measured on: the GPU's name, or the CPU capability torch reports and
    whether oneDNN runs bf16 natively there (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
            f"{'yes' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no'}")


def mib(value: Optional[float]) -> str:
    """A peak-memory figure for the log, or n/a."""
    return "n/a" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["crossformerpp_s"], choices=models.list_models())
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS))
    parser.add_argument("--impl", nargs="+", default=["fast", "reference"], choices=IMPLS)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write rows and speedups here")
    parser.add_argument("--cpu-memory", action="store_true",
                        help="on CPU, also measure each step's peak memory (one extra process per row and kind)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: time each step in process CPU seconds (CPU device; use with --threads 1 on a "
                             "machine that other processes load)")
    parser.add_argument("--child-peak", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_peak is not None:
        _child_peak(args.child_peak)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit(f"--clock cpu times CPU seconds and needs --device cpu, not {device}; use --clock wall")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Timer synchronises the current device
    rows = []
    for name in args.model:
        for precision in args.precision:
            setting = dict(name=name, batch_size=args.batch_size, img_size=args.img_size, precision=precision)
            for compiled in ([False, True] if args.compile else [False]):
                for row in measure(setting, args.impl, compiled, device, args.warmup, args.trials, args.cpu_memory,
                                   args.clock):
                    rows.append(row)
                    _logger.info(
                        "%-16s %-5s %-9s compiled=%-5s infer %8.2f img/s (step peak %s MiB)  "
                        "train %8.2f img/s (step peak %s MiB)", name, precision, row["impl"], compiled,
                        row["infer_imgs_per_sec"], mib(row["infer_peak_mib"]), row["train_imgs_per_sec"],
                        mib(row["train_peak_mib"]))
    ratios = speedups(rows)
    processor = device_description(device)
    for ratio in ratios:
        _logger.info("%s, %s clock: %-16s %-5s compiled=%-5s %s/reference (median of per-trial ratios): "
                     "infer x%.2f  train x%.2f", processor, args.clock, ratio["model"], ratio["precision"],
                     ratio["compiled"], ratio["impl"], ratio["infer_speedup"], ratio["train_speedup"])
    result = dict(threads=torch.get_num_threads(), torch=torch.__version__, processor=processor, clock=args.clock,
                  rows=rows, speedups=ratios)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
