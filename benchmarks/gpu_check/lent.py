"""The GPU proof on the lent machine, whose image has its own torch and cannot download.

The image holds Python 3.12, torch, torchvision, timm (of its own version), numpy, pillow, pytest,
onnx and more, but not yacs or termcolor, and not DALI (whose 190 MiB wheel is more than one
device call can carry: docs/performance.md, "The GPU proof on the lent machine"). Three steps:

- ``python -m benchmarks.gpu_check.lent prepare`` (here): downloads the wheels of the packages in
  :data:`CARRIED` at requirements-base.txt's versions into ``.whl/`` (git-ignored) and prints the
  one device command and its carry list (``--device cpu --quick``: the same command for a rehearsal
  on a CPU).
- ``python3 -m benchmarks.gpu_check.lent wheels .whl --out $OUT`` (there, first): prints the carried
  wheels to install, those whose package the image lacks or holds at another version where the
  version matters, and writes what it decided to ``$OUT/preflight.txt``.
- ``python3 -m benchmarks.gpu_check.lent check --out $OUT`` (there, after installing): torch and
  CUDA, timm's version, and every check group's imports; exit 3 with the reason when one is missing.

Only the standard library is imported before ``check``: ``wheels`` runs before anything is installed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]

# Distributions the lent image may lack, with whether their version must be ours: timm's must (our
# models register and build through its API), any installed yacs, termcolor or tqdm serves.
CARRIED: Dict[str, bool] = {"yacs": False, "termcolor": False, "tqdm": False, "timm": True}

# Check groups in the order they run: the most telling first, so that a run stopped by its time limit
# has them; dali last (skipped at once without DALI).
GROUPS = ("models", "sdpa", "training", "recipes", "speed", "dali")

# Seconds gpu_check may run on the device: the budgets in plan.py add up to 470 s (415 s without DALI's
# rows); a device command may run 600 s, and installing, checking and copying the report take ~15 s.
RUN_LIMIT_S = 540

WHEEL_DIR = ROOT / ".whl"  # git-ignored; the device command names it relative to the repository root
CARRY_LIMIT_MIB = 64  # what one device call carries: the working tree and the carried paths together
MAX_COMMAND_CHARS = 2000


def requirement_pins(path: Path = ROOT / "requirements.txt") -> Dict[str, str]:
    """``name==version`` lines of a requirements file and the files it includes with ``-r``, by lower-case name."""
    pins: Dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            pins.update(requirement_pins(path.parent / line[3:].strip()))
        elif "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def wheel_name_version(wheel: Path) -> Tuple[str, str]:
    """``(distribution, version)`` from a wheel's file name (``timm-1.0.31-py3-none-any.whl``)."""
    name, version = wheel.name.split("-")[:2]
    return name.lower().replace("_", "-"), version


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheels_to_install(wheel_dir: Path) -> Tuple[List[Path], List[str]]:
    """The carried wheels this Python needs, and one line per carried package saying why (or why not)."""
    chosen, lines = [], []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name, version = wheel_name_version(wheel)
        have = installed_version(name)
        if have is None:
            chosen.append(wheel)
            lines.append(f"{name}: not in the image; installing {version}")
        elif have != version and CARRIED.get(name, True):
            chosen.append(wheel)
            lines.append(f"{name}: the image has {have}; installing {version} (ours must be exact)")
        else:
            lines.append(f"{name}: the image's {have} serves")
    return chosen, lines


def _write(out: Optional[Path], lines: List[str]) -> None:
    """Lines to stderr (the device call's output tail) and appended to ``out/preflight.txt``."""
    text = "".join(f"preflight: {line}\n" for line in lines)
    sys.stderr.write(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "preflight.txt", "a") as file:
            file.write(text)


def check_environment(device: str) -> Tuple[List[str], List[str]]:
    """What the proof relies on, after the wheels are installed: ``(problems, lines)``."""
    problems, lines = [], [f"python {sys.version.split()[0]} at {sys.executable}"]
    try:
        import torch
    except ImportError as error:
        return [f"torch does not import: {error}"], lines
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
                 f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    pins = requirement_pins()
    low, high = re.search(r"^torch>=([\d.]+),<=([\d.]+)", (ROOT / "requirements-base.txt").read_text(),
                          re.MULTILINE).groups()
    if not _in_range(torch.__version__, low, high):
        lines.append(f"warning: torch {torch.__version__} is outside the tested range {low} to {high}")
    if device == "cuda":
        if not torch.cuda.is_available():
            problems.append("CUDA is not available to torch: no GPU visible, or a driver older than "
                            f"CUDA {torch.version.cuda} needs")
        else:
            properties = torch.cuda.get_device_properties(0)
            lines.append(f"GPU {properties.name}, capability {properties.major}.{properties.minor}, "
                         f"{properties.total_memory / 2 ** 30:.0f} GiB, {torch.cuda.device_count()} visible")
        compiler = shutil.which("cc") or shutil.which("gcc")
        triton = installed_version("triton")
        lines.append(f"torch.compile (inductor): triton {triton or 'missing'}, C compiler {compiler or 'missing'}")
        if triton is None or compiler is None:
            lines.append("warning: training/*/compiled rows will fail without triton and a C compiler")
    for name in CARRIED:
        have = installed_version(name)
        if have is None:
            problems.append(f"{name} is not installed: the wheel was not carried (.whl/) or not installed")
        elif CARRIED[name] and have != pins[name]:
            problems.append(f"{name} {have} is installed, requirements-base.txt pins {pins[name]}")
        else:
            lines.append(f"{name} {have}")
    dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    lines.append("DALI " + (installed_version("nvidia-dali-cuda130") or "installed") if dali else
                 "DALI not installed: the dali group and the loader/train and e2e/main_py_dali rows are skipped")
    for module in ("model_checks", "training", "recipe_checks", "speed"):  # every group's imports resolve
        try:
            importlib.import_module(f"benchmarks.gpu_check.{module}")
        except ImportError as error:
            problems.append(f"benchmarks.gpu_check.{module} does not import: {error}")
    return problems, lines


def _in_range(version: str, low: str, high: str) -> bool:
    """Whether a torch version (``2.11.0+cu130``) lies in ``[low, high]`` by its release numbers."""
    def key(text: str) -> Tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])

    return key(low) <= key(version) <= key(high)


def device_command(device: str = "cuda", quick: bool = False, run_limit_s: int = RUN_LIMIT_S) -> str:
    """The one device command: install the carried wheels the image needs, check, run, copy the report to $OUT.

    Args:
        device: ``cuda`` on the lent machine; ``cpu`` for a rehearsal here.
        quick: gpu_check's tiny sizes (with ``cpu``: the rehearsal).
        run_limit_s: Seconds gpu_check may run (a rehearsal on 2 busy cores needs more than the GPU run).
    """
    flags = (f" --device {device}" if device != "cuda" else "") + (" --quick" if quick else "")
    return (
        'set -o pipefail; T=${TMPDIR:-/tmp}; S=$T/site; G=$T/gpu_check; '
        'W=$(python3 -m benchmarks.gpu_check.lent wheels .whl --out "$OUT") && '
        '{ [ -z "$W" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade '
        '--target "$S" $W; } && export PYTHONPATH="$S${PYTHONPATH:+:$PYTHONPATH}" && '
        f'python3 -m benchmarks.gpu_check.lent check --device {device} --out "$OUT" && '
        'echo "preflight: ready after $SECONDS s" && '
        f'{{ timeout {run_limit_s} python3 -m benchmarks.gpu_check{flags} --out "$G" --groups {" ".join(GROUPS)} '
        '2>&1 | tee "$OUT/gpu_check.log"; rc=$?; cp "$G/gpu_check.json" "$G/gpu_check.md" "$OUT/"; '
        'echo "gpu_check: exit $rc after $SECONDS s in all"; exit $rc; }')


def download_wheels(wheel_dir: Path) -> List[Path]:
    """The :data:`CARRIED` wheels at requirements-base.txt's versions, for CPython 3.12 (all pure Python)."""
    pins = requirement_pins()
    wheel_dir.mkdir(exist_ok=True)
    for wheel in wheel_dir.glob("*.whl"):  # another version of ours, or a wheel we no longer carry
        name, version = wheel_name_version(wheel)
        if pins.get(name) != version or name not in CARRIED:
            wheel.unlink()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "-d", str(wheel_dir),
                    *(f"{name}=={pins[name]}" for name in CARRIED)], check=True)
    return sorted(wheel_dir.glob("*.whl"))


def tree_bytes() -> int:
    """Bytes of the working tree a device call carries (tracked and untracked files git does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def prepare(wheel_dir: Path, device: str, quick: bool, run_limit_s: int) -> int:
    """Download the wheels, then print the device command and its carry list."""
    wheels = download_wheels(wheel_dir)
    carried = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    command = device_command(device, quick, run_limit_s)
    print(f"wheels in {wheel_dir}: " + ", ".join(w.name for w in wheels))
    print(f"carried: {carried / 2 ** 20:.1f} MiB of wheels + {tree / 2 ** 20:.1f} MiB of working tree "
          f"(limit {CARRY_LIMIT_MIB} MiB); command: {len(command)} characters (limit {MAX_COMMAND_CHARS})")
    if (carried + tree) / 2 ** 20 > CARRY_LIMIT_MIB or len(command) > MAX_COMMAND_CHARS:
        print("error: over a device call's limit", file=sys.stderr)
        return 1
    print(f'carry: ["{wheel_dir.relative_to(ROOT)}"]')
    print(f"timeout_s: 600 (gpu_check itself stops at {run_limit_s} s; the report so far is kept)")
    print("command:")
    print(command)
    return 0


def main(argv: Sequence[str]) -> int:
    """The three steps: ``prepare`` here, ``wheels`` and ``check`` on the lent machine."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.lent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("prepare", help="here: download the wheels, print the device command")
    step.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    step.add_argument("--quick", action="store_true")
    step.add_argument("--run-limit-s", type=int, default=RUN_LIMIT_S, help="seconds gpu_check may run")
    step = steps.add_parser("wheels", help="there: print the carried wheels this Python needs")
    step.add_argument("wheel_dir", type=Path)
    step.add_argument("--out", type=Path)
    step = steps.add_parser("check", help="there, after installing: check what the proof relies on")
    step.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    step.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.step == "prepare":
        return prepare(WHEEL_DIR, args.device, args.quick, args.run_limit_s)
    if args.step == "wheels":
        chosen, lines = wheels_to_install(args.wheel_dir)
        _write(args.out, lines)
        print(" ".join(str(w) for w in chosen))
        return 0
    problems, lines = check_environment(args.device)
    _write(args.out, lines + [f"error: {problem}" for problem in problems])
    return 3 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
