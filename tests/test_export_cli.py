"""``python -m deploy.export`` and ``python -m predict`` as a user runs them: the format follows the
output's suffix, exports get the user's usual permissions, ``predict`` given an ``.onnx`` file says
so in one line, and docs/deploy.md's onnxruntime example (run as written) matches ``predict``.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch
from PIL import Image

from tests.helpers import REPO_ROOT, write_tiny_yaml

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training checkpoint of the tiny 32x32 model (10 named classes, its config stored), its head
    scaled up so that the probabilities are far from uniform."""
    import models
    from config import config_to_dict, load_config

    root = tmp_path_factory.mktemp("export_cli")
    config = config_to_dict(load_config(str(write_tiny_yaml(root)), []))
    torch.manual_seed(0)
    model = models.create_model("crossformerpp_s", num_classes=10, embed_dim=32, depths=[1, 1, 1, 1],
                                num_heads=[1, 2, 4, 8])
    with torch.no_grad():
        model.head.weight.mul_(20)
    path = root / "best.pth"
    torch.save({"format_version": 1, "model": model.state_dict(), "config": config,
                "class_names": [f"n0{i}" for i in range(10)]}, path)
    return path


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _export(*argv: str) -> int:
    from deploy.export import main

    return main(list(argv))


@pytest.fixture(scope="module")
def onnx_file(checkpoint: Path) -> Path:
    """``python -m deploy.export best.pth model.onnx --dynamic-batch`` (no --format), under umask 022."""
    output = checkpoint.parent / "model.onnx"
    previous = os.umask(0o022)
    try:
        assert _export(str(checkpoint), str(output), "--dynamic-batch") == 0
    finally:
        os.umask(previous)
    return output


def test_the_format_follows_the_suffix(checkpoint: Path, onnx_file: Path, tmp_path: Path, umask_022: None,
                                       capsys: pytest.CaptureFixture) -> None:
    """`python -m deploy.export best.pth x.onnx` (no --format) writes ONNX; .pth / .safetensors write
    weights; each file gets the user's usual mode (0644 under umask 022, 0664 under 002)."""
    import onnx

    assert onnx.load(str(onnx_file)).graph.input[0].name == "images"
    assert stat.S_IMODE(onnx_file.stat().st_mode) == 0o644
    assert _export(str(checkpoint), str(tmp_path / "x.safetensors")) == 0
    assert _export(str(checkpoint), str(tmp_path / "x.pth"), "--format", "weights") == 0
    assert "_metadata" not in torch.load(tmp_path / "x.pth", weights_only=True)  # weights, not a checkpoint
    for name in ("x.safetensors", "x.pth"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    os.umask(0o002)
    assert _export(str(checkpoint), str(tmp_path / "y.safetensors")) == 0
    assert stat.S_IMODE((tmp_path / "y.safetensors").stat().st_mode) == 0o664
    capsys.readouterr()


@pytest.mark.parametrize("argv, says", [
    (["x.onnx", "--format", "weights"], "--format weights writes .pth or .safetensors files but the output is"),
    (["x.pth", "--format", "onnx"], "--format onnx writes .onnx files but the output is"),
    (["x.bin"], "ends in none of .pth, .safetensors, .onnx: the format follows the suffix"),
    (["x.pth", "--dynamic-batch"], "apply to ONNX exports (*.onnx), not to"),
])
def test_a_format_the_suffix_contradicts_is_refused(checkpoint: Path, tmp_path: Path, argv: List[str], says: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    output, *options = argv
    with pytest.raises(SystemExit) as exit_info:
        _export(str(checkpoint), str(tmp_path / output), *options)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m deploy.export: error: ") and says in error, error
    assert list(tmp_path.iterdir()) == []


def test_predict_given_an_onnx_file_says_so_in_one_line(onnx_file: Path, toy_folder: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from predict import main as predict

    assert predict(["--pretrained", str(onnx_file), str(toy_folder / "val"), "--workers", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {onnx_file} is an ONNX graph, not PyTorch weights: this command reads a "
                   "training checkpoint or a .pth / .safetensors export; pass the checkpoint the .onnx was exported "
                   "from, or run the .onnx with onnxruntime (docs/deploy.md) [ValueError; rerun with --debug for the "
                   "traceback]"], err


def _doc_example() -> str:
    """The onnxruntime example of docs/deploy.md: its one python block."""
    text = (REPO_ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)
    assert len(blocks) == 1
    return blocks[0]


def test_the_docs_onnxruntime_example_matches_predict(checkpoint: Path, onnx_file: Path, tmp_path: Path,
                                                      toy_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Two photos of other shapes than the model's 32x32 input (one wide, one tall: both the resize and
    the crop's rounding matter): the example's top-1 and probabilities equal predict's on the .pth."""
    from predict import main as predict

    monkeypatch.chdir(tmp_path)
    sources = sorted((toy_folder / "val").rglob("*.jpg"))
    for name, source, shape in (("cat.jpg", sources[0], (61, 45)), ("dog.jpg", sources[-1], (39, 53))):
        Image.open(source).convert("RGB").resize(shape, Image.Resampling.BILINEAR).save(name, quality=92)
    os.symlink(onnx_file, "model.onnx")
    assert predict(["--pretrained", str(checkpoint), "cat.jpg", "dog.jpg", "--top-k", "10", "--output",
                    "predicted.jsonl", "--workers", "0", "--device", "cpu"]) == 0
    predicted: Dict[str, Any] = {}
    for line in Path("predicted.jsonl").read_text().splitlines():
        row = json.loads(line)
        predicted[row["path"]] = {item["class"]: item["prob"] for item in row["top"]}
    capsys.readouterr()

    namespace: Dict[str, Any] = {}
    exec(compile(_doc_example(), str(REPO_ROOT / "docs" / "deploy.md"), "exec"), namespace)  # as written

    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["cat.jpg", "dog.jpg"]
    for path, probabilities in zip(namespace["paths"], namespace["probabilities"]):
        mine = predicted[path]
        assert int(probabilities.argmax()) == max(mine, key=mine.get), path
        assert max(abs(float(probabilities[c]) - p) for c, p in mine.items()) < TOLERANCE, path
        assert max(mine.values()) > 0.3  # a real prediction, not a uniform one
