"""WebDataset loader for the shards of data/prepare.py: local paths or s3:// URLs, each shard checked against the
manifest's sha256, split by DDP rank and worker; batches (B, C, H, W) (video (B, C, T, H, W)) float32 in [-1, 1].
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset
from torch import Tensor
from torch.utils.data import DataLoader, get_worker_info

from data.tarformat import FORMAT, MANIFEST, DataError, ManifestMismatch, decode_png, iter_tar_samples, sample_shape
from diffusion.config import DatasetConfig
from diffusion.io import s3_endpoint, sha256_bytes

log = logging.getLogger(__name__)


def s3_filesystem() -> Any:
    """fsspec's S3 filesystem; endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, moto), standard creds."""
    import fsspec

    endpoint = s3_endpoint()
    return fsspec.filesystem("s3", **({"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}))


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset.gopen handler for s3:// (WebDataset 1.0 has none built in)."""
    if mode != "rb":
        raise ValueError(f"{url}: s3 shards are read-only here (mode {mode!r}); upload with `dvc push` or s3fs")
    return s3_filesystem().open(url, "rb")


webdataset.gopen_schemes["s3"] = gopen_s3


def read_url(url: str) -> bytes:
    """All bytes of a local path or an s3:// object, through webdataset.gopen."""
    with webdataset.gopen(url, "rb") as fh:
        return fh.read()


def join_url(root: str | Path, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


def load_manifest(shard_root: str | Path, split: str) -> dict[str, Any]:
    """<shard_root>/<split>/manifest.json, checked for its format."""
    url = join_url(shard_root, split, MANIFEST)
    try:
        manifest = json.loads(read_url(url))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{url}: no shard manifest. Write the shards first (`python -m diffusion.cli shard --dataset NAME "
            f"--out {shard_root}`, i.e. `dvc repro shard@NAME`) or fetch them (`dvc pull`)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{url}: not a JSON manifest ({err}); re-write the shards") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{url}: manifest format {found!r}, expected {FORMAT!r}; re-write the shards")
    return manifest


@dataclass(frozen=True)
class ShardRef:
    url: str
    sha256: str
    num_samples: int


@dataclass(frozen=True)
class Reader:
    """Where this process reads: DDP rank of world_size; the DataLoader worker is looked up when iterating."""

    rank: int
    world_size: int
    seed: int

    def worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def rng(self, purpose: str) -> random.Random:
        worker, _ = self.worker()
        return random.Random(f"{self.seed}/{self.rank}/{worker}/{purpose}")  # str seeds hash with sha512: stable


def assign_shards(num_shards: int, rank: int, world_size: int, worker: int, num_workers: int,
                  epoch: int | None, seed: int) -> list[int]:
    """Shard indices this (rank, worker) reads in an epoch: a permutation shared by every reader (seed, epoch)
    when training, the manifest order for evaluation, dealt out by rank, then by worker. Readers are disjoint."""
    order = np.arange(num_shards)
    if epoch is not None:
        order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return [int(i) for i in order[rank::world_size][worker::num_workers]]


def _shard_stream(shards: list[ShardRef], reader: Reader, train: bool) -> Iterator[ShardRef]:
    worker, num_workers = reader.worker()
    epoch = 0
    while True:
        for i in assign_shards(len(shards), reader.rank, reader.world_size, worker, num_workers,
                               epoch if train else None, reader.seed):
            yield shards[i]
        if not train:
            return
        epoch += 1


def _skip(stats: Any, message: str, count: int) -> None:
    log.warning("skip_corrupt: skipping %d sample(s): %s", count, message)
    with stats.get_lock():
        stats.value += count


def _expand_shards(shards: Iterator[ShardRef], verify: bool, skip_corrupt: bool, stats: Any) -> Iterator[dict]:
    """Each shard's samples, after checking its sha256 (always refused on mismatch) and its sample count."""
    for shard in shards:
        data = read_url(shard.url)
        if verify and (digest := sha256_bytes(data)) != shard.sha256:
            raise ManifestMismatch(
                f"shard {shard.url}: sha256 {digest} does not match the manifest's {shard.sha256}; refusing to "
                "load it. The shard is corrupt or the manifest is stale: re-write the shards "
                "(`python -m diffusion.cli shard ...`) or restore them (`dvc pull`)")
        count, last = 0, None
        try:
            for sample in iter_tar_samples(data, shard.url):
                count, last = count + 1, sample["__key__"]
                yield sample
            if count != shard.num_samples:
                what = "truncated: fewer" if count < shard.num_samples else "more samples than the manifest lists"
                raise DataError(f"shard {shard.url}: ends after key {last!r} with {count} of the manifest's "
                                f"{shard.num_samples} samples ({what}); re-write or restore it")
        except DataError as err:
            if not skip_corrupt:
                raise
            _skip(stats, str(err), max(shard.num_samples - count, 0))


def _decode(samples: Iterator[dict], manifest: dict[str, Any], flip: bool, skip_corrupt: bool, stats: Any,
            reader: Reader) -> Iterator[tuple[np.ndarray, int]]:
    """Sample dicts -> (uint8 (C, H, W) or (C, T, H, W), label), flipped along W with probability 1/2."""
    shape, ext = manifest["sample_shape"], manifest["sample_ext"]
    channels, spatial = shape[0], shape[1:]  # (H, W) or (T, H, W)
    rng = reader.rng("flip")
    for sample in samples:
        try:
            array = decode_png(sample[ext], channels)  # (H, W, C), or (T*H, W, C) film strip
            if len(spatial) == 3:
                if array.shape[0] != spatial[0] * spatial[1]:
                    raise ValueError(f"film strip of height {array.shape[0]}, expected {spatial[0] * spatial[1]}")
                array = array.reshape(spatial[0], spatial[1], *array.shape[1:])
            if list(array.shape[:-1]) != spatial:
                raise ValueError(f"sample of shape {array.shape[:-1]}, the manifest says {spatial}")
            label = int(sample["cls"])
        except Exception as err:  # KeyError (member missing), PIL errors, bad shapes, a non-integer label
            message = (f"shard {sample['__url__']}: key {sample['__key__']}: corrupt sample "
                       f"({type(err).__name__}: {err})")
            if not skip_corrupt:
                raise DataError(f"{message}; re-write the shard, or set datasets.<name>.skip_corrupt: true to skip "
                                "and count such samples") from err
            _skip(stats, message, 1)
            continue
        x = array.transpose(array.ndim - 1, *range(array.ndim - 1))  # (C, H, W) or (C, T, H, W) uint8 view
        yield (x[..., ::-1] if flip and rng.random() < 0.5 else x), label


def _shuffle(items: Iterator[Any], bufsize: int, reader: Reader) -> Iterator[Any]:
    """Reservoir-style shuffle buffer with a per-(seed, rank, worker) RNG."""
    rng, buf = reader.rng("shuffle"), []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(bufsize)
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


def collate(samples: list[tuple[np.ndarray, int]]) -> tuple[Tensor, Tensor]:
    """[(uint8 (C, ...), label)] -> (float32 (B, C, ...) in [-1, 1], int64 (B,)).

    numpy, not torch, does the arithmetic: torch's intra-op threads cost more than they give on batches this
    small, and a DataLoader worker is single-threaded anyway.
    """
    x = np.stack([s[0] for s in samples]).astype(np.float32)  # (B, C, H, W) or (B, C, T, H, W)
    x *= 1 / 127.5
    x -= 1.0
    return torch.from_numpy(x), torch.tensor([s[1] for s in samples], dtype=torch.int64)


class ShardLoader:
    """Iterable of (images, labels) batches over one split; `skipped` counts samples dropped by skip_corrupt."""

    def __init__(self, pipeline: webdataset.DataPipeline, manifest: dict[str, Any], num_workers: int,
                 stats: Any, rank_samples: int) -> None:
        self.pipeline, self.manifest, self._stats = pipeline, manifest, stats
        self.rank_samples = rank_samples  # samples in this rank's shards: one evaluation pass yields this many
        self.loader = DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                 prefetch_factor=4 if num_workers else None)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.loader)

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def skipped(self) -> int:
        return int(self._stats.value)


def make_loader(shard_root: str | Path, split: str, batch_size: int, *, train: bool, rank: int = 0,
                world_size: int = 1, num_workers: int = 0, seed: int = 0, random_flip: bool = False,
                skip_corrupt: bool = False, shuffle_buffer: int = 2000, verify: bool = True) -> ShardLoader:
    """Batches from <shard_root>/<split> (a local folder or s3://bucket/prefix).

    train=True: forever, shards re-dealt each epoch, samples shuffled through a buffer, full batches only.
    train=False: each sample of this rank's shards exactly once, in manifest order, the last batch of each
    worker partial; ranks together see every sample once (their counts may differ: see `rank_samples`).
    Shards are dealt by rank (of world_size), then by DataLoader worker; verify checks each sha256 first.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(f"need batch_size >= 1, 0 <= rank < world_size, num_workers >= 0; got {batch_size}, "
                         f"{rank}, {world_size}, {num_workers}")
    manifest = load_manifest(shard_root, split)
    shards = [ShardRef(join_url(shard_root, split, s["name"]), s["sha256"], s["num_samples"])
              for s in manifest["shards"]]
    readers = world_size * max(num_workers, 1)
    if train and len(shards) < readers:
        raise DataError(f"{join_url(shard_root, split)}: {len(shards)} shards for {readers} readers (world_size x "
                        "num_workers); every reader needs one: use fewer workers or a smaller shard_size")
    reader = Reader(rank, world_size, seed)
    stats = multiprocessing.Value("q", 0)
    stages = [
        partial(_shard_stream, shards, reader, train),
        partial(_expand_shards, verify=verify, skip_corrupt=skip_corrupt, stats=stats),
        partial(_decode, manifest=manifest, flip=random_flip and train, skip_corrupt=skip_corrupt, stats=stats,
                reader=reader),
        partial(_shuffle, bufsize=shuffle_buffer, reader=reader) if train and shuffle_buffer > 1 else None,
        webdataset.batched(batch_size, collation_fn=collate, partial=not train),
    ]
    rank_samples = sum(s.num_samples for s in shards[rank::world_size])
    return ShardLoader(webdataset.DataPipeline(*stages), manifest, num_workers, stats, rank_samples)


def loader_from_config(cfg: DatasetConfig, shard_root: str | Path, split: str, batch_size: int, *, train: bool,
                       rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0) -> ShardLoader:
    """make_loader with random_flip and skip_corrupt from params.yaml, checking the shards match the config."""
    loader = make_loader(shard_root, split, batch_size, train=train, rank=rank, world_size=world_size,
                         num_workers=num_workers, seed=seed, random_flip=cfg.random_flip,
                         skip_corrupt=cfg.skip_corrupt)
    if loader.manifest["sample_shape"] != sample_shape(cfg):
        raise DataError(f"{join_url(shard_root, split)}: shards hold samples of shape {loader.manifest['sample_shape']}"
                        f" but params.yaml asks for {sample_shape(cfg)}; re-write the shards")
    return loader
