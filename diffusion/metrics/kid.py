"""KID (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 3): the unbiased MMD^2 estimate with the cubic polynomial
kernel k(x, y) = (x.y / d + 1)^3 between two feature sets, averaged over random subsets, with its spread over them.
On Inception pool3 features it is KID; on the I3D logits of fvd.py it is KVD. Each subset's value is clean-fid's
`kernel_distance`, which returns only the mean: it is called once per subset to get the values behind the std.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from cleanfid.fid import kernel_distance

KID_SEED = 0  # the subsets are drawn from this seed: the same features give the same KID to the last digit


@dataclass(frozen=True)
class KIDResult:
    """KID (or KVD): mean and std (ddof 0, as torch-fidelity and torchmetrics) of the per-subset MMD^2 values."""

    kid: float
    std: float
    subset_size: int  # images (clips) drawn without replacement from each set, per subset
    subsets: int
    n1: int
    n2: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def subset_size_for(n1: int, n2: int, max_subset_size: int) -> int:
    """The subset size used: max_subset_size, but at most half the smaller set (so that subsets differ and their
    spread says something about the error) and at least 2 (the estimate's (m - 1) denominator)."""
    if min(n1, n2) < 2 or max_subset_size < 2:
        raise ValueError(f"KID needs >= 2 features per set and subsets of >= 2, got {n1}, {n2} and {max_subset_size}")
    return max(2, min(max_subset_size, min(n1, n2) // 2))


@contextlib.contextmanager
def _global_numpy_seed(seed: int) -> Iterator[None]:
    """clean-fid draws subsets from numpy's global RNG: seed it for the block, then put the caller's state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def subset_mmd2(feats1: np.ndarray, feats2: np.ndarray, subset_size: int, subsets: int,
                seed: int = KID_SEED) -> np.ndarray:
    """The unbiased MMD^2 of `subsets` random subset pairs of `subset_size` features each, (subsets,) float64.

    Each value is clean-fid 0.1.35's `kernel_distance(feats1, feats2, num_subsets=1, max_subset_size=subset_size)`;
    called `subsets` times in one seeded stream, the values average to exactly what
    `kernel_distance(feats1, feats2, num_subsets=subsets, ...)` returns from the same seed.
    """
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"features must be (N1, D) and (N2, D), got {feats1.shape} and {feats2.shape}")
    if not 2 <= subset_size <= min(len(feats1), len(feats2)) or subsets < 1:
        raise ValueError(f"subset_size must be in [2, {min(len(feats1), len(feats2))}] and subsets >= 1, got "
                         f"{subset_size} and {subsets}")
    with _global_numpy_seed(seed):
        return np.array([kernel_distance(feats1, feats2, num_subsets=1, max_subset_size=subset_size)
                         for _ in range(subsets)])


def kid_from_features(feats1: np.ndarray, feats2: np.ndarray, *, max_subset_size: int, subsets: int,
                      seed: int = KID_SEED) -> KIDResult:
    """KID between feature sets (N1, D) and (N2, D): mean and std of `subset_mmd2` at `subset_size_for`'s size.

    Unbiased at any N (unlike FID, whose bias falls like 1/N), so values at different N are comparable in expectation;
    the std is the spread over subsets, not a confidence interval of the data.
    """
    size = subset_size_for(len(feats1), len(feats2), max_subset_size)
    values = subset_mmd2(feats1, feats2, size, subsets, seed)
    return KIDResult(float(values.mean()), float(values.std()), size, subsets, len(feats1), len(feats2))
