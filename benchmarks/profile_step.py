"""Where the time of a RIN training step and sampling call goes (torch.profiler, self CPU time per op), for this
project's RIN and for rin-pytorch at the same configuration (benchmarks/peers.py), at fp32 and bf16 autocast.

    python benchmarks/profile_step.py --out benchmarks/results/profile_before.json

Writes, per (model, call, precision), the seconds per call and the ops that take the most self CPU time, with their
share of the total; prints the same as tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import peers


def profile_call(fn, warmup: int, calls: int, top: int) -> dict:
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - t0) / calls
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in rows)
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    return {
        "seconds_per_call_profiled": round(wall, 4),
        "ops": [{"op": e.key, "calls_per_step": e.count // calls,
                 "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / calls, 2),
                 "share": round(e.self_cpu_time_total / total, 4)} for e in rows[:top]],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rin_cifar10")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rate", type=float, default=0.9, help="self-conditioning rate of the training step")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--models", nargs="+", default=["main", "peer"], choices=["main", "peer"])
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    main_model = peers.main_rin(args.preset, self_cond=True)
    models = {"main": main_model, "peer": peers.peer_rin_like(main_model) if "peer" in args.models else None}
    out = {"preset": args.preset, "batch": args.batch, "self_cond_rate": args.rate, "threads": args.threads,
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "profiles": []}
    for precision in args.precision:
        for name in args.models:
            m = models[name]
            train = (peers.main_train_step(m, args.batch, args.rate, precision) if name == "main"
                     else peers.peer_train_step(m, args.batch, precision))
            sample = (peers.main_sample_call(m, args.batch, precision) if name == "main"
                      else peers.peer_sample_call(m, args.batch, precision))
            for call, fn in (("train_step", train), ("sample_call", sample)):
                res = profile_call(fn, warmup=1, calls=args.calls, top=args.top)
                out["profiles"].append({"model": name, "call": call, "precision": precision, **res})
                print(f"\n## {name} {call} {precision}: {res['seconds_per_call_profiled']:.3f} s per call (profiled)")
                print("| op | calls | self ms | share |\n|---|---|---|---|")
                for r in res["ops"]:
                    print(f"| {r['op']} | {r['calls_per_step']} | {r['self_ms_per_step']} | {r['share']:.1%} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
