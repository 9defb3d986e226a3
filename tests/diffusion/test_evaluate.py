"""The refstats and evaluate stages on 40 real Fashion-MNIST images through the real offline TF-Inception: the
metrics.json fields, FID of a set against itself, IS "not available", and the errors that name the fix."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from data.batches import pad_to, read_split
from data.prepare import write_dataset_shards
from data.readers import load_idx_split
from data.tarformat import DataError
from diffusion import cli
from diffusion.config import ConfigError, load_params
from diffusion.metrics import fid as fidlib
from diffusion.metrics.weights import FID_INCEPTION_SHA256
from diffusion.stages import evaluate as ev

REPO = Path(__file__).resolve().parents[2]
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
N = 40  # images per set: a few seconds of Inception features on 2 CPU cores
pytestmark = pytest.mark.skipif(not FASHION_ROOT.exists(), reason="needs Debian's dataset-fashion-mnist")


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A params file with one tiny run, 40 reference images in shards, and 40 other real images as its samples."""
    root = tmp_path_factory.mktemp("evaluate")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["runs"] = {"tiny": {"dataset": "fashion_mnist", "model": {"family": "rin", "preset": "rin_tiny"},
                            "diffusion": {}, "train": {}, "sample": {"steps": 7, "num_samples": N},
                            "eval": {"num_reference": N}}}
    raw["evaluation"]["references"] = {"fashion_mnist": {"split": "train", "num_images": N}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = dataclasses.replace(load_params(root / "params.yaml").datasets["fashion_mnist"], max_samples=N,
                              shard_size=16)
    write_dataset_shards(cfg, "fashion_mnist", root / "shards", splits=("train",))
    samples = pad_to(load_idx_split(FASHION_ROOT, "test")[0][:N], 32)[..., None]  # (N, 32, 32, 1)
    np.savez(root / "samples.npz", arr_0=samples)
    (root / "cost.json").write_text(json.dumps({"model_params": 123, "gflops_per_image": 0.5, "sampling_steps": 7}))
    refstats_file = root / "refstats.npz"
    assert cli.main(["--params", str(root / "params.yaml"), "refstats", "--dataset", "fashion_mnist",
                     "--shards", str(root / "shards"), "--out", str(refstats_file)]) == 0
    return {"root": root, "params": root / "params.yaml", "shards": root / "shards", "refstats": refstats_file,
            "cost": root / "cost.json"}


def run_evaluate(stage: dict[str, Path], samples: Path, out: Path) -> dict:
    argv = ["--params", str(stage["params"]), "evaluate", "tiny", "--samples", str(samples), "--cost",
            str(stage["cost"]), "--refstats", str(stage["refstats"]), "--out", str(out)]
    assert cli.main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_refstats_caches_features_and_stats(stage: dict[str, Path]) -> None:
    path = stage["refstats"]
    stats = fidlib.load_stats(path)  # also a plain stats file
    with np.load(path) as z:
        feats = z["features"]
        assert (str(z["split"]), int(z["resolution"]), str(z["network_sha256"])) == ("train", 32, FID_INCEPTION_SHA256)
    assert feats.shape == (N, fidlib.FEATURE_DIM) and feats.dtype == np.float32 and stats.n == N
    np.testing.assert_allclose(stats.mu, feats.astype(np.float64).mean(axis=0), rtol=1e-6)


def test_evaluate_writes_every_metrics_field(stage: dict[str, Path]) -> None:
    m = run_evaluate(stage, stage["root"] / "samples.npz", stage["root"] / "eval")
    assert (m["run"], m["dataset"], m["resolution"], m["num_samples"], m["num_reference"]) == (
        "tiny", "fashion_mnist", 32, N, N)
    assert (m["reference_split"], m["sampler"], m["sampling_steps"]) == ("train", "ddpm", 7)
    assert (m["fid_method"], m["singular"]) == ("svd", True)  # 40 < 2048 features: exact SVD route, flagged
    assert 20.0 < m["fid"] < 1000.0  # different real images: clearly positive
    assert m["feature_network_sha256"] == FID_INCEPTION_SHA256 and m["feature_extractor"] == fidlib.EXTRACTOR_ID
    assert m["inception_score"] == ev.NOT_AVAILABLE and m["inception_score_note"].startswith("not available:")
    assert (m["model_params"], m["gflops_per_image"]) == (123, 0.5)  # the sample stage's count, passed on
    assert m["feature_images_per_s"] > 0


def test_fid_of_the_reference_set_against_itself_is_zero(stage: dict[str, Path]) -> None:
    cfg = load_params(stage["params"]).datasets["fashion_mnist"]
    np.savez(stage["root"] / "self.npz", arr_0=read_split(cfg, stage["shards"], "train", limit=N)[0])
    m = run_evaluate(stage, stage["root"] / "self.npz", stage["root"] / "eval-self")
    assert abs(m["fid"]) < 1e-3 and m["singular"]


def test_fid_method_follows_the_sample_count() -> None:
    rng = np.random.default_rng(0)
    small = ev.sample_fid(rng.normal(size=(10, 16)), rng.normal(size=(200, 16)))
    large = ev.sample_fid(rng.normal(size=(100, 16)), rng.normal(size=(200, 16)))
    assert (small.method, small.singular) == ("svd", True) and (large.method, large.singular) == ("sqrtm", False)


def test_reference_mismatches_name_the_fix(stage: dict[str, Path], tmp_path: Path) -> None:
    params = load_params(stage["params"])
    run = params.run("tiny")
    too_many = dataclasses.replace(run, eval=dataclasses.replace(run.eval, num_reference=N + 1))
    with pytest.raises(ConfigError, match=r"num_reference 41 exceeds evaluation\.references\.fashion_mnist"):
        ev.reference_set(params, too_many)
    other_split = dataclasses.replace(run, eval=dataclasses.replace(run.eval, reference_split="test"))
    with pytest.raises(ConfigError, match=r"reference_split is 'test' but .*split is 'train'; make them agree"):
        ev.reference_set(params, other_split)
    fake = tmp_path / "other.npz"
    np.savez(fake, features=np.zeros((N, 4), np.float32), extractor="another-net", dataset="fashion_mnist",
             split="train", resolution=32)
    with pytest.raises(DataError, match=r"holds extractor 'another-net'.*refstats@fashion_mnist"):
        ev.load_reference_features(fake, run)
    with pytest.raises(FileNotFoundError, match=r"dvc repro refstats@fashion_mnist"):
        ev.load_reference_features(tmp_path / "absent.npz", run)


def test_samples_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    run = load_params(REPO / "params.yaml").run("rin_fmnist")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(DataError, match=r"expected uint8 \(N, 32, 32, 1\); re-run `dvc repro sample@rin_fmnist`"):
        ev.load_samples(tmp_path / "s.npz", run)


def test_references_must_name_a_sharded_dataset() -> None:
    from diffusion.config import parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["evaluation"]["references"]["cifar10"] = {"split": "test", "num_images": 10}
    with pytest.raises(ConfigError, match=r"evaluation\.references\.cifar10 names no dataset of pipeline\.datasets"):
        parse_params(raw)
