"""``python -m deploy.export --format onnx``: the graph under onnxruntime gives PyTorch's logits.

Real variant structures (each variant's group sizes, intervals, kernel sizes and, for
CrossFormer++, ACL and PGS), shrunk in width and depth so that an export takes seconds: stage-1
width 32, heads 1, 2, 4, 8, one block per stage (four in stage 3 of CrossFormer++, so that an ACL
layer is exported too).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

import models
from deploy.inference import TrainedModel

TOLERANCE = 1e-4
TINY = {"crossformer_t": dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8]),
        "crossformerpp_s": dict(embed_dim=32, depths=[1, 1, 4, 1], num_heads=[1, 2, 4, 8])}


def tiny_trained(name: str, num_classes: int = 10) -> TrainedModel:
    from yacs.config import CfgNode

    torch.manual_seed(0)
    model = models.create_model(name, num_classes=num_classes, **TINY[name]).eval()
    config = CfgNode({"MODEL": {"NAME": name}, "DATA": {"IMG_SIZE": 224, "INTERPOLATION": "bicubic"},
                      "TEST": {"CROP_PCT": 0.875}})
    return TrainedModel(model=model, config=config, class_names=[f"class{i}" for i in range(num_classes)])


@pytest.mark.parametrize("name, img_size, dynamic", [("crossformer_t", 224, False), ("crossformerpp_s", 224, True)])
def test_onnx_logits_match_pytorch(name: str, img_size: int, dynamic: bool, tmp_path: Path) -> None:
    """Two variants at 224, a fixed batch of 2 and a dynamic batch run at 1 and 3."""
    from deploy.onnx_export import export_onnx, max_logit_difference

    trained = tiny_trained(name)
    info = export_onnx(trained, str(tmp_path / "model.onnx"), img_size, batch_size=2, dynamic_batch=dynamic)
    assert info["batch"] == ("dynamic" if dynamic else 2) and info["img_size"] == img_size
    batches = (1, 3) if dynamic else (2,)
    assert max_logit_difference(str(tmp_path / "model.onnx"), trained.model, img_size, batches) < TOLERANCE


def test_onnx_export_command_at_384_from_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The command line from a training checkpoint, at 384 (stage 3's 24x24 map padded to groups of 14):
    the stored config builds the model, the class names go into the graph's metadata."""
    import onnx

    from config import config_to_dict, load_config
    from tests.helpers import write_tiny_yaml
    from deploy.export import main as export
    from deploy.onnx_export import max_logit_difference

    config = config_to_dict(load_config(str(write_tiny_yaml(tmp_path)), ["MODEL.CROSSFORMER.DEPTHS", "[1, 1, 4, 1]"]))
    trained = tiny_trained("crossformerpp_s")
    names = [f"wnid{i}" for i in range(10)]
    checkpoint: Dict[str, Any] = {"format_version": 1, "model": trained.model.state_dict(), "config": config,
                                  "class_names": names}
    torch.save(checkpoint, tmp_path / "best.pth")
    output = tmp_path / "model.onnx"
    assert export([str(tmp_path / "best.pth"), str(output), "--format", "onnx", "--img-size", "384",
                   "--dynamic-batch", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "input (batch dynamic, 3, 384, 384)" in printed and "largest logit difference" in printed
    metadata = {prop.key: prop.value for prop in onnx.load(str(output), load_external_data=False).metadata_props}
    assert json.loads(metadata["class_names"]) == names and metadata["img_size"] == "384"
    assert max_logit_difference(str(output), trained.model, 384, (2,)) < TOLERANCE
    assert export([str(tmp_path / "best.pth"), str(tmp_path / "x.onnx"), "--format", "onnx", "--img-size", "100"]) == 1
