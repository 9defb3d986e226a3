"""The interval_loss stage's measure: times inside each expert's interval, mapped to noise levels by the run's
training schedule, and the loss grouped by interval (an oracle that is exact on one interval scores 0 there only)."""

from __future__ import annotations

import pytest
import torch

from diffusion.config import load_params
from diffusion.schedules import Schedule
from diffusion.stages.interval_loss import interval_losses, interval_times
from tests.diffusion.test_claims import REPO


def test_times_lie_evenly_inside_each_interval():
    times = interval_times(4, points=4)
    assert len(times) == 4 and all(len(t) == 4 for t in times)
    for n, ts in enumerate(times):
        assert all(n / 4 < t < (n + 1) / 4 for t in ts)
        assert ts == pytest.approx([n / 4 + (k + 0.5) / 16 for k in range(4)])


class OracleOn(torch.nn.Module):
    """Predicts v exactly (it knows x0) where t lies in [lo, hi), zeros elsewhere; t is read back from gamma."""

    def __init__(self, x0: torch.Tensor, schedule: Schedule, lo: float, hi: float):
        super().__init__()
        self.x0, self.lo, self.hi = x0, lo, hi
        grid = torch.linspace(0, 1, 10001)
        self.grid, self.gammas = grid, schedule(grid)

    def forward(self, x_t, gamma, y, state):
        t = self.grid[(self.gammas[None, :] - gamma[:, None]).abs().argmin(1)]
        x0 = self.x0[: len(x_t)]
        g = gamma.view(-1, 1, 1, 1)
        eps = (x_t - g.sqrt() * x0) / (1 - g).sqrt()
        v = g.sqrt() * eps - (1 - g).sqrt() * x0
        inside = ((t >= self.lo) & (t < self.hi)).view(-1, 1, 1, 1)
        return torch.where(inside, v, torch.zeros_like(v)), None


def test_an_oracle_on_one_interval_scores_zero_there_only():
    run = load_params(REPO / "params.yaml").ensembles["meme_fmnist"]
    schedule = Schedule(run.experts[0].diffusion.train_schedule)
    x0 = torch.rand(16, 1, 32, 32) * 2 - 1
    result = interval_losses(OracleOn(x0, schedule, 0.25, 0.5), run, x0, count=4, batch=16)
    losses = result["per_interval"]
    assert losses[1] == pytest.approx(0.0, abs=1e-4) and min(losses[0], losses[2], losses[3]) > 0.1
    assert result["overall"] == pytest.approx(sum(losses) / 4)
    assert len(result["per_t"]) == 16
