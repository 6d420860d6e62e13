"""What a check returns and how the run is written down: ``gpu_check.json`` and ``gpu_check.md``.

A correctness check gives :class:`Result` rows (pass / fail / skip, the measured value, the bound);
a speed measurement gives :class:`SpeedRow` rows (ours, the official formulation, their ratio).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class Result:
    """One correctness row.

    Args:
        name: ``group/what``, e.g. ``models/crossformerpp_s/224/bf16/grads``.
        status: ``pass``, ``fail`` or ``skip``.
        value: What was measured (a number or a short text).
        bound: The rule it is held to, as text (e.g. ``<= 1e-4``).
        detail: Why it failed or was skipped, or what else was seen.
    """

    name: str
    status: str
    value: Any = None
    bound: str = ""
    detail: str = ""


def check(name: str, ok: bool, value: Any, bound: str, detail: str = "") -> Result:
    """A pass / fail row: ``ok`` decides; a NaN value always fails."""
    if isinstance(value, float) and math.isnan(value):
        ok = False
    return Result(name, PASS if ok else FAIL, value, bound, detail)


def skipped(name: str, why: str) -> Result:
    """A row for a check that cannot run here, named so that the report shows what was not proven."""
    return Result(name, SKIP, None, "", why)


@dataclass
class SpeedRow:
    """One measured row: ours against the official formulation (or a second loader).

    Args:
        name: ``group/what``, e.g. ``speed/crossformerpp_s/bf16/infer``.
        unit: ``img/s`` or ``MiB``.
        ours: Our value.
        official: The official formulation's (or the other loader's) value, None when there is none.
        ratio: ``ours / official`` (median of per-trial ratios where trials alternate), None without one.
        detail: Batch, sizes, paper numbers and the like.
    """

    name: str
    unit: str
    ours: Optional[float]
    official: Optional[float] = None
    ratio: Optional[float] = None
    detail: str = ""


@dataclass
class GroupTiming:
    """Seconds a group of checks took against the budget stated for it."""

    group: str
    seconds: float
    budget_s: float


@dataclass
class Report:
    """Everything one run found; written by :meth:`write` (after every group: ``pending`` names those still to run,
    so that a report left by a run stopped at its time limit says it is incomplete)."""

    device: str
    quick: bool
    environment: Dict[str, str]
    results: List[Result] = field(default_factory=list)
    speed: List[SpeedRow] = field(default_factory=list)
    timings: List[GroupTiming] = field(default_factory=list)
    pending: List[str] = field(default_factory=list)

    @property
    def failed(self) -> List[Result]:
        """The rows that failed."""
        return [r for r in self.results if r.status == FAIL]

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (``gpu_check.json``)."""
        return {"device": self.device, "quick": self.quick, "environment": self.environment,
                "passed": not self.failed and not self.pending, "pending": self.pending,
                "results": [asdict(r) for r in self.results],
                "speed": [asdict(r) for r in self.speed], "timings": [asdict(t) for t in self.timings],
                "total_seconds": sum(t.seconds for t in self.timings)}

    def markdown(self) -> str:
        """The short table (``gpu_check.md``): checks, then speed rows, then time per group."""
        verdict = 'PASSED' if not self.failed else f'FAILED: {len(self.failed)} check(s)'
        if self.pending:
            verdict = f"INCOMPLETE, not run: {', '.join(self.pending)}" + (f"; {verdict}" if self.failed else "")
        lines = [f"# GPU check on {self.device}{' (--quick)' if self.quick else ''}", "",
                 ", ".join(f"{k} {v}" for k, v in self.environment.items()), "",
                 f"**{verdict}**", "",
                 "| check | result | measured | bound | detail |", "|---|---|---|---|---|"]
        for r in self.results:
            lines.append(f"| {r.name} | {r.status} | {_fmt(r.value)} | {r.bound} | {_cell(r.detail)} |")
        if self.speed:
            lines += ["", "| measurement | unit | ours | official | ratio | detail |", "|---|---|---|---|---|---|"]
            for s in self.speed:
                lines.append(f"| {s.name} | {s.unit} | {_fmt(s.ours)} | {_fmt(s.official)} | "
                             f"{_fmt(s.ratio, ratio=True)} | {_cell(s.detail)} |")
        lines += ["", "| group | seconds | budget (s) |", "|---|---|---|"]
        lines += [f"| {t.group} | {t.seconds:.1f} | {t.budget_s:.0f} |" for t in self.timings]
        lines.append(f"| total | {sum(t.seconds for t in self.timings):.1f} | "
                     f"{sum(t.budget_s for t in self.timings):.0f} |")
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        """Write ``gpu_check.json`` and ``gpu_check.md`` into ``out`` (created if missing)."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        (out / "gpu_check.md").write_text(self.markdown())


def _fmt(value: Any, ratio: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if ratio:
            return f"{value:.2f}x"
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return _cell(str(value))


def _cell(text: str) -> str:
    """Text that keeps a Markdown table intact (no pipes, one line)."""
    return " ".join(str(text).replace("|", "/").split())
