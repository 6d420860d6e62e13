"""The GPU-only precision decisions, run on the CPU: bf16 support, TF32, and the fp16 fallback."""
from __future__ import annotations

import logging

import pytest
import torch

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
    assert resolve_amp("bf16", CPU) == torch.bfloat16  # CPU autocast runs bf16 natively
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
