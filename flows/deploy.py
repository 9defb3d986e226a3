"""Deployments of the flows, for a Prefect server at PREFECT_API_URL.

  python -m flows.deploy [serve]           serve reproduce-table2/{smoke,cpu,paper}, reproduce-claims/{smoke,cpu,
                                           paper} and ablation/{smoke,cpu}; their runs execute as subprocesses of
                                           this process, on this machine
  python -m flows.deploy wait FLOW/NAME    return once that deployment is registered
  python -m flows.deploy pool POOL         register reproduce-table2/POOL, reproduce-claims/POOL and ablation/POOL
                                           (paper scale) on a work pool, code from --source; the pool's workers (GPU
                                           machines) run them

Trigger one with `prefect deployment run 'reproduce-table2/smoke' --watch` (README, "Prefect" and "Scaling out").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from prefect import serve
from prefect.client.orchestration import get_client

from flows.ablation import ablation
from flows.claims import reproduce_claims
from flows.table2 import reproduce_table2
from flows.workspace import repo_root

API_ENV = "PREFECT_API_URL"
SMOKE_GRID = {"runs.rin_fmnist.train.self_cond_rate": [0.0, 0.9]}  # RIN's self-conditioning ablation, in miniature


# (flow, deployment name, parameters, description) of every served deployment
DEPLOYMENTS = [
    (reproduce_table2, "smoke", {"scale": "smoke"},
     "RIN Table 2 with a tiny configuration of its runs: minutes on a CPU"),
    (reproduce_table2, "cpu", {"scale": "cpu"}, "RIN Table 2 with params.yaml as it is (what `dvc repro` builds)"),
    (reproduce_table2, "paper", {"scale": "paper"},
     "RIN Table 2 with params.yaml's paper section: the paper's runs (a GPU cluster)"),
    (reproduce_claims, "smoke", {"scale": "smoke"},
     "The papers' claims with every arm shrunk to smoke scale: minutes on a CPU"),
    (reproduce_claims, "cpu", {"scale": "cpu"},
     "The papers' claims at CPU scale (params.yaml claims); one: --param claims='[\"schedule\"]'"),
    (reproduce_claims, "paper", {"scale": "paper"},
     "The papers' claims on the paper-scale runs (params.yaml paper.claims): a GPU cluster"),
    (ablation, "smoke", {"scale": "smoke", "grid": SMOKE_GRID},
     "A grid of params.yaml overrides as DVC experiments, each run shrunk to smoke scale"),
    (ablation, "cpu", {"scale": "cpu"},
     "A grid of params.yaml overrides as DVC experiments; pass --param grid='{...}'"),
]


def deployments() -> list:
    return [flow.to_deployment(name=name, parameters=parameters, tags=["rin-meme"], description=description)
            for flow, name, parameters, description in DEPLOYMENTS]


def to_pool(pool: str, source: str, launcher: str) -> None:
    """Register the paper-scale deployments on a work pool; `source` is where its workers get the code (a git URL,
    or a path they share). `launcher` wraps the train and sample stages (flows.tasks.dvc_stage)."""
    from prefect import flow

    entrypoints = {"reproduce-table2": "flows/table2.py:reproduce_table2", "ablation": "flows/ablation.py:ablation",
                   "reproduce-claims": "flows/claims.py:reproduce_claims"}
    params = {"reproduce-table2": {"scale": "paper", "launcher": launcher}, "ablation": {"scale": "cpu"},
              "reproduce-claims": {"scale": "paper", "launcher": launcher}}
    for name, entrypoint in entrypoints.items():
        flow.from_source(source=source, entrypoint=entrypoint).deploy(
            name=pool, work_pool_name=pool, parameters=params[name], tags=["rin-meme"], print_next_steps=False
        )
        print(f"registered {name}/{pool} on work pool {pool!r} (code from {source})")


def wait_for_api(timeout_s: float) -> None:
    """Return once the Prefect API answers; exit with a message naming the fix when it does not in time."""
    url = os.environ.get(API_ENV)
    if not url:
        sys.exit(
            f"{API_ENV} is not set: start the server (`make prefect-server`) and export "
            f"{API_ENV}=http://127.0.0.1:4200/api, or run `make serve`"
        )
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while (err := client.api_healthcheck()) is not None:
            if time.monotonic() > deadline:
                sys.exit(
                    f"Prefect API at {url} did not answer within {timeout_s:.0f} s ({err!r}); start it with "
                    "`make prefect-server` (prefect server start --host 127.0.0.1 --port 4200)"
                )
            time.sleep(1.0)


def wait_for_deployment(name: str, timeout_s: float) -> None:
    """Return once FLOW/DEPLOYMENT exists on the server (served by `python -m flows.deploy`)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name(name)
                return
            except Exception as err:
                if time.monotonic() > deadline:
                    sys.exit(
                        f"deployment {name!r} is not registered after {timeout_s:.0f} s ({type(err).__name__}); "
                        "start serving with `make serve` (python -m flows.deploy)"
                    )
                time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", nargs="?", choices=["serve", "wait", "pool"], default="serve")
    p.add_argument("name", nargs="?", help="wait: FLOW/DEPLOYMENT, e.g. reproduce-table2/smoke; pool: a work pool")
    p.add_argument("--source", default=str(repo_root()), help="pool: git URL or shared path of this repository")
    p.add_argument("--launcher", default="", help="pool: e.g. 'torchrun --nnodes=2 --nproc_per_node=8 ...'")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the API / the deployment")
    p.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1: this machine's cores)")
    args = p.parse_args(argv)
    wait_for_api(args.timeout)
    if args.command in ("wait", "pool") and not args.name:
        p.error(f"{args.command} needs a name")
    if args.command == "wait":
        wait_for_deployment(args.name, args.timeout)
        return 0
    if args.command == "pool":
        to_pool(args.name, args.source, args.launcher)
        return 0
    serve(*deployments(), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
