"""timm's model contract, as a timm user relies on it, for every registered variant.

What timm's own generic tests (``tests/test_models.py`` of pytorch-image-models) check of every
model, restated for ours, plus the workflow a timm user runs: attributes (``num_features``,
``head_hidden_size``, ``output_fmt``, ``pretrained_cfg``), ``forward == forward_head o
forward_features``, ``global_pool``, first-conv adaptation to ``in_chans``, ``feature_cfg``, the
fine-tune load, torch.fx (timm's ``fx`` features, torchvision's ``create_feature_extractor``) and
``torch.export`` with dynamic height and width. TorchScript is not supported (deprecated in
torch 2.14): ``torch.export`` is the export path.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._manipulate import adapt_input_conv
from timm.optim import create_optimizer_v2
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from models import CrossFormer, list_models

# Small enough for CPU, large enough for SDA and LDA blocks, padding at 64x96 and (CrossFormer++)
# an amplitude cooling layer after the third block of stage 1.
TINY = dict(embed_dim=32, depths=[4, 1, 1, 1], num_heads=[1, 2, 4, 8], drop_path_rate=0.0)
# The tracer arguments timm's FX tools use: its notrace modules and functions.
TRACER_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
FAMILIES = ["crossformer_t", "crossformerpp_s"]  # one per family: the rest differ only in size

# torchvision notes that the train and eval graphs differ (DropPath, the inference MLP kernels),
# as it does for timm's own models with stochastic depth.
pytestmark = pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode:UserWarning")


def tiny(name: str = "crossformerpp_s", **overrides) -> CrossFormer:
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY, **overrides})


def save_official(model: CrossFormer, path: Path) -> Path:
    """``model``'s weights in the official release's format, ``{"model": state_dict}``."""
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("name", list_models())
def test_contract_attributes_and_shapes(name: str) -> None:
    """timm's test_model_default_cfgs on the full-size variant (meta tensors: shapes only, at 224)."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        unpooled = timm.create_model(name, num_classes=0, global_pool="")
        features = model.forward_features(torch.empty(1, 3, 224, 224))
    cfg, state, width = model.pretrained_cfg, model.state_dict(), model.stage_dims[-1]
    assert model.num_features == model.head_hidden_size == width and model.num_classes == 1000
    assert model.output_fmt == "NHWC" and model.global_pool == "avg" and model.in_chans == 3
    assert features.shape == (1, *cfg["pool_size"], width)  # unpooled, NHWC, the config's pool size
    assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
    assert model.forward_head(features).shape == (1, 1000)
    assert model.get_classifier() is model.head and cfg["classifier"] + ".weight" in state
    model.reset_classifier(0)
    assert model.num_classes == 0 and model.forward_head(features).shape == (1, width)
    model.reset_classifier(0, "")
    assert model.forward_head(features).shape == features.shape
    assert unpooled.num_classes == 0 and unpooled.forward_head(features).shape == features.shape
    # first_conv names every stem convolution: each reads the image's channels.
    assert len(cfg["first_conv"]) == len(model.patch_embed.projs) == 4
    for conv in cfg["first_conv"]:
        assert state[conv + ".weight"].shape[1] == 3
    for info in model.feature_info:
        module = model.get_submodule(info["module"])
        assert isinstance(module, torch.nn.Sequential) and module[0].dim == info["num_chs"]


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_is_forward_head_of_forward_features(name: str) -> None:
    model = tiny(name, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 2, 3, model.num_features)
        assert torch.equal(model(x), model.forward_head(features))
        assert torch.equal(model.forward_head(features, pre_logits=True), features.mean(dim=(1, 2)))
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, features) and len(intermediates) == 4
        # Stopped early: the last requested stage's map, as timm's models return it.
        final, (first,) = model.forward_intermediates(x, indices=[0], stop_early=True, output_fmt="NHWC")
        assert torch.equal(final, first) and first.shape == (2, 16, 24, 32)
        # No pooling: the head applies at every position.
        model.reset_classifier(7, "")
        assert torch.equal(model(x), model.head(features)) and model(x).shape == (2, 2, 3, 7)


def test_global_pool_values() -> None:
    model = tiny(num_classes=0, global_pool="")
    assert model.global_pool == "" and model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 2, 256)
    model.reset_classifier(3, "avg")
    assert model.global_pool == "avg" and model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(4)  # None keeps the pooling
    assert model.global_pool == "avg"
    with pytest.raises(ValueError, match="global_pool 'max' is not supported; use 'avg'"):
        tiny(global_pool="max")
    with pytest.raises(ValueError, match="global_pool 'token' is not supported"):
        model.reset_classifier(0, "token")


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_adapts_every_stem_conv(in_chans: int, tmp_path: Path) -> None:
    """timm adapts each CEL stem convolution of a 3-channel checkpoint as it adapts a single stem."""
    source = tiny(num_classes=10)
    path = save_official(source, tmp_path / "rgb.pth")
    model = timm.create_model("crossformerpp_s", pretrained=True, in_chans=in_chans, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path)), **TINY).eval()
    assert model.in_chans == in_chans
    own, rgb = model.state_dict(), source.state_dict()
    for conv in model.pretrained_cfg["first_conv"]:
        assert torch.equal(own[conv + ".weight"], adapt_input_conv(in_chans, rgb[conv + ".weight"]))
    assert all(torch.equal(own[key], value) for key, value in rgb.items()
               if key.split(".weight")[0] not in model.pretrained_cfg["first_conv"])
    if in_chans == 1:
        # Summed RGB filters: a grey image gives what the RGB model gives for it repeated 3 times.
        grey = torch.randn(2, 1, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(grey), source.eval()(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_feature_cfg_merges_with_the_builders() -> None:
    extractor = tiny(features_only=True, feature_cfg=dict(feature_cls="hook", out_indices=(1, 3)))
    assert type(extractor).__name__ == "FeatureHookNet" and extractor.feature_info.channels() == [64, 256]
    # An explicit out_indices wins over feature_cfg's; the default extractor stays timm's getter.
    extractor = tiny(features_only=True, out_indices=(0,), feature_cfg=dict(out_indices=(1, 3)))
    assert type(extractor).__name__ == "FeatureGetterNet" and extractor.feature_info.channels() == [32]


def head_log_lines(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "models.crossformer" and "head" in r.getMessage()]


@pytest.mark.parametrize("num_classes", [5, 0])
def test_fine_tune_gets_a_fresh_head(num_classes: int, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """timm.create_model(pretrained=True, file, num_classes=5): every tensor but the head from the file,
    a fresh head and one log line; the load stays strict for everything else."""
    source = tiny(num_classes=10)
    path = save_official(source, tmp_path / "ten.pth")
    overlay = dict(file=str(path))
    with caplog.at_level(logging.INFO):
        model = timm.create_model("crossformerpp_s", pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay, **TINY)
    assert len(head_log_lines(caplog)) == 1, head_log_lines(caplog)
    own = model.state_dict()
    assert all(torch.equal(own[key], value) for key, value in source.state_dict().items()
               if not key.startswith("head."))
    fresh = tiny(num_classes=num_classes).state_dict()
    assert {key: tuple(value.shape) for key, value in own.items() if key.startswith("head.")} == \
        {key: tuple(value.shape) for key, value in fresh.items() if key.startswith("head.")}
    # The file's own class count keeps the file's head, with no log line.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        same = timm.create_model("crossformerpp_s", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay,
                                 **TINY)
    assert torch.equal(same.head.weight, source.head.weight) and not head_log_lines(caplog)
    # Strict for everything else: a file without a stem tensor is an error.
    weights = source.state_dict()
    del weights["patch_embed.projs.2.bias"]
    torch.save({"model": weights}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="patch_embed.projs.2.bias"):
        timm.create_model("crossformerpp_s", pretrained=True, num_classes=5,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "partial.pth")), **TINY)


def fx_model(model: CrossFormer, train: bool = False) -> torch.nn.Module:
    """The model's output through torchvision's FX feature extractor, as timm's tests build it."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER_KWARGS)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=TRACER_KWARGS)


@pytest.mark.parametrize("name", FAMILIES)
def test_fx_trace_equals_eager(name: str) -> None:
    """timm's test_model_forward_fx / backward_fx: the traced graph computes exactly what eager does."""
    model = tiny(name, num_classes=7, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        eager = model(x)
        traced = fx_model(model)
        assert torch.equal(next(iter(traced(x).values())), eager)
        with pytest.raises(ValueError, match="input size 64x80 is not supported"):  # the check is in the graph
            traced(torch.randn(1, 3, 64, 80))
    model.train()
    traced = fx_model(model, train=True).train()
    out = next(iter(traced(x).values()))
    out.mean().backward()
    assert out.shape == (2, 7)
    assert all(p.grad is not None for p in traced.parameters())
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in model.parameters())


def test_fx_and_hook_features_equal_the_getters() -> None:
    """features_only in timm's three flavours, and torchvision's create_feature_extractor by module name."""
    x = torch.randn(2, 3, 64, 96)
    extractors = {cls: tiny(features_only=True, feature_cls=cls).eval() for cls in ("getter", "hook", "fx")}
    with torch.no_grad():
        maps = {cls: extractor(x) for cls, extractor in extractors.items()}
    assert extractors["fx"].output_fmt == extractors["hook"].output_fmt == "NHWC"  # the model's own format
    assert [tuple(m.shape) for m in maps["getter"]] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)]
    for flavour in ("hook", "fx"):
        for got, want in zip(maps[flavour], maps["getter"], strict=True):
            assert torch.equal(got, want.permute(0, 2, 3, 1)), flavour
    model = tiny().eval()
    nodes = {info["module"]: f"stage{i}" for i, info in enumerate(model.feature_info)}
    extractor = create_feature_extractor(model, return_nodes=nodes, tracer_kwargs=TRACER_KWARGS)
    with torch.no_grad():
        stages: Dict[str, torch.Tensor] = extractor(x)
        for got, want in zip(stages.values(), model.forward_stages(x), strict=True):
            assert torch.equal(got, want.permute(0, 2, 3, 1))


def test_torch_export_with_dynamic_height_and_width() -> None:
    """One exported program for every height and width in its range (multiples of 32), equal to eager.

    The range starts at 256, where every stage's map is larger than its group (below that, the
    stages whose map fits in one group compute differently: such sizes export with static shapes).
    """
    model = tiny("crossformerpp_s", num_classes=7, depths=[2, 1, 1, 1]).eval()
    height, width = torch.export.Dim("height", min=8, max=32), torch.export.Dim("width", min=8, max=32)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 256, 288),),
                                      dynamic_shapes={"x": {2: 32 * height, 3: 32 * width}})
        exported = program.module()
        for size in [(256, 288), (320, 256), (288, 416)]:  # with and without padding in every stage
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_timm_user_workflow(tmp_path: Path) -> None:
    """A fine-tune as a timm user writes it: pretrained weights from a file, another resolution and
    class count, timm's data config and transforms from the model, features in the hook and fx
    flavours, reset_classifier, and a training step."""
    path = save_official(tiny(num_classes=10), tmp_path / "pretrained.pth")
    overlay = dict(file=str(path), input_size=(3, 96, 96))  # to be run at 96x96 instead of 224
    model = timm.create_model("crossformerpp_s", pretrained=True, num_classes=5, pretrained_cfg_overlay=overlay, **TINY)
    data_config = resolve_data_config(model=model)
    assert data_config["input_size"] == (3, 96, 96) and data_config["interpolation"] == "bicubic"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (120, 140, 3), dtype=np.uint8)) for _ in range(4)]
    train_batch = torch.stack([create_transform(**data_config, is_training=True)(image) for image in images])
    eval_batch = torch.stack([create_transform(**data_config)(image) for image in images])
    assert train_batch.shape == eval_batch.shape == (4, 3, 96, 96)

    for flavour in ("hook", "fx"):
        extractor = timm.create_model("crossformerpp_s", pretrained=True, features_only=True, feature_cls=flavour,
                                      pretrained_cfg_overlay=overlay, **TINY).eval()
        with torch.no_grad():
            maps = extractor(eval_batch)
        assert [m.shape[-1] for m in maps] == extractor.feature_info.channels() == [32, 64, 128, 256]
        assert [m.shape[1] for m in maps] == [96 // r for r in extractor.feature_info.reduction()]

    model.reset_classifier(3)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    model.train()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(model(train_batch), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[name], param) for name, param in model.named_parameters()
               if not name.endswith("attn.pos.pos3.2.bias"))  # softmax cancels that bias (test_models.py)
    model.eval()
    with torch.no_grad():
        assert model(eval_batch).shape == (4, 3)
