"""RIN on clips: 3-D patches, frame-conditioned prediction (context frames given clean in training, held fixed
while sampling), and a tiny video run through the real train and sample stages."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion import cli as entry
from diffusion.config import ConfigError, ScheduleConfig, parse_params
from diffusion.objectives import NoiseDraw, diffusion_loss, q_sample, target
from diffusion.sampling import sample
from diffusion.schedules import Schedule
from rin.model import RIN
from rin.presets import PRESETS
from tests.helpers import sample_config
from tests.rawdata import make_idx_dataset

REPO = Path(__file__).resolve().parents[2]


def tiny_video(**kw) -> RIN:
    torch.manual_seed(0)
    return RIN(dataclasses.replace(PRESETS["rin_tiny_video"], **kw)).eval()


def test_video_presets_token_counts():
    assert PRESETS["rin_kinetics600"].num_tokens == 2048  # 16x64x64 in 2x4x4 patches, as in the paper
    assert PRESETS["rin_video_cpu"].num_tokens == 8 * 8 * 8
    model = tiny_video(self_cond=True)
    x = torch.randn(3, 1, 8, 16, 16)
    out, latents = model(x, torch.rand(3))
    assert out.shape == x.shape
    assert latents.shape == (3, PRESETS["rin_tiny_video"].num_latents, PRESETS["rin_tiny_video"].latent_dim)
    assert model.tokenizer.tokens(x).shape == (3, 4 * 4 * 4, PRESETS["rin_tiny_video"].interface_dim)


def test_video_readout_inverts_patching():
    """Token k of the readout writes exactly the pixels of patch k: a frame-local edit stays in its 2-frame slab."""
    model = tiny_video()
    tokens = torch.zeros(1, 64, PRESETS["rin_tiny_video"].interface_dim)
    base = model.tokenizer.readout(tokens)
    tokens[0, 0] = torch.randn(tokens.shape[-1])  # the first token: frames 0-1, rows 0-3, cols 0-3
    diff = (model.tokenizer.readout(tokens) - base).abs()[0, 0]
    inside = torch.zeros_like(diff, dtype=torch.bool)
    inside[:2, :4, :4] = True
    assert diff[inside].min() > 0 and diff[~inside].max() == 0
    assert base.shape == (1, 1, 8, 16, 16)


class Spy(torch.nn.Module):
    """A denoiser that records its input and answers with a fixed tensor."""

    def __init__(self, answer: torch.Tensor):
        super().__init__()
        self.answer, self.inputs = answer, []

    def forward(self, x_t, gamma, labels=None, state=None):
        self.inputs.append(x_t.clone())
        return self.answer.expand_as(x_t), None


def test_loss_sees_clean_context_and_scores_the_other_frames_only():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 6, 8, 8, generator=g) * 2 - 1
    noise = NoiseDraw.draw(torch.Generator().manual_seed(1), tuple(x0.shape))
    schedule = Schedule(ScheduleConfig("cosine", 0.0, 1.0, 1.0))
    answer = torch.randn(1, 1, 6, 8, 8, generator=g)
    spy = Spy(answer)
    loss = diffusion_loss(spy, x0, None, schedule, "eps", 0.0, noise, context_frames=2)
    seen = spy.inputs[0]
    assert torch.equal(seen[:, :, :2], x0[:, :, :2])  # context enters clean
    gamma = schedule(noise.t)
    assert torch.allclose(seen[:, :, 2:], q_sample(x0, noise.eps, gamma)[:, :, 2:])
    expected = ((answer - target("eps", x0, noise.eps, gamma))[:, :, 2:] ** 2).flatten(1).mean(1)
    assert torch.allclose(loss, expected)
    # what the network says about the context frames does not move the loss
    answer2 = answer.clone()
    answer2[:, :, :2] += 100.0
    assert torch.allclose(diffusion_loss(Spy(answer2), x0, None, schedule, "eps", 0.0, noise, 2), loss)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_holds_context_frames_fixed(sampler):
    model = tiny_video(self_cond=True)
    c = 3
    context = torch.linspace(-1, 1, 2 * c * 16 * 16).reshape(2, 1, c, 16, 16)
    spy_inputs = []

    def denoiser(x, gamma, labels, state):
        spy_inputs.append(x[:, :, :c].clone())
        return model(x, gamma, labels, state)

    out = sample(denoiser, (1, 8, 16, 16), [0, 1], sample_config(sampler=sampler, steps=5), "eps", context=context)
    assert torch.equal(out[:, :, :c], context)
    assert all(torch.equal(x, context) for x in spy_inputs)  # the network saw the clean context at every step
    assert out[:, :, c:].abs().sum() > 0
    # the generated frames depend on the context (the model reads it) and each clip's own seed only
    other = sample(denoiser, (1, 8, 16, 16), [0, 1], sample_config(sampler=sampler, steps=5), "eps",
                   context=-context)
    assert not torch.equal(other[:, :, c:], out[:, :, c:])
    single = sample(denoiser, (1, 8, 16, 16), [1], sample_config(sampler=sampler, steps=5), "eps",
                    context=context[1:])
    assert torch.allclose(single[0], out[1], atol=1e-5)


def _raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_context_frames_are_validated():
    raw = _raw_params()
    raw["runs"]["rin_fmnist"]["diffusion"] = {"context_frames": 2}
    with pytest.raises(ConfigError, match=r"runs\.rin_fmnist\.diffusion\.context_frames=2 must be below images"):
        parse_params(raw)
    raw = _raw_params()
    raw["pipeline"]["datasets"].append("moving_mnist")
    run = {"dataset": "moving_mnist", "model": {"family": "rin", "preset": "rin_video_cpu"}, "train": {}, "sample": {},
           "eval": {}}
    raw["runs"]["video"] = run | {"diffusion": {"context_frames": 20}}
    with pytest.raises(ConfigError, match=r"runs\.video\.diffusion\.context_frames=20 must be below the 20 frames"):
        parse_params(raw)
    raw["runs"]["video"] = run | {"diffusion": {"context_frames": 5}}
    assert parse_params(raw).run("video").diffusion.context_frames == 5


def _video_params(tmp_path: Path, root: Path) -> Path:
    raw = _raw_params()
    raw["pipeline"]["datasets"] = ["fashion_mnist", "moving_tiny"]
    raw["datasets"]["moving_tiny"] = dict(raw["datasets"]["moving_mnist"], root=str(root), resolution=32, frames=10,
                                          shard_size=8, max_samples=24)
    raw["runs"] = {"tiny_video": {
        "dataset": "moving_tiny",
        "model": {"family": "rin", "preset": "rin_tiny_video"},
        "diffusion": {"context_frames": 2},
        "train": {"steps": 6, "batch_size": 4, "optimizer": "adamw", "lr": 1e-3, "warmup_steps": 2,
                  "precision": "bf16", "log_every": 2, "checkpoint_every": 3, "sample_every": 3, "ema_decay": 0.9,
                  "data": "memory"},
        "sample": {"steps": 4, "num_samples": 5, "batch_size": 2},
        "eval": {"reference_split": "test", "num_reference": 6},
    }}
    raw["evaluation"] = {"references": {"moving_tiny": {"split": "test", "num_images": 6}},
                         "report": {"tiny_video": {"table": "rin_table3", "row": "kinetics600", "scale": "test scale"}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_tiny_video_run_goes_through_every_stage(tmp_path):
    """Moving-digit clips -> shards -> train (with a preview) -> sample (continuing the test clips) -> I3D reference
    features -> FVD -> the RIN video table's row."""
    make_idx_dataset(tmp_path / "mnist", 24, 24)
    params = _video_params(tmp_path, tmp_path / "mnist")
    shards, train, samples = tmp_path / "shards", tmp_path / "train", tmp_path / "samples"

    def cli(*args: str) -> None:  # in this process: the entry point of `python -m diffusion.cli`, without its start-up
        assert entry.main(["--params", str(params), *args]) == 0, args

    cli("shard", "--dataset", "moving_tiny", "--out", str(shards))
    cli("train", "tiny_video", "--out", str(train), "--shards", str(shards), "--device", "cpu")
    assert (train / "ema.safetensors").exists()
    assert list((train / "live").rglob("step-00000003.png"))  # the video preview grid was logged
    cli("sample", "tiny_video", "--weights", str(train), "--out", str(samples), "--shards", str(shards),
        "--device", "cpu")
    with np.load(samples / "samples.npz") as z:
        clips = z["arr_0"]
    assert clips.shape == (5, 10, 32, 32, 1) and clips.dtype == np.uint8

    from data.batches import read_split

    run = parse_params(yaml.safe_load(params.read_text())).run("tiny_video")
    test_clips, _ = read_split(run.dataset, shards, "test")
    for i in range(5):  # sample i continues test clip i, its two context frames untouched
        assert np.array_equal(clips[i, :2], test_clips[i % len(test_clips), :2])
    assert (samples / "grid.png").exists()

    refstats, evaluation, report = tmp_path / "refstats.npz", tmp_path / "eval", tmp_path / "report"
    cli("refstats", "--dataset", "moving_tiny", "--shards", str(shards), "--out", str(refstats))
    cli("evaluate", "tiny_video", "--samples", str(samples / "samples.npz"), "--cost", str(samples / "cost.json"),
        "--refstats", str(refstats), "--out", str(evaluation))
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["fvd"] > 0 and metrics["num_samples"] == 5 and metrics["num_reference"] == 6
    assert metrics["feature_extractor"].startswith("i3d-kinetics-400") and "fid" not in metrics
    assert metrics["frames"] == 10 and metrics["context_frames"] == 2 and metrics["singular"]

    outputs = tmp_path / "outputs"
    for src, dst in ((train, "train"), (samples, "samples"), (evaluation, "eval")):
        (outputs / "tiny_video").mkdir(parents=True, exist_ok=True)
        (outputs / "tiny_video" / dst).symlink_to(src)
    cli("report", "--runs", f"tiny_video={outputs / 'tiny_video'}", "--out", str(report))
    table = (report / "rin_table3.csv").read_text()
    assert f"{metrics['fvd']:.2f} (singular)" in table and "2 context frames" in table
