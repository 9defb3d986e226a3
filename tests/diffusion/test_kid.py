"""Tests for diffusion.metrics.kid: the per-subset values against the unbiased MMD^2 written out from its formula (and a
value computed by hand), the mean against clean-fid's own kernel_distance, the subset size rule, unbiasedness, and
that the result is repeatable without touching the caller's numpy RNG."""

from __future__ import annotations

import numpy as np
import pytest
from cleanfid.fid import kernel_distance

from diffusion.metrics import kid as kidlib


def mmd2_formula(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3; the KID estimator), k(a, b) = (a.b / d + 1)^3, term by term:
    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2."""
    m, d = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    same = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return same / (m * (m - 1)) - 2.0 * cross / m**2


def features(seed: int, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    """(n, dim) non-negative, correlated features (like pool3 activations), optionally shifted."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)  # drawn first: one seed is one distribution at any n
    return np.abs(rng.standard_normal((n, dim)) @ mix) + shift


def test_a_value_computed_by_hand() -> None:
    """d = 1, x = (0, 1), y = (2, 3): k = (ab + 1)^3 gives k(0,1) = 1, k(2,3) = 343, cross 1 + 1 + 27 + 64 = 93:
    MMD^2 = 2*1/2 + 2*343/2 - 2*93/4 = 297.5."""
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    assert kidlib.subset_mmd2(x, y, subset_size=2, subsets=3) == pytest.approx([297.5] * 3, rel=1e-12)


def test_a_whole_set_subset_is_the_unbiased_mmd2_of_the_formula() -> None:
    x, y = features(0, 12, 5), features(1, 12, 5, shift=0.2)
    value = kidlib.subset_mmd2(x, y, subset_size=12, subsets=1)[0]  # every subset is the whole set, permuted
    assert value == pytest.approx(mmd2_formula(x, y), rel=1e-10) and value > 0


def test_mean_and_std_are_those_of_the_subsets_clean_fid_draws() -> None:
    """Each value is the formula on the subsets clean-fid 0.1.35 draws (per subset: m of feats2, then m of feats1,
    without replacement, from numpy's global RNG); their mean is clean-fid's kernel_distance from the same seed."""
    f1, f2, m, subsets = features(2, 30, 6), features(3, 45, 6, shift=0.1), 8, 7
    result = kidlib.kid_from_features(f1, f2, max_subset_size=m, subsets=subsets, seed=5)
    np.random.seed(5)
    expected = []
    for _ in range(subsets):
        rows2 = np.random.choice(len(f2), m, replace=False)
        rows1 = np.random.choice(len(f1), m, replace=False)
        expected.append(mmd2_formula(f1[rows1], f2[rows2]))
    assert (result.subset_size, result.subsets, result.n1, result.n2) == (m, subsets, 30, 45)
    assert result.kid == pytest.approx(np.mean(expected), rel=1e-10)
    assert result.std == pytest.approx(np.std(expected), rel=1e-10) and result.std > 0
    np.random.seed(5)
    assert result.kid == pytest.approx(kernel_distance(f1, f2, num_subsets=subsets, max_subset_size=m), rel=1e-12)


@pytest.mark.parametrize(("n1", "n2", "cap", "expected"),
                         [(1024, 2048, 512, 512), (1024, 2048, 1000, 512), (50000, 50000, 1000, 1000),
                          (64, 64, 512, 32), (128, 256, 512, 64), (3, 100, 512, 2), (2, 2, 512, 2)])
def test_subset_size_is_capped_at_half_the_smaller_set(n1: int, n2: int, cap: int, expected: int) -> None:
    assert kidlib.subset_size_for(n1, n2, cap) == expected


def test_kid_is_unbiased_at_small_n() -> None:
    """Averaged over 40 independent pairs of sets of 20 (subsets of 10), KID agrees with its value at N = 2000 within
    3 standard errors, for one distribution against itself (0) and against a shifted copy; FID's bias (and that of
    MMD's biased V-statistic) would not shrink with the number of pairs."""
    pool = features(4, 4000 + 40 * 40, 8)  # one distribution: disjoint slices are independent sets
    for shift in (0.0, 0.3):
        large = kidlib.kid_from_features(pool[:2000], pool[2000:4000] + shift, max_subset_size=1000, subsets=4)
        small = [kidlib.kid_from_features(pool[4000 + 40 * i:][:20], pool[4020 + 40 * i:][:20] + shift,
                                          max_subset_size=10, subsets=10).kid for i in range(40)]
        standard_error = np.std(small) / np.sqrt(len(small))
        assert abs(np.mean(small) - large.kid) < 3 * (standard_error + large.std / 2), (shift, large, np.mean(small))


def test_kid_grows_with_the_shift() -> None:
    base = features(6, 200, 8)  # the first 200 of seed 6's distribution; the other 200, shifted, below
    kids = [kidlib.kid_from_features(base, features(6, 400, 8, shift=s)[200:], max_subset_size=100, subsets=20)
            for s in (0.3, 0.6, 1.0)]
    assert all(k.kid > 3 * k.std for k in kids) and kids[0].kid < kids[1].kid < kids[2].kid


def test_repeatable_and_leaves_the_global_rng_alone() -> None:
    f1, f2 = features(8, 20, 4), features(9, 20, 4, shift=0.1)
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    first = kidlib.kid_from_features(f1, f2, max_subset_size=10, subsets=5)
    assert np.random.random() == expected_next  # the caller's stream went on as if KID had not run
    assert kidlib.kid_from_features(f1, f2, max_subset_size=10, subsets=5) == first  # bit for bit
    assert kidlib.kid_from_features(f1, f2, max_subset_size=10, subsets=5, seed=1) != first


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N1, D\) and \(N2, D\)"):
        kidlib.subset_mmd2(np.zeros((4, 3)), np.zeros((4, 2)), 2, 1)
    with pytest.raises(ValueError, match=r"subset_size must be in \[2, 4\]"):
        kidlib.subset_mmd2(np.zeros((4, 3)), np.zeros((5, 3)), 5, 1)
    with pytest.raises(ValueError, match=">= 2 features per set"):
        kidlib.subset_size_for(1, 10, 512)
