"""CPU inference images/s: the ONNX export under onnxruntime vs the PyTorch model (eager, float32).

The model is a registered variant at full size with random weights (the speed does not depend
on their values), exported as ``python -m deploy.export --format onnx`` does, at a fixed batch.
Each trial times both contenders, alternating which goes first, for ``--seconds`` each after a
warm-up; the ratio onnxruntime / PyTorch is taken per trial and its median reported, so that a
slower spell of a shared machine hits both. Both use ``--threads`` threads.

Examples:
    python -m benchmarks.onnx_vs_torch --model crossformerpp_s --batch-size 8 --trials 5
    python -m benchmarks.onnx_vs_torch --model crossformer_t --img-size 224 --threads 2
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import models
from deploy.inference import TrainedModel
from deploy.onnx_export import export_onnx, onnx_session


def images_per_second(run: Callable[[], None], batch: int, seconds: float) -> float:
    """Images/s of ``run`` (one batch per call) over at least ``seconds``, after one untimed call."""
    run()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="crossformerpp_s", choices=models.list_models())
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per contender and trial")
    args = parser.parse_args()
    logging.getLogger("onnxscript.optimizer").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from yacs.config import CfgNode

    model = models.create_model(args.model).eval()
    config = CfgNode({"MODEL": {"NAME": args.model}, "DATA": {"IMG_SIZE": args.img_size, "INTERPOLATION": "bicubic"},
                      "TEST": {"CROP_PCT": 0.875}})
    trained = TrainedModel(model=model, config=config, class_names=[str(i) for i in range(1000)])
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "model.onnx")
        start = time.perf_counter()
        export_onnx(trained, path, args.img_size, args.batch_size)
        export_seconds = time.perf_counter() - start
        session = onnx_session(path, args.threads)
        feed = {"images": images.numpy()}

        def run_onnx() -> None:
            session.run(["logits"], feed)

        def run_torch() -> None:
            with torch.inference_mode():
                model(images)

        contenders = {"onnxruntime": run_onnx, "pytorch": run_torch}
        rates: Dict[str, List[float]] = {name: [] for name in contenders}
        for trial in range(args.trials):
            order = list(contenders) if trial % 2 == 0 else list(reversed(contenders))
            for name in order:
                rates[name].append(images_per_second(contenders[name], args.batch_size, args.seconds))
            print(f"trial {trial + 1}: " + ", ".join(f"{name} {rates[name][-1]:.1f} img/s" for name in contenders),
                  flush=True)
    ratios = [o / p for o, p in zip(rates["onnxruntime"], rates["pytorch"])]
    result = {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "threads": args.threads,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "export_seconds": round(export_seconds, 1),
              "onnxruntime_imgs_per_sec": round(statistics.median(rates["onnxruntime"]), 2),
              "pytorch_imgs_per_sec": round(statistics.median(rates["pytorch"]), 2),
              "median_ratio_onnxruntime_over_pytorch": round(statistics.median(ratios), 3),
              "ratios": [round(r, 3) for r in ratios]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
