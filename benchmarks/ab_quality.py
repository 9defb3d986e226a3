"""Paired A/B of a run's variants judged by sample quality: each arm trains from the same seed, data order and noise
draws, for the same wall time (or the same steps), then draws the same seeds with each sampler variant and is scored
as the evaluate stage scores a run: KID +- std and FID of N samples against the run's cached reference features
(N and the reference size recorded), the seam ratio of a patch model's samples beside real images', and the
per-noise-level test loss of benchmarks/ab_loss.py.

    python -m benchmarks.ab_quality rin_fmnist --shards data/shards/fashion_mnist \
        --refstats data/refstats/fashion_mnist.npz --minutes 8 --samples 1024 \
        --arm base --arm stem_ln_off=model.overrides.token_norm=false \
        --sampler base --sampler ddim=sample.sampler=ddim \
        --out benchmarks/results/ab_quality_rin_fmnist.json

The file is rewritten after every arm, and a rerun with the same run, budget, samples and samplers keeps the arms it
already holds (same name and overrides), so a killed invocation resumes at the arm it was in.

--weights FILE scores sampler variants at fixed weights instead (a run's trained ema.safetensors): no training, one
arm, whose name labels the weights.

Equal wall time: each arm first times --calibrate steps of its own training, then trains
minutes * 60 / (seconds per step) steps (its own LR schedule over them). Sampler variants are dotted keys of the
run's `sample` section, applied to the trained weights of every arm. KID and FID at N samples are comparable only
between rows of the same N and reference, which one invocation keeps fixed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.ab_loss import GAMMAS, arm_run, parse_arm, test_loss
from data.batches import read_split, training_source
from diffusion.checkpoint import load_trained
from diffusion.config import ConfigError
from diffusion.distributed import Dist
from diffusion.images import from_uint8
from diffusion.io import sha256_file, write_json
from diffusion.metrics.features import feature_network_for, feature_space, timed_features
from diffusion.registry import resolve_model
from diffusion.stages.evaluate import (
    kernel_distance_fields,
    load_reference_features,
    reference_extras,
    sample_fid,
    seam_fields,
)
from diffusion.trainer import Trainer, draw_images
from diffusion.typed import build_dataclass, set_dotted

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def seconds_per_step(run, shards: str, calibrate: int) -> float:
    """Median seconds of `calibrate` training steps of this arm (after one untimed step), in a scratch folder."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(run, Path(tmp), CPU)
        source = training_source(run.dataset, run.train, shards)
        trainer.one_step(source)
        times = []
        for _ in range(calibrate):
            t0 = time.perf_counter()
            trainer.one_step(source)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def with_sample_settings(run, over: dict):
    """The run with dotted keys of its `sample` section set (e.g. {'sampler': 'ddim', 'steps': 250}), checked as
    params.yaml is: an unknown key or a bad value is a ConfigError naming it."""
    if not over:
        return run
    keys = {f"sample.{k.removeprefix('sample.')}": v for k, v in over.items()}
    raw = set_dotted({"sample": dataclasses.asdict(run.sample)}, keys)["sample"]
    return dataclasses.replace(run, sample=build_dataclass(type(run.sample), raw, f"{run.params_key}.sample"))


def score(images: np.ndarray, run, ref_feats: np.ndarray, real: np.ndarray | None, net, patch) -> dict:
    feats, _ = timed_features(images, net, desc=f"features {run.name}")
    fid = sample_fid(feats, ref_feats)
    return {"fid": fid.fid, "fid_method": fid.method, **kernel_distance_fields("kid", feats, ref_feats, run),
            **seam_fields(images, real, patch), "num_samples": len(feats), "num_reference": len(ref_feats)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--arm", action="append", required=True, help="NAME or NAME=key=value,... (dotted, in the run)")
    p.add_argument("--sampler", action="append", default=None,
                   help="NAME or NAME=key=value,... of the run's sample section (default: the run's own, 'base')")
    p.add_argument("--sampler-arm", action="append", default=None, dest="sampler_arms",
                   help="an arm that gets every --sampler variant (repeatable); the others get only the first one. "
                        "Default: every arm gets every variant")
    p.add_argument("--minutes", type=float, help="training wall time per arm (equal time); else --steps")
    p.add_argument("--steps", type=int, default=1000, help="training steps per arm when --minutes is not given")
    p.add_argument("--weights", type=Path, help="score the sampler variants at these trained weights (safetensors), "
                                              "without training; one --arm, which names them")
    p.add_argument("--calibrate", type=int, default=20, help="timed steps that set an arm's steps for --minutes")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256, help="sampling batch")
    p.add_argument("--images", type=int, default=256, help="test images per noise level of the test loss")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--shards", required=True, help="the run's shard folder (data/shards/<dataset>)")
    p.add_argument("--refstats", required=True, help="the dataset's refstats npz (data/refstats/<dataset>.npz)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.params).read_text())
    arms = [parse_arm(a) for a in args.arm]
    samplers = [parse_arm(s) for s in (args.sampler or ["base"])]
    probe = arm_run(raw, args.run, {}, args.steps)
    for s_name, s_over in samplers:  # refuse a bad --sampler before any arm trains
        try:
            with_sample_settings(probe, s_over)
        except ConfigError as err:
            raise SystemExit(f"--sampler {s_name}: {err}") from None
    names = [a for a, _ in arms]
    unknown = sorted(set(args.sampler_arms or []) - set(names))
    if unknown:
        raise SystemExit(f"--sampler-arm {', '.join(unknown)}: not among the --arm names {names}")
    if args.weights is not None and (len(arms) != 1 or arms[0][1]):
        raise SystemExit("--weights: give exactly one --arm, a name without overrides (the weights are trained)")
    budget = {"minutes": args.minutes} if args.minutes is not None else {"steps": args.steps}
    if args.weights is not None:
        budget = {"weights": str(args.weights), "sha256": sha256_file(args.weights)}
    done = previous_rows(args.out, args.run, budget, args.samples)
    rows, net, test_images = [], None, None
    for name, over in arms:
        arm_samplers = samplers if args.sampler_arms is None or name in args.sampler_arms else samplers[:1]
        old = done.get(name)
        if old is not None and old["overrides"] == over and list(old["samplers"]) == [s for s, _ in arm_samplers]:
            print(f"{name}: kept from {args.out}", flush=True)
            rows.append(old)
            continue
        run = arm_run(raw, args.run, over, args.steps)
        if run.model.class_conditional or run.diffusion.context_frames or run.train.expert is not None:
            raise SystemExit(f"{args.run}: only unconditional image runs are supported here")
        step_s = None
        if args.minutes is not None and "train.steps" not in over and args.weights is None:
            step_s = seconds_per_step(run, args.shards, args.calibrate)
            run = arm_run(raw, args.run, over | {"train.steps": max(1, int(args.minutes * 60 / step_s))}, args.steps)
        if net is None:
            net = feature_network_for(run.dataset)
            ref_feats = load_reference_features(Path(args.refstats), run)
            real, _, _ = reference_extras(Path(args.refstats), run)
            test_images = from_uint8(read_split(run.dataset, args.shards, "test", limit=args.images)[0])
        patch = list(resolve_model(run).patch) if run.model.family == "rin" else None
        with tempfile.TemporaryDirectory() as tmp:
            if args.weights is None:
                trainer = Trainer(run, Path(tmp), CPU)
                start = time.perf_counter()
                result = trainer.fit(training_source(run.dataset, run.train, args.shards))
                train_s = time.perf_counter() - start
                model = trainer.ema.module.eval()
            else:
                model, result, train_s = load_trained(run, [args.weights]), None, None
            losses = test_loss(model, run, test_images, GAMMAS)
            scored = {}
            for s_name, s_over in arm_samplers:
                s_run = with_sample_settings(run, s_over)
                t0 = time.perf_counter()
                images = draw_images(model, s_run, dataclasses.replace(s_run.sample, batch_size=args.batch),
                                     args.samples, CPU.device, desc=f"sample {s_run.name}")
                scored[s_name] = {"overrides": s_over, "sampler": s_run.sample.sampler, "steps": s_run.sample.steps,
                                  "sampling_seconds": time.perf_counter() - t0,
                                  **score(images, s_run, ref_feats, real, net, patch)}
        row = {"arm": name, "overrides": over, "train_steps": run.train.steps if args.weights is None else None,
               "seconds_per_step": step_s,
               "train_seconds": train_s, "images_per_s": result and result.images_per_s,
               "final_train_loss": result and result.final_loss,
               "test_loss": losses, "test_loss_mean": sum(losses.values()) / len(losses), "samplers": scored}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(args.out, report(args, argv, probe, budget, rows))
    write_json(args.out, report(args, argv, probe, budget, rows))
    print(f"-> {args.out}")


def report(args, argv, run, budget: dict, rows: list[dict]) -> dict:
    _, network, sha = feature_space(run.dataset)
    return {
        "run": args.run, "budget": budget,
        "command": "python -m benchmarks.ab_quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "num_samples": args.samples,
        "metric": f"KID and FID of {args.samples} EMA samples (seeds {run.sample.seed}..) against "
                  f"{run.eval.num_reference} {run.eval.reference_split} images ({network}, sha256 {sha[:12]}); seam "
                  "ratio beside real images'; test loss as benchmarks/ab_loss.py (a proxy)",
        "threads": args.threads, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "arms": rows,
    }


def previous_rows(out: Path, run: str, budget: dict, samples: int) -> dict[str, dict]:
    """The arms of an earlier invocation's file with the same run, budget and sample count, by name."""
    if not out.exists():
        return {}
    old = json.loads(out.read_text())
    if (old.get("run"), old.get("budget"), old.get("num_samples")) != (run, budget, samples):
        return {}
    return {row["arm"]: row for row in old.get("arms", [])}


if __name__ == "__main__":
    main()
