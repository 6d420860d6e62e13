"""timm's RandAugment (``rand-m<M>[-n<N>][-mstd<S>]-inc1``) as DALI operators, for the ``dali`` loader.

``rand_augment`` applies the policy to a batch of (S, S, 3) uint8 images inside a DALI pipeline
built with ``enable_conditionals=True``. Each of timm's 15 increasing ops is rebuilt from DALI's
``auto_aug`` operators with timm's level function (``timm_rand_augment_suite``); magnitudes are
drawn per application as timm's ``AugmentOp`` draws them (``_magnitude_bins``).
``tests/test_parity.py`` checks every op and level against timm and PIL.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as aa
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from timm.data import IMAGENET_DEFAULT_MEAN


def parse_rand_augment(policy: str) -> Tuple[int, int, float]:
    """Read ``(num_layers, magnitude, magnitude_std)`` from a timm string such as ``rand-m9-mstd0.5-inc1``.

    Args:
        policy: ``AUG.AUTO_AUGMENT``.
    """
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"AUG.AUTO_AUGMENT={policy!r}: the dali loader supports RandAugment policies "
                         "'rand-m<M>[-n<N>][-mstd<S>][-inc1]' only; use DATA.LOADER pytorch for other policies")
    layers, magnitude, magnitude_std = 2, 10, 0.0
    for part in parts[1:]:
        if part.startswith("mstd"):
            magnitude_std = float(part[4:])
            if magnitude_std > 100:  # timm's switch to uniform magnitudes in [0, M]
                magnitude_std = float("inf")
        elif part.startswith("inc"):
            if part != "inc1":
                raise ValueError(f"AUG.AUTO_AUGMENT={policy!r}: the dali loader implements the increasing "
                                 "('inc1') RandAugment ops only; add -inc1 or use DATA.LOADER pytorch")
        elif part[:1] == "m" and part[1:].isdigit():
            magnitude = int(part[1:])
        elif part[:1] == "n" and part[1:].isdigit():
            layers = int(part[1:])
        else:
            raise ValueError(f"AUG.AUTO_AUGMENT={policy!r}: option {part!r} is not supported by the dali loader; "
                             "use m<M>, n<N>, mstd<S>, inc1 or DATA.LOADER pytorch")
    if "inc1" not in parts:
        raise ValueError(f"AUG.AUTO_AUGMENT={policy!r}: the dali loader implements the increasing ('inc1') "
                         "RandAugment ops only; add -inc1 or use DATA.LOADER pytorch")
    if not 0 <= magnitude <= 10:
        raise ValueError(f"AUG.AUTO_AUGMENT={policy!r}: magnitude {magnitude} is outside timm's 0..10")
    return layers, magnitude, magnitude_std


# RandAugment magnitudes on a grid of timm levels 0.0, 0.1, ..., 10.0 (bin = 10 x level): integer
# levels are exact, and mstd's continuous Gaussian magnitude is reproduced to 0.05 of a level.
BINS_PER_LEVEL = 10
MAGNITUDE_BINS = 10 * BINS_PER_LEVEL + 1
LEVELS = np.arange(MAGNITUDE_BINS) / BINS_PER_LEVEL

# timm's fill colour for the geometric RandAugment ops: the ImageNet mean on 0..255 (124, 116, 104).
FILL_COLOR = [min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN]


def _enhance_factor(level: float) -> np.float32:
    """timm's ``_enhance_increasing_level_to_arg`` for a signed level: 1 +- 0.09 x level, at least 0.1."""
    return np.float32(max(0.1, 1.0 + (level / 10) * 0.9))


def _sharpness_kernel(level: float) -> np.ndarray:
    """PIL's ``ImageEnhance.Sharpness`` (a blend of the image and its SMOOTH filter) as one 3x3 kernel."""
    factor = float(_enhance_factor(level))
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
    identity = np.zeros((3, 3), dtype=np.float32)
    identity[1, 1] = 1
    return (1 - factor) * smooth + factor * identity


def _posterize_mask(level: float) -> np.uint8:
    """timm's ``PosterizeIncreasing``: keep 4 - int(0.4 x level) bits (4 at level 0, 1 at 9, 0 at 10)."""
    bits = 4 - int((level / 10) * 4)
    return np.uint8((0xFF00 >> bits) & 0xFF)


def _solarize_threshold(level: float) -> np.int32:
    """timm's ``SolarizeIncreasing``: invert pixels >= 256 - int(25.6 x level)."""
    return np.int32(256 - min(256, int((level / 10) * 256)))


def _solarize_add_shift(level: float) -> np.uint8:
    """timm's ``SolarizeAdd``: add int(11 x level) to pixels < 128."""
    return np.uint8(min(128, int((level / 10) * 110)))


def _affine(m11: float, m12: float, m13: float, m21: float, m22: float, m23: float) -> np.ndarray:
    """PIL's ``Image.transform(AFFINE, data)`` matrix (output pixel -> input pixel) as a 3x3 homography."""
    return np.array([[m11, m12, m13], [m21, m22, m23], [0, 0, 1]], dtype=np.float32)


def _rotate_matrix(image_size: int):
    """timm's ``Rotate`` (3 degrees per level, counter-clockwise about the centre, PIL's ``rotate``)."""
    center = image_size / 2

    def matrix(level: float) -> np.ndarray:
        angle = -np.radians((level / 10) * 30)
        cos, sin = np.cos(angle), np.sin(angle)
        return _affine(cos, sin, center - cos * center - sin * center, -sin, cos, center + sin * center - cos * center)
    return matrix


def _shear_matrix(axis: int):
    """timm's ``ShearX`` / ``ShearY``: factor 0.03 per level."""
    def matrix(level: float) -> np.ndarray:
        factor = (level / 10) * 0.3
        return _affine(1, factor, 0, 0, 1, 0) if axis == 0 else _affine(1, 0, 0, factor, 1, 0)
    return matrix


def _translate_matrix(axis: int, image_size: int):
    """timm's ``TranslateXRel`` / ``TranslateYRel``: 4.5 % of the side per level."""
    def matrix(level: float) -> np.ndarray:
        pixels = (level / 10) * 0.45 * image_size
        return _affine(1, 0, pixels, 0, 1, 0) if axis == 0 else _affine(1, 0, 0, 0, 1, pixels)
    return matrix


def _warp(data, matrix, fill_value, interp_type):
    """The geometric ops: PIL's inverse (output -> input) mapping, per-channel fill, any interpolation."""
    return fn.experimental.warp_perspective(data, matrix=matrix, inverse_map=True, border_mode="constant",
                                            fill_value=fill_value, interp_type=interp_type)


# DALI's own ``aa.equalize`` / ``aa.sharpness`` call the deprecated aliases ``fn.experimental.equalize`` /
# ``fn.experimental.filter``, which warn at every pipeline build from inside DALI's own
# ``catch_warnings(simplefilter("default"))`` (so no ``warnings.filterwarnings`` can narrow them):
# the suite calls the operators under their current names instead.
@augmentation(name="equalize")
def _equalize(data, _):
    """DALI's ``aa.equalize`` (OpenCV's histogram equalisation)."""
    return fn.equalize(data)


@augmentation(param_device="auto")
def _sharpness(data, kernel):
    """DALI's ``aa.sharpness``: the image filtered with the (3, 3) ``kernel``."""
    return fn.filter(data, kernel)


def timm_rand_augment_suite(image_size: int) -> List:
    """DALI versions of timm's 15 increasing RandAugment ops (``_RAND_INCREASING_TRANSFORMS``, same order).

    Every op takes a bin of ``LEVELS`` (bin = 10 x timm level) and computes its parameter with timm's
    level function; the signed ops negate the level, as timm's ``_randomly_negate``. Geometric ops
    follow PIL's ``Image.transform`` geometry; they take ``fill_value`` and ``interp_type`` at the call.

    Args:
        image_size: Side of the (square) images (rotation centre, translation in pixels).
    """
    def signed(op, to_param, name):
        return op.augmentation(mag_range=LEVELS, randomly_negate=True, mag_to_param=to_param, name=name)

    def warp(to_param, name):
        return augmentation(_warp, mag_range=LEVELS, randomly_negate=True, mag_to_param=to_param, name=name)

    return [
        aa.auto_contrast, _equalize, aa.invert,
        warp(_rotate_matrix(image_size), "rotate"),
        aa.posterize.augmentation(mag_range=LEVELS, randomly_negate=False, mag_to_param=_posterize_mask),
        aa.solarize.augmentation(mag_range=LEVELS, randomly_negate=False, mag_to_param=_solarize_threshold),
        aa.solarize_add.augmentation(mag_range=LEVELS, randomly_negate=False, mag_to_param=_solarize_add_shift),
        signed(aa.color, _enhance_factor, "color"),
        signed(aa.contrast, _enhance_factor, "contrast"),
        signed(aa.brightness, _enhance_factor, "brightness"),
        signed(_sharpness, _sharpness_kernel, "sharpness"),
        warp(_shear_matrix(0), "shear_x"),
        warp(_shear_matrix(1), "shear_y"),
        warp(_translate_matrix(0, image_size), "translate_x"),
        warp(_translate_matrix(1, image_size), "translate_y"),
    ]


def _magnitude_bins(magnitude: int, magnitude_std: float):
    """Per-sample bins of ``LEVELS``, each sample with its random sign: timm's ``AugmentOp`` magnitude,
    ``clip(N(magnitude, magnitude_std), 0, 10)``, uniform in [0, magnitude] for an infinite
    ``magnitude_std``, the fixed ``magnitude`` for 0."""
    if magnitude_std == 0:
        bins = magnitude * BINS_PER_LEVEL
    else:
        level = (fn.random.uniform(range=[0.0, float(magnitude)]) if magnitude_std == float("inf") else
                 dmath.clamp(fn.random.normal(mean=float(magnitude), stddev=magnitude_std), 0.0, 10.0))
        bins = fn.cast(level * BINS_PER_LEVEL, dtype=types.INT32)  # DALI's cast rounds to the nearest
    return signed_bin(bins, random_sign=fn.random.uniform(values=[0, 1], dtype=types.INT32))


def rand_augment(images, policy: str, image_size: int, interp_type):
    """timm's RandAugment ``policy`` on (S, S, 3) uint8 ``images``: each of its layers draws an op uniformly
    (with replacement), applies it with probability 0.5 and draws its magnitude per application.

    Args:
        images: The pipeline's (S, S, 3) uint8 batch.
        policy: ``AUG.AUTO_AUGMENT`` (see ``parse_rand_augment``).
        image_size: ``S``.
        interp_type: DALI's interpolation of the geometric ops (``DATA.INTERPOLATION``).
    """
    layers, magnitude, magnitude_std = parse_rand_augment(policy)
    suite = timm_rand_augment_suite(image_size)
    for _ in range(layers):
        op_index = fn.random.uniform(values=list(range(len(suite))), dtype=types.INT32)
        magnitude_bin = _magnitude_bins(magnitude, magnitude_std)
        if fn.random.coin_flip(probability=0.5):
            images = select(suite, op_index, images, magnitude_bin=magnitude_bin,
                            num_magnitude_bins=MAGNITUDE_BINS, fill_value=FILL_COLOR, interp_type=interp_type)
    return images
