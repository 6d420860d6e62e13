"""Turn a training checkpoint into a weights-only file to share.

    python -m utils.export output/crossformerpp_b/default/ema_best.pth crossformerpp_b.safetensors --ema
    python -m utils.export output/crossformerpp_b/default/best.pth crossformerpp_b.pth

A training checkpoint carries the optimizer's moments, the RNG streams and the EMA besides the
weights (about 3.5x the weights' size). The export is one bare state dict (the model's keys, no
``module.`` prefix), the weights or their EMA (``--ema``), as ``.pth`` or ``.safetensors`` (by the
output's suffix). ``--pretrained``, ``torch.load(weights_only=True)`` and
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` all load it.
The training config and the class names travel with it: in the ``.safetensors`` metadata, and in
a ``.pth`` state dict's ``_metadata`` (where PyTorch keeps module versions; ``torch.load`` still
returns the bare state dict). :func:`read_stored_info` reads them back (``predict`` does).

    python -m utils.export output/crossformerpp_b/default/best.pth model.onnx --format onnx --dynamic-batch

writes an ONNX graph for onnxruntime / TensorRT (:mod:`utils.onnx_export`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .file_io import atomic_save, load_file

# The key of a .pth export's state-dict ``_metadata`` that holds the training config and class names
# (not a module name, so load_state_dict passes it to no module).
METADATA_KEY = "crossformer_export"


def read_stored_info(path: str) -> Tuple[Optional[Dict[str, Any]], Optional[List[str]]]:
    """The training config and the class names a checkpoint or exported weights file carries.

    Args:
        path: A training checkpoint, or a ``.pth`` / ``.safetensors`` file from :func:`export_weights`.

    Returns:
        ``(config as plain dicts or None, class names in label order or None)``.
    """
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {path} does not exist; check the path")
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        config, names = (json.loads(metadata[k]) if metadata.get(k) else None for k in ("config", "class_names"))
        return config or None, names
    checkpoint = load_file(path, mmap=True)
    if not isinstance(checkpoint, dict):
        return None, None
    if "model" in checkpoint:  # a training checkpoint (or an official release: no names)
        config = checkpoint.get("config")
        return (config if isinstance(config, dict) and config else None), checkpoint.get("class_names")
    stored = (getattr(checkpoint, "_metadata", None) or {}).get(METADATA_KEY) or {}
    return stored.get("config") or None, stored.get("class_names")


def export_weights(checkpoint_path: str, output: str, ema: bool = False) -> Dict[str, torch.Tensor]:
    """Write the weights (or EMA weights) of ``checkpoint_path`` to ``output``; returns them.

    Args:
        checkpoint_path: A training checkpoint of this framework (or any file with ``model``).
        output: ``*.pth`` or ``*.safetensors``.
        ema: Export the EMA weights instead of the weights.
    """
    if not output.endswith((".pth", ".safetensors")):
        raise ValueError(f"output {output} must end in .pth or .safetensors (the format follows the suffix)")
    checkpoint = load_file(checkpoint_path)
    key = "ema" if ema else "model"
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(key), dict):
        what = "EMA weights (it was not trained with TRAIN.EMA.ENABLE True)" if ema else "weights under 'model'"
        raise ValueError(f"{checkpoint_path} holds no {what}; {'drop --ema' if ema else 'pass a training checkpoint'}")
    # Own, contiguous copies: safetensors refuses tensors that share storage or are strided views.
    weights = OrderedDict((name.removeprefix("module."), tensor.detach().clone().contiguous())
                          for name, tensor in checkpoint[key].items())
    info = {"source": os.path.basename(checkpoint_path), "weights": key, "config": checkpoint.get("config") or {},
            "class_names": checkpoint.get("class_names")}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if output.endswith(".safetensors"):
        from safetensors.torch import save_file

        metadata = {name: value if isinstance(value, str) else json.dumps(value) for name, value in info.items()}
        tmp = f"{output}.tmp-{os.getpid()}"
        try:
            save_file(weights, tmp, metadata=metadata)
            os.replace(tmp, output)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        weights._metadata = OrderedDict([(METADATA_KEY, info)])  # type: ignore[attr-defined]
        atomic_save(weights, output)
    return weights


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; a failure is one line on stderr.

    Args:
        argv: Arguments without the program name.
    """
    parser = argparse.ArgumentParser("python -m utils.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a training checkpoint, e.g. output/.../ema_best.pth")
    parser.add_argument("output", help="the weights file to write: *.pth or *.safetensors")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the weights")
    args = parser.parse_args(argv)
    try:
        weights = export_weights(args.checkpoint, args.output, args.ema)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    size = os.path.getsize(args.output)
    sys.stdout.write(f"wrote the {'EMA ' if args.ema else ''}weights of {args.checkpoint} to {args.output}: "
                     f"{len(weights)} tensors, {size / 2**20:.1f} MiB (checkpoint "
                     f"{os.path.getsize(args.checkpoint) / 2**20:.1f} MiB)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
