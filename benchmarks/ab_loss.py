"""Paired A/B of a run's variants: per-noise-level test loss after the same data order, noise draws and initial
seed, so the difference between arms is the change and not the luck of the draw.

Each arm is the run from params.yaml with dotted overrides of its section (model.overrides.* keys add to the run's
own model overrides); train.steps is --steps unless the arm sets it (to compare at equal training time rather than
equal steps), and each arm completes its own LR schedule. After training, the EMA weights are scored on the first
--images test images at fixed noise levels gamma with one fixed eps per image: the mean squared error in the run's
prediction space (v, eps or x0), one pass with no self-conditioning state. Lower is better; it is a proxy for
sample quality, not FID.

    python benchmarks/ab_loss.py rin_fmnist --shards data/shards/fashion_mnist --steps 1000 \
        --arm base \
        --arm wide=model.overrides.interface_dim=192,model.overrides.interface_mlp_ratio=4.0 \
        --out benchmarks/results/ab_rin_fmnist.json

Needs data/shards/<dataset> (`dvc repro shard@<dataset>`).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml

from data.batches import read_split, training_source
from diffusion.config import ConfigError, parse_params
from diffusion.distributed import Dist, autocast
from diffusion.images import from_uint8
from diffusion.objectives import q_sample, target
from diffusion.trainer import Trainer
from diffusion.typed import set_dotted

GAMMAS = (0.99, 0.9, 0.5, 0.1, 0.01)  # low noise -> high noise
CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets, so list values stay whole: 'a=[2,2],b=1' -> ['a=[2,2]', 'b=1']."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def _scalar(text: str):
    """A YAML value, with numbers such as 1e-3 (a string to YAML 1.1) read as floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_arm(text: str) -> tuple[str, dict]:
    """'name=a.b=1,c=x' -> ('name', {'a.b': 1, 'c': 'x'}): dotted keys of the run's section, YAML scalar values."""
    name, _, rest = text.partition("=")
    over: dict = {}
    for item in filter(None, _split_top(rest)):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--arm {text!r}: {item!r} is not key=value (e.g. train.lr=0.001)")
        over[key] = _scalar(value)
    return name, over


def arm_run(raw: dict, run_name: str, over: dict, steps: int):
    """The run with the arm's dotted keys set in its section: a model.overrides.* key adds to the run's own
    overrides (set key by key), and train.steps is `steps` unless the arm sets it (e.g. for equal training time)."""
    section = next((s for s in ("runs", "experts") if run_name in raw.get(s, {})), None)
    if section is None:
        raise SystemExit(f"params.yaml has no run {run_name!r}")
    steps = over.get("train.steps", steps)
    keys = over | {"train.steps": steps, "train.checkpoint_every": steps, "train.sample_every": 0}
    try:
        return parse_params(set_dotted(raw, {f"{section}.{run_name}.{k}": v for k, v in keys.items()})).run(run_name)
    except ConfigError as e:
        raise SystemExit(f"an --arm override is invalid: {e}") from None


@torch.no_grad()
def test_loss(model, run, x0: torch.Tensor, gammas: tuple[float, ...], batch: int = 128) -> dict[str, float]:
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
    out = {}
    for g in gammas:
        total = 0.0
        for i in range(0, len(x0), batch):
            x, e = x0[i : i + batch], eps[i : i + batch]
            gamma = torch.full((len(x),), g)
            with autocast(run.train.precision, CPU.device):
                pred, _ = model(q_sample(x, e, gamma), gamma, None, None)
            err = (pred.float() - target(run.diffusion.prediction, x, e, gamma)).pow(2)
            total += err.flatten(1).mean(1).sum().item()
        out[str(g)] = total / len(x0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--arm", action="append", required=True, help="NAME or NAME=key=value,... (dotted, in the run)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--images", type=int, default=256, help="test images scored per noise level")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--shards", required=True, help="the run's shard folder (data/shards/<dataset>)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.params).read_text())
    arms = [parse_arm(a) for a in args.arm]
    results, test_images = [], {}  # test images per shard folder, loaded once
    for name, over in arms:
        run = arm_run(raw, args.run, over, args.steps)
        if run.model.class_conditional or run.diffusion.context_frames or run.train.expert is not None:
            raise SystemExit(f"{args.run}: only unconditional image runs are supported here")
        shards = args.shards
        if shards not in test_images:
            test_images[shards] = from_uint8(read_split(run.dataset, shards, "test", limit=args.images)[0])
        x0 = test_images[shards]
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(run, Path(tmp), CPU)
            start = time.perf_counter()
            result = trainer.fit(training_source(run.dataset, run.train, shards))
            seconds = time.perf_counter() - start
            losses = test_loss(trainer.ema.module.eval(), run, x0, GAMMAS)
        row = {"arm": name, "overrides": over, "steps": run.train.steps, "final_train_loss": result.final_loss,
               "train_seconds": seconds, "images_per_s": result.images_per_s, "test_loss": losses,
               "test_loss_mean": sum(losses.values()) / len(losses),
               "params": sum(q.numel() for q in trainer.model.parameters())}
        results.append(row)
        print(json.dumps(row))
    report = {"run": args.run, "steps": args.steps, "test_images": args.images, "gammas": list(GAMMAS),
              "metric": f"EMA weights, mean squared error in {run.diffusion.prediction}-space, one pass without "
                        "self-conditioning state, fixed eps per image (proxy, not FID)",
              "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "arms": results}
    out = args.out or Path(f"benchmarks/results/ab_{args.run}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
