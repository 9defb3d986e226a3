"""A corpus of malformed params files (hypothesis mutations of the shipped params.yaml: keys removed, duplicated or
added, values of the wrong type or out of range) through every stage command of the CLI. Each case either works or
exits 2 with `error:` (never a traceback), and every file written before is byte-identical afterwards.

The raw data roots point at an empty folder and downloads are off, so a command that accepts its params fails fast at
its missing input (which is also an exit-2 error naming it) instead of training or sharding for real."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusion import cli

REPO = Path(__file__).resolve().parents[2]
BAD_VALUES = ("x", "", None, [], [1, "a"], {}, {"k": 1}, -1, 0, 1e12, 2**70, -0.5, True, 3.5)
CASES = 20  # hypothesis examples in the default suite; each runs every command below
CASES_SLOW = 200  # the same corpus, larger (`pytest -m slow`)


def base_params(empty: Path) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for cfg in raw["datasets"].values():
        cfg |= {"root": str(empty), "download": False}
    return raw


def leaf_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of the YAML data, mappings and leaves alike."""
    if not isinstance(node, dict):
        return [prefix]
    paths = [prefix] if prefix else []
    for key, value in node.items():
        paths += leaf_paths(value, (*prefix, key))
    return paths


def commands(root: Path, params: Path) -> list[list[str]]:
    p, out = ["--params", str(params)], root / "out"
    return [
        [*p, "shard", "--dataset", "fashion_mnist", "--out", str(out / "shards")],
        [*p, "train", "rin_fmnist", "--shards", str(root / "shards"), "--out", str(out / "train"), "--device", "cpu"],
        [*p, "train", "meme_fmnist_e1", "--shards", str(root / "shards"), "--out", str(out / "e1"), "--device", "cpu"],
        [*p, "sample", "rin_fmnist", "--weights", str(root / "weights"), "--shards", str(root / "shards"), "--out",
         str(out / "samples"), "--device", "cpu"],
        [*p, "refstats", "--dataset", "fashion_mnist", "--shards", str(root / "shards"), "--out",
         str(out / "ref.npz")],
        [*p, "evaluate", "rin_fmnist", "--samples", str(root / "samples.npz"), "--cost", str(root / "cost.json"),
         "--refstats", str(root / "ref.npz"), "--out", str(out / "eval")],
        [*p, "fourier", "--weights", f"unet_fmnist={root / 'weights'}", "--shards",
         f"fashion_mnist={root / 'shards'}", "--out", str(out / "fourier")],
        [*p, "autoencoder", "latent", "--source", str(root / "shards"), "--out", str(out / "latent")],
        [*p, "report", "--runs", f"rin_fmnist={root / 'runs' / 'rin_fmnist'}", "--out", str(out / "report")],
    ]


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def mutate(raw: dict, path: tuple, op: str, value: Any) -> str:
    """The params.yaml text after one mutation at `path`."""
    out = copy.deepcopy(raw)
    node = out
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if op == "delete":
        del node[last]
    elif op == "set":
        node[last] = value
    elif op == "unknown":
        if isinstance(node[last], dict):
            node[last]["no_such_key"] = 1
        else:
            node[f"{last}_typo"] = node[last]
    text = yaml.safe_dump(out, sort_keys=False)
    if op == "duplicate":  # a key written twice: YAML would keep the last silently
        indent = "  " * (len(path) - 1)
        line = f"{indent}{last}:"
        lines = text.splitlines()
        for i, row in enumerate(lines):
            if row.startswith(line):
                lines.insert(i, f"{indent}{last}: 0" if not row.rstrip().endswith(":") else f"{indent}{last}: {{}}")
                break
        text = "\n".join(lines) + "\n"
    return text


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name in ("empty", "shards", "weights", "runs/rin_fmnist"):
        (root / name).mkdir(parents=True)
    (root / "samples.npz").write_bytes(b"not an npz")  # artefacts that exist but are bad
    (root / "cost.json").write_text("{")
    (root / "ref.npz").write_bytes(b"\x00" * 64)
    return root


def check_one_case(corpus_root: Path, data, capsys) -> None:
    raw = base_params(corpus_root / "empty")
    path = data.draw(st.sampled_from(leaf_paths(raw)), label="key")
    op = data.draw(st.sampled_from(["delete", "set", "set", "duplicate", "unknown"]), label="op")
    value = data.draw(st.sampled_from(BAD_VALUES), label="value") if op == "set" else None
    params = corpus_root / "params.yaml"
    params.write_text(mutate(raw, path, op, value))
    before = snapshot(corpus_root)
    for argv in commands(corpus_root, params):
        code = cli.main(argv)  # an uncaught exception (a traceback) fails the test here
        err = capsys.readouterr().err
        assert code in (0, 2), (argv[2], code, err[-2000:])
        if code == 2:
            assert err.strip().splitlines()[-1].startswith("error: "), (argv[2], err[-2000:])
        after = snapshot(corpus_root)
        changed = [k for k, v in before.items() if after.get(k) != v and not k.startswith("out/")]
        assert not changed, (argv[2], changed)


SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=CASES, **SETTINGS)
@given(data=st.data())
def test_malformed_params_never_give_a_traceback_and_lose_nothing(corpus_root: Path, data, capsys):
    check_one_case(corpus_root, data, capsys)


@pytest.mark.slow
@settings(max_examples=CASES_SLOW, **SETTINGS)
@given(data=st.data())
def test_a_larger_corpus_of_malformed_params_never_gives_a_traceback(corpus_root: Path, data, capsys):
    check_one_case(corpus_root, data, capsys)
