"""Multi-label validation metrics: per-class average precision and mAP, in float64."""
from __future__ import annotations

import torch


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each class's average precision over the samples, NaN for a class without positives.

    AP = sum over distinct score thresholds t (descending) of (recall(t) - recall(previous t)) x precision(t),
    with ``score >= t`` predicted positive (scikit-learn's ``average_precision_score``): tied samples
    are one step, so the value does not depend on how ties are ordered. Equivalently, the mean over
    the positives of the precision at their score.

    Args:
        scores: ``(N, C)`` scores (logits or probabilities: only their order counts).
        targets: ``(N, C)`` multi-hot targets (> 0.5 is a positive).

    Returns:
        ``(C,)`` float64.
    """
    scores, positives = scores.double(), (targets > 0.5).double()  # (N, C) each
    order = scores.argsort(dim=0, descending=True)
    sorted_scores, sorted_positives = scores.gather(0, order), positives.gather(0, order)  # (N, C)
    true_positives = sorted_positives.cumsum(dim=0)  # (N, C): positives among the top n + 1
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64, device=scores.device).unsqueeze(1)  # (N, 1)
    # The last row of each run of equal scores closes its threshold step: its precision holds for the run.
    last_of_tie = torch.ones_like(sorted_positives, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    precision = true_positives / ranks  # (N, C)
    # The run's precision for each row: the precision at the run's last row, found by a reverse cumulative min
    # over the index of that row.
    n = scores.shape[0]
    run_end = torch.where(last_of_tie, torch.arange(n, device=scores.device).unsqueeze(1), n)  # (N, C)
    run_end = run_end.flip(0).cummin(dim=0).values.flip(0)
    precision_at_score = precision.gather(0, run_end)  # (N, C)
    num_positives = positives.sum(dim=0)  # (C,)
    ap = (precision_at_score * sorted_positives).sum(dim=0) / num_positives
    return torch.where(num_positives > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(class_ap: torch.Tensor) -> float:
    """mAP: the mean of :func:`average_precision`'s values over the classes with a positive (NaN if none).

    Args:
        class_ap: ``(C,)`` per-class APs, NaN for a class without positives.
    """
    present = ~torch.isnan(class_ap)
    return class_ap[present].mean().item() if bool(present.any()) else float("nan")
