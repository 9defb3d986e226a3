"""Evaluation metrics: FID with clean-fid's preprocessing on an offline, hash-pinned TF-Inception; Inception Score
when real Inception-v3 classifier weights are supplied. The IS formula itself is
`diffusion.metrics.inception_score.inception_score` (not re-exported: it would shadow its module's name)."""

from diffusion.metrics.fid import (
    EXTRACTOR_ID,
    FEATURE_DIM,
    FeatureStats,
    FIDInception,
    FIDResult,
    clean_resize,
    extract_features,
    feature_stats,
    fid_from_features,
    fid_from_stats,
    frechet_distance,
    load_fid_inception,
    load_stats,
    save_stats,
)
from diffusion.metrics.inception_score import (
    IS_NOT_AVAILABLE,
    ISClassifier,
    ISResult,
    compute_inception_score,
    load_is_classifier,
)
from diffusion.metrics.weights import WeightsError, resolve_fid_inception, weights_dir

__all__ = [
    "EXTRACTOR_ID", "FEATURE_DIM", "FeatureStats", "FIDInception", "FIDResult", "clean_resize", "extract_features",
    "feature_stats", "fid_from_features", "fid_from_stats", "frechet_distance", "load_fid_inception", "load_stats",
    "save_stats", "IS_NOT_AVAILABLE", "ISClassifier", "ISResult", "compute_inception_score",
    "load_is_classifier", "WeightsError", "resolve_fid_inception", "weights_dir",
]
