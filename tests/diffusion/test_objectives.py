"""x0 / eps / v conversions and the training loss."""

import pytest
import torch

from diffusion.config import ScheduleConfig
from diffusion.objectives import NoiseDraw, diffusion_loss, from_x0_eps, q_sample, target, to_x0_eps
from diffusion.schedules import Schedule


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    gamma = torch.tensor([1e-4, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.9999], dtype=torch.float64)
    return x0, eps, gamma


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_round_trip(batch, kind):
    x0, eps, gamma = batch
    x_t = q_sample(x0, eps, gamma)
    out = from_x0_eps(kind, x0, eps, gamma)
    x0_hat, eps_hat = to_x0_eps(kind, out, x_t, gamma)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-6, atol=1e-6)


def test_v_definition(batch):
    x0, eps, gamma = batch
    g = gamma.view(-1, 1, 1, 1)
    torch.testing.assert_close(target("v", x0, eps, gamma), g.sqrt() * eps - (1 - g).sqrt() * x0)


def test_clipping_keeps_pair_consistent(batch):
    x0, eps, gamma = batch
    x_t = q_sample(x0 * 3, eps, gamma)  # x0 outside [-1, 1]
    x0_hat, eps_hat = to_x0_eps("eps", eps, x_t, gamma, clip_x0=True)
    assert x0_hat.abs().max() <= 1
    torch.testing.assert_close(q_sample(x0_hat, eps_hat, gamma), x_t)


class Oracle(torch.nn.Module):
    """Predicts the exact target from knowledge of x0 (possible only in a test)."""

    def __init__(self, x0, kind):
        super().__init__()
        self.x0, self.kind = x0, kind

    def forward(self, x_t, gamma, labels=None, state=None):
        g = gamma.view(-1, 1, 1, 1)
        eps = (x_t - g.sqrt() * self.x0) / (1 - g).sqrt()
        return target(self.kind, self.x0, eps, gamma), None


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_loss_zero_for_perfect_prediction(kind):
    x0 = torch.rand(16, 1, 8, 8, dtype=torch.float64) * 2 - 1
    sched = Schedule(ScheduleConfig("cosine", 0, 0.95, 1))  # keep gamma away from 1e-9 for float accuracy
    noise = NoiseDraw.draw(torch.Generator().manual_seed(1), x0.shape)
    noise = NoiseDraw(noise.t, noise.eps.double(), noise.u)
    loss = diffusion_loss(Oracle(x0, kind), x0, None, sched, kind, 0.0, noise)
    assert loss.shape == (16,)
    assert loss.max().item() < 1e-12
    wrong = diffusion_loss(Oracle(-x0, kind), x0, None, sched, kind, 0.0, noise)
    assert wrong.mean().item() > 1e-3


def test_a_noise_draw_is_t_then_eps_then_u_from_its_generator_alone_and_draw_t_replaces_t():
    """One training step's draws come from the step's generator in a fixed order (t, eps, u), whatever the global
    RNG holds, so a resumed or re-sharded run draws the same noise; `draw_t` (a MEME expert's interval draw) gets the
    generator and the batch size, and its t is the one used."""
    shape = (3, 2, 4, 4)  # batch != channels: a length taken from the wrong axis shows
    g = torch.Generator().manual_seed(5)
    want_t, want_eps, want_u = torch.rand(3, generator=g), torch.randn(shape, generator=g), torch.rand(3, generator=g)
    torch.manual_seed(123)
    noise = NoiseDraw.draw(torch.Generator().manual_seed(5), shape)
    assert torch.equal(noise.t, want_t) and torch.equal(noise.eps, want_eps) and torch.equal(noise.u, want_u)

    calls = []

    def draw_t(generator, n):
        calls.append((generator, n))
        return torch.rand(n, generator=generator) * 0 + 0.25

    gen = torch.Generator().manual_seed(5)
    noise = NoiseDraw.draw(gen, shape, draw_t)
    assert calls == [(gen, 3)] and torch.equal(noise.t, torch.full((3,), 0.25))
    assert torch.equal(noise.eps, want_eps) and torch.equal(noise.u, want_u)


def test_self_conditionings_first_pass_sees_the_labels_and_keeps_only_the_chosen_rows():
    from diffusion.objectives import self_conditioning_state

    seen = []

    def denoiser(x_t, gamma, labels=None, state=None):
        seen.append((labels, state))
        return x_t, torch.ones(x_t.shape[0], 3)

    x_t, gamma, labels = torch.zeros(2, 1, 4, 4), torch.full((2,), 0.5), torch.tensor([3, 7])
    state = self_conditioning_state(denoiser, x_t, gamma, labels, torch.tensor([True, False]))
    assert seen[0][0] is labels and seen[0][1] is None  # class-conditional: the first pass is for the same labels
    assert torch.equal(state, torch.tensor([[1.0, 1, 1], [0, 0, 0]]))
    assert self_conditioning_state(denoiser, x_t, gamma, labels, None) is None and len(seen) == 1
    with pytest.raises(AssertionError, match="^self_cond_rate > 0 needs a denoiser that returns a state$"):
        self_conditioning_state(lambda *a: (a[0], None), x_t, gamma, labels, torch.tensor([True, True]))


def test_a_noise_draw_moves_every_part_to_the_device_asked():
    noise = NoiseDraw.draw(torch.Generator().manual_seed(0), (2, 1, 4, 4)).to(torch.device("meta"))
    assert {noise.t.device.type, noise.eps.device.type, noise.u.device.type} == {"meta"}


def test_the_loss_passes_the_labels_to_both_passes_and_scores_only_the_predicted_frames():
    """Class-conditional training sees its labels in the self-conditioning pass and the loss pass; with context
    frames, x_t starts with the clean context (one frame is enough) and the loss covers the other frames only."""
    seen = []

    def denoiser(x_t, gamma, labels=None, state=None):
        seen.append((x_t.clone(), labels))
        out = torch.zeros_like(x_t)
        out[:, :, :1] = 100.0  # a wrong prediction on the first frame only: counted iff that frame is scored
        return out, torch.ones(x_t.shape[0], 2)

    x0 = torch.rand(2, 1, 3, 4, 4) * 2 - 1  # (B, C, T, H, W)
    labels = torch.tensor([1, 2])
    noise = NoiseDraw(torch.full((2,), 0.5), torch.randn(2, 1, 3, 4, 4), torch.zeros(2))
    sched = Schedule(ScheduleConfig("cosine", 0.0, 1.0, 1.0))
    loss = diffusion_loss(denoiser, x0, labels, sched, "x0", 0.5, noise, context_frames=1)
    assert len(seen) == 2 and all(seen_labels is labels for _, seen_labels in seen)
    assert torch.equal(seen[1][0][:, :, :1], x0[:, :, :1]) and not torch.equal(seen[1][0][:, :, 1:], x0[:, :, 1:])
    torch.testing.assert_close(loss, x0[:, :, 1:].square().flatten(1).mean(1))  # frames 1..2, the output 0 there
    seen.clear()
    whole = diffusion_loss(denoiser, x0, labels, sched, "x0", 0.0, noise)
    assert len(seen) == 1 and not torch.equal(seen[0][0][:, :, :1], x0[:, :, :1]) and (whole > 1000).all()


def test_x0_is_clipped_only_when_asked():
    x_t, gamma = torch.zeros(1, 1, 2, 2), torch.full((1,), 0.5)
    x0, _ = to_x0_eps("x0", torch.full((1, 1, 2, 2), 3.0), x_t, gamma)
    assert (x0 == 3.0).all()
    assert (to_x0_eps("x0", torch.full((1, 1, 2, 2), 3.0), x_t, gamma, clip_x0=True)[0] == 1.0).all()


def test_broadcast_rates_and_context_frames_take_the_dtype_of_what_they_join():
    """Under bf16 autocast gamma (float32) multiplies bf16 images: it is cast to theirs, as the clean context frames
    are cast to x_t's, so nothing is silently promoted to a wider dtype."""
    from diffusion.objectives import _bcast, with_context

    like = torch.zeros(2, 1, 4, 4, dtype=torch.bfloat16)
    assert _bcast(torch.tensor([0.3, 0.7]), like).dtype == torch.bfloat16
    x_t = torch.zeros(2, 1, 3, 4, 4)
    assert with_context(x_t, torch.ones(2, 1, 1, 4, 4, dtype=torch.float64)).dtype == torch.float32
