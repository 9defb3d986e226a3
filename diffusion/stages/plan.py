"""`python -m diffusion.cli plan RUN --gpus N [--tflops T] [--json]`: what a run costs before it starts. Training
compute (counted FLOPs of one example's forward and backward, plus the self-conditioning pass, x batch x steps; an
ensemble: the sum over its experts), sampling compute (samples x steps x one denoiser call), memory per device and
the wall time at an assumed achieved throughput per device. Models are counted on the meta device: no memory, no
compute, seconds even for the paper's models. A command for people; the paper-scale flows print it first."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from diffusion import registry
from diffusion.args import parser
from diffusion.config import ConfigError, Params, RunConfig, load_params
from diffusion.flops import run_cost, train_flops_per_example

STATE_BYTES = {"adamw": 8, "lamb": 8}  # optimiser state per parameter (two fp32 moments)
WEIGHT_BYTES = 4 + 4 + 4  # fp32 weights, their gradient and the EMA copy, per parameter


@dataclass(frozen=True)
class Plan:
    run: str
    gpus: int
    tflops: float  # assumed achieved TFLOP/s per device
    params: int
    train_pflop: float
    sample_pflop: float
    train_hours: float
    sample_hours: float
    memory_gib: float  # per device: weights, gradients, EMA, optimiser state, activations of its share of the batch
    activation_gib: float
    lines: tuple[str, ...]  # the counts, one line each

    def text(self) -> str:
        return "\n".join(self.lines)


def _num(x: float) -> str:
    """Three significant figures, without an exponent: 0.115, 4.3, 1,320, 27,300."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def plan(params: Params, run: RunConfig, gpus: int, tflops: float) -> Plan:
    """Count a run (an ensemble: its experts) and turn the counts into hours on `gpus` devices at `tflops` each."""
    if gpus < 1 or tflops <= 0:
        raise ConfigError(f"plan: --gpus must be >= 1 and --tflops > 0, got {gpus} and {tflops}")
    trained = list(run.experts) if run.experts else [run]
    lines = [f"{run.params_key}: {run.dataset_name}, model {run.model.family}/{run.model.preset}"]
    train_flops, memory, act_max, params_total = 0.0, 0.0, 0.0, 0
    forward = []
    for r in trained:
        cost = run_cost(r)
        per_example = train_flops_per_example(r, cost)
        sc = per_example - cost.train_flops
        total = per_example * r.train.batch_size * r.train.steps
        train_flops += total
        params_total += cost.params
        forward.append(cost.forward_flops)
        per_device = -(-r.train.batch_size // gpus)
        act = cost.activation_bytes * per_device
        mem = cost.params * (WEIGHT_BYTES + STATE_BYTES[r.train.optimizer]) + act
        memory, act_max = max(memory, mem), max(act_max, act)
        lines.append(
            f"  train {r.name}: {cost.params / 1e6:.2f}M params; {cost.forward_flops / 1e9:.2f} GFLOP per forward, "
            f"{per_example / 1e9:.2f} GFLOP per training example (forward + backward"
            + (f" + self-conditioning pass at rate {r.train.self_cond_rate}" if sc else "") + f"); x batch "
            f"{r.train.batch_size} x {r.train.steps} steps = {_num(total / 1e15)} PFLOP")
    sampled = run.section != "experts"
    sample_flops = (sum(forward) / len(forward)) * run.sample.num_samples * run.sample.steps if sampled else 0.0
    if sampled:
        lines.append(f"  sample: {run.sample.num_samples} samples x {run.sample.steps} {run.sample.sampler} steps x "
                     f"{sum(forward) / len(forward) / 1e9:.2f} GFLOP per call"
                     + (" (the mean over the experts: each owns an equal share of the steps)" if run.experts else "")
                     + f" = {_num(sample_flops / 1e15)} PFLOP")
    rate = gpus * tflops * 1e12
    train_h, sample_h = train_flops / rate / 3600, sample_flops / rate / 3600
    gib = 2**30
    lines += [
        f"  memory per device: {memory / gib:.1f} GiB = weights, gradients and EMA in fp32 and the optimiser's two "
        f"moments ({params_total / 1e6:.1f}M params{' in all' if run.experts else ''}; the largest model counts) + "
        f"{act_max / gib:.1f} GiB of saved activations for {-(-trained[0].train.batch_size // gpus)} examples "
        "(fp32 count; bf16 autocast saves about half)",
        f"  time on {gpus} device(s) at an assumed {tflops:g} achieved TFLOP/s each (--tflops): training "
        f"{_num(train_h)} h ({_num(train_h / 24)} days), sampling {_num(sample_h)} h",
        "  FLOPs: torch's FlopCounterMode, 2 per multiply-add, attention matmuls included (a self-conditioned "
        "model's training pass with its warm-start MLP on the first pass's latents); the optimiser is not counted",
    ]
    return Plan(run.params_key, gpus, tflops, params_total, train_flops / 1e15, sample_flops / 1e15, train_h,
                sample_h, memory / gib, act_max / gib, tuple(lines))


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("plan", __doc__)
    p.add_argument("run", help="a run, expert or ensemble name (params.yaml, or its `paper` section)")
    p.add_argument("--gpus", type=int, default=1, help="devices the run trains and samples on (default: 1)")
    p.add_argument("--tflops", type=float, default=100.0,
                   help="achieved TFLOP/s per device to assume (default 100: ~1/3 of an A100's bf16 peak)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    params, run = load_params(args.params).any_run(args.run)
    registry.check(params, runs=[run.name, *(e.name for e in run.experts)])
    result = plan(params, run, args.gpus, args.tflops)
    print(json.dumps({k: v for k, v in vars(result).items() if k != "lines"}, indent=1) if args.json
          else result.text())
    return 0
