"""Multi-label data (DATA.FORMAT multilabel): the layout, both loaders' multi-hot targets, mixup, AP / mAP,
validation and a tiny run whose mAP rises above chance."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from config import _C
from data import build_loader, build_mixup
from data.multilabel import open_multilabel_splits
from utils.multilabel import average_precision, mean_average_precision

CPU = torch.device("cpu")
LOADERS = ["pytorch", "dali"]
# Each class is one coloured shape; an image shows a random subset of them.
SHAPES = {"blue-triangle": (40, 60, 230), "green-circle": (30, 200, 60), "red-square": (220, 30, 30)}
CLASSES = sorted(SHAPES)


def draw_shapes(names: Sequence[str], size: int, rng: random.Random) -> Image.Image:
    """A grey ``size`` x ``size`` image with one shape per class in ``names``, each in its own quadrant."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    quadrants = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], len(names))
    half = size // 2
    for name, (qx, qy) in zip(names, quadrants):
        extent = rng.randint(half * 5 // 8, half - 2)
        x0, y0 = qx * half + rng.randint(0, half - extent), qy * half + rng.randint(0, half - extent)
        box = (x0, y0, x0 + extent, y0 + extent)
        colour = SHAPES[name]
        if name == "red-square":
            draw.rectangle(box, fill=colour)
        elif name == "green-circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(x0, y0 + extent), (x0 + extent, y0 + extent), (x0 + extent // 2, y0)], fill=colour)
    return image


def make_shapes_dataset(root: Path, train: int, val: int, size: int = 48,
                        seed: int = 0) -> Dict[str, Dict[str, List[str]]]:
    """The multi-label layout of coloured shapes under ``root``; returns ``{split: {file: classes}}``."""
    rng = random.Random(seed)
    labels: Dict[str, Dict[str, List[str]]] = {}
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        labels[split] = {}
        rows = ["file,labels"]
        for i in range(count):
            names = sorted(name for name in CLASSES if rng.random() < 0.5)
            file = f"{i:04d}.{'png' if i % 5 == 4 else 'jpg'}"
            draw_shapes(names, size, rng).save(root / split / file, quality=95)
            labels[split][file] = names
            rows.append(f"{file},{' '.join(names)}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return labels


def multi_hot(names: Sequence[str]) -> List[float]:
    return [1.0 if name in names else 0.0 for name in CLASSES]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, train=24, val=10)
    return root


def make_config(root: Path, loader: str, **overrides):
    """``root`` as DATA.FORMAT multilabel with 32x32 images, batch 4, one worker, no augmentation noise."""
    cfg = _C.clone()
    cfg.DATA.DATASET, cfg.DATA.FORMAT, cfg.DATA.DATA_PATH = "imagenet", "multilabel", str(root)
    cfg.DATA.LOADER, cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_WORKERS = loader, 32, 4, 1
    cfg.MODEL.NUM_CLASSES = len(CLASSES)
    cfg.TRAIN.LOSS = "bce"
    cfg.AUG.REPROB, cfg.AUG.AUTO_AUGMENT = 0.0, ""
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


# ----------------------------------------------------------------------------- layout


def test_layout_is_read_into_sorted_classes_and_multi_hot_rows(shapes_root: Path) -> None:
    train, val = open_multilabel_splits(shapes_root, len(CLASSES))
    assert train.classes == val.classes == CLASSES and train.multi_label
    labels = {split: dict(line.split(",") for line in (shapes_root / f"{split}.csv").read_text().splitlines()[1:])
              for split in ("train", "val")}
    for split, opened in (("train", train), ("val", val)):
        names = sorted(labels[split])
        assert [Path(path).name for path, _ in opened.samples] == names
        assert {label for _, label in opened.samples} == {-1}
        expected = np.array([multi_hot(labels[split][name].split()) for name in names], dtype=np.float32)
        assert opened.targets.dtype == np.float32 and np.array_equal(opened.targets, expected)


def _copy_layout(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


@pytest.mark.parametrize("change, needle", [
    (lambda root: (root / "val.csv").unlink(), r"label file .*val\.csv is missing"),
    (lambda root: (root / "train.csv").write_text("a.jpg,red-square\n"), r"not the header file,labels"),
    (lambda root: (root / "val.csv").write_text("file,labels\n0000.jpg,purple-star\n"),
     r"val\.csv has classes that no image of train\.csv has: \['purple-star'\]"),
    (lambda root: (root / "val.csv").write_text("file,labels\nnone.jpg,red-square\n"),
     r"1 image\(s\) listed in .*val\.csv are not in .*: \['none\.jpg'\]"),
    (lambda root: (root / "val.csv").write_text("file,labels\n0000.jpg,red-square\n0000.jpg,\n"),
     r"line 3: 0000\.jpg is listed twice"),
    (lambda root: (root / "val.csv").write_text("file,labels\n0000.jpg,a,b\n"), r"line 2: .* is not file,labels"),
    (lambda root: shutil.rmtree(root / "val"), r"split directory .*val is missing"),
])
def test_layout_errors(shapes_root: Path, tmp_path: Path, change, needle: str) -> None:
    root = _copy_layout(shapes_root, tmp_path / "copy")
    change(root)
    with pytest.raises(ValueError, match=needle):
        open_multilabel_splits(root, len(CLASSES))


def test_num_classes_must_match(shapes_root: Path) -> None:
    with pytest.raises(ValueError, match=r"MODEL\.NUM_CLASSES=5 but .*train\.csv has 3 classes; set "
                                         r"MODEL\.NUM_CLASSES 3"):
        open_multilabel_splits(shapes_root, 5)


# ----------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_deliver_multi_hot_targets(shapes_root: Path, loader: str) -> None:
    loaders = build_loader(make_config(shapes_root, loader), CPU)
    assert loaders.multi_label and loaders.num_classes == len(CLASSES)
    train_split, val_split = open_multilabel_splits(shapes_root, len(CLASSES))
    loaders.train.set_epoch(0)
    batches = list(loaders.train)
    assert len(batches) == 24 // 4
    order = [index for batch in loaders.train.sampler for index, _ in batch]
    for images, targets in batches:
        assert images.shape == (4, 3, 32, 32) and targets.shape == (4, len(CLASSES))
        assert targets.dtype == torch.float32 and targets.device == CPU
    # Each training batch carries the rows of the samples the sampler chose, in its order.
    delivered = torch.cat([targets for _, targets in batches])
    assert torch.equal(delivered, torch.from_numpy(train_split.targets[order]))
    val_targets = torch.cat([targets for _, targets in loaders.val])
    assert torch.equal(val_targets, torch.from_numpy(val_split.targets))


def test_a_mid_epoch_resume_gives_the_rest_of_the_epoch_bitwise(shapes_root: Path) -> None:
    cfg = make_config(shapes_root, "pytorch", DATA__NUM_WORKERS=0)
    full, resumed = build_loader(cfg, CPU).train, build_loader(cfg, CPU).train
    full.set_epoch(1)
    resumed.set_epoch(1, start_batch=4)
    expected, rest = list(full)[4:], list(resumed)
    assert len(rest) == len(expected) == 2
    for (images, targets), (images_again, targets_again) in zip(expected, rest):
        assert torch.equal(images, images_again) and torch.equal(targets, targets_again)


@pytest.mark.parametrize("loader", LOADERS)
def test_val_images_equal_the_folder_formats_for_the_same_files(shapes_root: Path, tmp_path: Path,
                                                                loader: str) -> None:
    folder = tmp_path / "folder"
    for split in ("train", "val"):
        shutil.copytree(shapes_root / split, folder / split / "all")  # one class folder: the same file order
    images = {}
    for name, cfg in (("multilabel", make_config(shapes_root, loader)),
                      ("folder", make_config(folder, loader, DATA__FORMAT="folder", MODEL__NUM_CLASSES=1,
                                             TRAIN__LOSS="ce"))):
        images[name] = torch.cat([x for x, _ in build_loader(cfg, CPU).val])
    assert images["multilabel"].shape == (10, 3, 32, 32)
    assert torch.equal(images["multilabel"], images["folder"])


def test_single_label_batches_are_unchanged_by_the_multi_label_path(tmp_path: Path) -> None:
    """A folder split is not multi-label, and its loaders still deliver (B,) int64 labels (DALI's view(-1))."""
    folder = tmp_path / "folder"
    make_shapes_dataset(tmp_path / "ml", train=8, val=4, size=32)
    for split in ("train", "val"):
        shutil.copytree(tmp_path / "ml" / split, folder / split / "all")
    for loader in LOADERS:
        loaders = build_loader(make_config(folder, loader, DATA__FORMAT="folder", MODEL__NUM_CLASSES=1,
                                           TRAIN__LOSS="ce"), CPU)
        assert not loaders.multi_label
        _, labels = next(iter(loaders.val))
        assert labels.shape == (4,) and labels.dtype == torch.int64


# ----------------------------------------------------------------------------- mixup


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_mixes_multi_hot_targets(shapes_root: Path, smoothing: float) -> None:
    mixup = build_mixup(make_config(shapes_root, "pytorch", AUG__MIXUP=0.8, AUG__CUTMIX=0.0,
                                    MODEL__LABEL_SMOOTHING=smoothing))
    targets = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    np.random.seed(0)
    mixed_images, mixed = mixup(images.clone(), targets)
    lam = 1 - float(mixed_images[0, 0, 0, 0]) / 3  # image 0 (all 0) mixed with image 3 (all 3): (1 - lam) * 3
    smoothed = targets * (1 - smoothing) + 0.5 * smoothing
    assert torch.allclose(mixed, lam * smoothed + (1 - lam) * smoothed.flip(0), atol=1e-6)
    assert 0 < lam < 1


# ----------------------------------------------------------------------------- AP / mAP


def brute_force_ap(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Mean over the positives of the precision at their score: of the samples scored at least as high,
    the share that is positive (tied samples all count, whatever their order)."""
    precisions = []
    for score, positive in zip(scores, positives):
        if positive:
            above = [p for s, p in zip(scores, positives) if s >= score]
            precisions.append(sum(above) / len(above))
    return sum(precisions) / len(precisions)


def test_average_precision_against_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    for trial in range(50):
        n, c = int(rng.integers(1, 30)), int(rng.integers(1, 5))
        scores = rng.integers(0, 6, size=(n, c)).astype(np.float32)  # few distinct values: many ties
        if trial % 2:
            scores = rng.standard_normal((n, c)).astype(np.float32)
        targets = (rng.random((n, c)) < 0.4).astype(np.float32)
        ap = average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
        assert ap.dtype == torch.float64
        for k in range(c):
            if targets[:, k].any():
                assert ap[k].item() == pytest.approx(brute_force_ap(scores[:, k].tolist(), targets[:, k] > 0),
                                                     abs=1e-12)
            else:
                assert torch.isnan(ap[k])


def test_map_is_the_mean_over_classes_with_positives() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.7, 0.5], [0.1, 0.2, 0.5], [0.3, 0.9, 0.5]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float32)
    # Class 0: positives ranked 1st and 4th -> (1 + 2/4) / 2; class 1: 1st and 2nd -> 1; class 2: no positive.
    assert mean_average_precision(average_precision(scores, targets)) == pytest.approx(((1 + 2 / 4) / 2 + 1) / 2,
                                                                                      abs=1e-12)
    # All tied: the precision of every positive is the prevalence.
    tied = average_precision(torch.zeros(4, 1), torch.tensor([[1.0], [0.0], [0.0], [1.0]]))
    assert mean_average_precision(tied) == 0.5
    assert np.isnan(mean_average_precision(average_precision(scores, torch.zeros(4, 3))))


def _scores_and_targets() -> Tuple[torch.Tensor, torch.Tensor]:
    """7 samples x 4 classes: coarse scores (ties) and multi-hot targets, one class without positives."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (7, 4), generator=generator).float()
    targets = (torch.rand(7, 4, generator=generator) < 0.5).float()
    targets[:, 3] = 0
    return scores, targets


def test_validation_map_is_exact_over_uneven_rank_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank parts of 5, 2 and 0 images, whose gathered rows give every rank the whole set's mAP exactly.

    ``all_gather_object`` is simulated: each rank's part is recorded, then a last pass receives all of them.
    """
    from training import engine

    scores, targets = _scores_and_targets()
    alone = engine.evaluate(torch.nn.Identity(), [(scores[:4], targets[:4]), (scores[4:], targets[4:])], CPU,
                            multi_label=True)
    assert alone["map"] == pytest.approx(100 * mean_average_precision(average_precision(scores, targets)), abs=1e-12)
    assert alone["class_ap"][3] != alone["class_ap"][3]  # NaN: the class has no positive
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(scores.double(), targets.double()).item()
    assert alone["count"] == 7 and alone["loss"] == pytest.approx(expected_loss, abs=1e-6)
    parts: List = []
    monkeypatch.setattr(engine, "all_gather_object", lambda obj: parts.append(obj) or [obj])
    rank_batches = [[(scores[i:min(i + 2, stop)], targets[i:min(i + 2, stop)]) for i in range(start, stop, 2)]
                    for start, stop in ((0, 5), (5, 7), (7, 7))]
    for batches in rank_batches[:2]:
        engine.evaluate(torch.nn.Identity(), batches, CPU, multi_label=True)
    with pytest.raises(ValueError, match="the validation set is empty"):  # alone, an empty part is an error
        engine.evaluate(torch.nn.Identity(), rank_batches[2], CPU, multi_label=True)
    assert parts[2] is None  # an empty part takes part in the collective with nothing
    monkeypatch.setattr(engine, "all_gather_object", lambda obj: list(parts))
    for batches in rank_batches:
        stats = engine.evaluate(torch.nn.Identity(), batches, CPU, multi_label=True)
        assert stats["map"] == alone["map"] and stats["count"] == 7  # the same on every rank, exactly
        assert stats["loss"] == pytest.approx(alone["loss"], rel=1e-6)


# ----------------------------------------------------------------------------- runs

RUN_YAML = """\
DATA:
  DATASET: imagenet
  FORMAT: multilabel
  LOADER: pytorch
  BATCH_SIZE: 8
  IMG_SIZE: 32
  NUM_WORKERS: 0
MODEL:
  NAME: crossformerpp_s
  NUM_CLASSES: 3
  DROP_PATH_RATE: 0.0
  LABEL_SMOOTHING: 0.0
  CROSSFORMER:
    EMBED_DIM: 32
    DEPTHS: [1, 1, 1, 1]
    NUM_HEADS: [1, 2, 4, 8]
TRAIN:
  EPOCHS: 3
  WARMUP_EPOCHS: 1
  LOSS: bce
  BASE_LR: 2.0e-3
  LR_REFERENCE_BATCH: 0
  AMP: none
AUG:
  AUTO_AUGMENT: ""
  COLOR_JITTER: 0.0
  REPROB: 0.0
  MIXUP: 0.0
  CUTMIX: 0.0
  SCALE: [0.8, 1.0]
PRINT_FREQ: 4
"""


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A larger shapes set for the runs: 48 train and 24 val images of 32 px."""
    root = tmp_path_factory.mktemp("shapes_run")
    make_shapes_dataset(root, train=48, val=24, size=32, seed=1)
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Runs in this process use one thread, as the subprocess runs of the other tests do (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "multilabel.yaml"
    path.write_text(RUN_YAML)
    return path


def test_a_tiny_run_reports_map_above_chance_and_tracks_the_best_map(run_root: Path, tmp_path: Path, capsys,
                                                                     restore_logging: None, one_thread: None) -> None:
    import main
    from tests.helpers import last_json, read_metrics

    yaml_path, out = _run_yaml(tmp_path), tmp_path / "out"
    assert main.main(["--cfg", str(yaml_path), "--data-path", str(run_root), "--output", str(out)]) == 0
    run = out / "crossformerpp_s" / "default"
    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == list(range(3))
    assert all("val_map" in row and "val_loss" in row and "val_acc1" not in row for row in rows)
    best = max(rows, key=lambda row: row["val_map"])
    assert rows[-1]["best_map"] == best["val_map"]
    # Chance: random scores give each class an AP of about its share of positives (about half here).
    val_targets = open_multilabel_splits(run_root, 3)[1].targets
    chance = 100 * val_targets.mean()
    assert best["val_map"] > chance + 20, [row["val_map"] for row in rows]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    # The analysis of best.pth: each class's AP, lowest first.
    analysis = json.loads((run / "analysis" / "best" / "analysis.json").read_text())
    assert analysis["map"] == pytest.approx(best["val_map"], abs=1e-9) and analysis["count"] == 24
    aps = [row["ap"] for row in analysis["per_class_ap"]]
    assert sorted(row["class"] for row in analysis["per_class_ap"]) == CLASSES and aps == sorted(aps)
    assert sum(aps) / 3 == pytest.approx(best["val_map"], abs=1e-9)
    log = (run / "log.txt").read_text()
    assert f"val mAP {rows[0]['val_map']:.3f}" in log and "best mAP" in log
    # --eval of best.pth reports the best epoch's mAP again.
    capsys.readouterr()
    assert main.main(["--cfg", str(yaml_path), "--data-path", str(run_root), "--output", str(out), "--eval",
                      "--resume", str(run / "best.pth")]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["val_map"] == pytest.approx(best["val_map"], abs=1e-9) and result["val_count"] == 24
    assert "val_acc1" not in result and Path(result["analysis_dir"], "analysis.json").is_file()
    # predict: each class's own sigmoid probability, with the class names the checkpoint stores.
    import predict

    predictions = tmp_path / "predictions.jsonl"
    assert predict.main(["--pretrained", str(run / "best.pth"), "--output", str(predictions), "--top-k", "3",
                         str(run_root / "val")]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 24 and all(sorted(entry["name"] for entry in row["top"]) == CLASSES for row in rows)
    assert any(abs(sum(entry["prob"] for entry in row["top"]) - 1) > 0.1 for row in rows)  # not a softmax


@pytest.mark.parametrize("opts, edit, needle", [
    (["TRAIN.LOSS", "ce"], None, r"TRAIN\.LOSS='ce' does not fit DATA\.FORMAT multilabel"),
    (["MODEL.NUM_CLASSES", "4"], None, r"MODEL\.NUM_CLASSES=4 but .*train\.csv has 3 classes"),
    (["TRAIN.BCE_TARGET_THRESH", "0.0"], None, r"TRAIN\.BCE_TARGET_THRESH=0\.0 .*on hard 0/1 targets a threshold "
                                               r"changes nothing"),
    ([], "file,labels\n0000.jpg,red-square purple-star\n", r"val\.csv has classes that no image of train\.csv has"),
])
def test_bad_input_is_one_line_and_writes_nothing(run_root: Path, tmp_path: Path, capsys, restore_logging: None,
                                                  opts, edit, needle: str) -> None:
    import re

    import main

    root = run_root
    if edit is not None:
        root = _copy_layout(run_root, tmp_path / "data")
        (root / "val.csv").write_text(edit)
    out = tmp_path / "out"
    args = ["--cfg", str(_run_yaml(tmp_path)), "--data-path", str(root), "--output", str(out)]
    assert main.main(args + (["--opts", *opts] if opts else [])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(needle, err), err
    assert not out.exists()


def test_a_dali_run_with_mixup_cutmix_and_deit_threshold(run_root: Path, tmp_path: Path, restore_logging: None,
                                                         one_thread: None) -> None:
    """Mixed multi-hot targets through BCE with DeiT III's threshold, on DALI's CPU pipelines."""
    import main
    from tests.helpers import read_metrics

    out = tmp_path / "out"
    assert main.main(["--cfg", str(_run_yaml(tmp_path)), "--data-path", str(run_root), "--output", str(out),
                      "--opts", "DATA.LOADER", "dali", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0",
                      "AUG.MIXUP", "0.8", "AUG.CUTMIX", "1.0", "TRAIN.BCE_TARGET_THRESH", "0.0"]) == 0
    (row,) = read_metrics(out / "crossformerpp_s" / "default")
    assert 0 < row["val_map"] <= 100 and row["train_loss"] > 0 and row["best_map"] == row["val_map"]


def test_predict_gives_a_bce_models_sigmoid_probabilities(shapes_root: Path) -> None:
    from types import SimpleNamespace

    from predict import predict

    logits = torch.tensor([2.0, -1.0, 0.5])

    class Fixed(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return logits.expand(images.shape[0], 3)

    config = make_config(shapes_root, "pytorch", DATA__NUM_WORKERS=0)
    paths = [str(path) for path in sorted((shapes_root / "val").iterdir())[:2]]
    for loss, expected in (("bce", logits.sigmoid()), ("ce", logits.softmax(dim=0))):
        config.TRAIN.LOSS = loss
        trained = SimpleNamespace(model=Fixed(), config=config, class_names=CLASSES)
        rows = list(predict(trained, paths, top=2))
        assert [row["path"] for row in rows] == paths
        for row in rows:
            assert [entry["class"] for entry in row["top"]] == [0, 2]
            assert [entry["prob"] for entry in row["top"]] == pytest.approx(expected[[0, 2]].tolist(), abs=1e-6)
