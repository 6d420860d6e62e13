"""Run records on rank 0: TensorBoard scalars and ``metrics.jsonl`` (one JSON object per epoch)."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class RunRecorder:
    """Writes scalars to TensorBoard and epoch rows to ``metrics.jsonl``; a no-op off rank 0.

    Args:
        output_dir: The run directory.
        enabled: False on every rank but 0.
        resume_epoch: When resuming, rows of this epoch and later are dropped from
            ``metrics.jsonl`` (they are about to be recomputed).
        resume_step: When resuming, the global step of the checkpoint: TensorBoard events after it
            are purged (those at it were logged before the checkpoint was written, or are the
            epoch's points recorded right after it, and the resumed run does not log them again).
    """

    def __init__(self, output_dir: str, enabled: bool, resume_epoch: Optional[int] = None,
                 resume_step: Optional[int] = None) -> None:
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.tb = None
        if not enabled:
            return
        if resume_epoch is not None:
            self._truncate(resume_epoch)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at run time
            logger.warning("tensorboard is not installed; scalars go to %s only", self.path)
            return
        # SummaryWriter purges events at purge_step and later.
        purge_step = resume_step + 1 if resume_step is not None else None
        self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge_step)

    def _truncate(self, epoch: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "r", encoding="utf-8") as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("epoch", -1) < epoch]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(rows)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        """Add scalars at ``step`` to TensorBoard.

        Args:
            step: Global optimizer step.
            values: ``{"train/loss": 2.3, ...}``.
        """
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Add a note to TensorBoard's text tab at ``step`` (e.g. the settings changed on resume).

        Args:
            tag: The text's name.
            text: The note.
            step: Global optimizer step.
        """
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
            self.tb.flush()

    def epoch(self, row: Dict[str, Any], step: int) -> None:
        """Append one epoch's row to ``metrics.jsonl`` and its numbers to TensorBoard.

        Args:
            row: Must hold ``epoch``; numbers are also written as ``epoch/<name>`` scalars.
            step: Global optimizer step at the end of the epoch.
        """
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.scalars(step, {f"epoch/{k}": float(v) for k, v in clean.items()
                            if isinstance(v, (int, float)) and k != "epoch"})
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.tb is not None:
            self.tb.close()
