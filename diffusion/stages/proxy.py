"""The train stage's proxy of sample quality (params.yaml `train.proxy`): KID of a few hundred EMA samples against the
run's cached reference features, at several points of training, for the quality-against-compute figure. A proxy: few
samples and few sampling steps, so its values rank the points of one curve; the headline is the evaluate stage's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusion.config import ConfigError, RunConfig
from diffusion.metrics import kid as kidlib
from diffusion.metrics.features import feature_network_for, feature_space, timed_features
from diffusion.stages.references import load_reference_features
from diffusion.trainer import ProxyScore


def proxy_score(run: RunConfig, refstats: Path | None, device: torch.device | str = "cpu") -> ProxyScore:
    """The score the trainer calls at each proxy point: uint8 samples -> KID +- std against the first
    eval.num_reference cached features, with what it was measured on. The feature network and the references are
    loaded once, here, so a bad file fails before training starts."""
    if refstats is None:
        raise ConfigError(f"params.yaml: {run.params_key}.train.proxy is set, but the train stage got no --refstats "
                          f"(data/refstats/{run.dataset_name}.npz, made by `dvc repro refstats@{run.dataset_name}`)")
    refs = load_reference_features(Path(refstats), run)
    net = feature_network_for(run.dataset, device)
    network = feature_space(run.dataset)[1]

    def score(images: np.ndarray) -> dict:
        feats, rate = timed_features(images, net, desc=f"proxy features {run.name}")
        kid = kidlib.kid_from_features(feats, refs, max_subset_size=run.eval.kid_subset_size,
                                       subsets=run.eval.kid_subsets)
        return {"kid": kid.kid, "kid_std": kid.std, "kid_subset_size": kid.subset_size, "kid_subsets": kid.subsets,
                "num_reference": len(refs), "reference_split": run.eval.reference_split, "feature_network": network,
                "feature_images_per_s": rate}

    return score
