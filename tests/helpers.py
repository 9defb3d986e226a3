"""Shared test builders: configs without params.yaml, tiny models."""

from __future__ import annotations

import copy
import dataclasses

from diffusion.config import SampleConfig, ScheduleConfig
from rin.model import RIN, RINConfig
from rin.presets import PRESETS


def sample_config(**kw) -> SampleConfig:
    base = dict(sampler="ddpm", steps=8, schedule=ScheduleConfig("cosine", 0.0, 1.0, 1.0), variance="large", eta=0.0,
                clip_x0=True, td=0.0, num_samples=4, batch_size=4, seed=0, use_ema=False)
    return SampleConfig(**(base | kw))


def tiny_rin(**kw) -> RIN:
    return RIN(dataclasses.replace(PRESETS["rin_tiny"], **kw))


def tiny_config(**kw) -> RINConfig:
    return dataclasses.replace(PRESETS["rin_tiny"], **kw)


def with_key(raw: dict, path: str, value, delete: bool = False) -> dict:
    """A deep copy of a params dict with the dotted `path` set to `value` (or deleted); missing parents are made."""
    out = copy.deepcopy(raw)
    node = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return out



def load_checked(raw: dict):
    """What a stage does with params.yaml: parse it (diffusion.config), then let the registry check the model part."""
    from diffusion import registry
    from diffusion.config import parse_params

    params = parse_params(raw)
    registry.check(params)
    return params


def run_dirs(outputs, names) -> dict:
    """The report stage's --runs pairs for a folder laid out like outputs/: name -> outputs/<name>."""
    return {name: outputs / name for name in names}
