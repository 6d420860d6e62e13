"""Data pipelines: datasets, loaders, layout checks, order, rank parts, parity, corrupt files."""
from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from config import _C
from data import build_loader, build_mixup
from data.common import EpochBatchSampler
from data.folder import scan_image_folder
from data.loader import read_or_replace
from data.split import UnreadableImage
from data.toy import CLASSES, DEFAULT_TOY_SPEC, ToySpec, generate_toy_dataset
from tests.helpers import REPO_ROOT, run

LOADERS = ["pytorch", "dali"]
CPU = torch.device("cpu")
TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 3  # 120 train and 30 val images


@pytest.fixture
def image_root(toy_folder: Path) -> Path:
    """conftest's toy folder: TRAIN_PER_CLASS and VAL_PER_CLASS images of each of 10 classes."""
    return toy_folder


def make_config(root: Path, loader: str, **overrides):
    """Config for ``root`` with 32x32 images, batch 8, one worker; ``overrides`` are ``SECTION__KEY=value``."""
    cfg = _C.clone()
    cfg.DATA.DATASET = "imagenet"
    cfg.DATA.DATA_PATH = str(root)
    cfg.DATA.LOADER = loader
    cfg.DATA.IMG_SIZE = 32
    cfg.DATA.BATCH_SIZE = 8
    cfg.DATA.NUM_WORKERS = 1
    cfg.MODEL.NUM_CLASSES = 10
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> 0..1."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return images * std + mean


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_resume_and_rank_parts() -> None:
    cfg = _C.clone()
    cfg.DATA.DATASET = "synthetic"
    cfg.DATA.SYNTHETIC_TRAIN_SIZE, cfg.DATA.SYNTHETIC_VAL_SIZE = 100, 23
    cfg.DATA.BATCH_SIZE, cfg.DATA.IMG_SIZE, cfg.MODEL.NUM_CLASSES = 8, 16, 5
    loaders = build_loader(cfg, CPU)
    assert (len(loaders.train), len(loaders.val), loaders.num_classes) == (12, 3, 5)
    loaders.train.set_epoch(2)
    batches = list(loaders.train)
    images, labels = batches[0]
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 5
    fresh = build_loader(cfg, CPU).train
    fresh.set_epoch(2, start_batch=7)
    resumed = list(fresh)
    assert len(resumed) == 5
    for (a, b), (c, d) in zip(batches[7:], resumed):
        assert torch.equal(a, c) and torch.equal(b, d)
    loaders.train.set_epoch(3)
    assert not torch.equal(next(iter(loaders.train))[0], images)
    # Validation: ranks together see each of the 23 samples once.
    sizes = [sum(len(y) for _, y in build_loader(cfg, CPU, rank=r, world_size=3).val) for r in range(3)]
    assert sizes == [8, 8, 7]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_synthetic_val_is_a_function_of_seed_and_index(world_size: int) -> None:
    """The same checkpoint evaluates on the same synthetic val set under any number of processes."""
    cfg = _C.clone()
    cfg.DATA.DATASET = "synthetic"
    cfg.DATA.SYNTHETIC_TRAIN_SIZE, cfg.DATA.SYNTHETIC_VAL_SIZE = 64, 151  # several chunks, uneven rank parts
    cfg.DATA.BATCH_SIZE, cfg.DATA.IMG_SIZE, cfg.MODEL.NUM_CLASSES = 16, 8, 7

    def gathered(world: int) -> Tuple[torch.Tensor, torch.Tensor]:
        batches = [batch for rank in range(world) for batch in build_loader(cfg, CPU, rank, world).val]
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    reference_images, reference_labels = gathered(1)
    images, labels = gathered(world_size)
    assert images.shape == (151, 3, 8, 8) and len(reference_labels.unique()) == 7
    assert torch.equal(images, reference_images) and torch.equal(labels, reference_labels)
    cfg.SEED = 1
    assert not torch.equal(gathered(world_size)[0], reference_images)


# ----------------------------------------------------------------------------- toy dataset


def test_toy_generation_is_deterministic(tmp_path: Path) -> None:
    spec = ToySpec(2, 1, 32, seed=3)
    generate_toy_dataset(tmp_path / "a", spec)
    generate_toy_dataset(tmp_path / "b", spec)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpg"))
    assert files_a == files_b and len(files_a) == 3 * len(CLASSES) >= 30
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    other = ToySpec(2, 1, 32, seed=4)
    generate_toy_dataset(tmp_path / "c", other)
    assert (tmp_path / "c" / files_a[0]).read_bytes() != (tmp_path / "a" / files_a[0]).read_bytes()


def test_toy_dataset_through_build_loader(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "pytorch", DATA__DATASET="toy", DATA__TOY_ROOT=str(tmp_path), DATA__NUM_WORKERS=0)
    loaders = build_loader(cfg, CPU)  # generates the default toy dataset once
    spec = DEFAULT_TOY_SPEC
    assert loaders.num_classes == len(CLASSES) == 10
    assert len(loaders.train) == spec.train_per_class * 10 // 8
    assert sum(1 for _ in (tmp_path / spec.tag / "val").rglob("*.jpg")) == spec.val_per_class * 10
    images, labels = next(iter(loaders.val))
    assert images.shape == (8, 3, 32, 32)
    cfg.MODEL.NUM_CLASSES = 1000
    with pytest.raises(ValueError, match="set MODEL.NUM_CLASSES 10"):
        build_loader(cfg, CPU)  # cached: no regeneration, only the check


# ----------------------------------------------------------------------------- folder layout errors


def _copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def test_layout_errors(image_root: Path, tmp_path: Path) -> None:
    root = _copy(image_root, tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path / 'missing'} does not exist"):
        scan_image_folder(tmp_path / "missing", 10)
    with pytest.raises(ValueError, match="set MODEL.NUM_CLASSES 10"):
        scan_image_folder(root, 1000)
    empty = root / "train" / "00_circle"
    for file in empty.iterdir():
        file.unlink()
    with pytest.raises(ValueError, match=f"class directory {empty} has no images"):
        scan_image_folder(root, 10)
    shutil.rmtree(empty)
    with pytest.raises(ValueError, match=r"differ \(only in train: \[\]; only in val: \['00_circle'\]\)"):
        scan_image_folder(root, 10)
    shutil.rmtree(root / "val")
    with pytest.raises(ValueError, match=f"split directory {root / 'val'} is missing"):
        scan_image_folder(root, 9)
    cfg = make_config(root, "pytorch", DATA__DATA_PATH="")
    with pytest.raises(ValueError, match="DATA.DATA_PATH is empty"):
        build_loader(cfg, CPU)


def test_file_list_cache_skips_the_listing_until_a_directory_changes(image_root: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from data import folder

    root = _copy(image_root, tmp_path)
    cache = folder.FileListCache(tmp_path / "cache")
    scanned = folder.scan_image_folder(root, 10, cache)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.json")) == sorted(
        cache.path(root / split).name for split in ("train", "val"))
    real_scandir, listed = os.scandir, []

    def scandir(path):  # counts the class directories listed
        listed.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(folder.os, "scandir", scandir)
    with caplog.at_level(logging.INFO, logger="data.folder"):
        again = folder.scan_image_folder(root, 10, cache)
    assert listed == [] and "from the file list cache" in caplog.text
    assert [(s.classes, s.samples) for s in again] == [(s.classes, s.samples) for s in scanned]

    # A new image in one class changes that directory: the split is listed again and includes it.
    new = root / "train" / "01_square" / "zz_new.jpg"
    shutil.copy(next((root / "train" / "01_square").iterdir()), new)
    train, val = folder.scan_image_folder(root, 10, cache)
    assert (str(new), 1) in train.samples and len(train) == len(scanned[0]) + 1
    assert any(path.startswith(str(root / "train")) for path in listed)
    assert not any(path.startswith(str(root / "val")) for path in listed)  # val unchanged: from the cache
    # A damaged cache file is ignored (and rewritten), never an error.
    cache.path(root / "val").write_text("{not json")
    assert folder.scan_image_folder(root, 10, cache)[1].samples == val.samples
    assert json.loads(cache.path(root / "val").read_text())["classes"] == val.classes


def _start_on_a_node(root: str, cache_dir: str, start, results) -> None:
    """One process of a simulated node: wait for every process, then scan with the node's cache.
    Puts (cache_dir, splits listed by this process, the lists) on ``results``."""
    from data import folder

    listed = []
    real_list_split = folder._list_split

    def list_split(split_dir):  # slow enough that the other processes arrive while it runs
        listed.append(split_dir.name)
        time.sleep(0.5)
        return real_list_split(split_dir)

    folder._list_split = list_split
    start.wait()
    train, val = folder.scan_image_folder(Path(root), 10, folder.FileListCache(Path(cache_dir)))
    results.put((cache_dir, listed, [train.classes, train.samples, val.samples]))


def _start_nodes(root: Path, cache_dirs: List[Path], processes_per_node: int) -> List[tuple]:
    """Start ``processes_per_node`` processes per cache directory at once; their results."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # no re-import: the scan is what is measured
    start = context.Barrier(len(cache_dirs) * processes_per_node)
    results = context.Queue()
    procs = [context.Process(target=_start_on_a_node, args=(str(root), str(cache_dir), start, results))
             for cache_dir in cache_dirs for _ in range(processes_per_node)]
    for proc in procs:
        proc.start()
    found = [results.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return found


def test_one_process_per_node_scans_the_others_wait_and_read_its_list(image_root: Path, tmp_path: Path) -> None:
    """Two nodes with a cache directory each, two processes per node, started at the same moment:
    one scan per node and split, every process gets the same lists; the next start scans nothing;
    on one shared cache directory four processes scan once."""
    root = _copy(image_root, tmp_path)
    reference = scan_image_folder(root, 10)
    expected = [reference[0].classes, reference[0].samples, reference[1].samples]
    nodes = [tmp_path / "node0_cache", tmp_path / "node1_cache"]
    for attempt in ("first start", "restart"):
        found = _start_nodes(root, nodes, processes_per_node=2)
        for node in nodes:
            scans = [split for cache_dir, listed, _ in found if cache_dir == str(node) for split in listed]
            assert sorted(scans) == ([] if attempt == "restart" else ["train", "val"]), (attempt, node, scans)
        assert all(json.loads(json.dumps(lists)) == json.loads(json.dumps(expected)) for _, _, lists in found)
    shared = _start_nodes(root, [tmp_path / "shared_cache"], processes_per_node=4)
    assert sorted(split for _, listed, _ in shared for split in listed) == ["train", "val"]
    assert all(json.loads(json.dumps(lists)) == json.loads(json.dumps(expected)) for _, _, lists in shared)


def test_num_workers_default_is_the_cores_per_local_process_capped_and_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from data.build import MAX_AUTO_WORKERS, num_workers

    cfg = _C.clone()
    assert cfg.DATA.NUM_WORKERS is None  # the default: decided on the machine that runs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    for local_processes, expected in (("8", 8), ("16", 4), ("1", MAX_AUTO_WORKERS), ("128", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
        with caplog.at_level(logging.INFO, logger="data.build"):
            assert num_workers(cfg) == expected
        assert f"{expected} DALI CPU threads per process: 64 CPU cores / {local_processes} process(es)" in caplog.text
        caplog.clear()
    cfg.DATA.NUM_WORKERS, cfg.DATA.LOADER = 3, "pytorch"
    with caplog.at_level(logging.INFO, logger="data.build"):
        assert num_workers(cfg) == 3
    assert "3 DataLoader worker processes per process (DATA.NUM_WORKERS)" in caplog.text


def test_nested_class_folders_are_scanned_as_torchvision_imagefolder_does(tmp_path: Path) -> None:
    """Images in subfolders of a class belong to it, in ImageFolder's order; a change deep in a
    class folder invalidates the cached list."""
    from torchvision.datasets import ImageFolder

    from data import folder

    root = tmp_path / "data"
    layout = ["a/1.jpg", "a/x/2.jpg", "a/x/y/3.png", "a/x-y/4.jpg", "a/x-y/readme.txt", "b/5.JPEG", "b/b2/6.jpg"]
    for split in ("train", "val"):
        for relative in layout:
            path = root / split / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    cache = folder.FileListCache(tmp_path / "cache")
    train, _ = folder.scan_image_folder(root, 2, cache)
    reference = ImageFolder(str(root / "train"), loader=lambda path: path)
    assert train.samples == reference.samples and train.classes == reference.classes
    new = root / "train" / "a" / "x" / "y" / "7.jpg"
    new.write_bytes(b"x")
    assert (str(new), 0) in folder.scan_image_folder(root, 2, cache)[0].samples


# ----------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("loader", LOADERS)
def test_loader_batches(image_root: Path, loader: str) -> None:
    loaders = build_loader(make_config(image_root, loader), CPU)
    assert loaders.num_classes == 10
    assert len(loaders.train) == 120 // 8 and len(loaders.val) == -(-30 // 8)
    train = list(loaders.train)
    assert len(train) == 15
    for images, labels in train:
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and images.device == CPU
        assert labels.shape == (8,) and labels.dtype == torch.int64
        assert torch.isfinite(images).all() and 0 <= labels.min() and labels.max() < 10
    # Normalised: the batch statistics are near 0 / 1, not the 0..255 or 0..1 scale.
    all_images = torch.cat([images for images, _ in train])
    assert -1.0 < all_images.mean() < 1.0 and 0.5 < all_images.std() < 2.0
    val = list(loaders.val)
    assert [len(labels) for _, labels in val] == [8, 8, 8, 6]
    pixels = denormalise(torch.cat([images for images, _ in val]))
    assert pixels.min() > -0.01 and pixels.max() < 1.01
    # Validation walks the sorted file list: labels are 3 of each class, in order.
    assert torch.cat([labels for _, labels in val]).tolist() == [c for c in range(10) for _ in range(3)]


@pytest.mark.parametrize("loader", LOADERS)
def test_order_is_a_function_of_seed_and_epoch(image_root: Path, loader: str) -> None:
    cfg = make_config(image_root, loader, AUG__REPROB=0.0)
    first = build_loader(cfg, CPU).train
    first.set_epoch(1)
    full = list(first)
    second = build_loader(make_config(image_root, loader, AUG__REPROB=0.0, DATA__NUM_WORKERS=2), CPU).train
    second.set_epoch(1, start_batch=4)
    resumed = list(second)
    assert len(resumed) == len(full) - 4
    for (_, labels_a), (_, labels_b) in zip(full[4:], resumed):
        assert torch.equal(labels_a, labels_b)
    second.set_epoch(2)
    other_epoch = torch.cat([labels for _, labels in second])
    assert not torch.equal(other_epoch, torch.cat([labels for _, labels in full]))
    # Abandoning a pass mid-epoch and repositioning continues exactly.
    first.set_epoch(1, start_batch=2)
    iterator = iter(first)
    next(iterator)
    first.set_epoch(1, start_batch=10)
    assert torch.equal(next(iter(first))[1], full[10][1])


def test_pytorch_resume_is_bitwise_exact(image_root: Path) -> None:
    """Augmentation (incl. random erasing) depends on (SEED, epoch, index) only, not on workers."""
    direct = build_loader(make_config(image_root, "pytorch", DATA__NUM_WORKERS=0), CPU).train
    direct.set_epoch(3)
    full = list(direct)
    resumed = build_loader(make_config(image_root, "pytorch", DATA__NUM_WORKERS=2), CPU).train
    resumed.set_epoch(3, start_batch=9)
    for (images_a, labels_a), (images_b, labels_b) in zip(full[9:], resumed):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    state, python_state = torch.get_rng_state(), random.getstate()
    list(direct)  # per-sample seeding (transforms in the workers, erasing here) restores the caller's generators
    assert torch.equal(state, torch.get_rng_state()) and python_state == random.getstate()


def test_dali_random_erasing_is_pure_in_seed_epoch_batch_rank_and_sample(image_root: Path) -> None:
    """The DALI loader's erasing (on the pipeline's device; CPU here) is ``erase_per_sample`` under the
    seeds of (SEED, epoch, batch, rank, sample): what the global generators hold does not matter."""
    from timm.data.random_erasing import RandomErasing

    from data.common import SALT_BATCH_AUGMENT, erase_per_sample, mix_seed

    def first_batches(reprob: float, global_seed: int) -> List[torch.Tensor]:
        cfg = make_config(image_root, "dali", AUG__REPROB=reprob, AUG__AUTO_AUGMENT="", AUG__COLOR_JITTER=0.0)
        loader = build_loader(cfg, CPU, rank=1, world_size=2).train
        loader.set_epoch(3, start_batch=1)
        torch.manual_seed(global_seed)  # the global streams differ between the passes
        random.seed(global_seed)
        return [images for (images, _), _ in zip(loader, range(2))]

    erased = first_batches(1.0, global_seed=1)
    assert all(torch.equal(a, b) for a, b in zip(erased, first_batches(1.0, global_seed=2)))
    cfg = make_config(image_root, "dali")
    for batch, (images, expected) in enumerate(zip(first_batches(0.0, global_seed=3), erased), start=1):
        assert not torch.equal(images, expected)  # every image was erased (REPROB 1)
        erase_per_sample(RandomErasing(1.0, mode=cfg.AUG.REMODE, max_count=cfg.AUG.RECOUNT, device="cpu"), images,
                         [mix_seed(cfg.SEED, SALT_BATCH_AUGMENT, 3, batch, 1, i) for i in range(len(images))])
        assert torch.equal(images, expected)


def test_pytorch_loader_is_timms_prefetcher_pipeline(image_root: Path) -> None:
    """Each batch is timm's own pipeline: ``create_transform(use_prefetcher=True)`` per sample (under the
    sample's seed), ``fast_collate``, ``PrefetchLoader``'s normalisation, then timm's ``RandomErasing``
    per image under a seed of (SEED, epoch, index), bit for bit."""
    from timm.data import create_transform
    from timm.data.loader import PrefetchLoader, fast_collate
    from timm.data.random_erasing import RandomErasing
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from data.common import SALT_AUGMENT, SALT_BATCH_AUGMENT, mix_seed, seeded_rng
    from data.split import load_rgb

    cfg = make_config(image_root, "pytorch", DATA__NUM_WORKERS=2, AUG__REPROB=0.5)
    loaders = build_loader(cfg, CPU)
    # Validation: timm's eval transform over the sorted file list, normalised by timm's prefetcher.
    val_set = ImageFolder(str(image_root / "val"), create_transform(32, is_training=False, use_prefetcher=True,
                                                                    interpolation=cfg.DATA.INTERPOLATION,
                                                                    crop_pct=cfg.TEST.CROP_PCT))
    timm_val = PrefetchLoader(DataLoader(val_set, batch_size=8, collate_fn=fast_collate), device=CPU)
    for (images, labels), (timm_images, timm_labels) in zip(loaders.val, timm_val, strict=True):
        assert torch.equal(images, timm_images) and torch.equal(labels, timm_labels)
    # Training, epoch 2, the first two batches.
    loaders.train.set_epoch(2)
    batches = [batch for batch, _ in zip(loaders.train, range(2))]
    transform = create_transform(32, is_training=True, use_prefetcher=True, scale=tuple(cfg.AUG.SCALE),
                                 ratio=tuple(cfg.AUG.RATIO), color_jitter=cfg.AUG.COLOR_JITTER,
                                 auto_augment=cfg.AUG.AUTO_AUGMENT, interpolation=cfg.DATA.INTERPOLATION)
    erase = RandomErasing(0.5, mode=cfg.AUG.REMODE, max_count=cfg.AUG.RECOUNT, device="cpu")
    samples = loaders.train.loader.dataset.samples
    erased = 0
    for (images, labels), keys in zip(batches, loaders.train.sampler):
        uint8 = []
        for index, epoch in keys:
            with seeded_rng(mix_seed(cfg.SEED, SALT_AUGMENT, epoch, index)):
                uint8.append((transform(load_rgb(samples[index][0])), samples[index][1]))
        (timm_images, timm_labels), = PrefetchLoader([fast_collate(uint8)], device=CPU)
        for image, (index, epoch) in zip(timm_images, keys):
            before = image.clone()
            seed = mix_seed(cfg.SEED, SALT_BATCH_AUGMENT, epoch, index)
            random.seed(seed)
            torch.manual_seed(seed)
            erased += not torch.equal(erase(image), before)
        assert torch.equal(images, timm_images) and torch.equal(labels, timm_labels)
    assert erased > 0  # the erasing was exercised


def worker_pids(loader) -> List[int]:
    """The process ids of a ``TorchLoader``'s DataLoader workers (empty before its first pass)."""
    iterator = loader.loader._iterator
    return [] if iterator is None else [worker.pid for worker in iterator._workers]


def test_pytorch_workers_persist_across_epochs_with_fresh_positions(image_root: Path) -> None:
    """Workers send uint8 batches (a quarter of float32's shared memory). The same worker processes
    serve every epoch of both loaders, and what they deliver is what a fresh loader delivers: a
    position set between passes (after a whole epoch, after one abandoned midway) is bitwise exact,
    and every validation pass holds every image once."""
    config = make_config(image_root, "pytorch", DATA__NUM_WORKERS=2, AUG__REPROB=0.25)
    loaders = build_loader(config, CPU)
    train, val = loaders.train, loaders.val
    assert next(iter(val.loader))[0].dtype == torch.uint8  # (B, 3, H, W) from the workers
    val.close()

    first = list(val)
    val_pids = worker_pids(val)
    second = list(val)
    assert len(val_pids) == 2 and worker_pids(val) == val_pids
    assert len(first) == len(second) == len(val)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    labels = torch.cat([labels for _, labels in second])
    assert sorted(labels.tolist()) == sorted(label for _, label in loaders.val_split.samples)  # each image once

    train.set_epoch(0)
    list(train)
    train_pids = worker_pids(train)
    train.set_epoch(1, start_batch=2)
    abandoned = iter(train)
    next(abandoned)  # batch 2 of epoch 1, then the pass is dropped with batches in flight
    train.set_epoch(2, start_batch=4)
    resumed = list(train)
    list(val)  # a validation pass between the training epochs
    train.set_epoch(3)
    epoch3 = list(train)
    assert worker_pids(train) == train_pids and worker_pids(val) == val_pids and len(set(train_pids + val_pids)) == 4

    fresh = build_loader(make_config(image_root, "pytorch", DATA__NUM_WORKERS=0, AUG__REPROB=0.25), CPU).train
    fresh.set_epoch(2, start_batch=4)
    expected = list(fresh)
    fresh.set_epoch(3)
    expected3 = list(fresh)
    assert len(resumed) == len(expected) == len(train) - 4 and len(epoch3) == len(train)
    for (images_a, labels_a), (images_b, labels_b) in zip(resumed + epoch3, expected + expected3):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    train.close()
    val.close()
    assert worker_pids(train) == [] == worker_pids(val)


def test_rank_parts_cover_every_sample_once() -> None:
    for num_samples, world_size in ((103, 4), (50, 3), (7, 8)):
        val = [i for rank in range(world_size)
               for batch in EpochBatchSampler(num_samples, 5, 0, rank, world_size, train=False)
               for i, _ in batch]
        assert sorted(val) == list(range(num_samples))
    train = [[i for batch in EpochBatchSampler(103, 5, 0, rank, 4, train=True) for i, _ in batch]
             for rank in range(4)]
    assert all(len(part) == 25 for part in train)  # 103 // 4 = 25 each, 5 full batches
    flat = [i for part in train for i in part]
    assert len(set(flat)) == len(flat)


@pytest.mark.parametrize("loader", LOADERS)
def test_val_rank_parts_through_build_loader(image_root: Path, loader: str) -> None:
    labels = [torch.cat([y for _, y in build_loader(make_config(image_root, loader), CPU, rank=r,
                                                    world_size=4).val]) for r in range(4)]
    assert [len(y) for y in labels] == [8, 8, 7, 7]
    merged = sorted(torch.cat(labels).tolist())
    assert merged == [c for c in range(10) for _ in range(3)]


def test_val_parity_dali_vs_pytorch(image_root: Path) -> None:
    outputs = {}
    for loader in LOADERS:
        outputs[loader] = denormalise(torch.cat([x for x, _ in build_loader(make_config(image_root, loader), CPU).val]))
    difference = (outputs["pytorch"] - outputs["dali"]).abs().mean()
    assert difference < 2 / 255, f"mean abs difference {difference * 255:.2f}/255"


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_files_are_replaced_or_skipped(image_root: Path, tmp_path: Path, loader: str, caplog,
                                              capfd) -> None:
    root = _copy(image_root, tmp_path)
    good = (root / "train" / "00_circle" / "00000.jpg").read_bytes()
    bad_train = [root / "train" / "03_star" / "00003.jpg", root / "train" / "05_ring" / "00007.jpg",
                 root / "train" / "00_circle" / "00000.jpg"]
    bad_train[0].write_bytes(good[:len(good) // 2])  # truncated: fails inside the decoder
    bad_train[1].write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8)  # JPEG magic, garbage body
    bad_train[2].write_bytes(b"")
    bad_val = root / "val" / "01_square" / "00001.jpg"
    bad_val.write_bytes(b"not an image")
    caplog.set_level(logging.WARNING)
    loaders = build_loader(make_config(root, loader), CPU)
    for _ in range(2):
        batches = list(loaders.train)
        assert len(batches) == 15 and all(images.shape == (8, 3, 32, 32) for images, _ in batches)
    assert loaders.train.num_bad == 3
    val_labels = torch.cat([labels for _, labels in loaders.val])
    assert len(val_labels) == 29 and loaders.val.num_bad == 1
    for path in bad_train + [bad_val]:
        assert sum(str(path) in record.getMessage() for record in caplog.records) == 1
    assert "[ERROR]" not in capfd.readouterr().err  # no decoder's own lines: the bad files never reach one


def test_damaged_image_structure_is_found_before_a_decoder_and_real_images_pass() -> None:
    from data.encoded import encoded_problem

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "camera"
    good = []
    for options in (dict(quality=90), dict(progressive=True, optimize=True), dict(quality=50, subsampling=0)):
        for mode in ("RGB", "L", "CMYK"):
            buffer = io.BytesIO()
            image.convert(mode).save(buffer, "JPEG", exif=exif.tobytes(), **options)
            good.append(buffer.getvalue())
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    png, jpeg = buffer.getvalue(), good[0]
    for encoded in good + [png]:
        Image.open(io.BytesIO(encoded)).load()
        assert encoded_problem(np.frombuffer(encoded, np.uint8)) is None
    damaged = {
        "truncated JPEG: no end-of-image marker": jpeg[:len(jpeg) // 2],
        "truncated JPEG header": jpeg[:100],
        "invalid JPEG marker 0x00 at byte 2": b"\xff\xd8\xff" + bytes(range(256)) * 8,
        "invalid JPEG segment length 1": jpeg[:4] + b"\x00\x01" + jpeg[6:],
        "truncated PNG: no end chunk": png[:len(png) // 2],
        "invalid PNG header chunk": png[:8] + bytes(range(256)),
        "not a recognised image format": b"GIF7" + bytes(100),
    }
    for expected, encoded in damaged.items():
        problem = encoded_problem(np.frombuffer(encoded, np.uint8))
        assert problem is not None and problem.startswith(expected), (expected, problem)
        if "segment length" not in expected:  # PIL skips a bad APP0 length; DALI's parser refuses it
            with pytest.raises(Exception):  # PIL cannot decode them either
                Image.open(io.BytesIO(encoded)).load()


def test_dali_reads_ahead_give_the_serial_batches(image_root: Path, tmp_path: Path, caplog,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Files read ahead on reader threads (DATA.NUM_WORKERS 2) feed DALI exactly the batches that reads
    on the calling thread (0) feed it, through a decoder failure and a resume; bad files are still
    replaced and reported once."""
    import data.dali_loader

    # Only the leading bytes are checked, so that the truncated file fails inside the decoder, as a
    # file damaged inside its compressed data does.
    monkeypatch.setattr(data.dali_loader, "encoded_problem",
                        lambda encoded: None if encoded[:3].tobytes() == b"\xff\xd8\xff" else "not an image")
    root = _copy(image_root, tmp_path)
    good = (root / "train" / "00_circle" / "00000.jpg").read_bytes()
    truncated, empty = root / "train" / "03_star" / "00003.jpg", root / "train" / "05_ring" / "00007.jpg"
    truncated.write_bytes(good[:len(good) // 2])  # fails inside the decoder: pipeline rebuilt, batches replayed
    empty.write_bytes(b"")  # caught before the pipeline
    caplog.set_level(logging.WARNING)
    passes = {}
    for workers in (0, 2):
        train = build_loader(make_config(root, "dali", DATA__NUM_WORKERS=workers), CPU).train
        train.set_epoch(1)
        full = list(train)
        train.set_epoch(2, start_batch=4)
        passes[workers] = full + list(train)
        assert len(passes[workers]) == 15 + 11 and train.num_bad == 2
    for (images_a, labels_a), (images_b, labels_b) in zip(passes[0], passes[2]):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    for path in (truncated, empty):  # once by each of the two loaders
        assert sum(str(path) in record.getMessage() for record in caplog.records) == 2


def test_dali_rand_augment_warns_of_no_deprecated_operator(image_root: Path, recwarn) -> None:
    """The RandAugment suite (equalize, sharpness among its ops) calls no operator DALI deprecates."""
    train = build_loader(make_config(image_root, "dali", AUG__AUTO_AUGMENT="rand-m9-mstd0.5-inc1"), CPU).train
    next(iter(train))
    deprecated = [str(w.message) for w in recwarn if issubclass(w.category, DeprecationWarning)
                  and "nvidia.dali" in str(w.message)]
    assert deprecated == []


def test_read_or_replace_walks_on_in_training_and_drops_in_validation() -> None:
    samples = [(f"f{i}", i % 2) for i in range(4)]

    def read(position: int) -> str:
        if position in (1, 2):
            raise UnreadableImage("bad header")
        return samples[position][0].upper()

    assert read_or_replace(samples, 1, True, read) == (("F3", 1, 3), ["f1 (bad header)", "f2 (bad header)"])
    assert read_or_replace(samples, 3, True, read) == (("F3", 1, 3), [])
    assert read_or_replace(samples, 1, False, read) == (None, ["f1 (bad header)"])
    with pytest.raises(RuntimeError, match=r"32 consecutive images from f2 on are unreadable: "
                                           r"\['f2 \(ZeroDivisionError: division by zero\)'"):
        read_or_replace(samples, 2, True, lambda position: 1 / 0)


def _identical_images_dataset(root: Path) -> None:
    """2 classes x 8 copies of one 48x48 vertical gradient (left-right symmetric, so flips do not matter)."""
    column = np.linspace(0, 255, 48, dtype=np.float32)
    pixels = np.repeat(np.stack([column, 255 - column, column / 2], -1)[:, None], 48, axis=1).astype(np.uint8)
    for split, count in (("train", 8), ("val", 1)):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for n in range(count):
                Image.fromarray(pixels).save(folder / f"{n}.png")


@pytest.mark.parametrize("loader", LOADERS)
def test_crop_scale_and_ratio_are_used(tmp_path: Path, loader: str) -> None:
    """AUG.SCALE / AUG.RATIO reach the random resized crop of both loaders."""
    _identical_images_dataset(tmp_path)

    def spread(scale: List[float], ratio: List[float]) -> float:
        cfg = make_config(tmp_path, loader, MODEL__NUM_CLASSES=2, AUG__REPROB=0.0, AUG__AUTO_AUGMENT="",
                          AUG__COLOR_JITTER=0.0, AUG__SCALE=scale, AUG__RATIO=ratio)
        images = torch.cat([x for x, _ in build_loader(cfg, CPU).train])  # (16, 3, 32, 32)
        return (images - images.mean(0, keepdim=True)).abs().mean().item()

    # The image changes only from top to bottom: a crop shows all of it only at full height.
    assert spread([1.0, 1.0], [1.0, 1.0]) < 1e-3  # the whole image every time
    assert spread([0.08, 1.0], [1.0, 1.0]) > 0.05  # crops of different areas and heights
    assert spread([0.5, 0.5], [1.0, 1.0]) > 0.05  # 34x34 squares at different heights
    assert spread([0.5, 0.5], [0.5, 0.5]) < 1e-3  # 24 wide x 48 high strips: the full gradient again


def test_build_mixup() -> None:
    cfg = _C.clone()
    cfg.MODEL.NUM_CLASSES = 10
    mixup = build_mixup(cfg)
    assert mixup.num_classes == 10 and mixup.label_smoothing == cfg.MODEL.LABEL_SMOOTHING
    images, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    _, targets = mixup(images, labels)
    assert targets.shape == (4, 10) and torch.allclose(targets.sum(1), torch.ones(4))
    cfg.AUG.MIXUP = cfg.AUG.CUTMIX = 0.0
    assert build_mixup(cfg) is None


# ----------------------------------------------------------------------------- stress


def _stress_dataset(root: Path) -> None:
    """200 awkward images: tiny, extreme aspect ratios, grayscale, CMYK and palette/RGBA PNGs."""
    rng = random.Random(0)
    for split, count in (("train", 20), ("val", 1)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for n in range(count):
                width, height = rng.choice([(1, 1), (3, 150), (150, 3), (17, 9)] + [(rng.randint(20, 160),
                                                                                       rng.randint(20, 160))] * 6)
                pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (height, width, 3), np.uint8)
                image = Image.fromarray(pixels)
                mode = rng.choice(["RGB", "RGB", "L", "CMYK", "RGBA", "P"])
                if mode in ("RGBA", "P"):
                    image.convert(mode).save(folder / f"{n}.png")
                else:
                    image.convert(mode).save(folder / f"{n}.jpg", quality=rng.randint(30, 95))


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_stress_default_train_augmentation(tmp_path: Path, loader: str) -> None:
    """>= 20,000 samples of the default training augmentation (RandAugment, random erasing) run cleanly."""
    _stress_dataset(tmp_path)
    cfg = make_config(tmp_path, loader, DATA__BATCH_SIZE=50, DATA__NUM_WORKERS=2)
    train = build_loader(cfg, CPU).train
    seen = 0
    for epoch in range(100):
        train.set_epoch(epoch)
        for images, labels in train:
            assert images.shape == (50, 3, 32, 32) and torch.isfinite(images).all()
            seen += len(labels)
    assert seen >= 20_000 and train.num_bad == 0


def test_rand_augment_posterize_at_level_10() -> None:
    """timm's PosterizeIncreasing at level 10 asks Pillow 13 for 0 bits; the loader keeps it working."""
    from timm.data.auto_augment import RandAugment

    from data.torch_loader import build_transforms
    cfg = _C.clone()
    cfg.DATA.IMG_SIZE = 16
    cfg.AUG.AUTO_AUGMENT = "rand-m10-n1-inc1"
    transform = build_transforms(cfg, train=True)
    rand_augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    op = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    op.prob = 1.0
    image = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    assert np.asarray(op(image)).max() == 0


def test_pytorch_workers_start_after_a_dropped_dali_loader(image_root: Path) -> None:
    """Forked DataLoader workers must not finalise DALI pipelines they inherited (that waits forever),
    and a process that exits with its workers running must not wait for them forever.

    A DALI loader that was used and dropped becomes cyclic garbage; a PyTorch loader created next
    forks its workers. Run in a subprocess: a regression shows up as a timeout, not a hung suite.
    """
    code = f"""
import gc, torch
from tests.test_data import make_config
from data import build_loader
from pathlib import Path
gc.disable()  # keep the dropped DALI loader as garbage until a worker would collect it
root = Path({str(image_root)!r})
dali = build_loader(make_config(root, "dali"), torch.device("cpu")).train
next(iter(dali))
del dali
torch_loader = build_loader(make_config(root, "pytorch", DATA__NUM_WORKERS=2), torch.device("cpu")).train
gc.enable()
images, labels = next(iter(torch_loader))
print("ok", tuple(images.shape))
"""
    result = run([sys.executable, "-c", code], REPO_ROOT, timeout=120)
    assert result.returncode == 0 and "ok (8, 3, 32, 32)" in result.stdout, result.stderr[-2000:]
