"""The refstats stage: `python -m diffusion.cli refstats --dataset NAME --shards DIR --out FILE`. Features of a
dataset's reference images (I3D logits of its clips), computed once and shared by every run on it, with their
Gaussian fit (readable by diffusion.metrics.fid.load_stats too). Features are computed in parts of PART_SIZE images,
each kept in the --parts folder with the hash of its images, so a killed run (a whole training split is over an hour of
Inception on a CPU) resumes at the part it was in, and a larger num_images reuses the parts it shares."""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data.batches import read_split
from diffusion.args import out_file, parser
from diffusion.config import ConfigError, DatasetConfig, ReferenceSet, load_params
from diffusion.io import write_npz
from diffusion.metrics import fid as fidlib
from diffusion.metrics.features import feature_network_for, feature_space, timed_features

log = logging.getLogger(__name__)
FLOOR_SPLIT = {"train": "test", "test": "train"}  # the held-out real images of the floor: the split not referenced
REAL_IMAGES_KEPT = 2048  # reference images (clips) stored as uint8 beside their features: 2 MB of 32x32 images
PART_SIZE = 2048  # images per resumable part: ~2.6 minutes of fp32 Inception on 2 CPU cores


def part_key(images: np.ndarray, extractor: str) -> str:
    """What a part's features depend on: its images' bytes and shape, and the feature extractor."""
    digest = hashlib.sha256(images.tobytes())
    digest.update(f"{images.shape}|{images.dtype}|{extractor}".encode())
    return digest.hexdigest()


def _read_part(path: Path, key: str) -> tuple[np.ndarray, float] | None:
    """A part's features and rate when the file exists, is readable and was computed from the same images with the
    same extractor; else None (it is computed again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return z["features"], float(z["images_per_s"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def part_features(images: np.ndarray, net: torch.nn.Module, parts: Path, tag: str, extractor: str,
                  desc: str) -> tuple[np.ndarray, float]:
    """Features of `images` in parts of PART_SIZE, each read from `parts`/<tag>-<start>.npz when it holds these
    images' features, else computed and written there (atomically); returns them and the images per second of the
    parts computed now (of the kept ones when none was)."""
    parts.mkdir(parents=True, exist_ok=True)
    out, rates, kept = [], [], []
    starts = range(0, len(images), PART_SIZE)
    for i, start in enumerate(starts):
        chunk = images[start:start + PART_SIZE]
        path, key = parts / f"{tag}-{start:08d}.npz", part_key(chunk, extractor)
        found = _read_part(path, key)
        if found is None:
            feats, rate = timed_features(chunk, net, desc=f"{desc} (part {i + 1} of {len(starts)})")
            write_npz(path, features=feats.astype(np.float32), key=np.str_(key), images_per_s=np.float64(rate))
            rates.append(rate)
        else:
            feats, rate = found
            kept.append(rate)
        out.append(feats)
    if kept:
        log.info("%s: %d of %d parts kept from %s", desc, len(kept), len(starts), parts)
    return np.concatenate(out), float(np.mean(rates or kept))


def write_refstats(dataset: str, cfg: DatasetConfig, ref: ReferenceSet, shard_root: str | Path, out: str | Path,
                   net: torch.nn.Module, parts: str | Path | None = None) -> Path:
    """Features of the first ref.num_images images (clips) of the split, in shard order, plus their Gaussian fit,
    into the npz `out`, and the floor's: features of the first ref.floor images of the other split (held out, scored
    by evaluate like samples); `net` is `feature_network_for(cfg)`. `parts`: the folder of resumable parts (default
    <out>.parts)."""
    path = Path(out)
    parts = Path(parts) if parts is not None else path.with_name(path.name + ".parts")
    extractor, _, sha = feature_space(cfg)
    images, _ = read_split(cfg, shard_root, ref.split, limit=ref.num_images, batch_size=1000)
    feats, rate = part_features(images, net, parts, ref.split, extractor,
                                desc=f"reference features {dataset}/{ref.split}")
    stats = fidlib.feature_stats(feats, extractor)
    floor_split = FLOOR_SPLIT[ref.split]
    floor = np.zeros((0, feats.shape[1]), np.float32)
    if ref.floor:
        held_out, _ = read_split(cfg, shard_root, floor_split, limit=ref.floor, batch_size=1000)
        floor, _ = part_features(held_out, net, parts, floor_split, extractor,
                                 desc=f"floor features {dataset}/{floor_split}")
    write_npz(
        path, floor_features=floor.astype(np.float32), floor_split=np.str_(floor_split),
        features=feats.astype(np.float32),  # the network's own fp32 output
        mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), extractor=np.str_(stats.extractor),
        dataset=np.str_(dataset), split=np.str_(ref.split), resolution=np.int64(cfg.resolution),
        network_sha256=np.str_(sha), images_per_s=np.float64(rate),
        images=images[:REAL_IMAGES_KEPT])  # real images for image statistics beside FID (the seam ratio's floor)
    log.info("wrote %s (%d images)", path, len(feats))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("refstats", __doc__)
    p.add_argument("--dataset", required=True, help="a dataset named in params.yaml evaluation.references")
    p.add_argument("--shards", required=True, help="the dataset's shard root (data/shards/<dataset>)")
    p.add_argument("--out", required=True, help="the npz to write (data/refstats/<dataset>.npz)")
    p.add_argument("--parts", help="folder of the resumable feature parts (default: <out>.parts)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    if args.dataset not in params.evaluation.references:
        raise ConfigError(f"params.yaml: evaluation.references has no entry {args.dataset!r}; it has "
                          f"{sorted(params.evaluation.references)}")
    cfg = params.datasets[args.dataset]
    path = write_refstats(args.dataset, cfg, params.evaluation.references[args.dataset], args.shards,
                          out_file(args.out), feature_network_for(cfg), args.parts)
    print(f"wrote {path}")
    return 0
