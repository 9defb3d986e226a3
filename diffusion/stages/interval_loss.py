"""The interval_loss stage (`python -m diffusion.cli interval_loss RUN --weights DIR ... --shards DIR --out FILE`): a
MEME ensemble's denoising loss on held-out images at noise levels inside each expert's interval, so each expert is
judged on the interval it owns (MEME's soft against hard assignment, README "The papers' claims").

The loss is the training objective (the run's prediction target, mean squared error) of the first `--images` test
images, noised with one fixed draw to K evenly spaced times inside each interval ((n-1)/N, n/N], the same times
and noise for every run: so two ensembles (or an ensemble and a single model, whose --weights is one folder) are
compared on identical inputs. interval n's value is expert n's, since the ensemble routes every t to its owner."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from data.batches import read_split
from diffusion.args import out_file, parser
from diffusion.checkpoint import load_trained, weight_files
from diffusion.config import ConfigError, load_params
from diffusion.distributed import autocast
from diffusion.images import from_uint8
from diffusion.io import write_text
from diffusion.objectives import q_sample, target
from diffusion.schedules import Schedule

POINTS_PER_INTERVAL = 4
NOISE_SEED = 1234  # the same draw for every run and t


def interval_times(count: int, points: int = POINTS_PER_INTERVAL) -> list[list[float]]:
    """For each of `count` intervals ((n-1)/N, n/N], `points` times at the midpoints of its equal parts."""
    return [[(n + (k + 0.5) / points) / count for k in range(points)] for n in range(count)]


@torch.no_grad()
def interval_losses(model: torch.nn.Module, run, x0: torch.Tensor, count: int, batch: int = 128) -> dict:
    """Loss per time and per interval (mean over its times) of `model` (an ensemble or one network) on x0."""
    schedule = Schedule((run.experts[0] if run.experts else run).diffusion.train_schedule)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    per_t: dict[str, float] = {}
    intervals = []
    for times in interval_times(count):
        values = []
        for t in times:
            total = 0.0
            for i in range(0, len(x0), batch):
                x, e = x0[i : i + batch], eps[i : i + batch]
                gamma = schedule(torch.full((len(x),), t))
                with autocast(run.train.precision, x.device):
                    pred, _ = model(q_sample(x, e, gamma), gamma, None, None)
                err = (pred.float() - target(run.diffusion.prediction, x, e, gamma)).pow(2)
                total += err.flatten(1).mean(1).sum().item()
            per_t[f"{t:g}"] = total / len(x0)
            values.append(per_t[f"{t:g}"])
        intervals.append(sum(values) / len(values))
    return {"per_t": per_t, "per_interval": intervals, "overall": sum(intervals) / len(intervals)}


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("interval_loss", __doc__)
    p.add_argument("run", help="an ensemble (or a run) of params.yaml")
    p.add_argument("--weights", nargs="+", required=True,
                   help="its train folders (an ensemble: each expert's, in order)")
    p.add_argument("--shards", required=True, help="the dataset's shard root (data/shards/<dataset>)")
    p.add_argument("--out", required=True, help="the JSON to write (outputs/<run>/eval/interval_loss.json)")
    p.add_argument("--images", type=int, default=512, help="test images (default 512)")
    args = p.parse_args(argv)
    run = load_params(args.params).run(args.run)
    if run.model.class_conditional or run.diffusion.context_frames or run.autoencoder is not None:
        raise ConfigError(f"interval_loss: {run.params_key} is class-conditional, a video or a latent run; the stage "
                          "scores unconditional pixel-space image runs")
    count = len(run.experts) or 4
    model = load_trained(run, weight_files(run, [Path(w) for w in args.weights]), "cpu")
    images, _ = read_split(run.dataset, args.shards, "test", limit=args.images, batch_size=256)
    result = interval_losses(model, run, from_uint8(images), count)
    result |= {"run": run.name, "images": len(images), "split": "test", "intervals": count,
               "times": interval_times(count), "noise_seed": NOISE_SEED, "prediction": run.diffusion.prediction}
    path = out_file(args.out)
    write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}: overall {result['overall']:.4f}, per interval "
          + ", ".join(f"{v:.4f}" for v in result["per_interval"]))
    return 0
