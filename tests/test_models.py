"""Models: official parity (fixtures), registry, any input size, gradients, fast vs reference path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import models
from models import CrossFormer, create_model, list_models
from models.cpu_kernels import linear_gelu, linear_residual, onednn_dtype
from models.crossformer import Attention, sdpa_backends
from tests.helpers import REPO_ROOT

# Outputs of the official code, shipped with the tests (see fixtures/official/README.md).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
VARIANTS = json.loads((FIXTURES / "variants.json").read_text())

# The released variants' parameter counts (the model zoo in the README).
EXPECTED_PARAMS = {
    "crossformer_t": 27_776_794,
    "crossformer_s": 30_657_394,
    "crossformer_b": 51_971_554,
    "crossformer_l": 91_971_184,
    "crossformerpp_s": 23_325_340,
    "crossformerpp_b": 51_994_594,
    "crossformerpp_l": 92_001_904,
    "crossformerpp_h": 95_962_944,
}


def tiny(name: str = "crossformerpp_s", **overrides) -> CrossFormer:
    args = dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], num_classes=10, drop_path_rate=0.0)
    args.update(overrides)
    return create_model(name, **args)


def test_registry_names() -> None:
    assert list_models() == list(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_params_state_dict_and_macs(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name] == VARIANTS[name]["params"]
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes == VARIANTS[name]["state_dict_shapes"]
    macs = model.macs(224)
    assert abs(macs / VARIANTS[name]["macs_224"] - 1) < 0.01
    # The fast path does the same arithmetic (its fused kernels are counted too).
    assert model.macs(224, reference=False) == macs


@pytest.mark.parametrize("fixture", ["cf_mini", "pp_mini"])
@pytest.mark.parametrize("path", ["inference", "autograd", "reference"])
def test_official_fixtures(fixture: str, path: str, tmp_path: Path) -> None:
    """Logits of the official code at every stored size (two per fixture, with padding and masks).

    ``inference``: the fast path without autograd (cached bias, fused fc1+GELU on CPU);
    ``autograd``: the fast path with gradients enabled, as in training; ``reference``: the plain
    official formulation.
    """
    data = torch.load(FIXTURES / f"{fixture}.pth", weights_only=True)
    model = CrossFormer(**data["constructor"]).eval()
    # A checkpoint in the official format loads strictly.
    torch.save({"model": data["state_dict"]}, tmp_path / "official.pth")
    model.load_state_dict(torch.load(tmp_path / "official.pth", weights_only=True)["model"], strict=True)
    model.set_reference_attention(path == "reference")
    assert len(data["cases"]) >= 2  # one instance, several sizes
    for size, case in data["cases"].items():
        with torch.set_grad_enabled(path == "autograd"):
            logits = model(case["image"].float() / 64 - 2)
        assert logits.shape == case["logits"].shape
        assert (logits.detach() - case["logits"]).abs().max().item() < 1e-5, f"{fixture} at {size}"


def test_timm_registration() -> None:
    model = timm.create_model("crossformerpp_s", num_classes=7, embed_dim=32, depths=[1, 1, 1, 1],
                              num_heads=[1, 2, 4, 8])
    assert isinstance(model, CrossFormer) and model.num_classes == 7
    with pytest.raises(ValueError, match="pretrained=True for crossformerpp_s names no weights: pass "
                                         r"pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("crossformerpp_s", pretrained=True)  # the variants name no download (tests/test_hub.py)


def test_eval_bias_cache_follows_the_autocast_dtype() -> None:
    """A bias cached under bf16 autocast is not reused by a float32 forward (nor the reverse)."""
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fresh = model(x)
        model.clear_caches()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        assert torch.equal(model(x), fresh)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown model name 'crossformerpp_m'.*did you mean"):
        create_model("crossformerpp_m")


def test_any_input_size_one_instance() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    for height, width in [(224, 224), (256, 256), (288, 288), (384, 384), (96, 160), (32, 64)]:
        with torch.no_grad():
            logits = model(torch.randn(1, 3, height, width))
        assert logits.shape == (1, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(225, 224), (224, 200), (16, 32), (0, 32)])
def test_bad_input_size(size: tuple) -> None:
    model = tiny()
    with pytest.raises(ValueError, match=rf"input size {size[0]}x{size[1]} .*multiples of 32"):
        model(torch.randn(1, 3, *size))


def test_feature_maps_and_feature_extractor() -> None:
    model = tiny(num_classes=0).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = model.forward_stages(x)
        features = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)]
    assert features.shape == (2, 256)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_no_weight_decay_set() -> None:
    model = tiny()
    skip = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert skip and skip <= set(params)
    assert all(params[name].ndim <= 1 for name in skip)
    assert all(name in skip for name, p in params.items() if p.ndim <= 1 or name.endswith(".bias"))
    assert "head.weight" not in skip and "layers.0.blocks.0.attn.qkv.weight" not in skip


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = tiny()  # no stochastic depth: a dropped branch would get no gradient this step
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        # The DPB output bias adds one constant per head to every logit of a row, which the
        # softmax cancels: its gradient is zero up to rounding. Every other one is not.
        if not name.endswith("attn.pos.pos3.2.bias"):
            assert param.grad.abs().sum() > 0, name


def test_stochastic_depth_rule() -> None:
    model = tiny(drop_path_rate=0.3)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for stage in model.layers for block in stage.blocks]
    assert rates == pytest.approx([0.3 * i / 7 for i in range(8)])


def test_gradient_checkpointing_is_exact() -> None:
    x = torch.randn(2, 3, 64, 64)
    results = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = tiny(drop_path_rate=0.2, use_checkpoint=use_checkpoint).train()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=1e-6)


def run_path(model: CrossFormer, x: torch.Tensor, reference: bool) -> tuple:
    """Output and parameter gradients of ``model`` on ``x`` through the fast or reference path."""
    model.zero_grad()
    model.set_reference_attention(reference)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def assert_paths_agree_float64(size: tuple) -> tuple:
    """Fast and reference paths of a float64 tiny model agree in outputs and gradients at ``size``.

    Returns:
        ``(model, x)`` for further checks.
    """
    torch.manual_seed(0)
    model = tiny().double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    (out_fast, grads_fast), (out_ref, grads_ref) = [run_path(model, x, ref) for ref in (False, True)]
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-12)
    for grad_fast, grad_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-9, atol=1e-12)
    return model, x


@pytest.fixture(params=["sdpa", "explicit"])
def cpu_training_attention(request, monkeypatch) -> str:
    """Run gradient tests through SDPA's backward too (CUDA's path), not only CPU's explicit form."""
    monkeypatch.setattr(Attention, "explicit_cpu_training", request.param == "explicit")
    return request.param


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (224, 224), (320, 320)])
def test_fast_path_matches_reference_float32(size: tuple, cpu_training_attention: str) -> None:
    """Float32: the fast path agrees with the reference within float32 rounding."""
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 3, *size)
    (out_fast, grads_fast), (out_ref, grads_ref) = [run_path(model, x, ref) for ref in (False, True)]
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    # Relative to each gradient's size, floored at 1e-3 of the largest one (the DPB output
    # bias has a gradient that is zero up to rounding).
    floor = 1e-3 * max(grad.abs().max() for grad in grads_ref)
    for grad_fast, grad_ref in zip(grads_fast, grads_ref):
        scale = torch.maximum(grad_ref.abs().max(), floor)
        assert ((grad_fast - grad_ref).abs().max() / scale).item() < 1e-4


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (224, 224), (320, 320)])
def test_fast_path_matches_reference(size: tuple, cpu_training_attention: str) -> None:
    """SDPA fast path vs plain explicit attention, float64: outputs and gradients.

    64x64 and 96x160 run whole-map, non-square and unpadded groups; 224 and 320 pad the LDA
    regions of stages 1-2, and 320 also the SDA windows of stage 4.
    """
    assert_paths_agree_float64(size)


@pytest.mark.parametrize("size", [(96, 160), (224, 224), (320, 320)])
def test_inference_path_matches_reference(size: tuple) -> None:
    """Eval without autograd: cached bias, strided SDPA inputs and (on CPU) fc1+GELU in one
    oneDNN call, against the reference, in float32 and under bf16 autocast."""
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        assert onednn_dtype(x) == (torch.float32 if torch.backends.mkldnn.is_available() else None)
        out_fast, out_ref = [model.set_reference_attention(ref) or model(x) for ref in (False, True)]
        torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_fast, bf16_ref = [model.set_reference_attention(ref) or model(x) for ref in (False, True)]
    assert bf16_fast.dtype == bf16_ref.dtype == torch.bfloat16
    # Both round differently to bfloat16 (8 bits of mantissa); both stay near the float32 result.
    scale = out_ref.abs().max()
    for out in (bf16_fast, bf16_ref):
        assert ((out.float() - out_ref).abs().max() / scale).item() < 0.05


def test_linear_gelu() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 48)
    x = torch.randn(2, 5, 16)
    expected = torch.nn.functional.gelu(linear(x))
    with torch.no_grad():
        torch.testing.assert_close(linear_gelu(x, linear), expected, rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused, plain = linear_gelu(x, linear), torch.nn.functional.gelu(linear(x))
        assert fused.dtype == plain.dtype == torch.bfloat16
        torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)
        # float64 is not a oneDNN type: the plain path, exactly.
        assert onednn_dtype(x.double()) is None
        assert torch.equal(linear_gelu(x.double(), linear.double()), torch.nn.functional.gelu(linear(x.double())))
    linear.float()
    # With autograd the plain path runs, so gradients flow.
    assert onednn_dtype(x) is None
    linear_gelu(x, linear).sum().backward()
    assert linear.weight.grad is not None


def test_linear_residual() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 16)
    x, residual = torch.randn(2, 5, 48), torch.randn(2, 5, 16)
    expected = residual + linear(x)
    torch.testing.assert_close(linear_residual(x, linear, residual), expected, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes: the plain sum, as autocast does it
        assert torch.equal(linear_residual(x, linear, residual), residual + linear(x))
    # Autograd through the in-place accumulation.
    x.requires_grad_(True)
    linear_residual(x, linear, residual).sum().backward()
    grads = [x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()]
    x.grad = linear.weight.grad = linear.bias.grad = None
    (residual + linear(x)).sum().backward()
    for got, want in zip(grads, [x.grad, linear.weight.grad, linear.bias.grad]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kernel, stride, size", [(4, 4, 32), (8, 4, 32), (16, 4, 64), (32, 4, 32), (32, 4, 96),
                                                 (4, 2, 8), (2, 2, 8)])
def test_strided_conv_as_space_to_depth_equals_the_convolution(kernel: int, stride: int, size: int) -> None:
    """The stem's convolutions as stride-1 convolutions of the space-to-depth input: same values and
    gradients (float64 exact to rounding), any multiple-of-32 size, non-square too."""
    from models.cpu_kernels import strided_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel, stride=stride, padding=(kernel - stride) // 2).double()
    x = torch.randn(2, 3, size, size + stride * 2, dtype=torch.float64, requires_grad=True)
    got = strided_conv(x, conv)
    grads = torch.autograd.grad(got.square().sum(), [x, conv.weight, conv.bias])
    want = conv(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), [x, conv.weight, conv.bias])):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_sdpa_backends_are_pinned_on_cuda_for_training_and_inference(monkeypatch) -> None:
    """CUDA pins SDPA to memory-efficient/math in training and inference; the same wiring runs
    here on CPU (math), forward and backward, in float64 against the reference formulation."""
    from torch.nn.attention import SDPBackend

    assert sdpa_backends(torch.device("cuda")) == [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    assert sdpa_backends(torch.device("cuda", 3)) == [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    assert sdpa_backends(torch.device("cpu")) is None
    # Force the CUDA choice on CPU (only math is available there) through SDPA's forward and backward.
    monkeypatch.setattr(models.crossformer, "sdpa_backends", lambda device: [SDPBackend.MATH])
    monkeypatch.setattr(Attention, "explicit_cpu_training", False)
    model, x = assert_paths_agree_float64((224, 224))
    model.eval()  # inference: the cached position bias, no autograd, the same pinned backends
    with torch.no_grad():
        model.set_reference_attention(False)
        fast = model(x)
        model.set_reference_attention(True)
        torch.testing.assert_close(fast, model(x), rtol=1e-10, atol=1e-12)
    # The choice is applied: the memory-efficient kernel alone does not exist on CPU.
    monkeypatch.setattr(models.crossformer, "sdpa_backends", lambda device: [SDPBackend.EFFICIENT_ATTENTION])
    with pytest.raises(RuntimeError, match="No viable backend"):
        run_path(model, x, False)


@pytest.mark.parametrize("per_group", [False, True])
def test_sdpa_mask_is_written_once_with_aligned_rows(per_group: bool) -> None:
    """On CUDA the SDPA mask is cast (and repeated per image) in one copy into rows padded to 8
    elements, which PyTorch's memory-efficient path takes as is; the values and the gradient
    that reaches the bias are those of the plain mask. Elsewhere the mask is the plain one."""
    from models.crossformer import sdpa_mask, sdpa_mask_alignment

    assert sdpa_mask_alignment(torch.device("cuda", 1)) == 8 and sdpa_mask_alignment(torch.device("cpu")) == 1
    torch.manual_seed(0)
    batch, groups, heads, tokens = 3, 4, 2, 49
    bias = torch.randn(*((groups,) if per_group else ()), heads, tokens, tokens, dtype=torch.float64,
                       requires_grad=True)
    plain = bias.to(torch.float32)
    plain = plain.expand(batch, *plain.shape).reshape(-1, heads, tokens, tokens) if per_group else plain[None]
    weight = torch.randn(plain.shape, dtype=torch.float32)
    (grad_plain,) = torch.autograd.grad((plain * weight).sum(), bias)
    assert sdpa_mask(bias, torch.float32, batch, 1).stride() == plain.stride()  # alignment 1: as before
    mask = sdpa_mask(bias, torch.float32, batch, 8)
    assert mask.shape == plain.shape and mask.dtype == torch.float32
    assert mask.stride(-1) == 1 and all(stride % 8 == 0 for stride in mask.stride()[:-1]), mask.stride()
    torch.testing.assert_close(mask, plain, rtol=0, atol=0)
    (grad,) = torch.autograd.grad((mask * weight).sum(), bias)
    torch.testing.assert_close(grad, grad_plain, rtol=1e-5, atol=1e-6)  # the repeats summed in float32 vs 64


def test_model_with_aligned_sdpa_masks_matches_the_reference(monkeypatch) -> None:
    """The CUDA mask layout (rows padded to 8) through SDPA on CPU, forward and backward, at 320: the
    shared 14x14 and 7x7 biases and the per-group ones of padded stages (N = 196, 49, 16)."""
    monkeypatch.setattr(models.crossformer, "sdpa_mask_alignment", lambda device: 8)
    monkeypatch.setattr(Attention, "explicit_cpu_training", False)
    assert_paths_agree_float64((320, 320))


def test_torch_compile_captures_one_graph() -> None:
    """TRAIN.COMPILE: the model compiles without graph breaks (fullgraph) in eval and training,
    and matches eager. ``aot_eager`` checks capture and autograd tracing without inductor's
    C++ build (minutes on this CPU); the code generator is PyTorch's own to test."""
    torch.manual_seed(0)
    model = tiny(depths=[2, 1, 1, 1])  # SDA and LDA blocks, and single-group stages
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    model.train()
    results = []
    for runner in (model, compiled):
        model.zero_grad()
        runner(x).square().sum().backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for grad_compiled, grad_eager in zip(results[1], results[0]):
        torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-6)


def test_torch_compile_does_not_recompile_on_the_second_call() -> None:
    """The first compiled call must leave nothing that fails the graph's guards on the second: a
    per-size cache filled while tracing (the padding masks) made every compiled run compile the
    whole model twice, at step 1 and step 2."""
    torch.manual_seed(0)
    model = tiny(depths=[2, 1, 1, 1])
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(1, 3, 96, 96)  # stage 1 and 2 LDA groups need padding at 96
    compiled(x).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        compiled(x)  # eval without autograd is a graph of its own
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_torch_compile_traces_the_pinned_sdpa_backends(monkeypatch) -> None:
    """On CUDA every attention call runs inside ``sdpa_kernel(sdpa_backends(device))``; under
    torch.compile that context manager is traced into the graph (no graph break, no recompile).
    CPU stands in with the math backend pinned the same way, forward and backward."""
    from torch.nn.attention import SDPBackend

    monkeypatch.setattr(models.crossformer, "sdpa_backends", lambda device: [SDPBackend.MATH])
    monkeypatch.setattr(Attention, "explicit_cpu_training", False)
    torch.manual_seed(0)
    model = tiny(depths=[2, 1, 1, 1])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(1, 3, 96, 96)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x).sum().backward()
    for grad, again in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(again, grad, rtol=0, atol=0)
    torch._dynamo.reset()


def test_padding_is_exercised() -> None:
    model = tiny()
    blocks = [block for stage in model.layers for block in stage.blocks]
    # At 224: stage 1 (56x56) LDA regions of 16 pad to 64; at 320 stage 4 (10x10) SDA pads to 14.
    assert any(block.attn.grouping(56, 56)[2] for block in blocks[:2])
    assert blocks[-2].attn.grouping(10, 10) == (7, 1, 4, 4)
    # A map no larger than the group is one group of side max(H, W).
    assert blocks[-1].attn.grouping(7, 5) == (7, 1, 0, 2)


def test_eval_cache_follows_weight_changes() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)  # cached bias, same result
        model.layers[0].blocks[0].attn.pos.pos3[2].weight.mul_(3.0)  # in-place, like an optimizer step
        changed = model(x)
    fresh = tiny().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.equal(changed, first)
        torch.testing.assert_close(changed, fresh(x), rtol=0, atol=0)


def test_bf16_autocast_cpu() -> None:
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 3, 96, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with torch.no_grad():
        torch.testing.assert_close(out.float(), model(x), rtol=0.1, atol=0.1)


def test_package_exports() -> None:
    assert models.check_input_size(32, 64) is None


def test_pretrained_cfg() -> None:
    """Every variant carries the official evaluation settings in timm's pretrained_cfg."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

    for name in list_models():
        with torch.device("meta"):
            model = create_model(name)
        cfg = model.pretrained_cfg
        assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875, name
        assert cfg["interpolation"] == "bicubic" and cfg["classifier"] == "head", name
        assert cfg["mean"] == IMAGENET_DEFAULT_MEAN and cfg["std"] == IMAGENET_DEFAULT_STD, name
    data_cfg = resolve_data_config({}, model=model)
    assert data_cfg["crop_pct"] == 0.875 and data_cfg["interpolation"] == "bicubic"


@pytest.mark.parametrize("build", ["timm", "models"])
def test_features_only(build: str) -> None:
    args = dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], features_only=True)
    create = timm.create_model if build == "timm" else create_model
    extractor = create("crossformerpp_s", **args).eval()
    info = extractor.feature_info
    assert info.channels() == [32, 64, 128, 256] and info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == ["layers.0.blocks", "layers.1.blocks", "layers.2.blocks", "layers.3.blocks"]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = extractor(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)]
    # Two stages: the later ones, the final norm and the head are pruned.
    extractor = create("crossformerpp_s", out_indices=(0, 1), **args).eval()
    assert extractor.feature_info.channels() == [32, 64] and len(extractor.model.layers) == 2
    with torch.no_grad():
        assert [tuple(m.shape) for m in extractor(x)] == [(2, 32, 16, 24), (2, 64, 8, 12)]


def test_forward_intermediates() -> None:
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert [tuple(m.shape) for m in intermediates] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 128, 4, 6),
                                                            (2, 256, 2, 3)]
        assert final.shape == (2, 2, 3, 256)
        torch.testing.assert_close(model.forward_head(final), model(x), rtol=0, atol=0)
        for got, want in zip(model.forward_stages(x), intermediates):
            assert torch.equal(got, want)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(last_two, intermediates[2:])] == [True, True]
        first = model.forward_intermediates(x, indices=[0], stop_early=True, output_fmt="NHWC",
                                            intermediates_only=True)
        assert len(first) == 1 and torch.equal(first[0], intermediates[0].permute(0, 2, 3, 1))
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        assert torch.equal(normed, final.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="output_fmt 'NLC' is not supported"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_macs_leaves_the_model_as_it_found_it() -> None:
    """Counting switches formulation and mode only for the count: the eval position-bias cache
    works again afterwards, and the formulation switch and training mode are restored."""
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    for reference in (True, False):
        model.macs(64, reference=reference)
        assert not model.training and not model.reference_attention
        with torch.no_grad():
            model(x)
        assert all(attn._bias_cache for attn in attentions)
    model.train().set_reference_attention(True)
    model.macs(64, reference=False)
    assert model.training and model.reference_attention
    assert all(attn.reference for attn in attentions)


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("fixture", ["cf_mini", "pp_mini"])
def test_checkpoint_filter_fn(fixture: str, prefix: str, tmp_path: Path) -> None:
    """An official ``{"model": ...}`` checkpoint, also with DDP's ``module.`` prefix, loads strictly
    after the filter, directly and through timm's builder from a local file; logits stay official."""
    data = torch.load(FIXTURES / f"{fixture}.pth", weights_only=True)
    checkpoint = {"model": {prefix + key: value for key, value in data["state_dict"].items()}}
    model = CrossFormer(**data["constructor"]).eval()
    model.load_state_dict(models.checkpoint_filter_fn(checkpoint, model), strict=True)
    torch.save(checkpoint, tmp_path / "official.pth")
    name = "crossformerpp_s" if data["constructor"]["use_acl"] else "crossformer_s"
    # The overlay names only the file: the 10-class head of the file must load, not be re-initialised.
    overlay = dict(file=str(tmp_path / "official.pth"))
    built = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, drop_path_rate=0.0,
                              **data["constructor"]).eval()
    size, case = next(iter(data["cases"].items()))
    with torch.no_grad():
        for runner in (model, built):
            assert (runner(case["image"].float() / 64 - 2) - case["logits"]).abs().max().item() < 1e-5, size
    # Another number of classes: the head is left out, everything else kept.
    other = CrossFormer(**{**data["constructor"], "num_classes": 3})
    filtered = models.checkpoint_filter_fn(checkpoint, other)
    assert not any(key.startswith("head.") for key in filtered)
    assert set(filtered) == {key for key in data["state_dict"] if not key.startswith("head.")}
    assert models.checkpoint_filter_fn({"state_dict": data["state_dict"]}, model).keys() == data["state_dict"].keys()
    with pytest.raises(ValueError, match="no weights under 'model' or 'state_dict'"):
        models.checkpoint_filter_fn({"epoch": 3}, model)


def test_import_leaves_the_flop_registry_alone() -> None:
    """FLOP formulas are registered by the first count, not by importing the models."""
    import subprocess
    import sys

    code = ("import torch, models; from torch.utils.flop_counter import flop_registry; "
            "assert torch.ops.aten.addmm_ not in flop_registry; "
            "models.create_model('crossformerpp_s', embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8]).macs(64); "
            "assert torch.ops.aten.addmm_ in flop_registry")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
