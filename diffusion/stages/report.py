"""The report stage (`python -m diffusion.cli report --runs NAME=DIR ... --fourier DIR --dvc-lock dvc.lock --out
DIR`): RIN Tables 2-3 and MEME Tables 1-2 with our runs' numbers beside the papers' (Markdown tables of at most 8
columns, CSV with every column, LaTeX), a provenance card per row, training curves and sample grids. The papers'
numbers live here, each with its source (arXiv id and table or figure, or the authors' config).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from diffusion import registry
from diffusion.args import named_paths, out_folder, parser
from diffusion.config import ConfigError, Params, ReportRow, load_params
from diffusion.io import write_text
from diffusion.recipes import RECIPES_FILE, compare, differences, load_recipes, run_settings

DASH = "—"
Value = float | int | str | None  # a paper's number, or its exact wording when it is not a plain number


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper's table; None where the sources give no number."""

    key: str  # what params.yaml evaluation.report.<run>.row names
    setting: str  # what the paper evaluated
    metrics: Mapping[str, Value]  # metric column (FID, IS, FVD) -> value
    params: Value  # parameter count in the paper's wording ("31M", "4 x 82.9M")
    gflops: Value  # forward GFLOPs per image (RIN Fig. 1)
    sampling_steps: Value
    samples: Value  # images (clips) behind the FID / FVD
    train_steps: Value
    images_seen: Value  # training steps x batch size
    source: str  # where each number comes from: the paper (arXiv id, table or figure), the authors' configs
    note: str = ""  # what a reader should know about the paper's numbers (in the row's card)

    @property
    def short(self) -> str:
        """The row's name in a report table (its card and the CSV give the setting in full)."""
        return SHORT_NAMES.get(self.key, self.setting)


@dataclass(frozen=True)
class PaperTable:
    key: str  # what params.yaml evaluation.report.<run>.table names
    title: str
    metrics: tuple[str, ...]  # metric columns, keys of METRIC_KEYS; the first is the headline (FID or FVD)
    rows: tuple[PaperRow, ...]
    source: str


METRIC_KEYS = {"FID": "fid", "IS": "inception_score", "FVD": "fvd"}  # column -> key in eval/metrics.json
KERNEL = {"FID": "KID", "FVD": "KVD"}  # the unbiased kernel distance reported beside each Frechet distance
METHOD_NAMES = {"svd": "exact SVD", "sqrtm": "clean-fid sqrtm"}  # eval/metrics.json fid_method -> words
RIN = "RIN (Jabri, Fleet, Chen; ICML 2023; arXiv 2212.11972)"
MEME = "MEME (Lee et al.; AAAI 2024; arXiv 2306.04990)"
PIX2SEQ = "google-research/pix2seq"
RIN_SOURCE = (f"{RIN}: FID and IS from its Table 2 (images) and Table 3 (video), GFLOPs from its Fig. 1; 50k samples "
              f"and 1000 sampling steps as the paper evaluates; training steps and batch sizes from the authors' "
              f"configs ({PIX2SEQ} configs/config_diffusion_cifar10.py, configs/config_diffusion_imagenet64.py)")
MEME_SOURCE = (f"{MEME}. Only the FID deltas -0.62 (FFHQ) and -0.37 (CelebA-HQ) and the ~3.3x speed-up are checked "
               "against the paper (its abstract); the absolute numbers are unverified. LDM-L's size: CompVis/"
               "latent-diffusion configs/latent-diffusion/ffhq-ldm-vq-4.yaml")
RIN_EVAL = dict(sampling_steps=1000, samples=50_000)  # RIN's reported FIDs: 1000 steps and 50k samples


def _rin(key: str, setting: str, metrics: Mapping[str, Value], source: str, **kw: Value) -> PaperRow:
    base: dict[str, Value] = dict(params=None, gflops=None, train_steps=None, images_seen=None) | RIN_EVAL
    return PaperRow(key, setting, metrics, source=source, **(base | kw))


def _meme(key: str, setting: str, fid: Value, params: Value, source: str = "arXiv 2306.04990 Table 1, unverified",
          note: str = "") -> PaperRow:
    return PaperRow(key, setting, {"FID": fid}, params, None, None, None, None, None, source, note)


RIN_TAB2 = "arXiv 2212.11972 Table 2"
MEME_TAB1, MEME_TAB2 = "arXiv 2306.04990 Table 1", "arXiv 2306.04990 Table 2"
PAPER_TABLES: dict[str, PaperTable] = {t.key: t for t in (
    PaperTable("rin_table2", "RIN Table 2: image generation (no guidance, no cascades)", ("FID", "IS"), (
        _rin("cifar10", "CIFAR-10 32x32", {"FID": 1.81, "IS": 10.3},
             f"{RIN_TAB2} (FID); IS 10.3 and 31M params: an author of RIN in a {PIX2SEQ} GitHub issue; steps and "
             f"batch: {PIX2SEQ} configs/config_diffusion_cifar10.py",
             params="31M", train_steps=150_000, images_seen=150_000 * 256),
        _rin("imagenet64", "ImageNet 64x64, class-conditional", {"FID": 1.23, "IS": 66.5},
             f"{RIN_TAB2}; steps and batch: {PIX2SEQ} configs/config_diffusion_imagenet64.py", train_steps=150_000,
             images_seen=150_000 * 1024),
        _rin("imagenet128", "ImageNet 128x128", {"FID": 2.75, "IS": 144.1},
             f"{RIN_TAB2}; GFLOPs: arXiv 2212.11972 Fig. 1", gflops=194),
        _rin("imagenet256", "ImageNet 256x256", {"FID": "4.51 (3.42 with input scaling)"},
             f"{RIN_TAB2}; GFLOPs: Fig. 1; 410M params as later papers cite RIN (not in its tables)",
             params="410M", gflops=334),
        _rin("imagenet512", "ImageNet 512x512", {"FID": "3.95 (input scaling)"},
             f"{RIN_TAB2}; GFLOPs: arXiv 2212.11972 Fig. 1", gflops=425),
    ), RIN_SOURCE),
    PaperTable("rin_table3", "RIN Table 3: video prediction", ("FVD", "IS"), (
        _rin("kinetics600", "Kinetics-600 16x64x64 clips, frame prediction",
             {"FVD": "11.5 (400 steps), 10.8 (1000 steps)", "IS": 17.7},
             "arXiv 2212.11972 Table 3 (FVD and IS: 5 context frames, 11 predicted); GFLOPs: Fig. 1; IS from the "
             f"400 Kinetics-400 I3D logits as {PIX2SEQ} models/video_diffusion_model.py computes it",
             gflops=387, sampling_steps="400 / 1000", samples=None),
    ), RIN_SOURCE),
    PaperTable("meme_table1", "MEME Table 1: latent-space generation, 256x256", ("FID",), (
        _meme("ffhq256_ldm", "FFHQ 256, latent (VQ f=4), LDM-L baseline", "~9.14", "274M",
              f"{MEME_TAB1}, unverified; 274M: CompVis/latent-diffusion configs/latent-diffusion/ffhq-ldm-vq-4.yaml",
              "the paper's 288.2 GMACs for LDM-L count more than the denoiser: ours (`flops --preset ldm_l`) is "
              "101.2 GMACs, one U-Net call on 64x64x3 latents with attention; what the paper adds (first stage, "
              "batch, or steps) is not stated"),
        _meme("ffhq256_ldm_s", "FFHQ 256, latent, LDM-S (the small baseline)", None, "90M"),
        _meme("ffhq256_iu_ldm_s", "FFHQ 256, latent, iU-LDM-S (one iU-Net for all t)", None, "82.9M"),
        _meme("ffhq256_multi", "FFHQ 256, latent, Multi-Expert (4 LDM-S experts, one architecture)", None,
              "4 x 90M"),
        _meme("ffhq256_meme", "FFHQ 256, latent, MEME (4 experts, ~3.3x faster)", "8.52 (-0.62 vs LDM-L)",
              "4 x 82.9M", f"{MEME_TAB1}, unverified; the -0.62 delta: arXiv 2306.04990 abstract"),
        _meme("celebahq256_ldm", "CelebA-HQ 256, latent, LDM-L baseline", None, "274M",
              "CompVis/latent-diffusion configs/latent-diffusion/celebahq-ldm-vq-4.yaml (274M)"),
        _meme("celebahq256_meme", "CelebA-HQ 256, latent, MEME (4 experts)", "LDM-L - 0.37", None,
              "arXiv 2306.04990 abstract (the -0.37 delta)"),
    ), MEME_SOURCE),
    PaperTable("meme_table2", "MEME Table 2: pixel space, ADM-S baseline, same-architecture multi-expert and MEME",
               ("FID",), (
        _meme("adm_s", "ADM-S baseline, pixel space", 49.56, "90M", f"{MEME_TAB2}, unverified"),
        _meme("adm_multi", "Same-architecture multi-expert (4 experts of one architecture), ablation", None, None,
              "arXiv 2306.04990 ablations (same-architecture multi-expert vs MEME): the paper's number for this "
              "row is not recorded here, so it is a dash"),
        _meme("adm_meme", "MEME on ADM-S (4 experts)", 41.10, "4 x 82M", f"{MEME_TAB2}, unverified"),
    ), MEME_SOURCE),
)}

# The tables' names for paper rows whose setting is long: the Prefect UI's artifact view does not wrap table cells.
SHORT_NAMES = {"imagenet64": "ImageNet 64x64 cond.", "kinetics600": "Kinetics-600",
               "ffhq256_ldm": "FFHQ, LDM-L", "ffhq256_ldm_s": "FFHQ, LDM-S", "ffhq256_iu_ldm_s": "FFHQ, iU-LDM-S",
               "ffhq256_multi": "FFHQ, 4 LDM-S experts", "ffhq256_meme": "FFHQ, MEME",
               "celebahq256_ldm": "CelebA-HQ, LDM-L", "celebahq256_meme": "CelebA-HQ, MEME",
               "adm_s": "ADM-S", "adm_multi": "4 ADM-S experts", "adm_meme": "MEME on ADM-S"}
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "imagenet64": "ImageNet",
                 "imagenet128": "ImageNet", "imagenet256": "ImageNet", "ffhq256": "FFHQ", "celebahq256": "CelebA-HQ",
                 "kinetics600": "Kinetics-600", "moving_mnist": "Moving-MNIST",
                 "moving_fmnist": "Moving Fashion-MNIST"}
COST_COLUMNS = ("params", "GFLOPs", "sampling steps", "samples", "train steps", "images seen")


@dataclass(frozen=True)
class RunResult:
    """What the pipeline wrote for one run; None (with the reason in `missing`) where a file is absent."""

    name: str
    eval: dict[str, Any] | None  # outputs/<run>/eval/metrics.json
    train: dict[str, Any] | None  # outputs/<run>/train/metrics.json
    history: list[dict[str, Any]]  # train_log.json rows (step, loss, ...)
    grid: Path | None  # outputs/<run>/samples/grid.png
    missing: tuple[str, ...]
    section: str = "runs"  # its params.yaml section (runs, experts, ensembles): which dvc.yaml stages wrote it
    eval_file: Path | None = None  # the eval/metrics.json read, whose md5 dvc.lock records
    proxy: tuple[dict[str, Any], ...] = ()  # train_log.json proxy rows (step, images_seen, train_pflop, kid, ...)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); re-run the stage that writes it") from None


# The dvc.yaml stage that writes each file of a run, by the run's params.yaml section (experts are never sampled,
# ensembles never trained: load_ensemble reads their experts' training files).
STAGES = {"runs": {"eval": "evaluate", "train": "train", "log": "train", "grid": "sample"},
          "experts": {"train": "train_expert", "log": "train_expert"},
          "ensembles": {"eval": "evaluate_ensemble", "grid": "sample_ensemble"}}


RUN_FILES = {"eval": ("eval", "metrics.json"), "train": ("train", "metrics.json"), "log": ("train", "train_log.json"),
             "grid": ("samples", "grid.png")}  # inside a run's folder (outputs/<run>)


def load_run(run_dir: Path | None, name: str, section: str = "runs") -> RunResult:
    """Read a run's eval and train metrics, training log and sample grid (those its section's stages write) from its
    folder, noting each that is missing and why; `run_dir` None: the report's command line gave no folder."""
    stage = STAGES[section]
    if run_dir is None:
        missing = tuple(f"{key}: no folder for {name} on the report stage's command line (add `--runs "
                        f"{name}=outputs/{name}` and its files as deps in dvc.yaml)" for key in stage)
        return RunResult(name, None, None, [], None, missing, section)
    paths = {key: run_dir.joinpath(*RUN_FILES[key]) for key in stage}
    shown = {key: Path(*run_dir.parts[-2:], *RUN_FILES[key]) for key in stage}  # e.g. outputs/r/eval/metrics.json
    missing = tuple(f"{key}: {shown[key]} not found (`dvc repro {stage[key]}@{name}`)"
                    for key, path in paths.items() if not path.exists())
    found = {key: path for key, path in paths.items() if path.exists()}
    log = _read_json(found["log"]) if "log" in found else {}
    return RunResult(name, _read_json(found["eval"]) if "eval" in found else None,
                     _read_json(found["train"]) if "train" in found else None, log.get("history", []),
                     found.get("grid"), missing, section, found.get("eval"), tuple(log.get("proxy", [])))


def load_ensemble(run_dirs: Mapping[str, Path], name: str, experts: Sequence[str]) -> RunResult:
    """A MEME ensemble: its own samples and eval, and its experts' training summed: `steps` as "N x steps" (or the
    experts' steps joined by " + " when they differ), `images_seen` the total over the experts."""
    own = load_run(run_dirs.get(name), name, "ensembles")
    trained = [load_run(run_dirs.get(e), e, "experts") for e in experts]
    missing = own.missing + tuple(m for r in trained for m in r.missing if m.startswith("train:"))
    if any(r.train is None for r in trained):
        return replace(own, missing=missing)
    steps = [r.train["steps"] for r in trained]
    shown = f"{len(steps)} x {steps[0]:,}" if len(set(steps)) == 1 else " + ".join(f"{s:,}" for s in steps)
    train = {"steps": shown, "images_seen": sum(r.train["images_seen"] for r in trained), "experts": list(experts)}
    return replace(own, train=train, missing=missing)


def fmt(value: Value, digits: int = 2) -> str:
    """A cell: floats to `digits` decimals, integers with thousands separators, strings as written, None as a dash."""
    if value is None:
        return DASH
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def shown_path(value: Any) -> str:
    """A path as the report may show it: relative paths as written, absolute ones cut to their last three parts
    (e.g. data/refstats/fashion_mnist.npz), so that no local path of this machine reaches the report."""
    path = Path(str(value))
    return Path(*path.parts[-3:]).as_posix() if path.is_absolute() else path.as_posix()


def _our_metric(metric: str, ev: dict[str, Any], notes: list[str]) -> str:
    value = ev.get(METRIC_KEYS[metric])
    if metric in ("FID", "FVD") and value is not None:
        if ev.get("singular"):
            key = METRIC_KEYS[metric]
            method = METHOD_NAMES.get(ev[f"{key}_method"], ev[f"{key}_method"])
            what, dim, versus = ("images", 2048, "50k-sample") if metric == "FID" else ("clips", 400, "published")
            notes.append(f"{metric} from {ev['num_samples']} samples vs {ev['num_reference']} {ev['reference_split']} "
                         f"{what} by the {method} method: with <= {dim} {what} the covariance is singular, so the "
                         f"{metric} is biased upwards and not comparable with {versus} values")
            return f"{fmt(value)} (singular)"
        return fmt(value)
    if _number(value):
        return fmt(float(value))
    is_reason = ("no video classifier weights offline" if ev.get("frames")
                 else "no Inception-v3 classifier weights (set eval.is_classifier)")
    reason = is_reason if metric == "IS" else "not in eval/metrics.json"
    notes.append(f"{metric}: not available, {reason}")
    return DASH


def kernel_value(kernel: str, ev: dict[str, Any] | None) -> str:
    """KID (KVD) +- its std over subsets, to the std's second significant digit ("0.0823 ± 0.0012", "48.14 ± 0.71");
    a dash when eval/metrics.json has none."""
    key = kernel.lower()
    value, std = (ev or {}).get(key), (ev or {}).get(f"{key}_std")
    if not (_number(value) and _number(std)):
        return DASH
    digits = max(0, 1 - math.floor(math.log10(std))) if std > 0 else 4  # the std to two significant digits
    return f"{value:.{digits}f} ± {std:.{digits}f}"


def headline_value(metric: str, ev: dict[str, Any] | None) -> str:
    """The headline FID (FVD) with the sample count it was computed at, and the floor (held-out real images scored
    the same way) when evaluate wrote one, e.g. "87.65 at N = 1,024 (real images: 26.01)"."""
    value = (ev or {}).get(METRIC_KEYS[metric])
    if not _number(value):
        return DASH
    floor = ev.get(f"floor_{METRIC_KEYS[metric]}")
    same_n = ev.get("floor_n") == ev["num_samples"]
    real = (f" (real {'images' if metric == 'FID' else 'clips'}: {floor:.2f}"
            + ("" if same_n else f" at N = {ev.get('floor_n'):,}") + ")") if _number(floor) else ""
    return f"{value:.2f} at N = {ev['num_samples']:,}{real}"


def _our_costs(res: RunResult) -> dict[str, str]:
    ev, tr = res.eval or {}, res.train or {}
    steps = ev.get("sampling_steps")
    gflops = ev.get("gflops_per_image")
    params = ev.get("model_params")
    experts = tr.get("experts")
    if params is not None and experts:
        params_text = f"{params / 1e6:.2f}M in {len(experts)} experts"
    else:
        params_text = DASH if params is None else f"{params / 1e6:.2f}M"
    return {"params": params_text,
            "GFLOPs": DASH if gflops is None else f"{gflops:.3g}",
            "sampling steps": DASH if steps is None else f"{steps} ({ev.get('sampler')})",
            "samples": fmt(ev.get("num_samples")), "train steps": fmt(tr.get("steps")),
            "images seen": fmt(tr.get("images_seen"))}


def _paper_costs(row: PaperRow) -> dict[str, str]:
    values = (row.params, row.gflops, row.sampling_steps, row.samples, row.train_steps, row.images_seen)
    return {col: fmt(v, digits=0) if isinstance(v, float) else fmt(v) for col, v in zip(COST_COLUMNS, values)}


def our_setting(res: RunResult, placement: ReportRow) -> str:
    """E.g. "Fashion-MNIST 32x32; 1,024 samples vs 2,048 train images; CPU scale": what our row measured, against
    which reference, and at what scale."""
    ev = res.eval
    parts = []
    if ev is not None:
        res_px = ev["resolution"]
        size = f"{ev['frames']}x{res_px}x{res_px}" if ev.get("frames") else f"{res_px}x{res_px}"
        if ev.get("context_frames"):
            size += f", {ev['context_frames']} context frames"
        what = "clips" if ev.get("frames") else "images"
        parts = [f"{DATASET_NAMES.get(ev['dataset'], ev['dataset'])} {size}",
                 f"{ev['num_samples']:,} {'clips' if ev.get('frames') else 'samples'} vs {ev['num_reference']:,} "
                 f"{ev['reference_split']} {what}"]
    if placement.scale:
        parts.append(placement.scale)
    return "; ".join(parts) or DASH


SHOWN_DIFFERENCES = 4  # settings named in the "vs the paper's recipe" cell; `recipe RUN` lists them all


def recipe_cell(name: str, differing: Sequence[str] | None) -> str:
    """How many of a run's settings differ from its paper row's recipe (recipes.yaml), and the first few."""
    if differing is None:
        return DASH
    if not differing:
        return "follows it"
    shown = ", ".join(differing[:SHOWN_DIFFERENCES]) + (", ..." if len(differing) > SHOWN_DIFFERENCES else "")
    return f"{len(differing)} differ: {shown} (`recipe {name}`)"


@dataclass(frozen=True)
class TableRow:
    """One row of a report table: a paper row and the run of ours mapped to it (None: no run is)."""

    table: PaperTable
    paper: PaperRow
    run: str | None
    placement: ReportRow | None
    result: RunResult | None
    differing: Sequence[str] | None  # the run's settings that differ from the row's recipe; None: not compared

    @property
    def card(self) -> str:
        """The row's card, a file name under cards/: the run's name, or the paper row's for a row without a run."""
        return f"{self.run}.md" if self.run else f"{self.table.key}.{self.paper.key}.md"

    @property
    def ev(self) -> dict[str, Any] | None:
        return self.result.eval if self.result else None


def row_notes(row: TableRow) -> list[str]:
    """Why a cell of ours is a dash or is not comparable: missing files, singular covariances, no IS weights."""
    notes: list[str] = []
    if row.result is None:
        return ["no run of ours for this row (map one in params.yaml evaluation.report)"]
    notes += [m for m in row.result.missing if m.startswith(("eval:", "train:"))]
    if row.ev is not None:
        for metric in row.table.metrics:
            _our_metric(metric, row.ev, notes)
        kernel = KERNEL[row.table.metrics[0]]
        if kernel_value(kernel, row.ev) == DASH:
            notes.append(f"{kernel}: not in eval/metrics.json (written by an older evaluate stage: `dvc repro "
                         f"{STAGES[row.result.section]['eval']}@{row.run}`)")
    return notes


def wide_record(row: TableRow) -> dict[str, str]:
    """The CSV row: the paper's numbers and ours side by side for every metric and cost column, the sample and
    reference counts, the source, the card and the notes."""
    record = {"paper row": row.paper.setting, "source": row.paper.source}
    if row.result is None or row.placement is None:
        record |= {"run": DASH, "our setting": DASH, "vs the paper's recipe": DASH}
    else:
        record |= {"run": str(row.run), "our setting": our_setting(row.result, row.placement),
                   "vs the paper's recipe": recipe_cell(str(row.run), row.differing)}
    ours = _our_costs(row.result) if row.result else {}
    scratch: list[str] = []
    for metric in row.table.metrics:
        record[f"{metric} paper"] = fmt(row.paper.metrics.get(metric), digits=2 if metric != "IS" else 1)
        record[f"{metric} ours"] = _our_metric(metric, row.ev, scratch) if row.ev is not None else DASH
    kernel = KERNEL[row.table.metrics[0]]
    record[f"{kernel} ours"] = kernel_value(kernel, row.ev)
    record["N samples"] = fmt((row.ev or {}).get("num_samples"))
    record["N reference"] = fmt((row.ev or {}).get("num_reference"))
    for col, value in _paper_costs(row.paper).items():
        record[f"{col} paper"] = value
        record[f"{col} ours"] = ours.get(col, DASH)
    record["card"] = f"cards/{row.card}"
    record["notes"] = "; ".join([*([row.paper.note] if row.paper.note else []), *row_notes(row)])
    return record


def columns(table: PaperTable) -> list[str]:
    """The CSV's columns (wide: every cost column too; the Markdown table has `narrow_columns`)."""
    metrics = [f"{c} {side}" for c in table.metrics for side in ("paper", "ours")]
    costs = [f"{c} {side}" for c in COST_COLUMNS for side in ("paper", "ours")]
    return ["paper row", "source", "run", "our setting", "vs the paper's recipe", *metrics,
            f"{KERNEL[table.metrics[0]]} ours", "N samples", "N reference", *costs, "card", "notes"]


def narrow_columns(table: PaperTable) -> list[str]:
    """The Markdown (and LaTeX) table: short cells only, ours beside the paper's. The Prefect UI's artifact view
    does not wrap table cells and its pane is about 830 px wide in a 1400-px window, so our setting, the recipe's
    differences and the paper's values in full are lines below the table (`below_table`), the rest is in the cards."""
    head, *others = table.metrics
    return ["paper row", "run (card)", f"{head} paper", f"{head} ours (N)", f"{KERNEL[head]} ours", "floor",
            *(f"{m} paper / ours" for m in others)]


def paper_cell(value: str) -> str:
    """A paper value as the narrow table shows it: a number with a gloss ("4.51 (3.42 with input scaling)") cut to
    the number and marked with *, the full wording being a line below the table."""
    cut = value.split(" (", 1)[0]
    return value if cut == value else f"{cut}*"


def floor_value(metric: str, ev: dict[str, Any] | None) -> str:
    """The floor: held-out real images (clips) scored like the samples, with its N when that differs from theirs."""
    floor = (ev or {}).get(f"floor_{METRIC_KEYS[metric]}")
    if not _number(floor):
        return DASH
    return f"{floor:.2f}" + ("" if ev.get("floor_n") == ev["num_samples"] else f" ({ev.get('floor_n'):,})")


def narrow_record(row: TableRow, link: bool = True) -> dict[str, str]:
    """A row of the Markdown table: `link` makes the run cell a link to the row's card (LaTeX: the name only)."""
    wide = wide_record(row)
    card = f"cards/{row.card}"
    if row.run is None:
        run = f"none ([card]({card}))" if link else DASH
    else:
        run = f"[{row.run}]({card})" if link else str(row.run)
    head, *others = row.table.metrics
    value = (row.ev or {}).get(METRIC_KEYS[head])
    record = {"paper row": row.paper.short, "run (card)": run, f"{head} paper": paper_cell(wide[f"{head} paper"]),
              f"{head} ours (N)": f"{value:.2f} ({row.ev['num_samples']:,})" if _number(value) else DASH,
              f"{KERNEL[head]} ours": wide[f"{KERNEL[head]} ours"], "floor": floor_value(head, row.ev)}
    for metric in others:
        ours = wide[f"{metric} ours"]
        record[f"{metric} paper / ours"] = f"{paper_cell(wide[f'{metric} paper'])} / {ours}"
    return record


def below_table(rows: Sequence[TableRow]) -> list[str]:
    """The lines under a table, for what its short cells leave out: each run's setting (what it measured, against
    which reference, at what scale) and how it differs from the paper row's recipe; the paper values cut to a *."""
    lines = []
    for row in rows:
        if row.run is None or row.result is None or row.placement is None:
            continue
        recipe = recipe_cell(row.run, row.differing)
        recipe = {DASH: "not compared with a recipe", "follows it": "it follows the paper's recipe"}.get(
            recipe, f"against the paper's recipe, {recipe}")
        setting = our_setting(row.result, row.placement)
        setting = "not evaluated (its card says why)" if setting == DASH else setting
        lines.append(f"- `{row.run}` ({row.paper.short}): {setting}; {recipe}.")
    glossed = [f"{row.paper.short}: {metric} {value}" for row in rows for metric, value in row.paper.metrics.items()
               if isinstance(value, str) and paper_cell(value) != value]
    glossed = list(dict.fromkeys(glossed))  # a paper row with several runs of ours is listed once
    out = ["Our runs:", "", *lines, ""] if lines else []
    return out + ([f"\\* The paper's values in full: {'; '.join(glossed)}.", ""] if glossed else [])


def check_mapping(mapping: Mapping[str, ReportRow]) -> None:
    """Every mapped run names a row that exists in its table."""
    for run, placement in mapping.items():
        keys = [r.key for r in PAPER_TABLES[placement.table].rows]
        if placement.row not in keys:
            raise ConfigError(f"params.yaml: evaluation.report.{run}.row must be one of {keys} for table "
                              f"{placement.table}, got {placement.row!r}")


def table_rows(table: PaperTable, mapping: Mapping[str, ReportRow], results: Mapping[str, RunResult],
               differing: Mapping[str, Sequence[str]] | None = None) -> list[TableRow]:
    """Each paper row once per run mapped to it, runs by name (never by score), or once without a run."""
    rows = []
    differing = differing or {}
    for paper in table.rows:
        runs = sorted(r for r, p in mapping.items() if p.table == table.key and p.row == paper.key)
        rows += [TableRow(table, paper, r, mapping[r], results[r], differing.get(r)) for r in runs] or [
            TableRow(table, paper, None, None, None, None)]
    return rows


def table_frame(table: PaperTable, mapping: Mapping[str, ReportRow], results: Mapping[str, RunResult],
                differing: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """The wide table as strings (the CSV). `differing`: each run's settings that differ from its row's recipe."""
    rows = table_rows(table, mapping, results, differing)
    return pd.DataFrame.from_records([wide_record(r) for r in rows], columns=columns(table))


def narrow_frame(rows: Sequence[TableRow], link: bool = True) -> pd.DataFrame:
    return pd.DataFrame.from_records([narrow_record(r, link) for r in rows], columns=narrow_columns(rows[0].table))


def comparability_note(rows: Sequence[TableRow]) -> str:
    """Which of our rows may be compared with each other: only those scored at the same N against the same
    reference. Rows at different N are listed apart and never ranked."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for row in rows:
        if row.ev is not None and _number(row.ev.get(METRIC_KEYS[row.table.metrics[0]])):
            ev = row.ev
            key = (ev["dataset"], ev["num_samples"], ev["num_reference"], ev["reference_split"])
            groups.setdefault(key, []).append(f"`{row.run}`")
    if not groups:
        return ""
    metric = row.table.metrics[0]
    described = "; ".join(f"N = {n:,} vs {ref:,} {split} ({DATASET_NAMES.get(ds, ds)}): {', '.join(runs)}"
                          for (ds, n, ref, split), runs in groups.items())
    if len(groups) == 1:
        return (f"Our rows here share one protocol ({described}): they may be compared with each other "
                f"({KERNEL[metric]}'s ± says how far), but not digit by digit with the paper's {metric}s, which are "
                "at another N and reference.")
    return (f"Our rows were scored at different N or against different references ({described}). {metric}'s bias "
            f"depends on N and on the model: do not rank these rows against each other by {metric}; "
            f"{KERNEL[metric]} is unbiased at any N, and its ± says how far a difference can be trusted.")


# The Prefect UI's artifact view (Prefect 3, Chromium, 1400-px window): table cells never wrap (.p-table-data
# white-space: nowrap), 0.875rem text at about 7 px per character, 0.75rem padding each side, in a content pane about
# 830 px wide. A table wider than that scrolls sideways, and the columns on the right are out of sight.
ARTIFACT_PANE_PX, CHAR_PX, CELL_PADDING_PX = 830, 7.0, 24


def visible_text(cell: str) -> str:
    """A Markdown cell as the reader sees it: links as their text, no code ticks, bold marks or escapes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell)
    return text.replace("`", "").replace("**", "").replace("\\", "")


def nowrap_width(table: str) -> float:
    """A Markdown table's width in px where cells never wrap (the artifact view): each column as wide as its widest
    cell, plus padding."""
    rows = [[visible_text(c.strip()) for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in table.strip().splitlines() if not line.startswith("|---")]
    return sum(max(len(r[i]) for r in rows) * CHAR_PX + CELL_PADDING_PX for i in range(len(rows[0])))


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; `|` inside cells is escaped."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("*", "\\*").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


LATEX_ESCAPES = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                               "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                               "<": r"\textless{}", ">": r"\textgreater{}", "—": "---", "§": r"\S{}",
                               "±": r"$\pm$", "`": ""})


def latex_table(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A plain `tabular` (no packages beyond graphicx for the resize box), every cell escaped."""
    def row(values: Sequence[Any]) -> str:
        return " & ".join(str(v).translate(LATEX_ESCAPES) for v in values) + r" \\"

    body = [row(list(r)) for r in frame.itertuples(index=False)]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{caption.translate(LATEX_ESCAPES)}}}",
                      rf"\label{{tab:{label}}}", r"\resizebox{\textwidth}{!}{%",
                      rf"\begin{{tabular}}{{{'l' * len(frame.columns)}}}", r"\hline", row(list(frame.columns)),
                      r"\hline", *body, r"\hline", r"\end{tabular}}", r"\end{table}"]) + "\n"


# --- provenance: the commit, dvc.lock, and the per-row cards --------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """What the report stage reads about where its inputs came from."""

    commit: str  # the checkout's git commit when the report ran ("unknown" outside git)
    lock: Mapping[str, Any] | None = None  # dvc.lock's `stages`; None: not read (lock_note says why)
    lock_note: str = "dvc.lock not read (the report was not given --dvc-lock)"


# What `dvc repro` itself rewrites while it runs (the lock and the stages' committed outputs and records): a change
# there is the run in progress, not a change to what produced the numbers.
PIPELINE_WRITTEN = ("dvc.lock", "outputs", "results")


def git_commit(cwd: Path | None = None) -> str:
    """HEAD's commit, with " + uncommitted changes" when tracked source files differ from it (the files a running
    `dvc repro` rewrites, PIPELINE_WRITTEN, are left out); "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                    *(f":(top,exclude){p}" for p in PIPELINE_WRITTEN))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" + uncommitted changes" if dirty else "")


def read_lock(path: Path | None) -> tuple[Mapping[str, Any] | None, str]:
    """dvc.lock's stages and, when they cannot be had, why. A file that is there but is not a dvc.lock is an error
    naming it and the fix."""
    if path is None:
        return None, Provenance.lock_note
    if not path.exists():
        return None, f"{path.name} not found (no stage has run under `dvc repro` here)"
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({type(err).__name__}); restore it (`git checkout {path.name}`) "
                          "or delete it and run `dvc repro`") from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("stages"), Mapping):
        raise ConfigError(f"{path}: not a dvc.lock (no `stages` mapping); restore it (`git checkout {path.name}`) "
                          "or delete it and run `dvc repro`")
    return raw["stages"], ""


def stage_digest(entry: Mapping[str, Any]) -> str:
    """A dvc.lock entry's digest without its outputs (command, dependency hashes, params): as flows/stages.py keys
    a Prefect task by a stage, DVC's dict_sha256 (sha256 of the sorted-key JSON)."""
    blob = {k: v for k, v in entry.items() if k != "outs"}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _lock_files(entry: Mapping[str, Any], key: str, suffix: str) -> list[tuple[str, str]]:
    return [(shown_path(d.get("path", "")), str(d.get("md5", DASH))) for d in entry.get(key) or []
            if str(d.get("path", "")).endswith(suffix)]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lock_lines(row: TableRow, prov: Provenance) -> list[tuple[str, str]]:
    """The card's DVC lines: the evaluate stage's digest (and whether dvc.lock's entry is of the metrics.json
    read), the weights the sample stage read and the samples it wrote, with the md5s dvc.lock records."""
    res = row.result
    assert res is not None
    stages = STAGES[res.section]
    evaluate, sample = f"{stages['eval']}@{row.run}", f"{stages['grid']}@{row.run}"
    if prov.lock is None:
        return [("DVC stage", f"`{evaluate}`: {prov.lock_note}")]
    entry = prov.lock.get(evaluate)
    if not isinstance(entry, Mapping):
        return [("DVC stage", f"`{evaluate}`: no entry in dvc.lock (not run under `dvc repro` here)")]
    locked = dict(_lock_files(entry, "outs", "metrics.json"))
    if res.eval_file is None or not locked:
        match = "dvc.lock names no metrics.json to check against"
    elif _md5(res.eval_file) in locked.values():
        match = "its eval/metrics.json is the one dvc.lock records (md5)"
    else:
        match = "its eval/metrics.json differs from the one dvc.lock records: re-run `dvc repro` (or `dvc commit`)"
    lines = [("DVC stage", f"`{evaluate}`, digest sha256 `{stage_digest(entry)}` (command, dependency hashes and "
                           f"params in dvc.lock); {match}")]
    sampled = prov.lock.get(sample)
    if isinstance(sampled, Mapping):
        weights = _lock_files(sampled, "deps", ".safetensors")
        lines.append(("weights", "; ".join(f"{p} md5 `{h}`" for p, h in weights) + f" (dvc.lock, `{sample}` deps)"
                      if weights else f"{DASH} (`{sample}` in dvc.lock lists no .safetensors)"))
        npz = _lock_files(sampled, "outs", "samples.npz")
        if npz:
            lines.append(("samples (dvc.lock)", "; ".join(f"{p} md5 `{h}`" for p, h in npz) + f" (`{sample}` outs)"))
    else:
        lines.append(("weights", f"{DASH} (no `{sample}` entry in dvc.lock)"))
    return lines


def _kv_table(rows: Sequence[tuple[str, str]], head: tuple[str, ...] = ("", "")) -> list[str]:
    frame = pd.DataFrame.from_records(list(rows), columns=list(head))
    return [markdown_table(frame)]


def card_text(row: TableRow, prov: Provenance, notes: Sequence[str] = ()) -> str:
    """A row's provenance card (Markdown): the numbers, how ours were computed (N, reference, feature network and
    its sha256, resize, sampler and steps, the samples' and weights' hashes, the commit, the DVC stage digest), the
    cost columns, the recipe differences, the sources and the notes."""
    table, paper, ev = row.table, row.paper, row.ev
    title = f"{row.run}: {table.title.split(':')[0]}, {paper.setting}" if row.run else f"{table.title.split(':')[0]}:"\
        f" {paper.setting}"
    wide = wide_record(row)
    lines = [f"# {title}", "", "[Back to the report](../report.md)", ""]
    if row.run is None:
        lines += ["No run of ours is mapped to this row (params.yaml evaluation.report); the paper's numbers:", ""]
    else:
        lines += [f"Our setting: {wide['our setting']}.", ""]
    lines += ["## Numbers", ""]
    metric_rows = [(m, wide[f"{m} paper"], headline_value(m, ev) if m == table.metrics[0] else wide[f"{m} ours"])
                   for m in table.metrics]
    kernel = KERNEL[table.metrics[0]]
    if ev is not None and _number(ev.get(kernel.lower())):
        k = kernel.lower()
        metric_rows.insert(1, (kernel, DASH, f"{kernel_value(kernel, ev)} ({ev.get(f'{k}_subsets')} subsets of "
                                             f"{ev.get(f'{k}_subset_size')})"))
    elif ev is not None:
        metric_rows.insert(1, (kernel, DASH, f"{DASH} (not in eval/metrics.json: see the notes)"))
    if ev is not None and _number(ev.get(f"floor_{kernel.lower()}")):
        k = kernel.lower()
        metric_rows.append((f"floor: {table.metrics[0]} / {kernel} of real data", DASH,
                            f"{ev[f'floor_{METRIC_KEYS[table.metrics[0]]}']:.2f} / {ev[f'floor_{k}']:.4f} ± "
                            f"{ev[f'floor_{k}_std']:.4f}: {ev['floor_n']:,} held-out {ev['floor_split']} "
                            f"{'clips' if ev.get('frames') else 'images'} against the same reference"))
    if ev is not None and _number(ev.get("seam_ratio")):
        real = ev.get("seam_ratio_real")
        metric_rows.append(("seam ratio", DASH, f"{ev['seam_ratio']:.3f} across / inside the "
                            f"{'x'.join(map(str, ev.get('seam_patch') or []))} patch grid; real images: "
                            + (f"{real:.3f}" if _number(real) else f"{DASH} (refstats predates stored images)")))
    lines += _kv_table(metric_rows, ("metric", "paper", "ours"))
    if ev is not None:
        key = METRIC_KEYS[table.metrics[0]]
        what = "clips" if ev.get("frames") else "images"
        method = METHOD_NAMES.get(ev.get(f"{key}_method"), ev.get(f"{key}_method"))
        sha = ev.get("samples_sha256")
        how = [
            ("N samples", f"{ev['num_samples']:,} {what}"
             + (f", sha256 `{sha}` (the samples.npz scored)" if sha else " (samples' sha256: not in eval/metrics.json,"
                " written by an older evaluate stage)")),
            ("reference", f"the first {ev['num_reference']:,} {what} of the {ev['reference_split']} split "
                          f"({shown_path(ev.get('reference_file', DASH))})"),
            ("feature network", f"{ev.get('feature_network', DASH)}; "
                                f"sha256 `{ev.get('feature_network_sha256', DASH)}`"),
            ("resize", ev.get("resize") or f"{DASH} (not in eval/metrics.json; the feature extractor id: "
                                            f"`{ev.get('feature_extractor', DASH)}`)"),
            (f"{table.metrics[0]} method", f"{method}" + (" (singular covariance: biased upwards)"
                                                           if ev.get("singular") else "")),
            ("sampler and steps", f"{ev.get('sampler', DASH)}, {ev.get('sampling_steps', DASH)} steps"),
            *lock_lines(row, prov),
            ("commit", f"`{prov.commit}` (the checkout when the report was written)"),
        ]
        # a list, not a table: its values (hashes, paths) are long, and the Prefect UI does not wrap table cells
        lines += ["## How ours was computed", "", *(f"- **{what}**: {value}" for what, value in how), ""]
    elif row.run is not None:
        lines += ["## How ours was computed", "", f"{DASH}: not evaluated yet (see the notes).", ""]
    ours = _our_costs(row.result) if row.result else {}
    costs = [(c, v, ours.get(c, DASH)) for c, v in _paper_costs(paper).items()]
    lines += ["## Cost", "", *_kv_table(costs, ("", "paper", "ours")),
              "GFLOPs: one forward pass per image (an ensemble: one expert's; one runs per step). Params of an "
              "ensemble: all its experts'. Train steps and images seen of an ensemble: its experts' summed.", ""]
    if row.run is not None:
        differing = list(row.differing) if row.differing is not None else None
        lines += ["## vs the paper's recipe", "",
                  (f"{DASH}: recipes.yaml has no recipe for this row." if differing is None else
                   "The run follows the paper's recipe in every setting recipes.yaml gives." if not differing else
                   f"{len(differing)} settings differ: {', '.join(differing)}.")
                  + f" `python -m diffusion.cli recipe {row.run}` sets each beside the paper's, with its source.", ""]
    lines += ["## Sources", "", f"- This row: {paper.source}.", f"- The table: {table.source}.", ""]
    all_notes = [*([paper.note] if paper.note else []), *notes]
    if all_notes:
        lines += ["## Notes", "", *(f"- {n}." if not n.endswith(".") else f"- {n}" for n in all_notes), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _batch_size(res: RunResult) -> int | None:
    tr = res.train or {}
    steps, seen = tr.get("steps"), tr.get("images_seen")
    return seen // steps if isinstance(steps, int) and steps and seen else None


def plot_loss(results: Sequence[RunResult], path: Path) -> list[str]:
    """Training loss against images seen, one line per run with a log and train metrics; returns the runs drawn."""
    from matplotlib.figure import Figure

    drawn = [r for r in results if r.history and _batch_size(r)]
    if not drawn:
        return []
    from matplotlib import colormaps

    colors = colormaps["tab20"].colors  # 20 distinct colours: the default cycle repeats after 10 runs
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for i, res in enumerate(drawn):
        batch = _batch_size(res) or 0
        ax.plot([row["step"] * batch for row in res.history], [row["loss"] for row in res.history], label=res.name,
                color=colors[i % len(colors)])
    ax.set_xlabel("images seen")
    ax.set_ylabel("training loss (mean over each log window)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2 if len(drawn) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return [r.name for r in drawn]


def plot_fid(results: Sequence[RunResult], path: Path) -> list[str]:
    """FID against images seen when at least two evaluations exist, one marker per (N samples, N reference): points
    of different N are not comparable. Returns the runs drawn (none below two)."""
    from matplotlib.figure import Figure

    points = [(r.train["images_seen"], r.eval["fid"], r.name, (r.eval["num_samples"], r.eval["num_reference"]))
              for r in results if r.eval and r.train and r.eval.get("fid") is not None]
    if len(points) < 2:
        return []
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for marker, group in zip("osD^v<>p*h", sorted({p[3] for p in points})):
        shown = [p for p in points if p[3] == group]
        ax.scatter([p[0] for p in shown], [p[1] for p in shown], marker=marker,
                   label=f"N = {group[0]:,} vs {group[1]:,} references")
    for x, y, name, _ in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("images seen in training")
    ax.set_ylabel("FID (compare only points of one N)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return [p[2] for p in points]


def proxy_protocol(row: dict[str, Any]) -> str:
    """How a proxy point was measured, e.g. 'KID of 512 EMA samples (ddpm, 50 steps) vs 2,048 train images'."""
    return (f"KID of {row['proxy_samples']:,} EMA samples ({row['proxy_sampler']}, {row['proxy_sampling_steps']} "
            f"steps) vs {row['num_reference']:,} {row['reference_split']} images")


def plot_quality(results: Sequence[RunResult], path: Path) -> list[str]:
    """The proxy KID during training against images seen and against counted training PFLOP, one line per run with
    proxy points (the RIN paper's quality-against-compute comparison, at CPU scale); returns the runs drawn."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    drawn = [r for r in results if r.proxy]
    if not drawn:
        return []
    protocols = sorted({proxy_protocol(row) for r in drawn for row in r.proxy})
    colors = colormaps["tab10"].colors
    fig = Figure(figsize=(10.0, 4.0))
    axes = fig.subplots(1, 2, sharey=True)
    for i, res in enumerate(drawn):
        rows = sorted(res.proxy, key=lambda row: row["step"])
        label = res.name if len(protocols) == 1 else f"{res.name}: {proxy_protocol(rows[0])}"
        for ax, key in zip(axes, ("images_seen", "train_pflop"), strict=True):
            ax.errorbar([row[key] for row in rows], [row["kid"] for row in rows],
                        yerr=[row["kid_std"] for row in rows], marker="o", capsize=3, label=label,
                        color=colors[i % len(colors)])
    axes[0].set_xlabel("images seen in training")
    axes[1].set_xlabel("training PFLOP (counted)")
    axes[0].set_ylabel("proxy KID (lower is better)")
    for ax in axes:
        ax.set_xscale("log")  # KID stays linear: near real data it is ~0 and can be negative
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"Proxy: {protocols[0]}" if len(protocols) == 1 else "Proxy KID (protocols in the legend)",
                 fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return [r.name for r in drawn]


def _card_lines(rows: Sequence[TableRow]) -> list[str]:
    """One line per row of ours: its card and the protocol behind its headline number."""
    lines = []
    for row in rows:
        if row.run is None:
            continue
        ev = row.ev
        if ev is None:
            lines.append(f"- [`{row.run}`](cards/{row.card}): not evaluated yet.")
            continue
        what = "clips" if ev.get("frames") else "images"
        metric = row.table.metrics[0]
        lines.append(f"- [`{row.run}`](cards/{row.card}): {metric} and {KERNEL[metric]} from {ev['num_samples']:,} "
                     f"samples vs the first {ev['num_reference']:,} {ev['reference_split']} {what}; sampler "
                     f"{ev.get('sampler')}, {ev.get('sampling_steps')} steps.")
    return lines or ["- no run of ours is in a table yet."]


def _ensemble_lines(ensembles: Mapping[str, Sequence[str]]) -> list[str]:
    return [f"- `{name}` (MEME ensemble): each sampling step goes to the expert owning its noise level among "
            + ", ".join(f"`{e}`" for e in experts) + "; its params are all experts' and its GFLOPs one expert's (one "
            "runs per step), its train steps and images seen are the experts' training summed."
            for name, experts in ensembles.items()]


def _fourier_section(folder: Path, out_dir: Path) -> list[str]:
    """MEME's frequency figure from the fourier stage (diffusion/stages/fourier.py), copied beside the report."""
    lines = ["## MEME: frequency analysis of feature maps", ""]
    figure, data = folder / "fourier.png", folder / "fourier.json"
    if not (figure.exists() and data.exists()):
        shown = Path(folder.name) / "fourier.json"
        return lines + [f"{DASH}: {shown} not found (`dvc repro fourier`).", ""]
    meta = _read_json(data)
    shutil.copyfile(figure, out_dir / "fourier.png")
    times = ", ".join(f"{t:g}" for t in meta["t"])
    return lines + [
        f"Relative log amplitude of the 2-D Fourier transform of every block's output (U-Net encoder `enc*`, `mid`, "
        f"decoder `dec*`) against radial frequency from 0 to π, for {', '.join(f'`{r}`' for r in meta['runs'])} at "
        f"t = {times}: {meta['num_images']} {meta['split']} images noised to t with each run's training schedule "
        "(an ensemble shows the expert that owns t). The measure: " + meta["measure"] + ". Lower at π: the block "
        "damps high frequencies (what self-attention does; convolutions pass them). Curves dark to bright from the "
        "input side to the output side; the last column is each block's value at π.", "",
        "![relative log amplitude against frequency](fourier.png)", ""]


def _claims_section(folder: Path, out_dir: Path) -> list[str]:
    """The papers' claims at this scale (the claims stage, diffusion/stages/claims.py): its table, figures and
    cards, copied into <out_dir>/claims/."""
    from diffusion.stages.claims import table_markdown

    lines = ["## The papers' claims at CPU scale", ""]
    data = folder / "claims.json"
    if not data.exists():
        return lines + [f"{DASH}: {Path(folder.name) / 'claims.json'} not found (`dvc repro claims`).", ""]
    results = _read_json(data)
    dest = out_dir / "claims"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest)
    built = len({run for r in results for run in r["arms"]})  # an arm shared by several claims counts once
    lines += ["Each claim is tested by arms built in a claims workspace (`prefect deployment run "
              "'reproduce-claims/cpu'`; README, \"The papers' claims\"), every arm from two seeds, scored by KID "
              "± its spread over subsets; the verdict tests the paper's order pair by pair, paired by seed (each "
              f"card gives the protocol, every arm's costs and provenance, and the pairs). Arm runs built: {built}.",
              "", table_markdown(results, link_prefix="claims/"), ""]
    lines += [f"![{r['id']}](claims/{r['id']}.png)" for r in results if (folder / f"{r['id']}.png").exists()]
    return lines + [""]


def _figures(results: Sequence[RunResult], out_dir: Path, experts: Sequence[RunResult] = ()) -> list[str]:
    """Loss curves (runs and MEME experts), the FID plot and the sample grids (experts have none: their ensembles
    are sampled)."""
    lines = ["## Training", ""]
    loss_runs = plot_loss([*results, *experts], out_dir / "loss.png")
    if loss_runs:
        lines += [f"Training loss against images seen ({', '.join(loss_runs)}):", "", "![training loss](loss.png)", ""]
    else:
        lines += [f"Training loss: {DASH} (no run has train_log.json and train/metrics.json yet).", ""]
    fid_runs = plot_fid(results, out_dir / "fid.png")
    if fid_runs:
        lines += ["FID against training progress, one point per evaluation:", "", "![FID](fid.png)", ""]
    else:
        lines += ["FID against training progress: not drawn, fewer than two evaluations exist.", ""]
    quality_runs = plot_quality(results, out_dir / "quality.png")
    if quality_runs:
        protocols = sorted({proxy_protocol(row) for r in results for row in r.proxy})
        lines += [f"Sample quality against training compute ({', '.join(quality_runs)}): a proxy, "
                  f"{'; '.join(protocols)}, ± its spread over subsets, at points during training (params.yaml "
                  "`train.proxy`); few samples and sampling steps, so it ranks the points of a curve and the runs "
                  "drawn with one protocol, while the tables' KID and FID are the headline.", "",
                  "![proxy KID against images seen and training PFLOP](quality.png)", ""]
    else:
        lines += ["Sample quality against training compute: not drawn, no run has proxy points (params.yaml "
                  "`train.proxy`).", ""]
    lines += ["## Samples", ""]
    for res in results:
        if res.grid is not None:
            (out_dir / "grids").mkdir(exist_ok=True)
            shutil.copyfile(res.grid, out_dir / "grids" / f"{res.name}.png")
            lines += [f"### {res.name}", "", f"![{res.name}: the first 64 samples](grids/{res.name}.png)", ""]
    absent = [f"`{r.name}`" for r in results if r.grid is None]
    if absent:
        lines += [f"No sample grid ({DASH}, samples/grid.png not found) for {', '.join(absent)}.", ""]
    return lines


HEADER = [
    "# RIN and MEME: the papers' numbers beside ours", "",
    "Written by `python -m diffusion.cli report` (the `report` stage of dvc.yaml) from each run's "
    "`eval/metrics.json` and `train/metrics.json`. Each table puts a paper's row beside the runs of ours mapped to it "
    "(params.yaml `evaluation.report`); the run's name links to its card: N, reference, feature network and its "
    "sha256, resize, sampler and steps, the samples' and weights' hashes, commit and DVC stage digest, the cost "
    "columns (parameters, GFLOPs, steps, training) and the notes. A dash in a paper column: the sources give no "
    "number; in a column of ours: the card says why. Our FID (FVD) is given with its N; the floor beside it is "
    "held-out real images (clips) scored exactly like the samples, against the same reference: how close real data "
    "gets under this protocol.", "",
    "FID and FVD are biased by the number of samples N (and the bias differs between models): a value of ours is "
    "only comparable with another at the same N against the same reference, never with the papers' 50k-sample "
    "numbers digit by digit. KID and KVD (± their spread over subsets) are unbiased at any N.", "",
]


def write_report(mapping: Mapping[str, ReportRow], run_names: Sequence[str], run_dirs: Mapping[str, Path],
                 out_dir: Path, ensembles: Mapping[str, Sequence[str]] | None = None,
                 fourier: Path | None = None, differing: Mapping[str, Sequence[str]] | None = None,
                 provenance: Provenance | None = None, claims: Path | None = None) -> Path:
    """out_dir: report.md, cards/<run>.md (one per table row), <table>.csv (every column) and <table>.tex (the
    Markdown's columns) per paper table, loss.png (fid.png), grids/. `run_dirs`: each run's folder (outputs/<run>).
    `ensembles`: each MEME ensemble's expert runs, whose training its rows and the loss curves show. `fourier`: the
    fourier stage's folder, whose figure gets a section (none when None). `differing`: each mapped run's settings
    that differ from its paper row's recipe (recipes.yaml). `provenance`: the commit and dvc.lock for the cards.
    `claims`: the claims stage's folder, whose table gets a section (none when None)."""
    check_mapping(mapping)
    prov = provenance or Provenance("unknown")
    ensembles = dict(ensembles or {})
    experts = {e for group in ensembles.values() for e in group}
    names = sorted(set(mapping) | set(run_names) | set(ensembles) | experts)
    results = {name: load_ensemble(run_dirs, name, ensembles[name]) if name in ensembles
               else load_run(run_dirs.get(name), name, "experts" if name in experts else "runs") for name in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    cards = out_dir / "cards"
    if cards.exists():  # cards of rows that are gone must not linger
        shutil.rmtree(cards)
    cards.mkdir()
    lines, placed = list(HEADER), []
    for table in PAPER_TABLES.values():
        rows = table_rows(table, mapping, results, differing)
        placed += rows
        for row in rows:
            write_text(cards / row.card, card_text(row, prov, row_notes(row)))
        frame = table_frame(table, mapping, results, differing)
        frame.to_csv(out_dir / f"{table.key}.csv", index=False, lineterminator="\n")
        write_text(out_dir / f"{table.key}.tex", latex_table(narrow_frame(rows, link=False), table.title, table.key))
        note = comparability_note(rows)
        table_md = markdown_table(narrow_frame(rows))
        width = nowrap_width(table_md)
        if width > ARTIFACT_PANE_PX:  # e.g. a long run name: the artifact view would scroll it
            print(f"report: {table.key} is about {width:.0f} px wide unwrapped, more than the Prefect "
                  f"artifact pane's {ARTIFACT_PANE_PX}: its right-hand columns will be out of sight there",
                  file=sys.stderr)
        lines += [f"## {table.title}", "", table_md, *below_table(rows),
                  *([note, ""] if note else []),
                  f"Paper numbers: {table.source}. Every column, the cost columns too: [{table.key}.csv]"
                  f"({table.key}.csv); this table in LaTeX: [{table.key}.tex]({table.key}.tex).", ""]
    unplaced = [n for n in names if n not in mapping and n not in experts]
    if unplaced:
        lines += ["Runs in no table (add them to params.yaml evaluation.report): "
                  + ", ".join(f"`{n}`" for n in unplaced) + ".", ""]
    if claims is not None:
        lines += _claims_section(claims, out_dir)
    lines += ["## Provenance", "", f"Commit: `{prov.commit}`. DVC: "
              + ("each card gives its evaluate stage's digest from dvc.lock." if prov.lock is not None
                 else f"{prov.lock_note}."), "", *_card_lines(placed), *_ensemble_lines(ensembles), ""]
    if fourier is not None:
        lines += _fourier_section(fourier, out_dir)
    lines += _figures([results[n] for n in names if n not in experts], out_dir, [results[n] for n in sorted(experts)])
    path = out_dir / "report.md"
    write_text(path, "\n".join(lines).rstrip("\n") + "\n")
    return path


def recipe_differences(params: Params, recipes_file: str) -> dict[str, list[str]]:
    """Each run mapped to a paper row: its settings that differ from that row's recipe (`recipe RUN` shows them)."""
    recipes = load_recipes(recipes_file)
    out = {}
    for name, placement in params.evaluation.report.items():
        row = f"{placement.table}.{placement.row}"
        if name in params.all_runs and row in recipes.rows:
            run = params.all_runs[name]
            rows = compare(run_settings(run, registry.resolve_model(run)), recipes, row, name)
            out[name] = [r.key for r in differences(rows)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("report", __doc__)
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR",
                   help="the folder of every run, expert and ensemble the report reads, e.g. "
                        "rin_fmnist=outputs/rin_fmnist")
    p.add_argument("--fourier", help="the fourier stage's folder (outputs/fourier); without it, no frequency section")
    p.add_argument("--claims", help="the claims stage's folder (outputs/claims); without it, no claims section")
    p.add_argument("--out", required=True, help="the report folder (outputs/report)")
    p.add_argument("--recipes", default=str(RECIPES_FILE), help="the papers' recipes (default: recipes.yaml)")
    p.add_argument("--dvc-lock", help="the project's dvc.lock, for each card's evaluate stage digest (read, not a DVC "
                                      "dependency: it changes whenever a stage runs); without it the cards say so")
    args = p.parse_args(argv)
    params = load_params(args.params)
    ensembles = {name: [e.name for e in run.experts] for name, run in params.ensembles.items()}
    path = write_report(params.evaluation.report, sorted(params.all_runs), named_paths(args.runs, "--runs"),
                        out_folder(args.out), ensembles, fourier=Path(args.fourier) if args.fourier else None,
                        differing=recipe_differences(params, args.recipes),
                        provenance=Provenance(git_commit(), *read_lock(Path(args.dvc_lock) if args.dvc_lock else None)),
                        claims=Path(args.claims) if args.claims else None)
    print(f"wrote {path}")
    return 0
