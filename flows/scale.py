"""Run scales and params.yaml overrides: `cpu` runs params.yaml as it is (what `dvc repro` builds); `paper` runs its
`paper` section instead (the papers' runs, for a GPU cluster); `smoke` shrinks every run, expert and ensemble, their
datasets and reference sets to minutes on a CPU. Overrides are dotted params.yaml keys, as in
`dvc exp run -S runs.rin_fmnist.train.steps=1000`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from diffusion.config import PAPER_KEYS, Params, paper_section, parse_params
from diffusion.typed import ConfigError

Scale = Literal["cpu", "paper", "smoke"]
SCALES: tuple[str, ...] = ("cpu", "paper", "smoke")

# The tiny configuration of every run, expert and ensemble at smoke scale. Each value is what the key is set to; one
# place, no defaults repeated: anything not named here keeps its params.yaml value.
RUN_SECTIONS = ("runs", "experts", "ensembles")  # params.yaml sections whose entries the report stage reads
SMOKE_DATASET = {"max_samples": 256, "shard_size": 128}  # per split, after the seeded shuffle; two shards a split
SMOKE_TINY_PRESET = {("rin", False): "rin_tiny", ("rin", True): "rin_tiny_video"}  # (family, video) -> preset;
# other families keep their (CPU-sized) presets and are only trained, sampled and evaluated less
SMOKE_TRAIN = {  # runs and experts (ensembles train nothing)
    "train.steps": 20,
    "train.batch_size": 16,
    "train.warmup_steps": 2,
    "train.log_every": 5,
    "train.checkpoint_every": 10,
    "train.sample_every": 0,
    "train.data": "memory",
}
SMOKE_PROXY = {"every": 10, "num_samples": 16, "steps": 2}  # a run's proxy KID curve, where it has one
SMOKE_AUTOENCODER = {"steps": 20, "batch_size": 16, "log_every": 5}  # autoencoders that train (steps > 0)
SMOKE_SAMPLE_STEPS = 10  # runs and ensembles (experts are sampled only through their ensemble)
# Samples per run = reference images per dataset: 64 images (Inception, ~10 s on 2 cores) or 16 clips (I3D, ~55
# GFLOP a clip). Fewer than the feature size: a singular covariance, which evaluate reports as exact SVD FID / FVD.
SMOKE_SAMPLES = {False: 64, True: 16}
SMOKE_FOURIER_IMAGES = 16
SMOKE_LABEL = "smoke test"  # what the report's "our setting" says about a smoke-scale row


class OverrideError(ConfigError):
    """An override names a key that params.yaml cannot hold; the message names it."""


def table_runs(raw: Mapping[str, Any], table: str) -> list[str]:
    """Runs whose evaluation.report entry places them in `table` (e.g. rin_table2), in params.yaml order. It reads
    the YAML data, not the typed config: a flow also drives DVC projects of other shapes (tests/conftest.py's toy)."""
    report = raw.get("evaluation", {}).get("report", {}) or {}
    return [name for name in raw.get("runs", {}) if (report.get(name) or {}).get("table") == table]


def smoke_overrides(params: Params) -> dict[str, Any]:
    """Dotted overrides that shrink every run, expert and ensemble (the report stage reads them all), their datasets,
    reference sets and autoencoders to smoke scale."""
    out: dict[str, Any] = {}
    references, report = params.evaluation.references, params.evaluation.report
    for name, run in params.all_runs.items():
        key, dataset, video = run.params_key, run.dataset_name, bool(run.dataset.frames)
        if run.section != "ensembles":
            out |= {f"{key}.{k}": v for k, v in SMOKE_TRAIN.items()}
            if run.train.proxy is not None:
                out[f"{key}.train.proxy"] = SMOKE_PROXY
            if (run.model.family, video) in SMOKE_TINY_PRESET:
                out[f"{key}.model.preset"] = SMOKE_TINY_PRESET[run.model.family, video]
                out[f"{key}.model.overrides"] = {}  # widths written for the full preset would undo the shrink
        if run.section != "experts":
            n = SMOKE_SAMPLES[video]
            out |= {f"{key}.sample.steps": SMOKE_SAMPLE_STEPS, f"{key}.sample.num_samples": n,
                    f"{key}.sample.batch_size": n, f"{key}.eval.num_reference": n}  # fmt: skip
            if dataset in references:
                out[f"evaluation.references.{dataset}.num_images"] = n
                if references[dataset].floor:
                    out[f"evaluation.references.{dataset}.floor"] = n
        if name in report:
            out[f"evaluation.report.{name}.scale"] = SMOKE_LABEL
        out |= {f"datasets.{dataset}.{k}": v for k, v in SMOKE_DATASET.items()}
    for name, autoencoder in params.autoencoders.items():
        if autoencoder.steps:
            out |= {f"autoencoders.{name}.{k}": v for k, v in SMOKE_AUTOENCODER.items()}
        for dataset in (autoencoder.dataset, name):
            out |= {f"datasets.{dataset}.{k}": v for k, v in SMOKE_DATASET.items()}
    if params.evaluation.fourier is not None:
        out["evaluation.fourier.num_images"] = SMOKE_FOURIER_IMAGES
    return out


def scale_overrides(raw: Mapping[str, Any], scale: str) -> dict[str, Any]:
    """The dotted overrides of a scale for the params.yaml data `raw` (read through the typed config)."""
    if scale not in SCALES:
        raise OverrideError(f"scale must be one of {list(SCALES)}, got {scale!r}")
    if scale == "smoke":
        return smoke_overrides(parse_params(raw))
    if scale == "paper":
        return paper_overrides(raw)
    return {}


def paper_overrides(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The `paper` section in place of the pipeline's sections (pipeline, autoencoders, runs, experts, ensembles,
    evaluation): top-level overrides, so the workspace builds the papers' runs and only them."""
    promoted = paper_section(raw)
    if promoted is None:
        raise OverrideError("params.yaml has no `paper` section: the paper scale runs its runs (add one, or use the "
                            "cpu scale to run params.yaml as it is)")
    return {key: promoted[key] for key in PAPER_KEYS}


def absolute_roots(raw: Mapping[str, Any], repo: Path) -> dict[str, Any]:
    """Overrides that point relative dataset roots at the repository, for params used from another folder."""
    return {
        f"datasets.{name}.root": str(repo / cfg["root"])
        for name, cfg in raw.get("datasets", {}).items()
        if isinstance(cfg, Mapping) and cfg.get("root") and not Path(cfg["root"]).is_absolute()
    }


def set_args(overrides: Mapping[str, Any]) -> list[str]:
    """`-S ++key=value` arguments for `dvc exp run` (Hydra's override grammar: `++` sets a key, adding it when
    params.yaml lacks it); values written as JSON scalars and lists."""
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"++{key}={json.dumps(value)}"]
    return args
