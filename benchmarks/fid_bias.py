"""This dataset's own FID bias: real Fashion-MNIST test images scored against real train images, exactly as samples
are (TF-Inception pool3, clean-fid resize, fp32), at nested sizes N. Both sets come from one distribution, so every
point of FID(N) is bias. FID's bias falls like 1/N: a least-squares fit FID(N1, N2) = F_inf + c (1/N1 + 1/N2) over
the nested subsets gives c, what N keeps the bias under a target, and F_inf (FID-infinity, the real-vs-real floor
that remains with infinite samples: train and test differ a little). KID of the same pairs is shown beside it.

Run from the repository root (after `dvc repro shard@fashion_mnist`):
`python benchmarks/fid_bias.py [--train 4096 --test 4096]` -> benchmarks/results/fid_bias.json. Features are cached
in data/refstats/fid_bias_features.npz (ignored by git), so a re-run with other sizes only extracts what is new.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data.batches import read_split
from diffusion.config import load_params
from diffusion.io import write_npz
from diffusion.metrics import fid as fidlib
from diffusion.metrics.features import FEATURE_BATCH_SIZE, FEATURE_NETWORK
from diffusion.metrics.kid import kid_from_features
from diffusion.metrics.weights import FID_INCEPTION_SHA256

CACHE = Path("data/refstats/fid_bias_features.npz")
SIZES = (128, 256, 512, 1024, 2048, 4096)
DRAWS = 4  # random nested orders per size (the first N of each permutation)


def cached_features(split: str, n: int, net) -> np.ndarray:
    """Features of the first n images of a split in shard order, extending the cache as needed."""
    cache = dict(np.load(CACHE)) if CACHE.exists() else {}
    have = cache.get(split, np.zeros((0, fidlib.FEATURE_DIM)))
    if len(have) < n:
        cfg = load_params().datasets["fashion_mnist"]
        images, _ = read_split(cfg, "data/shards/fashion_mnist", split, limit=n, batch_size=1000)
        start = time.perf_counter()
        new = fidlib.extract_features(images[len(have):], net, batch_size=FEATURE_BATCH_SIZE, desc=f"{split} features")
        print(f"{split}: {len(new)} images at {len(new) / (time.perf_counter() - start):.1f} img/s", file=sys.stderr)
        have = np.concatenate([have, new])
        cache[split] = have
        write_npz(CACHE, **cache)
    return have[:n]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train", type=int, default=max(SIZES))
    p.add_argument("--test", type=int, default=max(SIZES))
    p.add_argument("--target", type=float, default=5.0, help="bias (FID points) the chosen N must stay under")
    p.add_argument("--min-n", type=int, default=1024, help="smallest set size the 1/N fit uses")
    p.add_argument("--out", default="benchmarks/results/fid_bias.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    net = fidlib.load_fid_inception()
    train, test = cached_features("train", args.train, net), cached_features("test", args.test, net)
    rng = np.random.default_rng(0)
    points = []
    for draw in range(DRAWS):
        a, b = rng.permutation(len(test)), rng.permutation(len(train))
        for n in SIZES:
            for m in sorted({n, min(2 * n, len(train)), len(train)}):
                if n > len(test) or m > len(train):
                    continue
                fs, fr = test[a[:n]], train[b[:m]]
                fid = fidlib.fid_from_features(fs, fr, method="svd").fid
                k = kid_from_features(fs, fr, max_subset_size=512, subsets=50)
                points.append({"draw": draw, "n_test": n, "n_train": m, "fid": fid, "kid": k.kid, "kid_std": k.std})
    def fit(selected: list[dict]) -> tuple[float, float, float]:
        x = np.array([1 / p["n_test"] + 1 / p["n_train"] for p in selected])
        y = np.array([p["fid"] for p in selected])
        design = np.stack([np.ones_like(x), x], 1)
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        return float(a), float(b), float(np.sqrt(np.mean((y - design @ np.array([a, b])) ** 2)))

    # Below ~D/2 images a side, the sample covariance's rank limits the bias, which then falls slower than 1/N: the
    # 1/N law is fitted where it holds (both sides >= args.min_n) and the all-sizes fit is kept to show it does not.
    f_inf, c, rms = fit([p for p in points if min(p["n_test"], p["n_train"]) >= args.min_n])
    f_all, c_all, rms_all = fit(points)

    def bias(n1: float, n2: float) -> float:
        return float(c * (1 / n1 + 1 / n2))

    n_full_train = 60000
    needed_vs_full = c / (args.target - c / n_full_train) if args.target > c / n_full_train else float("inf")
    summary = {
        "what": "FID of real Fashion-MNIST test images vs real train images (one distribution: all of it is bias); "
                "fit FID = F_inf + c (1/N_test + 1/N_train) over nested subsets",
        "feature_network": FEATURE_NETWORK, "network_sha256": FID_INCEPTION_SHA256, "fid_method": "svd (exact)",
        "draws": DRAWS, "sizes": list(SIZES), "points": points,
        "fit": {"min_n": args.min_n, "F_inf": f_inf, "c": c, "rms_residual": rms},
        "fit_all_sizes": {"F_inf": f_all, "c": c_all, "rms_residual": rms_all},
        "mean_fid": {f"{n} vs {m}": float(np.mean([p["fid"] for p in points if (p["n_test"], p["n_train"]) == (n, m)]))
                     for n, m in sorted({(p["n_test"], p["n_train"]) for p in points})},
        "bias_at": {"1024 vs 2048 (today's protocol)": bias(1024, 2048), "1024 vs 1024": bias(1024, 1024),
                    "2048 vs 2048": bias(2048, 2048), "10000 vs 60000": bias(10000, 60000),
                    "50000 vs 50000": bias(50000, 50000)},
        f"samples_needed_for_bias_under_{args.target}_vs_full_train_split": needed_vs_full,
        "kid_at_1024_vs_2048": [p["kid"] for p in points if p["n_test"] == 1024 and p["n_train"] == 2048],
    }
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("fit", "fit_all_sizes", "bias_at", "mean_fid")}, indent=1))
    print(f"samples for bias < {args.target} against the full train split: {needed_vs_full:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
