"""The evaluate stage: `python -m diffusion.cli evaluate RUN --samples NPZ --cost JSON --refstats NPZ --out DIR`.
FID (Heusel et al. 2017; clean-fid preprocessing) and KID (Binkowski et al. 2018) of a run's samples against its
dataset's cached reference features and, given classifier weights, the Inception Score; for video, FVD (Unterthiner et
al. 2018), KVD and the Inception Score from the Kinetics-400 I3D logits, as RIN computes them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.tarformat import DataError
from diffusion.args import out_folder, parser
from diffusion.config import ConfigError, Params, ReferenceSet, RunConfig, load_params
from diffusion.io import sha256_file, write_json
from diffusion.metrics import fid as fidlib
from diffusion.metrics import fvd as fvdlib
from diffusion.metrics import kid as kidlib
from diffusion.metrics import seams
from diffusion.metrics.features import (
    FEATURE_BATCH_SIZE,
    NOT_AVAILABLE,
    feature_network_for,
    feature_space,
    resize_method,
    timed_features,
)
from diffusion.metrics.inception_score import (
    IS_NOT_AVAILABLE,
    compute_inception_score,
    inception_score,
    load_is_classifier,
)
from diffusion.stages.references import load_reference_features, open_npz

log = logging.getLogger(__name__)


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


def load_samples(path: Path, run: RunConfig) -> np.ndarray:
    """arr_0 of the sample stage's npz: uint8 (N, H, W, C) at the dataset's resolution and channels, or
    (N, T, H, W, C) clips for video."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no samples; run `dvc repro sample@{run.name}` first")
    with open_npz(path, f"`dvc repro sample@{run.name}`") as z:
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


def kernel_distance_fields(name: str, feats: np.ndarray, ref_feats: np.ndarray, run: RunConfig) -> dict[str, Any]:
    """KID (name "kid", Inception features) or KVD ("kvd", I3D logits) with its std over subsets, the subset size
    used and the number of subsets, from the same features as FID (FVD)."""
    result = kidlib.kid_from_features(feats, ref_feats, max_subset_size=run.eval.kid_subset_size,
                                      subsets=run.eval.kid_subsets)
    return {name: result.kid, f"{name}_std": result.std, f"{name}_subset_size": result.subset_size,
            f"{name}_subsets": result.subsets}


def check_is_splits(run: RunConfig, n: int) -> int:
    """run.eval.is_splits, refused (naming the key) when there are fewer samples than splits."""
    if run.eval.is_splits > n:
        raise ConfigError(f"params.yaml: {run.params_key}.eval.is_splits {run.eval.is_splits} exceeds the {n} "
                          f"samples; lower it (1, as RIN computes IS) or raise {run.params_key}.sample.num_samples")
    return run.eval.is_splits


def inception_score_fields(images: np.ndarray, run: RunConfig) -> dict[str, Any]:
    """IS mean, std and classifier name, or "not available" with the reason when no classifier is configured."""
    classifier = load_is_classifier(run.eval.is_classifier)
    if classifier is None:
        return {"inception_score": NOT_AVAILABLE, "inception_score_note": IS_NOT_AVAILABLE}
    result = compute_inception_score(images, classifier, splits=check_is_splits(run, len(images)),
                                     batch_size=FEATURE_BATCH_SIZE)
    return {"inception_score": result.mean, "inception_score_std": result.std, "inception_score_splits": result.splits,
            "inception_score_classifier": result.classifier}


def video_inception_score_fields(logits: np.ndarray, run: RunConfig) -> dict[str, Any]:
    """The video IS from the I3D's 400 Kinetics logits that FVD uses, as pix2seq computes RIN's (tfgan's
    classifier_score_from_logits, one split over all clips by default); also under the image IS keys, for the report."""
    splits = check_is_splits(run, len(logits))
    mean, std = inception_score(logits, splits)
    return {"video_is": mean, "video_is_std": std, "video_is_splits": splits, "inception_score": mean,
            "inception_score_std": std, "inception_score_splits": splits,
            "inception_score_classifier": f"{fvdlib.FEATURE_NETWORK} (the FVD features)"}


def model_cost(path: Path) -> dict[str, Any]:
    """The sampled network's parameters and GFLOPs per call, and its patch size (None: not a patch model), as the
    sample stage counted them (its cost.json)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no model cost; re-run the sample stage, which writes it beside samples.npz")
    try:
        cost = json.loads(path.read_text())
        patch = cost.get("patch")
        return {"model_params": int(cost["model_params"]), "gflops_per_image": float(cost["gflops_per_image"]),
                "patch": [int(p) for p in patch] if patch else None}
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not the sample stage's cost.json ({type(err).__name__}: {err}); re-run the sample "
                        "stage") from None


def reference_extras(path: Path, run: RunConfig) -> tuple[np.ndarray | None, np.ndarray, str]:
    """What refstats keeps beside the reference features: the real images (None in a file that predates them), and
    the floor's held-out features (empty when none) with their split."""
    with open_npz(path, f"`dvc repro refstats@{run.dataset_name}`") as z:
        images = z["images"] if "images" in z.files else None
        if "floor_features" not in z.files:
            return images, np.zeros((0, 0)), ""
        return images, z["floor_features"].astype(np.float64), str(z["floor_split"])


def frechet(feats: np.ndarray, ref_feats: np.ndarray, run: RunConfig) -> tuple[str, float, Any]:
    """("fvd" or "fid", its value, the FVDResult / FIDResult) of features against the reference, as evaluate scores
    samples (and the floor)."""
    if run.dataset.frames:
        result = fvdlib.fvd_from_features(feats, ref_feats)
        return "fvd", result.fvd, result
    result = sample_fid(feats, ref_feats)
    return "fid", result.fid, result


def seam_fields(images: np.ndarray, real: np.ndarray | None, patch: list[int] | None) -> dict[str, Any]:
    """A patch model's seam ratio on its samples and on the cached real reference images (the floor), or nothing for
    a model without patches; the real side is null when the refstats file predates stored images."""
    if not patch:
        return {}
    out: dict[str, Any] = dict(seams.seam_ratio(images, patch))
    if real is not None:
        out |= {f"{k}_real": v for k, v in seams.seam_ratio(real, patch).items()}
    else:
        out["seam_ratio_real"] = None
    return {"seam_patch": patch, **out}


def floor_fields(held_out: np.ndarray, split: str, ref_feats: np.ndarray, num_samples: int,
                 run: RunConfig) -> dict[str, Any]:
    """The floor: held-out real images (clips) scored exactly as the samples are, against the same reference, at the
    samples' N (or all the floor holds, when fewer: floor_n says which). Nothing when refstats stored none."""
    if not len(held_out):
        return {}
    real = held_out[:num_samples]
    name, value, result = frechet(real, ref_feats, run)
    kernel = kernel_distance_fields("kvd" if run.dataset.frames else "kid", real, ref_feats, run)
    return {f"floor_{name}": value, f"floor_{name}_method": result.method, "floor_n": len(real), "floor_split": split,
            **{f"floor_{k}": v for k, v in kernel.items()}}


def evaluate_run(params: Params, run: RunConfig, samples_path: Path, cost_path: Path, ref_path: Path, out_dir: Path,
                 net: torch.nn.Module | None = None) -> dict[str, Any]:
    """The evaluate stage: metrics.json with FID and KID (FVD, KVD and video IS for video), how they were computed
    (the samples file's sha256, the reference, the feature network and its hash, the resize), IS (or "not
    available") and model cost."""
    start = time.perf_counter()
    images = load_samples(samples_path, run)
    reference_set(params, run)
    ref_feats = load_reference_features(ref_path, run)
    feats, rate = timed_features(images, net or feature_network_for(run.dataset), desc=f"sample features {run.name}")
    extractor, network, sha = feature_space(run.dataset)
    name, value, result = frechet(feats, ref_feats, run)
    score = {name: value, f"{name}_method": result.method, "singular": result.singular}
    if run.dataset.frames:
        score |= {**kernel_distance_fields("kvd", feats, ref_feats, run), "frames": run.dataset.frames,
                  "context_frames": run.diffusion.context_frames, **video_inception_score_fields(feats, run)}
    else:
        score |= {**kernel_distance_fields("kid", feats, ref_feats, run), **inception_score_fields(images, run)}
    cost = model_cost(cost_path)
    real_images, held_out, floor_split = reference_extras(ref_path, run)
    score |= seam_fields(images, real_images, cost.pop("patch"))
    score |= floor_fields(held_out, floor_split, ref_feats, len(feats), run)
    metrics = {
        "run": run.name, "dataset": run.dataset_name, "resolution": run.dataset.resolution, **score,
        "num_samples": result.n1, "num_reference": result.n2, "reference_split": run.eval.reference_split,
        "reference_file": str(ref_path), "samples_sha256": sha256_file(samples_path),
        "sampler": run.sample.sampler, "sampling_steps": run.sample.steps,
        "feature_network": network, "feature_extractor": extractor, "feature_network_sha256": sha,
        "resize": resize_method(run.dataset), **cost,
        "feature_images_per_s": rate, "seconds": time.perf_counter() - start,
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("evaluate", __doc__)
    p.add_argument("run", help="a run name from params.yaml (runs or ensembles)")
    p.add_argument("--samples", required=True, help="the sample stage's npz (outputs/<run>/samples/samples.npz)")
    p.add_argument("--cost", required=True, help="the sample stage's cost.json (outputs/<run>/samples/cost.json)")
    p.add_argument("--refstats", required=True, help="the dataset's reference features (data/refstats/<dataset>.npz)")
    p.add_argument("--out", required=True, help="the eval folder: writes <out>/metrics.json (outputs/<run>/eval)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    run = params.run(args.run)
    out = out_folder(args.out)
    m = evaluate_run(params, run, Path(args.samples), Path(args.cost), Path(args.refstats), out)
    metric, kernel = ("FVD", "KVD") if "fvd" in m else ("FID", "KID")
    flag = f" (singular covariance: exact SVD {metric})" if m["singular"] else ""
    k = kernel.lower()
    print(f"{run.name}: {metric} {m[metric.lower()]:.3f}{flag}, {kernel} {m[k]:.5f} +- {m[f'{k}_std']:.5f} "
          f"({m[f'{k}_subsets']} subsets of {m[f'{k}_subset_size']}) from {m['num_samples']} samples vs "
          f"{m['num_reference']} {m['reference_split']} references; IS {m['inception_score']}"
          + (f"; seam ratio {m['seam_ratio']:.3f} (real images: {m['seam_ratio_real']})" if "seam_ratio" in m else "")
          + (f"; floor (held-out real {m['floor_split']}, N = {m['floor_n']}): {metric} "
             f"{m['floor_' + metric.lower()]:.3f}, {kernel} {m['floor_' + k]:.5f}" if "floor_n" in m else "")
          + " -> "
          f"{out / 'metrics.json'}")
    return 0
