"""The reproduce-claims flow: the claims workspace DVC renders (one stage chain per arm and seed, no verdict stage), at
cpu, paper and smoke scale; the slow test runs one claim at smoke scale through a real Prefect server, then again,
and checks that every arm is recorded once and kept on the second run."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from diffusion.config import load_params, load_yaml
from flows.claims import RESULTS, workspace_overrides
from flows.workspace import sync_workspace
from tests.flows.test_flows import REPO, needs_data, task_states

RAW = load_yaml(REPO / "params.yaml")


def _stages(ws) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(ws)) as repo:
        return {s.name for s in repo.index.stages}


@pytest.mark.parametrize("scale", ["cpu", "paper"])
def test_claims_workspace_renders_one_stage_chain_per_arm_and_seed(scale):
    ws = sync_workspace(REPO, f"test-claims-{scale}", workspace_overrides(RAW, scale))
    try:
        params = load_params(ws / "params.yaml")
        names = _stages(ws)
        assert params.claims is None and "claims" not in names and "fourier" not in names
        if scale == "cpu":
            assert {"train@rin_s0", "evaluate@rin_cosine_s1", "train_expert@meme_hard_s1_e4",
                    "evaluate_ensemble@iunet_same_s0", "refstats@fashion_mnist"} <= names
            assert not any(n.endswith("@rin_fmnist") or n.endswith("@meme_fmnist") for n in names)
            assert params.evaluation.references["fashion_mnist"].num_images == 10000
        else:
            assert {"train@rin_sc05_s0", "evaluate_ensemble@meme_hard_s0", "autoencoder@ffhq256_f4"} <= names
            assert params.pipeline.datasets == ("cifar10", "ffhq256")
    finally:
        shutil.rmtree(ws)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~5 min on an idle 2-core machine
@needs_data
def test_smoke_claim_through_prefect_records_its_arms_then_keeps_them(prefect_server, clone):
    from flows.claims import reproduce_claims

    state = reproduce_claims(scale="smoke", claims=["schedule"], project=str(clone), return_state=True)
    result = state.result()
    assert sorted(result["built"]) == ["rin_cosine_s0", "rin_cosine_s1", "rin_s0", "rin_s1"] and not result["kept"]
    records = clone / RESULTS / "smoke" / "arms"
    assert sorted(p.name for p in records.glob("*.json")) == [f"{r}.json" for r in sorted(result["built"])]
    record = json.loads((records / "rin_cosine_s1.json").read_text())
    assert record["seed"] == 1 and record["eval"]["num_samples"] == 64
    assert record["stage_digests"]["evaluate@rin_cosine_s1"] and record["train"][0]["train_pflop"] > 0
    claims = {c["id"]: c for c in json.loads((clone / ".flows/workspaces/claims-smoke/outputs/claims/claims.json")
                                             .read_text())}  # fmt: skip
    assert claims["schedule"]["verdict"] in ("supported", "not supported", "inconclusive")
    assert claims["self_cond"]["verdict"] is None  # not built in this run
    again = reproduce_claims(scale="smoke", claims=["schedule"], project=str(clone), return_state=True)
    assert again.result()["built"] == [] and len(again.result()["kept"]) == 4
    ran = {n for n, (s, _) in task_states(again.state_details.flow_run_id).items() if "@" in n}
    assert not ran  # nothing was handed to DVC: every arm's record is current
    ws = yaml.safe_load((clone / ".flows/workspaces/claims-smoke/params.yaml").read_text())
    assert ws["runs"]["rin_s0"]["train"]["steps"] == 20  # smoke scale shrank the arms


def test_an_arm_with_a_current_record_is_kept_and_a_changed_one_rebuilt(tmp_path):
    from diffusion.claims import claims_overrides
    from diffusion.stages.claims import write_record
    from diffusion.typed import set_dotted
    from flows.claims import arms_to_build
    from tests.diffusion.test_claims import _record

    ws = set_dotted(RAW, claims_overrides(RAW))
    for seed in (0, 1):
        write_record(tmp_path, _record("rin", seed, 0.06, ws))
    write_record(tmp_path, _record("rin_cosine", 0, 0.06, ws) | {"fingerprint": "0" * 64})
    build, kept = arms_to_build(RAW, ws, ["schedule"], tmp_path, rebuild=False)
    assert kept == [("rin", 0), ("rin", 1)] and build == [("rin_cosine", 0), ("rin_cosine", 1)]
    build, kept = arms_to_build(RAW, ws, ["schedule"], tmp_path, rebuild=True)
    assert not kept and len(build) == 4


@pytest.mark.usefixtures("fashion_mnist")
def test_dvc_repro_claims_draws_the_verdicts_from_committed_records(tmp_path):
    """The repository's `claims` stage under real DVC: records in results/claims/cpu/arms -> outputs/claims, then
    `dvc status` clean; a new record makes it stale."""
    from diffusion.claims import claims_overrides
    from diffusion.stages.claims import write_record
    from diffusion.typed import set_dotted
    from tests.diffusion.test_claims import _record
    from tests.flows.test_flows import dvc, dvc_status, working_tree_copy

    root = working_tree_copy(tmp_path / "repo")
    raw = load_yaml(root / "params.yaml")
    ws = set_dotted(raw, claims_overrides(raw))
    arms = root / "results/claims/cpu/arms"
    for seed in (0, 1):
        write_record(arms, _record("rin", seed, 0.050, ws))
        write_record(arms, _record("rin_cosine", seed, 0.051, ws))
    proc = dvc(root, "repro", "claims")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = {r["id"]: r for r in json.loads((root / "outputs/claims/claims.json").read_text())}
    assert results["schedule"]["verdict"] == "inconclusive"  # 0.001 apart with a subset spread of 0.001 each
    assert dvc_status(root, "claims") == {}
    write_record(arms, _record("rin_rw4", 0, 0.04, ws))
    assert "claims" in dvc_status(root, "claims")
