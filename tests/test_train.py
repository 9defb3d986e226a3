"""Training: a tiny RIN overfits a small batch of real Fashion-MNIST images; LR schedule; LAMB; NaN guard."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.config import ScheduleConfig, load_params
from diffusion.data import load_idx_split
from diffusion.objectives import diffusion_loss
from diffusion.optim import Lamb, lr_factor
from diffusion.schedules import Schedule
from diffusion.train import ArrayBatches, TrainingDiverged, pad_to, train_step
from tests.helpers import tiny_rin

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def real_batch(n: int) -> torch.Tensor:
    if not FMNIST.exists():
        pytest.skip("Fashion-MNIST idx files not installed (apt-get install dataset-fashion-mnist)")
    images, _ = load_idx_split(FMNIST, "test")
    x = torch.from_numpy(pad_to(images[:n], 32)).float()[:, None] / 127.5 - 1
    return x  # (n, 1, 32, 32) in [-1, 1]


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("lamb", marks=pytest.mark.slow)])
def test_tiny_rin_overfits_a_real_batch(optimizer):
    torch.manual_seed(0)
    x0 = real_batch(8)
    model = tiny_rin()
    sched = Schedule(ScheduleConfig("sigmoid", -3, 3, 0.9))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3) if optimizer == "adamw" else Lamb(params, lr=2e-2)

    def loss_fixed_noise():  # the same (t, eps) draws every step: the batch can be memorised
        return diffusion_loss(model, x0, None, sched, "eps", 0.5, torch.Generator().manual_seed(0)).mean()

    with torch.no_grad():
        first = loss_fixed_noise().item()
    for _ in range(200):
        loss = loss_fixed_noise()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_fixed_noise().item()
    assert last < first / 10, (first, last)


def test_lr_warmup_then_cosine():
    cfg = load_params().run("rin_fmnist").train
    assert lr_factor(0, cfg) == pytest.approx(1 / cfg.warmup_steps)
    assert lr_factor(cfg.warmup_steps - 1, cfg) == pytest.approx(1.0)
    mid = cfg.warmup_steps + (cfg.steps - cfg.warmup_steps) // 2
    assert lr_factor(mid, cfg) == pytest.approx(0.5, abs=0.01)
    assert lr_factor(cfg.steps, cfg) == pytest.approx(0.0, abs=1e-9)


def test_lamb_trust_ratio_scales_update_to_weight_norm():
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))  # ||w|| = 8
    opt = Lamb([w], lr=0.1)
    w.grad = torch.ones(4, 4) * 1e-3
    opt.step()
    # Adam's first update is sign(grad) with norm 4; the trust ratio 8/4 makes the step lr * ||w|| = 0.8 in norm.
    assert (torch.full((4, 4), 2.0) - w.detach()).norm().item() == pytest.approx(0.8, rel=1e-4)


def test_nan_loss_stops_with_clear_error():
    run = load_params().run("rin_fmnist")
    model = tiny_rin()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    bad = (torch.full((2, 1, 32, 32), math.nan), torch.zeros(2, dtype=torch.long))
    sched = Schedule(run.diffusion.train_schedule)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        train_step(model, bad, opt, run, sched, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched


def test_array_batches_scale_and_shuffle():
    images = np.arange(10 * 4 * 4, dtype=np.uint8).reshape(10, 4, 4) * 1
    images[:, 0, 0] = 255
    labels = np.arange(10)
    it = iter(ArrayBatches(images, labels, 5, seed=0, random_flip=False))
    x1, y1 = next(it)
    x2, y2 = next(it)
    assert x1.shape == (5, 1, 4, 4) and x1.max() == 1.0 and x1.min() >= -1
    assert sorted(torch.cat([y1, y2]).tolist()) == list(range(10))  # one epoch covers every image once
