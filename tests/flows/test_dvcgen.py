"""dvc.yaml's run-by-run stages (report, fourier) against what flows/dvcgen.py writes, and the paper scale's derived
workspace: its params are params.yaml's `paper` section and real DVC renders its graph of the papers' runs."""

import copy

import pytest
import yaml

from diffusion.config import load_params, load_yaml, parse_params
from flows.dvcgen import static_stages
from flows.scale import OverrideError, scale_overrides
from flows.workspace import sync_workspace
from tests.flows.test_flows import REPO
from tests.helpers import with_key

RAW = load_yaml(REPO / "params.yaml")


def test_repository_dvc_yaml_is_what_the_generator_writes_for_params_yaml():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert static_stages(dvc, load_params(REPO / "params.yaml")) == dvc


def test_generator_follows_the_runs_of_a_params_file():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    raw = copy.deepcopy(RAW)
    raw["runs"]["rin_fmnist_b"] = copy.deepcopy(raw["runs"]["rin_fmnist"])
    stages = static_stages(dvc, parse_params(raw))["stages"]
    assert "rin_fmnist_b=outputs/rin_fmnist_b" in stages["report"]["cmd"]
    assert "outputs/rin_fmnist_b/eval/metrics.json" in stages["report"]["deps"]
    no_fourier = parse_params(with_key(RAW, "evaluation.fourier", None, delete=True))
    stages = static_stages(dvc, no_fourier)["stages"]
    assert "fourier" not in stages and "--fourier" not in stages["report"]["cmd"]
    assert "outputs/fourier" not in stages["report"]["deps"]


def test_paper_scale_workspace_builds_the_papers_runs(tmp_path):
    """The paper scale's workspace: params.yaml's paper section in place of the pipeline's sections, and a dvc.yaml
    whose stages DVC renders for those runs (train@rin_cifar10, the report reading them) and no CPU run."""
    from dvc.repo import Repo

    overrides = scale_overrides(RAW, "paper")
    ws = sync_workspace(REPO, "test-paper-scale", overrides)
    try:
        params = load_params(ws / "params.yaml")
        assert "rin_cifar10" in params.runs and "rin_fmnist" not in params.all_runs
        assert params.pipeline.datasets == ("cifar10", "imagenet64", "kinetics600", "ffhq256", "celebahq256")
        with Repo(str(ws)) as repo:
            names = {s.name for s in repo.index.stages}
        assert {"train@rin_cifar10", "evaluate@rin_imagenet64", "train_expert@meme_ffhq256_e1",
                "evaluate_ensemble@meme_ffhq256", "autoencoder@ffhq256_f4", "report"} <= names
        assert not any("fmnist" in n for n in names) and "fourier" not in names
        report = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["report"]
        assert "rin_kinetics600=outputs/rin_kinetics600" in report["cmd"]
    finally:
        import shutil

        shutil.rmtree(ws)


def test_paper_scale_needs_a_paper_section():
    with pytest.raises(OverrideError, match="no `paper` section"):
        scale_overrides(with_key(RAW, "paper", None, delete=True), "paper")
    assert scale_overrides(RAW, "cpu") == {}
