"""diffusion/io.py and the weights writer: atomic writes leave ordinary files and no debris, and the same weights are
the same bytes in every process (safetensors writes its metadata in a per-process random order)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusion import io

WRITE_WEIGHTS = """
import sys, torch
from diffusion.checkpoint import save_weights
torch.manual_seed(0)
tensors = {"w": torch.randn(3, 4), "b": torch.zeros(4), "n": torch.ones(2, dtype=torch.bfloat16)}
save_weights(tensors, __import__("pathlib").Path(sys.argv[1]), {"step": "7", "run": "r", "latent_scale": "0.5"})
"""


def test_atomic_write_makes_an_ordinary_file_and_leaves_no_temporary(tmp_path: Path):
    path = io.write_json(tmp_path / "sub" / "m.json", {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n "b": 1,\n "a": [\n  1.5\n ]\n}\n'
    assert (path.stat().st_mode & 0o777) == io.FILE_MODE
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch):
    path = io.write_text(tmp_path / "a.txt", "old")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        io.write_text(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_npz_bytes_are_what_np_savez_writes(tmp_path: Path):
    arrays = {"arr_0": np.arange(12, dtype=np.uint8).reshape(3, 4), "arr_1": np.array([3, 1])}
    digest = io.write_npz(tmp_path / "a.npz", **arrays)
    np.savez(tmp_path / "b.npz", **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert digest == io.sha256_file(tmp_path / "b.npz")


def test_fingerprints_ignore_key_order():
    assert io.fingerprint({"a": 1, "b": [1, 2]}) == io.fingerprint({"b": [1, 2], "a": 1})
    assert io.fingerprint({"a": 1}) != io.fingerprint({"a": 2})


def test_the_same_weights_are_the_same_bytes_in_every_process(tmp_path: Path):
    files = [tmp_path / f"w{i}.safetensors" for i in range(6)]
    for path in files:  # separate processes: each has its own hash seed for the library's metadata map
        subprocess.run([sys.executable, "-c", WRITE_WEIGHTS, str(path)], check=True, timeout=120)
    assert len({p.read_bytes() for p in files}) == 1
    header = files[0].read_bytes()[8:200].decode(errors="replace")
    assert '"__metadata__":{"latent_scale":"0.5","run":"r","step":"7"}' in header
