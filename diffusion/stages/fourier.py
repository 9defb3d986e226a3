"""The fourier stage: MEME's frequency figure (diffusion/metrics/fourier.py) for the runs of params.yaml
evaluation.fourier: `python -m diffusion.cli fourier --weights NAME=DIR ... --shards DATASET=DIR ... --out DIR`, with
one train folder per network (an ensemble: each of its experts, by the expert's name) and one shard root per dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from data.batches import read_split
from diffusion import registry
from diffusion.args import named_paths, out_folder, parser
from diffusion.checkpoint import first_stage, load_trained, weight_files
from diffusion.config import ConfigError, RunConfig, load_params
from diffusion.images import from_uint8
from diffusion.metrics import fourier
from diffusion.schedules import Schedule


def train_dirs(run: RunConfig, weights: dict[str, Path]) -> list[Path]:
    """The train folders of the run's networks (an ensemble: its experts'), from the --weights pairs."""
    names = [e.name for e in run.experts] or [run.name]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ConfigError(f"fourier: --weights has no train folder for {missing} (needed by {run.params_key}); pass "
                          f"{missing[0]}=outputs/{missing[0]}/train")
    return [weights[n] for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("fourier", __doc__)
    p.add_argument("--weights", nargs="+", required=True, metavar="NAME=DIR",
                   help="train folder of every network the analysed runs use, e.g. "
                        "unet_fmnist=outputs/unet_fmnist/train")
    p.add_argument("--shards", nargs="+", required=True, metavar="DATASET=DIR",
                   help="shard root of each dataset of the analysed runs, e.g. fashion_mnist=data/shards/fashion_mnist")
    p.add_argument("--out", required=True, help="folder of fourier.json and fourier.png (outputs/fourier)")
    args = p.parse_args(argv)
    weights, shards = named_paths(args.weights, "--weights"), named_paths(args.shards, "--shards")
    params = load_params(args.params)
    registry.check(params)
    cfg = params.evaluation.fourier
    if cfg is None:
        raise ConfigError("params.yaml: evaluation.fourier is missing: give {runs: [...], t: [...], split: test, "
                          "num_images: N, seed: 0}")
    spectra = {}
    for name in cfg.runs:
        run = params.run(name)
        if run.dataset_name not in shards:
            raise ConfigError(f"fourier: --shards has no shard root for dataset {run.dataset_name!r} (of {name})")
        root = shards[run.dataset_name]
        model = load_trained(run, weight_files(run, train_dirs(run, weights)), "cpu")
        images, labels = read_split(run.dataset, root, cfg.split, limit=cfg.num_images, batch_size=256)
        x0 = from_uint8(images)  # (n, C, H, W) in [-1, 1]
        decoder = first_stage(run, root, "cpu")
        if decoder is not None:  # a latent run denoises latents
            x0 = decoder.encode(x0)
        schedule = Schedule((run.experts[0] if run.experts else run).diffusion.train_schedule)  # what it trained on
        y = torch.from_numpy(labels) if run.model.class_conditional else None
        spectra[name] = fourier.analyse(model, x0, cfg.t, schedule, cfg.seed, y)
    out = out_folder(args.out)
    meta = {"t": list(cfg.t), "split": cfg.split, "num_images": cfg.num_images, "seed": cfg.seed,
            "measure": "mean over images and channels of log(|FFT2(h)| + 1e-6) per radial frequency bin, minus its "
                       "value at frequency 0"}
    fourier.write_json(out / "fourier.json", spectra, meta)
    fourier.plot(spectra, cfg.t, out / "fourier.png")
    print(f"wrote {out / 'fourier.json'} and {out / 'fourier.png'}")
    return 0

