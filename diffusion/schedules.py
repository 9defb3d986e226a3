"""Continuous-time noise schedules gamma(t) = alpha_bar(t), falling from 1 at t=0 to 0 at t=1.

Formulas follow pix2seq `diffusion_utils` (RIN, Jabri et al. 2023, Sec. 3 and App. B):
x_t = sqrt(gamma(t)) x_0 + sqrt(1 - gamma(t)) eps.
"""

from __future__ import annotations

import math

import torch

from diffusion.config import ScheduleConfig

GAMMA_MIN = 1e-9  # gamma is clipped to [GAMMA_MIN, 1] so that sqrt(gamma) and 1/sqrt(gamma) stay finite


def cosine(t: torch.Tensor, start: float = 0.0, end: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """cos(pi/2 * s)^(2 tau) over s = start + t (end - start), rescaled to run from 1 to 0."""
    power = 2.0 * tau
    v_start = math.cos(start * math.pi / 2) ** power
    v_end = math.cos(end * math.pi / 2) ** power
    v = torch.cos((t * (end - start) + start) * math.pi / 2) ** power
    return ((v_end - v) / (v_end - v_start)).clamp(GAMMA_MIN, 1.0)


def sigmoid(t: torch.Tensor, start: float = -3.0, end: float = 3.0, tau: float = 0.9) -> torch.Tensor:
    """gamma = (-sig((t (end - start) + start) / tau) + sig(end / tau)) / (sig(end / tau) - sig(start / tau))."""
    v_start = 1.0 / (1.0 + math.exp(-start / tau))
    v_end = 1.0 / (1.0 + math.exp(-end / tau))
    v = torch.sigmoid((t * (end - start) + start) / tau)
    return ((v_end - v) / (v_end - v_start)).clamp(GAMMA_MIN, 1.0)


def linear(t: torch.Tensor) -> torch.Tensor:
    return (1.0 - t).clamp(GAMMA_MIN, 1.0)


LDM_STEPS = 1000  # LDM's (and DDPM's) number of discrete timesteps


def ldm(t: torch.Tensor, start: float = 0.0015, end: float = 0.0195) -> torch.Tensor:
    """LDM's discrete "linear" schedule made continuous: betas with sqrt(beta) linear from start to end over 1000
    steps (latent-diffusion make_beta_schedule), gamma at t = k / 1000 is alpha_bar after k steps (LDM's timestep
    index k - 1), and log gamma is linear in t between those points."""
    betas = torch.linspace(start**0.5, end**0.5, LDM_STEPS, dtype=torch.float64) ** 2
    log_gamma = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-betas), 0)])
    pos = t.to(torch.float64).clamp(0.0, 1.0) * LDM_STEPS
    lo = pos.floor().clamp(max=LDM_STEPS - 1)
    frac = pos - lo
    lo = lo.long()
    out = torch.exp(log_gamma[lo] * (1 - frac) + log_gamma[lo + 1] * frac)
    return out.to(t.dtype if t.is_floating_point() else torch.float32).clamp(GAMMA_MIN, 1.0)


class Schedule:
    """gamma(t) for a ScheduleConfig; call it on a tensor of times in [0, 1]."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64) if t.dtype == torch.float64 else t.float()
        if self.cfg.kind == "cosine":
            return cosine(t, self.cfg.start, self.cfg.end, self.cfg.tau)
        if self.cfg.kind == "sigmoid":
            return sigmoid(t, self.cfg.start, self.cfg.end, self.cfg.tau)
        if self.cfg.kind == "ldm":
            return ldm(t, self.cfg.start, self.cfg.end)
        return linear(t)

    def __repr__(self) -> str:
        c = self.cfg
        return f"Schedule({c.kind}, start={c.start}, end={c.end}, tau={c.tau})"
