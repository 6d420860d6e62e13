"""Turn a training checkpoint into a file to share: its weights, or an ONNX graph.

    python -m deploy.export output/crossformerpp_b/default/ema_best.pth crossformerpp_b.safetensors --ema
    python -m deploy.export output/crossformerpp_b/default/best.pth crossformerpp_b.pth
    python -m deploy.export output/crossformerpp_b/default/best.pth model.onnx --dynamic-batch --verify

The format follows the output's suffix (``--format`` may name it too, and must then agree):
``.pth`` and ``.safetensors`` hold the weights, ``.onnx`` an ONNX graph (:mod:`deploy.onnx_export`)
for onnxruntime / TensorRT.

A training checkpoint carries the optimizer's moments, the RNG streams and the EMA besides the
weights (about 3.5x the weights' size). A weights export is one bare state dict (the model's keys,
no ``module.`` prefix), the weights or their EMA (``--ema``). ``--pretrained``,
``torch.load(weights_only=True)`` and
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` all load it.
The training config and the class names travel with it: in the ``.safetensors`` metadata, and in
a ``.pth`` state dict's ``_metadata`` (where PyTorch keeps module versions; ``torch.load`` still
returns the bare state dict). :func:`models.stored.read_stored_info` reads them back (``predict`` does).
Exported files get the permissions of any new file of the user (0666 less the umask): they are
meant to be shared.

    python -m deploy.export output/crossformerpp_b/default/ema_best.pth crossformerpp_b-hub --ema --format hf

writes the Hugging Face Hub folder timm's ``save_for_hf`` writes (``config.json`` and
``model.safetensors``): the architecture (``model_args``, so the variant's name with them rebuilds
it), the classes (``num_classes``, ``label_names``), the input size it was trained at, the crop,
interpolation, mean and std; the training config rides along in ``config.json``. timm loads it
with ``timm.create_model("local-dir:DIR", pretrained=True)``, or, once uploaded (``hf upload
ORG/NAME DIR .``), ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import torch

from utils.checkpoint import ema_weights
from utils.file_io import atomic_publish, atomic_save, fsync_file, load_file

from models.stored import METADATA_KEY

from .inference import TrainedModel

# Each format and the output suffixes that name it; a format without suffixes is chosen by --format alone.
FORMAT_SUFFIXES: Dict[str, Tuple[str, ...]] = {"weights": (".pth", ".safetensors"), "onnx": (".onnx",), "hf": ()}


def output_format(output: str, given: Optional[str] = None) -> str:
    """The export format of ``output``: the one its suffix names; ``given`` (``--format``) must agree.

    Args:
        output: The file to write.
        given: ``--format``, or None.

    Raises:
        ValueError: an unknown suffix without ``--format``, or a ``--format`` the suffix contradicts.
    """
    implied = next((fmt for fmt, suffixes in FORMAT_SUFFIXES.items() if output.endswith(suffixes)), None)
    if given is None:
        if implied is None:
            known = ", ".join(suffix for suffixes in FORMAT_SUFFIXES.values() for suffix in suffixes)
            raise ValueError(f"output {output} ends in none of {known}: the format follows the suffix; name the "
                             "output e.g. model.safetensors or model.onnx")
        return implied
    if implied is not None and implied != given or implied is None and FORMAT_SUFFIXES.get(given):
        raise ValueError(f"--format {given} writes {' or '.join(FORMAT_SUFFIXES[given])} files but the output is "
                         f"{output}; drop --format (the format follows the suffix) or rename the output")
    return given

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
    found = checkpoint if isinstance(checkpoint, dict) else {}
    found = ema_weights(found) if ema else found.get("model")
    if not isinstance(found, dict):
        what = "EMA weights (it was not trained with TRAIN.EMA.ENABLE True)" if ema else "weights under 'model'"
        raise ValueError(f"{checkpoint_path} holds no {what}; {'drop --ema' if ema else 'pass a training checkpoint'}")
    # Own, contiguous copies: safetensors refuses tensors that share storage or are strided views.
    weights = OrderedDict((name.removeprefix("module."), tensor.detach().clone().contiguous())
                          for name, tensor in found.items())
    info = {"source": os.path.basename(checkpoint_path), "weights": key, "config": checkpoint.get("config") or {},
            "class_names": checkpoint.get("class_names")}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if output.endswith(".safetensors"):
        from safetensors.torch import save_file

        metadata = {name: value if isinstance(value, str) else json.dumps(value) for name, value in info.items()}

        def write(tmp: str) -> None:
            save_file(weights, tmp, metadata=metadata)
            fsync_file(tmp)

        atomic_publish(output, write, shared=True)
    else:
        weights._metadata = OrderedDict([(METADATA_KEY, info)])  # type: ignore[attr-defined]
        atomic_save(weights, output, shared=True)
    return weights


def export_hub_folder(checkpoint_path: str, output: str, ema: bool = False, cfg_file: str = "") -> TrainedModel:
    """Write the model of ``checkpoint_path`` as a Hub folder at ``output``; returns the model exported.

    timm's own ``save_for_hf`` writes it (safetensors), into a temporary folder renamed to
    ``output`` when complete; an existing, non-empty ``output`` is refused, never overwritten.

    Args:
        checkpoint_path: A training checkpoint of this framework or an exported weights file.
        output: The folder to create.
        ema: Export the EMA weights of a training checkpoint.
        cfg_file: The model's YAML config; "" takes the config stored in the file.
    """
    from timm.models import save_for_hf

    from config import config_to_dict
    from models.stored import ARCH_KEYS, HF_CONFIG_KEY, stored_data_config

    from .inference import load_trained_model

    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(f"output {output} exists and is not an empty folder; name a new folder for the Hub export "
                         "(an export never overwrites files)")
    trained = load_trained_model(checkpoint_path, cfg_file, ema=ema)
    config, model = config_to_dict(trained.config), trained.model
    # The model's pretrained_cfg describes these weights: timm's save_for_hf writes it as the folder's data config.
    # Classes named by their index (a file without names) get none: timm's inference.py then labels ImageNet's.
    names = None if trained.class_names == [str(i) for i in range(len(trained.class_names))] else trained.class_names
    model.pretrained_cfg = {**model.pretrained_cfg, **stored_data_config(config, names)}
    widths = trained.config.MODEL.CROSSFORMER
    model_args = {arg: list(widths[key]) if isinstance(widths[key], (list, tuple)) else widths[key]
                  for arg, key in ARCH_KEYS.items() if widths[key] is not None}
    tmp = f"{output.rstrip(os.sep)}.tmp-{os.getpid()}"
    try:
        save_for_hf(model, tmp, model_config={"label_names": names, HF_CONFIG_KEY: config},
                    model_args=model_args, safe_serialization=True)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return trained


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; a failure is one line on stderr.

    Args:
        argv: Arguments without the program name.
    """
    parser = argparse.ArgumentParser("python -m deploy.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a training checkpoint, e.g. output/.../ema_best.pth")
    parser.add_argument("output", help="the file to write: *.pth or *.safetensors (weights), *.onnx (onnx)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the weights")
    parser.add_argument("--format", choices=tuple(FORMAT_SUFFIXES),
                        help="weights: a bare state dict; onnx: an ONNX graph of the model (default: from the "
                             "output's suffix); hf: a Hugging Face Hub folder (config.json, model.safetensors) for "
                             "timm.create_model('local-dir:DIR')")
    onnx = parser.add_argument_group("onnx")
    onnx.add_argument("--cfg", default="", help="the model's YAML config (default: the one stored in the checkpoint)")
    onnx.add_argument("--img-size", type=int, help="input height and width (default: the config's DATA.IMG_SIZE)")
    onnx.add_argument("--batch-size", type=int, default=1, help="the fixed batch size (default 1)")
    onnx.add_argument("--dynamic-batch", action="store_true", help="a batch dimension that varies at run time")
    onnx.add_argument("--verify", action="store_true",
                      help="run the file with onnxruntime and print the largest logit difference to PyTorch")
    args = parser.parse_args(argv)
    try:
        args.format = output_format(args.output, args.format)
    except ValueError as e:
        parser.error(str(e))
    if args.format != "onnx" and (args.format != "hf" and args.cfg or args.img_size or args.dynamic_batch or args.verify
                                  or args.batch_size != 1):
        parser.error(f"--cfg, --img-size, --batch-size, --dynamic-batch and --verify apply to ONNX exports "
                     f"(*.onnx), not to {args.output}")
    exports = {"weights": _export_weights, "onnx": _export_onnx, "hf": _export_hub_folder}  # one function per format
    try:
        return exports[args.format](args)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 1


def _export_weights(args: argparse.Namespace) -> int:
    """A ``.pth`` / ``.safetensors`` output: the weights as a bare state dict."""
    weights = export_weights(args.checkpoint, args.output, args.ema)
    size = os.path.getsize(args.output)
    sys.stdout.write(f"wrote the {'EMA ' if args.ema else ''}weights of {args.checkpoint} to {args.output}: "
                     f"{len(weights)} tensors, {size / 2**20:.1f} MiB (checkpoint "
                     f"{os.path.getsize(args.checkpoint) / 2**20:.1f} MiB)\n")
    return 0


def _export_hub_folder(args: argparse.Namespace) -> int:
    """``--format hf``: the folder, then the lines that publish and load it."""
    trained = export_hub_folder(args.checkpoint, args.output, args.ema, args.cfg)
    config = trained.config
    sys.stdout.write(f"wrote the Hub folder {args.output} (config.json, model.safetensors): {config.MODEL.NAME}, "
                     f"{len(trained.class_names)} classes, input {config.DATA.IMG_SIZE} px\n"
                     f"load it:    timm.create_model('local-dir:{args.output}', pretrained=True)\n"
                     f"publish it: hf upload ORG/NAME {args.output} .  (then timm.create_model('hf-hub:ORG/NAME', "
                     "pretrained=True))\n")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    """An ``.onnx`` output: export, and with ``--verify`` compare with PyTorch under onnxruntime."""
    from .inference import load_trained_model
    from .onnx_export import export_onnx, max_logit_difference

    # onnxscript's optimizer warns once per LayerNorm it leaves unfolded: noise, not a problem of the graph.
    logging.getLogger("onnxscript.optimizer").setLevel(logging.ERROR)
    trained = load_trained_model(args.checkpoint, args.cfg, ema=args.ema)
    info = export_onnx(trained, args.output, args.img_size, args.batch_size, args.dynamic_batch)
    sys.stdout.write(f"wrote {args.output}: {trained.config.MODEL.NAME}, {len(trained.class_names)} classes, input "
                     f"(batch {info['batch']}, 3, {info['img_size']}, {info['img_size']}), opset {info['opset']}, "
                     f"{info['bytes'] / 2**20:.1f} MiB\n")
    if args.verify:
        batches = (1, 3) if args.dynamic_batch else (args.batch_size,)
        difference = max_logit_difference(args.output, trained.model, info["img_size"], batches)
        sys.stdout.write(f"onnxruntime vs PyTorch, batch {', '.join(map(str, batches))}: largest logit "
                         f"difference {difference:.2e}\n")
    return 0


if __name__ == "__main__":
    from utils.process import exit_with

    exit_with(main())
