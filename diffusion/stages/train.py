"""The train stage: `python -m diffusion.cli train RUN --shards DIR --out DIR` (torchrun for several processes).
Resumes from the newest checkpoint in <out>/checkpoints; writes model/ema weights, the log and dvclive curves."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from data.batches import training_source
from diffusion import distributed
from diffusion.args import add_device, out_folder, parser
from diffusion.checkpoint import first_stage
from diffusion.config import ConfigError
from diffusion.io import exclusive_lock
from diffusion.registry import load_run
from diffusion.stages.proxy import proxy_score
from diffusion.trainer import Trainer, align_live


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("train", __doc__)
    p.add_argument("run", help="a run name from params.yaml (runs or experts)")
    p.add_argument("--shards", required=True, help="the dataset's shard root (data/shards/<dataset>)")
    p.add_argument("--out", required=True, help="the run's train folder (outputs/<run>/train)")
    p.add_argument("--refstats", help="the dataset's reference features (data/refstats/<dataset>.npz), for the proxy "
                                      "KID curve of a run with train.proxy set")
    add_device(p)
    args = p.parse_args(argv)
    _, run = load_run(args.params, args.run)
    if run.experts:
        raise ConfigError(f"{run.params_key} is a multi-expert run and trains nothing itself: train its experts "
                          f"({', '.join(e.name for e in run.experts)}), then sample it")
    d = distributed.init(args.device)
    out, shards = out_folder(args.out), Path(args.shards)
    # One training per folder: a second one would take the first's half-written checkpoint for debris.
    with exclusive_lock(out, f"training of {run.name}") if d.is_main else nullcontext():
        source = training_source(run.dataset, run.train, shards)
        trainer = Trainer(run, out, d, first_stage(run, shards, d.device))
        score = proxy_score(run, args.refstats, d.device) if run.train.proxy is not None and d.is_main else None
        start = trainer.resume()
        live = None
        if d.is_main:
            from dvclive import Live

            align_live(out / "live", start)
            live = Live(dir=str(out / "live"), resume=True, save_dvc_exp=False, dvcyaml=False)
        previous = signal.signal(signal.SIGTERM, trainer.request_stop)  # preemption: checkpoint, then stop
        try:
            result = trainer.fit(source, live=live, proxy=score)
            trainer.export(result)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if live is not None:
                live.end()
            distributed.shutdown(d)
    if d.is_main:
        print(f"trained {run.name}: steps {result.resumed_from}->{result.steps}, final loss {result.final_loss:.4f}, "
              f"{result.images_per_s:.1f} img/s on {d.world_size} process(es) -> {out}")
    return 0
