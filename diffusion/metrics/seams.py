"""The seam ratio of a patch model's samples: how much more neighbouring pixels differ across patch boundaries than
inside patches. Mean |x[i + 1] - x[i]| over the neighbour pairs that straddle a boundary of the model's patch grid,
divided by the same mean over the pairs inside a patch, along rows and columns (and, for 3-D patches, along time).
Images without patch structure give about 1 (real images give the floor the samples are judged against); samples
whose patches each have their own brightness give more. Per-pixel losses barely see this; FID sees it late."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _axis_means(x: np.ndarray, axis: int, patch: int) -> tuple[float, float]:
    """(mean |diff| across boundaries, inside patches) along one axis of a float array, patch size `patch`."""
    diff = np.abs(np.diff(x, axis=axis))  # pair i is (i, i + 1)
    pairs = np.arange(diff.shape[axis])
    crossing = (pairs + 1) % patch == 0  # i + 1 starts a new patch
    take = [slice(None)] * diff.ndim
    take[axis] = crossing
    across = diff[tuple(take)]
    take[axis] = ~crossing
    inside = diff[tuple(take)]
    return float(across.mean()), float(inside.mean())


def seam_ratio(images: np.ndarray, patch: Sequence[int]) -> dict[str, float]:
    """Seam ratio of uint8 images (N, H, W, C) with a 2-D patch, or clips (N, T, H, W, C) with a 3-D patch: the
    spatial ratio (rows and columns pooled), and for clips whose patch spans several frames the temporal one."""
    x = np.asarray(images)
    spatial = tuple(patch[-2:])
    if x.ndim not in (4, 5) or len(patch) != x.ndim - 2:
        raise ValueError(f"seam_ratio needs (N, H, W, C) with a 2-D patch or (N, T, H, W, C) with a 3-D patch, got "
                         f"shape {x.shape} and patch {list(patch)}")
    h_axis, w_axis = x.ndim - 3, x.ndim - 2
    if min(spatial) < 2 or x.shape[h_axis] % spatial[0] or x.shape[w_axis] % spatial[1]:
        raise ValueError(f"patch {list(patch)} must be >= 2 and divide the frames {x.shape[h_axis:w_axis + 1]}")
    if x.shape[h_axis] < 2 * spatial[0] or x.shape[w_axis] < 2 * spatial[1]:
        raise ValueError(f"frames {x.shape[h_axis:w_axis + 1]} hold fewer than two patches {list(spatial)} per side: "
                         "no boundary to measure: it needs at least two patches per side")
    x = x.astype(np.float64)
    across_h, inside_h = _axis_means(x, h_axis, spatial[0])
    across_w, inside_w = _axis_means(x, w_axis, spatial[1])
    across, inside = (across_h + across_w) / 2, (inside_h + inside_w) / 2
    out = {"seam_ratio": across / inside if inside > 0 else float("nan"), "seam_across": across,
           "seam_inside": inside}
    if x.ndim == 5 and patch[0] > 1 and x.shape[1] % patch[0] == 0:
        across_t, inside_t = _axis_means(x, 1, patch[0])
        out["seam_ratio_time"] = across_t / inside_t if inside_t > 0 else float("nan")
    return out
