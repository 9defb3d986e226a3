"""Training and sampling throughput of a RIN preset on this machine: images/s and achieved GFLOP/s, fp32 vs bf16
autocast, per batch size; the extra cost of latent self-conditioning in training and at sampling.

    python -m benchmarks.bench_train --preset rin_cifar10 --batch 16 64 --out benchmarks/results/train.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.peers import main_train_step, precision_ctx
from diffusion.flops import count_flops
from rin.model import RIN
from rin.presets import PRESETS


def timed(fn, warmup: int, repeats: int, budget_s: float) -> float:
    """Median seconds per call over up to `repeats` calls (fewer if the budget runs out)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def bench_training(preset: str, batches: list[int], args) -> list[dict]:
    rows = []
    for rate in (0.0, 0.9):
        cfg = dataclasses.replace(PRESETS[preset], self_cond=rate > 0, dropout=0.0)
        for precision in ("fp32", "bf16"):
            for batch in batches:
                torch.manual_seed(0)
                model = RIN(cfg).train()
                step = main_train_step(model, batch, rate, precision)
                sec = timed(step, args.warmup, args.repeats, args.budget)
                row = {"preset": preset, "self_cond_rate": rate, "precision": precision, "batch": batch,
                       "seconds_per_step": sec, "images_per_s": batch / sec}
                rows.append(row)
                print(json.dumps(row), flush=True)
    # FLOPs of a step do not depend on precision: count once (fp32, SDPA math path) and reuse.
    for row in rows:
        cfg = dataclasses.replace(PRESETS[preset], self_cond=row["self_cond_rate"] > 0, dropout=0.0)
        model = RIN(cfg).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        flops, _ = count_flops(main_train_step(model, row["batch"], row["self_cond_rate"], "fp32", opt))
        row["gflop_per_step"] = flops / 1e9
        row["achieved_gflop_per_s"] = flops / 1e9 / row["seconds_per_step"]
    return rows


def bench_sampling_call(preset: str, batch: int, args) -> list[dict]:
    """One denoiser call as the sampler makes it, with and without a previous-latents input."""
    rows = []
    for self_cond in (False, True):
        cfg = dataclasses.replace(PRESETS[preset], self_cond=self_cond)
        model = RIN(cfg).eval()
        x = torch.randn(batch, cfg.channels, *cfg.data_shape)
        gamma = torch.full((batch,), 0.5)
        prev = torch.randn(batch, cfg.num_latents, cfg.latent_dim) if self_cond else None
        for precision in ("fp32", "bf16"):
            def call(model=model, x=x, gamma=gamma, prev=prev, precision=precision):
                with torch.no_grad(), precision_ctx(precision):
                    model(x, gamma, None, prev)

            sec = timed(call, args.warmup, args.repeats, args.budget)
            rows.append({"preset": preset, "self_cond": self_cond, "precision": precision, "batch": batch,
                         "seconds_per_call": sec, "images_per_s": batch / sec})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def overheads(train_rows: list[dict], sample_rows: list[dict]) -> dict:
    out = {}
    for r in (r for r in train_rows if r["self_cond_rate"] > 0):
        base = next(b for b in train_rows if b["self_cond_rate"] == 0 and b["precision"] == r["precision"]
                    and b["batch"] == r["batch"])
        out[f"train_{r['precision']}_b{r['batch']}"] = r["seconds_per_step"] / base["seconds_per_step"] - 1
    for r in (r for r in sample_rows if r["self_cond"]):
        base = next(b for b in sample_rows if not b["self_cond"] and b["precision"] == r["precision"])
        out[f"sample_{r['precision']}_b{r['batch']}"] = r["seconds_per_call"] / base["seconds_per_call"] - 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="rin_cifar10", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timed calls per configuration")
    p.add_argument("--out", default="benchmarks/results/train.json")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    train_rows = bench_training(args.preset, args.batch, args)
    sample_rows = bench_sampling_call(args.preset, args.sample_batch, args)
    result = {
        "what": "RIN training step (loss, backward, AdamW) and one sampling denoiser call, synthetic inputs",
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform()},
        "flops_note": "torch FlopCounterMode on the fp32 step (SDPA math path), 2 FLOPs per multiply-add; "
                      "the same count is used for bf16",
        "training": train_rows,
        "sampling_call": sample_rows,
        "self_conditioning_overhead": overheads(train_rows, sample_rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
