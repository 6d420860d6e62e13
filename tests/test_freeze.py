"""TRAIN.FREEZE: what each spec freezes, what the optimizer and training do with it, what a
checkpoint records, and the errors (one line, nothing written)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
from torch import nn

from config import load_config
from models import freeze
from optim import build_optimizer
from tests.helpers import MODEL_DIR, REPO_ROOT, TINY_YAML
from training.engine import Components, StopReason, train_one_epoch
from training.train_state import TrainState

# Each spec and the parameter name prefixes it freezes.
SPECS = {
    "none": (),
    "stages-1": ("patch_embed.", "layers.0."),
    "stages-2": ("patch_embed.", "layers.0.", "layers.1."),
    "stages-4": ("patch_embed.", "layers."),
    "all-but-head": ("patch_embed.", "layers.", "norm."),
}


def _tiny(drop_path_rate: float = 0.0, num_classes: int = 10) -> nn.Module:
    import models

    torch.manual_seed(0)
    return models.create_model("crossformerpp_s", num_classes=num_classes, embed_dim=32, depths=[1, 1, 1, 1],
                               num_heads=[1, 2, 4, 8], drop_path_rate=drop_path_rate)


def _frozen_names(model: nn.Module) -> List[str]:
    return [name for name, param in model.named_parameters() if not param.requires_grad]


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_each_spec_freezes_exactly_its_modules(spec: str) -> None:
    model = _tiny()
    described = freeze(model, spec)
    expected = [name for name, _ in model.named_parameters() if name.startswith(SPECS[spec])]
    assert _frozen_names(model) == expected
    assert described["spec"] == spec
    assert described["parameters"] == sum(model.get_parameter(name).numel() for name in expected)
    assert described["trainable"] == sum(p.numel() for p in model.parameters()) - described["parameters"]
    if spec == "all-but-head":
        assert [name for name, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


@pytest.mark.parametrize("spec", ["stages-2", "all-but-head"])
@pytest.mark.parametrize("layer_decay", ["1.0", "0.75"])
def test_the_optimizer_holds_only_the_trainable_parameters(spec: str, layer_decay: str) -> None:
    model = _tiny()
    freeze(model, spec)
    cfg = load_config(opts=["TRAIN.FREEZE", spec, "TRAIN.LAYER_DECAY", layer_decay, "TRAIN.OPTIMIZER.NAME", "sgd"])
    optimizer = build_optimizer(cfg, model)
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(held) == len(set(held))


class _ListLoader:
    def __init__(self, batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)


class _NoSchedule:
    def step_update(self, num_updates: int) -> None:
        pass


@pytest.mark.parametrize("spec", ["stages-1", "all-but-head"])
def test_training_moves_only_the_trainable_weights(spec: str) -> None:
    """A few steps of train_one_epoch (drop path on, weight decay on): frozen weights bitwise the same."""
    model = _tiny(drop_path_rate=0.2)
    freeze(model, spec)
    before: Dict[str, torch.Tensor] = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = load_config(opts=["TRAIN.FREEZE", spec, "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0",
                            "TRAIN.WEIGHT_DECAY", "0.1", "PRINT_FREQ", "100"])
    parts = Components(train_model=model, criterion=nn.CrossEntropyLoss(), optimizer=build_optimizer(cfg, model),
                       scheduler=_NoSchedule())
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    assert train_one_epoch(parts, _ListLoader(batches), TrainState(torch.device("cpu")), cfg) is StopReason.COMPLETED
    frozen = set(_frozen_names(model))
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, before[name]) and param.grad is None, name
    assert all(not torch.equal(model.get_parameter(n), before[n]) for n in ("head.weight", "head.bias"))
    if spec == "stages-1":
        assert not torch.equal(model.layers[1].blocks[0].mlp.fc1.weight, before["layers.1.blocks.0.mlp.fc1.weight"])


def test_frozen_modules_apply_no_drop_path_in_training_mode() -> None:
    """model.train() (as every epoch calls it, also through torch.compile's wrapper) leaves frozen
    modules in eval mode: their features are deterministic; the trainable stages keep drop path."""
    model = _tiny(drop_path_rate=0.5)
    freeze(model, "stages-2")
    for wrapper in (model, torch.compile(model)):  # compiling is lazy: nothing is compiled here
        wrapper.eval()
        wrapper.train()
        for name, module in model.named_modules():
            frozen = name.startswith(("patch_embed", "pos_drop", "layers.0", "layers.1"))
            assert module.training is not frozen, name
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = [model.layers[1](model.layers[0](model.patch_embed(x))[1])[1] for _ in range(2)]
        later = [model.layers[2](features[0])[0] for _ in range(2)]
    assert torch.equal(features[0], features[1])
    assert not torch.equal(later[0], later[1])  # stage 3 still drops paths


def test_a_frozen_batch_norm_keeps_its_statistics() -> None:
    """timm's freeze: a BatchNorm2d in a frozen module becomes FrozenBatchNorm2d (the CrossFormers
    have none; a stand-in is added to the stem)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _tiny()
    model.patch_embed.add_module("bn", nn.BatchNorm2d(4))
    model.layers[1].add_module("bn", nn.BatchNorm2d(4))
    freeze(model, "stages-1")
    assert isinstance(model.patch_embed.bn, FrozenBatchNorm2d)
    assert type(model.layers[1].bn) is nn.BatchNorm2d and model.layers[1].bn.weight.requires_grad


def test_freezing_everything_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"TRAIN\.FREEZE='all-but-head' leaves no parameter to train \(the model's "
                                         r"head has 0 classes\)"):
        freeze(_tiny(num_classes=0), "all-but-head")


# -----------------------------------------------------------------------------
# Through main.main: the checkpoint field, resuming, the errors
# -----------------------------------------------------------------------------
def _run(cfg: Path, out: Path, *opts: str) -> int:
    import main

    return main.main(["--cfg", str(cfg), "--output", str(out), "--opts", *opts])


def test_a_linear_probe_run_records_what_was_frozen_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  restore_logging: None) -> None:
    """The shipped linear-probe config on the tiny model: the checkpoint's field, the untouched
    backbone, the head's optimizer state; an older file without the field resumes."""
    from models import build_model
    from timm.utils import random_seed

    tiny_yaml = tmp_path / "probe.yaml"
    tiny_yaml.write_text(f"BASE: ['{REPO_ROOT / 'configs' / 'crossformerpp_s_linear_probe.yaml'}']\n"
                         + TINY_YAML.replace("  DROP_PATH_RATE: 0.1\n", ""))
    out = tmp_path / "out"
    assert _run(tiny_yaml, out, "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0") == 0
    run_dir = out / MODEL_DIR / "default"
    last = torch.load(run_dir / "last.pth", weights_only=True)
    assert last["frozen"]["spec"] == "all-but-head"
    assert last["frozen"]["modules"] == ["patch_embed", "pos_drop", "layers", "norm"]
    assert last["frozen"]["trainable"] == 256 * 10 + 10  # the head
    log = (run_dir / "log.txt").read_text()
    assert f"TRAIN.FREEZE all-but-head: {last['frozen']['parameters']} parameters frozen" in log
    assert "sgd (momentum 0.9, nesterov False, foreach True)" in log
    # The frozen weights are the initial ones (prepare_model seeds with SEED before building).
    random_seed(0)
    initial = build_model(load_config(str(tiny_yaml))).state_dict()
    for name, value in last["model"].items():
        assert torch.equal(value, initial[name]) is (not name.startswith("head.")), name
    assert len(last["optimizer"]["state"]) == 2  # momentum buffers of head.weight and head.bias only
    # A file written without the field (an older checkpoint) still resumes.
    del last["frozen"]
    torch.save(last, run_dir / "last.pth")
    assert _run(tiny_yaml, out, "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "0") == 0
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 1  # after epochs 0 and 1
    # Another freeze cannot continue the run (the optimizer's groups differ).
    capsys.readouterr()
    assert _run(tiny_yaml, out, "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.FREEZE", "stages-2") == 1
    _one_line(capsys, "TRAIN.FREEZE 'all-but-head' -> 'stages-2' cannot take effect on resume")


def _one_line(capsys: pytest.CaptureFixture, needle: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and needle in lines[0], err


def test_a_bad_freeze_is_one_line_and_writes_nothing(tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    out = tmp_path / "out"
    assert _run(tiny_yaml, out, "TRAIN.FREEZE", "stages-9") == 1
    _one_line(capsys, "TRAIN.FREEZE='stages-9' must be none, stages-K with K in 1..4")
    assert not out.exists() or not any(out.rglob("*"))
    # Nothing left to train (a model without a head): before training, nothing in the run directory.
    from training import trainer

    monkeypatch.setattr(trainer, "build_model", lambda config: _tiny(num_classes=0))
    assert _run(tiny_yaml, out, "TRAIN.FREEZE", "all-but-head") == 1
    _one_line(capsys, "TRAIN.FREEZE='all-but-head' leaves no parameter to train")
    assert not out.exists() or not any(out.rglob("*"))
