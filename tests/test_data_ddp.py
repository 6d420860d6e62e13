"""Two real processes (gloo) splitting a generated image folder into rank parts through the ``pytorch`` loader.

Every image is a flat colour that encodes its dataset index, so each rank can read back which
samples it received; the ranks all-gather those indices and rank 0 writes them out for the test.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from config import _C
from data import build_loader

WORLD_SIZE, BATCH_SIZE, EPOCHS = 2, 4, 2
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 8, 3  # 24 train images: 3 full batches per rank; 9 val: 5 + 4
STEP = 5  # red channel of image i is STEP * i (exact in PNG)


def _write_folder(root: Path) -> None:
    """``root/{train,val}/class<c>/<n>.png``: flat 20x20 images, red = STEP x (index in the sorted split)."""
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label in range(CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for n in range(per_class):
                index = label * per_class + n
                Image.new("RGB", (20, 20), (STEP * index, 40 * label, 128)).save(folder / f"{n:02d}.png")


def _indices(images: torch.Tensor) -> List[int]:
    """Dataset indices of a batch of flat images (B, 3, H, W), normalised."""
    red = images[:, 0].mean((1, 2)) * IMAGENET_DEFAULT_STD[0] + IMAGENET_DEFAULT_MEAN[0]  # (B,) in 0..1
    return torch.round(red * 255 / STEP).long().tolist()


def _worker(rank: int, root: str, store: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        cfg = _C.clone()
        cfg.DATA.DATASET, cfg.DATA.DATA_PATH, cfg.DATA.LOADER = "imagenet", root, "pytorch"
        cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_WORKERS = 16, BATCH_SIZE, 0
        cfg.MODEL.NUM_CLASSES = CLASSES
        cfg.AUG.AUTO_AUGMENT, cfg.AUG.COLOR_JITTER, cfg.AUG.REPROB = "", 0.0, 0.0
        loaders = build_loader(cfg, torch.device("cpu"))  # rank and world size from torch.distributed
        local: Dict[str, List[int]] = {}
        for epoch in range(EPOCHS):
            loaders.train.set_epoch(epoch)
            local[f"train{epoch}"] = [i for images, _ in loaders.train for i in _indices(images)]
        local["val"] = [i for images, _ in loaders.val for i in _indices(images)]
        local["val_labels"] = [int(y) for _, labels in loaders.val for y in labels]
        gathered: List[Dict[str, List[int]]] = [{} for _ in range(WORLD_SIZE)]
        dist.all_gather_object(gathered, local)
        if rank == 0:
            Path(result).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_processes_split_train_and_val_into_rank_parts(tmp_path: Path) -> None:
    _write_folder(tmp_path / "data")
    result = tmp_path / "result.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "data"), str(tmp_path / "store"), str(result)), nprocs=WORLD_SIZE)
    ranks = json.loads(result.read_text())
    num_train, num_val = CLASSES * TRAIN_PER_CLASS, CLASSES * VAL_PER_CLASS
    orders = []
    for epoch in range(EPOCHS):
        parts = [ranks[r][f"train{epoch}"] for r in range(WORLD_SIZE)]
        assert [len(part) for part in parts] == [num_train // WORLD_SIZE] * WORLD_SIZE
        assert not set(parts[0]) & set(parts[1])  # no sample on both ranks
        assert sorted(parts[0] + parts[1]) == list(range(num_train))  # together: the whole epoch
        orders.append(parts)
    assert orders[0] != orders[1]  # a new order every epoch
    val = [ranks[r]["val"] for r in range(WORLD_SIZE)]
    assert [len(part) for part in val] == [5, 4]
    assert sorted(val[0] + val[1]) == list(range(num_val))  # every val image exactly once
    labels = {i: y for r in range(WORLD_SIZE) for i, y in zip(ranks[r]["val"], ranks[r]["val_labels"])}
    assert all(labels[i] == i // VAL_PER_CLASS for i in range(num_val))
