"""The `reproduce-claims` flow: the papers' claims (params.yaml `claims`) at a scale. It builds the arms of the chosen
claims in the claims workspace .flows/workspaces/claims-<scale>/ (each arm and seed a run there, its stages cached
and resumable like every other), records each built arm in results/claims/<scale>/arms/ and draws the verdicts
(diffusion/stages/claims.py): at cpu scale the repository's `claims` stage, whose table the report shows.

Arms are built one after another, each recorded as soon as it is scored; an arm whose record matches its
configuration (the fingerprint of its run, experts, defaults, dataset and reference set) is not built again. So the
set can be built over several sittings, even on machines that share no DVC cache, by committing the records between
them; a sitting cut short loses at most the arm it was building (whose checkpoints resume it on the same machine).
`python -m flows.claims --scale smoke --claims schedule` runs it once."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from diffusion import flops
from diffusion.claims import arm_fingerprint, arm_run_name, arm_seeds, chosen_claims, claims_of, claims_overrides
from diffusion.config import paper_section, parse_params
from diffusion.stages import refstats
from diffusion.stages.claims import RECORD_VERSION, arm_state, read_json, read_records, write_claims, write_record
from diffusion.stages.report import STAGES, git_commit, read_lock, stage_digest
from diffusion.typed import ConfigError, set_dotted
from flows.artifacts import publish_markdown
from flows.results import result_storage
from flows.scale import Scale, paper_overrides, smoke_overrides
from flows.tasks import prepare_workspace, run_stages
from flows.workspace import read_params, repo_root, workspace_words

RESULTS = "results/claims"  # <RESULTS>/<scale>/arms/<run>.json: the committed records
CLAIMS_STAGE = "claims"  # the repository's dvc.yaml stage that draws the cpu scale's verdicts


def scale_raw(raw: dict[str, Any], scale: str) -> dict[str, Any]:
    """The params data whose claims a scale builds: params.yaml's own (cpu, smoke) or its `paper` section's."""
    if scale != "paper":
        return raw
    promoted = paper_section(raw)
    if promoted is None or not promoted.get("claims"):
        raise ConfigError("params.yaml has no paper.claims: the paper scale tests claims on the paper's runs; add a "
                          "`claims` section under `paper` (the same keys as the top-level one) or use scale cpu")
    return promoted


def workspace_overrides(raw: dict[str, Any], scale: str) -> dict[str, Any]:
    """Every top-level or dotted override that makes a scale's claims workspace from params.yaml: the claims' arms
    (all of them, so the workspace stays the same whichever claims a run builds), shrunk at smoke scale; at paper
    scale over the paper section's datasets and autoencoders."""
    overrides = claims_overrides(scale_raw(raw, scale))
    if scale == "paper":
        overrides = paper_overrides(raw) | overrides
    if scale == "smoke":
        overrides |= smoke_overrides(parse_params(set_dotted(raw, overrides)))
    return overrides


def seed_reference_parts(repo: Path, workspace: Path, workspace_raw: Mapping[str, Any]) -> list[str]:
    """Copy into the workspace's refstats parts folders the parts of the repository's (its whole-split references)
    that the workspace's smaller reference sets are made of, where the workspace has none yet: the first 10000 train
    images share their first four parts of 2048 with the 60000. A part is used only when its stored key (the sha256
    of its images and the feature extractor) matches what the refstats stage reads, so a copied part of other images
    is computed again there. Only the parts the workspace's sets need are copied (no stray files in a DVC output).
    Returns the copied names."""
    copied = []
    for dataset, ref in workspace_raw.get("evaluation", {}).get("references", {}).items():
        src, dst = (root / "data" / "refstats" / f"{dataset}.parts" for root in (repo, workspace))
        if not src.is_dir():
            continue
        wanted = [(ref["split"], ref["num_images"])] + ([(refstats.FLOOR_SPLIT[ref["split"]], ref["floor"])]
                                                        if ref.get("floor") else [])
        for split, n in wanted:
            for start in range(0, n, refstats.PART_SIZE):
                name = f"{split}-{start:08d}.npz"
                if (src / name).is_file() and not (dst / name).exists():
                    dst.mkdir(parents=True, exist_ok=True)
                    tmp = dst / f".{name}.copy"
                    shutil.copyfile(src / name, tmp)
                    os.replace(tmp, dst / name)
                    copied.append(f"{dataset}.parts/{name}")
    return copied


def arms_to_build(raw: dict[str, Any], workspace_raw: dict[str, Any], claims: Sequence[str], records: Path,
                  rebuild: bool) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(arms and seeds to build, arms and seeds whose current record is kept), by the claims stage's own rule."""
    states = arm_state(workspace_raw, read_records(records))
    build, kept = [], []
    for arm, seeds in arm_seeds(claims_of(raw), claims).items():
        for seed in seeds:
            current = not rebuild and states[arm_run_name(arm, seed)][0] == "ok"
            (kept if current else build).append((arm, seed))
    return build, kept


def _trained(workspace: Path, name: str, run_cfg: Any) -> dict[str, Any]:
    """One trained network of an arm: steps, images, throughput, minutes, final loss, counted PFLOP, proxy rows."""
    folder = workspace / "outputs" / name / "train"
    metrics = read_json(folder / "metrics.json")
    log = read_json(folder / "train_log.json") if (folder / "train_log.json").exists() else {}
    per_example = flops.train_flops_per_example(run_cfg)
    return {"run": name, "steps": metrics["steps"], "images_seen": metrics["images_seen"],
            "images_per_s": metrics["images_per_s"], "minutes": metrics["images_seen"] / metrics["images_per_s"] / 60,
            "final_loss": metrics["final_loss"], "train_flops_per_example": per_example,
            "train_pflop": per_example * metrics["images_seen"] / 1e15, "proxy": log.get("proxy", [])}


def arm_record(workspace: Path, workspace_raw: Mapping[str, Any], arm: str, seed: int, commit: str) -> dict[str, Any]:
    """What a claims workspace holds of one built arm: read from its outputs and dvc.lock."""
    params = parse_params(workspace_raw)
    name = arm_run_name(arm, seed)
    run = params.all_runs[name]
    nets = run.experts or (run,)
    ev = read_json(workspace / "outputs" / name / "eval" / "metrics.json")
    lock, why = read_lock(workspace / "dvc.lock")
    stages = ([f"{STAGES[n.section]['train']}@{n.name}" for n in nets]
              + [f"{STAGES[run.section]['grid']}@{name}", f"{STAGES[run.section]['eval']}@{name}"])
    interval = workspace / "outputs" / name / "eval" / "interval_loss.json"  # ensembles: each expert's own interval
    if interval.exists():
        stages.append(f"interval_loss@{name}")
    digests = {s: stage_digest(lock[s]) if lock and s in lock else f"not in dvc.lock ({why or 'stage not run'})"
               for s in stages}
    return {"version": RECORD_VERSION, "arm": arm, "seed": seed, "run": name,
            "interval_loss": read_json(interval) if interval.exists() else None,
            "fingerprint": arm_fingerprint(workspace_raw, name), "commit": commit, "stage_digests": digests,
            "eval": ev, "train": [_trained(workspace, n.name, n) for n in nets]}


@task(name="record-arms", cache_policy=NO_CACHE)
def record_arms(workspace: str, repo: str, scale: str, arms: list[tuple[str, int]]) -> list[str]:
    """Write the record of every built arm into <repo>/results/claims/<scale>/arms/ (atomic, one file per arm)."""
    ws = Path(workspace)
    workspace_raw = yaml.safe_load((ws / "params.yaml").read_text())
    folder = Path(repo) / RESULTS / scale / "arms"
    commit = git_commit(Path(repo))
    return [str(write_record(folder, arm_record(ws, workspace_raw, arm, seed, commit))) for arm, seed in arms]


@task(name="draw-verdicts", cache_policy=NO_CACHE)
def draw_verdicts(raw: dict[str, Any], workspace_raw: dict[str, Any], records: str, out: str) -> list[dict[str, Any]]:
    """The verdicts of every claim of `raw` from the records of its workspace's arms (diffusion/stages/claims.py)."""
    return write_claims(claims_of(raw), workspace_raw, Path(records), Path(out))


def eval_stage(workspace_raw: dict[str, Any], run: str) -> str:
    return f"{STAGES['ensembles' if run in workspace_raw['ensembles'] else 'runs']['eval']}@{run}"


@flow(name="reproduce-claims", flow_run_name="claims-{scale}")
def reproduce_claims(
    scale: Scale = "cpu",
    claims: list[str] | None = None,
    rebuild: bool = False,
    parallel: int = 0,
    project: str | None = None,
    launcher: str = "",
) -> dict:
    """Build and judge the papers' claims at `scale` ("cpu": params.yaml's claims as written, several hours on 2
    cores, see the README; "smoke": the same arms shrunk to seconds; "paper": params.yaml's paper.claims, for GPUs).
    `claims`: the claim ids to build (default: all); `rebuild`: build arms again even where a current record exists;
    `parallel`, `project`, `launcher`: as reproduce-table2's."""
    log = get_run_logger()
    repo = Path(project).resolve() if project else repo_root()
    raw = read_params(repo)
    base = scale_raw(raw, scale)
    chosen = chosen_claims(claims_of(base), claims)
    overrides = workspace_overrides(raw, scale)
    workspace = Path(prepare_workspace(str(repo), f"claims-{scale}", overrides))
    workspace_raw = yaml.safe_load((workspace / "params.yaml").read_text())
    records = repo / RESULTS / scale / "arms"
    seeded = seed_reference_parts(repo, workspace, workspace_raw)
    if seeded:
        log.info("reference feature parts copied from %s, checked by their keys before use: %s", repo,
                 ", ".join(seeded))
    build, kept = arms_to_build(base, workspace_raw, chosen, records, rebuild)
    log.info("claims %s at %s scale: %d arm runs to build, %d kept from %s", chosen, scale, len(build), len(kept),
             records)
    stages: dict[str, dict] = {}
    for i, (arm, seed) in enumerate(build, start=1):  # one arm at a time, recorded as soon as it is scored
        run = arm_run_name(arm, seed)
        log.info("arm %d of %d: %s", i, len(build), run)
        targets = [eval_stage(workspace_raw, run)] + ([f"interval_loss@{run}"] if run in workspace_raw["ensembles"]
                                                       else [])
        stages |= run_stages(workspace, targets, result_storage(repo), parallel, launcher)
        record_arms(str(workspace), str(repo), scale, [(arm, seed)])
    if scale == "cpu":  # the repository's own stage: `dvc repro claims` draws the same table
        stages |= run_stages(repo, [CLAIMS_STAGE], result_storage(repo), parallel, launcher)
        out = repo / "outputs" / "claims"
    else:
        out = workspace / "outputs" / "claims"
        draw_verdicts(base, workspace_raw, str(records), str(out))
    where = workspace_words("repo" if scale == "cpu" else workspace.name)
    publish_markdown(out / "claims.md", f"claims-{scale}", f"the papers' claims at {scale} scale",
                     f"outputs/claims/ of {where}")
    return {"workspace": workspace.name, "claims": chosen, "built": [arm_run_name(a, s) for a, s in build],
            "kept": [arm_run_name(a, s) for a, s in kept], "stages": stages, "table": str(out / "claims.md")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.claims", description=__doc__)
    p.add_argument("--scale", choices=["smoke", "cpu", "paper"], default="smoke")
    p.add_argument("--claims", nargs="*", help="claim ids (default: all)")
    p.add_argument("--rebuild", action="store_true", help="build arms again even where a current record exists")
    p.add_argument("--parallel", type=int, default=0)
    p.add_argument("--project", help="checkout to run in (default: this one)")
    p.add_argument("--launcher", default="")
    args = p.parse_args(argv)
    result = reproduce_claims(scale=args.scale, claims=args.claims, rebuild=args.rebuild, parallel=args.parallel,
                              project=args.project, launcher=args.launcher)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
