"""Samplers: per-image seeds make samples independent of the batch; every DDPM and DDIM step against the papers'
step rules, written out here in float64 numpy (Ho et al. 2020 Eq. 7 for DDPM's posterior mean, Song et al. 2021
Eq. 12 for DDIM), on a fixed nonlinear stand-in for the network."""

import math

import numpy as np
import pytest
import torch

from diffusion.sampling import sample, time_pairs
from tests.helpers import sample_config, tiny_rin


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_rin(data_shape=(16, 16)).eval()


@pytest.mark.parametrize(
    "sampler,variance,td", [("ddpm", "large", 0.0), ("ddpm", "small", 0.5), ("ddim", "large", 0.0)]
)
def test_same_seed_same_image_whatever_the_batch(model, sampler, variance, td):
    cfg = sample_config(sampler=sampler, variance=variance, td=td, eta=0.5 if sampler == "ddim" else 0.0, steps=6)
    alone = sample(model, (1, 16, 16), [7], cfg, "eps")
    mixed = sample(model, (1, 16, 16), [3, 7, 11], cfg, "eps")
    other = sample(model, (1, 16, 16), [7, 100, 101, 102, 103], cfg, "eps")
    torch.testing.assert_close(mixed[1:2], alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(other[0:1], alone, atol=1e-4, rtol=0)
    assert (mixed[0] - mixed[1]).abs().mean() > 0.05  # different seeds give different images


def test_sampling_builds_no_autograd_graph(model):
    """A sampling loop that records its graph keeps every step's activations: at the default run's batch of 256 the
    U-Net's took all 24 GB of this machine's memory. The weights require grad here, as a trained model's do."""
    assert all(p.requires_grad for p in model.parameters())
    seen = []

    class Watch(torch.nn.Module):
        def forward(self, x_t, gamma, labels=None, state=None):
            seen.append(torch.is_grad_enabled())
            return model(x_t, gamma, labels, state)

    out = sample(Watch(), (1, 16, 16), [0, 1], sample_config(steps=3), "eps")
    assert seen == [False] * 3 and not out.requires_grad and out.grad_fn is None


def test_state_is_carried_between_steps():
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x_t, gamma, labels=None, state=None):
            calls.append(None if state is None else state.clone())
            new = torch.full((x_t.shape[0], 2), float(len(calls)))
            return torch.zeros_like(x_t), new

    sample(Recorder(), (1, 4, 4), [0, 1], sample_config(steps=4), "eps")
    assert calls[0] is None
    assert [c[0, 0].item() for c in calls[1:]] == [1.0, 2.0, 3.0]


def test_time_pairs_cover_unit_interval():
    pairs = time_pairs(10)
    assert pairs[0] == (1.0, 0.9) and pairs[-1][1] == 0.0 and len(pairs) == 10
    td = time_pairs(10, td=1.0)
    assert td[0][1] == pytest.approx(0.8) and all(n <= c for c, n in td)


# ---- the step rules against an oracle ----

GAMMA_FLOOR = 1e-9  # the schedule's clip (schedules.GAMMA_MIN), restated: at t = 1 the cosine is 0


def cosine_gamma(t: float) -> float:
    """alpha_bar(t) of the sampling schedule used here: cos(pi t / 2)^2 (Nichol & Dhariwal 2021, s = 0)."""
    return max(math.cos(math.pi * t / 2) ** 2, GAMMA_FLOOR)


def oracle_times(steps: int, td: float) -> list[tuple[float, float]]:
    return [(1 - i / steps, max(1 - (i + 1 + td) / steps, 0.0)) for i in range(steps)]


def split(prediction: str, out: np.ndarray, x: np.ndarray, g: float) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from a network output: x_t = sqrt(g) x0 + sqrt(1-g) eps, v = sqrt(g) eps - sqrt(1-g) x0."""
    if prediction == "eps":
        return (x - math.sqrt(1 - g) * out) / math.sqrt(g), out
    if prediction == "x0":
        return out, (x - math.sqrt(g) * out) / math.sqrt(1 - g)
    return math.sqrt(g) * x - math.sqrt(1 - g) * out, math.sqrt(1 - g) * x + math.sqrt(g) * out


def oracle_ddpm(x, x0, g, g_prev, z, variance):
    """Ho et al. 2020: the posterior q(x_{t-1} | x_t, x0) of Eq. 6-7 with alpha_t = g / g_prev, sampled with
    sigma^2 = beta_t (large) or beta~_t = (1 - g_prev) / (1 - g) beta_t (small)."""
    alpha = g / g_prev
    beta = 1 - alpha
    mean = math.sqrt(g_prev) * beta / (1 - g) * x0 + math.sqrt(alpha) * (1 - g_prev) / (1 - g) * x
    var = beta if variance == "large" else (1 - g_prev) / (1 - g) * beta
    return mean + math.sqrt(var) * z


def oracle_ddim(x0, eps, g, g_prev, z, eta):
    """Song et al. 2021 Eq. 12 with sigma from Eq. 16."""
    sigma = eta * math.sqrt((1 - g_prev) / (1 - g)) * math.sqrt(1 - g / g_prev)
    return math.sqrt(g_prev) * x0 + math.sqrt(1 - g_prev - sigma**2) * eps + sigma * z


def stand_in(x_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear "network" output, different at every pixel and noise level."""
    return 0.8 * torch.tanh(x_t) + 0.3 * torch.cos(3 * x_t) * gamma.view(-1, 1, 1, 1) - 0.1


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def forward(self, x_t, gamma, labels=None, state=None):
        out = stand_in(x_t, gamma)
        self.calls.append((x_t.double().numpy().copy(), gamma.double().numpy().copy(), out.double().numpy().copy()))
        return out, None


def trajectory(seeds, shape, steps, sampler, variance="large", eta=0.0, clip=True, td=0.0, prediction="eps"):
    cfg = sample_config(sampler=sampler, variance=variance, eta=eta, clip_x0=clip, td=td, steps=steps)
    net = Recorder()
    out = sample(net, shape, seeds, cfg, prediction)
    return net.calls, out.double().numpy()


def seed_noise(seeds, shape, count: int) -> list[np.ndarray]:
    """What each image's own generator draws, in order: x_T, then one standard normal per noisy step."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return [torch.stack([torch.randn(shape, generator=g) for g in gens]).double().numpy() for _ in range(count)]


def oracle_step(sampler, x, out, g, g_prev, z, prediction, variance, eta, clip):
    x0, eps = split(prediction, out, x, g)
    if clip:
        x0 = np.clip(x0, -1, 1)
        eps = (x - math.sqrt(g) * x0) / math.sqrt(1 - g)
    if sampler == "ddpm":
        return oracle_ddpm(x, x0, g, g_prev, z, variance)
    return oracle_ddim(x0, eps, g, g_prev, z, eta)


def worst_step_error(calls, final, seeds, shape, steps, sampler, variance="large", eta=0.0, clip=True, td=0.0,
                     prediction="eps") -> float:
    """Largest difference, in units of the tolerance, between each recorded step (and the final output) and the
    oracle's step from the same x_t and network output: < 1 passes."""
    times = oracle_times(steps, td)
    noisy = sampler == "ddpm" or eta > 0
    draws = seed_noise(seeds, shape, 1 + (len(times) - 1 if noisy else 0))
    np.testing.assert_array_equal(calls[0][0], draws[0])  # x_T is the seed's first draw
    worst = 0.0
    for k, (t, t_prev) in enumerate(times):
        x, gamma, out = calls[k]
        g = cosine_gamma(t)
        np.testing.assert_allclose(gamma, g, rtol=1e-6)
        if t_prev == 0.0:  # the last step returns the x0 estimate, as an image in [-1, 1]
            x0 = split(prediction, out, x, g)[0]
            want, got = np.clip(np.clip(x0, -1, 1) if clip else x0, -1, 1), final
        else:
            z = draws[1 + k] if noisy else np.zeros_like(x)
            want = oracle_step(sampler, x, out, g, cosine_gamma(t_prev), z, prediction, variance, eta, clip)
            got = calls[k + 1][0]
        # float32 rounding; out of t = 1 (gamma at its 1e-9 floor) the code's forms cancel nearly equal terms
        # (DDPM's Eq. 11: x_t - c eps over sqrt(alpha) ~ 1e-4; DDIM's sqrt(1 - g_prev - sigma^2) at eta = 1), which
        # magnifies it to ~1e-3 (measured: 9e-4 at 4 steps)
        atol = 3e-3 if g == GAMMA_FLOOR else 1e-5
        worst = max(worst, float(np.max(np.abs(got - want) / (atol + 1e-5 * np.abs(want)))))
    return worst


SHAPE = (1, 4, 4)
SEEDS = [5, 17]


@pytest.mark.parametrize("variance", ["large", "small"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_steps_follow_ho_et_al(variance, clip, prediction):
    calls, final = trajectory(SEEDS, SHAPE, 4, "ddpm", variance=variance, clip=clip, prediction=prediction)
    assert len(calls) == 4
    assert worst_step_error(calls, final, SEEDS, SHAPE, 4, "ddpm", variance=variance, clip=clip,
                            prediction=prediction) < 1


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_steps_follow_song_et_al(eta, clip):
    calls, final = trajectory(SEEDS, SHAPE, 4, "ddim", eta=eta, clip=clip)
    assert worst_step_error(calls, final, SEEDS, SHAPE, 4, "ddim", eta=eta, clip=clip) < 1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_time_difference_shifts_the_step_target(sampler):
    calls, final = trajectory(SEEDS, SHAPE, 5, sampler, eta=0.3, td=0.5)
    assert worst_step_error(calls, final, SEEDS, SHAPE, 5, sampler, eta=0.3, td=0.5) < 1


def test_ddpm_and_ddim_follow_different_rules():
    """Each sampler's steps match its own rule and miss the other's by far: the old check (two calls give two
    results) passed for any pair of deterministic-per-seed samplers."""
    for sampler, other in (("ddpm", "ddim"), ("ddim", "ddpm")):
        calls, final = trajectory(SEEDS, SHAPE, 4, sampler)
        assert worst_step_error(calls, final, SEEDS, SHAPE, 4, sampler) < 1
        assert worst_step_error(calls, final, SEEDS, SHAPE, 4, other) > 100, sampler


def test_ddim_with_eta_1_is_ddpm_with_the_posterior_variance():
    """Song et al. 2021 Sec. 4.1: sigma = sqrt(beta~) (eta = 1) makes DDIM's process DDPM's; same seeds, same noise."""
    net = Recorder()
    ddim = sample(net, SHAPE, SEEDS, sample_config(sampler="ddim", eta=1.0, steps=6), "eps")
    ddpm = sample(net, SHAPE, SEEDS, sample_config(sampler="ddpm", variance="small", steps=6), "eps")
    large = sample(net, SHAPE, SEEDS, sample_config(sampler="ddpm", variance="large", steps=6), "eps")
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=2e-3)  # the first step's float32 rounding (see above)
    assert (large - ddpm).abs().max() > 5e-2  # beta_t differs from beta~_t: the variance matters here


def test_per_image_noise_lands_on_the_device_asked():
    from diffusion.sampling import per_image_noise

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    assert per_image_noise(gens, (1, 2, 2), torch.device("meta")).device.type == "meta"


def test_the_labels_of_a_class_conditional_draw_are_pinned_and_apart_from_the_noise():
    """sample_labels draws image i's class from seed i in a stream of its own: the classes of committed
    class-conditional samples stay reproducible across versions (recorded once from this code), they are balanced,
    and a label is not the first draw of the torch stream that makes the image's noise (the defect mutmut found:
    seed + 2^40 as a torch seed is the noise stream's own seed, so every label was that draw)."""
    import torch

    from diffusion.sampling import sample_labels

    assert sample_labels(list(range(20)), 10).tolist() == [9, 6, 1, 6, 5, 6, 6, 1, 1, 5, 9, 0, 0, 2, 7, 1, 2, 9, 7, 1]
    seeds = list(range(2000))
    labels = sample_labels(seeds, 10)
    noise_stream = torch.tensor([int(torch.randint(10, (1,), generator=torch.Generator().manual_seed(s)))
                                 for s in seeds])  # each image's first noise draw
    assert (labels == noise_stream).float().mean() < 0.15  # independent streams agree 1 time in 10
    assert torch.bincount(labels, minlength=10).min() > 150  # 200 expected per class
    assert sample_labels([7, 3], 10).tolist() == sample_labels([3, 7], 10).flip(0).tolist()  # batch-independent
    assert sample_labels(seeds, 0) is None
