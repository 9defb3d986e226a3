"""Inception Score (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) || p(y))), mean and std over splits. It needs a real
Inception-v3 classifier; no offline asset carries one (SPEC section 3), so without weights image IS is "not available".
The same formula on the I3D's Kinetics-400 logits is the video IS (evaluate stage).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp

from diffusion.io import sha256_file
from diffusion.metrics.fid import INCEPTION_SIZE, extract_features

IS_NOT_AVAILABLE = (
    "not available: no Inception-v3 classifier weights (pass the path of a torchvision inception_v3 state dict, "
    "e.g. inception_v3_google-0cc3c7bd.pth); a substitute classifier would not give an Inception Score"
)
TORCHVISION_IMAGENET1K_V1_PREFIX = "0cc3c7bd"  # torchvision names weight files by their sha256 prefix


def inception_score(logits: np.ndarray, splits: int = 1) -> tuple[float, float]:
    """(mean, std) over `splits` contiguous chunks of exp(mean_x KL(p(y|x) || p(y))), from logits (N, K).

    p(y) is the mean of p(y|x) within each chunk. Salimans et al. used 10 chunks; RIN (pix2seq, tfgan's
    classifier_score_from_logits) one over all samples, which is not biased low by small chunks. Computed in log
    space, so one-hot-like logits and classes absent from a chunk stay finite.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, K) with K >= 2 classes, got shape {logits.shape}")
    if not 1 <= splits <= len(logits):
        raise ValueError(f"splits must be in [1, N={len(logits)}], got {splits}")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf")
    scores = []
    for chunk in np.array_split(logits, splits):
        log_p = chunk - logsumexp(chunk, axis=1, keepdims=True)  # (n, K) log p(y|x)
        log_marginal = logsumexp(log_p, axis=0) - np.log(len(chunk))  # (K,) log p(y)
        kl = np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


class ISClassifier(torch.nn.Module):
    """torchvision Inception-v3 for IS: float (N, 3, 299, 299) in [0, 255] -> logits (N, 1000).

    torchvision's weights (converted from Google's 2016 TF checkpoint) expect x / 127.5 - 1, which is what its
    `transform_input` produces from ImageNet-normalised input; we build it with transform_input=False and feed that
    range directly. They are not the 2015-12-05 graph of the original IS code: values differ from papers' IS.
    """

    def __init__(self, net: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name  # what a report must print next to the score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"ISClassifier wants (N, 3, 299, 299) in [0, 255], got {tuple(x.shape)}")
        return self.net(x / 127.5 - 1.0)  # (N, 1000)


def load_is_classifier(path: str | Path | None, device: str | torch.device = "cpu") -> ISClassifier | None:
    """A torchvision inception_v3 state dict at `path` as an ISClassifier; None (IS not available) if path is None."""
    if path is None:
        return None
    from torchvision.models import inception_v3

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception-v3 weights {path} not found; pass None to report IS as not available")
    sha256 = sha256_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    has_aux = isinstance(state, dict) and any(str(k).startswith("AuxLogits.") for k in state)
    net = inception_v3(weights=None, aux_logits=has_aux, transform_input=False, init_weights=False)
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a torchvision inception_v3 state dict ({str(err)[:300]})") from err
    known = sha256.startswith(TORCHVISION_IMAGENET1K_V1_PREFIX)
    name = "torchvision inception_v3 IMAGENET1K_V1" if known else f"inception_v3 weights sha256:{sha256[:16]}"
    return ISClassifier(net, name).eval().to(device)


@dataclass(frozen=True)
class ISResult:
    """An Inception Score and the classifier that produced it."""

    mean: float
    std: float
    n: int
    splits: int
    classifier: str

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def compute_inception_score(images: np.ndarray, classifier: ISClassifier, *, splits: int = 1,
                            batch_size: int = 32, progress: bool = True) -> ISResult:
    """IS of uint8 images (N, H, W[, C]) with the clean-fid resize; labelled with the classifier's name."""
    logits = extract_features(images, classifier, batch_size=batch_size, progress=progress, desc="IS logits")
    mean, std = inception_score(logits, splits)
    return ISResult(mean, std, len(logits), splits, classifier.name)
