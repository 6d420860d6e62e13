"""``dali`` loader: NVIDIA DALI pipelines, GPU ("mixed" decode + GPU augmentation) or CPU-only.

CPU-only training runs two pipelines, decode+crop and augmentation, with torchvision's uint8
resize between them (``CropResizer``: DALI's CPU resize cost more than the decode).

Every rank feeds its own part of the epoch through ``fn.external_source`` (``SampleSource``) from
the same ``EpochBatchSampler`` as the PyTorch loader, so sample order is a function of
``(SEED, epoch)``, positioning is exact and the ranks' validation parts partition the set; the
files are read ahead on a thread pool. Augmentation randomness comes from the pipeline's seed
(``SEED``, rank): bitwise-identical augmentation after a mid-epoch resume is not guaranteed.
"""
from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain, islice
from typing import Deque, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from yacs.config import CfgNode

from .common import SALT_BATCH_AUGMENT, EpochBatchSampler, erase_per_sample, mix_seed
from .dali_augment import rand_augment
from .encoded import encoded_problem
from .loader import BatchLoader, failure_reason, read_or_replace
from .split import ImageSplit, UnreadableImage

logger = logging.getLogger(__name__)

INTERPOLATIONS = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}

# timm's normalisation on the 0..255 scale of DALI's uint8 images.
MEAN_255 = [255 * m for m in IMAGENET_DEFAULT_MEAN]
STD_255 = [255 * s for s in IMAGENET_DEFAULT_STD]

# Files are read on a thread pool, up to READ_AHEAD_BATCHES sampler batches ahead of the batch DALI
# asks for, so a per-file latency (a network filesystem) overlaps the pipeline's work instead of
# stalling the thread that runs it. Threads rather than DALI's parallel external source: that one
# runs a stateless callback of the batch index in worker processes, while the replacement walk,
# the replay after a decoder failure and the bad-file reports are state of this process; forked
# workers cannot start once CUDA is initialised (a pipeline rebuilt mid-run), spawned ones need a
# picklable source and take the default action on the SIGTERM / SIGINT that the trainer turns into
# a checkpoint. Threads receive no signals, and reading a file releases the GIL.
READ_THREADS_PER_WORKER = 4  # reader threads per DATA.NUM_WORKERS; 0 workers read on the calling thread
READ_AHEAD_BATCHES = 2

Batch = List[Tuple[int, int]]  # a sampler batch: (dataset index, augmentation round) pairs
Read = Tuple[Optional[Tuple[np.ndarray, int, int]], List[str]]  # read_or_replace's result


class SampleSource:
    """``external_source`` callback: this rank's next batch of encoded files and labels (each a (1,) int64
    label, or a (C,) float32 multi-hot target for a multi-label split).

    Files that cannot be read, or whose first bytes are no known image format, are replaced by
    the next good file (training) or dropped (validation) through ``read_or_replace``. Files that
    pass that check but fail inside the decoder stop the pipeline; ``find_corrupt`` then decodes
    the batches still in flight with PIL to name them, and ``replay`` feeds those batches again
    without them. Reports of bad files are queued in ``bad`` for the consumer to log, in sample
    order whether the files are read ahead on ``read_threads`` threads or on the calling thread.

    Args:
        split: The scanned split.
        sampler: Batch sampler giving this rank's ``(index, augmentation round)`` batches (DALI's
            augmentation is drawn by position, not from the round: see ``DaliLoader``).
        read_threads: Threads reading files ahead of the pipeline; 0 reads each batch when DALI asks.
    """

    def __init__(self, split: ImageSplit, sampler: EpochBatchSampler, read_threads: int) -> None:
        self.split = split
        self.sampler = sampler
        self.bad: List[str] = []
        # Files that pass the structure check but fail in the decoder: sample position -> reason.
        self.corrupt: Dict[int, str] = {}
        # Batches handed to DALI and not yet returned by it: (sampler batch, sample positions fed).
        self.pending: Deque[Tuple[Batch, List[int]]] = deque()
        self._batches: Iterator[Batch] = iter(())
        self._pool = ThreadPoolExecutor(read_threads, thread_name_prefix="dali-read") if read_threads > 0 else None
        # Batches taken from the sampler, not yet fed, with their reads under way (one per sample).
        self._ahead: Deque[Tuple[Batch, List["Future[Read]"]]] = deque()

    def _restart(self, batches: Iterator[Batch]) -> None:
        """Feed ``batches`` next, dropping the batches in flight and the reads ahead."""
        for _, reads in self._ahead:
            for read in reads:
                read.cancel()
        self._ahead.clear()
        self.pending.clear()
        self._batches = batches

    def start(self) -> None:
        """Begin the epoch and position that ``sampler.set_epoch`` selected."""
        self._restart(iter(self.sampler))

    def stop(self) -> None:
        """End the current pass early (the next call raises StopIteration)."""
        self._restart(iter(()))

    def consumed(self) -> None:
        """The oldest batch in flight came out of the pipeline."""
        self.pending.popleft()

    def replay(self) -> None:
        """Feed the batches in flight again (after the pipeline was rebuilt), then those read ahead,
        read again now that the files found corrupt are marked."""
        self._restart(chain([batch for batch, _ in self.pending], [batch for batch, _ in self._ahead], self._batches))

    def find_corrupt(self) -> int:
        """Decode every file in flight with PIL; mark the failures corrupt and return how many there were."""
        found = 0
        for _, positions in self.pending:
            for position in positions:
                if position in self.corrupt:
                    continue
                try:
                    self.split.load_rgb(position)
                except Exception as error:  # any decoder failure: PIL raises several types
                    self.corrupt[position] = failure_reason(error)
                    found += 1
        return found

    def _read(self, position: int) -> np.ndarray:
        """The sample's encoded bytes (1-D uint8); raises ``UnreadableImage`` for a corrupt, unreadable or
        non-image file."""
        if position in self.corrupt:
            raise UnreadableImage(self.corrupt[position])
        try:
            data = self.split.read_encoded(position)
        except OSError as error:
            raise UnreadableImage(str(error)) from error
        problem = encoded_problem(data)  # found here, not by a decoder that stops the batch and prints
        if problem:
            raise UnreadableImage(problem)
        return data

    def _read_sample(self, index: int) -> Read:
        return read_or_replace(self.split.samples, index, self.sampler.train, self._read)

    def _next_batch(self) -> Tuple[Batch, Iterator[Read]]:
        """The next sampler batch and its samples' reads, in order (each waited for as it is taken)."""
        if self._pool is None:
            batch = next(self._batches)
            return batch, (self._read_sample(index) for index, _ in batch)
        for batch in islice(self._batches, READ_AHEAD_BATCHES + 1 - len(self._ahead)):
            self._ahead.append((batch, [self._pool.submit(self._read_sample, index) for index, _ in batch]))
        if not self._ahead:
            raise StopIteration
        batch, reads = self._ahead.popleft()
        return batch, (read.result() for read in reads)

    def __call__(self) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        encoded, labels, positions = [], [], []
        while not encoded:  # a validation batch of only corrupt files is skipped entirely
            batch, reads = self._next_batch()
            for found, bad in reads:
                self.bad.extend(bad)
                if found is not None:
                    data, label, position = found
                    encoded.append(data)
                    labels.append(self.split.multi_hot(position) if self.split.multi_label  # (C,) float32
                                  else np.array([label], dtype=np.int64))
                    positions.append(position)
        self.pending.append((batch, positions))
        return encoded, labels


def _crop_graph(encoded, config: CfgNode, decode_device: str):
    """Decode fused with the random resized crop's window: (H, W, 3) uint8 crops of any size."""
    return fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                         random_area=list(config.AUG.SCALE), random_aspect_ratio=list(config.AUG.RATIO),
                                         num_attempts=10, jpeg_fancy_upsampling=True, adjust_orientation=False)


def _augment_graph(images, config: CfgNode):
    """RandAugment / colour jitter on the (S, S, 3) uint8 images, then flip+normalise (float CHW)."""
    if config.AUG.AUTO_AUGMENT:
        images = rand_augment(images, config.AUG.AUTO_AUGMENT, config.DATA.IMG_SIZE,
                              INTERPOLATIONS[config.DATA.INTERPOLATION])
    elif config.AUG.COLOR_JITTER > 0:
        strength = config.AUG.COLOR_JITTER
        images = fn.color_twist(images, brightness=fn.random.uniform(range=[1 - strength, 1 + strength]),
                                contrast=fn.random.uniform(range=[1 - strength, 1 + strength]),
                                saturation=fn.random.uniform(range=[1 - strength, 1 + strength]))
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_255, std=STD_255,
                                    mirror=fn.random.coin_flip(probability=0.5))  # (3, S, S) float


def _train_graph(encoded, config: CfgNode):
    """The GPU training graph: mixed decode+crop, then resize and augmentation on the GPU."""
    size = config.DATA.IMG_SIZE
    images = _crop_graph(encoded, config, "mixed")
    images = fn.resize(images, device="gpu", resize_x=size, resize_y=size,
                       interp_type=INTERPOLATIONS[config.DATA.INTERPOLATION], antialias=True)  # (S, S, 3) uint8
    return _augment_graph(images, config)


class CropResizer:
    """The CPU training path's resize, between two DALI pipelines.

    On CPU, DALI's antialiased resize costs more than the JPEG decode (2.5 ms against 0.46 ms
    for torchvision's vectorised uint8 kernel on a typical crop, one core; docs/data.md), so the
    CPU-only path runs: DALI decode+crop (``crops``) -> this resize (torchvision, the configured
    interpolation with antialiasing) -> DALI RandAugment, flip and normalise (the pipeline that
    calls this as its ``external_source``). The resize runs in the thread that drives the
    pipelines (the caller's): a private thread pool was no faster on 2 cores, and torch's
    parallel kernels called from extra threads leave a forked DataLoader worker deadlocked.

    Args:
        crops: The built decode+crop pipeline; its outputs are (crops, labels).
        size: Output side.
        interpolation: ``bicubic`` or ``bilinear``.
    """

    def __init__(self, crops, size: int, interpolation: str) -> None:
        self.crops = crops
        self.size = [size, size]
        self.mode = {"bicubic": F.InterpolationMode.BICUBIC, "bilinear": F.InterpolationMode.BILINEAR}[interpolation]

    def resize(self, crop: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8 crop -> (S, S, 3) uint8, the configured interpolation, antialiased."""
        chw = torch.from_numpy(crop).permute(2, 0, 1)
        resized = F.resize(chw, self.size, interpolation=self.mode, antialias=True)
        return resized.permute(1, 2, 0).contiguous().numpy()  # (S, S, 3) uint8

    def __call__(self) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        crops, labels = self.crops.run()
        images = [self.resize(crops.at(i)) for i in range(len(crops))]
        return images, [np.array(labels.at(i)) for i in range(len(labels))]


def _val_graph(encoded, config: CfgNode, decode_device: str):
    """timm's eval transform: resize the shorter side to ``floor(IMG_SIZE / CROP_PCT)`` (the longer to
    ``int(long x scale)``), center crop where torchvision's ``CenterCrop`` puts it, normalise."""
    size = config.DATA.IMG_SIZE
    scale_size = int(size / config.TEST.CROP_PCT)
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, jpeg_fancy_upsampling=True,
                               adjust_orientation=False)
    shape = fn.peek_image_shape(encoded, dtype=types.INT32, adjust_orientation=False)  # (H, W, C)
    height, width = shape[0], shape[1]
    portrait = width <= height  # torchvision's Resize: the shorter side gets scale_size
    new_width = portrait * scale_size + (1 - portrait) * ((scale_size * width) // height)
    new_height = (1 - portrait) * scale_size + portrait * ((scale_size * height) // width)
    images = fn.resize(images, resize_x=fn.cast(new_width, dtype=types.FLOAT),
                       resize_y=fn.cast(new_height, dtype=types.FLOAT),
                       interp_type=INTERPOLATIONS[config.DATA.INTERPOLATION], antialias=True)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=(size, size),
                                    crop_pos_x=_center_crop_position(new_width - size),
                                    crop_pos_y=_center_crop_position(new_height - size),
                                    mean=MEAN_255, std=STD_255)


def _center_crop_position(margin):
    """torchvision's ``CenterCrop`` offset ``round(margin / 2)`` (half to even, as Python rounds) as
    DALI's normalised crop position (``offset / margin``, 0 for no margin)."""
    half = margin // 2
    offset = half + (margin % 2) * (half % 2)  # an odd margin's x.5 goes to the even neighbour
    return fn.cast(offset, dtype=types.FLOAT) / fn.cast(margin + (margin == 0), dtype=types.FLOAT)


class DaliLoader(BatchLoader):
    """Iterates a DALI pipeline fed by ``SampleSource``; delivers float batches on ``device``.

    DALI's random operators draw from the pipeline's stream (seeded by ``SEED`` and the rank) in the
    order the samples pass, and random erasing from ``(SEED, epoch, batch, rank, place in the batch)``:
    a sample's augmentation follows its place, not its index, so the copies of an image under
    repeated augmentation (``DATA.REPEATED_AUG``), which sit at different places, differ.

    Args:
        config: The run's config.
        split: The scanned split.
        sampler: This rank's batch sampler (its seed and rank seed the pipeline).
        device: CPU (CPU-only pipeline, ``device_id=None``) or a CUDA device (mixed decode, GPU ops).
        num_workers: ``data.build.num_workers``: DALI's threads (at least 1) and ``READ_THREADS_PER_WORKER``
            reader threads each (none for 0: files are read when DALI asks for a batch, on the thread
            that runs the pipeline).
    """

    def __init__(self, config: CfgNode, split: ImageSplit, sampler: EpochBatchSampler, device: torch.device,
                 num_workers: int) -> None:
        super().__init__(sampler, device)
        self.num_workers = num_workers
        self.source = SampleSource(split, sampler, READ_THREADS_PER_WORKER * num_workers)
        self._running = False
        self.erase = (RandomErasing(config.AUG.REPROB, mode=config.AUG.REMODE, max_count=config.AUG.RECOUNT,
                                    device=str(self.device)) if sampler.train and config.AUG.REPROB > 0 else None)

        self.config = config
        self._resizer: Optional[CropResizer] = None
        self.pipe = self._make_pipeline()

    def _make_pipeline(self):
        """Build the DALI pipeline (again after a decoder failure left the old one unusable)."""
        config, sampler, gpu = self.config, self.sampler, self.device.type == "cuda"

        threads = max(1, self.num_workers)
        seed = mix_seed(sampler.seed, SALT_BATCH_AUGMENT, sampler.rank) % 2**31
        kwargs = dict(batch_size=sampler.batch_size, num_threads=threads, prefetch_queue_depth=2,
                      exec_dynamic=True, device_id=(self.device.index or 0) if gpu else None)
        # CPU training: DALI decode+crop -> torchvision resize (CropResizer) -> DALI augmentation.
        split = sampler.train and not gpu
        label_type = types.FLOAT if self.source.split.multi_label else types.INT64
        if split:

            @pipeline_def
            def crops_pipeline():
                encoded, labels = fn.external_source(source=self.source, num_outputs=2, batch=True,
                                                     dtype=[types.UINT8, label_type])
                return _crop_graph(encoded, config, "cpu"), labels

            crops = crops_pipeline(seed=(seed + 1) % 2**31, **kwargs)
            crops.build()
            self._resizer = CropResizer(crops, config.DATA.IMG_SIZE, config.DATA.INTERPOLATION)

        @pipeline_def(enable_conditionals=True)
        def pipeline():
            if split:
                images, labels = fn.external_source(source=self._resizer, num_outputs=2, batch=True,
                                                    dtype=[types.UINT8, label_type], layout=["HWC", ""])
                images = _augment_graph(images, config)
            else:
                encoded, labels = fn.external_source(source=self.source, num_outputs=2, batch=True,
                                                     dtype=[types.UINT8, label_type])
                images = (_train_graph(encoded, config) if sampler.train
                          else _val_graph(encoded, config, "mixed" if gpu else "cpu"))
            return images, (labels.gpu() if gpu else labels)

        pipe = pipeline(seed=seed, **kwargs)
        pipe.build()
        return pipe

    def _reset(self) -> None:
        """Rewind the pipeline(s) after the source ended a pass."""
        self.pipe.reset()
        if self._resizer is not None:
            self._resizer.crops.reset()

    def _to_torch(self, tensor_list) -> torch.Tensor:
        tensor = tensor_list.as_tensor()
        out = torch.empty(tensor.shape(), dtype=torch.float32 if tensor.dtype == types.FLOAT else torch.int64,
                          device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return feed_ndarray(tensor, out, cuda_stream=stream)

    def _log_bad(self) -> None:
        reports, self.source.bad = self.source.bad, []
        self.report_bad(reports)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._running:  # the previous pass was abandoned: drop its prefetched batches
            self.source.stop()
            try:
                while True:
                    self.pipe.run()
            except StopIteration:
                self._reset()
            except RuntimeError:  # a corrupt file among the dropped batches: start afresh
                self.pipe = self._make_pipeline()
        self.source.start()
        self._running = True
        batch = self.sampler.start_batch
        while True:
            try:
                images_tl, labels_tl = self.pipe.run()
            except StopIteration:
                break
            except RuntimeError as error:
                # A file passed the header check but failed in the decoder; DALI pipelines do not
                # survive that, so name the culprits, rebuild, and feed the batches in flight again.
                if self.source.find_corrupt() == 0:
                    raise
                del self.pipe
                self.pipe = self._make_pipeline()
                self.source.replay()
                logger.debug("rebuilt the DALI pipeline after %s", str(error).splitlines()[0])
                continue
            self.source.consumed()
            images = self._to_torch(images_tl)  # (B, 3, H, W) float32
            labels = self._to_torch(labels_tl)  # (B, 1) int64 labels or (B, C) float32 multi-hot targets
            if not self.source.split.multi_label:
                labels = labels.view(-1)  # (B,)
            self._log_bad()
            if self.erase is not None:  # on the pipeline's device, pure in (seed, epoch, batch, rank, sample)
                sampler = self.sampler
                erase_per_sample(self.erase, images, [mix_seed(sampler.seed, SALT_BATCH_AUGMENT, sampler.epoch, batch,
                                                               sampler.rank, sample) for sample in range(len(images))])
            batch += 1
            yield images, labels
        self._log_bad()
        self._reset()
        self._running = False

