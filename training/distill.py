"""Knowledge distillation (DeiT's soft and hard forms): the teacher, and the loss that adds it.

The teacher is a timm model name plus a weights file (any timm model, our variants included), or
one of our own checkpoints or exported weights (``MODEL.DISTILL.TEACHER ""``: the architecture
comes from the config stored in the file), its model or EMA weights. It runs in eval mode, under
``no_grad``, in the run's autocast precision, on the images the student sees (mixed, when mixup
or CutMix are on), converted on the device to its own input size and normalisation.

CrossFormer has no class token, so there is no distillation token or second head as in DeiT: the
student's one head is trained on both terms,
``(1 - alpha) * base_loss + alpha * distill_loss``, where the distillation term is

* ``soft``: ``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``, summed over classes
  and averaged over the batch (Hinton et al.; DeiT divides the same sum by the class count too);
* ``hard``: cross-entropy of the student against the teacher's argmax (DeiT's hard distillation).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import clean_state_dict
from torch import nn
from yacs.config import CfgNode

from config import registered_models
from utils.file_io import load_file

logger = logging.getLogger(__name__)

_WEIGHT_KEYS = {False: ("model", "state_dict"), True: ("ema", "state_dict_ema", "model_ema")}


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes (a teacher's identity does not depend on where the file lies)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_of(checkpoint: Dict[str, Any], path: str, ema: bool) -> Dict[str, torch.Tensor]:
    """The state dict a teacher file holds: under a known key (EMA keys with ``ema``) or bare."""
    for key in _WEIGHT_KEYS[ema]:
        if isinstance(checkpoint.get(key), dict):
            return clean_state_dict(checkpoint[key])  # without DDP's "module." prefix
    if ema:
        raise ValueError(f"MODEL.DISTILL.TEACHER_WEIGHTS {path} holds no EMA weights (keys {', '.join(checkpoint)}); "
                         "set MODEL.DISTILL.TEACHER_EMA False to use its weights")
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return clean_state_dict(checkpoint)
    raise ValueError(f"MODEL.DISTILL.TEACHER_WEIGHTS {path} holds no weights under 'model' or 'state_dict' and is not "
                     "a state dict; pass a timm weights file or a checkpoint of this framework")


def _load_strict(model: nn.Module, weights: Dict[str, torch.Tensor], name: str, path: str) -> None:
    """Load every tensor of the teacher, or one error naming what does not fit."""
    own = model.state_dict()
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    wrong = [f"{key} {tuple(weights[key].shape)} (the model's {tuple(own[key].shape)})" for key in own
             if key in weights and weights[key].shape != own[key].shape]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in (("shape differs", wrong), ("missing", missing), ("not in the model", unexpected))
                 if keys]
        raise ValueError(f"MODEL.DISTILL.TEACHER_WEIGHTS {path} does not fit the teacher {name} "
                         f"({'; '.join(parts)}); pass the weights of that model, with as many classes as the data")
    model.load_state_dict(weights)


def _build_named(config: CfgNode) -> Tuple[nn.Module, Dict[str, Any], Optional[List[str]]]:
    """A timm model by name with the file's weights; (model, its image size and normalisation, class names)."""
    distill = config.MODEL.DISTILL
    path = distill.TEACHER_WEIGHTS
    try:
        model = timm.create_model(distill.TEACHER, pretrained=False, num_classes=config.MODEL.NUM_CLASSES)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ValueError(f"MODEL.DISTILL.TEACHER {distill.TEACHER!r} is not a timm model ({e}); pass a name from "
                         "timm.list_models(), or \"\" to take the model from the weights file's stored config") from None
    checkpoint = load_file(path)
    weights = _weights_of(checkpoint, path, distill.TEACHER_EMA)
    if distill.TEACHER in registered_models():  # one of ours (maybe an official CrossFormer file): its key names
        from models.crossformer import checkpoint_filter_fn

        weights = checkpoint_filter_fn({"model": weights}, model)
    _load_strict(model, weights, distill.TEACHER, path)
    cfg = model.pretrained_cfg
    view = {"img_size": int(cfg.get("input_size", (3, 224, 224))[-1]), "mean": tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
            "std": tuple(cfg.get("std", IMAGENET_DEFAULT_STD))}
    names = checkpoint.get("class_names") if isinstance(checkpoint, dict) else None
    return model, view, names


def _build_own(config: CfgNode) -> Tuple[nn.Module, Dict[str, Any], Optional[List[str]], str]:
    """One of our checkpoints or exported files, built from its stored config; (model, view, names, its name)."""
    from deploy.inference import load_trained_model

    trained = load_trained_model(config.MODEL.DISTILL.TEACHER_WEIGHTS, ema=config.MODEL.DISTILL.TEACHER_EMA)
    view = {"img_size": int(trained.config.DATA.IMG_SIZE), "mean": tuple(IMAGENET_DEFAULT_MEAN),
            "std": tuple(IMAGENET_DEFAULT_STD)}  # our loaders' normalisation
    stored_names = None if trained.class_names == [str(i) for i in range(len(trained.class_names))] \
        else trained.class_names
    return trained.model, view, stored_names, trained.config.MODEL.NAME


def check_teacher_classes(num_outputs: int, names: Optional[Sequence[str]], config: CfgNode,
                          class_names: Optional[Sequence[str]]) -> None:
    """A teacher must predict the data's classes: the same count and, where both are named, the same names.

    Args:
        num_outputs: The teacher's number of logits.
        names: The class names stored with the teacher's weights, or None.
        config: Reads ``MODEL.NUM_CLASSES`` and the teacher's keys (for the message).
        class_names: The data's class names in label order, or None (generated data).
    """
    weights = config.MODEL.DISTILL.TEACHER_WEIGHTS
    if num_outputs != config.MODEL.NUM_CLASSES:
        raise ValueError(f"the teacher ({weights}) predicts {num_outputs} classes but the data has "
                         f"{config.MODEL.NUM_CLASSES}; distill from a teacher trained on these classes")
    if names is not None and class_names is not None and list(names) != list(class_names):
        differ = next(i for i, (a, b) in enumerate(zip(names, class_names)) if a != b)
        raise ValueError(f"the teacher ({weights}) was trained on other classes than the data's: class {differ} is "
                         f"{names[differ]!r} for the teacher and {class_names[differ]!r} in the data; distill from a "
                         "teacher trained on these classes, in the same order")


class Distiller(nn.Module):
    """The teacher and the distillation term; :meth:`forward` turns the base loss into the distilled loss.

    Args:
        teacher: The teacher network (put in eval mode, its parameters frozen).
        kind: ``"soft"`` or ``"hard"``.
        alpha: Weight of the distillation term.
        tau: Temperature of the soft term.
        img_size: The teacher's input size.
        mean: The teacher's normalisation mean (0..1 scale).
        std: The teacher's normalisation std (0..1 scale).
        identity: What the checkpoint records about the teacher (compared on resume).
    """

    def __init__(self, teacher: nn.Module, kind: str, alpha: float, tau: float, img_size: int,
                 mean: Sequence[float], std: Sequence[float], identity: Dict[str, Any]) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.kind, self.alpha, self.tau, self.img_size = kind, alpha, tau, img_size
        self.identity = identity
        # Student images are normalised with ImageNet's mean / std; x * scale + shift is the teacher's normalisation.
        student_mean, student_std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
        scale = student_std / torch.tensor(std)
        self.same_input = bool(torch.allclose(scale, torch.ones(3)) and torch.allclose(
            torch.tensor(mean), student_mean))
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((student_mean - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1),
                             persistent=False)
        self._seconds = 0.0
        self._calls = 0
        self._events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def train(self, mode: bool = True) -> "Distiller":
        """The teacher stays in eval mode whatever the caller asks (no dropout, drop path or BN updates)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 3, H, W, normalised for the student) at the teacher's size and normalisation."""
        if not self.same_input:
            images = images * self.scale + self.shift
        if images.shape[-1] != self.img_size or images.shape[-2] != self.img_size:
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False,
                                   antialias=images.shape[-1] > self.img_size)
        return images

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (B, num_classes) on the student's batch, timed (:meth:`pop_seconds`)."""
        cuda = images.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            began = time.perf_counter()
        logits = self.teacher(self.teacher_input(images))
        if cuda:
            end.record()
            self._events.append((start, end))
        else:
            self._seconds += time.perf_counter() - began
        self._calls += 1
        return logits

    def pop_seconds(self) -> Tuple[float, int]:
        """(seconds the teacher ran, forward calls) since the last call; synchronises with CUDA events."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
            self._events.clear()
        result = (self._seconds, self._calls)
        self._seconds, self._calls = 0.0, 0
        return result

    def forward(self, images: torch.Tensor, outputs: torch.Tensor, base_loss: torch.Tensor) -> torch.Tensor:
        """The distilled loss of a micro-batch.

        Args:
            images: The batch the student saw (after mixup), (B, 3, H, W).
            outputs: The student's logits (B, num_classes).
            base_loss: The loss against the labels (``TRAIN.LOSS``).
        """
        teacher = self.teacher_logits(images).float()
        student = outputs.float()
        if self.kind == "soft":
            tau = self.tau
            term = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                            reduction="batchmean", log_target=True) * (tau * tau)
        else:  # "hard"
            term = F.cross_entropy(student, teacher.argmax(dim=1))
        return base_loss * (1.0 - self.alpha) + term * self.alpha


def build_distiller(config: CfgNode, device: torch.device,
                    class_names: Optional[Sequence[str]] = None) -> Optional[Distiller]:
    """The teacher ``MODEL.DISTILL`` describes, on ``device``, or None when ``MODEL.DISTILL.TYPE`` is none.

    Args:
        config: Reads ``MODEL.DISTILL.*`` and ``MODEL.NUM_CLASSES``.
        device: Where the teacher runs.
        class_names: The data's class names (checked against the teacher's, when its file names them).

    Raises:
        ValueError: an unknown teacher, a weights file that does not fit it, or other classes than the data's.
    """
    distill = config.MODEL.DISTILL
    if distill.TYPE == "none":
        return None
    path = distill.TEACHER_WEIGHTS
    if distill.TEACHER:
        model, view, names = _build_named(config)
        name = distill.TEACHER
    else:
        model, view, names, name = _build_own(config)
    num_outputs = model.num_classes if hasattr(model, "num_classes") else model.get_classifier().out_features
    check_teacher_classes(int(num_outputs), names, config, class_names)
    if config.MODEL.DISTILL.TEACHER_IMG_SIZE is not None:
        view["img_size"] = int(config.MODEL.DISTILL.TEACHER_IMG_SIZE)
    identity = {"model": name, "weights_sha256": file_sha256(path), "ema": bool(distill.TEACHER_EMA),
                "img_size": view["img_size"], "mean": list(view["mean"]), "std": list(view["std"])}
    alpha, tau = config.MODEL.DISTILL.ALPHA, config.MODEL.DISTILL.TAU
    distiller = Distiller(model, distill.TYPE, alpha, tau, view["img_size"], view["mean"], view["std"],
                          identity).to(device)
    logger.info("distillation (%s, alpha %g%s) from teacher %s (%s%s, %.2fM parameters) at %d px, normalisation "
                "mean %s std %s", distill.TYPE, alpha, f", tau {tau:g}" if distill.TYPE == "soft" else "",
                name, os.path.basename(path), ", EMA weights" if distill.TEACHER_EMA else "",
                sum(p.numel() for p in model.parameters()) / 1e6, view["img_size"],
                tuple(round(v, 3) for v in view["mean"]), tuple(round(v, 3) for v in view["std"]))
    return distiller


def teacher_differences(saved: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]]) -> List[str]:
    """What differs between a checkpoint's teacher and this run's (``key old -> new``); [] when either is absent.

    Args:
        saved: The checkpoint's ``teacher`` record.
        current: This run's (:attr:`Distiller.identity`).
    """
    if not saved or not current:
        return []
    return [f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in sorted(saved.keys() | current.keys())
            if saved.get(key) != current.get(key)]
