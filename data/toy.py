"""``toy`` dataset: procedurally drawn JPEGs in the ImageNet folder layout, generated once and cached.

Each class is a shape (circle, square, triangle, ...). Colour, size, position, rotation, the
background (flat, gradient or smooth noise), a small distractor shape of another class, blur and
the JPEG quality vary per image, so only the shape tells the class: colour and position carry no
label. The shape is lighter than the background in every channel (one contrast polarity, as in
MNIST-like sets); with the polarity drawn per image a tiny transformer needs several times the
samples (measured: 40 % val top-1 after 80,000 samples against 89 % after 60,000, see docs/data.md).
The content is a pure function of the spec (including its seed).
"""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

Point = Tuple[float, float]

# Probability of a small distractor shape of another class.
DISTRACTOR_PROB = 0.5
# Background channels are drawn below this value, shape channels at or above it.
LIGHT_FROM = 150


@dataclass(frozen=True)
class ToySpec:
    """What to generate.

    Args:
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        image_size: Side of the square images in pixels.
        seed: Seed of the generator; the same spec always gives the same files.
    """

    train_per_class: int = 1200
    val_per_class: int = 100
    image_size: int = 32
    seed: int = 0

    @property
    def tag(self) -> str:
        """Cache sub-directory name (changes whenever the content would)."""
        return (f"v3-n{self.train_per_class}-{self.val_per_class}-s{self.image_size}-seed{self.seed}")


DEFAULT_TOY_SPEC = ToySpec()


def default_toy_root() -> Path:
    """``~/.cache/crossformer/toy``, used when ``DATA.TOY_ROOT`` is empty."""
    return Path(os.path.expanduser("~")) / ".cache" / "crossformer" / "toy"


def _regular_polygon(sides: int, rotation: float, inner_ratio: float = 1.0) -> List[Point]:
    """Unit-radius polygon vertices; ``inner_ratio < 1`` alternates radii (a star)."""
    count = sides * (2 if inner_ratio < 1.0 else 1)
    points = []
    for k in range(count):
        radius = inner_ratio if (inner_ratio < 1.0 and k % 2) else 1.0
        angle = rotation + 2 * math.pi * k / count
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


def _cross(rotation: float) -> List[Point]:
    """A plus sign of arm width 0.5 (unit radius)."""
    w = 0.3
    base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
            (-1, -w), (-w, -w)]
    return _rotate(base, rotation)


def _arrow(rotation: float) -> List[Point]:
    """An arrow pointing along ``rotation``."""
    base = [(-1, -0.25), (0.1, -0.25), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.25), (-1, 0.25)]
    return _rotate(base, rotation)


def _ell(rotation: float) -> List[Point]:
    """An L shape."""
    base = [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)]
    return _rotate(base, rotation)


def _rotate(points: List[Point], rotation: float) -> List[Point]:
    c, s = math.cos(rotation), math.sin(rotation)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, center: Point, radius: float, rotation: float,
                fill: Tuple[int, int, int]) -> None:
    """Draw one shape of class ``kind`` at ``center`` with outer ``radius`` (pixels)."""
    cx, cy = center
    if kind in ("circle", "ring"):
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.ellipse(box, outline=fill, width=max(2, int(radius * 0.35)))
        return
    if kind == "crescent":
        # Left half of the unit disc minus a narrower half-ellipse: a polygon, so any background shows.
        outer = [(math.cos(a), math.sin(a)) for a in np.linspace(math.pi / 2, 3 * math.pi / 2, 33)]
        inner = [(0.45 * math.cos(a) - 0.1, math.sin(a)) for a in np.linspace(3 * math.pi / 2, math.pi / 2, 33)]
        unit = _rotate(outer + inner, rotation)
    else:
        unit = SHAPES[kind](rotation)
    draw.polygon([(cx + radius * x, cy + radius * y) for x, y in unit], fill=fill)


SHAPES: Dict[str, Callable[[float], List[Point]]] = {
    "circle": lambda r: [],
    "square": lambda r: _regular_polygon(4, r),
    "triangle": lambda r: _regular_polygon(3, r),
    "star": lambda r: _regular_polygon(5, r, inner_ratio=0.45),
    "cross": _cross,
    "ring": lambda r: [],
    "hexagon": lambda r: _regular_polygon(6, r),
    "crescent": lambda r: [],
    "arrow": _arrow,
    "ell": _ell,
}
CLASSES: List[str] = list(SHAPES)


def _dark_colour(rng: random.Random) -> np.ndarray:
    return np.array([rng.randrange(LIGHT_FROM) for _ in range(3)], dtype=np.float32)


def _light_colour(rng: random.Random) -> Tuple[int, int, int]:
    return tuple(rng.randrange(LIGHT_FROM, 256) for _ in range(3))


def _background(rng: random.Random, size: int) -> Image.Image:
    """A random dark background: flat, a linear gradient or smoothed noise between two colours."""
    c1, c2 = _dark_colour(rng), _dark_colour(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    style = rng.randrange(3)
    if style == 0:
        t = np.zeros_like(xx)
    elif style == 1:
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(angle) + yy * math.sin(angle))
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    else:
        noise = np.random.default_rng(rng.randrange(2**32)).random((size // 8 + 1, size // 8 + 1))
        t = np.asarray(Image.fromarray((noise * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       dtype=np.float32) / 255.0
    pixels = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def draw_toy_image(label: int, rng: random.Random, size: int) -> Image.Image:
    """Draw one image of class ``label``.

    Args:
        label: Index into ``CLASSES``.
        rng: Source of every random choice (seed it for reproducibility).
        size: Image side in pixels.
    """
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    if rng.random() < DISTRACTOR_PROB:
        # A small distractor of another class, so "any shape present" is not the answer; it stays
        # well below the class shape's size so that the label is unambiguous after a random crop.
        other = CLASSES[(label + rng.randint(1, len(CLASSES) - 1)) % len(CLASSES)]
        r = size * rng.uniform(0.07, 0.11)
        _draw_shape(draw, other, (rng.uniform(r, size - r), rng.uniform(r, size - r)), r,
                    rng.uniform(0, 2 * math.pi), _light_colour(rng))
    radius = size * rng.uniform(0.24, 0.4)
    center = (rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
    _draw_shape(draw, CLASSES[label], center, radius, rng.uniform(0, 2 * math.pi), _light_colour(rng))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image


def generate_toy_dataset(root: Path, spec: ToySpec) -> None:
    """Write ``root/{train,val}/<class>/<n>.jpg`` for ``spec`` (overwrites nothing: ``root`` must be new).

    Args:
        root: Destination directory.
        spec: Counts, image size and seed.
    """
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for label, name in enumerate(CLASSES):
            class_dir = root / split / f"{label:02d}_{name}"
            class_dir.mkdir(parents=True)
            for n in range(per_class):
                rng = random.Random(f"{spec.seed}/{split}/{label}/{n}")
                image = draw_toy_image(label, rng, spec.image_size)
                image.save(class_dir / f"{n:05d}.jpg", quality=rng.randint(75, 95))


def ensure_toy_dataset(cache_root: Path, spec: ToySpec = DEFAULT_TOY_SPEC) -> Path:
    """Return the toy dataset directory for ``spec`` under ``cache_root``, generating it on first use.

    Generation goes to a temporary directory renamed into place, so concurrent processes (several
    ranks) never see a half-written dataset; the content is deterministic, so any winner is right.

    Args:
        cache_root: ``DATA.TOY_ROOT`` (or the default cache directory).
        spec: What to generate.
    """
    target = Path(cache_root) / spec.tag
    if (target / "train").is_dir() and (target / "val").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("generating the toy dataset (%d classes, %d + %d images per class) in %s", len(CLASSES),
                spec.train_per_class, spec.val_per_class, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.tag}-", dir=target.parent))
    try:
        generate_toy_dataset(tmp / "data", spec)
        try:
            os.rename(tmp / "data", target)
        except OSError:
            if not (target / "train").is_dir():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
