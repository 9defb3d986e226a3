"""The project's import graph, read statically (every import statement, at the top of a file or inside a function,
since both run): a module's import closure inside the project, and each dvc.yaml stage's code deps from it.

The registry imports the model packages per family (importlib, at run time), so a closure never follows it into
`rin/` or `meme/`; a stage whose code reaches the registry depends on the family package its run uses, as a
folder. `python -m tests.imports` prints every stage's deps, for writing dvc.yaml.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "diffusion", "rin", "meme", "flows")
FAMILIES = ("rin", "meme")
REGISTRY = "diffusion/registry.py"


def module_file(name: str) -> str | None:
    """'diffusion.io' -> 'diffusion/io.py' (a package: its __init__.py); None outside the project."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*parts)
    if (base / "__init__.py").exists():
        return (Path(*parts) / "__init__.py").as_posix()
    if base.with_suffix(".py").exists():
        return Path(*parts).with_suffix(".py").as_posix()
    return None


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@functools.cache
def direct_imports(path: str) -> frozenset[str]:
    """Project files a file imports directly, from every import statement in it."""
    tree = ast.parse((REPO / path).read_text(), filename=path)
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]  # submodules (a name may be one)
    files = {module_file(n) for name in names for n in _with_parents(name)}
    return frozenset(f for f in files if f is not None and f != path)


def closure(entries: Iterable[str]) -> set[str]:
    """Every project file the entry files import, transitively, themselves included; the registry's imports of the
    model packages are not followed (see `family_files`)."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for dep in direct_imports(path):
            if path == REGISTRY and dep.split("/")[0] in FAMILIES:
                continue
            todo.append(dep)
    return seen


def family_files(family: str) -> set[str]:
    """A model package as a dependency: every module in its folder and what they import."""
    return closure(p.relative_to(REPO).as_posix() for p in sorted((REPO / family).rglob("*.py")))


def stage_closure(command: str, families: Iterable[str] = ()) -> set[str]:
    """The code a `python -m diffusion.cli <command>` process runs: the CLI, the command's module and, when they
    reach the registry, the model families named."""
    sys.path.insert(0, str(REPO))
    from diffusion.cli import STAGES

    files = closure(["diffusion/cli.py", *(module_file(m) for m in _with_parents(STAGES[command]))])
    if REGISTRY in files:
        for fam in families:
            files |= family_files(fam)
    return files


def uses_registry(command: str) -> bool:
    return REGISTRY in stage_closure(command)


if __name__ == "__main__":
    from diffusion.cli import STAGES

    for command in STAGES:
        fams = FAMILIES if uses_registry(command) else ()
        print(f"{command}: (+ family folder)" if fams else f"{command}:")
        for path in sorted(stage_closure(command) - set().union(*(family_files(f) for f in fams))):
            print(f"  - {path}")
