"""Every command printed in README.md and docs/*.md is checked, and the README's newcomer path is
run at tiny scale, so that a command that drifts (an unknown flag or config key, a missing file
or module) fails here.

Which code is a command: every line of a fenced block tagged ``bash`` (continuation lines joined,
comments dropped, ``&&`` / ``;`` chains and ``for`` loops split into single commands). A
``python`` block is compiled and its imports are executed. An untagged block must hold no
command (tag it ``bash``). Inline code in the prose that starts with a program (``python -m``,
``python main.py``, ``torchrun``, ``./launch.sh``) is checked too, never run; a synopsis there
(``[--flag]``, ``A|B``, ``...``, ``<name>``, an upper-case placeholder) is the form of a command and
is skipped, and a program named alone (``python -m predict``) must exist.

Two levels, docs/testing.md ("The commands of the documentation") says the same:

- **checked** (every command): the program exists (``main.py``, ``launch.sh``, the module of
  ``python -m``), its own argument parser accepts the command line as printed (torchrun's for
  torchrun's options), for ``main.py`` the config builds and validates (``--cfg`` file, ``--opts``
  keys and types), and every file it names exists in the repository, is made by an earlier
  command of the docs (a run directory ``OUTPUT/MODEL.NAME/TAG/`` of a training command, an
  export, ``mkdir`` / ``ln``), or is in :data:`USER_FILES` (what the user brings: data, downloaded
  weights, their photos).
- **run** (the commands in :data:`RUN`): executed as printed in a scratch directory that holds
  :data:`STAND_INS` for the user's files, with the tiny ``--opts`` of its entry appended and the
  tokens of :data:`SUBSTITUTIONS` replaced (GPU-only flags, ImageNet paths, released weights).
  Every other command needs a reason in :data:`NOT_RUN` (GPU-only, ImageNet-scale data, a
  benchmark of minutes, a download, a cluster): a command in neither table fails the test.

To add a command to the docs: write it in a ``bash`` block as the user types it; if it names a new
file the user brings, add it to :data:`USER_FILES`; then either add it to :data:`RUN` (with the
tiny ``--opts`` that make it fast) or make sure a :data:`NOT_RUN` pattern gives it a reason.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from tests.helpers import REPO_ROOT, free_port, run

pytestmark = pytest.mark.slow

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

# The tiny scale of a training command: one short epoch of the demo's model at 32 px on the
# generated folder (10 classes, 120 train / 30 val images), float32, the in-process loader.
TINY_TRAIN = ("TRAIN.EPOCHS 1 TRAIN.WARMUP_EPOCHS 0 DATA.BATCH_SIZE 16 DATA.NUM_WORKERS 0 DATA.LOADER pytorch "
              "DATA.IMG_SIZE 32 TRAIN.AMP none MODEL.CROSSFORMER.EMBED_DIM 32 MODEL.CROSSFORMER.DEPTHS [1,1,2,1] "
              "MODEL.CROSSFORMER.NUM_HEADS [1,2,4,8]").split()

# Commands run at tiny scale: the README's newcomer path. (regex matched against the command as
# printed, whitespace collapsed; --opts appended.) The demo runs first, in a session fixture, and
# its run directory output/crossformerpp_s/demo/ serves every later command that names it.
RUN: List[Tuple[str, List[str]]] = [
    (r"^torchrun --nproc_per_node=2 main\.py --cfg configs/demo\.yaml$", TINY_TRAIN),
    (r"^python main\.py --cfg output/crossformerpp_s/demo/config\.yaml --eval ", []),
    (r"^python -m predict --cfg output/crossformerpp_s/demo/config\.yaml ", []),
    (r"^python -m deploy\.export output/crossformerpp_s/demo/\S+ (?!\S+\.onnx )", []),
    (r"^torchrun --nproc_per_node=2 main\.py --cfg configs/demo\.yaml --data-path my_images --tag mine ", TINY_TRAIN),
    (r"^torchrun --nproc_per_node=2 main\.py --cfg configs/transfer_small\.yaml --data-path my_images ", TINY_TRAIN),
]

# Why a command is only checked: the first pattern that matches gives the reason.
NOT_RUN: List[Tuple[str, str]] = [
    (r"^pip install", "a download (the environment is the one under test)"),
    (r"^python -m pytest", "the suite itself (CI runs it: .ci/run); its paths are checked"),
    (r"^SUITE_CPU_DIR=\S+ python -m pytest", "the suite itself, timed per test (benchmarks/suite_cpu.py)"),
    (r"--cfg configs/demo\.yaml( |$)", "the demo's recipe at full scale: minutes (the tiny runs cover the command)"),
    (r"--nproc_per_node=8|(^| )\./launch\.sh|^srun ", "GPU-only or a cluster: one process per GPU, several nodes"),
    (r"/data/imagenet|imagenet-v2|/data/real\.json", "ImageNet-scale data"),
    (r"/data/planet", "multi-label data of its own layout (run by tests/test_multilabel.py)"),
    (r"^python -m benchmarks\.", "a benchmark or the GPU check: minutes, or a GPU"),
    (r"--throughput", "measures a full-size model: minutes on a CPU"),
    (r"^(mkdir|ln|export) ", "shell set-up of a cluster's files or network"),
    (r"^python -c ", "Python code: compiled and its imports run (the Hub folder it loads: tests/test_hub.py)"),
    (r"^set ", "a shell script for a lent GPU machine: the modules it runs must exist"),
    (r"crossformerpp_s_finetune_layer_decay", "a recipe: trained under 2 processes by tests/test_recipes.py"),
    (r"\.onnx( |$)", "torch.export takes half a minute: an ONNX export runs in tests/test_export_cli.py"),
]

# What the user brings (data folders, downloaded weights, their images): named by the docs, not
# made by any command. Checked commands accept them as they are.
USER_FILES = {
    "/data/imagenet", "/data/flowers", "/data/planet", "/data/imagenetv2-matched-frequency-format-val",
    "/data/real.json", "real.json", "my_images", "photos/", "more.jpg", "list.txt",
    "crossformerpp_s.pth", "crossformerpp_b.pth", "regnety_160.pth",
    "requirements.txt",
}

# What stands in for the user's files in the commands that run: name in the scratch directory ->
# how it is made from (that directory, the generated toy folder). crossformerpp_s.pth, the
# ImageNet weights of the fine-tune, is the demo run's best.pth exported (made by the fixture).
def _link(target: str) -> Callable[[Path, Path], None]:
    return lambda root, toy: (root / target).symlink_to(REPO_ROOT / target)


def _val_images(toy: Path) -> List[Path]:
    return sorted((toy / "val").glob("*/*"))


def _photos(root: Path, toy: Path) -> None:
    (root / "photos").mkdir()
    for image in _val_images(toy)[:2]:
        shutil.copy(image, root / "photos")


STAND_INS: Dict[str, Callable[[Path, Path], None]] = {
    "configs": _link("configs"),
    "main.py": _link("main.py"),
    "launch.sh": _link("launch.sh"),
    "requirements.txt": _link("requirements.txt"),
    "my_images": lambda root, toy: (root / "my_images").symlink_to(toy),
    "photos/": _photos,
    "more.jpg": lambda root, toy: shutil.copy(_val_images(toy)[3], root / "more.jpg"),
    "list.txt": lambda root, toy: (root / "list.txt").write_text("\n".join(map(str, _val_images(toy)[4:6])) + "\n"),
}

# What a command that runs here gets instead of a printed token that needs a GPU or the user's
# data (printed -> here): add a command that names them to RUN with MODEL.NUM_CLASSES 10 in its
# tiny --opts (the generated folder's classes).
SUBSTITUTIONS: Dict[str, str] = {
    "--nproc_per_node=8": "--nproc_per_node=2",  # one process per GPU -> two CPU processes
    "cuda": "cpu",  # --device cuda
    "fp16": "none",  # --amp fp16, TRAIN.AMP fp16: CUDA only
    "/data/imagenet": "my_images",  # ImageNet -> the generated folder
    "/data/flowers": "my_images",
    "crossformerpp_b.pth": "crossformerpp_s.pth",  # released weights -> the demo's (with the tiny architecture)
}

SHELL_WORDS = ("pip", "torchrun", "python", "./launch.sh", "srun", "mkdir", "ln", "export", "for", "set")
TRAINING_FILES = ("config.yaml", "log.txt", "metrics.jsonl", "last.pth", "best.pth", "ema_best.pth", "analysis")


@dataclass
class Command:
    """One command of the docs, as printed."""

    source: str  # file:line
    text: str  # whitespace collapsed
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.source}: {self.text}"


def fenced_blocks(path: Path) -> Iterator[Tuple[str, int, List[str]]]:
    """(language, first line number, lines) of every fenced code block of a markdown file."""
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        if lines[index].startswith("```"):
            language, start = lines[index][3:].strip(), index + 1
            end = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
            yield language, start + 1, lines[start:end]
            index = end
        index += 1


def split_commands(tokens: List[str]) -> List[List[str]]:
    """Shell tokens -> single commands: ``&&``, ``;`` and ``|`` separate, ``for`` loops expand."""
    commands: List[List[str]] = []
    index = 0
    while index < len(tokens):
        if tokens[index] == "for":  # for VAR in A B C ; do BODY ; done
            var = tokens[index + 1]
            do = tokens.index("do", index)
            done = tokens.index("done", do)
            values = [t for t in tokens[index + 3:do] if t != ";"]
            body = tokens[do + 1:done]
            for value in values:
                commands += split_commands([t.replace(f"${var}", value).replace(f"${{{var}}}", value) for t in body])
            index = done + 1
            continue
        end = next((i for i in range(index, len(tokens)) if tokens[i] in ("&&", ";", "|", "||")), len(tokens))
        if tokens[index:end]:
            commands.append(tokens[index:end])
        index = end + 1
    return commands


def logical_lines(start: int, lines: List[str]) -> Iterator[Tuple[int, List[str]]]:
    """(line number, shell tokens) of each logical line: continuations joined, comments dropped, a
    ``for`` loop kept whole across its lines."""
    pending: List[str] = []
    logical, first = "", start
    for number, line in enumerate(lines, start):
        if not logical and not pending:
            first = number
        logical += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        pending += [*lexer, ";"]
        logical = ""
        if pending[0] != "for" or "done" in pending:
            yield first, pending
            pending = []
    assert not pending and not logical, f"line {first}: an unfinished command"


def block_commands(source: Path, start: int, lines: List[str]) -> List[Command]:
    """The commands of one bash block, each with the line it starts on."""
    out: List[Command] = []
    for first, tokens in logical_lines(start, lines):
        if tokens[0] == "set":  # a shell script on one line: one command, its modules checked
            out.append(Command(f"{source.relative_to(REPO_ROOT)}:{first}", " ".join(tokens), tokens))
            continue
        for argv in split_commands(tokens):
            env = {}
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                name, value = argv.pop(0).split("=", 1)
                env[name] = value
            if argv:
                text = " ".join([*(f"{k}={v}" for k, v in env.items()), *argv])
                out.append(Command(f"{source.relative_to(REPO_ROOT)}:{first}", text, argv, env))
    return out


def all_commands() -> List[Command]:
    """Every command of README.md, then of docs/*.md, in reading order."""
    return [c for path in DOCS for language, start, lines in fenced_blocks(path) if language in ("bash", "sh")
            for c in block_commands(path, start, lines)]


INLINE_PROGRAMS = ("python -m ", "python main.py ", "torchrun ", "./launch.sh ", "NPROC_PER_NODE=")


def is_synopsis(text: str) -> bool:
    """A command's form rather than a command: ``[--flag]``, ``A|B``, ``...``, ``<name>`` or an
    upper-case placeholder such as ``CONFIG`` or ``PATH``."""
    tokens = text.split()
    return (any(mark in text for mark in ("...", "[", "|", "<", "…"))
            or any(re.fullmatch(r"[A-Z][A-Z_0-9]*", token) for token in tokens)
            or (tokens[:2] == ["python", "-m"] and len(tokens) > 2 and re.search(r"\.[A-Z]", tokens[2]) is not None))


def inline_commands(path: Path) -> List[Command]:
    """The commands in inline code of the prose (`python -m ...` and the like), not synopses."""
    text = path.read_text()
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    out = []
    for match in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(match.group(1).split())
        if span.startswith(INLINE_PROGRAMS) and not is_synopsis(span):
            line = prose.count("\n", 0, match.start()) + 1
            out.extend(block_commands(path, line, [span]))
    return out


COMMANDS = all_commands()
INLINE = [c for path in DOCS for c in inline_commands(path)]


def rule_for(command: Command) -> Tuple[str, Optional[List[str]]]:
    """("run", its tiny --opts), (why it is not run, None), or ("", None) where no table covers it."""
    text = command.text
    if command.argv[0] not in SHELL_WORDS:
        return "a shell utility or another environment's program, not this project's", None
    for pattern, tiny in RUN:
        if re.search(pattern, text):
            return "run", tiny
    for pattern, reason in NOT_RUN:
        if re.search(pattern, text):
            return reason, None
    return "", None


# ----------------------------------------------------------------------------------------------
# checked: the program's own parser, the config, the files


class _Parsed(Exception):
    """What a program's parser made of its command line (raised instead of running the program)."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[None]:
    """Every ``ArgumentParser.parse_args`` (and a direct ``parse_known_args``, whose leftovers the
    program hands on to another) raises :class:`_Parsed` with its result instead of returning."""
    parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside: List[bool] = []

    def stop_parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        inside.append(True)
        try:
            result = parse_args(self, args, namespace)
        finally:
            inside.pop()
        raise _Parsed(result)

    def stop_parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        result = parse_known_args(self, args, namespace)
        if inside:  # parse_args' own call
            return result
        raise _Parsed(result[0])

    argparse.ArgumentParser.parse_args = stop_parse_args  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = stop_parse_known_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
        argparse.ArgumentParser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _last_line(stream: io.StringIO) -> str:
    """argparse's error: the last line of what it wrote."""
    lines = stream.getvalue().strip().splitlines()
    return lines[-1] if lines else ""


def parse_with_module(module: str, args: Sequence[str], what: str) -> argparse.Namespace:
    """``python -m MODULE ARGS`` parsed by the module's own parser, stopping before it runs."""
    assert importlib.util.find_spec(module) is not None, f"{what}: no module {module}"
    # setuptools first, as an import of the programs' dependencies would: otherwise a module that
    # imports the standard library's distutils leaves setuptools' shim asserting in the next one
    importlib.import_module("setuptools")
    err = io.StringIO()
    saved_argv = sys.argv
    sys.argv = [module, *args]
    try:
        with _stop_after_parsing(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as e:
        pytest.fail(f"{what}\n{module} rejects the command line (exit {e.code}): {_last_line(err)}")
    finally:
        sys.argv = saved_argv
    pytest.fail(f"{what}\n{module} did not parse a command line")


class Produced:
    """Files made by earlier commands; a run's config.yaml maps to the config that the run writes there."""

    def __init__(self, scratch: Path) -> None:
        self.files: Dict[str, object] = {}
        self.scratch = scratch

    def add(self, path: str, config: object = None) -> None:
        self.files[os.path.normpath(path)] = config

    def has(self, path: str) -> bool:
        path = os.path.normpath(path)
        return any(path == p or path.startswith(p + os.sep) for p in self.files)

    def stand_in(self, path: str) -> str:
        """An empty file or folder of the scratch directory in place of the user's ``path``, for the
        config's own checks (a teacher's weights file must exist)."""
        out = self.scratch / "user" / path.strip("/")
        if Path(path).suffix:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.touch()
        else:
            out.mkdir(parents=True, exist_ok=True)
        self.add(str(out))
        return str(out)

    def config_file(self, path: str) -> Optional[Path]:
        """The config a run writes to ``path`` (its config.yaml), as a file of the scratch directory."""
        from config import dump_config

        config = self.files.get(os.path.normpath(path))
        if config is None:
            return None
        out = self.scratch / f"config-{len(self.files)}.yaml"
        dump_config(config, str(out))
        return out


# pytest's options (pytest-xdist's included) whose value is the next word: "-n auto" names no path.
PYTEST_OPTIONS_WITH_VALUE = {"-n", "--numprocesses", "--maxprocesses", "--dist", "-k", "-m", "-p", "--durations"}


def require_file(path: str, produced: Produced, what: str) -> None:
    """``path`` exists in the repository, is made by an earlier command, or is the user's."""
    if path in USER_FILES or path.rstrip("/") + "/" in USER_FILES or produced.has(path):
        return
    assert (REPO_ROOT / path).exists(), (f"{what}\nnames {path}: not in the repository, not made by an earlier "
                                         "command of the docs, not in USER_FILES")


def check_main(args: List[str], world_size: int, produced: Produced, what: str) -> None:
    """``main.py ARGS``: parsed, config built and validated, files present; its run directory is recorded."""
    from config import get_config, parse_option

    # The config opens some files itself (a teacher's weights): the user's and the produced ones get stand-ins.
    args = [produced.stand_in(token) if (token in USER_FILES or produced.has(token)) and "/config.yaml" not in token
            and not (REPO_ROOT / token).exists() else token for token in args]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            namespace = parse_option(args)
    except SystemExit as e:
        pytest.fail(f"{what}\nmain.py rejects the command line (exit {e.code}): {_last_line(err)}")
    cfg = namespace.cfg
    if not (REPO_ROOT / cfg).exists():  # a run's config.yaml: the config that run writes
        require_file(cfg, produced, what)
        written = produced.config_file(cfg)
        assert written is not None, f"{what}\n--cfg {cfg} is not a config that an earlier training command writes"
        namespace.cfg = str(written)
    for name in ("resume", "pretrained"):
        if getattr(namespace, name):
            require_file(getattr(namespace, name), produced, what)
    try:
        config = get_config(namespace, world_size)
    except Exception as e:  # noqa: BLE001 - the config's one-line error is the message
        pytest.fail(f"{what}\nits config does not build: {e}")
    for value in (config.DATA.DATA_PATH, config.DATA.REAL_LABELS, config.MODEL.DISTILL.TEACHER_WEIGHTS):
        if value:
            require_file(value, produced, what)
    if not (config.EVAL_MODE or config.THROUGHPUT_MODE):
        run_dir = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
        produced.add(os.path.join(run_dir, "config.yaml"), config)
        for name in TRAINING_FILES[1:]:
            produced.add(os.path.join(run_dir, name))


def main_args_of(command: Command) -> Optional[Tuple[List[str], int]]:
    """(main.py's arguments, processes) when the command runs main.py, else None."""
    argv = list(command.argv)
    if argv[0] == "srun":  # srun [--option=value ...] PROGRAM ...
        argv = argv[next(i for i, t in enumerate(argv[1:], 1) if not t.startswith("-")):]
    if argv[0] == "./launch.sh":
        assert (REPO_ROOT / "launch.sh").exists()
        return argv[1:], int(command.env.get("NPROC_PER_NODE", "8"))
    if argv[0] == "python" and len(argv) > 1 and argv[1] == "main.py":
        return argv[2:], 1
    if argv[0] == "torchrun" or argv[:3] == ["python", "-m", "utils.launch"]:
        torchrun_args = argv[1:] if argv[0] == "torchrun" else argv[3:]
        parsed = parse_with_module("torch.distributed.run", torchrun_args, str(command))
        assert parsed.training_script == "main.py", f"{command}\ntorchrun runs {parsed.training_script}, not main.py"
        return list(parsed.training_script_args), int(str(parsed.nproc_per_node)) \
            if str(parsed.nproc_per_node).isdigit() else 1
    return None


def check(command: Command, produced: Produced) -> None:
    """The checked level of one command (see the module docstring)."""
    argv, what = command.argv, str(command)
    if argv[0] not in SHELL_WORDS:
        return  # a shell utility or another environment's program (cd, git, tar, a venv's pip): not ours
    main_args = main_args_of(command)
    if main_args is not None:
        check_main(main_args[0], main_args[1], produced, what)
    elif argv[0] == "pip":
        if "-r" in argv:
            require_file(argv[argv.index("-r") + 1], produced, what)
    elif argv[0] == "python":
        if argv[1] == "-c":  # Python code: compiled, its imports run
            code = compile(argv[2], what, "exec")
            for statement in argv[2].split(";"):
                if re.match(r"\s*(from \S+ )?import ", statement):
                    exec(statement.strip(), {})  # noqa: S102 - the docs' own import statements
            assert code is not None
            return
        assert argv[1] == "-m", f"{what}\nrun a module with python -m, or main.py"
        if argv[2] == "pytest":  # not parsed in-process: pytest inside pytest; its paths must exist
            args = iter(argv[3:])
            for arg in args:
                if arg in PYTEST_OPTIONS_WITH_VALUE:
                    next(args, None)
                elif not arg.startswith("-"):
                    require_file(arg, produced, what)
            return
        top = argv[2].split(".")[0]
        if not ((REPO_ROOT / top).is_dir() or (REPO_ROOT / f"{top}.py").is_file()):  # pip, venv: not ours
            assert importlib.util.find_spec(argv[2]) is not None, f"{what}\nno module {argv[2]}"
            return
        namespace = parse_with_module(argv[2], argv[3:], what)
        for name in ("cfg", "pretrained", "checkpoint", "src", "paths"):
            values = getattr(namespace, name, None)
            for value in values if isinstance(values, list) else [values] if values else []:
                if not argv[2].startswith("benchmarks."):  # a benchmark makes its own data
                    require_file(str(value), produced, what)
        for name in ("output", "dst", "destination"):
            value = getattr(namespace, name, None)
            if value and value != "-":
                produced.add(str(value))
    elif argv[0] == "set":
        modules = [argv[i + 1] for i in range(1, len(argv) - 1) if argv[i] == "-m" and argv[i - 1].startswith("python")]
        assert modules, f"{what}\na shell script that runs no python -m module"
        for module in modules:
            assert importlib.util.find_spec(module) is not None, f"{what}\nno module {module}"
    elif argv[0] == "mkdir":
        produced.add(argv[-1])
    elif argv[0] == "ln":
        produced.add(argv[-1])


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_untagged_blocks_hold_no_commands(path: Path) -> None:
    """A command in a block without the bash tag would escape this test."""
    for language, start, lines in fenced_blocks(path):
        if language in ("", "text", "console"):
            for offset, line in enumerate(lines):
                assert not line.lstrip().startswith(("pip ", "torchrun ", "python ", "./launch.sh ", "srun ")), (
                    f"{path.name}:{start + offset}: a command in an untagged block: tag the block bash")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_compile_and_import(path: Path) -> None:
    """Python snippets are valid Python whose imports exist."""
    for language, start, lines in fenced_blocks(path):
        if language == "python":
            source = "\n".join(lines)
            compile(source, f"{path.name}:{start}", "exec")
            for line in lines:
                if re.match(r"(from \S+ )?import ", line):
                    exec(line.split("#")[0], {})  # noqa: S102 - the docs' own import lines


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # torchrun's parser, run in-process
@pytest.mark.filterwarnings("ignore:.*found in sys.modules")  # runpy: a benchmark imported by another
def test_every_command_is_checked(tmp_path: Path) -> None:
    """Every command of the docs: its program, parser, config and files (see the module docstring)."""
    assert len(COMMANDS) > 30, "the extraction found too few commands"
    produced = Produced(tmp_path)
    for command in COMMANDS:
        check(command, produced)
        assert rule_for(command)[0], f"{command}\nneither in RUN nor given a reason in NOT_RUN"
    for command in INLINE:  # in the prose: checked, never run
        check_inline(command, produced)


def check_inline(command: Command, produced: Produced) -> None:
    """A program named in the prose (``python -m predict``, ``torchrun --max-restarts``) must exist;
    a command with arguments is checked as a block's command is."""
    argv = command.argv
    if (argv[0] == "torchrun" and "main.py" not in argv) or argv[-1] == "main.py":
        return  # torchrun's own option or main.py under a launcher, named
    if argv[:2] == ["python", "-m"] and len(argv) == 3:
        assert importlib.util.find_spec(argv[2]) is not None, f"{command}\nno module {argv[2]}"
        return
    check(command, produced)


def test_every_table_entry_is_used() -> None:
    """No pattern of RUN or NOT_RUN outlives the command it was written for."""
    texts = [c.text for c in COMMANDS]
    for pattern in [p for p, _ in RUN] + [p for p, _ in NOT_RUN]:
        assert any(re.search(pattern, t) for t in texts), f"{pattern!r} matches no command of the docs"


# ----------------------------------------------------------------------------------------------
# run: the newcomer path at tiny scale


def with_tiny_opts(argv: List[str], tiny: Sequence[str]) -> List[str]:
    """``argv`` with ``tiny`` added to its ``--opts`` (a second ``--opts`` would replace the first)."""
    if not tiny:
        return list(argv)
    if "--opts" not in argv:
        return [*argv, "--opts", *tiny]
    start = argv.index("--opts") + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return [*argv[:end], *tiny, *argv[end:]]


def executable(argv: List[str]) -> List[str]:
    """The argv as this interpreter runs it: ``python`` is sys.executable, ``torchrun`` its module."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return argv


def run_in(workspace: Path, command: Command, tiny: Sequence[str]) -> str:
    """Run one command as printed (plus ``tiny``) in ``workspace``; its output, or the test fails."""
    argv = executable(with_tiny_opts([SUBSTITUTIONS.get(t, t) for t in command.argv], tiny))
    os.environ["PET_MASTER_PORT"] = str(free_port())  # torchrun's --master-port, as its environment gives it
    try:
        result = run(argv, workspace, timeout=300)
    finally:
        del os.environ["PET_MASTER_PORT"]
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command}\nexit {result.returncode}:\n{output[-3000:]}"
    return output


def commands_to_run() -> List[Tuple[Command, List[str]]]:
    return [(c, tiny) for c in COMMANDS for rule, tiny in [rule_for(c)] if rule == "run"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory, toy_folder: Path) -> Path:
    """A user's directory after the quick start: the demo's run (tiny) and the user's own files."""
    root = tmp_path_factory.mktemp("user")
    for make in STAND_INS.values():
        make(root, toy_folder)
    demo = next(c for c, tiny in commands_to_run() if "configs/demo.yaml" in c.text and "--data-path" not in c.text)
    # The demo reads the generated toy set (13,000 images): here the generated folder stands in.
    printed = run_in(root, demo, ["DATA.DATASET", "imagenet", "DATA.DATA_PATH", str(toy_folder), *TINY_TRAIN])
    (root / "demo.log").write_text(printed)
    weights = run(executable(["python", "-m", "deploy.export", "output/crossformerpp_s/demo/best.pth",
                              "crossformerpp_s.pth"]), root)
    assert weights.returncode == 0, weights.stderr
    return root


def test_the_demo_leaves_its_run_directory_where_the_readme_says(workspace: Path) -> None:
    """The quick start's run directory holds what the README's later commands name, and the demo
    ends by printing the README's evaluate command."""
    run_dir = workspace / "output" / "crossformerpp_s" / "demo"
    for name in TRAINING_FILES:
        assert (run_dir / name).exists(), name
    evaluate = next(c.text for c in COMMANDS if c.source.startswith("README") and " --eval --resume " in c.text)
    assert f"evaluate it:     {evaluate}" in (workspace / "demo.log").read_text()


@pytest.mark.parametrize("command,tiny", [pytest.param(c, t, id=c.source) for c, t in commands_to_run()
                                          if not ("configs/demo.yaml" in c.text and "--data-path" not in c.text)])
def test_readme_command_runs(command: Command, tiny: List[str], workspace: Path) -> None:
    """The newcomer's commands, as printed, on the tiny demo run and the generated folder."""
    output = run_in(workspace, command, tiny)
    argv = command.argv
    if argv[:3] == ["python", "-m", "predict"]:  # one row per image named: photos/ (2), more.jpg, list.txt (2)
        rows = (workspace / argv[argv.index("--output") + 1]).read_text().splitlines()
        assert len(rows) == 1 + 5 and all(row.split(",")[-1] == "" for row in rows[1:]), rows
    elif argv[:3] == ["python", "-m", "deploy.export"]:
        assert (workspace / argv[4]).stat().st_size > 0
    elif "--eval" in argv:
        assert '"val_acc1"' in output
    else:  # training: the run directory of its --tag holds a best checkpoint
        assert list(workspace.glob(f"output/*/{argv[argv.index('--tag') + 1]}/best.pth")), output[-2000:]


def test_ci_reads_the_test_command_the_readme_prints() -> None:
    """.ci/run takes the first line of the code block after 'Run the tests:' in README.md."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    start = lines.index("Run the tests:")
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    assert lines[fence + 1] == "pip install -r requirements.txt && python -m pytest -q -n auto tests"
