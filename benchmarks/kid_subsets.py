"""Does KID's spread over subsets say how far KID is from its value on other data? A Gaussian simulation at the
evaluate stage's sizes (1024 samples vs 2048 references) for choosing params.yaml's eval.kid_subset_size.

For each subset size and mean shift (0: samples and references from one distribution), many independent data sets are
scored by diffusion.metrics.kid's per-subset MMD^2 (at the size given: kid_from_features would cap 1000 at half of
1024); the std of KID across data sets (its real error) is set beside the mean, over data sets, of the std over
subsets (what metrics.json reports as kid_std). A ratio above 1 overstates the error.

    python benchmarks/kid_subsets.py --out benchmarks/results/kid_subsets.json   # ~5 min on one core
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffusion.metrics.kid import subset_mmd2


def simulate(dim: int, n1: int, n2: int, data_sets: int, subsets: int, sizes: list[int],
             shifts: list[float]) -> list[dict[str, float]]:
    rng = np.random.default_rng(0)
    rows = []
    for shift in shifts:
        for size in sizes:
            kids, spreads = [], []
            for _ in range(data_sets):
                samples, refs = rng.standard_normal((n1, dim)) + shift, rng.standard_normal((n2, dim))  # (n, dim)
                values = subset_mmd2(samples, refs, size, subsets, seed=int(rng.integers(2**31)))
                kids.append(values.mean())
                spreads.append(values.std())
            row = {"shift": shift, "subset_size": size, "kid": float(np.mean(kids)),
                   "std_across_data_sets": float(np.std(kids)), "mean_std_over_subsets": float(np.mean(spreads))}
            row["ratio"] = row["mean_std_over_subsets"] / row["std_across_data_sets"]
            print(json.dumps(row))
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64, help="feature dimension (Inception's 2048 is slower, same picture)")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--references", type=int, default=2048)
    p.add_argument("--data-sets", type=int, default=60, help="independent data sets per setting")
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1000])
    p.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.15])
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args()
    rows = simulate(args.dim, args.samples, args.references, args.data_sets, args.subsets, args.sizes, args.shifts)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                 for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
