"""The refstats stage: `python -m diffusion.cli refstats --dataset NAME --shards DIR --out FILE`. Features of a
dataset's reference images (I3D logits of its clips), computed once and shared by every run on it, with their
Gaussian fit (readable by diffusion.metrics.fid.load_stats too)."""

from __future__ import annotations

import logging
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


def write_refstats(dataset: str, cfg: DatasetConfig, ref: ReferenceSet, shard_root: str | Path, out: str | Path,
                   net: torch.nn.Module) -> Path:
    """Features of the first ref.num_images images (clips) of the split, in shard order, plus their Gaussian fit,
    into the npz `out`, and the floor's: features of the first ref.floor images of the other split (held out, scored
    by evaluate like samples); `net` is `feature_network_for(cfg)`."""
    images, _ = read_split(cfg, shard_root, ref.split, limit=ref.num_images, batch_size=1000)
    feats, rate = timed_features(images, net, desc=f"reference features {dataset}/{ref.split}")
    extractor, _, sha = feature_space(cfg)
    stats = fidlib.feature_stats(feats, extractor)
    floor_split = FLOOR_SPLIT[ref.split]
    floor = np.zeros((0, feats.shape[1]), np.float32)
    if ref.floor:
        held_out, _ = read_split(cfg, shard_root, floor_split, limit=ref.floor, batch_size=1000)
        floor, _ = timed_features(held_out, net, desc=f"floor features {dataset}/{floor_split}")
    path = Path(out)
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
    args = p.parse_args(argv)
    params = load_params(args.params)
    if args.dataset not in params.evaluation.references:
        raise ConfigError(f"params.yaml: evaluation.references has no entry {args.dataset!r}; it has "
                          f"{sorted(params.evaluation.references)}")
    cfg = params.datasets[args.dataset]
    path = write_refstats(args.dataset, cfg, params.evaluation.references[args.dataset], args.shards,
                          out_file(args.out), feature_network_for(cfg))
    print(f"wrote {path}")
    return 0
