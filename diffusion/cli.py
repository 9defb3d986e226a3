"""Stage entry points: `python -m diffusion.cli {flops,shard,autoencoder,train,sample,refstats,evaluate,fourier,
report} ...` (the commands dvc.yaml runs)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from diffusion.checkpoint import CheckpointError
from diffusion.config import ConfigError, load_params
from diffusion.shards import DataError
from diffusion.train import TrainingDiverged

OUTPUTS = Path("outputs")


def _describe_preset(cfg) -> str:
    """What sets a preset's cost besides its width: RIN's patches and tokens, a U-Net's levels (and iFormer ratios)."""
    if hasattr(cfg, "patch"):
        return f"patch {list(cfg.patch)}, {cfg.num_tokens} tokens"
    text = f"widths {list(cfg.widths)} x {cfg.num_res_blocks} res blocks"
    return text + (f", iFormer d_h/d {list(cfg.iformer_ratios)}" if cfg.iformer_ratios else "")


def cmd_flops(args: argparse.Namespace) -> int:
    from diffusion.flops import denoiser_cost
    from diffusion.registry import all_presets, build, paper_params

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
                     "paper_params": paper_params().get(name, ""), "gmacs_per_image": round(cost.gmacs, 3),
                     "gflops_per_image": round(cost.gflops, 3), "attention_gflops": round(attn / 1e9, 3),
                     "data_shape": [cfg.channels, *cfg.data_shape], "layout": _describe_preset(cfg)})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'preset':<16}{'params':>10}{'paper':>24}{'GMACs/img':>11}{'GFLOPs/img':>12}{'of which attn':>15}"
              "  shape, layout")
        for r in rows:
            print(f"{r['preset']:<16}{r['params_M']:>9.2f}M{r['paper_params']:>24}{r['gmacs_per_image']:>11.3f}"
                  f"{r['gflops_per_image']:>12.3f}{r['attention_gflops']:>15.3f}  {r['data_shape']}, {r['layout']}")
        print("Forward pass, one image, no self-conditioning input; 2 FLOPs per multiply-add (MAC).")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from diffusion import distributed
    from diffusion.sources import training_source
    from diffusion.train import Trainer, align_live

    run = load_params(args.params).run(args.run)
    if run.experts:
        raise ConfigError(f"{run.params_key} is a multi-expert run and trains nothing itself: train its experts "
                          f"({', '.join(e.name for e in run.experts)}), then sample it")
    d = distributed.init(args.device)
    out = Path(args.out or OUTPUTS / run.name / "train")
    shards = args.shards or f"data/shards/{run.dataset_name}"
    source = training_source(run, shards, d.rank, d.world_size)
    trainer = Trainer(run, out, d, _first_stage(run, shards, d.device))
    start = trainer.resume()
    live = None
    if d.is_main:
        from dvclive import Live

        align_live(out / "live", start)
        live = Live(dir=str(out / "live"), resume=True, save_dvc_exp=False, dvcyaml=False)
    try:
        result = trainer.fit(source, live=live)
        trainer.export(result)
    finally:
        if live is not None:
            live.end()
        distributed.shutdown(d)
    if d.is_main:
        print(f"trained {run.name}: steps {result.resumed_from}->{result.steps}, final loss {result.final_loss:.4f}, "
              f"{result.images_per_s:.1f} img/s on {d.world_size} process(es) -> {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from diffusion import distributed
    from diffusion.generate import context_clips, generate, sampling_fingerprint

    run = load_params(args.params).run(args.run)
    d = distributed.init(args.device)
    model, weights = _trained_model(run, Path(args.outputs), args.weights, d.device)
    out = Path(args.out or OUTPUTS / run.name / "samples")
    shards = args.shards or f"data/shards/{run.dataset_name}"
    context = context_clips(run, shards)
    first_stage = _first_stage(run, shards, d.device)
    if first_stage is not None:  # a latent run: its samples are decoded, and the decoder is part of the fingerprint
        weights = [*([weights] if isinstance(weights, Path) else weights), first_stage.path]
    try:
        npz = generate(run, model, out, d, sampling_fingerprint(run, weights), num_samples=args.num_samples,
                       context=context, decode=first_stage.decode if first_stage is not None else None)
    finally:
        distributed.shutdown(d)
    if npz is not None:
        print(f"wrote {npz} and {out / 'grid.png'}")
    return 0


def _first_stage(run, shards: str, device):
    """A latent run's autoencoder (meme.autoencoder.FirstStage), from <shards>/autoencoder.safetensors where its
    autoencoder stage put it; None for a run in pixel space."""
    if run.autoencoder is None:
        return None
    from meme.autoencoder import WEIGHTS, load_first_stage

    return load_first_stage(Path(shards) / WEIGHTS, run.autoencoder, run.dataset.channels).to(device)


def _trained_model(run, outputs: Path, weights_dir: str | None, device):
    """A run's trained denoiser (EMA weights when sample.use_ema) and its weight file(s): <outputs>/<run>/train/, or
    `weights_dir`; for a MEME ensemble, the router over <outputs>/<expert>/train/ of its experts."""
    if run.experts:
        return _multi_expert(run, outputs, device)
    from diffusion.train import load_weights

    train_dir = Path(weights_dir or outputs / run.name / "train")
    weights = train_dir / ("ema.safetensors" if run.sample.use_ema else "model.safetensors")
    if not weights.exists():
        raise ConfigError(f"{weights}: no trained weights; run `python -m diffusion.cli train {run.name}` first")
    return load_weights(run, weights, device), weights


def _multi_expert(run, outputs: Path, device):
    """A multi-expert run's router with each expert's trained weights, and the weight files (for the fingerprint)."""
    from diffusion.registry import resolve_model
    from meme.experts import expert_weight_files, load_multi_expert

    files = expert_weight_files([e.name for e in run.experts], outputs, run.sample.use_ema)
    for expert, path in zip(run.experts, files, strict=True):
        if not path.exists():
            raise ConfigError(f"{path}: no trained weights for expert run {expert.name}; run "
                              f"`python -m diffusion.cli train {expert.name}` first")
    return load_multi_expert(resolve_model(run), files, device), files


def cmd_autoencoder(args: argparse.Namespace) -> int:
    from meme.autoencoder import build_latent_dataset

    params = load_params(args.params)
    if args.name not in params.autoencoders:
        raise ConfigError(f"params.yaml: autoencoders has no entry {args.name!r}; it has {sorted(params.autoencoders)}")
    cfg = params.autoencoders[args.name]
    out = Path(args.out or f"data/shards/{args.name}")
    summary = build_latent_dataset(args.name, cfg, params.datasets[cfg.dataset],
                                   Path(args.source or f"data/shards/{cfg.dataset}"), out)
    err = summary["test"]
    print(f"{args.name}: latents {summary['latent_shape']}, scale {summary['latent_scale']:.3f}, test reconstruction "
          f"L1 {err['l1']:.4f}, PSNR {err['psnr_db']:.1f} dB -> {out}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from diffusion.data import write_dataset_shards

    params = load_params(args.params)
    if args.dataset not in params.datasets:
        raise ConfigError(f"params.yaml: no dataset named {args.dataset!r}; datasets are {sorted(params.datasets)}")
    write_dataset_shards(params.datasets[args.dataset], args.dataset, Path(args.out))
    return 0


def _weights_error(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def cmd_refstats(args: argparse.Namespace) -> int:
    from diffusion.evaluate import feature_network_for, write_refstats
    from diffusion.metrics import WeightsError

    params = load_params(args.params)
    if args.dataset not in params.evaluation.references:
        raise ConfigError(f"params.yaml: evaluation.references has no entry {args.dataset!r}; it has "
                          f"{sorted(params.evaluation.references)}")
    try:
        net = feature_network_for(params.datasets[args.dataset])
    except WeightsError as err:
        return _weights_error(err)
    path = write_refstats(args.dataset, params.datasets[args.dataset], params.evaluation.references[args.dataset],
                          args.shards or f"data/shards/{args.dataset}", args.out, net)
    print(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from diffusion.evaluate import evaluate_run
    from diffusion.metrics import WeightsError

    params = load_params(args.params)
    run = params.run(args.run)
    samples = Path(args.samples or OUTPUTS / run.name / "samples" / "samples.npz")
    out = Path(args.out or OUTPUTS / run.name / "eval")
    try:
        m = evaluate_run(params, run, samples, Path(args.refstats), out)
    except WeightsError as err:
        return _weights_error(err)
    metric = "FVD" if "fvd" in m else "FID"
    flag = f" (singular covariance: exact SVD {metric})" if m["singular"] else ""
    print(f"{run.name}: {metric} {m[metric.lower()]:.3f} from {m['num_samples']} samples vs {m['num_reference']} "
          f"{m['reference_split']} references{flag}; IS {m['inception_score']} -> {out / 'metrics.json'}")
    return 0


def cmd_fourier(args: argparse.Namespace) -> int:
    from diffusion import fourier
    from diffusion.schedules import Schedule

    params = load_params(args.params)
    cfg = params.evaluation.fourier
    if cfg is None:
        raise ConfigError("params.yaml: evaluation.fourier is missing: give {runs: [...], t: [...], split: test, "
                          "num_images: N, seed: 0}")
    spectra = {}
    for name in cfg.runs:
        run = params.run(name)
        model, _ = _trained_model(run, Path(args.outputs), None, "cpu")
        shards = args.shards or f"data/shards/{run.dataset_name}"
        x0, labels = fourier.real_images(run, shards, cfg.split, cfg.num_images)
        first_stage = _first_stage(run, shards, "cpu")
        if first_stage is not None:  # a latent run denoises latents
            x0 = first_stage.encode(x0)
        schedule = Schedule((run.experts[0] if run.experts else run).diffusion.train_schedule)  # what it trained on
        spectra[name] = fourier.analyse(model, x0, cfg.t, schedule, cfg.seed, labels)
    out = Path(args.out)
    meta = {"t": list(cfg.t), "split": cfg.split, "num_images": cfg.num_images, "seed": cfg.seed,
            "measure": "mean over images and channels of log(|FFT2(h)| + 1e-6) per radial frequency bin, minus its "
                       "value at frequency 0"}
    fourier.write_json(out / "fourier.json", spectra, meta)
    fourier.plot(spectra, cfg.t, out / "fourier.png")
    print(f"wrote {out / 'fourier.json'} and {out / 'fourier.png'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from diffusion.report import write_report

    params = load_params(args.params)
    ensembles = {name: [e.name for e in run.experts] for name, run in params.ensembles.items()}
    path = write_report(params.evaluation.report, sorted(params.all_runs), Path(args.outputs), Path(args.out),
                        ensembles, fourier=Path(args.outputs) / "fourier")
    print(f"wrote {path}")
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
    a = sub.add_parser("autoencoder", help="a latent dataset: the source dataset's shards and an autoencoder on them")
    a.add_argument("name", help="an entry of params.yaml autoencoders (the latent dataset's name)")
    a.add_argument("--source", help="the source dataset's shard root (default data/shards/<autoencoders.name.dataset>)")
    a.add_argument("--out", help="the latent dataset's folder (default data/shards/<name>)")
    a.set_defaults(fn=cmd_autoencoder)
    t = sub.add_parser("train", help="train a run from params.yaml")
    t.add_argument("run", help="a run name from params.yaml")
    t.add_argument("--out", help="output folder (default outputs/<run>/train)")
    t.add_argument("--shards", help="the dataset's shard root (default data/shards/<dataset>)")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    t.set_defaults(fn=cmd_train)
    m = sub.add_parser("sample", help="draw samples from a trained run: samples.npz (ADM layout) + grid.png")
    m.add_argument("run", help="a run name from params.yaml")
    m.add_argument("--weights", help="folder with model/ema.safetensors (default outputs/<run>/train)")
    m.add_argument("--out", help="output folder (default outputs/<run>/samples)")
    m.add_argument("--num-samples", type=int, help="override sample.num_samples")
    m.add_argument("--outputs", default=str(OUTPUTS),
                   help="root of the <run>/train folders (an ensemble: its experts' <expert>/train; default outputs)")
    m.add_argument("--shards", help="video prediction: shard root of the context clips (default data/shards/<dataset>)")
    m.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    m.set_defaults(fn=cmd_sample)
    r = sub.add_parser("refstats", help="cache Inception features of a dataset's reference images (FID)")
    r.add_argument("--dataset", required=True, help="a dataset named in params.yaml evaluation.references")
    r.add_argument("--shards", help="the dataset's shard root (default data/shards/<dataset>)")
    r.add_argument("--out", default="data/refstats", help="cache root; writes <out>/<dataset>/<split>-<n>.npz")
    r.set_defaults(fn=cmd_refstats)
    e = sub.add_parser("evaluate", help="FID (and IS when configured) of a run's samples -> eval/metrics.json")
    e.add_argument("run", help="a run name from params.yaml")
    e.add_argument("--samples", help="the samples npz (default outputs/<run>/samples/samples.npz)")
    e.add_argument("--refstats", default="data/refstats", help="root of the cached reference features")
    e.add_argument("--out", help="output folder (default outputs/<run>/eval)")
    e.set_defaults(fn=cmd_evaluate)
    fo = sub.add_parser("fourier", help="MEME's frequency analysis of feature maps (params.yaml evaluation.fourier)")
    fo.add_argument("--outputs", default=str(OUTPUTS), help="root of the runs' <run>/train folders (default outputs)")
    fo.add_argument("--shards", help="shard root of the real images (default data/shards/<dataset>)")
    fo.add_argument("--out", default=str(OUTPUTS / "fourier"), help="folder of fourier.json and fourier.png")
    fo.set_defaults(fn=cmd_fourier)
    o = sub.add_parser("report", help="paper tables beside our numbers, curves and sample grids")
    o.add_argument("--outputs", default=str(OUTPUTS), help="root of the runs' outputs (default outputs)")
    o.add_argument("--out", default=str(OUTPUTS / "report"), help="report folder (default outputs/report)")
    o.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, DataError, CheckpointError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
