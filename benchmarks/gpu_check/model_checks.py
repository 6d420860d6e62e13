"""Models on the device: our fast path against the official formulation, and which SDPA kernel runs.

``models`` group: for each model and input size, the same weights and input run through our
fast path and through ``models/reference.py`` (``set_reference_attention``), in float32 with
TF32 off, under bf16 and under fp16 autocast: training-mode outputs, every parameter's
gradient, and eval-mode (inference path) outputs. Float32 is held to a fixed bound; under
autocast our error against the float32 official result may be at most twice the official
formulation's own error under the same autocast (plus a small floor), since both round.

``sdpa`` group: the SDPA kernels that our real configuration runs (profiled, training and
inference), and each backend pinned alone through ``models.crossformer.sdpa_backends``: a
pinned backend that cannot take this bias shape, dtype or head dimension raises instead of
falling back, so "accepted" proves the kernel ran.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

import models
from models import crossformer, kernel_choice
from utils.precision import autocast, set_tf32

from .plan import Context
from .report import PASS, Result, check

logger = logging.getLogger(__name__)

DTYPES: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FP32_OUTPUT_BOUND = 1e-4  # max |fast - official| / max |official|, TF32 off
FP32_GRAD_BOUND = 5e-4  # ||g_fast - g_official|| / ||g_official|| over all parameters
AMP_FACTOR, AMP_FLOOR = 2.0, 1e-3  # under autocast: ours <= 2 x the official formulation's own error + floor


def build_pair(name: str, arch: Dict, num_classes: int,
               device: torch.device) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """Our model and an official-formulation copy with the same weights (no drop path, no dropout)."""
    torch.manual_seed(0)
    fast = models.create_model(name, num_classes=num_classes, drop_path_rate=0.0, **arch).to(device)
    official = copy.deepcopy(fast)
    official.set_reference_attention(True)
    return fast, official


def relative_max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value - reference| / max |reference|`` in float64."""
    value, reference = value.double(), reference.double()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def relative_l2_error(values: List[torch.Tensor], references: List[torch.Tensor]) -> Tuple[float, int]:
    """``||v - r|| / ||r||`` over all tensors together, and the index of the tensor with the largest own error."""
    diff = torch.stack([(v.double() - r.double()).norm() for v, r in zip(values, references)])
    norms = torch.stack([r.double().norm() for r in references])
    own = diff / norms.clamp_min(1e-30)
    return float(diff.norm() / norms.norm().clamp_min(1e-30)), int(own.argmax())


def run_model(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
              dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
    """Training-mode logits and gradients of the cross-entropy, then eval-mode (inference) logits, all float32."""
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(images.device, dtype):
        logits = model(images)  # (B, classes)
    F.cross_entropy(logits.float(), targets).backward()
    grads = [p.grad.float().clone() for p in model.parameters()]
    model.eval()
    with torch.no_grad(), autocast(images.device, dtype):
        eval_logits = model(images)
    model.zero_grad(set_to_none=True)
    return logits.detach().float(), grads, eval_logits.float()


@contextlib.contextmanager
def tf32_off(device: torch.device) -> Iterator[None]:
    """Float32 matmuls and convolutions in IEEE float32 on CUDA (utils.precision.set_tf32), restored after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    set_tf32(False, device)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def amp_bound(own_error: float) -> float:
    """The bound on our error under autocast, given the official formulation's own error there."""
    return AMP_FACTOR * own_error + AMP_FLOOR


def check_models(ctx: Context) -> List[Result]:
    """Fast path vs official formulation, outputs and gradients, every model, size and precision of the plan."""
    results = []
    plan = ctx.plan
    for name in plan.parity_models:
        fast, official = build_pair(name, plan.arch, plan.num_classes, ctx.device)
        names = [n for n, _ in fast.named_parameters()]
        for size, batch in plan.parity_sizes:
            generator = torch.Generator().manual_seed(size)
            images = torch.randn(batch, 3, size, size, generator=generator).to(ctx.device)
            targets = torch.randint(0, fast.num_classes, (batch,), generator=generator).to(ctx.device)
            with tf32_off(ctx.device):
                reference = run_model(official, images, targets, None)
                runs = {precision: (run_model(fast, images, targets, DTYPES[precision]),
                                    reference if precision == "fp32" else
                                    run_model(official, images, targets, DTYPES[precision]))
                        for precision in plan.precisions}
            for precision, ((logits, grads, eval_logits), (off_logits, off_grads, off_eval)) in runs.items():
                prefix = f"models/{name}/{size}/{precision}"
                grad_error, worst = relative_l2_error(grads, reference[1])
                errors = {"outputs": relative_max_error(logits, reference[0]),
                          "grads": grad_error,
                          "eval_outputs": relative_max_error(eval_logits, reference[2])}
                if precision == "fp32":
                    bounds = {"outputs": FP32_OUTPUT_BOUND, "grads": FP32_GRAD_BOUND,
                              "eval_outputs": FP32_OUTPUT_BOUND}
                    own = {}
                else:
                    own = {"outputs": relative_max_error(off_logits, reference[0]),
                           "grads": relative_l2_error(off_grads, reference[1])[0],
                           "eval_outputs": relative_max_error(off_eval, reference[2])}
                    bounds = {key: amp_bound(value) for key, value in own.items()}
                for key, error in errors.items():
                    rule = (f"<= {bounds[key]:.2g}" if precision == "fp32" else
                            f"<= {AMP_FACTOR:g} x official's own {own[key]:.2g} + {AMP_FLOOR:g}")
                    detail = "vs official fp32" + (f"; worst tensor {names[worst]}" if key == "grads" else "")
                    results.append(check(f"{prefix}/{key}", error <= bounds[key], error, rule, detail))
        del fast, official
        if ctx.cuda:
            torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------- SDPA kernels

# The private aten ops SDPA dispatches to, by backend (what the profiler shows).
KERNEL_OPS = {
    "efficient": ("aten::_scaled_dot_product_efficient_attention", "aten::_efficient_attention"),
    "flash": ("aten::_scaled_dot_product_flash_attention", "aten::_flash_attention"),
    "cudnn": ("aten::_scaled_dot_product_cudnn_attention", "aten::_cudnn_attention"),
    "math": ("aten::_scaled_dot_product_attention_math",),
}


def kernels_seen(op_names: Set[str]) -> Set[str]:
    """The SDPA backends whose kernels appear among profiled op names (``flash_attention_for_cpu`` is flash)."""
    return {backend for backend, prefixes in KERNEL_OPS.items()
            if any(op.startswith(prefix) for op in op_names for prefix in prefixes)}


def expected_kernels(device: torch.device, training: bool, dtype: torch.dtype) -> Set[str]:
    """The SDPA backends our configuration should run: ``models.crossformer.sdpa_backends`` pins the
    memory-efficient kernel on CUDA; on CPU inference takes PyTorch's choice (its flash kernel takes
    a bias) where ``models.kernel_choice`` picks SDPA for the dtype (not bf16), and training the
    explicit form (``Attention.explicit_cpu_training``), no SDPA."""
    if device.type == "cuda":
        return {"efficient"}
    return {"flash"} if not training and kernel_choice.cpu_inference_uses_sdpa(dtype) else set()


def profiled_ops(step: Callable[[], None], device: torch.device) -> Set[str]:
    """Names of the aten ops that ``step`` ran (CPU-side dispatch, which names the CUDA kernels' ops too)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {event.key for event in prof.key_averages()}


def _steps(model: torch.nn.Module, images: torch.Tensor, dtype: Optional[torch.dtype]) -> Dict[str, Callable[[], None]]:
    def train() -> None:
        model.train()
        with autocast(images.device, dtype):
            loss = model(images).float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def infer() -> None:
        model.eval()
        with torch.no_grad(), autocast(images.device, dtype):
            model(images)

    return {"training": train, "inference": infer}


@contextlib.contextmanager
def pinned_backend(backend: SDPBackend) -> Iterator[None]:
    """Every Attention runs SDPA with only ``backend`` allowed (CPU training too), restored after."""
    original, explicit = crossformer.sdpa_backends, crossformer.Attention.explicit_cpu_training
    crossformer.sdpa_backends = lambda device: [backend]
    crossformer.Attention.explicit_cpu_training = False
    try:
        yield
    finally:
        crossformer.sdpa_backends = original
        crossformer.Attention.explicit_cpu_training = explicit


def required_pinned(device: torch.device) -> Set[SDPBackend]:
    """Backends that must accept our bias, shape and head dimension when pinned alone: the one we pin on
    CUDA and the math fallback (on CPU only math takes a bias that needs a gradient)."""
    return {SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH} if device.type == "cuda" else {SDPBackend.MATH}


def check_sdpa(ctx: Context) -> List[Result]:
    """Which SDPA kernel our configuration runs (bf16, the training default), and each backend pinned alone."""
    plan = ctx.plan
    name = plan.train_model
    size, batch = plan.parity_sizes[0]
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=plan.num_classes, drop_path_rate=0.0, **plan.arch).to(ctx.device)
    images = torch.randn(batch, 3, size, size, device=ctx.device)
    steps = _steps(model, images, torch.bfloat16)
    results = []
    for kind, step in steps.items():
        step()  # warm-up: caches, cuDNN autotuning
        seen = kernels_seen(profiled_ops(step, ctx.device))
        expected = expected_kernels(ctx.device, kind == "training", torch.bfloat16)
        results.append(check(f"sdpa/{name}/{size}/bf16/{kind}/kernel", seen == expected,
                             ", ".join(sorted(seen)) or "none (explicit form)",
                             f"== {', '.join(sorted(expected)) or 'none'}",
                             "profiled aten ops of one step; 'math' would be a silent fallback"))
    required = required_pinned(ctx.device)
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        outcome = {}
        with pinned_backend(backend):
            for kind, step in steps.items():
                with warnings.catch_warnings(record=True) as caught:  # SDPA warns the reasons, then raises
                    warnings.simplefilter("always")
                    try:
                        step()
                        outcome[kind] = "accepted"
                    except RuntimeError as error:
                        reasons = [str(w.message) for w in caught] or [str(error)]
                        outcome[kind] = "rejected: " + " ".join(" ".join(reasons).split())[:200]
        accepted = all(value == "accepted" for value in outcome.values())
        label = f"sdpa/{name}/{size}/bf16/pinned/{backend.name.lower()}"
        value = "; ".join(f"{kind} {text}" for kind, text in outcome.items())
        if backend in required:
            results.append(check(label, accepted, value, "accepted (training and inference)"))
        else:
            results.append(Result(label, PASS, value, "informational", "not used by our configuration"))
    return results
