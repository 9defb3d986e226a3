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


def test_a_sitting_reuses_the_repositorys_reference_parts_only_where_their_images_match(tmp_path, monkeypatch):
    """seed_reference_parts copies, of the repository's parts (40 train images and a floor of 20, in parts of 16),
    only those a smaller reference set (20 and a floor of 8) is made of and the workspace lacks; write_refstats then
    computes only the parts whose images differ (the second train part holds 4 images there, the floor's 8), and
    its features equal a run from nothing."""
    import dataclasses

    import numpy as np

    from data.prepare import write_dataset_shards
    from diffusion.stages import refstats
    from flows.claims import seed_reference_parts

    calls: list[int] = []

    def fake_features(images, net, desc):
        calls.append(len(images))
        return images.reshape(len(images), -1)[:, :8].astype(np.float32) + 0.5, 100.0

    monkeypatch.setattr(refstats, "timed_features", fake_features)
    monkeypatch.setattr(refstats, "PART_SIZE", 16)
    params = load_params(REPO / "params.yaml")
    cfg = dataclasses.replace(params.datasets["fashion_mnist"], max_samples=40, shard_size=16)
    write_dataset_shards(cfg, "fashion_mnist", tmp_path / "shards", splits=("train", "test"))
    repo, ws = tmp_path / "repo", tmp_path / "ws"
    whole = dataclasses.replace(params.evaluation.references["fashion_mnist"], num_images=40, floor=20)
    parts = repo / "data" / "refstats" / "fashion_mnist.parts"
    refstats.write_refstats("fashion_mnist", cfg, whole, tmp_path / "shards", repo / "ref.npz", "net", parts)
    small = {"evaluation": {"references": {"fashion_mnist": {"split": "train", "num_images": 20, "floor": 8}}}}
    ws_parts = ws / "data" / "refstats" / "fashion_mnist.parts"
    ws_parts.mkdir(parents=True)
    (ws_parts / "test-00000000.npz").write_bytes(b"the workspace's own")  # there already: left alone
    assert seed_reference_parts(repo, ws, small) == ["fashion_mnist.parts/train-00000000.npz",
                                                     "fashion_mnist.parts/train-00000016.npz"]
    assert (ws_parts / "test-00000000.npz").read_bytes() == b"the workspace's own"
    assert sorted(p.name for p in ws_parts.iterdir()) == ["test-00000000.npz", "train-00000000.npz",
                                                          "train-00000016.npz"]  # not the third train part
    ref = dataclasses.replace(whole, num_images=20, floor=8)
    calls.clear()
    refstats.write_refstats("fashion_mnist", cfg, ref, tmp_path / "shards", ws / "ref.npz", "net", ws_parts)
    assert calls == [4, 8]  # the first train part reused; the copied second one holds other images, so computed
    refstats.write_refstats("fashion_mnist", cfg, ref, tmp_path / "shards", tmp_path / "fresh.npz", "net",
                            tmp_path / "fresh.parts")
    with np.load(ws / "ref.npz") as a, np.load(tmp_path / "fresh.npz") as b:
        for key in ("features", "floor_features", "mu", "sigma"):
            np.testing.assert_array_equal(a[key], b[key])
    assert seed_reference_parts(tmp_path / "no-repo-parts", ws, small) == []
