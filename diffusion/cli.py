"""Stage entry points: `python -m diffusion.cli {flops,shard,train,sample} ...` (the commands dvc.yaml runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusion.config import ConfigError, load_params

OUTPUTS = Path("outputs")


def cmd_flops(args: argparse.Namespace) -> int:
    from diffusion.flops import denoiser_cost
    from diffusion.registry import all_presets, build

    table = all_presets()
    names = sorted(table) if args.preset == "all" else [args.preset]
    rows = []
    for name in names:
        if name not in table:
            print(f"unknown preset {name!r}; choose from {sorted(table)} or 'all'", file=sys.stderr)
            return 2
        cfg = table[name]
        cost = denoiser_cost(build(cfg), cfg.data_shape, cfg.channels, cfg.num_classes)
        attn = sum(v for k, v in cost.by_op.items() if "bmm" in k)
        rows.append({"preset": name, "params": cost.params, "params_M": round(cost.params / 1e6, 2),
                     "gflops_per_image": round(cost.gflops, 3), "attention_gflops": round(attn / 1e9, 3),
                     "data_shape": list(cfg.data_shape), "patch": list(cfg.patch), "tokens": cfg.num_tokens})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'preset':<16}{'params':>10}{'GFLOPs/img':>12}{'of which attn':>15}  shape / patch / tokens")
        for r in rows:
            print(f"{r['preset']:<16}{r['params_M']:>9.2f}M{r['gflops_per_image']:>12.3f}{r['attention_gflops']:>15.3f}"
                  f"  {r['data_shape']} / {r['patch']} / {r['tokens']}")
        print("GFLOPs: forward pass, one image, no self-conditioning input; 2 FLOPs per multiply-add.")
    return 0


def _training_arrays(run, split: str):
    from diffusion.data import load_idx_split
    from diffusion.train import pad_to

    if run.dataset.source not in ("mnist", "fashion_mnist"):
        raise ConfigError(f"dataset source {run.dataset.source!r} needs its shards; run the shard stage first")
    images, labels = load_idx_split(run.dataset.root, split)
    return pad_to(images, run.dataset.resolution), labels


def cmd_train(args: argparse.Namespace) -> int:
    from diffusion.train import ArrayBatches, train

    run = load_params(args.params).run(args.run)
    images, labels = _training_arrays(run, "train")
    batches = ArrayBatches(images, labels, run.train.batch_size, run.train.seed, run.dataset.random_flip)
    out = Path(args.out or OUTPUTS / run.name / "train")
    result = train(run, iter(batches), out)
    print(f"trained {run.name}: {result.steps} steps, final loss {result.final_loss:.4f}, "
          f"{result.images_per_s:.1f} img/s -> {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from diffusion.images import grid, save_png_atomic, to_uint8_nhwc
    from diffusion.registry import resolve_model
    from diffusion.sampling import sample
    from diffusion.train import autocast, load_weights

    run = load_params(args.params).run(args.run)
    train_dir = Path(args.weights or OUTPUTS / run.name / "train")
    weights = train_dir / ("ema.safetensors" if run.sample.use_ema else "model.safetensors")
    if not weights.exists():
        raise ConfigError(f"{weights}: no trained weights; run `python -m diffusion.cli train --run {run.name}` first")
    model = load_weights(run, weights)
    cfg = resolve_model(run)
    n = args.num_samples or run.sample.num_samples
    shape = (cfg.channels, *cfg.data_shape)
    chunks = []
    for start in range(0, n, run.sample.batch_size):
        seeds = [run.sample.seed + i for i in range(start, min(start + run.sample.batch_size, n))]
        labels = torch.tensor(seeds) % cfg.num_classes if cfg.num_classes else None
        with autocast(run.train.precision, torch.device("cpu")):
            chunks.append(to_uint8_nhwc(sample(model, shape, seeds, run.sample, run.diffusion.prediction,
                                               labels=labels, progress=True)))
    images = np.concatenate(chunks)
    out = Path(args.out or OUTPUTS / run.name / "samples")
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", arr_0=images)
    save_png_atomic(grid(images[:64]), out / "grid.png", scale=3)
    print(f"wrote {len(images)} samples to {out / 'samples.npz'} and a grid to {out / 'grid.png'}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from diffusion.data import write_dataset_shards

    params = load_params(args.params)
    if args.dataset not in params.datasets:
        raise ConfigError(f"params.yaml: no dataset named {args.dataset!r}; datasets are {sorted(params.datasets)}")
    write_dataset_shards(params.datasets[args.dataset], args.dataset, Path(args.out))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffusion.cli", description=__doc__)
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flops", help="parameter count and forward GFLOPs per image of a preset")
    f.add_argument("--preset", required=True, help="a preset name, or 'all'")
    f.add_argument("--json", action="store_true", help="print JSON instead of a table")
    f.set_defaults(fn=cmd_flops)
    s = sub.add_parser("shard", help="write a dataset's WebDataset shards and manifests")
    s.add_argument("--dataset", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_shard)
    t = sub.add_parser("train", help="train a run from params.yaml")
    t.add_argument("--run", required=True)
    t.add_argument("--out", help="output folder (default outputs/<run>/train)")
    t.set_defaults(fn=cmd_train)
    m = sub.add_parser("sample", help="draw samples from a trained run: samples.npz (ADM layout) + grid.png")
    m.add_argument("--run", required=True)
    m.add_argument("--weights", help="folder with model/ema.safetensors (default outputs/<run>/train)")
    m.add_argument("--out", help="output folder (default outputs/<run>/samples)")
    m.add_argument("--num-samples", type=int, help="override sample.num_samples")
    m.set_defaults(fn=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
