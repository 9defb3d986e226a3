"""The MEME table in the pipeline: params.yaml's sections (runs, experts, ensembles) and their validation, the DVC
graph that dvc.yaml renders from them, the Fourier analysis of feature maps, and the report's MEME rows."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from diffusion import cli
from diffusion.config import ConfigError, ReportRow, ScheduleConfig, load_params, parse_params
from diffusion.metrics import fourier
from diffusion.registry import build_model
from diffusion.schedules import Schedule
from diffusion.stages import report
from meme.experts import MultiExpert
from meme.presets import PRESETS
from meme.unet import UNet
from tests.helpers import load_checked, run_dirs, with_key

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
ENSEMBLES = ("multi_unet_fmnist", "meme_fmnist")  # the MEME table's multi-expert rows, beside the unet_fmnist baseline
COSINE = ScheduleConfig("cosine", 0.0, 1.0, 1.0)




@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())




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
                                                                         "sample_every", "proxy", "expert")}
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
        ("evaluation.fourier.runs", ["unet_fmnist", "rin_fmnist"],
         r"evaluation\.fourier\.runs\[1\]: runs\.rin_fmnist is a rin model of images; the analysis hooks the feature "
         r"maps of U-Nets"),
        ("evaluation.fourier.t", [0.1, 1.5], r"evaluation\.fourier: t\[1\] must lie in \[0, 1\], got 1\.5"),
        ("evaluation.fourier.num_images", 0, r"evaluation\.fourier\.num_images must be >= 1"),
    ],
)
def test_sections_are_checked_with_the_key_path(raw, path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_checked(with_key(raw, path, value))


def test_names_are_unique_across_sections_and_sections_are_required(raw):
    clash = with_key(raw, "experts.unet_fmnist", raw["experts"]["meme_fmnist_e1"])
    with pytest.raises(ConfigError, match=r"experts\.unet_fmnist: the name is taken by runs\.unet_fmnist"):
        parse_params(clash)
    with pytest.raises(ConfigError, match=r"missing key ensembles\.meme_fmnist\.sample \(write `sample: \{\}`"):
        parse_params(with_key(raw, "ensembles.meme_fmnist.sample", None, delete=True))
    with pytest.raises(ConfigError, match=r"missing or malformed top-level section 'experts'"):
        parse_params(with_key(raw, "experts", None, delete=True))
    with pytest.raises(ConfigError, match=r"missing key runs\.rin_fmnist\.model\.experts"):  # every default visible
        parse_params(with_key(raw, "defaults.model.experts", None, delete=True))
    no_meme = with_key(with_key(with_key(raw, "experts", {}), "ensembles", {}), "evaluation.fourier.runs", [])
    params = parse_params(no_meme)  # a pipeline without MEME is fine
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
        assert f"outputs/{name}/train/ema.safetensors" in outs and "meme" in deps  # the model family's package
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
    assert "meme" in stages["train@unet_fmnist"][0] and "rin" not in stages["train@unet_fmnist"][0]


def test_fourier_stage_depends_on_the_weights_of_every_run_it_analyses(stages):
    params = load_params(REPO / "params.yaml")
    deps, outs, keys = stages["fourier"]
    for name in params.evaluation.fourier.runs:
        run = params.run(name)
        for trained in run.experts or (run,):
            assert f"outputs/{trained.name}/train/ema.safetensors" in deps, trained.name
        assert f"{run.params_key}.model" in keys
    assert f"data/shards/{run.dataset_name}" in deps and "evaluation.fourier" in keys
    assert outs == ["outputs/fourier"] and "outputs/fourier" in stages["report"][0]


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
    names = {"unet_fmnist", *experts, *(e for group in experts.values() for e in group)}
    md = report.write_report(mapping, ["unet_fmnist"], run_dirs(outputs, names), tmp_path / "report",
                             experts).read_text()
    table = pd.read_csv(tmp_path / "report/meme_table2.csv", dtype=str, keep_default_na=False).set_index("run")
    assert list(table.index) == ["unet_fmnist", "multi_unet_fmnist", "meme_fmnist"]  # baseline, same-arch, MEME
    base, multi, meme = (table.loc[n] for n in table.index)
    assert (base["FID paper"], base["FID ours"], base["train steps ours"]) == ("49.56", "60.00 (singular)", "2,400")
    assert (meme["FID paper"], meme["FID ours"], meme["params paper"]) == ("41.10", "50.00 (singular)", "4 x 82M")
    assert (meme["train steps ours"], meme["images seen ours"]) == ("4 x 600", "76,800")
    assert meme["params ours"] == "4.85M in 4 experts" and "train:" not in meme["notes"]
    assert multi["FID paper"] == report.DASH and "not recorded here" in multi["source"]
    assert multi["FID ours"] == report.DASH and "dvc repro evaluate_ensemble@multi_unet_fmnist" in multi["notes"]
    assert "dvc repro train_expert@multi_unet_fmnist_e1" in multi["notes"]
    assert "Runs in no table" not in md and "`meme_fmnist` (MEME ensemble)" in md
    assert "meme_fmnist_e1" in md.split("## Training")[1].split("## Samples")[0]  # the experts' loss curves
    assert "grid.png not found) for `meme_fmnist`, `multi_unet_fmnist`, `unet_fmnist`." in md  # no expert grids


# --- the Fourier analysis ------------------------------------------------------------------------------------------


def test_relative_log_amplitude_is_zero_at_frequency_zero_and_sees_smoothing():
    torch.manual_seed(0)
    noise = torch.randn(8, 4, 16, 16)
    freqs, flat = fourier.relative_log_amplitude(noise)
    assert freqs.shape == flat.shape == (9,) and freqs[0] == 0 and math.isclose(freqs[-1].item(), math.pi, rel_tol=1e-6)
    assert flat[0] == 0 and flat.abs().max() < 0.3  # white noise: the same amplitude at every frequency
    _, smooth = fourier.relative_log_amplitude(torch.nn.functional.avg_pool2d(noise, 3, 1, 1))
    assert smooth[0] == 0 and smooth[-1] < smooth[1] - 1.0  # a low-pass filter damps the high frequencies
    delta = torch.zeros(1, 1, 8, 8)
    delta[..., 0, 0] = 1.0  # |F| = 1 at every frequency
    assert torch.allclose(fourier.relative_log_amplitude(delta)[1], torch.zeros(5), atol=1e-5)
    constant = torch.full((1, 1, 8, 8), 2.0)  # |F| = 128 at frequency 0, nothing elsewhere
    want = math.log(fourier.EPS) - math.log(128 + fourier.EPS)
    assert torch.allclose(fourier.relative_log_amplitude(constant)[1][1:], torch.full((4,), want), atol=1e-3)
    bins, _ = fourier.radial_bins(8)
    assert bins[0, 0] == 0 and bins[0, 4] == 4 and bins[4, 4] == -1 and bins[1, 1] == 1  # corners past pi dropped


def tiny_unet(seed: int, preset: str = "iunet_tiny") -> UNet:
    torch.manual_seed(seed)
    model = UNet(PRESETS[preset])
    with torch.no_grad():  # zero-initialised branches would hide every block but the first: give them weights
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_analyse_hooks_every_block_at_every_t():
    model = tiny_unet(0)
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    spectra = fourier.analyse(model, x0, [0.1, 0.9], Schedule(COSINE), seed=0)
    names = [s.name for s in spectra]
    assert names == [f"enc{i}" for i in range(len(model.encoder))] + ["mid"] + [
        f"dec{i}" for i in range(len(model.decoder))]
    assert [s.resolution for s in spectra][:4] == [32, 32, 16, 16] and spectra[-1].channels == 8
    for s in spectra:
        assert set(s.relative_log_amplitude) == {"0.1", "0.9"} and len(s.frequencies) == s.resolution // 2 + 1
        assert all(v[0] == 0 for v in s.relative_log_amplitude.values())
    assert spectra[0].relative_log_amplitude["0.1"] != spectra[0].relative_log_amplitude["0.9"]
    again = fourier.analyse(model, x0, [0.1, 0.9], Schedule(COSINE), seed=0)
    assert [s.relative_log_amplitude for s in again] == [s.relative_log_amplitude for s in spectra]
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone


def test_router_is_analysed_through_the_expert_that_owns_t():
    experts = [tiny_unet(1, "unet_tiny"), tiny_unet(2, "iunet_tiny")]
    router = MultiExpert(experts, Schedule(COSINE))
    gamma = Schedule(COSINE)(torch.full((3,), 0.2))
    assert fourier.feature_layers(router, gamma)["mid"] is experts[0].middle
    assert fourier.feature_layers(router, Schedule(COSINE)(torch.full((3,), 0.8)))["mid"] is experts[1].middle
    x0 = torch.rand(3, 1, 32, 32) * 2 - 1
    mixed = fourier.analyse(router, x0, [0.2, 0.8], Schedule(COSINE), seed=1)
    alone = [fourier.analyse(e, x0, [t], Schedule(COSINE), seed=1) for e, t in zip(experts, (0.2, 0.8))]
    assert mixed[0].relative_log_amplitude == alone[0][0].relative_log_amplitude | alone[1][0].relative_log_amplitude
    with pytest.raises(ValueError, match="give every example the same t"):
        fourier.feature_layers(router, Schedule(COSINE)(torch.tensor([0.2, 0.8])))
    with pytest.raises(ValueError, match="Linear names no feature layers"):
        fourier.feature_layers(torch.nn.Linear(2, 2), gamma)


def test_fourier_stage_writes_json_and_figure_and_the_report_embeds_it(tmp_path, capsys):
    from data.prepare import write_dataset_shards
    from diffusion.checkpoint import save_weights
    from tests.meme.test_meme import tiny_meme_params
    from tests.rawdata import make_idx_dataset

    make_idx_dataset(tmp_path / "raw", 16, 16)
    raw = tiny_meme_params(tmp_path)
    raw["runs"] = {"tiny_unet": {"dataset": "fashion_mnist", "model": {"family": "meme", "preset": "unet_tiny"},
                                 "diffusion": {"prediction": "v"}, "train": {"self_cond_rate": 0.0}, "sample": {},
                                 "eval": {}}}
    raw["evaluation"]["fourier"] = {"runs": ["tiny_unet", "tiny_meme"], "t": [0.25, 0.75], "split": "test",
                                    "num_images": 8, "seed": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    write_dataset_shards(params.datasets["fashion_mnist"], "fashion_mnist", tmp_path / "shards", splits=("test",))
    outputs = tmp_path / "outputs"
    for name in ["tiny_unet", "tiny_e1", "tiny_e2"]:  # untrained weights do: only shapes are checked
        model = build_model(params.run(name))
        save_weights(model.state_dict(), outputs / name / "train" / "ema.safetensors", {})
    argv = ["--params", str(tmp_path / "params.yaml"), "fourier", "--weights",
            *(f"{n}={outputs / n / 'train'}" for n in ["tiny_unet", "tiny_e1", "tiny_e2"]), "--shards",
            f"fashion_mnist={tmp_path / 'shards'}", "--out", str(outputs / "fourier")]
    assert cli.main(argv) == 0
    raw["evaluation"]["fourier"]["runs"] = ["tiny_unet", "nope"]  # accepted by the loader (like report mappings)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["--params", str(tmp_path / "bad.yaml"), *argv[2:]]) == 2
    assert "no run named 'nope'" in capsys.readouterr().err
    data = json.loads((outputs / "fourier" / "fourier.json").read_text())
    assert data["t"] == [0.25, 0.75] and data["num_images"] == 8 and list(data["runs"]) == ["tiny_unet", "tiny_meme"]
    layers = data["runs"]["tiny_meme"]
    assert layers[0]["name"] == "enc0" and layers[0]["resolution"] == 32 and len(layers[0]["frequencies"]) == 17
    assert all(curve[0] == 0 for layer in layers for curve in layer["relative_log_amplitude"].values())
    assert (outputs / "fourier" / "fourier.png").stat().st_size > 0
    md = report.write_report({}, [], {}, tmp_path / "report", fourier=outputs / "fourier").read_text()
    assert "![relative log amplitude against frequency](fourier.png)" in md
    assert (tmp_path / "report" / "fourier.png").exists() and "`tiny_unet`, `tiny_meme` at t = 0.25, 0.75" in md
    missing = report.write_report({}, [], {}, tmp_path / "r2", fourier=tmp_path / "nowhere").read_text()
    assert "nowhere/fourier.json not found (`dvc repro fourier`)" in missing
