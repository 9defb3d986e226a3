"""`python -m diffusion.cli [--params FILE] <stage> ...`: the commands dvc.yaml runs. Dispatch only: each stage is a
module with `main(argv)` (STAGES), imported when called, so a stage's code is its own module's imports. Errors a user
fixes (diffusion.errors.UserError, missing files) print as `error: ...` and exit 2."""

from __future__ import annotations

import errno
import importlib
import logging
import signal
import sys
from collections.abc import Sequence

from diffusion.errors import Stopped, UserError

STAGES = {  # command -> module with main(argv)
    "shard": "data.prepare",
    "autoencoder": "diffusion.stages.autoencoder",
    "train": "diffusion.stages.train",
    "sample": "diffusion.stages.sample",
    "refstats": "diffusion.stages.refstats",
    "evaluate": "diffusion.stages.evaluate",
    "fourier": "diffusion.stages.fourier",
    "interval_loss": "diffusion.stages.interval_loss",
    "report": "diffusion.stages.report",
    "claims": "diffusion.stages.claims",
    "flops": "diffusion.stages.flops",
    "recipe": "diffusion.stages.recipe",
    "plan": "diffusion.stages.plan",
}
USAGE = f"usage: python -m diffusion.cli [--params FILE] {{{','.join(STAGES)}}} ... (each takes --help)"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    lead: list[str] = []  # a leading --params FILE goes on to the stage
    if args[:1] == ["--params"] and len(args) > 1:
        lead, args = args[:2], args[2:]
    elif args[:1] and args[0].startswith("--params="):
        lead, args = args[:1], args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        return 0 if args else 2
    command, rest = args[0], [*lead, *args[1:]]
    if command not in STAGES:
        print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    module = importlib.import_module(STAGES[command])
    try:
        return module.main(rest)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the device ({err}); free some and run the command again: what was written "
              "before is intact (every write is atomic) and the stage resumes from its checkpoints or chunks",
              file=sys.stderr)
        return 2
    except Stopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
