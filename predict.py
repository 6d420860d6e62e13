"""Classify image files with a trained model: the top-k classes, their names and probabilities.

    python -m predict --cfg output/crossformerpp_b/default/config.yaml \\
        --pretrained output/crossformerpp_b/default/best.pth photos/ more.jpg list.txt > predictions.csv
    python -m predict --pretrained ema_best.pth --use-ema --output predictions.jsonl --top-k 3 photos/

A PATH is an image file, a folder (searched recursively, files in sorted order) or a ``.txt``
file listing one path per line (relative paths are relative to the list's folder). The output
has one row per image, in input order, as CSV (``path, class_1, name_1, prob_1, ..., error``) or
JSON lines (``{"path", "top": [{"class", "name", "prob"}, ...]}``); a file that cannot be read
or decoded is one row with its ``error``, and the run goes on.

Images go through the validation loader of ``--eval`` (``DATA.LOADER pytorch``): the same eval
transform of the config (resize, center crop, normalisation) and the same probabilities, so the
predictions equal ``--eval``'s image by image. The class names are the ones the checkpoint stores
(the class folders it was trained on; ImageNet's wnids). Without ``--cfg`` the config stored in
the checkpoint describes the model. A model trained with ``TRAIN.LOSS bce`` (multi-label data
among others) scores each class on its own: its ``prob`` is that class's sigmoid, and several
classes of one image may be likely at once.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, TextIO, Union

if TYPE_CHECKING:
    import torch

# torch and the model code are imported where they are used: --help answers without them.
logger = logging.getLogger("predict")

# Lists longer than this show a progress bar (on a terminal).
PROGRESS_FROM = 256
LIST_SUFFIX = ".txt"


def list_inputs(paths: Sequence[str]) -> List[str]:
    """The image files named by ``paths``, in order: files as given, folders searched recursively
    (sorted), ``.txt`` files read as lists of paths (relative to the list's folder).

    A path that does not exist stays in the list: it becomes one error row.

    Args:
        paths: From the command line.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    found: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            files = sorted(str(Path(root) / name) for root, _, names in os.walk(path, followlinks=True)
                           for name in names if name.lower().endswith(IMG_EXTENSIONS))
            if not files:
                logger.warning("%s holds no images (extensions %s)", path, ", ".join(IMG_EXTENSIONS))
            found.extend(files)
        elif path.lower().endswith(LIST_SUFFIX) and os.path.isfile(path):
            base = os.path.dirname(path)
            with open(path, "r", encoding="utf-8") as f:
                lines = [line.strip() for line in f]
            found.extend(list_inputs([os.path.join(base, line) for line in lines if line and not line.startswith("#")]))
        else:
            found.append(path)
    return found


def predict(trained: Any, paths: Sequence[str], batch_size: int = 64, device: Union[str, torch.device] = "cpu",
            amp_dtype: Optional[torch.dtype] = None, workers: int = 0, top: int = 5,
            progress: Optional[bool] = None) -> Iterator[Dict[str, Any]]:
    """One row per path, in order: ``{"path", "top": [{"class", "name", "prob"}]}`` or ``{"path", "error"}``.

    Args:
        trained: A :class:`deploy.inference.TrainedModel`.
        paths: Image files.
        batch_size: Images per forward pass.
        device: Where the model runs (a ``torch.device`` or its name).
        amp_dtype: Autocast dtype, None for float32.
        workers: Decoding worker processes (0 = in this process).
        top: Classes per row.
        progress: Show a progress bar; None shows one on a terminal for lists longer than ``PROGRESS_FROM``.
    """
    import torch
    from tqdm import tqdm

    from data.common import EpochBatchSampler
    from data.folder import FolderSplit
    from data.torch_loader import make_torch_loader
    from deploy.analysis import top_k
    from utils.precision import autocast

    if not paths:
        return
    device = torch.device(device)
    model = trained.model.to(device).eval()
    # BCE scores each class on its own (a stored config from before TRAIN.LOSS was trained with CE).
    independent = trained.config.TRAIN.get("LOSS", "ce") == "bce"
    # The label of each sample is its place in the input: the batches say which images they hold.
    split = FolderSplit(root=Path("."), classes=trained.class_names, samples=[(p, i) for i, p in enumerate(paths)])
    sampler = EpochBatchSampler(len(paths), batch_size, trained.config.SEED, rank=0, world_size=1, train=False)
    loader = make_torch_loader(trained.config, split, sampler, device, workers)
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr,
               disable=(None if len(paths) > PROGRESS_FROM else True) if progress is None else not progress)
    next_row = 0

    def errors_before(end: int) -> Iterator[Dict[str, Any]]:
        """Rows for the images before ``end`` that the loader dropped (unreadable files)."""
        nonlocal next_row
        for index in range(next_row, end):
            path = paths[index]
            reason = next((r[len(path) + 2:-1] for r in loader.bad_files if r.startswith(f"{path} (")), "unreadable")
            yield {"path": path, "error": reason}
        next_row = max(next_row, end)

    with torch.inference_mode():
        for images, indices in loader:
            with autocast(device, amp_dtype):
                logits = model(images)  # (B, num_classes)
            if independent:
                top_logits, classes = logits.float().topk(top, dim=1)  # (B, top) each
                classes, probabilities = classes.cpu(), top_logits.sigmoid().cpu()
            else:
                classes, probabilities = (t.cpu() for t in top_k(logits, top))
            for index, row_classes, row_probabilities in zip(indices.tolist(), classes.tolist(),
                                                             probabilities.tolist()):
                yield from errors_before(index)
                yield {"path": paths[index], "top": [{"class": c, "name": trained.class_names[c], "prob": p}
                                                     for c, p in zip(row_classes, row_probabilities)]}
                next_row = index + 1
            bar.update(next_row - bar.n)
    yield from errors_before(len(paths))
    bar.update(len(paths) - bar.n)
    bar.close()


def write_rows(rows: Iterator[Dict[str, Any]], out: TextIO, fmt: str, top: int) -> Dict[str, int]:
    """Write ``rows`` as CSV or JSON lines; returns ``{"images", "errors"}`` counts.

    Args:
        rows: From :func:`predict`.
        out: Text stream.
        fmt: ``"csv"`` or ``"jsonl"``.
        top: Classes per row (the CSV header's width).
    """
    counts = {"images": 0, "errors": 0}
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(["path"] + [f"{what}_{i + 1}" for i in range(top) for what in ("class", "name", "prob")]
                        + ["error"])
    for row in rows:
        counts["images"] += 1
        counts["errors"] += "error" in row
        if writer is None:
            out.write(json.dumps(row) + "\n")
        elif "error" in row:
            writer.writerow([row["path"]] + [""] * (3 * top) + [row["error"]])
        else:
            cells = [value for item in row["top"] for value in (item["class"], item["name"], f"{item['prob']:.6g}")]
            writer.writerow([row["path"]] + cells + [""] * (3 * top - len(cells)) + [""])
    return counts


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m predict``."""
    parser = argparse.ArgumentParser("python -m predict", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or .txt lists of paths")
    parser.add_argument("--cfg", default="", metavar="FILE",
                        help="the model's YAML config (default: the config stored in the checkpoint)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="override keys of --cfg")
    parser.add_argument("--pretrained", required=True, metavar="CKPT",
                        help="a training checkpoint or weights from python -m deploy.export (.pth, .safetensors; "
                             "an .onnx file runs in onnxruntime: docs/deploy.md)")
    parser.add_argument("--use-ema", action="store_true", help="the EMA weights of a training checkpoint")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--output", default="-", help="output file (default: standard output)")
    parser.add_argument("--format", choices=("csv", "jsonl"),
                        help="csv or jsonl (default: from --output's suffix .jsonl / .json, else csv)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="decoding worker processes (default: up to 4)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="precision: none (float32, default), bf16 or fp16 (CUDA) autocast")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; a failure is one line on stderr unless ``--debug`` is given.

    Args:
        argv: Arguments without the program name.
    """
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        import torch

        from deploy.inference import load_trained_model
        from utils.precision import resolve_amp

        if args.top_k < 1 or args.batch_size < 1 or args.workers < 0:
            raise ValueError(f"--top-k {args.top_k}, --batch-size {args.batch_size} and --workers {args.workers} "
                             "must be >= 1, >= 1 and >= 0")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        trained = load_trained_model(args.pretrained, args.cfg, args.opts, args.use_ema)
        # bf16 where this device only emulates it: float32 (CPU) or fp16 (GPU), unless TRAIN.FORCE_BF16
        amp_dtype = resolve_amp(args.amp, device, "--amp", force_bf16=trained.config.TRAIN.FORCE_BF16)
        paths = list_inputs(args.paths)
        top = min(args.top_k, len(trained.class_names))
        fmt = args.format or ("jsonl" if args.output.endswith((".jsonl", ".json")) else "csv")
        out = sys.stdout if args.output == "-" else open(args.output, "w", newline="", encoding="utf-8")
        try:
            counts = write_rows(predict(trained, paths, args.batch_size, device, amp_dtype, args.workers, top),
                                out, fmt, top)
        finally:
            if out is not sys.stdout:
                out.close()
    except Exception as e:  # noqa: BLE001 - reported in one line; --debug shows the traceback
        if args.debug:
            raise
        sys.stderr.write(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__} [{type(e).__name__}; "
                         "rerun with --debug for the traceback]\n")
        return 1
    logger.info("%d images, %d could not be read%s", counts["images"], counts["errors"],
                "" if args.output == "-" else f"; written to {args.output}")
    return 0


if __name__ == "__main__":
    from utils.process import exit_with

    exit_with(main())
