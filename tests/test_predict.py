"""Using a trained model: ``python -m predict`` against ``--eval`` image by image, the per-class
analysis (JSON, PNG) of ``--eval`` and of the end of training, class names in checkpoints and
exports, ImageNet-V2's class-index folders and ImageNet-ReaL labels."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from data.toy import CLASSES, ToySpec, generate_toy_dataset
from tests.helpers import MODEL_DIR, last_json, run, run_main

# A tiny real CrossFormer++ on an image folder read by the pytorch loader (the demo's set-up).
FOLDER_YAML = """\
DATA:
  DATASET: imagenet
  DATA_PATH: {data}
  LOADER: pytorch
  BATCH_SIZE: 8
  IMG_SIZE: 32
  NUM_WORKERS: 0
  PIN_MEMORY: False
MODEL:
  NAME: crossformerpp_s
  NUM_CLASSES: {num_classes}
  CROSSFORMER:
    EMBED_DIM: 32
    DEPTHS: [1, 1, 1, 1]
    NUM_HEADS: [1, 2, 4, 8]
TRAIN:
  EPOCHS: 1
  WARMUP_EPOCHS: 0
  AMP: none
  EMA:
    ENABLE: True
    DECAY: 0.9
AUG:
  AUTO_AUGMENT: ""
  REPROB: 0.0
  MIXUP: 0.0
  CUTMIX: 0.0
"""
CORRUPT = "zz_corrupt.jpg"


def write_yaml(directory: Path, data: Path, num_classes: int) -> Path:
    path = directory / "folder.yaml"
    path.write_text(FOLDER_YAML.format(data=data, num_classes=num_classes))
    return path


def read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def predict_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "predict", *args]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """The demo in small: 1 epoch on a generated toy folder (10 classes, 3 val images each plus a
    corrupt one), then ``--eval`` of its best.pth."""
    root = tmp_path_factory.mktemp("toy_run")
    data = root / "data"
    generate_toy_dataset(data, ToySpec(train_per_class=6, val_per_class=3, image_size=32))
    (data / "val" / f"00_{CLASSES[0]}" / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    yaml = write_yaml(root, data, len(CLASSES))
    trained = run_main("--cfg", str(yaml), "--output", str(root / "out"), cwd=root)
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_dir = root / "out" / MODEL_DIR / "default"
    evaluated = run_main("--cfg", str(yaml), "--output", str(root / "out"), "--eval", "--resume",
                         str(run_dir / "best.pth"), cwd=root)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    return {"root": root, "data": data, "yaml": yaml, "run_dir": run_dir, "eval": last_json(evaluated.stdout)}


def test_predict_equals_eval_image_by_image(toy_run: Dict[str, Any]) -> None:
    """predict on the val folder: the same top-5 classes and probabilities as --eval for every image,
    and the corrupt file is one error row."""
    out = toy_run["root"] / "predictions.csv"
    result = run(predict_command("--cfg", str(toy_run["yaml"]), "--pretrained", str(toy_run["run_dir"] / "best.pth"),
                                 str(toy_run["data"] / "val"), "--output", str(out), "--batch-size", "8",
                                 "--workers", "0", "--device", "cpu"), cwd=toy_run["root"])
    assert result.returncode == 0, result.stderr[-2000:]
    predicted = {row["path"]: row for row in read_csv(out)}
    evaluated = read_csv(Path(toy_run["eval"]["analysis_dir"]) / "predictions.csv")
    assert len(evaluated) == toy_run["eval"]["val_count"] == 30
    assert len(predicted) == 31
    errors = [row for row in predicted.values() if row["error"]]
    assert [Path(row["path"]).name for row in errors] == [CORRUPT] and not errors[0]["class_1"]
    correct = 0
    for row in evaluated:
        mine = predicted[row["path"]]
        for i in range(1, 6):
            assert mine[f"class_{i}"] == row[f"class_{i}"] and mine[f"name_{i}"] == row[f"name_{i}"], row["path"]
            assert float(mine[f"prob_{i}"]) == pytest.approx(float(row[f"prob_{i}"]), abs=1e-6)
        correct += mine["name_1"] == Path(row["path"]).parent.name
    assert 100.0 * correct / 30 == pytest.approx(toy_run["eval"]["val_acc1"])


def test_eval_and_training_write_the_analysis_and_png(toy_run: Dict[str, Any]) -> None:
    """analysis.json: per-class counts and accuracy, the confusion matrix, the most confused pairs; the PNG
    has the size of its layout and every cell the shade of its share of the row."""
    from deploy.analysis import _shade

    assert (toy_run["run_dir"] / "analysis" / "best" / "confusion.png").is_file()  # the end of training
    directory = Path(toy_run["eval"]["analysis_dir"])
    assert directory == toy_run["run_dir"] / "analysis" / "eval-best-data"  # weights and data (DATA_PATH .../data)
    analysis = json.loads((directory / "analysis.json").read_text())
    matrix = np.array(analysis["confusion_matrix"])
    assert analysis["classes"] == [f"{i:02d}_{name}" for i, name in enumerate(CLASSES)]
    assert matrix.shape == (10, 10) and matrix.sum(axis=1).tolist() == [3] * 10
    assert analysis["top1"] == pytest.approx(toy_run["eval"]["val_acc1"])
    assert analysis["top1"] == pytest.approx(100.0 * np.trace(matrix) / 30)
    for label, entry in enumerate(analysis["per_class"]):
        assert entry["count"] == 3 and entry["top1"] == pytest.approx(100.0 * matrix[label, label] / 3)
    counts = [pair["count"] for pair in analysis["most_confused"]]
    assert counts == sorted(counts, reverse=True) and sum(counts) <= 30 - np.trace(matrix)
    assert counts[0] == (matrix - np.diag(np.diag(matrix))).max()
    png = analysis["confusion_png"]
    image = Image.open(directory / "confusion.png")
    cell, (x0, y0) = png["cell_px"], png["origin"]
    assert image.format == "PNG" and image.size == tuple(png["size"])
    assert image.size[0] >= x0 + 10 * cell and image.size[1] >= y0 + 10 * cell and max(image.size) < 1200
    for i in range(10):
        for j in range(10):
            assert image.getpixel((x0 + j * cell + 2, y0 + i * cell + 2)) == _shade(matrix[i, j] / 3), (i, j)


def test_end_of_training_analysis_is_evals_without_a_second_pass(toy_run: Dict[str, Any]) -> None:
    """The end of training writes best.pth's analysis from the epoch-end validation that chose it (no
    second pass over the same weights); its files are those of ``--eval --resume best.pth``, byte for byte."""
    best, evaluated = toy_run["run_dir"] / "analysis" / "best", Path(toy_run["eval"]["analysis_dir"])
    for name in ("analysis.json", "predictions.csv", "confusion.png"):
        assert (best / name).read_bytes() == (evaluated / name).read_bytes(), name
    assert json.loads((best / "analysis.json").read_text())["count"] == 30  # the corrupt val file left out
    log = (toy_run["run_dir"] / "log.txt").read_text()
    assert "analysis of best.pth (epoch 0) from its epoch-end validation" in log and "validating best.pth" not in log


def test_confusion_png_of_many_classes_shows_the_most_confused() -> None:
    """More than 100 classes: the PNG shows the 50 classes involved in the most errors."""
    from deploy.analysis import MAX_PNG_CLASSES, TOP_N_PNG, confusion_matrix, png_classes

    num_classes = 150
    targets = np.repeat(np.arange(num_classes), 4)
    predicted = targets.copy()
    confused = list(range(100, 150))
    for label in confused:
        predicted[4 * label] = 100 + (label + 1) % 50  # a ring among 100..149
    shown = png_classes(confusion_matrix(targets, predicted, num_classes))
    assert num_classes > MAX_PNG_CLASSES and len(shown) == TOP_N_PNG
    assert shown == confused  # each of 100..149 is wrong once and predicted wrongly once; the others never


def test_predict_lists_errors_stored_config_and_jsonl(toy_run: Dict[str, Any], tmp_path: Path,
                                                     restore_logging: None) -> None:
    """A .txt list with a corrupt and a missing file: one row each, in input order, as JSON lines; the
    EMA weights of a checkpoint with no --cfg (its stored config)."""
    from predict import main

    val = toy_run["data"] / "val"
    good = sorted((val / f"01_{CLASSES[1]}").iterdir())[:2]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{good[0]}\n{val / f'00_{CLASSES[0]}' / CORRUPT}\n\n# a comment\nmissing.jpg\n{good[1]}\n")
    out = tmp_path / "rows.jsonl"
    assert main(["--pretrained", str(toy_run["run_dir"] / "best.pth"), "--use-ema", str(listing), "--output",
                 str(out), "--top-k", "3", "--workers", "0", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(good[0]), str(val / f"00_{CLASSES[0]}" / CORRUPT),
                                              str(tmp_path / "missing.jpg"), str(good[1])]
    assert "error" in rows[1] and "No such file" in rows[2]["error"]
    for row in (rows[0], rows[3]):
        assert len(row["top"]) == 3 and row["top"][0]["prob"] >= row["top"][1]["prob"] >= row["top"][2]["prob"]
        best = row["top"][0]["class"]
        assert row["top"][0]["name"] == f"{best:02d}_{CLASSES[best]}"


def test_class_names_travel_with_checkpoints_and_exports(toy_run: Dict[str, Any], tmp_path: Path) -> None:
    """Every checkpoint and exported weights file stores the class names (and the config); a .pth
    export still loads as a bare state dict."""
    import models
    from deploy.export import main as export
    from models.stored import read_stored_info

    names = [f"{i:02d}_{name}" for i, name in enumerate(CLASSES)]
    best = toy_run["run_dir"] / "best.pth"
    assert torch.load(best, weights_only=True)["class_names"] == names
    for output in ("w.pth", "w.safetensors"):
        assert export([str(best), str(tmp_path / output), "--ema"]) == 0
        config, stored = read_stored_info(str(tmp_path / output))
        assert stored == names and config["MODEL"]["NAME"] == "crossformerpp_s"
    weights = torch.load(tmp_path / "w.pth", weights_only=True)
    model = models.create_model("crossformerpp_s", num_classes=10, embed_dim=32, depths=[1, 1, 1, 1],
                                num_heads=[1, 2, 4, 8])
    assert weights.keys() == model.state_dict().keys()
    model.load_state_dict(weights)


def _solid_jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (value, 255 - value, (7 * value) % 256)).save(path, quality=90)


def _random_checkpoint(path: Path, num_classes: int) -> None:
    import models

    torch.manual_seed(0)
    model = models.create_model("crossformerpp_s", num_classes=num_classes, embed_dim=32, depths=[1, 1, 1, 1],
                                num_heads=[1, 2, 4, 8])
    torch.save({"model": model.state_dict()}, path)


def test_imagenet_v2_index_folders_get_their_integer_labels(tmp_path: Path) -> None:
    """val/0..11 named by class index, class k holding k+1 images: --eval with DATA.VAL_LAYOUT indices
    labels each image by its folder's value (ImageFolder's string order 0, 1, 10, 11, 2, ... would not).

    Twelve folders, not ten: 0..9 sort the same as strings and as integers."""
    from torchvision.datasets import ImageFolder

    from data.folder import scan_image_folder

    num_classes = 12
    data = tmp_path / "v2"
    names = [f"n{k:08d}" for k in range(num_classes)]  # wnid-like train folders: sorted = index order
    for k, name in enumerate(names):
        _solid_jpeg(data / "train" / name / "0.jpg", 20 * k)
        for n in range(k + 1):
            _solid_jpeg(data / "val" / str(k) / f"{n}.jpg", 20 * k + n)
    string_order = ImageFolder(str(data / "val"))
    assert string_order.class_to_idx["10"] == 2  # what the folder layout alone would label folder 10
    checkpoint = tmp_path / "random.pth"
    _random_checkpoint(checkpoint, num_classes)
    yaml = write_yaml(tmp_path, data, num_classes)
    result = run_main("--cfg", str(yaml), "--output", str(tmp_path / "out"), "--eval", "--pretrained",
                      str(checkpoint), "--opts", "DATA.VAL_LAYOUT", "indices", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    directory = Path(last_json(result.stdout)["analysis_dir"])
    analysis = json.loads((directory / "analysis.json").read_text())
    assert analysis["classes"] == names
    assert np.array(analysis["confusion_matrix"]).sum(axis=1).tolist() == list(range(1, num_classes + 1))
    rows = read_csv(directory / "predictions.csv")
    assert len(rows) == sum(range(1, num_classes + 1))
    assert all(int(row["label"]) == int(Path(row["path"]).parent.name) for row in rows)
    assert all(row["label_name"] == names[int(row["label"])] for row in rows)
    with pytest.raises(ValueError, match="class folders of .* differ"):  # DATA.VAL_LAYOUT names: train's names
        scan_image_folder(data, num_classes)


def test_real_top1_by_hand() -> None:
    """ReaL top-1 counts a prediction in the image's label set; an image with no ReaL label is left out."""
    from data.testsets import real_labels_of, real_top1

    predictions = [1, 2, 3, 0, 4]
    labels = [[1], [0, 2], [], [1, 5], [4]]  # right, right, left out, wrong, right
    assert real_top1(predictions, labels) == (75.0, 4)
    paths = [f"/val/n0/ILSVRC2012_val_{i:08d}.JPEG" for i in (3, 1)]
    assert real_labels_of(paths, [[7], [], [2, 9]]) == [[2, 9], [7]]
    with pytest.raises(ValueError, match="ReaL labels apply to the original val set"):
        real_labels_of(["/val/0/other.jpg"], [[1]])


def test_real_labels_change_the_reported_top1(tmp_path: Path) -> None:
    """--eval with DATA.REAL_LABELS reports the original top-1 and, next to it, ReaL top-1 exactly as
    computed from each image's predicted class and its ReaL label set."""
    from predict import predict
    from deploy.inference import load_trained_model

    num_classes = 4
    data = tmp_path / "imagenet"
    names = [f"n{k:08d}" for k in range(num_classes)]
    for k, name in enumerate(names):
        for n in range(2):
            _solid_jpeg(data / "train" / name / f"{n}.jpg", 60 * k + n)
        for n in range(3):  # ImageNet's val file names, numbered 1..12 across the classes
            _solid_jpeg(data / "val" / name / f"ILSVRC2012_val_{3 * k + n + 1:08d}.JPEG", 60 * k + 20 * n)
    checkpoint = tmp_path / "random.pth"
    _random_checkpoint(checkpoint, num_classes)
    yaml = write_yaml(tmp_path, data, num_classes)
    files = sorted((data / "val").rglob("*.JPEG"))
    trained = load_trained_model(str(checkpoint), str(yaml))
    top1 = {Path(row["path"]).name: row["top"][0]["class"] for row in predict(trained, [str(f) for f in files], 8)}
    real, right, counted, original = [], 0, 0, 0
    for number in range(1, 13):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        prediction, label = top1[name], (number - 1) // 3
        original += prediction == label
        if number % 3 == 0:
            real.append([])  # no ReaL label: left out
        elif number % 3 == 1:
            real.append([prediction, (prediction + 2) % num_classes])  # the prediction is one of them
            right, counted = right + 1, counted + 1
        else:
            real.append([(prediction + 1) % num_classes])  # it is not
            counted += 1
    (tmp_path / "real.json").write_text(json.dumps(real))
    result = run_main("--cfg", str(yaml), "--output", str(tmp_path / "out"), "--eval", "--pretrained",
                      str(checkpoint), "--opts", "DATA.REAL_LABELS", str(tmp_path / "real.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    line = last_json(result.stdout)
    assert line["val_acc1"] == pytest.approx(100.0 * original / 12)
    assert (line["val_real_acc1"], line["val_real_count"]) == (pytest.approx(100.0 * right / counted), 8)
    assert right / counted == 0.5
