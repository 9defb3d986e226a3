"""The refstats and evaluate stages on 40 real Fashion-MNIST images through the real offline TF-Inception: the
metrics.json fields, FID and KID of a set against itself, IS "not available", and the errors that name the fix; the
video path (FVD, KVD, video IS from the I3D logits) with a stand-in for the I3D whose logits are known."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data.batches import pad_to, read_split
from data.prepare import write_dataset_shards
from data.readers import load_idx_split
from data.tarformat import DataError
from diffusion import cli
from diffusion.config import ConfigError, load_params
from diffusion.io import sha256_file
from diffusion.metrics import fid as fidlib
from diffusion.metrics import fvd as fvdlib
from diffusion.metrics import kid as kidlib
from diffusion.metrics.features import RESIZE_CLIPS, RESIZE_IMAGES
from diffusion.metrics.weights import FID_INCEPTION_SHA256
from diffusion.stages import evaluate as ev

REPO = Path(__file__).resolve().parents[2]
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
N = 40  # images per set: a few seconds of Inception features on 2 CPU cores
pytestmark = pytest.mark.usefixtures("fashion_mnist")  # missing, every test here fails (tests/helpers.py)


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
    assert (m["kid_subset_size"], m["kid_subsets"]) == (N // 2, 100)  # half the 40 samples; params.yaml's 100
    # The "samples" are real test images, the references' distribution: FID at N = 40 is its bias, KID is unbiased
    assert 0.0 < abs(m["kid"]) < 3 * m["kid_std"] < 0.1
    assert m["feature_network_sha256"] == FID_INCEPTION_SHA256 and m["feature_extractor"] == fidlib.EXTRACTOR_ID
    assert m["inception_score"] == ev.NOT_AVAILABLE and m["inception_score_note"].startswith("not available:")
    assert (m["model_params"], m["gflops_per_image"]) == (123, 0.5)  # the sample stage's count, passed on
    assert m["feature_images_per_s"] > 0
    assert m["samples_sha256"] == sha256_file(stage["root"] / "samples.npz")  # the file scored, for its card
    assert m["resize"] == RESIZE_IMAGES


def test_fid_of_the_reference_set_against_itself_is_zero(stage: dict[str, Path]) -> None:
    cfg = load_params(stage["params"]).datasets["fashion_mnist"]
    np.savez(stage["root"] / "self.npz", arr_0=read_split(cfg, stage["shards"], "train", limit=N)[0])
    m = run_evaluate(stage, stage["root"] / "self.npz", stage["root"] / "eval-self")
    assert abs(m["fid"]) < 1e-3 and m["singular"]
    with np.load(stage["refstats"]) as z:  # KID from the same Inception features as FID, at the configured subsets
        ref = z["features"].astype(np.float64)
    expected = kidlib.kid_from_features(ref, ref, max_subset_size=N // 2, subsets=100)
    assert m["kid"] == pytest.approx(expected.kid, rel=1e-3) and m["kid_std"] == pytest.approx(expected.std, rel=1e-3)


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


class BrightnessI3D(torch.nn.Module):
    """Stands in for the I3D (same call, same input): a clip's logits put 50 on class floor(2 * (mean + 1)) of 4 by
    its mean brightness in [-1, 1], so clips of one constant value each fall in known classes."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where the features are computed (device)

    def logits_and_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classes = ((x.mean(dim=(1, 2, 3, 4)) + 1) * 2).long().clamp(0, 3)  # (B,)
        logits = 50.0 * torch.nn.functional.one_hot(classes, fvdlib.FEATURE_DIM).float()  # (B, 400)
        return logits + self.anchor, torch.zeros(len(x), 1024)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """8 constant clips of the video run's shape, two per class of BrightnessI3D in class order, 8 random references."""
    root = tmp_path_factory.mktemp("video")
    params = load_params(REPO / "params.yaml")
    run = params.run("rin_moving_fmnist")
    run = dataclasses.replace(run, eval=dataclasses.replace(run.eval, num_reference=8))
    ds = run.dataset
    levels = np.repeat([32, 96, 160, 224], 2).astype(np.uint8)  # classes 0, 0, 1, 1, 2, 2, 3, 3
    clips = np.broadcast_to(levels[:, None, None, None, None], (8, ds.frames, ds.resolution, ds.resolution, 1))
    np.savez(root / "samples.npz", arr_0=np.ascontiguousarray(clips))
    (root / "cost.json").write_text(json.dumps({"model_params": 1, "gflops_per_image": 1.0}))
    ref = np.random.default_rng(0).normal(size=(8, fvdlib.FEATURE_DIM)).astype(np.float32)
    np.savez(root / "ref.npz", features=ref, extractor=fvdlib.EXTRACTOR_ID, dataset=run.dataset_name, split="test",
             resolution=ds.resolution)
    return {"root": root, "params": params, "run": run, "ref": ref.astype(np.float64)}


def evaluate_video(video: dict, is_splits: int, out: str) -> dict:
    run = dataclasses.replace(video["run"], eval=dataclasses.replace(video["run"].eval, is_splits=is_splits))
    root = video["root"]
    return ev.evaluate_run(video["params"], run, root / "samples.npz", root / "cost.json", root / "ref.npz",
                           root / out, net=BrightnessI3D())


def test_video_evaluation_writes_fvd_kvd_and_the_video_is(video: dict) -> None:
    m = evaluate_video(video, 1, "eval")
    assert json.loads((video["root"] / "eval" / "metrics.json").read_text()) == m
    assert "fid" not in m and "kid" not in m and m["fvd"] > 0
    assert m["resize"] == RESIZE_CLIPS and m["samples_sha256"] == sha256_file(video["root"] / "samples.npz")
    assert m["video_is"] == pytest.approx(4.0, rel=1e-9)  # one split over 4 equally used, confident classes
    assert (m["inception_score"], m["video_is_splits"], m["video_is_std"]) == (m["video_is"], 1, 0.0)
    logits = 50.0 * np.eye(fvdlib.FEATURE_DIM)[np.repeat(np.arange(4), 2)]  # what BrightnessI3D gives these clips
    expected = kidlib.kid_from_features(logits, video["ref"], max_subset_size=4, subsets=100)
    assert (m["kvd_subset_size"], m["kvd_subsets"]) == (4, 100)  # half of 8 clips; params.yaml's 100 subsets
    assert m["kvd"] == pytest.approx(expected.kid, rel=1e-9) and m["kvd_std"] == pytest.approx(expected.std, rel=1e-9)


def test_video_is_follows_is_splits(video: dict) -> None:
    """Two splits of the class-ordered clips: each half holds two of the classes, so each split's IS is 2."""
    m = evaluate_video(video, 2, "eval-2")
    assert (m["video_is"], m["video_is_std"], m["video_is_splits"]) == (pytest.approx(2.0, rel=1e-9), 0.0, 2)
    with pytest.raises(ConfigError, match=r"runs\.rin_moving_fmnist\.eval\.is_splits 9 exceeds the 8 samples"):
        evaluate_video(video, 9, "eval-9")


def test_seam_ratio_of_a_patch_model_beside_real_images(stage: dict[str, Path]) -> None:
    """A cost.json with a patch grid makes evaluate score the seam ratio of the samples and of the stored real
    reference images (refstats keeps them); the real images against themselves give the same ratio."""
    cfg = load_params(stage["params"]).datasets["fashion_mnist"]
    real = read_split(cfg, stage["shards"], "train", limit=N)[0]
    with np.load(stage["refstats"]) as z:
        np.testing.assert_array_equal(z["images"], real)  # the reference images themselves, uint8
    np.savez(stage["root"] / "real.npz", arr_0=real)
    patched = stage["root"] / "patched"
    patched.mkdir()
    cost = json.loads(stage["cost"].read_text()) | {"patch": [4, 4]}
    (patched / "cost.json").write_text(json.dumps(cost))
    m = run_evaluate(stage | {"cost": patched / "cost.json"}, stage["root"] / "real.npz", patched / "eval")
    assert m["seam_patch"] == [4, 4] and m["seam_ratio"] == pytest.approx(m["seam_ratio_real"])
    assert 0.8 < m["seam_ratio"] < 1.3
    plain = run_evaluate(stage, stage["root"] / "samples.npz", stage["root"] / "eval-plain")
    assert "seam_ratio" not in plain  # a model without patches (cost.json without one)


def test_the_floor_scores_held_out_real_images_exactly_as_samples(tmp_path: Path) -> None:
    """references.<dataset>.floor: refstats keeps features of that many images of the other split, and evaluate
    scores them against the same reference at the samples' N; with those very images as the samples, the floor
    equals the samples' FID and KID to the last digit."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["runs"] = {"tiny": {"dataset": "fashion_mnist", "model": {"family": "rin", "preset": "rin_tiny"},
                            "diffusion": {}, "train": {}, "sample": {"steps": 7, "num_samples": N},
                            "eval": {"num_reference": N}}}
    raw["evaluation"]["references"] = {"fashion_mnist": {"split": "train", "num_images": N, "floor": N}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = dataclasses.replace(load_params(tmp_path / "params.yaml").datasets["fashion_mnist"], max_samples=N,
                              shard_size=16)
    write_dataset_shards(cfg, "fashion_mnist", tmp_path / "shards", splits=("train", "test"))
    ref = tmp_path / "refstats.npz"
    assert cli.main(["--params", str(tmp_path / "params.yaml"), "refstats", "--dataset", "fashion_mnist",
                     "--shards", str(tmp_path / "shards"), "--out", str(ref)]) == 0
    with np.load(ref) as z:
        assert z["floor_features"].shape == (N, fidlib.FEATURE_DIM) and str(z["floor_split"]) == "test"
    held_out = read_split(cfg, tmp_path / "shards", "test", limit=N)[0]
    np.savez(tmp_path / "samples.npz", arr_0=held_out)
    (tmp_path / "cost.json").write_text(json.dumps({"model_params": 1, "gflops_per_image": 0.5}))
    stage = {"params": tmp_path / "params.yaml", "cost": tmp_path / "cost.json", "refstats": ref}
    m = run_evaluate(stage, tmp_path / "samples.npz", tmp_path / "eval")
    assert (m["floor_n"], m["floor_split"]) == (N, "test")
    assert m["floor_fid"] == m["fid"] and m["floor_kid"] == m["kid"] and m["floor_kid_std"] == m["kid_std"]
    assert m["floor_fid_method"] == m["fid_method"]
    np.savez(tmp_path / "fewer.npz", arr_0=held_out[: N // 2])
    fewer = run_evaluate(stage | {"params": _with_samples(tmp_path, N // 2)}, tmp_path / "fewer.npz",
                         tmp_path / "eval-fewer")
    assert fewer["floor_n"] == N // 2 and fewer["floor_fid"] == fewer["fid"]  # the floor follows the samples' N


def _with_samples(root: Path, n: int) -> Path:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["runs"]["tiny"]["sample"]["num_samples"] = n
    path = root / f"params-{n}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def proxy_params(stage: dict[str, Path], **proxy) -> Path:
    """The tiny run of `stage`, trained 4 steps with the proxy KID curve at every 2nd (`proxy` overrides)."""
    raw = yaml.safe_load(stage["params"].read_text())
    raw["runs"]["tiny"]["train"] = {"steps": 4, "batch_size": 4, "data": "memory", "precision": "fp32",
                                    "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "sample_every": 0,
                                    "proxy": {"every": 2, "num_samples": 8, "steps": 2} | proxy}
    path = stage["root"] / "proxy_params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_train_stage_logs_a_proxy_kid_curve_against_the_cached_references(stage: dict[str, Path], tmp_path,
                                                                              capsys):
    params = proxy_params(stage)
    argv = ["--params", str(params), "train", "tiny", "--shards", str(stage["shards"]), "--out", str(tmp_path)]
    assert cli.main(argv) == 2  # refused before training: nothing to score against
    assert "runs.tiny.train.proxy is set, but the train stage got no --refstats" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()
    assert cli.main([*argv, "--refstats", str(stage["refstats"])]) == 0
    rows = json.loads((tmp_path / "train_log.json").read_text())["proxy"]
    assert [r["step"] for r in rows] == [2, 4] and [r["images_seen"] for r in rows] == [8, 16]
    for r in rows:
        assert (r["num_reference"], r["reference_split"], r["proxy_samples"]) == (N, "train", 8)
        assert r["kid_subset_size"] == 4 and r["kid"] > 0.05  # 2 sampling steps of an untrained model: far off
        assert r["feature_network"].startswith("TF-Inception") and r["train_pflop"] > 0
    tsv = (tmp_path / "live" / "plots" / "metrics" / "proxy" / "kid.tsv").read_text().splitlines()
    col = tsv[0].split("\t").index("step")
    assert [line.split("\t")[col] for line in tsv[1:]] == ["2", "4"]


def test_the_proxy_curve_leaves_the_training_unchanged(stage: dict[str, Path], tmp_path):
    """The claims compare arms with a proxy curve (rin) and without: drawing and scoring the proxy's EMA samples
    must not move the training's random draws or weights. Same run with and without train.proxy: the same weights,
    EMA and losses, bit for bit."""
    from safetensors.torch import load_file

    with_proxy = proxy_params(stage)
    raw = yaml.safe_load(with_proxy.read_text())
    raw["runs"]["tiny"]["train"]["proxy"] = None
    without = stage["root"] / "no_proxy_params.yaml"
    without.write_text(yaml.safe_dump(raw))
    for params, out in ((with_proxy, tmp_path / "proxy"), (without, tmp_path / "plain")):
        argv = ["--params", str(params), "train", "tiny", "--shards", str(stage["shards"]), "--out", str(out),
                "--device", "cpu", "--refstats", str(stage["refstats"])]
        assert cli.main(argv) == 0
    assert len(json.loads((tmp_path / "proxy" / "train_log.json").read_text())["proxy"]) == 2  # the proxy ran
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / run / name)) for run in ("proxy", "plain"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[row["loss"] for row in json.loads((tmp_path / run / "train_log.json").read_text())["history"]]
              for run in ("proxy", "plain")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_a_proxy_is_refused_where_it_cannot_mean_anything(stage: dict[str, Path]) -> None:
    raw = yaml.safe_load(proxy_params(stage).read_text())
    raw["runs"]["tiny"]["diffusion"] = {"context_frames": 2}
    raw["runs"]["tiny"]["dataset"] = "moving_fmnist"
    path = stage["root"] / "proxy_video.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"runs\.tiny\.train\.proxy is set, but a run that predicts from context"):
        load_params(path).run("tiny")


def test_refstats_parts_resume_a_killed_run_and_redo_only_what_is_missing_or_damaged(tmp_path, monkeypatch):
    """write_refstats in parts of 16 images, with a stand-in feature network (the mean of each image row): killed
    during its third part it keeps two; rerun, it computes only the rest, and a damaged or foreign part again."""
    from diffusion.stages import refstats

    calls: list[int] = []

    def fake_features(images, net, desc):
        calls.append(len(images))
        if net == "die" and len(calls) == 3:
            raise KeyboardInterrupt
        return images.reshape(len(images), -1)[:, :8].astype(np.float32) + 0.5, 100.0

    monkeypatch.setattr(refstats, "timed_features", fake_features)
    monkeypatch.setattr(refstats, "PART_SIZE", 16)
    params = load_params(REPO / "params.yaml")
    cfg = dataclasses.replace(params.datasets["fashion_mnist"], max_samples=N, shard_size=16)
    write_dataset_shards(cfg, "fashion_mnist", tmp_path / "shards", splits=("train", "test"))
    ref = dataclasses.replace(params.evaluation.references["fashion_mnist"], num_images=N, floor=20)
    out, parts = tmp_path / "ref.npz", tmp_path / "ref.parts"
    with pytest.raises(KeyboardInterrupt):
        refstats.write_refstats("fashion_mnist", cfg, ref, tmp_path / "shards", out, "die", parts)
    assert sorted(p.name for p in parts.iterdir()) == ["train-00000000.npz", "train-00000016.npz"] and not out.exists()
    calls.clear()
    refstats.write_refstats("fashion_mnist", cfg, ref, tmp_path / "shards", out, "net", parts)
    assert calls == [8, 16, 4]  # the last train part (40 = 16 + 16 + 8), then the floor's 20 test images
    with np.load(out) as z:
        resumed, floor = z["features"], z["floor_features"]
    images = read_split(cfg, tmp_path / "shards", "train", limit=N)[0]
    np.testing.assert_array_equal(resumed, images.reshape(N, -1)[:, :8] + 0.5)  # in order, nothing lost or doubled
    assert floor.shape == (20, 8)
    (parts / "train-00000016.npz").write_bytes(b"damaged")
    with np.load(parts / "test-00000000.npz") as z:  # a part of other images: its key no longer matches
        kept = {"features": z["features"], "images_per_s": z["images_per_s"]}
    np.savez(parts / "test-00000000.npz", key=np.str_("other"), **kept)
    calls.clear()
    refstats.write_refstats("fashion_mnist", cfg, ref, tmp_path / "shards", out, "net", parts)
    assert calls == [16, 16]
    with np.load(out) as z:
        np.testing.assert_array_equal(z["features"], resumed)
