"""gamma(t) schedules against their closed forms, endpoints, monotonicity and clipping."""

import math

import pytest
import torch

from diffusion.config import ScheduleConfig
from diffusion.schedules import GAMMA_MIN, Schedule

T = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("start,end,tau", [(-3, 3, 0.9), (-3, 3, 1.1), (0, 3, 0.5), (-2, 5, 1.0)])
def test_sigmoid_matches_closed_form(start, end, tau):
    sched = Schedule(ScheduleConfig("sigmoid", start, end, tau))
    for t in T.tolist():
        want = (-_sig((t * (end - start) + start) / tau) + _sig(end / tau)) / (_sig(end / tau) - _sig(start / tau))
        want = min(max(want, GAMMA_MIN), 1.0)
        assert sched(torch.tensor([t], dtype=torch.float64)).item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_cosine_and_linear_closed_forms():
    cos = Schedule(ScheduleConfig("cosine", 0.0, 1.0, 1.0))
    lin = Schedule(ScheduleConfig("linear", 0.0, 1.0, 1.0))
    for t in T.tolist()[1:-1]:
        x = torch.tensor([t], dtype=torch.float64)
        assert cos(x).item() == pytest.approx(math.cos(t * math.pi / 2) ** 2, rel=1e-9)
        assert lin(x).item() == pytest.approx(1 - t, rel=1e-12)


@pytest.mark.parametrize(
    "cfg",
    [ScheduleConfig("sigmoid", -3, 3, 0.9), ScheduleConfig("sigmoid", 0, 3, 0.3), ScheduleConfig("cosine", 0, 1, 1),
     ScheduleConfig("cosine", 0.2, 1, 1), ScheduleConfig("linear", 0, 1, 1)],
)
def test_endpoints_monotone_and_clipped(cfg):
    sched = Schedule(cfg)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    g = sched(t)
    assert g[0].item() == pytest.approx(1.0, abs=1e-12)
    assert g[-1].item() == GAMMA_MIN  # clipped, never exactly 0
    assert torch.all(g[1:] <= g[:-1])  # non-increasing
    assert torch.all(g[1:-1] < 1) and torch.all(g >= GAMMA_MIN) and torch.all(g <= 1)


def test_float32_input_stays_in_range():
    g = Schedule(ScheduleConfig("sigmoid", -3, 3, 0.9))(torch.rand(1000))
    assert g.dtype == torch.float32 and torch.all((g >= GAMMA_MIN) & (g <= 1))


def test_ldm_schedule_is_ldms_alpha_bar_at_every_step():
    """kind ldm at t = k / 1000 is alpha_bar after k of LDM's 1000 steps (betas: sqrt-linear from 0.0015 to
    0.0195, the FFHQ / CelebA-HQ configs), computed here by the discrete product; between steps it stays between
    its neighbours, and it falls monotonically."""
    betas = [(0.0015**0.5 + (0.0195**0.5 - 0.0015**0.5) * i / 999) ** 2 for i in range(1000)]
    alpha_bar = [1.0]
    for b in betas:
        alpha_bar.append(alpha_bar[-1] * (1 - b))
    sched = Schedule(ScheduleConfig("ldm", 0.0015, 0.0195, 1.0))
    k = torch.arange(1001, dtype=torch.float64)
    got = sched(k / 1000)
    assert got.tolist() == pytest.approx(alpha_bar, rel=1e-9)
    mid = sched((k[:-1] + 0.5) / 1000)
    assert torch.all(mid < got[:-1]) and torch.all(mid > got[1:])
    assert sched(torch.tensor([0.25])).item() == pytest.approx(alpha_bar[250], rel=1e-5)  # float32 input


@pytest.mark.parametrize("start,end", [(0.0, 0.02), (0.02, 0.0015), (0.0015, 1.0)])
def test_ldm_schedule_refuses_betas_out_of_range(start, end):
    with pytest.raises(ValueError, match="ldm schedule needs betas|end must be > schedule.start"):
        ScheduleConfig("ldm", start, end, 1.0)


def test_ldm_defaults_are_the_ldm_configs_betas():
    from diffusion.schedules import ldm

    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(ldm(t), ldm(t, 0.0015, 0.0195))


def test_times_outside_0_1_are_the_endpoints():
    """A time below 0 is t = 0 (gamma 1), above 1 is t = 1: nothing extrapolates past the schedule's ends."""
    from diffusion.schedules import ldm, linear

    t = torch.tensor([-0.5, 0.0, 1.0, 1.5], dtype=torch.float64)
    for gamma in (ldm(t), linear(t)):
        assert gamma[0] == gamma[1] == 1.0 and gamma[3] == gamma[2] and 0 < gamma[2] < 1


def test_ldm_is_clipped_at_gamma_min_and_keeps_a_float_dtype():
    from diffusion.schedules import ldm

    assert ldm(torch.tensor([1.0], dtype=torch.float64), 0.5, 0.5).item() == GAMMA_MIN  # 0.5^1000 underflows
    assert ldm(torch.tensor([0.5])).dtype == torch.float32
    ints = ldm(torch.tensor([0, 1]))  # integer times: gamma as float32, not truncated to 0 / 1
    assert ints.dtype == torch.float32 and torch.equal(ints, ldm(torch.tensor([0.0, 1.0])))


def test_ldm_on_float32_times_is_the_float64_schedule_rounded_once():
    """The interpolation runs in float64 whatever the input: float32 times give float64's gamma, rounded to float32."""
    from diffusion.schedules import ldm

    t = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ldm(t), ldm(t.double()).float())


def test_schedule_repr_names_its_settings():
    sched = Schedule(ScheduleConfig("sigmoid", -3.0, 3.0, 0.9))
    assert repr(sched) == "Schedule(sigmoid, start=-3.0, end=3.0, tau=0.9)"


def test_cosine_and_sigmoid_defaults_and_off_default_settings_follow_their_closed_forms():
    """cosine: gamma = (v(end) - v(s)) / (v(end) - v(start)), v = cos(pi s / 2)^(2 tau), s = start + t (end - start),
    here with start > 0, end < 1 and tau != 1 (where v(1) ~ 0 and tau = 1 hide a wrong power); the functions'
    defaults are the paper's (cosine 0, 1, 1; sigmoid -3, 3, 0.9)."""
    from diffusion.schedules import cosine, sigmoid

    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    assert torch.equal(cosine(t), cosine(t, 0.0, 1.0, 1.0)) and torch.equal(sigmoid(t), sigmoid(t, -3.0, 3.0, 0.9))
    for start, end, tau in [(0.2, 0.8, 0.7), (0.0, 0.9, 2.0)]:
        def v(s, tau=tau):
            return math.cos(math.pi * s / 2) ** (2 * tau)

        want = [(v(end) - v(start + x * (end - start))) / (v(end) - v(start)) for x in t.tolist()]
        got = Schedule(ScheduleConfig("cosine", start, end, tau))(t)
        assert got.tolist() == pytest.approx([min(max(w, GAMMA_MIN), 1.0) for w in want], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("cfg", [ScheduleConfig("cosine", 0.2, 1.0, 1.0), ScheduleConfig("sigmoid", -3.0, 3.0, 0.9)])
def test_times_before_0_are_gamma_1(cfg):
    assert Schedule(cfg)(torch.tensor([-0.2, 0.0], dtype=torch.float64)).tolist() == [1.0, 1.0]


def test_an_ldm_schedule_uses_both_of_its_betas():
    from diffusion.schedules import ldm

    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    assert torch.equal(Schedule(ScheduleConfig("ldm", 0.001, 0.02, 1.0))(t), ldm(t, 0.001, 0.02))
