"""Model families and their presets: turns a run's `model:` section into a validated config and a module. The only
importer of the model packages, each imported when a run of its family needs it (FAMILIES), so a stage's code is
the engine plus the family its run uses.

A family package exposes in `<family>/presets.py`: PRESETS (name -> config dataclass with `validate()`,
`data_shape`, `channels`, `num_classes`, `self_cond`), `build(cfg) -> nn.Module`, and optionally PAPER_PARAMS
(preset -> the paper's parameter count) and ENSEMBLE (the preset name of a router over expert runs)."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping, Sequence

from torch import nn

from diffusion.config import AutoencoderConfig, ConfigError, DatasetConfig, Params, RunConfig, load_params
from diffusion.typed import check_ranges, convert

FAMILIES = ("rin", "meme")  # model packages; a new family is a package with presets.py and an entry here
FIRST_STAGE_FAMILY = "meme"  # the package that holds the latent datasets' autoencoder (meme/autoencoder.py)

# Fields a run may not override: they follow from the dataset and from train.self_cond_rate.
DERIVED = {"data_shape": "datasets.<name>.resolution/frames", "channels": "datasets.<name>.channels",
           "num_classes": "model.class_conditional and datasets.<name>.num_classes",
           "self_cond": "train.self_cond_rate"}


def family(name: str) -> types.ModuleType:
    """`<name>.presets`, imported on first use."""
    if name not in FAMILIES:
        raise ConfigError(f"model family {name!r} is not registered (available: {', '.join(FAMILIES)})")
    return importlib.import_module(f"{name}.presets")


def presets(name: str) -> dict[str, typing.Any]:
    """A family's presets, with its ensemble template (if it has one) under the template's name."""
    fam = family(name)
    ensemble = getattr(fam, "ENSEMBLE", None)
    return dict(fam.PRESETS) | ({ensemble[0]: ensemble[1]} if ensemble else {})


def all_presets() -> dict[str, tuple[str, typing.Any]]:
    """Every standalone network preset of every family: name -> (family, config)."""
    return {name: (fam, cfg) for fam in FAMILIES for name, cfg in family(fam).PRESETS.items()}


def paper_params(fam: str) -> dict[str, str]:
    """A family's preset parameter counts as the papers give them, where they give one."""
    return dict(getattr(family(fam), "PAPER_PARAMS", {}))


def apply_overrides(base: typing.Any, overrides: Mapping[str, typing.Any], path: str) -> typing.Any:
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
    """The model config a run trains: its preset, shaped to its dataset, with its overrides applied. For an ensemble
    (the family's ENSEMBLE preset), the router's config over its expert runs' resolved models."""
    path = f"{run.params_key}.model"
    table = presets(run.model.family)
    if run.model.preset not in table:
        raise ConfigError(f"params.yaml: {path}.preset must be one of {sorted(table)}, got {run.model.preset!r}")
    ensemble = getattr(family(run.model.family), "ENSEMBLE", (None,))[0]
    multi = run.model.preset == ensemble
    if multi != bool(run.model.experts):
        raise ConfigError(f"params.yaml: {path}.experts lists the expert runs of a multi-expert run: give it exactly "
                          f"when the preset is the family's ensemble preset ({ensemble or 'none in this family'})")
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
    check_ranges(cfg, f"{path}.overrides")  # before validate(), which divides by some of them
    if multi:
        cfg = dataclasses.replace(cfg, experts=tuple(resolve_model(e) for e in run.experts),
                                  train_schedule=run.experts[0].diffusion.train_schedule if run.experts else None)
    try:
        cfg.validate()
    except ValueError as err:
        raise ConfigError(f"params.yaml: {path}: {err}") from None
    return cfg


def build(fam: str, cfg: typing.Any) -> nn.Module:
    """A freshly initialised network of family `fam` for a resolved config."""
    return family(fam).build(cfg)


def build_model(run: RunConfig) -> nn.Module:
    return build(run.model.family, resolve_model(run))


def with_weights(run: RunConfig, state_dicts: Sequence[Mapping[str, typing.Any]],
                 path_of: Sequence[typing.Any] = ()) -> nn.Module:
    """The run's network with trained weights: one state dict, or for an ensemble one per expert run, in order.
    Weights of another architecture are a ConfigError naming the file (`path_of`) and the run's model settings."""
    model = build_model(run)
    wanted = len(run.experts) or 1
    if len(state_dicts) != wanted:
        raise ConfigError(f"{run.params_key}: {wanted} network(s) but {len(state_dicts)} weight files")
    try:
        if run.experts:
            family(run.model.family).load_experts(model, state_dicts)
        else:
            model.load_state_dict(state_dicts[0])
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        where = ", ".join(str(p) for p in path_of) or "the weights"
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"{where}: weights of another architecture than {run.params_key}.model ({first} ...); "
                          "re-train the run, or restore the params.yaml it was trained with") from None
    return model


def first_stage_module() -> types.ModuleType:
    """The module of the latent datasets' autoencoder (`<FIRST_STAGE_FAMILY>/autoencoder.py`), imported on first use."""
    return importlib.import_module(f"{FIRST_STAGE_FAMILY}.autoencoder")


def check_autoencoder(name: str, cfg: AutoencoderConfig, dataset: DatasetConfig) -> None:
    try:
        first_stage_module().check_shapes(cfg, dataset)
    except ValueError as err:
        raise ConfigError(f"params.yaml: autoencoders.{name}: {err}") from None


def build_autoencoder(cfg: AutoencoderConfig, channels: int) -> nn.Module:
    """A latent dataset's autoencoder, freshly initialised."""
    return first_stage_module().Autoencoder(cfg, channels)


def first_stage(model: nn.Module, scale: float, path, sha256: str):
    """A trained autoencoder as runs use it: encode to scaled latents, decode back (the family's FirstStage)."""
    return first_stage_module().FirstStage(model, scale, path, sha256)


def autoencoder_loss(model: nn.Module, x, generator=None):
    return first_stage_module().autoencoder_loss(model, x, generator)


def check(params: Params, runs: Sequence[str] | None = None) -> None:
    """The model part of params.yaml, checked at the edge (loading params.yaml imports no model): every run's preset
    and overrides resolve to a buildable config, every autoencoder fits its dataset. `runs` limits the run check."""
    for name, ae in params.autoencoders.items():
        check_autoencoder(name, ae, params.datasets[ae.dataset])
    for name, run in params.all_runs.items():
        if runs is None or name in runs:
            resolve_model(run)


def load_run(params_file: str, name: str) -> tuple[Params, RunConfig]:
    """params.yaml, one of its runs, and the run's model part checked (presets and overrides, its experts' too)."""
    params = load_params(params_file)
    run = params.run(name)
    check(params, runs=[name, *(e.name for e in run.experts)])
    return params, run
