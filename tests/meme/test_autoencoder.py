"""MEME's first stage: the KL autoencoder (shapes, loss terms, a short fit that reconstructs), latent datasets in
params.yaml and the DVC graph, and a tiny run that trains and samples in latent space end to end."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion import cli
from diffusion.config import AutoencoderConfig, ConfigError, load_params, parse_params
from diffusion.images import from_uint8
from diffusion.registry import resolve_model
from diffusion.stages.autoencoder import latent_scale, reconstruction_error, train_autoencoder
from diffusion.trainer import training_fingerprint
from meme.autoencoder import Autoencoder, autoencoder_loss
from tests.helpers import load_checked, with_key
from tests.rawdata import make_idx_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
TINY = dict(dataset="fashion_mnist", base_channels=8, channel_mult=[1, 2, 2], num_res_blocks=1, z_channels=3,
            norm_groups=4, loss="l1", kl_weight=1e-6, steps=150, batch_size=16, lr=2e-3, seed=0, log_every=50,
            weights=None)




def tiny_cfg(**kw) -> AutoencoderConfig:
    raw = TINY | kw
    return AutoencoderConfig(**raw | {"channel_mult": tuple(raw["channel_mult"])})


def blobs(n: int, seed: int = 0) -> np.ndarray:
    """(n, 32, 32, 1) uint8: one bright axis-aligned rectangle per image on black, like a padded item."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 32, 32, 1), np.uint8)
    for img in out:
        top, left = rng.integers(2, 14, size=2)
        h, w = rng.integers(8, 16, size=2)
        img[top:top + h, left:left + w] = rng.integers(120, 256)
    return out


def test_shapes_for_f4_and_f2():
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    for mult, side in (((1, 2, 2), 8), ((1, 2), 16)):
        model = Autoencoder(tiny_cfg(channel_mult=mult), channels=1)
        mean, logvar = model.encode(x)
        assert mean.shape == logvar.shape == (2, 3, side, side)
        assert model.decode(mean).shape == x.shape
    assert tiny_cfg().latent_shape(32) == (3, 8, 8) and tiny_cfg().factor == 4


def test_kl_term_is_zero_for_the_standard_normal_posterior():
    torch.manual_seed(0)
    model = Autoencoder(tiny_cfg(loss="l2", kl_weight=0.5), channels=1)
    torch.nn.init.zeros_(model.encoder[-1].weight)
    torch.nn.init.zeros_(model.encoder[-1].bias)  # mean 0, log-variance 0: q(z|x) = N(0, I)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    terms = autoencoder_loss(model, x, torch.Generator().manual_seed(1))
    assert terms["kl"].item() == 0.0
    z = torch.randn((4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(terms["reconstruction"], (model.decode(z) - x).square().mean())
    assert torch.equal(terms["loss"], terms["reconstruction"])


def test_a_short_fit_reconstructs_and_the_scale_standardises_latents():
    images = blobs(96)
    cfg = tiny_cfg()
    untrained = reconstruction_error(Autoencoder(cfg, channels=1).eval(), images)
    log: list[dict] = []
    model = train_autoencoder(cfg, images, random_flip=False, log=log)
    after = reconstruction_error(model, images)
    assert [row["step"] for row in log] == [50, 100, 150]
    assert after["l1"] < 0.35 * untrained["l1"] and after["psnr_db"] > untrained["psnr_db"] + 6, (untrained, after)
    scale = latent_scale(model, images)
    with torch.no_grad():
        z = model.encode(from_uint8(images))[0] * scale
    assert abs(z.std().item() - 1.0) < 1e-4
    short = [train_autoencoder(tiny_cfg(steps=3), images, random_flip=False) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in short)))  # a function of the seed


# --- latent datasets in params.yaml and the graph --------------------------------------------------------------------


def latent_params(tmp_path: Path) -> dict:
    """params.yaml with a latent dataset fmnist_f4 of (synthetic) Fashion-MNIST and one tiny U-Net run on it."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["fashion_mnist"] |= {"root": str(tmp_path / "raw"), "shard_size": 32}
    raw["datasets"]["fmnist_f4"] = dict(raw["datasets"]["fashion_mnist"])
    raw["autoencoders"] = {"fmnist_f4": dict(TINY, steps=60, log_every=20)}
    raw["runs"] = {"latent": {
        "dataset": "fmnist_f4", "model": {"family": "meme", "preset": "unet_tiny"},
        "diffusion": {"prediction": "v"},
        "train": {"steps": 4, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "warmup_steps": 1,
                  "precision": "fp32", "log_every": 2, "checkpoint_every": 2, "sample_every": 2, "ema_decay": 0.9,
                  "data": "memory", "self_cond_rate": 0.0},
        "sample": {"steps": 3, "num_samples": 5, "batch_size": 4}, "eval": {"num_reference": 16}}}
    raw["experts"], raw["ensembles"] = {}, {}
    raw["evaluation"]["references"]["fmnist_f4"] = {"split": "train", "num_images": 16}
    raw["evaluation"]["report"], raw["evaluation"]["fourier"]["runs"] = {}, ["latent"]
    return raw


def test_a_run_on_a_latent_dataset_models_its_latents(tmp_path):
    params = parse_params(latent_params(tmp_path))
    run = params.run("latent")
    assert run.autoencoder == params.autoencoders["fmnist_f4"] and run.dataset == params.datasets["fashion_mnist"]
    cfg = resolve_model(run)
    assert (cfg.channels, cfg.data_shape) == (3, (8, 8))
    assert training_fingerprint(run, "a" * 64) != training_fingerprint(run)  # new autoencoder weights: start over
    assert parse_params(copy.deepcopy(latent_params(tmp_path))).run("latent").autoencoder is not None




@pytest.mark.parametrize("path,value,message", [
    ("datasets.fmnist_f4.resolution", 28,
     r"autoencoders\.fmnist_f4: the latent dataset needs an entry datasets\.fmnist_f4 with the same keys"),
    ("autoencoders.fmnist_f4.dataset", "mnist", r"autoencoders\.fmnist_f4\.dataset must name one of pipeline"),
    ("autoencoders.fmnist_f4.channel_mult", [1, 1, 1, 1, 1, 1, 1],
     r"autoencoders\.fmnist_f4: channel_mult has 7 levels \(f = 64\), which must divide the dataset's resolution 32"),
    ("autoencoders.fmnist_f4.norm_groups", 3, r"autoencoders\.fmnist_f4: norm_groups 3 must divide every level width"),
    ("autoencoders.fmnist_f4.steps", 0, r"autoencoders\.fmnist_f4: steps is 0 and no weights are imported"),
    ("autoencoders.fmnist_f4.loss", "lpips", r"autoencoders\.fmnist_f4\.loss must be one of 'l1', 'l2'"),
    ("autoencoders.fmnist_f4.weights", {"path": "ae.safetensors"}, r"missing key autoencoders\.fmnist_f4\.weights"),
    ("pipeline.datasets", ["fashion_mnist", "moving_fmnist", "fmnist_f4"],
     r"remove 'fmnist_f4' from pipeline\.datasets: autoencoder@fmnist_f4 writes its shards"),
    ("runs.latent.dataset", "cifar10", r"runs\.latent\.dataset 'cifar10' has no shard stage"),
])
def test_latent_dataset_errors_name_the_key(tmp_path, path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_checked(with_key(latent_params(tmp_path), path, value))


def test_graph_builds_the_latent_dataset_before_its_runs(tmp_path):
    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    raw = latent_params(tmp_path)
    raw["runs"] |= yaml.safe_load((REPO / "params.yaml").read_text())["runs"]  # the report stage names them
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        outs = {s.name: [str(Path(o.fs_path).relative_to(tmp_path)) for o in s.outs] for s in repo.index.stages}
        upstream = {s.name: {u.name for u in repo.index.graph.successors(s)} for s in repo.index.stages}
    assert outs["autoencoder@fmnist_f4"] == ["data/shards/fmnist_f4"] and "shard@fmnist_f4" not in stages
    for stage in ("train@latent", "sample@latent", "refstats@fmnist_f4"):
        assert "autoencoder@fmnist_f4" in upstream[stage], stage
    assert "shard@fashion_mnist" in upstream["autoencoder@fmnist_f4"]


# --- end to end ------------------------------------------------------------------------------------------------------


def test_tiny_latent_run_trains_samples_and_decodes(tmp_path):
    from data.prepare import write_dataset_shards
    from diffusion.flops import denoiser_cost
    from diffusion.stages.evaluate import model_cost
    from meme.unet import UNet

    make_idx_dataset(tmp_path / "raw", 64, 16)
    raw = latent_params(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    source, latent, out = tmp_path / "shards", tmp_path / "latent_shards", tmp_path / "outputs"
    write_dataset_shards(params.datasets["fashion_mnist"], "fashion_mnist", source)
    base = ["--params", str(tmp_path / "params.yaml")]
    assert cli.main([*base, "autoencoder", "fmnist_f4", "--source", str(source), "--out", str(latent)]) == 0
    summary = json.loads((latent / "autoencoder.json").read_text())
    assert summary["latent_shape"] == [3, 8, 8] and [r["step"] for r in summary["history"]] == [20, 40, 60]
    assert (latent / "train" / "manifest.json").exists() and summary["test"]["l1"] > 0
    train = ["train", "latent", "--out", str(out / "train"), "--shards", str(latent), "--device", "cpu"]
    assert cli.main([*base, *train]) == 0
    state = json.loads(next((out / "train" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["fingerprint"] != training_fingerprint(params.run("latent"))  # the autoencoder's weights are in it
    assert list((out / "train" / "live").rglob("step-00000002.png"))  # previews are decoded images
    sample = ["sample", "latent", "--weights", str(out / "train"), "--out", str(out / "samples"), "--shards",
              str(latent), "--device", "cpu"]
    assert cli.main([*base, *sample]) == 0
    with np.load(out / "samples" / "samples.npz") as z:
        assert z["arr_0"].shape == (5, 32, 32, 1) and z["arr_0"].dtype == np.uint8  # decoded to the dataset's images
    gflops = model_cost(out / "samples" / "cost.json")["gflops_per_image"]  # the denoiser on 3x8x8 latents
    pixel = resolve_model(parse_params(with_key(raw, "runs.latent.dataset", "fashion_mnist")).run("latent"))
    assert 0 < gflops < denoiser_cost(UNet(pixel), pixel.data_shape, pixel.channels).gflops
    (latent / "autoencoder.safetensors").unlink()
    assert cli.main([*base, *sample]) == 2  # a latent run cannot sample without its autoencoder


def test_imported_weights_are_checked_against_their_pinned_hash(tmp_path):
    from diffusion.checkpoint import save_weights
    from diffusion.config import ImportedWeights
    from diffusion.io import sha256_file
    from diffusion.stages.autoencoder import import_weights

    torch.manual_seed(3)
    trained = Autoencoder(tiny_cfg(), channels=1)
    path = tmp_path / "ae.safetensors"
    save_weights(trained.state_dict(), path, {})
    cfg = tiny_cfg(steps=0, weights=ImportedWeights(str(path), sha256_file(path)))
    model = import_weights(cfg, channels=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ValueError, match=r"differs from the pinned weights\.sha256 0+; pin the new hash"):
        import_weights(tiny_cfg(steps=0, weights=ImportedWeights(str(path), "0" * 64)), channels=1)
