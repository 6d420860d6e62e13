"""The recipes of configs/ that go beyond the papers' (DeiT's distillation, DeiT III's BCE + LAMB +
repeated augmentation, a linear probe, a fine-tune with layer decay and a frozen first stage, a
multi-label fine-tune), each trained for a few epochs on the
generated toy images by 2 processes: it learns (the train loss falls, validation rises above chance),
and a run stopped mid-epoch and resumed ends bitwise equal to the uninterrupted one.

Each recipe is its config file as a user runs it, shrunk to a tiny model, 32 px images and an LR for
a few dozen steps; what makes it the recipe (loss, optimizer, sampler, teacher, freeze) is kept.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from data.toy import ToySpec, ensure_toy_dataset
from tests.helpers import assert_same_training_state, main_command, read_metrics, run, run_dir, torchrun_command

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHANCE = 10.0  # % top-1 of 10 classes
# 10 classes x 32 training images / 2 processes / 16 = 10 steps per epoch.
TINY = ["MODEL.NUM_CLASSES", "10", "MODEL.CROSSFORMER.EMBED_DIM", "32", "MODEL.CROSSFORMER.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.CROSSFORMER.NUM_HEADS", "[1, 2, 4, 8]", "DATA.DATASET", "imagenet", "DATA.IMG_SIZE", "32",
        "DATA.BATCH_SIZE", "16", "DATA.LOADER", "pytorch", "DATA.NUM_WORKERS", "0", "DATA.PIN_MEMORY", "False",
        "TRAIN.AMP", "none", "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.LR_REFERENCE_BATCH", "0",
        "PRINT_FREQ", "5", "SAVE_STEPS", "3", "AUG.AUTO_AUGMENT", "", "AUG.SCALE", "[0.8, 1.0]"]
STOP_AT = 13  # mid-epoch 1, between two SAVE_STEPS checkpoints: the resume replays from step 12


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_toy_dataset(tmp_path_factory.mktemp("recipes"), ToySpec(32, 8, 32))


@pytest.fixture(scope="module")
def pretrained(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny crossformerpp_s trained on the toy images in one process (teacher / pretrained weights)."""
    out = tmp_path_factory.mktemp("pretrained")
    argv = ["--cfg", str(CONFIGS / "crossformerpp_s.yaml"), "--data-path", str(toy), "--output", str(out), "--opts",
            *TINY, "TRAIN.EPOCHS", "4", "TRAIN.BASE_LR", "3e-3", "MODEL.DROP_PATH_RATE", "0.0", "AUG.MIXUP", "0.0",
            "AUG.CUTMIX", "0.0", "AUG.REPROB", "0.0", "DATA.BATCH_SIZE", "32"]
    result = run(main_command(*argv), out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    directory = run_dir(out, "default")
    assert max(row["val_acc1"] for row in read_metrics(directory)) > 2 * CHANCE
    return directory / "best.pth"


def _torchrun(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    result = run(torchrun_command(*args), cwd, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def check_recipe(config: str, data: Path, root: Path, opts: List[str], metric: str = "val_acc1",
                 above: float = CHANCE, loss: str = "train_loss") -> List[Dict[str, float]]:
    """Train ``config`` uninterrupted, and stopped at step ``STOP_AT`` then resumed, under 2 processes.

    Returns the uninterrupted run's metrics rows after checking that it learns (``loss`` falls from the
    first epoch to the last, the best ``metric`` is above ``above``) and that the resumed run ends
    bitwise equal to it.
    """
    base = ["--cfg", str(CONFIGS / config), "--data-path", str(data), "--opts", *TINY, *opts]
    _torchrun(base[:4] + ["--output", str(root / "full")] + base[4:], root)
    _torchrun(base[:4] + ["--output", str(root / "cut")] + base[4:] + ["TRAIN.STOP_AFTER_STEPS", str(STOP_AT)], root)
    _torchrun(base[:4] + ["--output", str(root / "cut")] + base[4:], root)
    full, cut = run_dir(root / "full"), run_dir(root / "cut")
    assert "resumed from" in (cut / "log.txt").read_text()
    assert_same_training_state(full / "last.pth", cut / "last.pth")
    rows = [row for row in read_metrics(full) if "train_loss" in row]
    assert len(rows) == 3 and rows[-1][loss] < rows[0][loss], rows
    assert max(row[metric] for row in rows) > above, rows
    return rows


def test_deit_distillation_recipe(toy: Path, pretrained: Path, tmp_path: Path) -> None:
    """configs/crossformerpp_s_distill.yaml, with the tiny pretrained model as the teacher (from our checkpoint)."""
    rows = check_recipe("crossformerpp_s_distill.yaml", toy, tmp_path,
                        ["TRAIN.BASE_LR", "3e-3", "MODEL.DISTILL.TEACHER", "", "MODEL.DISTILL.TEACHER_WEIGHTS",
                         str(pretrained)])
    assert all(row["teacher_ms_per_step"] > 0 for row in rows)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multi-label layout: coloured shapes, each image holding a random subset of the 3 classes."""
    from tests.test_multilabel import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, train=64, val=24, size=32, seed=2)
    return root


def test_multilabel_finetune_recipe(shapes: Path, pretrained: Path, tmp_path: Path) -> None:
    """configs/crossformerpp_s_multilabel.yaml from the tiny pretrained model (a new 3-class head): mAP above chance."""
    from data.multilabel import open_multilabel_splits

    chance = 100 * float(open_multilabel_splits(shapes, 3)[1].targets.mean())  # random scores: AP ~ positive share
    opts = ["MODEL.NUM_CLASSES", "3", "TRAIN.BASE_LR", "2e-3", "DATA.BATCH_SIZE", "8", "MODEL.PRETRAINED",
            str(pretrained)]
    check_recipe("crossformerpp_s_multilabel.yaml", shapes, tmp_path, opts, metric="val_map", above=chance + 10)


def test_deit3_bce_lamb_repeated_augmentation_recipe(toy: Path, tmp_path: Path) -> None:
    """configs/crossformerpp_s_deit3.yaml: BCE on mixup / CutMix targets, LAMB, each image 3 times per epoch."""
    rows = check_recipe("crossformerpp_s_deit3.yaml", toy, tmp_path, ["TRAIN.BASE_LR", "5e-3"])
    log = (run_dir(tmp_path / "full") / "log.txt").read_text()
    assert "INFO lamb (betas (0.9, 0.999), eps 1e-06" in log
    assert rows[0]["train_loss"] < 1.0  # a BCE summed over classes / C, not a cross-entropy


def test_linear_probe_recipe(toy: Path, pretrained: Path, tmp_path: Path) -> None:
    """configs/crossformerpp_s_linear_probe.yaml: a new head on the tiny pretrained model's frozen features."""
    import torch

    start = torch.load(pretrained, weights_only=True)["model"]
    backbone = tmp_path / "backbone.pth"  # the weights without their head: the probe trains a fresh one
    torch.save({name: tensor for name, tensor in start.items() if not name.startswith("head.")}, backbone)
    # Another seed than the pretraining's: the same seed would redraw the head the features grew up with.
    check_recipe("crossformerpp_s_linear_probe.yaml", toy, tmp_path, ["MODEL.PRETRAINED", str(backbone),
                                                                      "TRAIN.BASE_LR", "1e-3", "SEED", "1"])
    end = torch.load(run_dir(tmp_path / "full") / "last.pth", weights_only=True)
    assert end["frozen"]["spec"] == "all-but-head"
    assert all(torch.equal(tensor, start[name]) for name, tensor in end["model"].items() if not name.startswith("head."))


def test_finetune_with_layer_decay_recipe(toy: Path, pretrained: Path, tmp_path: Path) -> None:
    """configs/crossformerpp_s_finetune_layer_decay.yaml: stage 1 frozen, layer-wise LR decay, a fresh head."""
    import torch

    start = torch.load(pretrained, weights_only=True)["model"]
    backbone = tmp_path / "backbone.pth"
    torch.save({name: tensor for name, tensor in start.items() if not name.startswith("head.")}, backbone)
    check_recipe("crossformerpp_s_finetune_layer_decay.yaml", toy, tmp_path,
                 ["MODEL.PRETRAINED", str(backbone), "TRAIN.BASE_LR", "3e-3", "SEED", "1"])
    end = torch.load(run_dir(tmp_path / "full") / "last.pth", weights_only=True)
    assert end["frozen"]["spec"] == "stages-1"
    assert all(torch.equal(tensor, start[name]) for name, tensor in end["model"].items()
               if name.startswith(("patch_embed.", "layers.0.")))
    assert not torch.equal(end["model"]["layers.1.blocks.0.mlp.fc1.weight"], start["layers.1.blocks.0.mlp.fc1.weight"])
