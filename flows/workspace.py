"""Where a flow runs DVC stages: the repository itself (params.yaml as it is), or a derived workspace
.flows/workspaces/<name>/ for overridden params (smoke scale, overrides): the repository's files as git sees them,
its own params.yaml (the overrides applied) and dvc.lock, and the repository's DVC cache, shared. Outputs of a
derived workspace never touch the repository's; both persist, so a re-run resumes where the last one stopped."""

from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from diffusion.config import load_yaml, parse_params
from diffusion.io import canonical_json, write_text
from diffusion.typed import ConfigError, set_dotted
from flows.dvcgen import static_stages
from flows.scale import absolute_roots

FLOWS_DIR = ".flows"  # gitignored: derived workspaces and local Prefect results
# A derived workspace keeps its own: dvc.yaml too, whose run-by-run stages (flows/dvcgen.py) follow its params
OWNED = ("params.yaml", "dvc.yaml", "dvc.lock", ".dvc/config", ".dvc/config.local")
MANIFEST = ".flows-files.json"  # the files last copied in, so files deleted from the repository go too


def repo_root() -> Path:
    """The checkout holding this package: the project the flows run by default."""
    return Path(__file__).resolve().parents[1]


def flows_dir(repo: Path) -> Path:
    return repo / FLOWS_DIR


def read_params(repo: Path) -> dict[str, Any]:
    """The repository's params.yaml as plain data (duplicate keys refused, as DVC does)."""
    return load_yaml(repo / "params.yaml")


def workspace_name(scale: str, extra: Mapping[str, Any]) -> str:
    """`smoke`, or `smoke-<8 hex>` when extra overrides are applied on top of the scale's own."""
    if not extra:
        return scale
    return f"{scale}-{hashlib.sha256(canonical_json(dict(extra)).encode()).hexdigest()[:8]}"


def workspace_words(name: str) -> str:
    """A workspace as the Prefect UI may name it (never by its local path): "repo" is the checkout itself."""
    return "the checkout itself" if name == "repo" else f"workspace {name!r} (.flows/workspaces/)"


def project_files(repo: Path) -> list[str]:
    """Files git sees in the checkout (tracked and untracked, ignored ones excluded), as relative paths."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(
            f"{repo}: not a git checkout ({err}); the flows copy the project's files through git"
        ) from err
    names = [n for n in out.decode().split("\0") if n]
    return sorted(n for n in names if (repo / n).is_file() and not n.startswith(FLOWS_DIR + "/"))


def dvc_outputs(repo: Path) -> list[str]:
    """Every stage output of the repository's dvc.yaml, relative to it: never copied into a derived workspace."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return sorted(
            {Path(out.fs_path).relative_to(repo.resolve()).as_posix() for s in r.index.stages for out in s.outs}
        )


def cache_dir(repo: Path) -> Path:
    """The repository's DVC cache folder (`dvc cache dir`), which derived workspaces share."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return Path(r.cache.local_cache_dir)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        write_text(path, text)


def workspace_dvc_yaml(repo: Path, params: Mapping[str, Any]) -> str:
    """The repository's dvc.yaml with its report and fourier stages written for the workspace's params (the paper
    scale names other runs); a project whose params this pipeline cannot read keeps its dvc.yaml as it is."""
    text = (repo / "dvc.yaml").read_text()
    try:
        typed = parse_params(params)
    except ConfigError:
        return text
    header = "# written by flows/workspace.py from the repository's dvc.yaml for this workspace's params.yaml\n"
    return header + yaml.safe_dump(static_stages(yaml.safe_load(text), typed), sort_keys=False, width=120)


def sync_workspace(repo: Path, name: str, overrides: Mapping[str, Any]) -> Path:
    """Create or update .flows/workspaces/<name>: copy changed project files, remove ones the project dropped,
    write params.yaml (overrides applied; relative dataset roots pointed at the repository) and DVC's config."""
    ws = flows_dir(repo) / "workspaces" / name
    ws.mkdir(parents=True, exist_ok=True)
    outs = dvc_outputs(repo)
    files = [
        f for f in project_files(repo) if f not in OWNED and not any(f == o or f.startswith(o + "/") for o in outs)
    ]
    manifest = ws / MANIFEST
    previous = set(json.loads(manifest.read_text())) if manifest.exists() else set()
    for rel in files:
        src, dst = repo / rel, ws / rel
        if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for rel in sorted(previous - set(files)):
        (ws / rel).unlink(missing_ok=True)
    _write_if_changed(manifest, json.dumps(files, indent=0))
    raw = read_params(repo)
    params = set_dotted(raw, absolute_roots(raw, repo) | dict(overrides))
    _write_if_changed(ws / "params.yaml", yaml.safe_dump(params, sort_keys=False, width=120))
    _write_if_changed(ws / "dvc.yaml", workspace_dvc_yaml(repo, params))
    config = (
        "# written by flows/workspace.py: a derived workspace without git, sharing the repository's cache\n"
        f"[core]\n    no_scm = true\n    analytics = false\n[cache]\n    dir = {cache_dir(repo)}\n"
    )
    _write_if_changed(ws / ".dvc" / "config", config)
    return ws
