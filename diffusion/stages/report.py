"""The report stage (`python -m diffusion.cli report --runs NAME=DIR ... --fourier DIR --out DIR`): RIN Tables 2-3
and MEME Tables 1-2 with our runs' numbers beside the papers' (Markdown, CSV, LaTeX), training curves and sample
grids. The papers' numbers live here, each with its SPEC section.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from diffusion import registry
from diffusion.args import named_paths, out_folder, parser
from diffusion.config import ConfigError, Params, ReportRow, load_params
from diffusion.io import write_text
from diffusion.recipes import RECIPES_FILE, compare, differences, load_recipes, run_settings

DASH = "—"
Value = float | int | str | None  # a paper's number, or its exact wording when it is not a plain number


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper's table as SPEC states it; None where SPEC gives no number."""

    key: str  # what params.yaml evaluation.report.<run>.row names
    setting: str  # what the paper evaluated
    metrics: Mapping[str, Value]  # metric column (FID, IS, FVD) -> value
    params: Value  # parameter count in the paper's wording ("31M", "4 x 82.9M")
    gflops: Value  # forward GFLOPs per image (RIN Fig. 1)
    sampling_steps: Value
    samples: Value  # images (clips) behind the FID / FVD
    train_steps: Value
    images_seen: Value  # training steps x batch size
    source: str  # the SPEC section, and "unverified" where SPEC says so


@dataclass(frozen=True)
class PaperTable:
    key: str  # what params.yaml evaluation.report.<run>.table names
    title: str
    metrics: tuple[str, ...]  # metric columns, keys of METRIC_KEYS
    rows: tuple[PaperRow, ...]
    source: str


METRIC_KEYS = {"FID": "fid", "IS": "inception_score", "FVD": "fvd"}  # column -> key in eval/metrics.json
METHOD_NAMES = {"svd": "exact SVD", "sqrtm": "clean-fid sqrtm"}  # eval/metrics.json fid_method -> words
RIN_SOURCE = ("SPEC §1 'Results to reproduce' and 'Configurations' (RIN: Jabri, Fleet, Chen; ICML 2023; "
              "arXiv 2212.11972)")
MEME_SOURCE = ("SPEC §2 'Results to reproduce' (MEME: Lee et al.; AAAI 2024; arXiv 2306.04990). SPEC marks every "
               "absolute number unverified; only the FID deltas -0.62 (FFHQ) and -0.37 (CelebA-HQ) are from the "
               "abstract")
RIN_EVAL = dict(sampling_steps=1000, samples=50_000)  # SPEC §1: 1000 steps and 50k samples for reported FIDs


def _rin(key: str, setting: str, metrics: Mapping[str, Value], source: str = "SPEC §1", **kw: Value) -> PaperRow:
    base: dict[str, Value] = dict(params=None, gflops=None, train_steps=None, images_seen=None) | RIN_EVAL
    return PaperRow(key, setting, metrics, source=source, **(base | kw))


def _meme(key: str, setting: str, fid: Value, params: Value, source: str = "SPEC §2, unverified") -> PaperRow:
    return PaperRow(key, setting, {"FID": fid}, params, None, None, None, None, None, source)


PAPER_TABLES: dict[str, PaperTable] = {t.key: t for t in (
    PaperTable("rin_table2", "RIN Table 2: image generation (no guidance, no cascades)", ("FID", "IS"), (
        _rin("cifar10", "CIFAR-10 32x32", {"FID": 1.81, "IS": 10.3}, "SPEC §1 (IS: the author, pix2seq issue)",
             params="31M", train_steps=150_000, images_seen=150_000 * 256),
        _rin("imagenet64", "ImageNet 64x64, class-conditional", {"FID": 1.23, "IS": 66.5}, train_steps=150_000,
             images_seen=150_000 * 1024),
        _rin("imagenet128", "ImageNet 128x128", {"FID": 2.75, "IS": 144.1}, gflops=194),
        _rin("imagenet256", "ImageNet 256x256", {"FID": "4.51 (3.42 with input scaling)"},
             "SPEC §1 (params: as cited by later papers)", params="410M", gflops=334),
        _rin("imagenet512", "ImageNet 512x512", {"FID": "3.95 (input scaling)"}, gflops=425),
    ), RIN_SOURCE),
    PaperTable("rin_table3", "RIN Table 3: video prediction", ("FVD", "IS"), (
        _rin("kinetics600", "Kinetics-600 16x64x64 clips, frame prediction",
             {"FVD": "11.5 (400 steps), 10.8 (1000 steps)", "IS": 17.7}, gflops=387, sampling_steps="400 / 1000",
             samples=None),
    ), RIN_SOURCE),
    PaperTable("meme_table1", "MEME Table 1: latent-space generation, 256x256", ("FID",), (
        _meme("ffhq256_ldm", "FFHQ 256, latent (VQ f=4), LDM-L baseline", "~9.14", "274M",
              "SPEC §2, unverified; the paper's 288.2 GMACs for LDM-L count more than the denoiser: ours (`flops "
              "--preset ldm_l`) is 101.2 GMACs, one U-Net call on 64x64x3 latents with attention; what the paper "
              "adds (first stage, batch, or steps) is not stated"),
        _meme("ffhq256_ldm_s", "FFHQ 256, latent, LDM-S (the small baseline)", None, "90M"),
        _meme("ffhq256_iu_ldm_s", "FFHQ 256, latent, iU-LDM-S (one iU-Net for all t)", None, "82.9M"),
        _meme("ffhq256_multi", "FFHQ 256, latent, Multi-Expert (4 LDM-S experts, one architecture)", None,
              "4 x 90M"),
        _meme("ffhq256_meme", "FFHQ 256, latent, MEME (4 experts, ~3.3x faster)", "8.52 (-0.62 vs LDM-L)",
              "4 x 82.9M", "SPEC §2, unverified (the -0.62 delta: abstract)"),
        _meme("celebahq256_ldm", "CelebA-HQ 256, latent, LDM-L baseline", None, "274M"),
        _meme("celebahq256_meme", "CelebA-HQ 256, latent, MEME (4 experts)", "LDM-L - 0.37", None,
              "SPEC §2 (the -0.37 delta: abstract)"),
    ), MEME_SOURCE),
    PaperTable("meme_table2", "MEME Table 2: pixel space, ADM-S baseline, same-architecture multi-expert and MEME",
               ("FID",), (
        _meme("adm_s", "ADM-S baseline, pixel space", 49.56, "90M"),
        _meme("adm_multi", "Same-architecture multi-expert (4 experts of one architecture), ablation", None, None,
              "SPEC §2 'Ablations', unverified: SPEC names this comparison with MEME but gives no number"),
        _meme("adm_meme", "MEME on ADM-S (4 experts)", 41.10, "4 x 82M"),
    ), MEME_SOURCE),
)}

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
        return RunResult(name, None, None, [], None, missing)
    paths = {key: run_dir.joinpath(*RUN_FILES[key]) for key in stage}
    shown = {key: Path(*run_dir.parts[-2:], *RUN_FILES[key]) for key in stage}  # e.g. outputs/r/eval/metrics.json
    missing = tuple(f"{key}: {shown[key]} not found (`dvc repro {stage[key]}@{name}`)"
                    for key, path in paths.items() if not path.exists())
    found = {key: path for key, path in paths.items() if path.exists()}
    log = _read_json(found["log"]).get("history", []) if "log" in found else []
    return RunResult(name, _read_json(found["eval"]) if "eval" in found else None,
                     _read_json(found["train"]) if "train" in found else None, log, found.get("grid"), missing)


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
    if isinstance(value, int | float) and not isinstance(value, bool):
        return fmt(float(value))
    is_reason = ("no video classifier weights offline" if ev.get("frames")
                 else "no Inception-v3 classifier weights (set eval.is_classifier)")
    reason = is_reason if metric == "IS" else "not in eval/metrics.json"
    notes.append(f"{metric}: not available, {reason}")
    return DASH


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
    """E.g. "Fashion-MNIST 32x32, 1024 samples, CPU scale": what our row measured, and at what scale."""
    ev = res.eval
    parts = []
    if ev is not None:
        res_px = ev["resolution"]
        size = f"{ev['frames']}x{res_px}x{res_px}" if ev.get("frames") else f"{res_px}x{res_px}"
        parts = [f"{DATASET_NAMES.get(ev['dataset'], ev['dataset'])} {size}", f"{ev['num_samples']} samples"]
        if ev.get("context_frames"):
            parts.insert(1, f"{ev['context_frames']} context frames")
    if placement.scale:
        parts.append(placement.scale)
    return ", ".join(parts) or DASH


SHOWN_DIFFERENCES = 4  # settings named in the "vs the paper's recipe" cell; `recipe RUN` lists them all


def recipe_cell(name: str, differing: Sequence[str] | None) -> str:
    """How many of a run's settings differ from its paper row's recipe (recipes.yaml), and the first few."""
    if differing is None:
        return DASH
    if not differing:
        return "follows it"
    shown = ", ".join(differing[:SHOWN_DIFFERENCES]) + (", ..." if len(differing) > SHOWN_DIFFERENCES else "")
    return f"{len(differing)} differ: {shown} (`recipe {name}`)"


def row_record(table: PaperTable, paper: PaperRow, placed: tuple[str, ReportRow, RunResult] | None,
               differing: Sequence[str] | None = None) -> dict[str, str]:
    """One output row: the paper's numbers, ours beside each (or a dash), how the run's settings differ from the
    paper's recipe, and notes saying why a cell is a dash."""
    notes: list[str] = []
    record = {"paper row": paper.setting, "source": paper.source}
    if placed is None:
        record |= {"run": DASH, "our setting": DASH, "vs the paper's recipe": DASH}
        notes.append("no run of ours for this row (map one in params.yaml evaluation.report)")
    else:
        name, placement, res = placed
        record |= {"run": name, "our setting": our_setting(res, placement),
                   "vs the paper's recipe": recipe_cell(name, differing)}
        notes += [m for m in res.missing if m.startswith(("eval:", "train:"))]
    ours = _our_costs(placed[2]) if placed else {}
    for metric in table.metrics:
        paper_value = paper.metrics.get(metric)
        record[f"{metric} paper"] = fmt(paper_value, digits=2 if metric != "IS" else 1)
        ev = placed[2].eval if placed else None
        record[f"{metric} ours"] = _our_metric(metric, ev, notes) if ev is not None else DASH
    for col, value in _paper_costs(paper).items():
        record[f"{col} paper"] = value
        record[f"{col} ours"] = ours.get(col, DASH)
    record["notes"] = "; ".join(notes)
    return record


def columns(table: PaperTable) -> list[str]:
    pairs = [f"{c} {side}" for c in (*table.metrics, *COST_COLUMNS) for side in ("paper", "ours")]
    return ["paper row", "source", "run", "our setting", "vs the paper's recipe", *pairs, "notes"]


def check_mapping(mapping: Mapping[str, ReportRow]) -> None:
    """Every mapped run names a row that exists in its table."""
    for run, placement in mapping.items():
        keys = [r.key for r in PAPER_TABLES[placement.table].rows]
        if placement.row not in keys:
            raise ConfigError(f"params.yaml: evaluation.report.{run}.row must be one of {keys} for table "
                              f"{placement.table}, got {placement.row!r}")


def table_frame(table: PaperTable, mapping: Mapping[str, ReportRow], results: Mapping[str, RunResult],
                differing: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """The table as strings: each paper row once per run mapped to it (or once with dashes when none is).
    `differing`: each run's settings that differ from its row's recipe (absent: a dash)."""
    records = []
    differing = differing or {}
    for paper in table.rows:
        runs = sorted(r for r, p in mapping.items() if p.table == table.key and p.row == paper.key)
        placed = [(r, mapping[r], results[r]) for r in runs] or [None]
        records += [row_record(table, paper, p, differing.get(p[0]) if p else None) for p in placed]
    return pd.DataFrame.from_records(records, columns=columns(table))


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; `|` inside cells is escaped."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


LATEX_ESCAPES = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                               "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                               "<": r"\textless{}", ">": r"\textgreater{}", "—": "---", "§": r"\S{}"})


def latex_table(frame: pd.DataFrame, caption: str, label: str) -> str:
    """A plain `tabular` (no packages beyond graphicx for the resize box), every cell escaped."""
    def row(values: Sequence[Any]) -> str:
        return " & ".join(str(v).translate(LATEX_ESCAPES) for v in values) + r" \\"

    body = [row(list(r)) for r in frame.itertuples(index=False)]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{caption.translate(LATEX_ESCAPES)}}}",
                      rf"\label{{tab:{label}}}", r"\resizebox{\textwidth}{!}{%",
                      rf"\begin{{tabular}}{{{'l' * len(frame.columns)}}}", r"\hline", row(list(frame.columns)),
                      r"\hline", *body, r"\hline", r"\end{tabular}}", r"\end{table}"]) + "\n"


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
    """FID against images seen when at least two evaluations exist; returns the runs drawn (none below two)."""
    from matplotlib.figure import Figure

    points = [(r.train["images_seen"], r.eval["fid"], r.name) for r in results
              if r.eval and r.train and r.eval.get("fid") is not None]
    if len(points) < 2:
        return []
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    for x, y, name in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("images seen in training")
    ax.set_ylabel("FID (sample counts differ: see the tables)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return [p[2] for p in points]


def _eval_lines(results: Sequence[RunResult]) -> list[str]:
    lines = []
    for res in results:
        ev = res.eval
        if ev is None:
            continue
        key = "fvd" if "fvd" in ev else "fid"
        method = METHOD_NAMES.get(ev[f"{key}_method"], ev[f"{key}_method"])
        lines.append(f"- `{res.name}`: {key.upper()} by the {method} method from {ev['num_samples']} samples vs the "
                     f"first {ev['num_reference']} {ev['reference_split']} {'clips' if key == 'fvd' else 'images'} "
                     f"({ev['reference_file']}); "
                     f"features: {ev['feature_network']}, sha256 `{ev['feature_network_sha256'][:16]}`; "
                     f"sampler {ev['sampler']}, {ev['sampling_steps']} steps.")
    return lines or ["- no run has been evaluated yet (`dvc repro`)."]


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
    "`eval/metrics.json` and `train/metrics.json`; the papers' numbers are constants in `diffusion/stages/report.py`, "
    "each with its SPEC section. A dash in a paper column: SPEC gives no number; in an *ours* column: the notes say "
    "why. A row at reduced scale says so under *our setting*.", "",
]


def write_report(mapping: Mapping[str, ReportRow], run_names: Sequence[str], run_dirs: Mapping[str, Path],
                 out_dir: Path, ensembles: Mapping[str, Sequence[str]] | None = None,
                 fourier: Path | None = None, differing: Mapping[str, Sequence[str]] | None = None) -> Path:
    """out_dir: report.md, <table>.csv and <table>.tex per paper table, loss.png (fid.png), grids/. `run_dirs`: each
    run's folder (outputs/<run>). `ensembles`: each MEME ensemble's expert runs, whose training its rows and the loss
    curves show. `fourier`: the fourier stage's folder, whose figure gets a section (none when None). `differing`:
    each mapped run's settings that differ from its paper row's recipe (recipes.yaml)."""
    check_mapping(mapping)
    ensembles = dict(ensembles or {})
    experts = {e for group in ensembles.values() for e in group}
    names = sorted(set(mapping) | set(run_names) | set(ensembles) | experts)
    results = {name: load_ensemble(run_dirs, name, ensembles[name]) if name in ensembles
               else load_run(run_dirs.get(name), name, "experts" if name in experts else "runs") for name in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = list(HEADER)
    for table in PAPER_TABLES.values():
        frame = table_frame(table, mapping, results, differing)
        frame.to_csv(out_dir / f"{table.key}.csv", index=False, lineterminator="\n")
        write_text(out_dir / f"{table.key}.tex", latex_table(frame, table.title, table.key))
        lines += [f"## {table.title}", "", f"Paper numbers: {table.source}.", "", markdown_table(frame),
                  f"Also as [{table.key}.csv]({table.key}.csv) and [{table.key}.tex]({table.key}.tex).", ""]
    unplaced = [n for n in names if n not in mapping and n not in experts]
    if unplaced:
        lines += ["Runs in no table (add them to params.yaml evaluation.report): "
                  + ", ".join(f"`{n}`" for n in unplaced) + ".", ""]
    lines += ["## How our numbers were computed", "", *_eval_lines(list(results.values())),
              *_ensemble_lines(ensembles), ""]
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
    p.add_argument("--out", required=True, help="the report folder (outputs/report)")
    p.add_argument("--recipes", default=str(RECIPES_FILE), help="the papers' recipes (default: recipes.yaml)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    ensembles = {name: [e.name for e in run.experts] for name, run in params.ensembles.items()}
    path = write_report(params.evaluation.report, sorted(params.all_runs), named_paths(args.runs, "--runs"),
                        out_folder(args.out), ensembles, fourier=Path(args.fourier) if args.fourier else None,
                        differing=recipe_differences(params, args.recipes))
    print(f"wrote {path}")
    return 0
