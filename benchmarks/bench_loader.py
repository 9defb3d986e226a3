"""Loader throughput (images/s) with 0, 1, 2 workers: our WebDataset shards vs torchvision datasets reading the
same Fashion-MNIST images (FashionMNIST on the idx files, ImageFolder on the same images as PNG files).

Run from the repository root: `python benchmarks/bench_loader.py` -> benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from data.loader import make_loader
from data.prepare import write_dataset_shards
from data.readers import IDX_SPLITS, find_idx, load_idx_split
from data.tarformat import MANIFEST
from diffusion.config import load_params

WORKERS = (0, 1, 2)


def time_batches(batches: Iterable, num_batches: int, warmup: int) -> dict[str, float]:
    """Images/s over num_batches after `warmup` batches (worker start-up and first shard reads excluded)."""
    it = iter(batches)
    start = time.perf_counter()
    for _ in range(warmup):
        next(it)
    first = time.perf_counter() - start
    images, start = 0, time.perf_counter()
    for _ in range(num_batches):
        x, _ = next(it)
        images += x.shape[0]
    elapsed = time.perf_counter() - start
    return {"images_per_s": round(images / elapsed, 1), "images": images, "seconds": round(elapsed, 3),
            "warmup_seconds": round(first, 3)}


def forever(loader: DataLoader) -> Iterable:
    while True:
        yield from loader


def torchvision_fashion(root: Path, idx_root: str) -> torchvision.datasets.FashionMNIST:
    """torchvision's FashionMNIST over the same idx files (it wants them uncompressed in root/FashionMNIST/raw)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stems in IDX_SPLITS.values():
        for stem in stems:
            src = find_idx(idx_root, stem)
            opener = gzip.open if src.suffix == ".gz" else open
            with opener(src, "rb") as fin, open(raw / stem, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    tf = transforms.Compose([transforms.Pad(2), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    return torchvision.datasets.FashionMNIST(str(root), train=True, download=False, transform=tf)


def png_folder(root: Path, idx_root: str, count: int) -> torchvision.datasets.ImageFolder:
    """The first `count` training images as 32x32 PNGs in class folders, read by torchvision's ImageFolder."""
    images, labels = load_idx_split(idx_root, "train")
    for i in range(count):
        folder = root / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.pad(images[i], 2)).save(folder / f"{i:06d}.png")
    tf = transforms.Compose([transforms.Grayscale(1), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    return torchvision.datasets.ImageFolder(str(root), transform=tf)


def bench(args: argparse.Namespace, tmp: Path) -> dict:
    cfg = load_params().datasets["fashion_mnist"]
    shard_root = Path(args.shards)
    if not (shard_root / "train" / MANIFEST).exists():
        shard_root = tmp / "shards"
        write_dataset_shards(cfg, "fashion_mnist", shard_root, splits=("train",))
    results: dict[str, dict] = {"webdataset_shards": {}, "torchvision_fashionmnist": {}, "torchvision_imagefolder": {}}
    tv_fashion = torchvision_fashion(tmp / "tv", cfg.root)
    tv_folder = png_folder(tmp / "png", cfg.root, args.png_images)
    for workers in WORKERS:
        print(f"workers={workers}", file=sys.stderr)
        loader = make_loader(shard_root, "train", args.batch_size, train=True, num_workers=workers, seed=0)
        results["webdataset_shards"][str(workers)] = time_batches(loader, args.batches, args.warmup)
        for name, dataset in (("torchvision_fashionmnist", tv_fashion), ("torchvision_imagefolder", tv_folder)):
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                num_workers=workers, persistent_workers=workers > 0)
            results[name][str(workers)] = time_batches(forever(loader), args.batches, args.warmup)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shards", required=True,
                   help="shard root, e.g. data/shards/fashion_mnist (written to a temp dir if absent)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=100, help="timed batches per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--png-images", type=int, default=20000, help="PNG files written for the ImageFolder baseline")
    p.add_argument("--out", default="benchmarks/results/loader.json")
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = bench(args, Path(tmp))
    report = {
        "what": "training-loader throughput, Fashion-MNIST 32x32 grey, float32 (B, 1, 32, 32) in [-1, 1] + labels",
        "batch_size": args.batch_size, "timed_batches": args.batches, "warmup_batches": args.warmup,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "torch_threads": torch.get_num_threads(),
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
