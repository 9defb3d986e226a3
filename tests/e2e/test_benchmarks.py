"""benchmarks/ab_loss.py: arms parse as dotted overrides, and the pairing holds (an arm repeated scores the same)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.ab_loss import arm_run, parse_arm

REPO = Path(__file__).resolve().parents[2]


def test_arms_parse_dotted_overrides_with_list_values():
    assert parse_arm("base") == ("base", {})
    name, over = parse_arm("p2=model.overrides.patch=[2,2],train.steps=750,train.lr=1e-3")
    assert name == "p2"
    assert over == {"model.overrides.patch": [2, 2], "train.steps": 750, "train.lr": 1e-3}
    with pytest.raises(SystemExit, match="not key=value"):
        parse_arm("bad=train.lr")


def test_an_arm_adds_to_the_runs_model_overrides():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    base = arm_run(raw, "rin_fmnist", {}, 10)
    _, over = parse_arm("lat=model.overrides.num_latents=64")
    arm = arm_run(raw, "rin_fmnist", over, 10)
    assert base.model.overrides["interface_dim"] == 192  # the run's own override ...
    assert arm.model.overrides == base.model.overrides | {"num_latents": 64}  # ... is kept beside the arm's


def test_a_repeated_arm_scores_the_same_and_a_changed_one_differs(tmp_path, fashion_mnist):
    from data.prepare import write_dataset_shards
    from diffusion.config import load_params

    cfg = dataclasses.replace(load_params(REPO / "params.yaml").datasets["fashion_mnist"], max_samples=128,
                              shard_size=64)
    write_dataset_shards(cfg, "fashion_mnist", tmp_path / "shards")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["runs"] = {"tiny": {"dataset": "fashion_mnist", "model": {"family": "rin", "preset": "rin_tiny"},
                            "diffusion": {}, "eval": {},
                            "sample": {},
                            "train": {"batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "warmup_steps": 1,
                                      "precision": "fp32", "log_every": 1, "data": "memory"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "ab.json"
    cmd = [sys.executable, "benchmarks/ab_loss.py", "tiny", "--steps", "3", "--images", "16", "--threads", "1",
           "--params", str(tmp_path / "params.yaml"), "--shards", str(tmp_path / "shards"), "--out", str(out),
           "--arm", "a", "--arm", "again", "--arm", "lr=train.lr=3e-3"]
    env = os.environ | {"PYTHONPATH": str(REPO)}  # this checkout, whatever the venv's editable install points at
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = {a["arm"]: a for a in json.loads(out.read_text())["arms"]}
    assert arms["a"]["test_loss"] == arms["again"]["test_loss"]
    assert arms["a"]["test_loss"] != arms["lr"]["test_loss"]
    assert set(arms["a"]["test_loss"]) == {"0.99", "0.9", "0.5", "0.1", "0.01"} and arms["lr"]["steps"] == 3


def test_a_quality_ab_sampler_variant_sets_only_its_keys():
    """benchmarks/ab_quality.py: a sampler variant is dotted keys of the run's sample section, applied over the rest
    (nested keys too), and an unknown key is refused by its path rather than ignored."""
    from benchmarks.ab_quality import with_sample_settings
    from diffusion.config import ConfigError

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    run = arm_run(raw, "rin_fmnist", {}, 10)
    assert with_sample_settings(run, {}) is run
    ddim = with_sample_settings(run, {"sample.sampler": "ddim", "steps": 250, "schedule.tau": 0.5})
    assert (ddim.sample.sampler, ddim.sample.steps, ddim.sample.schedule.tau) == ("ddim", 250, 0.5)
    assert dataclasses.replace(ddim.sample, sampler=run.sample.sampler, steps=run.sample.steps,
                               schedule=run.sample.schedule) == run.sample
    with pytest.raises(ConfigError, match=r"unknown key runs\.rin_fmnist\.sample\.samplr"):
        with_sample_settings(run, {"sample.samplr": "ddim"})
    with pytest.raises(ConfigError, match=r"runs\.rin_fmnist\.sample\.steps"):
        with_sample_settings(run, {"steps": 0})


def test_a_mutation_pass_by_name_carries_the_rest_from_the_last_full_pass(tmp_path):
    """benchmarks/mutation_score.py --carry: mutants not run now count as they ended in an earlier full pass
    (survivor or equivalent: surviving; else killed); a partial earlier pass carries nothing."""
    from benchmarks.mutation_score import carried_survivors, module_results

    meta = tmp_path / "mutants" / "diffusion" / "m.py.meta"
    meta.parent.mkdir(parents=True)
    names = [f"diffusion.m.x_f__mutmut_{i}" for i in range(1, 7)]
    codes = {names[0]: 1, names[1]: 0} | {n: None for n in names[2:]}  # 1, 2 run now: killed, survived
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    full = {"modules": {"diffusion/m.py": {"not_checked": 0, "survivors": [names[2]]}}}
    partial = {"modules": {"diffusion/m.py": {"not_checked": 3, "survivors": []}}}
    (tmp_path / "full.json").write_text(json.dumps(full))
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    equivalent = {names[3]: "why"}
    r = module_results(tmp_path / "mutants", equivalent, carried_survivors([tmp_path / "full.json"], equivalent))
    got = r["diffusion/m.py"]
    assert (got["killed"], got["survived"], got["not_checked"], got["carried"]) == (3, 3, 0, 4)
    assert got["survivors"] == [names[1], names[2]] and got["equivalent"] == 1  # 4 equivalent, 5 and 6 killed
    assert got["score"] == 0.5 and got["score_without_equivalent"] == 0.6
    r = module_results(tmp_path / "mutants", equivalent, carried_survivors([tmp_path / "partial.json"], equivalent))
    assert (r["diffusion/m.py"]["not_checked"], r["diffusion/m.py"]["carried"]) == (4, 0)
