"""What a model gets wrong: per-class accuracy, the confusion matrix, the most confused pairs, a PNG.

``--eval`` (for each set of weights it evaluates) and the end of training (for ``best.pth``)
collect every validation image's top-5 classes and probabilities through
:func:`engine.evaluate`, gather them on rank 0 (:func:`gather_predictions`) and write
(:func:`write_analysis`) into one directory:

- ``analysis.json``: top-1 / top-5 (and ReaL top-1 with ``DATA.REAL_LABELS``), per-class count,
  top-1, top-5 and most frequent wrong class, the confusion matrix (rows: true class, columns:
  predicted top-1) and the most confused pairs;
- ``confusion.png``: the matrix shaded by share of the true class (up to ``MAX_PNG_CLASSES``
  classes; with more, the ``TOP_N_PNG`` classes involved in the most errors);
- ``predictions.csv``: one row per image with its path, label and top-5 (images read from files).

Multi-label data (one set of classes per image) has no confusion matrix: its ``analysis.json``
holds mAP and each class's average precision (:func:`write_class_ap`).

Only PIL (a dependency of torchvision) draws the PNG: no plotting library is needed.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from utils.distributed import all_gather_object, rank_and_world_size
from utils.file_io import atomic_publish, atomic_write_text

logger = logging.getLogger(__name__)

# The PNG shows every class up to this many; beyond, the TOP_N_PNG classes with the most errors.
MAX_PNG_CLASSES = 100
TOP_N_PNG = 50
# Pairs listed under "most_confused".
MOST_CONFUSED = 20
# Class names longer than this are cut in the PNG.
PNG_LABEL_CHARS = 24


def top_k(logits: torch.Tensor, k: int = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely classes of each row and their softmax probabilities (float32).

    The probability is ``exp(logit - logsumexp(logits))``: --eval, ``predict`` and the analysis
    compute it the same way, so their numbers agree to the bit.

    Args:
        logits: (B, C) model output.
        k: Classes kept per row (at most C).

    Returns:
        ``(classes (B, k) int64, probabilities (B, k) float32)``, most likely first.
    """
    logits = logits.float()
    top_logits, classes = logits.topk(min(k, logits.shape[1]), dim=1)  # (B, k) each
    return classes, (top_logits - logits.logsumexp(dim=1, keepdim=True)).exp()


@dataclass
class Predictions:
    """Every evaluated image's label and top-k, in the validation set's sample order.

    Args:
        targets: (N,) labels.
        classes: (N, k) predicted classes, most likely first.
        probabilities: (N, k) their probabilities.
        paths: The image of each row (a path, or a shard member's name); None for generated data.
    """

    targets: np.ndarray
    classes: np.ndarray
    probabilities: np.ndarray
    paths: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.targets)


def _rank_rows(collected: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not collected:
        return np.zeros(0, np.int64), np.zeros((0, 5), np.int64), np.zeros((0, 5), np.float32)
    targets, classes, probabilities = (torch.cat(parts).cpu().numpy() for parts in zip(*collected))
    return targets, classes, probabilities


def _rank_positions(loader: Any, split: Any) -> Optional[List[int]]:
    """The split positions this rank's validation batches held, in order, without the dropped files."""
    sampler = getattr(loader, "sampler", None)
    if split is None or sampler is None or not hasattr(sampler, "indices"):
        return None
    positions = list(sampler.indices())
    reports = list(getattr(loader, "bad_files", ()))
    if reports:  # an unreadable file was dropped from its batch: "name (reason)"
        positions = [p for p in positions if not any(r.startswith(f"{split.samples[p][0]} (") for r in reports)]
    return positions


def gather_predictions(collected: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], loader: Any,
                       split: Any = None) -> Optional[Predictions]:
    """Every rank's collected rows, in the split's sample order, on rank 0 (None on the others).

    A collective: every rank calls it after the same :func:`engine.evaluate` pass.

    Args:
        collected: This rank's ``collect`` list of :func:`engine.evaluate`.
        loader: The validation loader that pass read (its sampler gives the sample of each row).
        split: The validation split (``Loaders.val_split``), None for generated data.
    """
    targets, classes, probabilities = _rank_rows(collected)
    positions = _rank_positions(loader, split)
    if positions is not None and len(positions) != len(targets):
        logger.warning("the validation pass returned %d images where its sampler lists %d: the analysis "
                       "leaves the image paths out", len(targets), len(positions))
        positions = None
    parts = all_gather_object((positions, targets, classes, probabilities))
    if rank_and_world_size()[0] != 0:
        return None
    if any(part[0] is None for part in parts):
        return Predictions(*(np.concatenate([part[i] for part in parts]) for i in (1, 2, 3)))
    order = np.argsort(np.concatenate([np.asarray(part[0], dtype=np.int64) for part in parts]), kind="stable")
    merged = [np.concatenate([part[i] for part in parts])[order] for i in (1, 2, 3)]
    all_positions = np.concatenate([np.asarray(part[0], dtype=np.int64) for part in parts])[order]
    return Predictions(*merged, paths=[split.samples[p][0] for p in all_positions])


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class.

    Args:
        targets: (N,) labels.
        predicted: (N,) top-1 classes.
        num_classes: C.
    """
    return np.bincount(targets * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes,
                                                                                             num_classes)


def class_statistics(predictions: Predictions, class_names: Sequence[str]) -> Dict[str, Any]:
    """Top-1 / top-5, per-class accuracy, the confusion matrix and the most confused pairs.

    Args:
        predictions: From :func:`gather_predictions`.
        class_names: Names in label order.
    """
    num_classes = len(class_names)
    targets, classes = predictions.targets, predictions.classes
    hits1 = classes[:, 0] == targets
    hits5 = (classes == targets[:, None]).any(axis=1)
    matrix = confusion_matrix(targets, classes[:, 0], num_classes)
    per_class = []
    for label, name in enumerate(class_names):
        mine = targets == label
        count = int(mine.sum())
        wrong = matrix[label].copy()
        wrong[label] = 0
        per_class.append({
            "class": label, "name": name, "count": count,
            "top1": 100.0 * float(hits1[mine].mean()) if count else None,
            "top5": 100.0 * float(hits5[mine].mean()) if count else None,
            "most_predicted_instead": class_names[int(wrong.argmax())] if wrong.any() else None,
        })
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    flat = np.argsort(-off_diagonal, axis=None, kind="stable")[:MOST_CONFUSED]
    pairs = []
    for index in flat:
        true, predicted = divmod(int(index), num_classes)
        if off_diagonal[true, predicted] == 0:
            break
        pairs.append({"true": class_names[true], "predicted": class_names[predicted],
                      "count": int(off_diagonal[true, predicted]),
                      "share_of_true": float(off_diagonal[true, predicted] / matrix[true].sum())})
    return {"count": len(targets), "top1": 100.0 * float(hits1.mean()) if len(targets) else float("nan"),
            "top5": 100.0 * float(hits5.mean()) if len(targets) else float("nan"),
            "per_class": per_class, "most_confused": pairs, "confusion_matrix": matrix.tolist()}


def png_classes(matrix: np.ndarray) -> List[int]:
    """The classes the PNG shows: all up to ``MAX_PNG_CLASSES``, else the ``TOP_N_PNG`` with the most
    errors (wrong predictions of the class plus wrong predictions as the class), in label order."""
    num_classes = len(matrix)
    if num_classes <= MAX_PNG_CLASSES:
        return list(range(num_classes))
    off_diagonal = matrix - np.diag(np.diag(matrix))
    errors = off_diagonal.sum(axis=0) + off_diagonal.sum(axis=1)
    return sorted(np.argsort(-errors, kind="stable")[:TOP_N_PNG].tolist())


def _shade(share: float) -> Tuple[int, int, int]:
    """White (0) to dark blue (1), as matplotlib's "Blues"."""
    low, high = np.array([247, 251, 255]), np.array([8, 48, 107])
    return tuple(int(round(v)) for v in low + (high - low) * min(max(share, 0.0), 1.0))


def render_confusion_png(matrix: np.ndarray, class_names: Sequence[str], path: str) -> Dict[str, Any]:
    """Draw the confusion matrix, each row shaded by its share of the true class, as a PNG.

    Args:
        matrix: (C, C) counts from :func:`confusion_matrix`.
        class_names: Names in label order.
        path: The PNG to write (atomically).

    Returns:
        The layout: ``classes`` shown (labels, in order), ``cell_px``, ``origin`` (x, y of the
        top-left cell), ``size`` (width, height) of the image.
    """
    from PIL import Image, ImageDraw, ImageFont

    shown = png_classes(matrix)
    n = len(shown)
    cell = max(12, min(40, 900 // max(n, 1)))
    font = ImageFont.load_default(size=max(8, min(cell - 2, 14)))
    labels = [class_names[c][:PNG_LABEL_CHARS] for c in shown]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_px = int(max(probe.textlength(label, font=font) for label in labels)) + 8
    title_px, pad = 40, 10
    origin = (pad + 16 + label_px, title_px + label_px)
    size = (origin[0] + n * cell + pad, origin[1] + n * cell + pad)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    subset = "all classes" if n == len(matrix) else f"the {n} of {len(matrix)} classes with the most errors"
    draw.text((pad, 4), f"confusion matrix, {subset}", fill="black", font=font)
    draw.text((pad, 20), "rows: true class, columns: predicted; shade: share of the row", fill="black", font=font)
    rows = matrix[np.ix_(shown, shown)]
    totals = matrix[shown].sum(axis=1)  # of the whole row, also the classes not shown
    for i, label in enumerate(labels):
        y = origin[1] + i * cell
        draw.text((origin[0] - 4, y + cell / 2), label, fill="black", font=font, anchor="rm")
        column = Image.new("RGB", (label_px, cell), "white")  # drawn horizontally, turned upright
        ImageDraw.Draw(column).text((4, cell / 2), label, fill="black", font=font, anchor="lm")
        image.paste(column.rotate(90, expand=True), (origin[0] + i * cell, title_px))
        for j in range(n):
            share = rows[i, j] / totals[i] if totals[i] else 0.0
            x = origin[0] + j * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_shade(share), outline=(220, 220, 220))
            if cell >= 28 and rows[i, j]:
                draw.text((x + cell / 2, y + cell / 2), str(int(rows[i, j])), font=font, anchor="mm",
                          fill="white" if share > 0.5 else "black")
    atomic_publish(path, lambda tmp: image.save(tmp, format="PNG"))
    return {"file": os.path.basename(path), "classes": [class_names[c] for c in shown], "cell_px": cell,
            "origin": list(origin), "size": list(size)}


def write_analysis(directory: str, predictions: Predictions, class_names: Sequence[str],
                   real_labels: Optional[Sequence[Sequence[int]]] = None) -> Dict[str, Any]:
    """Write ``analysis.json``, ``confusion.png`` and (for images from files) ``predictions.csv``.

    Args:
        directory: Created if missing.
        predictions: From :func:`gather_predictions`.
        class_names: Names in label order (one per class of the model).
        real_labels: The ReaL classes of each row (:func:`data.testsets.real_labels_of`), or None.

    Returns:
        The summary: ``top1``, ``top5``, ``count`` (and ``real_top1``, ``real_count``), ``directory``.
    """
    from data.testsets import real_top1

    names = list(class_names)
    os.makedirs(directory, exist_ok=True)
    stats = class_statistics(predictions, names)
    summary: Dict[str, Any] = {"top1": stats["top1"], "top5": stats["top5"], "count": stats["count"]}
    if real_labels is not None:
        summary["real_top1"], summary["real_count"] = real_top1(predictions.classes[:, 0].tolist(), real_labels)
    png = render_confusion_png(np.asarray(stats["confusion_matrix"]), names, os.path.join(directory, "confusion.png"))
    atomic_write_text(json.dumps({**summary, "classes": names, "confusion_png": png, **stats}) + "\n",
                      os.path.join(directory, "analysis.json"))
    if predictions.paths is not None:
        atomic_publish(os.path.join(directory, "predictions.csv"),
                       lambda tmp: _write_predictions_csv(tmp, predictions, names))
    summary["directory"] = directory
    return summary


def _write_predictions_csv(path: str, predictions: Predictions, names: Sequence[str]) -> None:
    k = predictions.classes.shape[1]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "label_name"] + [f"{what}_{i + 1}" for i in range(k)
                                                           for what in ("class", "name", "prob")])
        for path_, target, classes, probabilities in zip(predictions.paths, predictions.targets, predictions.classes,
                                                         predictions.probabilities):
            top = [value for c, p in zip(classes, probabilities) for value in (int(c), names[c], f"{p:.6g}")]
            writer.writerow([path_, int(target), names[target], *top])


def write_class_ap(directory: str, stats: Dict[str, Any], class_names: Sequence[str]) -> Dict[str, Any]:
    """Write a multi-label pass's ``analysis.json``: mAP, count and each class's AP (%), lowest first.

    Args:
        directory: Created if missing.
        stats: :func:`engine.evaluate_multilabel`'s result.
        class_names: Names in label order.

    Returns:
        The summary: ``map``, ``count``, ``directory``.
    """
    os.makedirs(directory, exist_ok=True)
    rows = [{"class": name, "ap": None if np.isnan(ap) else ap} for name, ap in zip(class_names, stats["class_ap"])]
    rows.sort(key=lambda row: (row["ap"] is None, row["ap"] if row["ap"] is not None else 0.0))
    summary: Dict[str, Any] = {"map": stats["map"], "count": stats["count"]}
    atomic_write_text(json.dumps({**summary, "classes": list(class_names), "per_class_ap": rows}) + "\n",
                      os.path.join(directory, "analysis.json"))
    summary["directory"] = directory
    return summary


def analyze_pass(collected: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], loaders: Any, config: Any,
                 directory: str) -> Optional[Dict[str, Any]]:
    """Gather one :func:`engine.evaluate` pass's rows and write its analysis into ``directory`` (rank 0).

    A collective. With ``DATA.REAL_LABELS`` the summary also holds ReaL top-1.

    Args:
        collected: This rank's ``collect`` list of the pass.
        loaders: The run's ``data.Loaders`` (validation loader, split, class names and count).
        config: Reads ``DATA.REAL_LABELS``.
        directory: Where the files go.

    Returns:
        :func:`write_analysis`'s summary on rank 0, None on the other ranks.
    """
    predictions = gather_predictions(collected, loaders.val, loaders.val_split)
    if predictions is None:
        return None
    real = None
    if config.DATA.REAL_LABELS:
        from data.testsets import load_real_labels, real_labels_of

        if predictions.paths is None:
            raise ValueError("DATA.REAL_LABELS needs the file of every val image, but the validation pass lost "
                             "their order (see the warning above); drop DATA.REAL_LABELS")
        real = real_labels_of(predictions.paths, load_real_labels(config.DATA.REAL_LABELS))
    names = loaders.class_names or [str(label) for label in range(loaders.num_classes)]  # generated data: indices
    summary = write_analysis(directory, predictions, names, real)
    logger.info("per-class accuracy, confusion matrix and most confused pairs: %s/analysis.json, confusion.png%s",
                directory, ", predictions.csv" if predictions.paths is not None else "")
    return summary
