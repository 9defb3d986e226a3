"""The papers' claims (params.yaml `claims`, diffusion/claims.py, diffusion/stages/claims.py): every arm of the shipped
file builds into a valid claims workspace, the arms are what the claims say they are (seeds, protocol, the experts'
keys, equal training compute where a claim needs it), a record goes stale when its base run changes, the verdict
rule decides as documented, and the claims stage writes the table, cards and figures from records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusion.claims import (
    ArmScore,
    arm_fingerprint,
    claims_overrides,
    compare,
    verdict,
)
from diffusion.config import load_params, parse_params
from diffusion.stages import report
from diffusion.stages.claims import RECORD_VERSION, read_records, write_claims, write_record
from diffusion.typed import ConfigError, set_dotted
from tests.helpers import with_key

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="module")
def workspace(raw):
    return set_dotted(raw, claims_overrides(raw))


def test_every_arm_of_every_claim_builds_a_valid_workspace(raw, workspace):
    from diffusion import registry

    params = parse_params(workspace)
    registry.check(params)  # model presets and overrides resolve (RIN's block counts, the U-Net's widths)
    cfg = load_params(REPO / "params.yaml").claims
    for cid, claim in cfg.claims.items():
        for arm in claim.arms:
            for seed in cfg.seeds_of(cid):
                run = params.all_runs[f"{arm}_s{seed}"]
                assert run.train.seed == seed or run.section == "ensembles"
                assert run.sample.num_samples == 1024 and run.eval.num_reference == 10000
    assert params.pipeline.datasets == ("fashion_mnist",)
    assert params.evaluation.references["fashion_mnist"].num_images == 10000
    assert params.claims is None and params.paper is None and not params.evaluation.report
    assert "rin_fmnist" not in params.all_runs  # only arms: the workspace builds nothing else


def test_arms_are_what_their_claims_compare(raw, workspace):
    params = parse_params(workspace)
    base = load_params(REPO / "params.yaml").runs["rin_fmnist"]
    assert params.runs["rin_sc09_s1"].train.self_cond_rate == 0.9 and params.runs["rin_s1"].train.self_cond_rate == 0
    assert params.runs["rin_s0"].train.steps == params.runs["rin_sc09_s0"].train.steps == base.train.steps
    assert params.runs["rin_cosine_s0"].diffusion.train_schedule.kind == "cosine"
    assert params.runs["rin_s0"].diffusion.train_schedule == base.diffusion.train_schedule
    over = [params.runs[f"rin_rw{k}_s0"].model.overrides for k in (4, 1)]
    assert [(o["num_blocks"], o["process_layers"]) for o in over] == [(4, 1), (1, 4)]
    assert all(o["interface_dim"] == 192 for o in over)  # the run's own widths kept beside the arm's keys
    # MEME, fairly: every expert trains the single U-Net's steps; the hard split and the control differ only there
    single = params.runs["unet_s0"].train.steps
    for arm in ("meme", "multi_unet", "iunet_same", "meme_hard"):
        experts = params.ensembles[f"{arm}_s1"].experts
        assert [e.train.steps for e in experts] == [single] * 4 and all(e.train.seed == 1 for e in experts)
        assert [e.name for e in experts] == [f"{arm}_s1_e{i}" for i in range(1, 5)]
    assert [e.train.expert.p for e in params.ensembles["meme_hard_s0"].experts] == [1.0] * 4
    assert [e.train.expert.p for e in params.ensembles["meme_s0"].experts] == [0.8, 0.4, 0.2, 0.1]
    assert {e.model.preset for e in params.ensembles["iunet_same_s0"].experts} == {"iunet_fmnist"}
    assert len({e.model.preset for e in params.ensembles["meme_s0"].experts}) == 4


def test_compute_claim_arms_train_equal_counted_compute(workspace):
    """Claim `compute` compares quality at equal training compute: each arm's steps x batch x counted training FLOP
    per example is the default run's, to 1%."""
    from diffusion import flops

    params = parse_params(workspace)
    arms = [a for group in load_params(REPO / "params.yaml").claims.claims["compute"].order for a in group]
    budgets = {}
    for arm in arms:
        run = params.runs[f"{arm}_s0"]
        budgets[arm] = run.train.steps * run.train.batch_size * flops.train_flops_per_example(run)
        assert run.train.proxy is not None and run.train.proxy.every * 4 >= run.train.steps  # 4 points of its curve
    ref = budgets["rin"]
    assert {a: round(b / ref, 2) for a, b in budgets.items()} == {a: 1.0 for a in arms}


def test_a_record_goes_stale_when_its_base_run_changes_and_not_when_the_data_moves(raw, workspace):
    fp = arm_fingerprint(workspace, "rin_s0")
    assert arm_fingerprint(set_dotted(workspace, {"datasets.fashion_mnist.root": "/elsewhere"}), "rin_s0") == fp
    changed = set_dotted(raw, {"runs.rin_fmnist.train.lr": 1e-3})
    assert arm_fingerprint(set_dotted(changed, claims_overrides(changed)), "rin_s0") != fp
    seed = set_dotted(workspace, {"runs.rin_s0.train.seed": 7})
    assert arm_fingerprint(seed, "rin_s0") != fp
    ens = arm_fingerprint(workspace, "meme_s0")  # an ensemble's experts are part of it
    assert arm_fingerprint(set_dotted(workspace, {"experts.meme_s0_e3.train.lr": 1e-4}), "meme_s0") != ens


@pytest.mark.parametrize("path,value,message", [
    ("claims.claims.schedule.order", ["rin", "rin_nope"], "names 'rin_nope', which is not an arm"),
    ("claims.arms.rin.base", "meme_fmnist_e1", "must name a run of `runs` or an ensemble"),
    ("claims.arms.rin.experts", {"train.steps": 1}, "is not an ensemble"),
    ("claims.claims.schedule.order", ["rin"], "at least two"),
    ("claims.claims.schedule.seeds", [1, 1], "distinct"),
])
def test_bad_claims_are_refused_naming_the_key(raw, path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(with_key(raw, path, value))


def test_an_arm_key_that_does_not_exist_is_refused_before_anything_runs(raw):
    bad = with_key(raw, "claims.arms.rin_sc05.set", {"train.self_cond": 0.5})
    with pytest.raises(ConfigError, match=r"rin_sc05_s0\.train\.self_cond.*claims workspace"):
        claims_overrides(bad)
    with pytest.raises(ConfigError, match="no claim 'nope'"):
        claims_overrides(raw, ["nope"])


def _scores(arm, kids, std=0.001):
    return [ArmScore(arm, seed, kid, std) for seed, kid in enumerate(kids)]


def test_paired_comparison_adds_seed_spread_and_subset_spread():
    c = compare(_scores("a", [0.10, 0.12], 0.003), _scores("b", [0.15, 0.16], 0.004))
    diffs = [0.05, 0.04]
    seed_var = ((0.05 - 0.045) ** 2 + (0.04 - 0.045) ** 2) / 1 / 2
    subset_var = 2 * (0.003**2 + 0.004**2) / 4
    assert c.diff == pytest.approx(sum(diffs) / 2) and c.se == pytest.approx(math.sqrt(seed_var + subset_var))
    assert c.status == "holds" and c.z == pytest.approx(c.diff / c.se)
    assert compare(_scores("a", [0.15]), _scores("b", [0.10])).status == "reversed"
    assert compare(_scores("a", [0.100, 0.110], 0.01), _scores("b", [0.105, 0.108], 0.01)).status == "unclear"
    with pytest.raises(ValueError, match="share no seed"):
        compare([ArmScore("a", 0, 0.1, 0.0)], [ArmScore("b", 1, 0.1, 0.0)])


def test_verdict_supported_only_when_every_pair_holds():
    scores = {"x": _scores("x", [0.05, 0.06]), "y": _scores("y", [0.10, 0.11]), "z": _scores("z", [0.20, 0.21])}
    assert verdict([["x"], ["y"], ["z"]], scores).verdict == "supported"
    v = verdict([["y"], ["x"], ["z"]], scores)
    assert v.verdict == "not supported" and v.reason.startswith("x beats y")
    near = scores | {"w": _scores("w", [0.052, 0.058])}
    assert verdict([["x"], ["w"]], near).verdict == "inconclusive"
    grouped = verdict([["z", "x"], ["y"]], scores)  # a group stands by its best arm
    assert grouped.representatives == ("x", "y") and grouped.verdict == "supported"


def _record(arm, seed, kid, workspace, **ev):
    run = f"{arm}_s{seed}"
    return {"version": RECORD_VERSION, "arm": arm, "seed": seed, "run": run,
            "fingerprint": arm_fingerprint(workspace, run), "commit": "abc123",
            "stage_digests": {f"evaluate@{run}": "d"},
            "eval": {"kid": kid, "kid_std": 0.001, "fid": 50.0, "num_samples": 1024, "num_reference": 10000,
                     "reference_split": "train", "sampler": "ddpm", "sampling_steps": 100, "kid_subsets": 100,
                     "kid_subset_size": 512, "feature_network": "TF-Inception", "model_params": 1000,
                     "gflops_per_image": 0.2, "samples_sha256": "f" * 64} | ev,
            "train": [{"run": run, "steps": 10, "images_seen": 320, "images_per_s": 100.0, "minutes": 0.05,
                       "final_loss": 0.1, "train_flops_per_example": 1e9, "train_pflop": 3.2e-4,
                       "proxy": [{"step": 5, "images_seen": 160, "kid": kid + 0.01, "proxy_samples": 16,
                                  "proxy_sampling_steps": 2}]}]}


def test_claims_stage_draws_table_cards_and_figures_from_records(tmp_path, raw, workspace):
    records = tmp_path / "arms"
    for seed in (0, 1):
        write_record(records, _record("rin", seed, 0.06 + seed * 0.001, workspace))
        write_record(records, _record("rin_cosine", seed, 0.09 + seed * 0.001, workspace))
    for arm, kid, losses in (("meme", 0.05, [0.3, 0.2, 0.1, 0.05]), ("meme_hard", 0.07, [0.25, 0.2, 0.1, 0.06])):
        for seed in (0, 1):
            interval = {"per_interval": losses, "overall": sum(losses) / 4, "images": 512,
                        "times": [[0.1, 0.2]] * 4}
            write_record(records, _record(arm, seed, kid, workspace) | {"interval_loss": interval})
    stale = _record("rin_rw4", 0, 0.05, workspace) | {"fingerprint": "0" * 64}  # of another configuration
    write_record(records, stale)
    out = tmp_path / "claims"
    proc = subprocess.run([sys.executable, "-m", "diffusion.cli", "claims", "--arms", str(records), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["id"]: r for r in json.loads((out / "claims.json").read_text())}
    assert results["schedule"]["verdict"] == "supported" and "rin < rin_cosine" in results["schedule"]["reason"]
    assert results["read_write"]["verdict"] is None and "rin_rw4_s0 (stale)" in results["read_write"]["reason"]
    assert "rin_rw1_s0 (missing)" in results["read_write"]["reason"]
    table = (out / "claims.md").read_text()
    assert "| `schedule` | RIN, arXiv 2212.11972, Fig. 8 | 2 | **supported** | [card](cards/schedule.md) |" in table
    assert ("- `schedule`: The sigmoid training schedule (tau 0.9) beats cosine. Paper: RIN, arXiv 2212.11972, Fig. 8. "
            "Arms, best claimed first, KID (mean ± std over seeds): rin 0.0605 ± 0.0007 > rin_cosine 0.0905 ± 0.0007. "
            "**supported**: rin < rin_cosine") in table
    assert "**not built**: rin_rw4_s0 (stale)" in table  # the reason, not "not built" twice
    claims_table = "\n".join(line for line in table.splitlines() if line.startswith("|"))
    assert report.nowrap_width(claims_table) <= report.ARTIFACT_PANE_PX  # fits the Prefect artifact view
    card = (out / "cards" / "schedule.md").read_text()
    assert "| rin_cosine_s1 | 0.0910 ± 0.0010 |" in card and "abc123" in card and "1,024 samples" in card
    assert (out / "schedule.png").stat().st_size > 1000 and (out / "read_write.png").exists()  # what is built
    assert results["soft_assignment"]["verdict"] == "supported"
    soft = (out / "cards" / "soft_assignment.md").read_text()
    assert "| meme_hard_s1 | 0.2500 | 0.2000 | 0.1000 | 0.0600 | 0.1525 |" in soft and "t in (0/4, 1/4]" in soft
    assert len(read_records(records)) == 9


def test_a_damaged_record_is_an_error_naming_it(tmp_path):
    (tmp_path / "rin_s0.json").write_text('{"version": 0}')
    with pytest.raises(ConfigError, match="rin_s0.json: not an arm record"):
        read_records(tmp_path)
    (tmp_path / "rin_s0.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        read_records(tmp_path)


def test_write_claims_without_records_says_what_to_build(tmp_path, raw, workspace):
    cfg = load_params(REPO / "params.yaml").claims
    results = write_claims(cfg, workspace, tmp_path / "none", tmp_path / "out")
    assert all(r["verdict"] is None and r["reason"].startswith("not built") for r in results)
    assert "**not built**" in (tmp_path / "out" / "claims.md").read_text()


def test_report_shows_the_claims_table_with_cards_and_figures(tmp_path, workspace):
    from diffusion.stages.report import _claims_section

    records = tmp_path / "arms"
    for seed in (0, 1):
        write_record(records, _record("rin", seed, 0.06, workspace))
        write_record(records, _record("rin_cosine", seed, 0.05, workspace))
    write_claims(load_params(REPO / "params.yaml").claims, workspace, records, tmp_path / "claims")
    report = tmp_path / "report"
    report.mkdir()
    text = "\n".join(_claims_section(tmp_path / "claims", report))
    assert "| `schedule` | RIN, arXiv 2212.11972, Fig. 8 | 2 | **not supported** |" in text
    assert "- `schedule`: The sigmoid training schedule (tau 0.9) beats cosine." in text
    assert "[card](claims/cards/schedule.md)" in text and "![schedule](claims/schedule.png)" in text
    assert (report / "claims" / "cards" / "schedule.md").exists() and (report / "claims" / "schedule.png").exists()
    assert "not found" in "\n".join(_claims_section(tmp_path / "nowhere", report))


def test_a_trimmed_params_file_loads_and_its_claims_workspace_is_refused(raw):
    trimmed = with_key(raw, "runs.rin_fmnist", None, delete=True)
    trimmed = with_key(trimmed, "evaluation.report.rin_fmnist", None, delete=True)
    assert parse_params(trimmed).claims is not None  # a params file without some bases still loads
    with pytest.raises(ConfigError, match=r"claims\.arms\.rin\w*\.base must name a run .* got 'rin_fmnist'"):
        claims_overrides(trimmed)
