"""The MEME table in the pipeline: params.yaml's sections (runs, experts, ensembles) and their validation, the DVC
graph that dvc.yaml renders from them, and the report rows of a MEME ensemble."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffusion import report
from diffusion.config import ConfigError, ReportRow, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]
ENSEMBLES = ("multi_unet_fmnist", "meme_fmnist")  # the MEME table's multi-expert rows, beside the unet_fmnist baseline


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _with(raw: dict, path: str, value, delete: bool = False) -> dict:
    out = copy.deepcopy(raw)
    node = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return out


# --- params.yaml ---------------------------------------------------------------------------------------------------


def test_meme_table_rows_train_on_the_same_number_of_images():
    params = load_params(REPO / "params.yaml")
    baseline = params.run("unet_fmnist")
    assert baseline.section == "runs" and baseline.model.preset == "unet_fmnist" and baseline.train.expert is None
    budget = baseline.train.steps * baseline.train.batch_size
    for name in ENSEMBLES:
        ensemble = params.run(name)
        assert ensemble.section == "ensembles" and len(ensemble.experts) == 4
        assert sum(e.train.steps * e.train.batch_size for e in ensemble.experts) == budget, name
        assert [e.train.expert.p for e in ensemble.experts] == [0.8, 0.4, 0.2, 0.1]  # SPEC section 2's p_n
        for e in ensemble.experts:  # only the time interval and the number of steps differ from the baseline
            same = {k: v for k, v in vars(e.train).items() if k not in ("steps", "warmup_steps", "checkpoint_every",
                                                                         "sample_every", "expert")}
            assert same == {k: vars(baseline.train)[k] for k in same}, e.name
            assert (e.diffusion, e.dataset_name) == (baseline.diffusion, baseline.dataset_name)
        assert (ensemble.sample, ensemble.eval) == (baseline.sample, baseline.eval)
    assert {e.model.preset for e in params.run("multi_unet_fmnist").experts} == {"unet_fmnist"}
    assert [e.model.preset for e in params.run("meme_fmnist").experts] == [f"meme_fmnist_e{n}" for n in range(1, 5)]
    assert {params.evaluation.report[n].row for n in ("unet_fmnist", *ENSEMBLES)} == {"adm_s", "adm_multi", "adm_meme"}


def test_every_expert_belongs_to_one_ensemble():
    params = load_params(REPO / "params.yaml")
    owners = [e.name for ensemble in params.ensembles.values() for e in ensemble.experts]
    assert sorted(owners) == sorted(params.experts) and len(set(owners)) == len(owners)


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("runs.unet_fmnist.train.expert", {"index": 1, "count": 4, "p": 0.5},
         r"runs\.unet_fmnist\.train\.expert is set: a run that trains one MEME expert belongs under `experts:`"),
        ("experts.meme_fmnist_e2.train.expert", None,
         r"experts\.meme_fmnist_e2\.train\.expert is null: an expert run trains one time interval"),
        ("runs.unet_fmnist.model.experts", ["meme_fmnist_e1"],
         r"runs\.unet_fmnist\.model\.experts is set: a multi-expert run .* belongs under `ensembles:`"),
        ("ensembles.meme_fmnist.model.experts", ["unet_fmnist", "meme_fmnist_e2", "meme_fmnist_e3", "meme_fmnist_e4"],
         r"ensembles\.meme_fmnist\.model\.experts names no run 'unet_fmnist' of the section `experts`"),
        ("ensembles.meme_fmnist.model.experts", [f"meme_fmnist_e{n}" for n in (1, 2, 4, 3)],
         r"ensembles\.meme_fmnist\.model\.experts\[2\]: run 'meme_fmnist_e4' must train expert 3 of 4 "
         r"\(experts\.meme_fmnist_e4\.train\.expert\)"),
        ("experts.meme_fmnist_e1.sample", {"steps": 10},
         r"unknown key experts\.meme_fmnist_e1\.sample; .* an expert is sampled only through its ensemble"),
        ("experts.meme_fmnist_e1.train.expert.p", 1.2,
         r"experts\.meme_fmnist_e1\.train\.expert\.p must be >= 0 and <= 1"),
        ("experts.meme_fmnist_e3.train.self_cond_rate", 0.9,
         r"experts\.meme_fmnist_e3\.model: a U-Net has no latent state to self-condition on"),
        ("ensembles.meme_fmnist.model.preset", "unet_fmnist", r"ensembles\.meme_fmnist\.model\.experts lists the"),
        ("ensembles.meme_fmnist.diffusion.prediction", "eps",
         r"ensembles\.meme_fmnist\.model\.experts\[0\]: run 'meme_fmnist_e1' has diffusion\.prediction 'v'"),
        ("ensembles.multi_unet_fmnist.dataset", "mnist", r"ensembles\.multi_unet_fmnist\.dataset 'mnist' has no shard"),
    ],
)
def test_sections_are_checked_with_the_key_path(raw, path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(_with(raw, path, value))


def test_names_are_unique_across_sections_and_sections_are_required(raw):
    clash = _with(raw, "experts.unet_fmnist", raw["experts"]["meme_fmnist_e1"])
    with pytest.raises(ConfigError, match=r"experts\.unet_fmnist: the name is taken by runs\.unet_fmnist"):
        parse_params(clash)
    with pytest.raises(ConfigError, match=r"missing key ensembles\.meme_fmnist\.sample \(write `sample: \{\}`"):
        parse_params(_with(raw, "ensembles.meme_fmnist.sample", None, delete=True))
    with pytest.raises(ConfigError, match=r"missing or malformed top-level section 'experts'"):
        parse_params(_with(raw, "experts", None, delete=True))
    with pytest.raises(ConfigError, match=r"missing key runs\.rin_fmnist\.model\.experts"):  # every default visible
        parse_params(_with(raw, "defaults.model.experts", None, delete=True))
    params = parse_params(_with(_with(raw, "experts", {}), "ensembles", {}))  # a pipeline without MEME is fine
    assert list(params.runs) == list(raw["runs"]) and not params.experts and not params.ensembles


# --- dvc.yaml ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict:
    """dvc.yaml rendered over params.yaml by DVC itself, in a scratch project (the checkout may be busy running
    stages): stage name -> (deps, outs, params) as path strings."""
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("dvcgraph")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    Repo.init(str(root), no_scm=True)
    with Repo(str(root)) as repo:
        out = {}
        for stage in repo.index.stages:
            params = [k for dep in stage.deps if hasattr(dep, "params") for k in dep.params]
            files = [str(Path(d.fs_path).relative_to(root)) for d in stage.deps if not hasattr(d, "params")]
            out[stage.name] = (files, [str(Path(o.fs_path).relative_to(root)) for o in stage.outs], params)
        return out


def test_graph_trains_experts_and_samples_ensembles_from_their_weights(stages):
    params = load_params(REPO / "params.yaml")
    for name in params.runs:
        assert {f"train@{name}", f"sample@{name}", f"evaluate@{name}"} <= set(stages)
    for name in params.experts:
        deps, outs, keys = stages[f"train_expert@{name}"]
        assert f"outputs/{name}/train/ema.safetensors" in outs and "meme/unet.py" in deps
        assert f"experts.{name}.train" in keys and not {f"sample@{name}", f"train@{name}"} & set(stages)
    for name in params.ensembles:
        deps, outs, keys = stages[f"sample_ensemble@{name}"]
        experts = [e.name for e in params.run(name).experts]
        assert [d for d in deps if d.startswith("outputs/")] == [
            f"outputs/{e}/train/{w}.safetensors" for e in experts for w in ("ema", "model")]
        assert outs[0] == f"outputs/{name}/samples/samples.npz" and f"ensembles.{name}.sample" in keys
        assert f"outputs/{name}/samples/samples.npz" in stages[f"evaluate_ensemble@{name}"][0]
        assert f"train@{name}" not in stages
    for name in ("unet_fmnist", *ENSEMBLES):  # the report waits for every MEME row and its experts' training
        assert f"outputs/{name}/eval/metrics.json" in stages["report"][0]
    for e in params.experts:
        assert f"outputs/{e}/train/metrics.json" in stages["report"][0]
    assert "meme/unet.py" in stages["train@unet_fmnist"][0]


# --- the report ----------------------------------------------------------------------------------------------------


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _eval(name: str, fid: float, params: int) -> dict:
    return {"run": name, "dataset": "fashion_mnist", "resolution": 32, "fid": fid, "fid_method": "svd",
            "singular": True, "num_samples": 1024, "num_reference": 2048, "reference_split": "train",
            "reference_file": "data/refstats/fashion_mnist/train-2048.npz", "sampler": "ddpm", "sampling_steps": 100,
            "feature_network": "TF-Inception", "feature_extractor": "x", "feature_network_sha256": "ab" * 32,
            "inception_score": "not available", "model_params": params, "gflops_per_image": 0.194}


def test_report_rows_of_the_meme_table(tmp_path):
    outputs = tmp_path / "outputs"
    _write(outputs / "unet_fmnist/eval/metrics.json", _eval("unet_fmnist", 60.0, 1_180_000))
    _write(outputs / "unet_fmnist/train/metrics.json", {"steps": 2400, "images_seen": 76_800})
    _write(outputs / "meme_fmnist/eval/metrics.json", _eval("meme_fmnist", 50.0, 4_850_000))
    experts = {"meme_fmnist": [f"meme_fmnist_e{n}" for n in range(1, 5)],
               "multi_unet_fmnist": [f"multi_unet_fmnist_e{n}" for n in range(1, 5)]}
    for e in experts["meme_fmnist"]:
        _write(outputs / e / "train/metrics.json", {"steps": 600, "images_seen": 19_200})
        history = [{"step": 300, "loss": 0.2}, {"step": 600, "loss": 0.1}]
        _write(outputs / e / "train/train_log.json", {"history": history})
    mapping = {"unet_fmnist": ReportRow("meme_table2", "adm_s", "CPU scale"),
               "multi_unet_fmnist": ReportRow("meme_table2", "adm_multi", "CPU scale"),
               "meme_fmnist": ReportRow("meme_table2", "adm_meme", "CPU scale")}
    md = report.write_report(mapping, ["unet_fmnist"], outputs, tmp_path / "report", experts).read_text()
    table = pd.read_csv(tmp_path / "report/meme_table2.csv", dtype=str, keep_default_na=False).set_index("run")
    assert list(table.index) == ["unet_fmnist", "multi_unet_fmnist", "meme_fmnist"]  # baseline, same-arch, MEME
    base, multi, meme = (table.loc[n] for n in table.index)
    assert (base["FID paper"], base["FID ours"], base["train steps ours"]) == ("49.56", "60.00 (singular)", "2,400")
    assert (meme["FID paper"], meme["FID ours"], meme["params paper"]) == ("41.10", "50.00 (singular)", "4 x 82M")
    assert (meme["train steps ours"], meme["images seen ours"]) == ("4 x 600", "76,800")
    assert meme["params ours"] == "4.85M in 4 experts" and "train:" not in meme["notes"]
    assert multi["FID paper"] == report.DASH and "gives no number" in multi["source"]
    assert multi["FID ours"] == report.DASH and "dvc repro evaluate_ensemble@multi_unet_fmnist" in multi["notes"]
    assert "dvc repro train_expert@multi_unet_fmnist_e1" in multi["notes"]
    assert "Runs in no table" not in md and "`meme_fmnist` (MEME ensemble)" in md
    assert "meme_fmnist_e1" in md.split("## Training")[1].split("## Samples")[0]  # the experts' loss curves
    assert "grid.png not found) for `meme_fmnist`, `multi_unet_fmnist`, `unet_fmnist`." in md  # no expert grids
