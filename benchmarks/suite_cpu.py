"""Where the test suite's time goes: CPU seconds per test, of the test process and of the processes it started.

Run the suite with this plugin, then summarise (from the repository root)::

    SUITE_CPU_DIR=/tmp/suite_cpu python -m pytest -q -n auto -p benchmarks.suite_cpu tests
    python -m benchmarks.suite_cpu /tmp/suite_cpu

Around each test the plugin reads ``resource.getrusage`` of the test process (``RUSAGE_SELF``) and
of its finished children (``RUSAGE_CHILDREN``: a ``torchrun`` counts once it has exited, with its
workers), and appends one JSON line per test to ``SUITE_CPU_DIR/<worker>.jsonl`` (one file per
pytest-xdist worker). Processes a test leaves running, or kills before they are waited for, are not
counted. The summary prints the totals, the files and the tests by CPU seconds.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest


def _cpu_seconds() -> Tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Iterator[None]:
    """Record one test's CPU seconds (setup, call and teardown) when ``SUITE_CPU_DIR`` is set."""
    directory = os.environ.get("SUITE_CPU_DIR")
    own, children, wall = *_cpu_seconds(), time.monotonic()
    yield
    if not directory:
        return
    own_after, children_after = _cpu_seconds()
    os.makedirs(directory, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(directory, f"{worker}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"test": item.nodeid, "self": own_after - own, "children": children_after - children,
                            "wall": time.monotonic() - wall}) + "\n")


def summarize(directory: Path, top: int) -> str:
    """The totals, the files and the ``top`` tests by CPU seconds, as text.

    Args:
        directory: ``SUITE_CPU_DIR`` of a run.
        top: How many tests and files to list.
    """
    rows: List[Dict[str, float]] = [json.loads(line) for path in sorted(directory.glob("*.jsonl"))
                                    for line in path.read_text(encoding="utf-8").splitlines()]
    own, children = sum(r["self"] for r in rows), sum(r["children"] for r in rows)
    lines = [f"{len(rows)} tests: {own + children:.0f} CPU s ({own:.0f} in the test processes, {children:.0f} in "
             f"their children), {sum(r['wall'] for r in rows):.0f} s of test time"]
    files: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        entry = files[str(r["test"]).split("::")[0]]
        entry[0] += r["self"] + r["children"]
        entry[1] += r["wall"]
    lines.append("\nCPU s   wall s  file")
    for name, (cpu, wall) in sorted(files.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{cpu:6.1f}  {wall:6.1f}  {name}")
    lines.append("\nCPU s   of it children  test")
    for r in sorted(rows, key=lambda r: -(r["self"] + r["children"]))[:top]:
        lines.append(f"{r['self'] + r['children']:6.1f}  {r['children']:6.1f}          {r['test']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="SUITE_CPU_DIR of a run with -p benchmarks.suite_cpu")
    parser.add_argument("--top", type=int, default=20, help="tests and files to list")
    args = parser.parse_args()
    print(summarize(args.directory, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
