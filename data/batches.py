"""Training batch sources with the BatchSource interface (`batch(step, rank, world_size)` -> this rank's share), and
`read_split`, the one reader of a whole split (or its first N samples) as uint8 arrays.

`memory`: a split small enough for RAM (MNIST, Fashion-MNIST, CIFAR-10) is read once from its verified shards and
served as a pure function of the step, so resumes are exact and N ranks see what one rank would.
`stream`: the WebDataset loader for data that does not fit (ImageNet, video); each rank streams its own shards,
and a resume restarts the stream with a seed derived from the step (statistically, not bitwise, equivalent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from data.loader import load_manifest, loader_from_config
from data.tarformat import DataError
from diffusion.config import ConfigError, DatasetConfig, TrainConfig
from diffusion.images import to_uint8_nhwc, to_unit_range


def pad_to(images: np.ndarray, resolution: int) -> np.ndarray:
    """(N, h, w) or (N, h, w, C) uint8 -> zero-padded (centred) to resolution x resolution."""
    h, w = images.shape[1:3]
    if h > resolution or w > resolution:
        raise ValueError(f"images of {h}x{w} do not fit in resolution {resolution}; resize them first")
    top, left = (resolution - h) // 2, (resolution - w) // 2
    widths = [(0, 0), (top, resolution - h - top), (left, resolution - w - left)] + [(0, 0)] * (images.ndim - 3)
    return np.pad(images, widths)


class ArrayBatches:
    """Shuffled global batches from an in-memory uint8 array, as a pure function of the step: epoch e uses the
    permutation seeded by (seed, e); flips are seeded by (seed, step). Ranks take contiguous slices."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, random_flip: bool):
        x = torch.from_numpy(np.ascontiguousarray(images))
        self.images = x[:, None] if x.dim() == 3 else x.movedim(-1, 1)  # (N, C, [T,] H, W) uint8
        self.labels = torch.from_numpy(np.asarray(labels)).long()
        if batch_size > len(self.images):
            raise ConfigError(f"train.batch_size {batch_size} exceeds the {len(self.images)} training samples in "
                              "memory; lower train.batch_size")
        self.batch_size, self.seed, self.random_flip = batch_size, seed, random_flip
        self.per_epoch = len(self.images) // batch_size
        self._perm: tuple[int, Tensor] | None = None

    def _order(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.images), generator=g))
        return self._perm[1]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        if self.batch_size % world_size:
            raise ConfigError(f"train.batch_size {self.batch_size} must be divisible by the {world_size} processes")
        epoch, i = divmod(step, self.per_epoch)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        local = self.batch_size // world_size
        idx = idx[rank * local : (rank + 1) * local]
        x = to_unit_range(self.images[idx])
        if self.random_flip:
            g = torch.Generator().manual_seed(self.seed * 7_919 + step)
            flip = (torch.rand(self.batch_size, generator=g) < 0.5)[rank * local : (rank + 1) * local]
            x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
        return x, self.labels[idx]


def read_split(cfg: DatasetConfig, shard_root: str | Path, split: str, limit: int | None = None,
               batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of a split (or its first `limit`, in shard order: the write-time seeded shuffle), read once
    through the verifying loader: (N, [T,] H, W, C) uint8 and (N,) int64 labels."""
    batch_size = min(batch_size, limit or batch_size)
    loader = loader_from_config(cfg, shard_root, split, batch_size, train=False)
    if limit is not None and loader.num_samples < limit:
        raise DataError(f"{shard_root}/{split} holds {loader.num_samples} samples, fewer than the {limit} asked for")
    want = loader.num_samples if limit is None else limit
    images, labels, have = [], [], 0
    for x, y in tqdm(loader, total=-(-want // batch_size), desc=f"read {shard_root}/{split}"):
        images.append(to_uint8_nhwc(x))  # the exact inverse of the loader's scaling
        labels.append(y.numpy())
        have += len(x)
        if have >= want:
            break
    return np.concatenate(images)[:want], np.concatenate(labels)[:want]


class StreamBatches:
    """The WebDataset stream of this rank's shards, in local batches of batch_size / world_size."""

    def __init__(self, dataset: DatasetConfig, train: TrainConfig, shard_root: str | Path):
        self.dataset, self.train, self.root = dataset, train, shard_root
        self._it = None

    def batch(self, step: int, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
        if self._it is None:
            t = self.train
            if t.batch_size % world_size:
                raise ConfigError(f"train.batch_size {t.batch_size} must be divisible by the {world_size} processes")
            loader = loader_from_config(self.dataset, self.root, "train", t.batch_size // world_size, train=True,
                                        rank=rank, world_size=world_size, num_workers=t.num_workers,
                                        seed=t.seed * 100_003 + step)
            self._it = iter(loader)
        return next(self._it)


def training_source(dataset: DatasetConfig, train: TrainConfig, shard_root: str | Path):
    """The BatchSource that train.data selects, over <shard_root>/train."""
    if train.data == "memory":
        images, labels = read_split(dataset, shard_root, "train")
        return ArrayBatches(images, labels, train.batch_size, train.seed, dataset.random_flip)
    available = load_manifest(shard_root, "train")["num_samples"]
    if train.batch_size > available:  # a stream would grow its buffers waiting for a batch it can never fill
        raise ConfigError(f"train.batch_size {train.batch_size} exceeds the {available} training samples of "
                          f"{shard_root}/train; lower train.batch_size")
    return StreamBatches(dataset, train, shard_root)
