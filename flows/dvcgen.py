"""The two dvc.yaml stages that name runs one by one (DVC cannot loop inside a stage's deps): `report` reads every
run's files, `fourier` every analysed run's weights. Given a params file, `static_stages` writes them for its runs;
a derived workspace whose params name other runs (the paper scale: params.yaml's `paper` section) gets its dvc.yaml
from `render`, and tests/flows check that the repository's own dvc.yaml is what these functions write for
params.yaml, so the hand-kept lists cannot drift."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from diffusion.config import Params, RunConfig
from diffusion.stages.report import RUN_FILES, STAGES

OUTPUTS = "outputs"
FOURIER_OUT = f"{OUTPUTS}/fourier"
CLAIMS_OUT = f"{OUTPUTS}/claims"


def report_order(params: Params) -> list[RunConfig]:
    """The runs the report reads: the pipeline's runs, then each ensemble followed by its experts, then experts of no
    ensemble."""
    out = list(params.runs.values())
    for ensemble in params.ensembles.values():
        out += [ensemble, *ensemble.experts]
    listed = {r.name for r in out}
    return out + [e for e in params.experts.values() if e.name not in listed]


def _code_deps(stage: Mapping[str, Any]) -> list[str]:
    """A stage's deps that are code or configuration (not data shards or run outputs), in their order."""
    return [d for d in stage["deps"] if not d.startswith((f"{OUTPUTS}/", "data/shards/"))]


def report_stage(template: Mapping[str, Any], params: Params) -> dict[str, Any]:
    """The report stage for `params`' runs: `template` (the repository's stage) with its --runs list, run-file deps
    and the fourier input rewritten."""
    runs = report_order(params)
    fourier = params.evaluation.fourier is not None
    claims = params.claims is not None  # the repository's claims stage (a claims workspace has none)
    cmd = ("python -m diffusion.cli report --runs " + " ".join(f"{r.name}={OUTPUTS}/{r.name}" for r in runs)
           + (f" --fourier {FOURIER_OUT}" if fourier else "") + (f" --claims {CLAIMS_OUT}" if claims else "")
           + f" --recipes recipes.yaml --dvc-lock dvc.lock --out {OUTPUTS}/report")
    files = [f"{OUTPUTS}/{r.name}/" + "/".join(RUN_FILES[key]) for r in runs for key in STAGES[r.section]]
    stage = copy.deepcopy(dict(template))
    stage["cmd"] = cmd
    stage["deps"] = (_code_deps(template) + files + ([FOURIER_OUT] if fourier else [])
                     + ([CLAIMS_OUT] if claims else []))
    return stage


def fourier_stage(template: Mapping[str, Any], params: Params) -> dict[str, Any] | None:
    """The fourier stage for `params`' evaluation.fourier (None when it has none): each analysed run's train folder
    (an ensemble's: its experts'), its dataset's shards, and the params each run's analysis reads."""
    cfg = params.evaluation.fourier
    if cfg is None:
        return None
    runs = [params.all_runs[n] for n in cfg.runs if n in params.all_runs]
    trained = [t for r in runs for t in (r.experts or (r,))]
    datasets = sorted({r.dataset_name for r in runs})
    weights = " ".join(f"{t.name}={OUTPUTS}/{t.name}/train" for t in trained)
    cmd = (f"python -m diffusion.cli fourier --weights {weights}"
           + " --shards " + " ".join(f"{d}=data/shards/{d}" for d in datasets) + f" --out {FOURIER_OUT}")
    stage = copy.deepcopy(dict(template))
    stage["cmd"] = cmd
    stage["deps"] = ([f"data/shards/{d}" for d in datasets] + _code_deps(template)
                     + [f"{OUTPUTS}/{t.name}/train/ema.safetensors" for t in trained])
    stage["params"] = ["evaluation.fourier", "defaults.model", "defaults.diffusion", "defaults.sample"] + [
        f"{r.params_key}.{key}" for r in runs for key in ("model", "diffusion", "sample")]
    return stage


def static_stages(dvc: Mapping[str, Any], params: Params) -> dict[str, Any]:
    """dvc.yaml's data with its report and fourier stages written for `params` (fourier dropped when params have no
    evaluation.fourier, claims when they have no claims: a claims workspace builds the arms, not the verdicts)."""
    out = copy.deepcopy(dict(dvc))
    stages = dict(out["stages"])
    if params.claims is None:
        stages.pop("claims", None)
    stages["report"] = report_stage(dvc["stages"]["report"], params)
    fourier = fourier_stage(dvc["stages"]["fourier"], params)
    if fourier is None:
        stages.pop("fourier", None)
    else:
        stages["fourier"] = fourier
    out["stages"] = stages
    return out
