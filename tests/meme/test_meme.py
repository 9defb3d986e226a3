"""MEME: iFormer channel bookkeeping, U-Net / iU-Net presets, interval routing, soft assignment, multi-expert
sampling and training through the engine (config, Trainer, CLI, generate)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml

from diffusion import cli
from diffusion.config import ConfigError, ScheduleConfig, load_params, parse_params
from diffusion.objectives import NoiseDraw
from diffusion.sampling import sample, time_pairs
from diffusion.schedules import Schedule
from diffusion.timesteps import draw_t, own_interval_rate, owner, time_sampler
from diffusion.trainer import step_generator, training_fingerprint
from meme.experts import MultiExpert
from meme.iformer import IFormerBlock, InceptionMixer, LowMixer, split_channels
from meme.presets import PRESETS
from meme.unet import UNet
from tests.helpers import load_checked, sample_config, with_key
from tests.rawdata import make_idx_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

COSINE = ScheduleConfig("cosine", 0.0, 1.0, 1.0)
SIGMOID = ScheduleConfig("sigmoid", -3.0, 3.0, 0.9)
LINEAR = ScheduleConfig("linear", 0.0, 1.0, 1.0)




def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- presets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_maps_its_input_shape_to_itself(name):
    cfg = PRESETS[name]
    with torch.device("meta"):  # no memory or compute: LDM-L has 274M parameters
        model = UNet(cfg)
        x = torch.zeros(2, cfg.channels, *cfg.data_shape)
        out, state = model(x, torch.rand(2), None, None)
    assert out.shape == x.shape and state is None


@pytest.mark.parametrize(
    "name,paper_millions,tolerance",
    [("ldm_l", 274.0, 0.005), ("ldm_s", 90.0, 0.01), ("iu_ldm_s", 82.9, 0.03)]
    + [(f"meme_ldm_e{n}", 82.9, 0.03) for n in range(1, 5)],
)
def test_paper_presets_match_the_papers_parameter_counts(name, paper_millions, tolerance):
    with torch.device("meta"):
        count = n_params(UNet(PRESETS[name]))
    assert abs(count / 1e6 - paper_millions) <= tolerance * paper_millions, count


@pytest.mark.parametrize("family", ["meme_ldm", "meme_fmnist"])
def test_expert_ratio_schedules_fall_with_depth_and_faster_for_later_experts(family):
    """MEME's rule on the presets' snapped ratios: every expert's d_h / d falls strictly with depth; at every level a
    later expert (larger t) has a strictly lower ratio, so no two experts share a level's architecture; and a later
    expert falls further from its first level to its last."""
    ratios = [PRESETS[f"{family}_e{n}"].iformer_ratios for n in range(1, 5)]
    for r in ratios:
        assert all(a > b for a, b in zip(r, r[1:])), r
    for early, late in zip(ratios, ratios[1:]):
        assert all(a > b for a, b in zip(early, late)), (early, late)
    falls = [r[0] - r[-1] for r in ratios]
    assert all(a < b for a, b in zip(falls, falls[1:])), falls
    with pytest.raises(ValueError, match="not a whole number"):
        UNet(dataclasses.replace(PRESETS["iunet_tiny"], iformer_ratios=(0.5, 0.3)))


def test_iformer_time_embedding_is_a_setting_that_conditions_the_block():
    """iformer_time_embed: the iFormer blocks take the noise-level embedding (their output then depends on gamma
    through their own weights); off, they hold no embedding weights and the U-Net is unchanged."""
    off = PRESETS["iunet_tiny"]
    on = dataclasses.replace(off, iformer_time_embed=True)
    torch.manual_seed(0)
    model_on = UNet(on)
    blocks = [m for m in model_on.modules() if isinstance(m, IFormerBlock)]
    assert blocks and all(b.emb is not None for b in blocks)
    assert n_params(model_on) > n_params(UNet(off))
    assert all(b.emb is None for b in UNet(off).modules() if isinstance(b, IFormerBlock))
    block = blocks[0]
    x = torch.randn(2, block.norm1.normalized_shape[0], 8, 8)
    emb_a, emb_b = torch.randn(2, block.emb.in_features), torch.randn(2, block.emb.in_features)
    assert not torch.allclose(block(x, emb_a), block(x, emb_b))
    with pytest.raises(ValueError, match="pass emb"):
        block(x)


def test_unet_starts_at_zero_and_conditions_on_gamma_and_class():
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["iunet_tiny"], num_classes=3)
    model = UNet(cfg)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x, torch.rand(2), torch.tensor([0, 1]))[0], torch.zeros_like(x))  # zero-init output conv
    with torch.no_grad():  # zero-initialised residual branches hide the embedding: give every layer weights
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gamma, labels = torch.tensor([0.3, 0.3]), torch.tensor([0, 0])
    base = model(x[:1].repeat(2, 1, 1, 1), gamma, labels)[0]
    assert torch.allclose(base[0], base[1])
    assert not torch.allclose(model(x[:1].repeat(2, 1, 1, 1), torch.tensor([0.3, 0.9]), labels)[0][1], base[1])
    assert not torch.allclose(model(x[:1].repeat(2, 1, 1, 1), gamma, torch.tensor([0, 2]))[0][1], base[1])
    with pytest.raises(ValueError, match="pass labels"):
        model(x, gamma)


def test_unet_refuses_self_conditioning():
    with pytest.raises(ValueError, match="train.self_cond_rate to 0"):
        UNet(dataclasses.replace(PRESETS["unet_tiny"], self_cond=True))


# --- the inception mixer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim,ratio,head,d_h,d_l",
    [
        (64, 0.5, 8, 32, 32),
        (64, 0.75, 16, 48, 16),
        (96, 2 / 3, 32, 64, 32),
        (128, 1.0, 32, 128, 0),
        (128, 0.0, 32, 0, 128),
        (384, 0.25, 32, 96, 288),
    ],
)
def test_mixer_sends_d_h_channels_to_local_mixing_and_the_rest_to_global_attention(dim, ratio, head, d_h, d_l):
    """What the split does, seen from outside: a bump at one pixel of one of the first d_h input channels changes
    the output only within the 5x5 window the high branches (3x3 conv or 3x3 max-pool, then the fusion's 3x3 conv)
    can reach; a bump in any of the d_l others reaches every position (pooled self-attention)."""
    assert split_channels(dim, ratio, head) == (d_h, d_l)
    torch.manual_seed(0)
    mixer = InceptionMixer(dim, ratio, head, pool=2).eval()
    x = torch.randn(1, dim, 8, 8)
    bumped = x.repeat(dim + 1, 1, 1, 1)  # example c < dim: input channel c raised at pixel (1, 1); the last: x
    bumped[torch.arange(dim), torch.arange(dim), 1, 1] += 10.0  # + 10: also the max of its 3x3 pooling window
    with torch.no_grad():
        out = mixer(bumped)
    assert out.shape == (dim + 1, dim, 8, 8)
    # (dim, 8, 8): where bumping channel c changed any output channel (beyond float rounding, ~1e-7; changes ~1e-2)
    reach = (out[:dim] - out[dim:]).abs().amax(dim=1) > 1e-5
    window = torch.zeros(8, 8, dtype=torch.bool)
    window[:4, :4] = True  # rows and columns 1 - 2 .. 1 + 2, clipped at the border
    local = [bool(reach[c, 1, 1]) and not reach[c][~window].any() for c in range(dim)]
    assert sum(local) == d_h, f"{sum(local)} channels mixed locally, expected d_h = {d_h}"
    assert local == [True] * d_h + [False] * d_l  # [Y_h; Y_l]: the high mixer takes the first d_h channels
    assert reach[d_h:].flatten(1).all(), "a low-frequency channel did not reach every position"


@pytest.mark.parametrize(
    "dim,ratio,head,message",
    [
        (128, 0.6, 32, r"not a whole number of 32-channel heads; nearest valid ratios: 0\.5, 0\.75"),
        (96, 0.5, 32, r"nearest valid ratios: 0\.333333, 0\.666667"),
        (12, 0.25, 3, r"d_h = 3, which cannot be halved"),
        (64, 1.2, 8, r"must lie in \[0, 1\]"),
        (64, 0.5, 24, r"head width 24 must divide the block width 64"),
    ],
)
def test_bad_ratios_are_refused_with_the_valid_neighbours(dim, ratio, head, message):
    with pytest.raises(ValueError, match=message):
        split_channels(dim, ratio, head)


def test_low_mixer_is_low_pass_and_block_starts_as_identity():
    torch.manual_seed(0)
    low = LowMixer(16, heads=2, pool=2)
    y = low(torch.randn(1, 16, 8, 8))
    assert torch.equal(y, y[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3))  # constant on 2x2 cells
    with pytest.raises(ValueError, match="pool size 2 must divide the feature map 7x7"):
        low(torch.randn(1, 16, 7, 7))
    block = IFormerBlock(32, 0.5, 8, pool=2, mlp_ratio=2.0)
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(block(x), x)


# --- intervals, routing, soft assignment -------------------------------------------------------------------------


@pytest.mark.parametrize("count", [4, 6])
def test_owner_at_interval_boundaries(count):
    bounds = torch.tensor([n / count for n in range(1, count)])
    assert owner(torch.tensor([0.0]), count).item() == 1  # t = 0 goes to expert 1
    assert owner(torch.tensor([1.0]), count).item() == count
    assert owner(bounds, count).tolist() == list(range(1, count))  # t = n/N is expert n's (closed on the right)
    after = torch.nextafter(bounds, torch.ones_like(bounds))
    assert owner(after, count).tolist() == list(range(2, count + 1))


@pytest.mark.parametrize("schedule", [COSINE, SIGMOID, LINEAR])
def test_router_by_noise_level_agrees_with_owner_of_t(schedule):
    count = 4
    router = MultiExpert([torch.nn.Identity() for _ in range(count)], Schedule(schedule))
    t = torch.cat([torch.tensor([n / count for n in range(count + 1)]), torch.rand(500, generator=torch.Generator())])
    t = torch.cat([t, t[1:count] + 1e-4])  # just past a boundary (one ulp of t can leave gamma unchanged)
    gamma = Schedule(schedule)(t)
    assert torch.equal(router.route(gamma) + 1, owner(t, count))


@pytest.mark.parametrize("n,p", [(1, 0.8), (2, 0.4), (3, 0.2), (4, 0.1), (4, 1.0), (2, 0.0)])
def test_soft_assignment_frequencies_match_p(n, p):
    count, draws = 4, 40_000
    t = draw_t(torch.Generator().manual_seed(1234), draws, n, count, p)
    assert t.min() >= 0 and t.max() <= 1
    interval = owner(t, count)
    rate = own_interval_rate(count, p)  # p + (1 - p) / N
    sigma = math.sqrt(rate * (1 - rate) / draws)
    assert abs((interval == n).float().mean().item() - rate) <= 5 * sigma + 1e-12
    for other in set(range(1, count + 1)) - {n}:  # the rest is uniform over the whole range
        share, want = (interval == other).float().mean().item(), (1 - p) / count
        assert abs(share - want) <= 5 * math.sqrt(want * (1 - want) / draws) + 1e-12
    assert torch.equal(t, draw_t(torch.Generator().manual_seed(1234), draws, n, count, p))  # pure in the seed


def test_draws_stay_inside_the_open_end_of_the_interval():
    # u close to 1 would round (n - u) / N onto the boundary (n - 1) / N, which belongs to the previous expert.
    t = draw_t(torch.Generator().manual_seed(0), 200_000, 4, 4, 1.0)
    assert (owner(t, 4) == 4).all()


def test_noise_draw_with_and_without_an_expert():
    shape = (16, 1, 4, 4)
    plain = NoiseDraw.draw(step_generator(3, 7), shape)
    g = step_generator(3, 7)
    assert torch.equal(plain.t, torch.rand(16, generator=g))  # RIN's draw order is unchanged: t, eps, u
    assert torch.equal(plain.eps, torch.randn(shape, generator=g))
    expert = NoiseDraw.draw(step_generator(3, 7), shape, lambda gen, b: draw_t(gen, b, 2, 4, 1.0))
    assert ((expert.t > 0.25) & (expert.t <= 0.5)).all()
    again = NoiseDraw.draw(step_generator(3, 7), shape, lambda gen, b: draw_t(gen, b, 2, 4, 1.0))
    assert torch.equal(expert.t, again.t) and torch.equal(expert.eps, again.eps)  # a function of (seed, step)


# --- the router at sampling time ---------------------------------------------------------------------------------


class Spy(torch.nn.Module):
    """An expert that records the noise levels it is called with and answers with its own number."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.calls = k, []

    def forward(self, x, gamma, labels=None, state=None):
        self.calls.append(gamma.clone())
        return torch.full_like(x, float(self.k)), None


@pytest.mark.parametrize("steps", [8, 12])
def test_sampling_calls_each_expert_exactly_on_its_interval(steps):
    count = 4
    spies = [Spy(k) for k in range(count)]
    router = MultiExpert(spies, Schedule(COSINE))  # trained and sampled with the same schedule
    sample(router, (1, 4, 4), [0, 1, 2], sample_config(steps=steps, schedule=COSINE), "x0")
    gammas = Schedule(COSINE)(torch.tensor([t for t, _ in time_pairs(steps)]))
    expected = owner(torch.tensor([t for t, _ in time_pairs(steps)]), count) - 1
    for k, spy in enumerate(spies):
        seen = [g[0].item() for g in spy.calls]
        assert seen == [g.item() for g, e in zip(gammas, expected) if e == k], k
        assert all(len(set(g.tolist())) == 1 and len(g) == 3 for g in spy.calls)  # whole batch, one expert
    assert sum(len(s.calls) for s in spies) == steps


def test_router_uses_the_training_schedule_when_sampling_with_another():
    count = 4
    spies = [Spy(k) for k in range(count)]
    train = Schedule(SIGMOID)
    router = MultiExpert(spies, train)
    sample(router, (1, 4, 4), [0], sample_config(steps=40, schedule=LINEAR), "x0")
    edges = [1.0, *train(torch.tensor([n / count for n in range(1, count)])).tolist(), 0.0]
    for k, spy in enumerate(spies):  # expert k+1 sees only noise levels it was trained on
        assert spy.calls and all(edges[k + 1] <= g.item() < edges[k] or (k == 0 and g.item() == 1) for g in spy.calls)


def test_mixed_batch_is_split_between_experts():
    router = MultiExpert([Spy(k) for k in range(4)], Schedule(COSINE))
    t = torch.tensor([0.1, 0.9, 0.5, 0.51, 0.0, 0.75])
    out, state = router(torch.zeros(6, 1, 2, 2), Schedule(COSINE)(t))
    assert out[:, 0, 0, 0].tolist() == (owner(t, 4) - 1).float().tolist() and state is None


# --- configuration and the end-to-end path -----------------------------------------------------------------------


def tiny_meme_params(tmp_path, p=(0.8, 0.4)) -> dict:
    """params.yaml with a two-expert tiny MEME on synthetic MNIST-style digits (no other runs)."""
    raw = yaml.safe_load(open("params.yaml"))
    raw["datasets"]["fashion_mnist"] |= {"root": str(tmp_path / "raw"), "shard_size": 32}
    train = {
        "steps": 3,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 1e-3,
        "warmup_steps": 1,
        "precision": "fp32",
        "log_every": 1,
        "checkpoint_every": 3,
        "sample_every": 0,
        "ema_decay": 0.9,
        "data": "memory",
        "self_cond_rate": 0.0,
    }
    expert = {"dataset": "fashion_mnist", "diffusion": {"prediction": "v"}}
    raw["runs"] = {}
    raw["experts"] = {
        "tiny_e1": expert
        | {
            "model": {"family": "meme", "preset": "iunet_tiny"},
            "train": train | {"expert": {"index": 1, "count": 2, "p": p[0]}},
        },
        "tiny_e2": expert
        | {
            "model": {"family": "meme", "preset": "iunet_tiny", "overrides": {"iformer_ratios": [0.5, 0.0]}},
            "train": train | {"expert": {"index": 2, "count": 2, "p": p[1]}},
        },
    }
    raw["ensembles"] = {
        "tiny_meme": expert
        | {
            "model": {"family": "meme", "preset": "multi_expert", "experts": ["tiny_e1", "tiny_e2"]},
            "train": {"self_cond_rate": 0.0, "precision": "fp32"},
            "sample": {"steps": 4, "num_samples": 6, "batch_size": 4},
            "eval": {},
        },
    }
    raw["evaluation"]["report"] = {}
    raw["evaluation"]["fourier"]["runs"] = []
    return raw




@pytest.mark.parametrize(
    "path,value,message",
    [
        (
            "experts.tiny_e1.train.expert",
            {"index": 3, "count": 2, "p": 0.5},
            r"experts\.tiny_e1\.train\.expert: expert\.index must be <= expert\.count",
        ),
        (
            "experts.tiny_e1.train.expert",
            {"index": 1, "count": 2, "p": 1.5},
            r"experts\.tiny_e1\.train\.expert\.p must be >= 0 and <= 1, got 1\.5",
        ),
        ("experts.tiny_e1.train.expert", {"index": 1, "count": 2}, r"missing key experts\.tiny_e1\.train\.expert\.p"),
        (
            "ensembles.tiny_meme.model.experts",
            ["tiny_e2", "tiny_e1"],
            r"experts\[0\]: run 'tiny_e2' must train expert 1 of 2 .* it has train\.expert index 2 of count 2",
        ),
        ("ensembles.tiny_meme.model.experts", ["tiny_e1", "nope"], r"model\.experts names no run 'nope'"),
        (
            "experts.tiny_e2.diffusion",
            {"prediction": "eps"},
            r"experts\[1\]: run 'tiny_e2' has diffusion\.prediction 'eps'",
        ),
        (
            "experts.tiny_e1.train.self_cond_rate",
            0.9,
            r"experts\.tiny_e1\.model: a U-Net has no latent state .*train\.self_cond_rate to 0",
        ),
        ("experts.tiny_e1.model.experts", ["tiny_e2"], r"experts\.tiny_e1\.model\.experts is set: a multi-expert run"),
        ("ensembles.tiny_meme.model.preset", "iunet_tiny", r"ensembles\.tiny_meme\.model\.experts lists the expert"),
        ("ensembles.tiny_meme.model.experts", [], r"ensembles\.tiny_meme\.model\.experts is empty"),
    ],
)
def test_expert_config_errors_name_the_key(tmp_path, path, value, message):
    raw = tiny_meme_params(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_checked(with_key(raw, path, value))


def test_expert_runs_resolve_and_fingerprint_their_assignment(tmp_path):
    params = parse_params(tiny_meme_params(tmp_path))
    meme = params.run("tiny_meme")
    assert [e.name for e in meme.experts] == ["tiny_e1", "tiny_e2"]
    e1 = params.run("tiny_e1")
    t = time_sampler(e1.train.expert)(torch.Generator().manual_seed(0), 1000)
    assert 0.8 < ((t > 0) & (t <= 0.5)).float().mean().item()  # p + (1 - p) / 2 = 0.9
    assert time_sampler(load_params().run("rin_fmnist").train.expert) is None
    other = parse_params(tiny_meme_params(tmp_path, p=(0.5, 0.4))).run("tiny_e1")
    assert training_fingerprint(other) != training_fingerprint(e1)  # a new p restarts training


def test_tiny_meme_trains_and_samples_end_to_end(tmp_path, capsys):
    from data.prepare import write_dataset_shards
    from diffusion.stages.evaluate import model_cost

    make_idx_dataset(tmp_path / "raw", 48, 8)
    raw = tiny_meme_params(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)
    shards, outputs = tmp_path / "shards", tmp_path / "outputs"
    write_dataset_shards(params.datasets["fashion_mnist"], "fashion_mnist", shards, splits=("train",))
    base = ["--params", str(params_file)]
    for name in ("tiny_e1", "tiny_e2"):
        assert (
            cli.main(
                [
                    *base,
                    "train",
                    name,
                    "--out",
                    str(outputs / name / "train"),
                    "--shards",
                    str(shards),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        assert (outputs / name / "train" / "ema.safetensors").exists()
    assert cli.main([*base, "train", "tiny_meme", "--shards", str(shards), "--out", str(tmp_path / "x"),
                     "--device", "cpu"]) == 2
    assert "multi-expert run and trains nothing itself" in capsys.readouterr().err
    out = tmp_path / "samples"
    assert (
        cli.main([*base, "sample", "tiny_meme", "--weights", str(outputs / "tiny_e1" / "train"),
                  str(outputs / "tiny_e2" / "train"), "--shards", str(shards), "--out", str(out), "--device", "cpu"])
        == 0
    )
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (6, 32, 32, 1) and z["arr_0"].dtype == np.uint8
        assert len({z["arr_0"][i].tobytes() for i in range(6)}) == 6
    cost = model_cost(out / "cost.json")  # the sample stage's count of a MEME: all experts' params, one expert's FLOPs
    num_params, gflops = cost["model_params"], cost["gflops_per_image"]
    experts = [dataclasses.replace(PRESETS["iunet_tiny"], iformer_ratios=r) for r in [(0.5, 0.25), (0.5, 0.0)]]
    assert num_params == sum(n_params(UNet(c)) for c in experts) and gflops > 0
