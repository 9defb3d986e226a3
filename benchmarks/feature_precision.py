"""Is a faster Inception path safe for FID? The TF-Inception in fp32 (the path every FID here uses) against the same
network with bf16 weights and channels-last bf16 input (oneDNN/AMX on this CPU), on the same real images: feature
throughput, interleaved in one process, and the FID (and KID) each path gives between N Fashion-MNIST train and N
test images. The issue's bar: a faster path is allowed only where it moves FID by under 0.5%.

Run from the repository root (after `dvc repro shard@fashion_mnist`):
`python benchmarks/feature_precision.py [--n 1024]` -> benchmarks/results/feature_precision.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data.batches import read_split
from diffusion.config import load_params
from diffusion.metrics import fid as fidlib
from diffusion.metrics.kid import kid_from_features

BATCH = 8


class Bf16Inception(torch.nn.Module):
    """The FID network with bf16 weights, fed bf16 channels-last input; features returned as float32."""

    def __init__(self, net: fidlib.FIDInception):
        super().__init__()
        self.net = copy.deepcopy(net).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        return self.net(x).float()


def features(images: np.ndarray, net: torch.nn.Module) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fidlib.extract_features(images, net, batch_size=BATCH, progress=False)
    return out, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1024, help="images per split")
    p.add_argument("--chunk", type=int, default=128, help="images per interleaved timing chunk")
    p.add_argument("--out", default="benchmarks/results/feature_precision.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    params = load_params()
    cfg = params.datasets["fashion_mnist"]
    fp32 = fidlib.load_fid_inception()
    bf16 = Bf16Inception(fp32)
    feats: dict[str, dict[str, list[np.ndarray]]] = {"fp32": {}, "bf16": {}}
    seconds = {"fp32": 0.0, "bf16": 0.0}
    rounds = []
    for split in ("train", "test"):
        images, _ = read_split(cfg, "data/shards/fashion_mnist", split, limit=args.n, batch_size=1000)
        for start in range(0, len(images), args.chunk):
            chunk = images[start : start + args.chunk]
            row = {}
            for name, net in (("fp32", fp32), ("bf16", bf16)):  # interleaved: the same load on both
                f, s = features(chunk, net)
                feats[name].setdefault(split, []).append(f)
                seconds[name] += s
                row[name] = len(chunk) / s
            rounds.append({"split": split, "start": start, "img_per_s": row, "ratio": row["bf16"] / row["fp32"]})
            print(f"{split} {start}: fp32 {row['fp32']:.1f} img/s, bf16 {row['bf16']:.1f} img/s", file=sys.stderr)
    result: dict = {"n_per_split": args.n, "dataset": "fashion_mnist (train vs test, first N in shard order)",
                    "network": "TF-Inception 2015-12-05 pool3, clean-fid resize", "rounds": rounds}
    for name in ("fp32", "bf16"):
        train, test = (np.concatenate(feats[name][s]) for s in ("train", "test"))
        fid = fidlib.fid_from_features(train, test, method="svd").fid
        k = kid_from_features(train, test, max_subset_size=512, subsets=100)
        result[name] = {"fid": float(fid), "fid_method": "svd", "kid": k.kid, "kid_std": k.std,
                        "img_per_s": 2 * args.n / seconds[name]}
    a, b = (np.concatenate([np.concatenate(feats[n][s]) for s in ("train", "test")]) for n in ("fp32", "bf16"))
    result["feature_abs_diff"] = {"max": float(np.abs(a - b).max()), "mean": float(np.abs(a - b).mean()),
                                  "mean_abs_feature": float(np.abs(a).mean())}
    result["fid_rel_change"] = abs(result["bf16"]["fid"] - result["fp32"]["fid"]) / result["fp32"]["fid"]
    result["speedup"] = result["bf16"]["img_per_s"] / result["fp32"]["img_per_s"]
    result["passes_0.5pct_bar"] = result["fid_rel_change"] < 0.005
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("fp32", "bf16", "fid_rel_change", "speedup", "passes_0.5pct_bar")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
