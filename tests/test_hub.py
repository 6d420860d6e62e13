"""A timm user's workflow on the files this project writes, through timm's public API.

timm's scripts are not in the package; these tests call what they call: ``validate.py`` and
``inference.py`` build the model with ``create_model(**resolve_model_input_args(...))``, load
``--checkpoint`` with ``load_checkpoint(model, path, use_ema)`` and read the data config with
``resolve_input_data_config``; ``train.py`` loads ``--initial-checkpoint`` through
``create_model(checkpoint_path=...)``, ``--pretrained-path`` as ``pretrained_cfg_overlay=dict(file=...,
num_classes=-1)`` and ``--resume`` with ``resume_checkpoint``. The Hub folder is loaded as
``local-dir:`` and, offline, as ``hf-hub:`` from a Hub cache the test fills.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import timm
import torch
from timm.data import CustomDatasetInfo, DatasetInfoLabelMapper, resolve_data_config, resolve_input_data_config
from timm.models import load_checkpoint, resolve_model_input_args, resume_checkpoint
from timm.utils import ModelEmaV3
from torch import nn

import models
from config import ConfigError, config_to_dict, load_config
from deploy.export import main as export
from deploy.inference import load_trained_model
from tests.helpers import REPO_ROOT, main_command, run
from training.engine import Components
from utils.checkpoint import FORMAT_VERSION

CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "bar", "dot", "arrow", "heart"]
DEMO = REPO_ROOT / "configs" / "demo.yaml"
# The demo's widths (configs/demo.yaml): not crossformerpp_s's, so only the file can say them.
DEMO_ARCH = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """The demo's model, randomly initialised, with an EMA that differs from it, saved as a training
    checkpoint (the dict ``RunCheckpoints`` writes: ``Components.state_dict`` and the stored config)."""
    root = tmp_path_factory.mktemp("demo")
    config = load_config(str(DEMO))
    torch.manual_seed(0)
    model = models.build_model(config).eval()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    ema.update(model, step=1)  # now the EMA is the mean of the initialisation and the weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = Components(train_model=model, criterion=nn.CrossEntropyLoss(), optimizer=optimizer,
                       scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1), ema=ema)
    checkpoint = {"format_version": FORMAT_VERSION, **parts.state_dict(), "config": config_to_dict(config),
                  "class_names": CLASSES, "epoch": 3, "batch": 0, "global_step": 30}
    path = root / "best.pth"
    torch.save(checkpoint, path)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, ema_logits = model(images), ema.module.eval()(images)
    return {"root": root, "path": path, "model": model, "ema": ema.module, "images": images, "logits": logits,
            "ema_logits": ema_logits}


def logits_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def test_a_checkpoint_builds_its_architecture_with_its_size_and_classes(demo: Dict[str, Any]) -> None:
    """Issue 33.4/5: the name and the file are enough; the model carries the file's input size,
    classes and eval transform, as validate.py / inference.py resolve them."""
    path = str(demo["path"])
    model = timm.create_model("crossformerpp_s", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert torch.equal(logits_of(model, demo["images"]), demo["logits"])
    cfg = model.pretrained_cfg
    assert (model.num_classes, cfg["num_classes"], cfg["input_size"]) == (10, 10, (3, 32, 32))
    assert list(cfg["label_names"]) == CLASSES
    assert resolve_data_config(model=model) == {"input_size": (3, 32, 32), "interpolation": "bicubic",
                                                "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                                "crop_pct": 0.875, "crop_mode": "center"}
    # validate.py / inference.py: --model crossformerpp_s --pretrained --model-kwargs pretrained_cfg_overlay=...
    script = timm.create_model(**resolve_model_input_args("crossformerpp_s", {}, pretrained=True,
                                                          pretrained_cfg_overlay=dict(file=path)))
    assert torch.equal(logits_of(script, demo["images"]), demo["logits"])
    assert resolve_input_data_config(script, {})["input_size"] == (3, 32, 32)


def test_use_ema_finds_our_ema(demo: Dict[str, Any]) -> None:
    """Issue 33.3: timm's load_checkpoint (validate.py --checkpoint [--use-ema]) takes our weights or our EMA,
    which the checkpoint holds once each."""
    raw = torch.load(demo["path"], weights_only=True)
    assert "ema" not in raw and raw["model_ema"].keys() == raw["model"].keys()
    for use_ema, expected in ((False, "logits"), (True, "ema_logits")):
        model = timm.create_model("crossformerpp_s", num_classes=10, **DEMO_ARCH)
        load_checkpoint(model, str(demo["path"]), use_ema=use_ema)
        assert torch.equal(logits_of(model, demo["images"]), demo[expected]), use_ema


def test_a_format_1_checkpoint_still_gives_its_ema(demo: Dict[str, Any], tmp_path: Path) -> None:
    """Older files hold the EMA under ``ema`` with ``module.`` prefixes: --pretrained --use-ema and
    export --ema read them."""
    raw = torch.load(demo["path"], weights_only=True)
    old = {**{k: v for k, v in raw.items() if k != "model_ema"}, "format_version": 1,
           "ema": {f"module.{k}": v for k, v in raw["model_ema"].items()}}
    torch.save(old, tmp_path / "old.pth")
    model = models.build_model(load_config(str(DEMO)))
    models.load_pretrained(model, str(tmp_path / "old.pth"), "ema")
    assert torch.equal(logits_of(model, demo["images"]), demo["ema_logits"])
    assert export([str(tmp_path / "old.pth"), str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    exported = timm.create_model("crossformerpp_s", pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "ema.safetensors")))
    assert torch.equal(logits_of(exported, demo["images"]), demo["ema_logits"])
    assert exported.pretrained_cfg["input_size"] == (3, 32, 32)


def test_hub_folder_export_loads_as_local_dir(demo: Dict[str, Any], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """Issue 33.1/2: ``python -m deploy.export best.pth DIR --format hf --ema``, then timm's local-dir:
    equal logits, the architecture in model_args, the classes and data config, inference.py's labels."""
    folder = tmp_path / "demo-hub"
    assert export([str(demo["path"]), str(folder), "--format", "hf", "--ema"]) == 0
    assert f"timm.create_model('local-dir:{folder}', pretrained=True)" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    hub = json.loads((folder / "config.json").read_text())
    assert hub["architecture"] == "crossformerpp_s" and hub["num_classes"] == 10 and hub["label_names"] == CLASSES
    assert {k: hub["model_args"][k] for k in DEMO_ARCH} == DEMO_ARCH
    assert hub["pretrained_cfg"]["input_size"] == [3, 32, 32] and hub["pretrained_cfg"]["crop_pct"] == 0.875
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    logits = logits_of(model, demo["images"])
    assert torch.equal(logits, demo["ema_logits"])
    assert resolve_input_data_config(model, {})["input_size"] == (3, 32, 32)
    # The name and model_args alone rebuild the architecture (what push_to_hf_hub's readers rely on).
    rebuilt = timm.create_model(hub["architecture"], **hub["model_args"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # inference.py's labelling: the label names the model carries.
    to_label = DatasetInfoLabelMapper(CustomDatasetInfo(label_names=model.pretrained_cfg["label_names"]),
                                      label_type="name")
    assert [to_label(i) for i in logits.argmax(-1).tolist()] == [CLASSES[i] for i in
                                                                 demo["ema_logits"].argmax(-1).tolist()]
    # predict (and --pretrained) read the folder too: its config, class names and weights.
    trained = load_trained_model(str(folder))
    assert trained.class_names == CLASSES and torch.equal(logits_of(trained.model, demo["images"]), logits)
    transfer = load_config(str(REPO_ROOT / "configs" / "transfer_small.yaml"), ["MODEL.NUM_CLASSES", "102"],
                           {"MODEL.PRETRAINED": str(folder)})
    assert (transfer.MODEL.CROSSFORMER.EMBED_DIM, transfer.MODEL.CROSSFORMER.NUM_HEADS) == (32, [1, 2, 4, 8])
    # An existing folder is never overwritten.
    before = (folder / "config.json").read_bytes()
    assert export([str(demo["path"]), str(folder), "--format", "hf"]) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (folder / "config.json").read_bytes() == before


def test_hub_folder_loads_as_hf_hub_offline(demo: Dict[str, Any], tmp_path: Path) -> None:
    """Issue 33.1: ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` from a Hub cache (offline)."""
    folder = tmp_path / "hub"
    assert export([str(demo["path"]), str(folder), "--format", "hf"]) == 0
    cache = tmp_path / "hf-cache"
    commit = "0" * 40
    snapshot = cache / "models--org--crossformer-demo" / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (cache / "models--org--crossformer-demo" / "refs").mkdir()
    (cache / "models--org--crossformer-demo" / "refs" / "main").write_text(commit)
    torch.save(demo["images"], tmp_path / "images.pt")
    code = ("import sys, torch, timm, models; "
            "m = timm.create_model('hf-hub:org/crossformer-demo', pretrained=True).eval(); "
            f"torch.save((m(torch.load({str(tmp_path / 'images.pt')!r})).detach(), m.pretrained_cfg), "
            f"{str(tmp_path / 'out.pt')!r})")
    result = run(["env", f"HF_HUB_CACHE={cache}", "HF_HUB_OFFLINE=1", sys.executable, "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    logits, cfg = torch.load(tmp_path / "out.pt", weights_only=False)
    torch.testing.assert_close(logits, demo["logits"], rtol=0, atol=1e-5)  # another process: another thread count
    assert cfg["input_size"] == (3, 32, 32) and list(cfg["label_names"]) == CLASSES


def test_fine_tune_through_timm_builds_the_files_architecture(demo: Dict[str, Any], tmp_path: Path) -> None:
    """Issue 33.5, as a plain script runs it: the file's architecture, a fresh head and a WARNING it shows."""
    path = demo["path"]
    code = ("import timm, models; "
            f"m = timm.create_model('crossformerpp_s', pretrained=True, pretrained_cfg_overlay=dict(file={str(path)!r}),"
            " num_classes=3); print(m.num_classes, *m.stage_dims)")
    result = run([sys.executable, "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["3", "32", "64", "128", "256"]
    warnings = [line for line in result.stderr.splitlines() if "head" in line]
    assert len(warnings) == 1 and "(10, 256)" in warnings[0] and "(3, 256)" in warnings[0], result.stderr
    model = timm.create_model("crossformerpp_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=3)
    source = demo["model"].state_dict()
    assert all(torch.equal(value, source[key]) for key, value in model.state_dict().items()
               if not key.startswith("head."))
    assert model.head.weight.shape == (3, 256) and "label_names" not in model.pretrained_cfg


def test_equal_class_count_keeps_the_head_only_for_the_same_classes(demo: Dict[str, Any],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = str(demo["path"])
    same = timm.create_model("crossformerpp_s", pretrained=True, num_classes=10,
                             pretrained_cfg_overlay=dict(file=path, label_names=CLASSES))
    assert torch.equal(same.head.weight, demo["model"].head.weight)
    other = [f"flower_{i}" for i in range(10)]
    with caplog.at_level("WARNING", logger="models.crossformer"):
        replaced = timm.create_model("crossformerpp_s", pretrained=True, num_classes=10,
                                     pretrained_cfg_overlay=dict(file=path, label_names=other))
    assert not torch.equal(replaced.head.weight, demo["model"].head.weight)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]  # earlier tests may leave root at INFO
    assert [r.levelname for r in warnings] == ["WARNING"]
    assert "class 0: 'circle' in the file, 'flower_0' in label_names" in warnings[0].getMessage()
    assert list(replaced.pretrained_cfg["label_names"]) == other


def test_a_contradicting_architecture_is_one_line(demo: Dict[str, Any]) -> None:
    path = str(demo["path"])
    with pytest.raises(ValueError, match=r"holds a crossformerpp_s with embed_dim=32 .* but embed_dim=64 was asked "
                                         r"for: drop embed_dim"):
        timm.create_model("crossformerpp_s", pretrained=True, pretrained_cfg_overlay=dict(file=path), embed_dim=64)
    with pytest.raises(ValueError, match=r"holds a crossformerpp_s \(embed_dim=32 .*\), not a crossformerpp_b: "
                                         r"create it as timm.create_model\('crossformerpp_s'"):
        timm.create_model("crossformerpp_b", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    with pytest.raises(ValueError, match="pretrained=True for crossformerpp_s names no weights"):
        timm.create_model("crossformerpp_s", pretrained=True)


def test_timm_train_initial_checkpoint_pretrained_path_and_resume(demo: Dict[str, Any]) -> None:
    """Issue 33.6: train.py's --initial-checkpoint (timm prefers the EMA), --pretrained-path (head adapted)
    and --resume (one line saying why not)."""
    path = str(demo["path"])
    initial = timm.create_model("crossformerpp_s", num_classes=10, checkpoint_path=path, **DEMO_ARCH)
    assert torch.equal(logits_of(initial, demo["images"]), demo["ema_logits"])
    adapted = timm.create_model("crossformerpp_s", pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=path, num_classes=-1))
    assert adapted.stage_dims == [32, 64, 128, 256] and adapted.num_classes == 10
    assert torch.equal(adapted.patch_embed.projs[0].weight, demo["model"].patch_embed.projs[0].weight)
    model = timm.create_model("crossformerpp_s", num_classes=10, **DEMO_ARCH)
    with pytest.raises(ValueError, match="timm's train.py cannot --resume it; start from its weights with "
                                         "--initial-checkpoint FILE"):
        resume_checkpoint(model, path)


def test_main_fine_tunes_the_demo_checkpoint_with_the_transfer_config(demo: Dict[str, Any], tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Issue 32.4: the README's transfer command on the demo's best.pth builds the demo's architecture
    (config.yaml records it) with a fresh 102-class head and a WARNING; another variant is one line."""
    from training.trainer import prepare_model
    from utils.distributed import DistInfo

    transfer = str(REPO_ROOT / "configs" / "transfer_small.yaml")
    config = load_config(transfer, ["MODEL.NUM_CLASSES", "102"], {"MODEL.PRETRAINED": str(demo["path"])})
    assert (config.MODEL.CROSSFORMER.EMBED_DIM, config.MODEL.CROSSFORMER.DEPTHS) == (32, [1, 1, 2, 1])
    with caplog.at_level("INFO"):
        model = prepare_model(config, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    head = [r for r in caplog.records if "head" in r.getMessage()]
    assert [r.levelname for r in head] == ["WARNING"] and "(102, 256)" in head[0].getMessage()
    assert torch.equal(model.patch_embed.projs[0].weight, demo["model"].patch_embed.projs[0].weight)
    # Ten classes again, but other ones: the demo's head is replaced (the Trainer calls this once the data is known).
    caplog.clear()
    ten = load_config(transfer, ["MODEL.NUM_CLASSES", "10"], {"MODEL.PRETRAINED": str(demo["path"])})
    model = prepare_model(ten, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert torch.equal(model.head.weight, demo["model"].head.weight)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the head is kept without a warning
    assert models.keep_head_for_classes(model, str(demo["path"]), CLASSES)
    flowers = [f"flower_{i}" for i in range(10)]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert not models.keep_head_for_classes(model, str(demo["path"]), flowers)
    assert not torch.equal(model.head.weight, demo["model"].head.weight)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in warnings] == ["WARNING"]
    assert "(class 0 is 'circle' in the file, 'flower_0' in the data)" in warnings[0].getMessage()
    with pytest.raises(ConfigError, match="holds a crossformerpp_s"):
        load_config(str(REPO_ROOT / "configs" / "crossformerpp_b.yaml"), [], {"MODEL.PRETRAINED": str(demo["path"])})
    result = run(main_command("--cfg", str(REPO_ROOT / "configs" / "crossformerpp_b.yaml"), "--pretrained",
                              str(demo["path"]), "--output", str(tmp_path / "out")), tmp_path)
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    line = result.stderr.strip().splitlines()[-1]
    assert (f"--pretrained {demo['path']} holds a crossformerpp_s (EMBED_DIM 32, DEPTHS [1, 1, 2, 1], NUM_HEADS "
            "[1, 2, 4, 8]), but MODEL.NAME='crossformerpp_b'; add --opts MODEL.NAME crossformerpp_s") in line
