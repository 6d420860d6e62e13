"""Precision decisions: bf16 where the device has it natively, the GPU's fp16 and the CPU's float32 fallbacks, TF32."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.helpers import last_json, run_main
from utils import precision
from utils.precision import resolve_amp, set_tf32

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    """A stand-in GPU: ``native`` says whether it has native bf16 (``including_emulation=False``)."""
    class FakeGpu:
        native = True

    fake = FakeGpu()

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return True if including_emulation else fake.native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    return fake


def test_bf16_needs_native_support_else_fp16_with_one_notice(gpu, caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_amp("bf16", CUDA) == torch.bfloat16
    gpu.native = False  # emulated only (V100, T4): fp16 with a loss scaler instead
    with caplog.at_level(logging.WARNING):
        assert resolve_amp("bf16", CUDA, "TEST.AMP") == torch.float16
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "TEST.AMP=bf16" in notices[0] and "Tesla V100" in notices[0]
    assert "fp16" in notices[0]
    assert resolve_amp("bf16", CUDA, force_bf16=True) == torch.bfloat16  # TRAIN.FORCE_BF16 keeps it
    assert resolve_amp("fp16", CUDA) == torch.float16 and resolve_amp("none", CUDA) is None
    with pytest.raises(ValueError, match="TRAIN.AMP='fp16' needs a CUDA device"):
        resolve_amp("fp16", CPU)


def test_tf32_switch_sets_cublas_and_cudnn_precision_on_cuda_only() -> None:
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        assert set_tf32(True, CPU) is None
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
        assert set_tf32(True, CUDA) == "tf32"
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert set_tf32(False, CUDA) == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.parametrize("native, force, expected", [(True, False, torch.bfloat16), (False, False, None),
                                                     (False, True, torch.bfloat16)])
def test_cpu_bf16_only_where_the_processor_has_it(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                  native: bool, force: bool, expected: torch.dtype) -> None:
    """A CPU without native bf16 (AVX2 only) runs float32 with one notice naming the setting and the override."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING):
        assert resolve_amp("bf16", CPU, "TEST.AMP", force_bf16=force) is expected
    notices = [r.getMessage() for r in caplog.records]
    if native or force:
        assert notices == []
    else:
        assert len(notices) == 1 and notices[0].startswith("TEST.AMP=bf16: this CPU (torch CPU capability ")
        assert "using float32" in notices[0] and "TRAIN.FORCE_BF16 True" in notices[0]


def test_validation_eval_and_throughput_resolve_bf16_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training, validation (TEST.AMP train / bf16) and --eval of an fp16 run's config on a CPU, by capability."""
    from config import load_config
    from training.trainer import _precisions

    bf16 = load_config(opts=["TRAIN.AMP", "bf16"])
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        assert _precisions(bf16, CPU) == (expected, expected)
        assert _precisions(load_config(opts=["TRAIN.AMP", "none", "TEST.AMP", "bf16"]), CPU) == (None, expected)
        assert _precisions(load_config(opts=["TRAIN.AMP", "fp16", "TEST.AMP", "bf16", "EVAL_MODE", "True"]),
                           CPU) == (None, expected)
        forced = load_config(opts=["TRAIN.AMP", "bf16", "TRAIN.FORCE_BF16", "True"])
        assert _precisions(forced, CPU) == (torch.bfloat16, torch.bfloat16)


def test_throughput_reports_the_precision_it_measured_on_this_cpu(tiny_yaml: Path, tmp_path: Path) -> None:
    """A real run: TRAIN.AMP bf16 measures bf16 only where this CPU has it natively, and says so."""
    result = run_main("--cfg", str(tiny_yaml), "--throughput", "--batch-size", "2", "--opts", "TRAIN.AMP", "bf16",
                      "THROUGHPUT.ITERS", "2", "THROUGHPUT.WARMUP_ITERS", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    native = precision.cpu_has_native_bf16()
    assert last_json(result.stdout)["amp"] == ("bf16" if native else "none")
    assert ("has no native bf16" in result.stderr + result.stdout) is not native
