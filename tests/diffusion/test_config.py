"""params.yaml loading: the shipped file is valid; bad input is rejected with the key path named, by the loader (types,
ranges, keys) or by the registry's check at the edge (presets and overrides); loading imports no torch."""

import subprocess
import sys

import pytest
import yaml

from diffusion.config import ConfigError, load_params, parse_params
from diffusion.registry import resolve_model
from tests.helpers import load_checked, with_key


@pytest.fixture(scope="module")
def raw():
    with open("params.yaml") as fh:
        return yaml.safe_load(fh)




def test_shipped_params_load():
    params = load_params("params.yaml")
    assert "rin_fmnist" in params.runs
    run = params.run("rin_fmnist")
    assert run.dataset is params.datasets[run.dataset_name]
    assert resolve_model(run).data_shape == (run.dataset.resolution, run.dataset.resolution)


def test_run_overrides_merge_over_defaults(raw):
    params = parse_params(with_key(raw, "runs.rin_fmnist.train.lr", 0.5))
    assert params.run("rin_fmnist").train.lr == 0.5
    assert params.run("rin_fmnist").train.beta2 == raw["defaults"]["train"]["beta2"]


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("runs.rin_fmnist.train.learning_rate", 0.1, r"unknown key runs\.rin_fmnist\.train\.learning_rate.*allowed"),
        ("runs.rin_fmnist.train.steps", "many", r"runs\.rin_fmnist\.train\.steps must be an integer, got 'many'"),
        ("runs.rin_fmnist.train.steps", 2.5, r"runs\.rin_fmnist\.train\.steps must be an integer"),
        ("runs.rin_fmnist.train.precision", "fp16", r"train\.precision must be one of 'fp32', 'bf16', got 'fp16'"),
        ("runs.rin_fmnist.train.lr", -1, r"runs\.rin_fmnist\.train\.lr must be > 0 and <= 1, got -1"),
        ("runs.rin_fmnist.train.self_cond_rate", 1.5, r"self_cond_rate must be >= 0 and <= 1, got 1\.5"),
        ("runs.rin_fmnist.sample.clip_x0", "yes", r"sample\.clip_x0 must be true or false"),
        ("runs.rin_fmnist.diffusion.prediction", "score", r"diffusion\.prediction must be one of 'eps', 'x0', 'v'"),
        ("runs.rin_fmnist.dataset", "imagenet", r"runs\.rin_fmnist\.dataset must name one of the datasets"),
        ("datasets.fashion_mnist.channels", 2, r"datasets\.fashion_mnist\.channels must be one of 1, 3, got 2"),
        ("runs.rin_fmnist.model.preset", "rin_huge", r"model\.preset must be one of \["),
        ("runs.rin_fmnist.model.overrides", {"latent_width": 3}, r"unknown key runs\.rin_fmnist\.model\.overrides\."),
        ("runs.rin_fmnist.model.overrides", {"num_blocks": "3"}, r"overrides\.num_blocks must be an integer"),
        ("runs.rin_fmnist.model.overrides", {"channels": 3}, r"overrides\.channels cannot be overridden"),
        ("runs.rin_fmnist.model.overrides", {"patch": [3, 3]}, r"patch \(3, 3\) must divide data_shape"),
        ("runs.rin_fmnist.model.overrides", {"num_blocks": -2}, r"overrides\.num_blocks must be >= 1, got -2"),
        ("runs.rin_fmnist.model.overrides", {"process_layers": 0}, r"overrides\.process_layers must be >= 1"),
        ("runs.rin_fmnist.model.overrides", {"latent_dim": 0}, r"overrides\.latent_dim must be >= 16, got 0"),
        ("runs.rin_fmnist.model.overrides", {"latent_dim": 8}, r"overrides\.latent_dim must be >= 16, got 8"),
        ("runs.rin_fmnist.model.overrides", {"interface_mlp_ratio": -1}, r"interface_mlp_ratio must be > 0"),
        ("runs.rin_fmnist.model.overrides", {"noise_embed_scale": -1}, r"noise_embed_scale must be > 0"),
        ("runs.rin_fmnist.model.overrides", {"latent_heads": 0}, r"overrides\.latent_heads must be >= 1, got 0"),
        ("runs.rin_fmnist.model.overrides", {"dropout": 5.0}, r"overrides\.dropout must be >= 0 and < 1, got 5\.0"),
        ("runs.unet_fmnist.model.overrides", {"num_res_blocks": 0}, r"overrides\.num_res_blocks must be >= 1"),
        ("defaults.sample.schedule", {"kind": "sigmoid", "start": 3, "end": -3, "tau": 1}, r"end must be > .*start"),
        ("runs.rin_fmnist.eval.kid_subset_size", 1, r"runs\.rin_fmnist\.eval\.kid_subset_size must be >= 2, got 1"),
        ("defaults.eval.kid_subsets", 0, r"runs\.rin_fmnist\.eval\.kid_subsets must be >= 1 and <= 10000, got 0"),
        ("runs.rin_fmnist.eval.is_splits", 0, r"runs\.rin_fmnist\.eval\.is_splits must be >= 1, got 0"),
    ],
)
def test_bad_values_name_the_key(raw, path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_checked(with_key(raw, path, value))


def test_loading_params_imports_no_torch_and_no_model():
    code = ("import sys; import diffusion.config as c; c.load_params('params.yaml'); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'rin', 'meme')]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_run_names_its_model_family_in_its_own_section(raw):
    with pytest.raises(ConfigError, match=r"missing key runs\.rin_fmnist\.model\.family"):
        parse_params(with_key(raw, "runs.rin_fmnist.model.family", None, delete=True))
    with pytest.raises(ConfigError, match=r"model family 'resnet' is not registered"):
        load_checked(with_key(raw, "runs.rin_fmnist.model.family", "resnet"))


def test_missing_key_is_named(raw):
    with pytest.raises(ConfigError, match=r"missing key runs\.rin_fmnist\.train\.grad_clip"):
        parse_params(with_key(raw, "defaults.train.grad_clip", None, delete=True))
    with pytest.raises(ConfigError, match=r"missing key datasets\.fashion_mnist\.root"):
        parse_params(with_key(raw, "datasets.fashion_mnist.root", None, delete=True))


def test_pipeline_and_run_sections(raw):
    with pytest.raises(ConfigError, match=r"missing key runs\.rin_fmnist\.eval \(write `eval: \{\}`"):
        parse_params(with_key(raw, "runs.rin_fmnist.eval", None, delete=True))
    with pytest.raises(ConfigError, match=r"pipeline\.datasets\[0\] must name one of the datasets"):
        parse_params(with_key(raw, "pipeline.datasets", ["fashion"]))
    with pytest.raises(ConfigError, match=r"'fashion_mnist' has no shard stage: add it to pipeline\.datasets"):
        parse_params(with_key(raw, "pipeline.datasets", ["mnist"]))


def test_unknown_top_level_and_run_section(raw):
    with pytest.raises(ConfigError, match="unknown top-level key trainer"):
        parse_params(raw | {"trainer": {}})
    with pytest.raises(ConfigError, match=r"unknown key runs\.rin_fmnist\.optim"):
        parse_params(with_key(raw, "runs.rin_fmnist.optim", {}))


def test_configs_are_frozen():
    run = load_params().run("rin_fmnist")
    with pytest.raises(AttributeError):
        run.train.lr = 1.0


@pytest.mark.parametrize("value", [[], {}, 3, None])
def test_a_dataset_that_is_not_a_name_is_a_config_error(value):
    """Found by the malformed-params corpus: `dataset: []` raised TypeError (unhashable) instead of the message."""
    raw = yaml.safe_load(open("params.yaml").read())
    with pytest.raises(ConfigError, match=r"experts\.multi_unet_fmnist_e3\.dataset must name one of the datasets"):
        parse_params(with_key(raw, "experts.multi_unet_fmnist_e3.dataset", value))
