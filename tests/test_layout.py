"""The house's rules, checked: import contracts (import-linter), and every dvc.yaml stage's code deps equal to the
import closure of the code it runs (tests/imports.py), on the real dvc.yaml, params.yaml and dvc.lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.config import load_params
from tests.imports import FAMILIES, PACKAGES, REPO, stage_closure

CODE_DIRS = set(PACKAGES)


def test_import_contracts_hold():
    env = os.environ | {"PYTHONPATH": str(REPO)}  # this checkout's packages, whatever the venv's editable install is
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def rendered_stages(root: Path) -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml rendered by DVC over the params file beside it: stage -> (cmd, file deps relative to root)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {s.name: (s.cmd, [Path(d.fs_path).relative_to(root).as_posix() for d in s.deps
                                 if not hasattr(d, "params")]) for s in repo.index.stages}


def expand(root: Path, deps: list[str]) -> set[str]:
    """The code files among a stage's deps: .py files, and a model package folder as all its .py files."""
    files = set()
    for dep in deps:
        if dep in FAMILIES:
            files |= {p.relative_to(root).as_posix() for p in (root / dep).rglob("*.py")}
        elif dep.endswith(".py") and dep.split("/")[0] in CODE_DIRS:
            files.add(dep)
    return files


def families_of(stage: str, params) -> tuple[str, ...]:
    """The model packages a stage's run uses: its family, plus MEME's for the autoencoder of a latent dataset."""
    kind, _, key = stage.partition("@")
    if kind == "autoencoder":
        return ("meme",)
    if kind == "report":  # it resolves every mapped run's model to set its settings beside the paper's recipe
        return tuple(sorted({params.run(n).model.family for n in params.evaluation.report if n in params.all_runs}))
    if kind == "fourier":
        return tuple(sorted({params.run(n).model.family for n in params.evaluation.fourier.runs}))
    if key and key in params.all_runs:
        run = params.all_runs[key]
        return tuple(sorted({run.model.family} | ({"meme"} if run.autoencoder is not None else set())))
    return ()


def deps_mismatches(root: Path) -> list[str]:
    """For each stage: the code it imports but does not list, and what it lists but does not import."""
    params = load_params(root / "params.yaml")
    problems = []
    for name, (cmd, deps) in rendered_stages(root).items():
        words = cmd.split()
        assert words[:3] == ["python", "-m", "diffusion.cli"], f"{name}: {cmd!r} is not a diffusion.cli command"
        command = words[3] if not words[3].startswith("--") else words[5]
        want = stage_closure(command, families_of(name, params))
        have = expand(root, deps)
        if missing := sorted(want - have):
            problems.append(f"{name} imports but does not list {missing}")
        if extra := sorted(have - want):
            problems.append(f"{name} lists but does not import {extra}")
    return problems


def test_dvc_deps_are_exactly_each_stages_import_closure():
    assert deps_mismatches(REPO) == []


def scratch_project(tmp_path: Path) -> Path:
    """The checkout's code, dvc.yaml, params.yaml and dvc.lock in a scratch DVC project (no outputs)."""
    from dvc.repo import Repo

    for name in ("dvc.yaml", "params.yaml", "dvc.lock", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    Repo.init(str(tmp_path), no_scm=True, force=True)
    return tmp_path


def test_the_deps_check_fails_on_a_hand_broken_dvc_yaml(tmp_path):
    root = scratch_project(tmp_path)
    text = (root / "dvc.yaml").read_text()
    assert "        - diffusion/objectives.py\n" in text
    broken = text.replace("        - diffusion/objectives.py\n", "", 1)  # train stops listing the loss
    broken = broken.replace("        - data/video.py\n", "        - data/video.py\n        - meme/iformer.py\n", 1)
    (root / "dvc.yaml").write_text(broken)
    problems = "\n".join(deps_mismatches(root))
    assert "train@rin_fmnist imports but does not list ['diffusion/objectives.py']" in problems
    assert "shard@fashion_mnist lists but does not import ['meme/iformer.py']" in problems


def changed_deps(root: Path, stage: str) -> set[str]:
    """The deps `dvc status` reports as changed for a stage (its outputs may be missing: only deps are read)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.status(targets=[f"{root / 'dvc.yaml'}:{stage}"])
    changed = set()
    for entry in next(iter(status.values()), []):
        if isinstance(entry, dict) and "changed deps" in entry:
            changed |= {Path(p).as_posix() for p in entry["changed deps"]}
    return changed


@pytest.mark.parametrize(("edited", "stage", "stale"), [
    ("meme/iformer.py", "train@rin_fmnist", False),  # a MEME file does not re-train the RIN run
    ("diffusion/objectives.py", "sample@rin_fmnist", True),  # the x0 / eps conversion of every sampling step
    ("rin/model.py", "train@unet_fmnist", False),
    ("rin/model.py", "sample@rin_fmnist", True),
])
def test_dvc_status_follows_the_code_a_stage_runs(tmp_path, edited, stage, stale):
    """Against the committed dvc.lock: an edited file makes exactly the stages that run it stale."""
    root = scratch_project(tmp_path)
    before = changed_deps(root, stage)
    with (root / edited).open("a") as fh:
        fh.write("\n# edited\n")
    after = changed_deps(root, stage)
    hit = any(d == edited or edited.startswith(d + "/") for d in after)
    assert hit == stale, (stage, edited, after)
    if not stale:
        assert after == before


SKIPS = ("pytest.skip(", "mark.skipif(", "mark.skip(", "importorskip(", "mark.xfail(")


def skips_in(root: Path) -> list[str]:
    """'path:line' of every skip or xfail in the test files under root (a test that needs an asset asks for it
    through a fixture of tests/conftest.py, which fails when it is missing)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(word in line for word in SKIPS) and not line.lstrip().startswith(("#", "SKIPS")):
                found.append(f"{path.relative_to(root)}:{number}")
    return found


def test_no_test_skips_on_a_missing_asset(tmp_path):
    """A skip decided at collection time (Fashion-MNIST or the weights cache absent) lets a fresh machine pass the
    tests that check the numbers without running them: a test needs assets through a fixture that fails."""
    assert skips_in(REPO / "tests") == []
    skip = "@pytest.mark." + 'skipif(True, reason="no data")'  # split so that this file does not hold one
    (tmp_path / "test_x.py").write_text(f"import pytest\n\n{skip}\ndef test_x():\n    pass\n")
    assert skips_in(tmp_path) == ["test_x.py:3"]
