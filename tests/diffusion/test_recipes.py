"""The paper-scale runs (params.yaml `paper`), the recipe check against recipes.yaml, and the compute plan."""

import dataclasses

import pytest
import torch

from diffusion import cli, registry
from diffusion.config import ConfigError, load_yaml, parse_params
from diffusion.flops import count_flops, step_cost
from diffusion.recipes import compare, differences, load_recipes, run_settings
from diffusion.stages.plan import plan
from diffusion.stages.report import PAPER_TABLES, check_mapping
from tests.helpers import with_key

RAW = load_yaml("params.yaml")
PAPER_RUNS = sorted(parse_params(RAW).paper.all_runs)


def _recipe(raw, name):
    params, run = parse_params(raw).any_run(name)
    placement = params.evaluation.report[name]
    rows = compare(run_settings(run, registry.resolve_model(run)), load_recipes(), f"{placement.table}."
                   f"{placement.row}", name)
    return rows


def test_paper_section_is_checked_and_never_built_by_dvc_repro():
    params = parse_params(RAW)
    paper = params.paper
    assert {"rin_cifar10", "rin_imagenet64", "rin_kinetics600", "meme_ffhq256", "ldm_l_ffhq256"} <= set(paper.all_runs)
    registry.check(paper)
    check_mapping(paper.evaluation.report)
    assert not set(paper.all_runs) & set(params.all_runs)  # dvc.yaml loops over the pipeline's sections only
    assert all(r.params_key.startswith("paper.") for r in paper.all_runs.values())
    bad = with_key(RAW, "paper.runs.rin_cifar10.train.lr", 5.0)
    with pytest.raises(ConfigError, match=r"rin_cifar10\.train\.lr.*paper"):
        parse_params(bad)
    with pytest.raises(ConfigError, match="unknown key paper.defaults"):
        parse_params(with_key(RAW, "paper.defaults", {}))


@pytest.mark.parametrize("name", ["rin_cifar10", "rin_imagenet64", "rin_kinetics600", "ldm_l_ffhq256",
                                  "meme_ffhq256", "meme_celebahq256"])
def test_paper_runs_follow_their_recipe(name):
    """Every setting recipes.yaml gives for the run's paper row equals the run's, the model's from its preset."""
    rows = _recipe(RAW, name)
    assert sum(r.status == "same" for r in rows) >= 5
    assert differences(rows) == []


def test_cifar10_recipe_holds_the_official_values():
    """The official CIFAR-10 config's values that this issue found missing are in the recipe, and the paper run
    has them: class-conditional, drop_path 0.1 on every layer, cosine@0.8, no clipping, no key/value LayerNorm."""
    rows = {r.key: r for r in _recipe(RAW, "rin_cifar10")}
    for key, value in {"model.class_conditional": True, "model.drop_path": 0.1, "model.drop_path_schedule": "constant",
                       "train.lr_decay_fraction": 0.8, "train.grad_clip": 0.0, "model.rw_kv_norm": False,
                       "model.noise_embed_pix2seq": True, "model.patch": [2, 2]}.items():
        assert rows[key].paper == value and rows[key].ours == value and rows[key].status == "same", key
    patch = {r.key: r for r in _recipe(RAW, "rin_imagenet64")}["model.patch"]
    assert patch.paper == [4, 4] and "[8, 8]" in patch.note  # the paper wins; the authors' 8 is recorded


@pytest.mark.parametrize("key,value", [("train.grad_clip", 1.0), ("train.lr_decay_fraction", 1.0),
                                       ("model.class_conditional", False), ("train.lr", 1.0e-3)])
def test_recipe_flags_a_setting_that_leaves_the_paper(key, value):
    raw = with_key(RAW, f"paper.runs.rin_cifar10.{key}", value)
    assert [r.key for r in differences(_recipe(raw, "rin_cifar10"))] == [key]


def test_model_overrides_and_kept_differences():
    raw = with_key(RAW, "paper.runs.rin_cifar10.model.overrides", {"drop_path": 0.0})
    rows = _recipe(raw, "rin_cifar10")
    assert [r.key for r in differences(rows)] == ["model.drop_path"]
    recipes = load_recipes()
    recipes = dataclasses.replace(recipes, kept={"rin_cifar10": {"model.drop_path": "a reason"}})
    params, run = parse_params(raw).any_run("rin_cifar10")
    rows = compare(run_settings(run, registry.resolve_model(run)), recipes, "rin_table2.cifar10", "rin_cifar10")
    (row,) = [r for r in rows if r.key == "model.drop_path"]
    assert row.status == "kept" and row.note == "a reason" and differences(rows) == []


def test_recipes_file_errors_name_the_entry(tmp_path):
    path = tmp_path / "recipes.yaml"
    path.write_text("sources: {a: A}\nrows: {t.r: {train.lr: {value: 1, source: b}}}\nkept: {}\n")
    with pytest.raises(ConfigError, match=r"rows\.t\.r\.train\.lr: source 'b' is not one of"):
        load_recipes(path)
    path.write_text("sources: {a: A}\nrows: {t.r: {train.lr: {value: 1}}}\nkept: {}\n")
    with pytest.raises(ConfigError, match="needs `value` and `source`"):
        load_recipes(path)


def test_recipe_and_plan_commands(capsys):
    assert cli.main(["recipe", "rin_cifar10"]) == 0
    out = capsys.readouterr().out
    assert "paper.runs.rin_cifar10 beside rin_table2.cifar10" in out and ": 0 differ;" in out
    assert cli.main(["recipe", "rin_fmnist"]) == 0  # the CPU run, set beside the CIFAR-10 recipe
    assert "DIFFERS" in capsys.readouterr().out
    assert cli.main(["recipe", "no_such_run"]) == 2
    assert "paper-scale runs (section paper)" in capsys.readouterr().err
    assert cli.main(["recipe", "multi_unet_fmnist_e1"]) == 2  # an expert has no paper row of its own
    assert "has no paper row" in capsys.readouterr().err
    assert cli.main(["plan", "rin_imagenet64", "--gpus", "8", "--tflops", "150"]) == 0
    out = capsys.readouterr().out
    assert "x batch 1024 x 150000 steps" in out and "assumed 150 achieved TFLOP/s" in out


def test_plan_counts_match_a_real_model_and_scale_with_devices():
    """The meta-device counts equal a real model's; the totals are per-example x batch x steps (plus the
    self-conditioning pass), and time falls as 1 / devices."""
    params = parse_params(RAW)
    run = params.run("rin_fmnist")
    cfg = registry.resolve_model(run)
    model = registry.build("rin", cfg)
    x, gamma = torch.randn(1, cfg.channels, *cfg.data_shape), torch.full((1,), 0.5)
    model.eval()
    with torch.no_grad():
        real_forward, _ = count_flops(lambda: model(x, gamma, None, None))
    cost = step_cost(lambda: registry.build("rin", cfg), cfg.data_shape, cfg.channels)
    assert cost.forward_flops == real_forward and cost.params == sum(p.numel() for p in model.parameters())
    assert 2.5 * cost.forward_flops < cost.train_flops < 3.5 * cost.forward_flops
    one = plan(params, run, 1, 100.0)
    assert one.train_pflop == pytest.approx(cost.train_flops * run.train.batch_size * run.train.steps / 1e15)
    sc_run = dataclasses.replace(run, train=dataclasses.replace(run.train, self_cond_rate=0.9))
    sc_cfg = registry.resolve_model(sc_run)  # with the warm-start path, which runs on zeros in the first pass
    sc = step_cost(lambda: registry.build("rin", sc_cfg), cfg.data_shape, cfg.channels)
    assert sc.forward_flops > cost.forward_flops
    assert plan(params, sc_run, 1, 100.0).train_pflop == pytest.approx(
        (sc.train_flops + sc.forward_flops) * run.train.batch_size * run.train.steps / 1e15)
    assert one.sample_pflop == pytest.approx(cost.forward_flops * run.sample.num_samples * run.sample.steps / 1e15)
    four = plan(params, run, 4, 100.0)
    assert four.train_hours == pytest.approx(one.train_hours / 4) and four.memory_gib < one.memory_gib
    with pytest.raises(ConfigError, match="--gpus must be >= 1"):
        plan(params, run, 0, 100.0)


@pytest.mark.parametrize("name", PAPER_RUNS)
def test_plan_works_for_every_paper_run(name):
    params, run = parse_params(RAW).any_run(name)
    result = plan(params, run, 8, 100.0)
    assert result.train_pflop > 0 and result.memory_gib > 0
    assert (result.sample_pflop > 0) == (run.section != "experts")
    if run.experts:  # an ensemble's training is its experts'
        assert result.params == sum(plan(params, e, 8, 100.0).params for e in run.experts)


def test_every_report_row_with_a_recipe_exists():
    rows = {f"{t.key}.{r.key}" for t in PAPER_TABLES.values() for r in t.rows}
    assert set(load_recipes().rows) <= rows


def test_report_counts_each_rows_differences_from_the_recipe():
    from diffusion.stages.report import recipe_differences

    diffs = recipe_differences(parse_params(RAW), "recipes.yaml")
    assert {"model.patch", "dataset", "train.optimizer"} <= set(diffs["rin_fmnist"])  # CPU run vs CIFAR-10's recipe
    assert "diffusion.context_frames" not in diffs["rin_moving_fmnist"]  # 5 context frames, as the paper predicts 11
    assert "train.expert.count" not in diffs["meme_fmnist"]  # an ensemble's training is its experts'
