"""Training batch sources with the BatchSource interface: `batch(step, rank, world_size)` -> this rank's share.

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

from diffusion.config import RunConfig


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
            raise ValueError(f"batch_size {batch_size} exceeds the {len(self.images)} training images")
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
            raise ValueError(f"train.batch_size {self.batch_size} must be divisible by the {world_size} processes")
        epoch, i = divmod(step, self.per_epoch)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        local = self.batch_size // world_size
        idx = idx[rank * local : (rank + 1) * local]
        x = self.images[idx].float() / 127.5 - 1.0
        if self.random_flip:
            g = torch.Generator().manual_seed(self.seed * 7_919 + step)
            flip = (torch.rand(self.batch_size, generator=g) < 0.5)[rank * local : (rank + 1) * local]
            x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
        return x, self.labels[idx]




def load_split_uint8(run: RunConfig, shard_root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of a split, read once through the verifying loader: (N, H, W, C) uint8 and (N,) labels."""
    from diffusion.loader import loader_from_config

    loader = loader_from_config(run.dataset, shard_root, split, 1024, train=False)
    images, labels = [], []
    for x, y in tqdm(loader, total=-(-loader.num_samples // 1024), desc=f"load {run.dataset_name}/{split}"):
        u8 = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # exact inverse of the loader's scaling
        images.append(u8.movedim(1, -1).numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


class StreamBatches:
    """The WebDataset stream of this rank's shards, in local batches of batch_size / world_size."""

    def __init__(self, run: RunConfig, shard_root: str | Path, rank: int, world_size: int, num_workers: int):
        self.run, self.root, self.rank, self.world = run, shard_root, rank, world_size
        self.num_workers = num_workers
        self._it = None

    def batch(self, step: int, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
        if self._it is None:
            from diffusion.loader import loader_from_config

            if self.run.train.batch_size % world_size:
                raise ValueError(f"train.batch_size {self.run.train.batch_size} must be divisible by {world_size}")
            loader = loader_from_config(self.run.dataset, self.root, "train", self.run.train.batch_size // world_size,
                                        train=True, rank=rank, world_size=world_size,
                                        num_workers=self.num_workers, seed=self.run.train.seed * 100_003 + step)
            self._it = iter(loader)
        return next(self._it)


def training_source(run: RunConfig, shard_root: str | Path, rank: int, world_size: int):
    """The BatchSource that run.train.data selects, over <shard_root>/train."""
    if run.train.data == "memory":
        images, labels = load_split_uint8(run, shard_root, "train")
        return ArrayBatches(images, labels, run.train.batch_size, run.train.seed, run.dataset.random_flip)
    return StreamBatches(run, shard_root, rank, world_size, run.train.num_workers)
