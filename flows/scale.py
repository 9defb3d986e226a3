"""Run scales and params.yaml overrides: `paper` runs params.yaml as it is (a GPU cluster); `smoke` shrinks every
run, its dataset and reference set to minutes on a CPU. Overrides are dotted params.yaml keys, as in
`dvc exp run -S runs.rin_fmnist.train.steps=1000`."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

Scale = Literal["paper", "smoke"]
SCALES: tuple[str, ...] = ("paper", "smoke")

# The tiny configuration of every run at smoke scale. Each value is what the key is set to; one place, no defaults
# repeated: anything not named here keeps its params.yaml value.
SMOKE_DATASET = {"max_samples": 256, "shard_size": 128}  # per split, after the seeded shuffle; two shards a split
SMOKE_TINY_PRESET = {("rin", False): "rin_tiny", ("rin", True): "rin_tiny_video"}  # (family, video) -> preset;
# families without an entry keep their preset and are only trained, sampled and evaluated less
SMOKE_RUN = {
    "train.steps": 40,
    "train.batch_size": 16,
    "train.warmup_steps": 4,
    "train.log_every": 5,
    "train.checkpoint_every": 10,
    "train.sample_every": 0,
    "train.data": "memory",
    "sample.steps": 10,
}
# Samples per run = reference images per dataset: 64 images (Inception, ~10 s on 2 cores) or 16 clips (I3D, ~55
# GFLOP a clip). Fewer than the feature size: a singular covariance, which evaluate reports as exact SVD FID / FVD.
SMOKE_SAMPLES = {False: 64, True: 16}
SMOKE_LABEL = "smoke test"  # what the report's "our setting" says about a smoke-scale row


class OverrideError(ValueError):
    """An override names a key that params.yaml cannot hold; the message names it."""


def table_runs(raw: Mapping[str, Any], table: str) -> list[str]:
    """Runs whose evaluation.report entry places them in `table` (e.g. rin_table2), in params.yaml order."""
    report = raw.get("evaluation", {}).get("report", {}) or {}
    return [name for name in raw.get("runs", {}) if (report.get(name) or {}).get("table") == table]


def smoke_overrides(raw: Mapping[str, Any], runs: Iterable[str]) -> dict[str, Any]:
    """Dotted overrides that shrink `runs`, their datasets and the datasets' reference sets to smoke scale."""
    out: dict[str, Any] = {}
    references = raw.get("evaluation", {}).get("references", {}) or {}
    for name in runs:
        if name not in raw.get("runs", {}):
            raise OverrideError(f"params.yaml: no run named {name!r}; runs are {sorted(raw.get('runs', {}))}")
        run = raw["runs"][name]
        dataset = run.get("dataset")
        video = bool(raw.get("datasets", {}).get(dataset, {}).get("frames"))
        family = (run.get("model") or {}).get("family") or raw["defaults"]["model"]["family"]
        if (family, video) in SMOKE_TINY_PRESET:
            out[f"runs.{name}.model.preset"] = SMOKE_TINY_PRESET[family, video]
        n = SMOKE_SAMPLES[video]
        out |= {f"runs.{name}.{key}": value for key, value in SMOKE_RUN.items()}
        out |= {f"runs.{name}.sample.num_samples": n, f"runs.{name}.sample.batch_size": n,
                f"runs.{name}.eval.num_reference": n}  # fmt: skip
        out |= {f"datasets.{dataset}.{key}": value for key, value in SMOKE_DATASET.items()}
        if dataset in references:
            out[f"evaluation.references.{dataset}.num_images"] = n
        if name in (raw.get("evaluation", {}).get("report") or {}):
            out[f"evaluation.report.{name}.scale"] = SMOKE_LABEL
    return out


def scale_overrides(raw: Mapping[str, Any], scale: str, runs: Iterable[str]) -> dict[str, Any]:
    if scale not in SCALES:
        raise OverrideError(f"scale must be one of {list(SCALES)}, got {scale!r}")
    return smoke_overrides(raw, runs) if scale == "smoke" else {}


def absolute_roots(raw: Mapping[str, Any], repo: Path) -> dict[str, Any]:
    """Overrides that point relative dataset roots at the repository, for params used from another folder."""
    return {
        f"datasets.{name}.root": str(repo / cfg["root"])
        for name, cfg in raw.get("datasets", {}).items()
        if isinstance(cfg, Mapping) and cfg.get("root") and not Path(cfg["root"]).is_absolute()
    }


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `raw` with each dotted key set; missing mappings on the way are created."""
    out = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        if not all(keys):
            raise OverrideError(f"override {dotted!r}: empty key part; write e.g. runs.rin_fmnist.train.steps")
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise OverrideError(
                    f"override {dotted!r}: params.yaml {'.'.join(keys[: i + 1])} is "
                    f"{type(child).__name__} {child!r}, not a mapping"
                )
            node = child
        node[keys[-1]] = copy.deepcopy(value)
    return out


def set_args(overrides: Mapping[str, Any]) -> list[str]:
    """`-S ++key=value` arguments for `dvc exp run` (Hydra's override grammar: `++` sets a key, adding it when
    params.yaml lacks it); values written as JSON scalars and lists."""
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"++{key}={json.dumps(value)}"]
    return args


def fingerprint(obj: Any) -> str:
    """A stable text form of JSON-able data (sorted keys), for names and cache keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
