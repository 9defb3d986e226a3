"""Model families and their presets: turns a run's `model:` section into a validated config and a module."""

from __future__ import annotations

import dataclasses
import typing

from torch import nn

from diffusion.config import ConfigError, RunConfig, convert

# Fields a run may not override: they follow from the dataset and from train.self_cond_rate.
DERIVED = {"data_shape": "datasets.<name>.resolution/frames", "channels": "datasets.<name>.channels",
           "num_classes": "model.class_conditional and datasets.<name>.num_classes",
           "self_cond": "train.self_cond_rate"}


def presets(family: str) -> dict[str, typing.Any]:
    if family == "rin":
        from rin.presets import PRESETS

        return PRESETS
    if family == "meme":
        from meme.presets import MULTI_EXPERT, PRESETS

        return PRESETS | {"multi_expert": MULTI_EXPERT}
    raise ConfigError(f"model family {family!r} has no presets (available: rin, meme)")


def all_presets() -> dict[str, typing.Any]:
    """Every standalone network preset (the multi_expert template is built from a run's experts, not alone)."""
    from meme.presets import PRESETS as MEME

    return dict(presets("rin")) | MEME


def paper_params() -> dict[str, str]:
    """A preset's parameter count as the paper gives it, where the paper gives one."""
    from meme.presets import PAPER_PARAMS

    return dict(PAPER_PARAMS)


def apply_overrides(base: typing.Any, overrides: dict[str, typing.Any], path: str) -> typing.Any:
    """dataclasses.replace with each override type-checked against the preset's field type."""
    hints = typing.get_type_hints(type(base))
    for key in overrides:
        if key in DERIVED:
            raise ConfigError(f"params.yaml: {path}.{key} cannot be overridden; it is set by {DERIVED[key]}")
        if key not in hints:
            allowed = sorted(set(hints) - set(DERIVED))
            raise ConfigError(f"params.yaml: unknown key {path}.{key}; allowed keys are {allowed}")
    values = {k: convert(hints[k], v, f"{path}.{k}") for k, v in overrides.items()}
    return dataclasses.replace(base, **values)


def resolve_model(run: RunConfig) -> typing.Any:
    """The model config a run trains: its preset, shaped to its dataset, with its overrides applied. For a
    multi-expert run (preset multi_expert), the router's config over its expert runs' resolved models."""
    path = f"{run.params_key}.model"
    table = presets(run.model.family)
    if run.model.preset not in table:
        raise ConfigError(f"params.yaml: {path}.preset must be one of {sorted(table)}, got {run.model.preset!r}")
    multi = run.model.family == "meme" and run.model.preset == "multi_expert"
    if multi != bool(run.model.experts):
        raise ConfigError(f"params.yaml: {path}.experts lists the expert runs of a multi-expert run: give it exactly "
                          "when family is meme and preset is multi_expert")
    ds = run.dataset
    if run.model.class_conditional and ds.num_classes == 0:
        raise ConfigError(
            f"params.yaml: {path}.class_conditional is true but dataset {run.dataset_name!r} has no labels"
        )
    spatial = (ds.frames, ds.resolution, ds.resolution) if ds.frames else (ds.resolution, ds.resolution)
    channels = ds.channels
    if run.autoencoder is not None:  # a latent dataset: the model sees the autoencoder's latents
        channels, *spatial = run.autoencoder.latent_shape(ds.resolution)
    cfg = dataclasses.replace(
        table[run.model.preset],
        data_shape=tuple(spatial),
        channels=channels,
        num_classes=ds.num_classes if run.model.class_conditional else 0,
        self_cond=run.train.self_cond_rate > 0,
    )
    cfg = apply_overrides(cfg, run.model.overrides, f"{path}.overrides")
    if multi:
        cfg = dataclasses.replace(cfg, experts=tuple(resolve_model(e) for e in run.experts),
                                  train_schedule=run.experts[0].diffusion.train_schedule if run.experts else None)
    try:
        cfg.validate()
    except ValueError as err:
        raise ConfigError(f"params.yaml: {path}: {err}") from None
    return cfg


def build(cfg: typing.Any) -> nn.Module:
    from meme.experts import MultiExpertConfig, build_multi_expert
    from meme.unet import UNet, UNetConfig
    from rin.model import RIN, RINConfig

    if isinstance(cfg, RINConfig):
        return RIN(cfg)
    if isinstance(cfg, UNetConfig):
        return UNet(cfg)
    if isinstance(cfg, MultiExpertConfig):
        return build_multi_expert(cfg)
    raise TypeError(f"no model for config type {type(cfg).__name__}")


def build_model(run: RunConfig) -> nn.Module:
    return build(resolve_model(run))
