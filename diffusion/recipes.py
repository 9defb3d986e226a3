"""A run's settings beside the paper's recipe (recipes.yaml): what `python -m diffusion.cli recipe RUN` prints and
the report counts per row. A run's settings are flat dotted keys (dataset, dataset.*, model.<preset field>,
model.class_conditional, diffusion.*, train.*, sample.*, eval.*); a recipe row gives some of them a value and a
source. This module compares; it builds no model (the caller passes the run's resolved model configuration)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion.config import ConfigError, RunConfig, load_yaml

RECIPES_FILE = Path("recipes.yaml")
DATASET_KEYS = ("resolution", "channels", "frames", "random_flip", "num_classes")
SKIPPED = {"experts"}  # nested configurations (an ensemble's experts): their own runs carry their settings


@dataclass(frozen=True)
class Entry:
    value: Any
    source: str  # a key of `sources`
    note: str = ""
    official: Any = None  # the authors' code's value where it differs from the paper's


@dataclass(frozen=True)
class Recipes:
    sources: dict[str, str]
    rows: dict[str, dict[str, Entry]]  # "<table>.<row>" -> setting -> entry
    kept: dict[str, dict[str, str]]  # run -> setting -> why it differs on purpose


@dataclass(frozen=True)
class Setting:
    key: str
    ours: Any
    paper: Any  # None: the sources do not give it
    status: str  # "same", "differs", "kept", "not given"
    source: str = ""  # the source's full wording
    note: str = ""  # the row's note, the official value, or why a difference is kept


def load_recipes(path: str | Path = RECIPES_FILE) -> Recipes:
    """recipes.yaml, checked: every entry has a value and a source that `sources` names."""
    raw = load_yaml(path)
    if not isinstance(raw, Mapping) or not all(isinstance(raw.get(k), Mapping) for k in ("sources", "rows", "kept")):
        raise ConfigError(f"{path}: needs the mappings sources, rows and kept")
    sources = {str(k): str(v) for k, v in raw["sources"].items()}
    rows: dict[str, dict[str, Entry]] = {}
    for row, entries in raw["rows"].items():
        if not isinstance(entries, Mapping):
            raise ConfigError(f"{path}: rows.{row} must map settings to {{value, source}}")
        rows[row] = {}
        for key, entry in entries.items():
            where = f"{path}: rows.{row}.{key}"
            if not isinstance(entry, Mapping) or "value" not in entry or "source" not in entry:
                raise ConfigError(f"{where}: needs `value` and `source`")
            unknown = sorted(set(entry) - {"value", "source", "note", "official"})
            if unknown:
                raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: value, source, note, official")
            if entry["source"] not in sources:
                raise ConfigError(f"{where}: source {entry['source']!r} is not one of `sources` {sorted(sources)}")
            rows[row][key] = Entry(entry["value"], entry["source"], str(entry.get("note", "")), entry.get("official"))
    kept = {str(run): {str(k): str(v) for k, v in (why or {}).items()} for run, why in raw["kept"].items()}
    return Recipes(sources, rows, kept)


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if f.name not in SKIPPED:
                _flat(f"{prefix}.{f.name}", getattr(value, f.name), out)
    elif isinstance(value, tuple | list):
        out[prefix] = [v for v in value]
    else:
        out[prefix] = value


def run_settings(run: RunConfig, model_cfg: Any) -> dict[str, Any]:
    """Every setting of a run as flat dotted keys, its model part from the resolved preset `model_cfg` (an ensemble's
    model: its router; its experts' presets are their own runs' settings)."""
    out: dict[str, Any] = {"dataset": run.dataset_name}
    for key in DATASET_KEYS:
        out[f"dataset.{key}"] = getattr(run.dataset, key)
    out["model.family"], out["model.preset"] = run.model.family, run.model.preset
    out["model.class_conditional"] = run.model.class_conditional
    if run.model.experts:
        out["model.experts"] = list(run.model.experts)
    _flat("model", model_cfg, out)
    for section in ("diffusion", "train", "sample", "eval"):
        # an ensemble trains nothing itself: its training settings are its experts' (expert 1's, with its interval)
        source = run.experts[0] if section == "train" and run.experts else run
        _flat(section, getattr(source, section), out)
    return out


def same(a: Any, b: Any) -> bool:
    """Equal as settings: numbers within 1e-9 relative, lists and tuples element-wise, bools only to bools."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def row_key(params_report: Mapping[str, Any], run: str) -> str | None:
    """"<table>.<row>" of the paper row a run reproduces (evaluation.report), or None when it has none."""
    placement = params_report.get(run)
    return f"{placement.table}.{placement.row}" if placement is not None else None


def compare(settings: Mapping[str, Any], recipes: Recipes, row: str, run: str) -> list[Setting]:
    """Each of the run's settings beside the row's recipe, in the run's key order; recipe keys the run lacks come
    last, as differences (a setting the paper has and this run cannot express)."""
    if row not in recipes.rows:
        raise ConfigError(f"recipes.yaml: no recipe for the paper row {row!r}; rows are {sorted(recipes.rows)}")
    entries, kept = recipes.rows[row], recipes.kept.get(run, {})
    out = []
    for key, ours in settings.items():
        entry = entries.get(key)
        if entry is None:
            out.append(Setting(key, ours, None, "not given"))
            continue
        note = entry.note
        if entry.official is not None:
            note = f"authors' code: {entry.official}" + (f"; {note}" if note else "")
        if same(ours, entry.value):
            status = "same"
        elif key in kept:
            status, note = "kept", kept[key]
        else:
            status = "differs"
        out.append(Setting(key, ours, entry.value, status, recipes.sources[entry.source], note))
    for key, entry in entries.items():
        if key not in settings:
            out.append(Setting(key, None, entry.value, "differs", recipes.sources[entry.source],
                               "no such setting in this run"))
    return out


def differences(rows: list[Setting]) -> list[Setting]:
    return [r for r in rows if r.status == "differs"]
