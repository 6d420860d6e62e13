"""Write scikit-learn's handwritten digits as an ImageFolder tree, to train the demo recipe on real images.

The 1,797 8x8 grey-level scans (16 levels) become ``DST/{train,val}/<digit>/<n>.png`` (val: every
fifth image of each class, so the two splits are disjoint and balanced). The recipe of
``configs/demo.yaml`` then trains on them unchanged but for the data source::

    pip install scikit-learn
    python -m benchmarks.digits_folder /tmp/digits
    torchrun --nproc_per_node=2 main.py --cfg configs/demo.yaml --data-path /tmp/digits --tag digits \\
        --opts DATA.DATASET imagenet

scikit-learn is needed only for this script (it ships the data set); the project does not depend on it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

VAL_EVERY = 5


def write_digits(destination: Path) -> dict:
    """Write the split tree under ``destination`` (which must not exist) and return its image counts.

    Args:
        destination: The new ImageFolder root.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("this script needs scikit-learn, which ships the digits: pip install scikit-learn") from e
    if destination.exists():
        raise SystemExit(f"{destination} exists; name a new directory")
    digits = load_digits()
    counts = {"train": 0, "val": 0}
    seen = np.zeros(10, dtype=int)
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if seen[label] % VAL_EVERY == 0 else "train"
        seen[label] += 1
        folder = destination / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        # 0..16 grey levels -> 0..255, white digit on black as scanned.
        pixels = np.round(image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
        counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("destination", type=Path, help="new directory for train/ and val/")
    counts = write_digits(parser.parse_args().destination)
    print(f"wrote {counts['train']} train and {counts['val']} val images")


if __name__ == "__main__":
    main()
