"""Knowledge distillation (``training/distill.py``): the loss against its formulas, the teacher's view of the
batch, teachers from timm names and from our checkpoints, the teacher's identity on resume, bad input."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

import main
from config import get_defaults
from tests.helpers import read_metrics, run_dir, write_tiny_yaml
from training.distill import Distiller, check_teacher_classes
from training.engine import Components, _micro_batch


class _Fixed(nn.Module):
    """A teacher that returns given logits and records what it was given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.seen = []
        self.num_classes = logits.shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append((images.clone(), self.training))
        return self.logits


def _distiller(teacher: nn.Module, kind: str, alpha: float = 0.5, tau: float = 1.0, img_size: int = 8,
               mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> Distiller:
    return Distiller(teacher, kind, alpha, tau, img_size, mean, std, identity={})


def test_soft_and_hard_terms_equal_their_formulas() -> None:
    torch.manual_seed(0)
    student, teacher_logits = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    base = torch.tensor(1.25, dtype=torch.float64)
    images = torch.zeros(4, 3, 8, 8)
    for tau in (1.0, 3.0):
        got = _distiller(_Fixed(teacher_logits), "soft", alpha=0.3, tau=tau)(images, student, base)
        p = torch.softmax(teacher_logits / tau, 1)
        kl = (p * (p.log() - torch.log_softmax(student / tau, 1))).sum(1).mean() * tau * tau
        assert torch.allclose(got.double(), 0.7 * base + 0.3 * kl, atol=1e-6)
    got = _distiller(_Fixed(teacher_logits), "hard", alpha=0.5)(images, student, base)
    hard = -torch.log_softmax(student, 1)[torch.arange(4), teacher_logits.argmax(1)].mean()
    assert torch.allclose(got.double(), 0.5 * base + 0.5 * hard, atol=1e-6)


def test_teacher_sees_the_batch_at_its_size_and_normalisation_in_eval_mode() -> None:
    teacher = _Fixed(torch.zeros(2, 3))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    distiller = _distiller(teacher, "hard", img_size=16, mean=mean, std=std)
    distiller.train()
    raw = torch.rand(2, 3, 8, 8, dtype=torch.float64)  # the images on the 0..1 scale
    student_mean, student_std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), torch.tensor(
        IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    student_input = ((raw - student_mean) / student_std).float()
    distiller(student_input, torch.zeros(2, 3, requires_grad=True), torch.tensor(0.0))
    seen, training = teacher.seen[-1]
    expected = F.interpolate((raw - 0.5) / 0.5, size=(16, 16), mode="bicubic", align_corners=False)
    assert seen.shape == (2, 3, 16, 16) and not training
    assert torch.allclose(seen.double(), expected, atol=1e-5)
    assert distiller.pop_seconds()[1] == 1 and distiller.pop_seconds() == (0.0, 0)


def test_teacher_gets_the_mixed_images_and_no_gradient() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    seen = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    mixed = torch.full((2, 3, 8, 8), 7.0)
    parts = Components(train_model=student, criterion=nn.CrossEntropyLoss(), optimizer=None, scheduler=None,
                       mixup_fn=lambda images, targets: (mixed, targets),
                       distiller=_distiller(teacher, "soft", img_size=8))
    loss = _micro_batch(parts, torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), 1, True, False)
    assert torch.isfinite(loss) and torch.equal(seen[0], mixed)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_teacher_classes_must_be_the_data_classes() -> None:
    config = get_defaults()
    config.MODEL.NUM_CLASSES = 3
    config.MODEL.DISTILL.TEACHER_WEIGHTS = "t.pth"
    check_teacher_classes(3, ["a", "b", "c"], config, ["a", "b", "c"])
    check_teacher_classes(3, None, config, ["a", "b", "c"])
    with pytest.raises(ValueError, match="predicts 5 classes but the data has 3"):
        check_teacher_classes(5, None, config, None)
    with pytest.raises(ValueError, match="class 1 is 'x' for the teacher and 'b' in the data"):
        check_teacher_classes(3, ["a", "x", "c"], config, ["a", "b", "c"])


def _opts(*pairs: str) -> list:
    return ["--opts", "TRAIN.EPOCHS", "2", "PRINT_FREQ", "4", *pairs]


@pytest.fixture(scope="module")
def timm_teacher(tmp_path_factory) -> Path:
    """timm's ``test_resnet`` (160 px, mean / std 0.5) with 10 classes, as a timm user saves it."""
    path = tmp_path_factory.mktemp("teacher") / "test_resnet.pth"
    torch.manual_seed(1)
    torch.save({"state_dict": timm.create_model("test_resnet", num_classes=10).state_dict()}, path)
    return path


def test_timm_teacher_trains_logs_its_cost_and_is_recorded(tmp_path: Path, timm_teacher: Path) -> None:
    cfg, out = write_tiny_yaml(tmp_path), str(tmp_path / "out")
    kd = ["MODEL.DISTILL.TYPE", "hard", "MODEL.DISTILL.TEACHER", "test_resnet", "MODEL.DISTILL.TEACHER_WEIGHTS",
          str(timm_teacher), "MODEL.DISTILL.TEACHER_IMG_SIZE", "64"]
    assert main.main(["--cfg", str(cfg), "--output", out, *_opts(*kd)]) == 0
    directory = run_dir(Path(out))
    log = (directory / "log.txt").read_text()
    assert "distillation (hard, alpha 0.5) from teacher test_resnet (test_resnet.pth" in log and "at 64 px" in log
    assert "normalisation mean (0.5, 0.5, 0.5)" in log and "teacher forward:" in log
    rows = [row for row in read_metrics(directory) if "teacher_ms_per_step" in row]
    assert len(rows) == 2 and all(row["teacher_ms_per_step"] > 0 for row in rows)
    saved = torch.load(directory / "last.pth", weights_only=True)["teacher"]
    assert saved["model"] == "test_resnet" and saved["img_size"] == 64 and saved["mean"] == [0.5, 0.5, 0.5]

    # The same teacher from another path continues the run; other weights are refused, naming the difference.
    moved = tmp_path / "moved.pth"
    shutil.copy(timm_teacher, moved)
    more = ["TRAIN.EPOCHS", "3"]
    assert main.main(["--cfg", str(cfg), "--output", out, *_opts(*kd, "MODEL.DISTILL.TEACHER_WEIGHTS", str(moved),
                                                                  *more)]) == 0
    other = tmp_path / "other.pth"
    torch.manual_seed(2)
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), other)
    before = sorted(p.name for p in directory.iterdir())
    argv = ["--cfg", str(cfg), "--output", out, *_opts(*kd, "MODEL.DISTILL.TEACHER_WEIGHTS", str(other),
                                                        "TRAIN.EPOCHS", "4")]
    assert main.main(argv) == 1
    with pytest.raises(ValueError, match=r"distilled from another teacher \(weights_sha256 '[0-9a-f]+' -> '[0-9a-f]+'\)"):
        main.main(argv + ["--debug"])
    assert sorted(p.name for p in directory.iterdir()) == before


def test_own_checkpoint_teacher_with_its_ema_weights(tmp_path: Path) -> None:
    cfg, out = write_tiny_yaml(tmp_path), str(tmp_path / "out")
    assert main.main(["--cfg", str(cfg), "--output", out, "--tag", "teacher", *_opts()]) == 0
    teacher = tmp_path / "teacher.pth"
    shutil.copy(run_dir(Path(out), "teacher") / "last.pth", teacher)
    kd = ["MODEL.DISTILL.TYPE", "soft", "MODEL.DISTILL.TAU", "2.0", "MODEL.DISTILL.TEACHER_WEIGHTS", str(teacher),
          "MODEL.DISTILL.TEACHER_EMA", "True"]
    assert main.main(["--cfg", str(cfg), "--output", out, "--tag", "student", *_opts(*kd)]) == 0
    directory = run_dir(Path(out), "student")
    log = (directory / "log.txt").read_text()
    assert "distillation (soft, alpha 0.5, tau 2) from teacher crossformerpp_s (teacher.pth, EMA weights" in log
    assert "at 32 px" in log
    row = read_metrics(directory)[-1]
    assert row["epoch"] == 1 and row["train_loss"] > 0
    assert torch.load(directory / "last.pth", weights_only=True)["teacher"]["ema"] is True
    # Evaluating the student needs no teacher: its run's config.yaml works where the teacher's file is gone.
    teacher.unlink()
    assert main.main(["--cfg", str(directory / "config.yaml"), "--eval", "--resume", str(directory / "last.pth")]) == 0


@pytest.mark.parametrize("pairs, message", [
    (["MODEL.DISTILL.TYPE", "soft"], "MODEL.DISTILL.TEACHER_WEIGHTS='' is not a file"),
    (["MODEL.DISTILL.TYPE", "soft", "MODEL.DISTILL.TEACHER", "no_such_net"], "is not a timm model"),
    (["MODEL.DISTILL.TYPE", "hard", "MODEL.DISTILL.TEACHER", "test_vit"], "does not fit the teacher test_vit"),
    (["MODEL.DISTILL.TYPE", "soft", "MODEL.DISTILL.TEACHER_EMA", "True"], "holds no EMA weights"),
    (["MODEL.DISTILL.TYPE", "soft", "MODEL.DISTILL.ALPHA", "1.5"], "MODEL.DISTILL.ALPHA=1.5 must be in [0, 1]"),
])
def test_bad_teacher_is_one_line_and_writes_nothing(tmp_path: Path, timm_teacher: Path, capsys, pairs,
                                                    message) -> None:
    cfg, out = write_tiny_yaml(tmp_path), tmp_path / "out"
    weights = [] if "TEACHER_WEIGHTS" in message else ["MODEL.DISTILL.TEACHER_WEIGHTS", str(timm_teacher)]
    teacher = [] if "MODEL.DISTILL.TEACHER" in pairs else ["MODEL.DISTILL.TEACHER", "test_resnet"]
    assert main.main(["--cfg", str(cfg), "--output", str(out), *_opts(*weights, *teacher, *pairs)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_teacher_with_other_classes_is_refused(tmp_path: Path, capsys) -> None:
    weights = tmp_path / "five.pth"
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), weights)
    cfg, out = write_tiny_yaml(tmp_path), tmp_path / "out"
    argv = ["--cfg", str(cfg), "--output", str(out), *_opts("MODEL.DISTILL.TYPE", "hard", "MODEL.DISTILL.TEACHER",
                                                             "test_resnet", "MODEL.DISTILL.TEACHER_WEIGHTS", str(weights))]
    assert main.main(argv) == 1
    err = capsys.readouterr().err
    assert "does not fit the teacher test_resnet" in err and "(5," in err and not out.exists()
