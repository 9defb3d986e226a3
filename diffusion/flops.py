"""Parameter and FLOP counts for any model, with attention counted.

FLOPs are torch's FlopCounterMode counts (2 per multiply-add). SDPA runs on its math backend while counting,
so the attention matmuls appear as bmm calls (the fused CPU kernel has no FLOP formula in torch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion import registry
from diffusion.config import RunConfig


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int  # forward FLOPs for the counted call (2 x MACs)
    by_op: dict[str, int]

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of calling fn() (backward passes included if fn runs them) and a per-operator breakdown."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op


def denoiser_cost(model: nn.Module, data_shape: tuple[int, ...], channels: int, num_classes: int = 0) -> Cost:
    """Parameters and forward FLOPs per example of one denoiser call (batch of 1, no previous state)."""
    model = model.eval()
    x = torch.zeros(1, channels, *data_shape)
    gamma = torch.full((1,), 0.5)
    labels = torch.zeros(1, dtype=torch.long) if num_classes else None
    with torch.no_grad():
        flops, by_op = count_flops(lambda: model(x, gamma, labels, None))
    return Cost(params=count_params(model), flops=flops, by_op=by_op)


@dataclass(frozen=True)
class StepCost:
    """What one training example and one sampling call cost, counted on the meta device (shapes only, no compute)."""

    params: int
    forward_flops: int  # one denoiser call, one example
    train_flops: int  # forward + backward of one example, with the previous latents of a self-conditioned model
    activation_bytes: int  # tensors autograd saves for the backward of one example, fp32 (a view counts as its base)


def step_cost(build: Callable[[], nn.Module], data_shape: tuple[int, ...], channels: int,
              num_classes: int = 0) -> StepCost:
    """Count a model that `build()` makes, without allocating it: it is built and run on the meta device."""
    with torch.device("meta"):
        model = build()
        x = torch.zeros(1, channels, *data_shape)
        gamma = torch.full((1,), 0.5)
        labels = torch.zeros(1, dtype=torch.long) if num_classes else None
    saved: dict[int, torch.Tensor] = {}  # id -> tensor (held, so that ids stay unique), a view counted as its base

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        saved[id(base)] = base
        return t

    model.eval()
    with torch.no_grad():
        forward_flops, _ = count_flops(lambda: model(x, gamma, labels, None))
        _, state = model(x, gamma, labels, None)  # a self-conditioned model's latents: its training pass reads them

    def forward_backward() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = model(x, gamma, labels, state)
        out.float().sum().backward()

    model.train()
    train_flops, _ = count_flops(forward_backward)
    activations = sum(t.numel() * t.element_size() for t in saved.values())
    return StepCost(count_params(model), forward_flops, train_flops, activations)


def run_cost(run: RunConfig) -> StepCost:
    """`step_cost` of a run's model (counted on the meta device, once per model configuration in a process: the plan
    of an ensemble and those of its experts share the count)."""
    return _model_cost(run.model.family, registry.resolve_model(run))


@functools.lru_cache(maxsize=256)
def _model_cost(family: str, cfg) -> StepCost:
    return step_cost(lambda: registry.build(family, cfg), cfg.data_shape, cfg.channels, cfg.num_classes)


def train_flops_per_example(run: RunConfig, cost: StepCost | None = None) -> int:
    """Training FLOPs of one example: forward + backward, plus the no-grad first pass when the run self-conditions
    (counted as a full forward). A latent run's autoencoder and the optimiser are not counted."""
    cost = cost or run_cost(run)
    return cost.train_flops + (cost.forward_flops if run.train.self_cond_rate > 0 else 0)
