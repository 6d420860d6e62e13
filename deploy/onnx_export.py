"""A trained model as an ONNX graph, for onnxruntime, TensorRT or any other ONNX runtime.

``python -m deploy.export CKPT model.onnx`` (the suffix chooses the format) runs :func:`export_onnx`: torch's
``torch.export``-based ONNX exporter (``dynamo=True``) on the eval-mode model, one input
``images`` (B, 3, S, S) float32, normalised as the eval transform does, one output ``logits``
(B, num_classes). The batch is fixed (``--batch-size``) or dynamic (``--dynamic-batch``); the
image size is chosen at export (``--img-size``, default the config's ``DATA.IMG_SIZE``): the
padding and masks of the attention groups are computed for that size and frozen into the graph.
The graph's metadata (``metadata_props``) carries the class names and the preprocessing: ``img_size``,
``resize`` (the shorter side before the center crop), ``interpolation``, ``mean``, ``std`` and
``scores`` (``softmax``, or ``sigmoid`` for a model trained with BCE);
``docs/deploy.md`` runs the file with them in onnxruntime, without PyTorch.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from utils.file_io import atomic_publish, fsync_file
from .inference import TrainedModel, eval_transform_description

logger = logging.getLogger(__name__)


def export_onnx(trained: TrainedModel, output: str, img_size: Optional[int] = None, batch_size: int = 1,
                dynamic_batch: bool = False) -> Dict[str, Any]:
    """Write ``trained.model`` as an ONNX file.

    Args:
        trained: From :func:`deploy.inference.load_trained_model`.
        output: The ``.onnx`` file (written atomically).
        img_size: Input height and width; None takes the config's ``DATA.IMG_SIZE``.
        batch_size: The fixed batch size (ignored with ``dynamic_batch``).
        dynamic_batch: Let the batch dimension vary at run time.

    Returns:
        What was written: ``img_size``, ``batch`` ("dynamic" or the size), ``opset``, ``bytes``.
    """
    from models.crossformer import SIZE_DIVISOR

    if not output.endswith(".onnx"):
        raise ValueError(f"output {output} must end in .onnx for --format onnx")
    size = img_size or trained.config.DATA.IMG_SIZE
    if size < SIZE_DIVISOR or size % SIZE_DIVISOR:
        raise ValueError(f"--img-size {size} is not a multiple of {SIZE_DIVISOR} (the four stages downsample by "
                         f"{SIZE_DIVISOR} in total); pass e.g. 224 or 384")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    model = trained.model.eval()
    # A dynamic batch is traced at 2: torch.export specialises a dimension traced at size 1.
    example = torch.randn(2 if dynamic_batch else batch_size, 3, size, size)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with torch.no_grad():
        # One real forward first: the padding masks and position-bias caches of this size are then plain
        # tensors that the exporter folds into the graph, not attributes assigned while it traces.
        model(example)
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=dynamic_shapes, verbose=False)
    config = trained.config
    program.model.metadata_props.update({
        "class_names": json.dumps(trained.class_names),
        "model": config.MODEL.NAME,
        "img_size": str(size),
        # The eval transform (timm's): the shorter side resized to `resize`, the center `img_size` square cropped.
        "resize": str(math.floor(size / config.TEST.CROP_PCT)),
        "interpolation": config.DATA.INTERPOLATION,
        "mean": json.dumps(list(IMAGENET_DEFAULT_MEAN)),
        # How predict turns logits into probabilities: a model trained with BCE scores each class on its own.
        "scores": "sigmoid" if (config.get("TRAIN") or {}).get("LOSS", "ce") == "bce" else "softmax",
        "std": json.dumps(list(IMAGENET_DEFAULT_STD)),
        "preprocessing": eval_transform_description(config) if size == config.DATA.IMG_SIZE
        else f"as the config's eval transform, at {size}x{size}",
    })
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

    def write(tmp: str) -> None:
        program.save(tmp)
        fsync_file(tmp)

    atomic_publish(output, write, shared=True)
    opset = next((version for domain, version in program.model.opset_imports.items() if domain == ""), None)
    return {"img_size": size, "batch": "dynamic" if dynamic_batch else batch_size, "opset": opset,
            "bytes": os.path.getsize(output)}


def onnx_session(path: str, threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session of ``path``.

    Args:
        path: An ``.onnx`` file.
        threads: Intra-op threads; None lets onnxruntime choose (one per core).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def max_logit_difference(path: str, model: torch.nn.Module, img_size: int, batch_sizes: Sequence[int] = (1,),
                         seed: int = 0) -> float:
    """The largest |ONNX - PyTorch| logit over random inputs of each batch size (float32, CPU).

    Args:
        path: The exported file.
        model: The model it was exported from.
        img_size: Its input size.
        batch_sizes: Batch sizes to run (one, for a fixed-batch export).
        seed: Seed of the inputs.
    """
    session = onnx_session(path)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        images = torch.randn(batch, 3, img_size, img_size, generator=generator)
        with torch.no_grad():
            expected = model.eval()(images).numpy()  # (B, num_classes)
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        worst = max(worst, float(np.abs(logits - expected).max()))
    return worst
