"""The cached reference features a run is scored against (the refstats stage's npz), read and checked: by the
evaluate stage, and by the train stage for its proxy KID curve (diffusion/stages/proxy.py)."""

from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path

import numpy as np

from data.tarformat import DataError
from diffusion.config import RunConfig
from diffusion.metrics.features import feature_space


@contextlib.contextmanager
def open_npz(path: Path, fix: str):
    """np.load of a pickle-free npz; a file that is not one, or lacks an array read inside the block, is a DataError
    naming it and `fix`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            yield z
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not the npz this stage reads ({type(err).__name__}: {err}); re-create it: "
                        f"{fix}") from None


def load_reference_features(path: Path, run: RunConfig) -> np.ndarray:
    """The first run.eval.num_reference cached features (N, D) float64, after checking what the file holds."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no cached reference features; run `dvc repro refstats@{run.dataset_name}`")
    with open_npz(path, f"`dvc repro refstats@{run.dataset_name}`") as z:
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
