"""Operator-by-operator parity of the DALI loader with timm / PIL / torchvision, at real sizes.

The references are the libraries themselves: timm's RandAugment ops and level functions (as
``create_transform`` builds them for the recipe), timm's eval transform, PIL and torchvision. The
images are made here: textured (smooth field, sharp edges, pixel noise) JPEGs and PNGs of odd and
even sizes, grayscale, CMYK, palette and an EXIF-rotated JPEG.
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug.core import signed_bin
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import RandAugment

from config import _C
from data import build_loader
from data.dali_augment import (BINS_PER_LEVEL, FILL_COLOR, MAGNITUDE_BINS, _magnitude_bins, parse_rand_augment,
                               timm_rand_augment_suite)
from data.dali_loader import INTERPOLATIONS, CropResizer, _crop_graph

CPU = torch.device("cpu")
SIZE = 224
LEVELS = (0, 5, 9, 10)  # magnitude bins checked: 0, the middle, the recipe's 9, the clip at 10
# timm's op name -> the DALI suite's op name, in timm's _RAND_INCREASING_TRANSFORMS order.
TIMM_TO_DALI = {"AutoContrast": "auto_contrast", "Equalize": "equalize", "Invert": "invert", "Rotate": "rotate",
                "PosterizeIncreasing": "posterize", "SolarizeIncreasing": "solarize", "SolarizeAdd": "solarize_add",
                "ColorIncreasing": "color", "ContrastIncreasing": "contrast", "BrightnessIncreasing": "brightness",
                "SharpnessIncreasing": "sharpness", "ShearX": "shear_x", "ShearY": "shear_y",
                "TranslateXRel": "translate_x", "TranslateYRel": "translate_y"}


def textured(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 photo-like texture: a smooth colour field, hard-edged rectangles, pixel noise."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), np.uint8))
    pixels = np.asarray(field.resize((width, height), Image.BICUBIC)).astype(np.int32)
    for _ in range(12):
        top, left = rng.integers(0, height), rng.integers(0, width)
        pixels[top:top + rng.integers(4, height // 3), left:left + rng.integers(4, width // 3)] = rng.integers(0, 256, 3)
    pixels += rng.integers(-24, 25, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def timm_rand_augment_ops(size: int = SIZE) -> list:
    """timm's RandAugment ops exactly as the recipe's ``create_transform`` builds them (fill, interpolation)."""
    transform = create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    return next(t for t in transform.transforms if isinstance(t, RandAugment)).ops


def timm_level_args(op, level: int, negate: bool, monkeypatch) -> tuple:
    """timm's own level function for ``op`` at ``level``, its random sign forced (negated when ``random() > 0.5``)."""
    monkeypatch.setattr(random, "random", lambda: 1.0 if negate else 0.0)
    try:
        return op.level_fn(float(level), op.hparams) if op.level_fn is not None else ()
    finally:
        monkeypatch.undo()


class _RecordingImage:
    """Stands in for a PIL image to record the geometry timm's op functions hand to PIL."""

    size = (SIZE, SIZE)

    def transform(self, size, method, data, **kwargs):
        self.call = ("transform", tuple(data), kwargs)

    def rotate(self, degrees, **kwargs):
        self.call = ("rotate", degrees, kwargs)


def run_dali(graph, images: List[np.ndarray], device: str = "cpu") -> List[List[np.ndarray]]:
    """Run ``graph`` (DataNode -> tuple of DataNodes) once on ``images`` in a DALI pipeline: CPU-only, or
    with ``device="gpu"`` on GPU 0 (the images are moved to the GPU first; outputs come back to the host)."""
    gpu = device == "gpu"

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=0 if gpu else None, seed=7,
                  enable_conditionals=True)
    def pipeline():
        data = fn.external_source(source=lambda: images, batch=True, layout="HWC", dtype=types.UINT8)
        return tuple(graph(data.gpu() if gpu else data))

    pipe = pipeline()
    pipe.build()
    outputs = [out.as_cpu() if gpu else out for out in pipe.run()]
    return [[np.array(out.at(i)) for i in range(len(images))] for out in outputs]


def dali_param(aug, level: int, negate: bool):
    """The parameter the DALI augmentation computes for ``level`` (bin 10 x level) and sign."""
    magnitude = aug.mag_range[level * BINS_PER_LEVEL]
    return np.asarray(aug.mag_to_param(-magnitude if negate and aug.randomly_negate else magnitude))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference on the 0..255 scale."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


# ----------------------------------------------------------------------------- RandAugment parameters


def test_suite_has_timms_ops_in_timms_order() -> None:
    names = [op.name for op in timm_rand_augment_ops()]
    assert [TIMM_TO_DALI[name] for name in names] == [aug.name for aug in timm_rand_augment_suite(SIZE)]
    assert len(names) == 15
    # timm's fill is the ImageNet mean on 0..255; its interpolation is the recipe's (bicubic).
    op = timm_rand_augment_ops()[0]
    assert FILL_COLOR == list(op.kwargs["fillcolor"]) == [124, 116, 104]
    assert op.kwargs["resample"] == Image.BICUBIC and INTERPOLATIONS["bicubic"] == types.INTERP_CUBIC


@pytest.mark.parametrize("level", LEVELS)
def test_rand_augment_parameters_equal_timms(level: int, monkeypatch) -> None:
    """Each op's DALI parameter at bins 0, 5, 9, 10 (both signs) equals what timm's level function gives."""
    smooth = np.array(ImageFilter.SMOOTH.filterargs[3], np.float32).reshape(3, 3) / ImageFilter.SMOOTH.filterargs[1]
    identity = np.zeros((3, 3), np.float32)
    identity[1, 1] = 1
    for op, aug in zip(timm_rand_augment_ops(), timm_rand_augment_suite(SIZE)):
        for negate in (False, True):
            args = timm_level_args(op, level, negate, monkeypatch)
            where = f"{op.name} level {level} {'negated' if negate else 'positive'}: timm {args}"
            if op.level_fn is None:
                assert aug.mag_range is None, where
                continue
            param = dali_param(aug, level, negate)
            name = aug.name
            if name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
                recorder = _RecordingImage()
                op.aug_fn(recorder, *args, **op.kwargs)
                if name == "rotate":  # PIL rotates by `degrees` counter-clockwise about the centre
                    degrees = recorder.call[1]
                    assert math.degrees(-math.atan2(param[0, 1], param[0, 0])) == pytest.approx(degrees, abs=1e-4), where
                    centre = param @ np.array([SIZE / 2, SIZE / 2, 1])
                    assert centre[:2] == pytest.approx([SIZE / 2, SIZE / 2], abs=1e-4), where
                else:  # the affine data timm passes to Image.transform, output pixel -> input pixel
                    assert param[:2].ravel() == pytest.approx(recorder.call[1], abs=1e-5), where
            elif name == "posterize":
                bits_kept = bin(int(param)).count("1")
                assert bits_kept == args[0] and int(param) == (0xFF << (8 - bits_kept)) & 0xFF, where
            elif name in ("solarize", "solarize_add"):
                assert int(param) == args[0], where
            elif name == "sharpness":  # PIL: blend(SMOOTH-filtered, image, factor) as one kernel
                assert param == pytest.approx((1 - args[0]) * smooth + args[0] * identity, abs=1e-6), where
            else:
                assert float(param) == pytest.approx(args[0], abs=1e-6), where
    # The recipe's level 9 posterize keeps 1 bit; level 0 keeps 4.
    posterize = next(aug for aug in timm_rand_augment_suite(SIZE) if aug.name == "posterize")
    assert int(dali_param(posterize, 9, False)) == 0x80 and int(dali_param(posterize, 0, False)) == 0xF0


# ----------------------------------------------------------------------------- RandAugment pixels


# Mean absolute difference (0..255) allowed between the DALI op and timm's PIL op on a 224 textured image.
OP_TOLERANCE = {
    "auto_contrast": 0.6,  # DALI scales in float, PIL through an integer lookup table
    "equalize": 4.0,  # DALI follows OpenCV's histogram formula, PIL its own (documented by DALI)
    "invert": 0.0, "posterize": 0.0, "solarize": 0.0, "solarize_add": 0.0,  # exact integer maps
    "color": 1.0,  # DALI saturates in its own colour space, PIL blends with the L image
    "contrast": 0.6,  # PIL rounds the grey mean to an integer
    "brightness": 0.6,  # rounding
    "sharpness": 0.6,  # PIL leaves the 1-pixel border unfiltered
    "rotate": 1.5, "shear_x": 1.0, "shear_y": 1.0, "translate_x": 1.0, "translate_y": 1.0,  # cubic kernels differ
}


def rand_augment_op_differences(monkeypatch, device: str = "cpu") -> Dict[Tuple[str, int, bool], float]:
    """Every op at levels 5 and 9, both signs, on a 224 textured image: mean absolute difference (0..255)
    between the DALI op (in a pipeline on ``device``) and timm's own PIL op, by (op, level, negated)."""
    image = textured(SIZE, SIZE, seed=1)
    suite = timm_rand_augment_suite(SIZE)
    cases = [(aug, level, negate) for aug in suite for level in (5, 9) for negate in (False, True)]

    def graph(data):
        outputs = []
        for aug, level, negate in cases:
            sign = fn.random.uniform(values=[int(negate)], dtype=types.INT32)
            outputs.append(aug(data, magnitude_bin=signed_bin(level * BINS_PER_LEVEL, random_sign=sign),
                               num_magnitude_bins=MAGNITUDE_BINS, fill_value=FILL_COLOR,
                               interp_type=types.INTERP_CUBIC))
        return outputs

    dali = run_dali(graph, [image], device)
    ops = {op.name: op for op in timm_rand_augment_ops()}
    by_name = {dali_name: ops[timm_name] for timm_name, dali_name in TIMM_TO_DALI.items()}
    differences = {}
    for (aug, level, negate), (out,) in zip(cases, dali):
        op = by_name[aug.name]
        args = timm_level_args(op, level, negate, monkeypatch)
        reference = np.asarray(op.aug_fn(Image.fromarray(image), *args, **op.kwargs))
        differences[(aug.name, level, negate)] = mad(out, reference)
    return differences


def test_rand_augment_ops_match_timm_on_pixels(monkeypatch) -> None:
    """Every op at levels 5 and 9, both signs, on a 224 textured image: DALI vs timm's own op."""
    report = rand_augment_op_differences(monkeypatch)
    for (name, level, negate), difference in report.items():
        assert difference <= OP_TOLERANCE[name], f"{name} level {level} negated={negate}: {difference:.3f}/255"
    print({key: round(value, 3) for key, value in report.items()})


def test_geometric_ops_fill_with_the_mean_and_interpolate_bicubic(monkeypatch) -> None:
    """Uncovered pixels get timm's fill colour; the result is closer to PIL's bicubic than to its bilinear."""
    image = textured(SIZE, SIZE, seed=2)
    translate = next(aug for aug in timm_rand_augment_suite(SIZE) if aug.name == "translate_x")
    shear = next(aug for aug in timm_rand_augment_suite(SIZE) if aug.name == "shear_x")

    def graph(data):
        sign = fn.random.uniform(values=[0], dtype=types.INT32)
        return [aug(data, magnitude_bin=signed_bin(9 * BINS_PER_LEVEL, random_sign=sign),
                    num_magnitude_bins=MAGNITUDE_BINS, fill_value=FILL_COLOR, interp_type=types.INTERP_CUBIC)
                for aug in (translate, shear)]

    (moved,), (sheared,) = run_dali(graph, [image])
    ops = {op.name: op for op in timm_rand_augment_ops()}
    reference = np.asarray(ops["TranslateXRel"].aug_fn(Image.fromarray(image),
                                                        *timm_level_args(ops["TranslateXRel"], 9, False, monkeypatch),
                                                        **ops["TranslateXRel"].kwargs))
    uncovered = slice(SIZE - round(0.9 * 0.45 * SIZE) + 2, None)  # level 9 moves the content left by 40.5 %
    assert (moved[:, uncovered] == np.array(FILL_COLOR, np.uint8)).all()
    assert (reference[:, uncovered] == np.array(FILL_COLOR, np.uint8)).all()
    op = ops["ShearX"]
    args = timm_level_args(op, 9, False, monkeypatch)
    bicubic = np.asarray(op.aug_fn(Image.fromarray(image), *args, fillcolor=tuple(FILL_COLOR), resample=Image.BICUBIC))
    bilinear = np.asarray(op.aug_fn(Image.fromarray(image), *args, fillcolor=tuple(FILL_COLOR), resample=Image.BILINEAR))
    assert mad(sheared, bicubic) < 0.6 * mad(sheared, bilinear)


def test_mstd_draws_per_sample_magnitudes_like_timm() -> None:
    """``mstd0.5``: per-sample magnitudes N(9, 0.5) clipped to [0, 10], as timm's AugmentOp draws them."""
    def graph(data):
        bins = _magnitude_bins(9, 0.5)
        return [fn.cast(bins.signed_magnitude_idx, dtype=types.INT32)]

    (signed,) = run_dali(graph, [np.zeros((1, 1, 3), np.uint8)] * 2000)
    levels = np.array([int(s) // 2 for s in signed]) / BINS_PER_LEVEL
    signs = np.array([int(s) % 2 for s in signed])
    assert levels.mean() == pytest.approx(9.0, abs=0.05) and levels.std() == pytest.approx(0.5, abs=0.05)
    assert levels.max() <= 10 and len(np.unique(levels)) > 20 and 0.45 < signs.mean() < 0.55
    (fixed,) = run_dali(lambda data: [fn.cast(_magnitude_bins(9, 0.0).signed_magnitude_idx, dtype=types.INT32)],
                        [np.zeros((1, 1, 3), np.uint8)] * 8)
    assert {int(s) // 2 for s in fixed} == {90}
    (uniform,) = run_dali(lambda data: [fn.cast(_magnitude_bins(9, float("inf")).signed_magnitude_idx,
                                                dtype=types.INT32)], [np.zeros((1, 1, 3), np.uint8)] * 2000)
    levels = np.array([int(s) // 2 for s in uniform]) / BINS_PER_LEVEL  # timm's mstd > 100: uniform in [0, M]
    assert levels.min() >= 0 and levels.max() <= 9 and levels.mean() == pytest.approx(4.5, abs=0.15)
    assert parse_rand_augment("rand-m9-mstd101-inc1") == (2, 9, float("inf"))


# ----------------------------------------------------------------------------- decode, crop, eval transform


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def exif_rotated_jpeg(path: Path, height: int, width: int, seed: int) -> None:
    """A JPEG whose EXIF orientation (6: rotate 90 degrees clockwise to display) PIL's loader ignores."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(Image.fromarray(textured(height, width, seed)), path, quality=92, exif=exif.tobytes())


def parity_dataset(root: Path) -> List[str]:
    """Textured validation images: odd and even margins, grayscale, CMYK, PNG, palette PNG, EXIF JPEG."""
    names = []
    specs = [("500x375", 375, 500, "RGB", "jpg"), ("375x500", 500, 375, "RGB", "jpg"), ("333x250", 250, 333, "RGB", "jpg"),
             ("481x359", 359, 481, "RGB", "jpg"), ("640x427", 427, 640, "L", "jpg"), ("300x400", 400, 300, "CMYK", "jpg"),
             ("410x300", 300, 410, "RGB", "png"), ("360x360", 360, 360, "P", "png")]
    for index, (tag, height, width, mode, ext) in enumerate(specs):
        image = Image.fromarray(textured(height, width, seed=10 + index)).convert(mode)
        path = root / "val" / f"class{index % 2}" / f"{index}_{tag}_{mode}.{ext}"
        _save(image, path, **({"quality": 92} if ext == "jpg" else {}))
        names.append(path.name)
    exif_rotated_jpeg(root / "val" / "class0" / "9_exif.jpg", 300, 420, seed=30)
    names.append("9_exif.jpg")
    for label in range(2):
        for n in range(2):
            _save(Image.fromarray(textured(64, 64, seed=40 + 2 * label + n)), root / "train" / f"class{label}" / f"{n}.jpg")
    return names


def parity_config(root: Path, loader: str, size: int, **aug):
    cfg = _C.clone()
    cfg.DATA.DATASET, cfg.DATA.DATA_PATH, cfg.DATA.LOADER = "imagenet", str(root), loader
    cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_WORKERS, cfg.MODEL.NUM_CLASSES = size, 4, 1, 2
    for key, value in aug.items():
        cfg.AUG[key] = value
    return cfg


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) normalised -> (B, H, W, 3) on 0..255."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("size", [224, 256, 384])
def test_dali_val_images_equal_timms_eval_transform(tmp_path: Path, size: int) -> None:
    """The DALI validation image of each file is timm's eval transform of it (PIL decode, no EXIF rotation)."""
    names = parity_dataset(tmp_path)
    outputs = {loader: to_pixels(torch.cat([x for x, _ in build_loader(parity_config(tmp_path, loader, size), CPU).val]))
               for loader in ("pytorch", "dali")}
    differences = [mad(a, b) for a, b in zip(outputs["pytorch"], outputs["dali"])]
    print(size, {name: round(d, 3) for name, d in zip(sorted(names), differences)})
    # Measured 0.17-0.23/255 (bicubic kernels and JPEG decoders round differently); a crop one pixel off
    # costs about 8/255 on such textures, a rotated decode far more.
    assert max(differences) < 0.5, differences


def test_dali_decoders_ignore_exif_orientation_in_training(tmp_path: Path) -> None:
    """The training decoder reads the stored pixels, not the EXIF-rotated view (PIL's ImageFolder does not rotate)."""
    path = tmp_path / "exif.jpg"
    exif_rotated_jpeg(path, 200, 400, seed=5)
    encoded = np.fromfile(path, dtype=np.uint8)
    cfg = _C.clone()
    cfg.AUG.SCALE, cfg.AUG.RATIO = [1.0, 1.0], [2.0, 2.0]  # the whole stored 400x200 image

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, seed=3)
    def pipeline():
        data = fn.external_source(source=lambda: [encoded], batch=True, dtype=types.UINT8)
        return _crop_graph(data, cfg, "cpu")

    pipe = pipeline()
    pipe.build()
    crop = np.array(pipe.run()[0].at(0))
    with Image.open(path) as stored:
        assert stored.getexif()[0x0112] == 6
        reference = np.asarray(stored.convert("RGB"))
    assert crop.shape == reference.shape == (200, 400, 3) and mad(crop, reference) < 1.0


def test_dali_train_crop_is_the_box_and_resizes_like_timm(tmp_path: Path) -> None:
    """DALI's random crop is an exact integer box of the image; resized like timm's RandomResizedCrop."""
    height, width = 375, 500
    rows, cols = np.mgrid[0:height, 0:width]
    coords = np.stack([cols % 256, rows % 256, cols // 256 + 16 * (rows // 256)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coords).save(buffer, format="PNG")
    encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    texture = textured(height, width, seed=6)
    cfg = _C.clone()

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, seed=11)
    def pipeline():
        data = fn.external_source(source=lambda: [encoded] * 16, batch=True, dtype=types.UINT8)
        return _crop_graph(data, cfg, "cpu")

    pipe = pipeline()
    pipe.build()
    (crops,) = pipe.run()
    resizer = CropResizer(None, SIZE, "bicubic")  # only its resize is used
    worst = 0.0
    for i in range(len(crops)):
        crop = np.array(crops.at(i))
        top = int(crop[0, 0, 1]) + 256 * (int(crop[0, 0, 2]) // 16)
        left = int(crop[0, 0, 0]) + 256 * (int(crop[0, 0, 2]) % 16)
        h, w = crop.shape[:2]
        assert np.array_equal(crop, coords[top:top + h, left:left + w])  # the exact box (i, j, h, w)
        # timm's RandomResizedCropAndInterpolation for that box: PIL crop + bicubic resize.
        reference = TF.resized_crop(Image.fromarray(texture), top, left, h, w, [SIZE, SIZE],
                                    interpolation=TF.InterpolationMode.BICUBIC)
        worst = max(worst, mad(resizer.resize(texture[top:top + h, left:left + w]), np.asarray(reference)))
    # torchvision's uint8 antialiased bicubic kernel is built to match PIL's; it differs by rounding only.
    assert worst < 0.6, worst
