"""What the stages' command lines share (data/prepare.py's too): the params file, the device, NAME=PATH pairs, and
output paths checked before anything is written."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from diffusion.config import ConfigError


def parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m diffusion.cli {stage}", description=doc)
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return p


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")


def named_paths(pairs: Sequence[str], what: str) -> dict[str, Path]:
    """['name=path', ...] -> {name: Path}; the message names a malformed pair."""
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{what}: expected NAME=PATH, got {pair!r}")
        out[name] = Path(path)
    return out


def out_folder(path: str, flag: str = "--out") -> Path:
    """A stage's output folder from its command line; an existing file there is a ConfigError (nothing is written)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: is a file, not a folder; pass the folder dvc.yaml names")
    return folder


def out_file(path: str, flag: str = "--out") -> Path:
    """A stage's output file from its command line; an existing folder there is a ConfigError."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{flag} {file}: is a folder, not a file; pass the file dvc.yaml names")
    return file
