"""Samplers: per-image seeds make samples independent of the batch; DDIM(eta=0) is deterministic."""

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


def test_ddim_eta0_deterministic_and_ddpm_stochastic(model):
    cfg = sample_config(sampler="ddim", eta=0.0, steps=5)
    a = sample(model, (1, 16, 16), [1, 2], cfg, "eps")
    b = sample(model, (1, 16, 16), [1, 2], cfg, "eps")
    assert torch.equal(a, b)
    # DDIM with eta=0 uses only the initial noise: reseeding the step noise cannot matter, unlike DDPM.
    ddpm = sample_config(sampler="ddpm", steps=5)
    assert not torch.equal(sample(model, (1, 16, 16), [1], ddpm, "eps"), a[:1])


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


def test_output_in_range_and_clipped(model):
    out = sample(model, (1, 16, 16), [0, 1, 2], sample_config(steps=3), "eps")
    assert out.shape == (3, 1, 16, 16) and out.abs().max() <= 1
