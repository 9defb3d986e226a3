"""The shard stage: one params.yaml dataset -> deterministic WebDataset shards and a manifest per split
(`python -m diffusion.cli shard --dataset NAME --out data/shards/NAME`; the format: data/tarformat.py)."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data import video
from data.readers import (
    CIFAR_FOLDER,
    IDX_SPLITS,
    IMAGE_EXTS,
    SplitMissing,
    Unit,
    array_units,
    folder_units,
    load_cifar_split,
    load_digits,
    read_image,
)
from data.tarformat import (
    CLIP_EXT,
    FORMAT,
    IMAGE_EXT,
    MANIFEST,
    DataError,
    ShardWriter,
    encode_png,
    remove_temporaries,
    sample_shape,
    write_manifest,
)
from diffusion.args import out_folder, parser
from diffusion.config import ConfigError, DatasetConfig, load_params

log = logging.getLogger(__name__)


def source_units(cfg: DatasetConfig, split: str) -> list[Unit]:
    """The raw inputs of one split of a dataset, in the source's own order, read lazily."""
    if cfg.source in ("mnist", "fashion_mnist"):
        images, labels = load_digits(cfg, split)
        return array_units(images, labels, f"{IDX_SPLITS[split][0]}", cfg)
    if cfg.source == "cifar10":
        images, labels = load_cifar_split(cfg, split)
        return array_units(images, labels, f"{CIFAR_FOLDER}/{split}", cfg)
    if cfg.source == "image_folder":
        return folder_units(cfg, split, IMAGE_EXTS, read_image)
    if cfg.source == "video_folder":
        return folder_units(cfg, split, video.VIDEO_EXTS, video.read_video_clips)
    if cfg.source == "moving_mnist":
        return video.moving_mnist_units(cfg, split)
    raise ValueError(f"unknown dataset source {cfg.source!r}")


def _payload(cfg: DatasetConfig, array: np.ndarray, label: int, meta: dict[str, Any]) -> dict[str, bytes]:
    """(H, W, C) image or (T, H, W, C) clip -> the tar members of one sample (PNG or PNG film strip, cls, json)."""
    c, *rest = sample_shape(cfg)
    expected = (*rest, c)
    if array.shape != expected or array.dtype != np.uint8:
        raise DataError(f"{meta['ref']}: sample is {array.dtype} {array.shape}, expected uint8 {expected}")
    image = array.reshape(-1, *array.shape[-2:]) if cfg.frames else array  # (T*H, W, C) film strip for clips
    return {CLIP_EXT if cfg.frames else IMAGE_EXT: encode_png(image), "cls": str(label).encode(),
            "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()}


def write_split(cfg: DatasetConfig, name: str, split: str, units: Sequence[Unit], folder: Path) -> dict[str, Any]:
    """Shuffle units with cfg.seed, write their samples in shards, then the manifest; returns the manifest."""
    order = np.random.default_rng([cfg.seed, zlib.crc32(split.encode())]).permutation(len(units))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # no manifest while the shards are being rewritten
    remove_temporaries(folder)
    writer = ShardWriter(folder, cfg.shard_size)
    histogram = np.zeros(cfg.num_classes, dtype=np.int64)
    skipped: list[dict[str, str]] = []
    written = 0
    try:
        for unit in (units[i] for i in order):
            if cfg.max_samples and written >= cfg.max_samples:
                break
            if cfg.num_classes and not 0 <= unit.label < cfg.num_classes:
                raise DataError(f"{unit.ref}: label {unit.label} outside [0, {cfg.num_classes}) (num_classes)")
            try:
                for suffix, array, extra in unit.read():
                    meta = {"dataset": name, "split": split, "ref": unit.ref, "index": unit.index,
                            "label": unit.label, **extra}
                    writer.add(f"{unit.index:08d}{suffix}", _payload(cfg, array, unit.label, meta))
                    written += 1
                    if cfg.num_classes:
                        histogram[unit.label] += 1
                    if cfg.max_samples and written >= cfg.max_samples:
                        break
            except DataError as err:
                if not cfg.skip_corrupt:
                    raise DataError(f"{err}; replace or delete it, or set datasets.{name}.skip_corrupt: true to skip "
                                    "and count such inputs") from err
                log.warning("skipping %s: %s", unit.ref, err)
                skipped.append({"ref": unit.ref, "error": str(err)})
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()
    manifest = {
        "format": FORMAT, "dataset": name, "split": split, "source": cfg.source,
        "num_samples": written, "num_shards": len(shards), "shard_size": cfg.shard_size,
        "sample_shape": sample_shape(cfg), "sample_ext": CLIP_EXT if cfg.frames else IMAGE_EXT,
        "num_classes": cfg.num_classes, "class_histogram": histogram.tolist(),
        "seed": cfg.seed, "max_samples": cfg.max_samples, "clip_stride": cfg.clip_stride if cfg.frames else None,
        "num_inputs": len(units), "skipped": {"count": len(skipped), "inputs": skipped[:1000]}, "shards": shards,
    }
    write_manifest(folder, manifest)
    return manifest


def write_dataset_shards(cfg: DatasetConfig, name: str, out_dir: str | Path,
                         splits: Sequence[str] = ("train", "test")) -> dict[str, dict[str, Any]]:
    """Write <out_dir>/<split>/shard-NNNNNN.tar + manifest.json for each split; returns {split: manifest}.

    A folder dataset without a split (FFHQ has no test folder) is skipped with a warning, so the result lacks it.
    """
    out_dir = Path(out_dir)
    manifests = {}
    for split in splits:
        try:
            units = source_units(cfg, split)
        except SplitMissing as err:
            log.warning("dataset %s: %s; no %s shards written", name, err, split)
            continue
        except FileNotFoundError as err:
            raise FileNotFoundError(f"dataset {name!r} (params.yaml datasets.{name}, root {cfg.root}): {err}") from None
        manifests[split] = write_split(cfg, name, split, units, out_dir / split)
        m = manifests[split]
        log.info("dataset %s/%s: %d samples in %d shards (%d inputs skipped) -> %s", name, split, m["num_samples"],
                 m["num_shards"], m["skipped"]["count"], out_dir / split)
    return manifests


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("shard", __doc__)
    p.add_argument("--dataset", required=True, help="a dataset named in params.yaml datasets")
    p.add_argument("--out", required=True, help="the shard root: writes <out>/<split>/shard-*.tar + manifest.json")
    args = p.parse_args(argv)
    params = load_params(args.params)
    if args.dataset not in params.datasets:
        raise ConfigError(f"params.yaml: no dataset named {args.dataset!r}; datasets are {sorted(params.datasets)}")
    write_dataset_shards(params.datasets[args.dataset], args.dataset, out_folder(args.out))
    return 0
