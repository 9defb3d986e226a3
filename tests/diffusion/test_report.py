"""The report stage on a fixed metrics set: golden Markdown, CSV and cards, dashes with reasons, the paper constants,
tables a reader can read (at most 8 columns, no local paths, no ranking across N) and a provenance card per row."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffusion.config import ConfigError, ReportRow, load_params
from diffusion.stages import report
from tests.helpers import run_dirs

FIXTURES = Path(__file__).parents[1] / "fixtures" / "report"
GOLDEN = FIXTURES / "expected"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"  # `UPDATE_GOLDEN=1 pytest tests/diffusion/test_report.py` rewrites
MAPPING = {
    "rin_fmnist": ReportRow("rin_table2", "cifar10", "CPU scale"),
    "rin_fmnist_long": ReportRow("rin_table2", "cifar10", "CPU scale, 10x steps"),
    "rin_cifar10": ReportRow("rin_table2", "cifar10", ""),  # mapped, never run here: its row says why
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of the fixture outputs (plus a sample grid written here), in a fresh folder."""
    outputs = tmp_path_factory.mktemp("outputs", numbered=False)
    shutil.copytree(FIXTURES / "outputs", outputs, dirs_exist_ok=True)
    (outputs / "rin_fmnist" / "samples").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outputs / "rin_fmnist" / "samples" / "grid.png")
    out = outputs / "report"
    names = ["rin_fmnist", "rin_fmnist_long", "tiny"]
    differing = {"rin_fmnist": ["dataset", "model.patch", "train.steps", "train.lr", "train.optimizer"],
                 "rin_fmnist_long": []}
    prov = report.Provenance(COMMIT, *report.read_lock(FIXTURES / "dvc.lock"))
    report.write_report(MAPPING, names, run_dirs(outputs, set(names) | set(MAPPING)), out, differing=differing,
                        provenance=prov)
    return out


@pytest.mark.parametrize("name", ["report.md", "rin_table2.csv", "meme_table1.csv", "rin_table2.tex",
                                  "cards/rin_fmnist.md", "cards/rin_fmnist_long.md", "cards/rin_table2.imagenet64.md"])
def test_report_matches_golden(written: Path, name: str) -> None:
    actual = (written / name).read_text()
    if UPDATE:
        (GOLDEN / name).parent.mkdir(exist_ok=True)
        (GOLDEN / name).write_text(actual)
    assert actual == (GOLDEN / name).read_text()


def test_rin_table2_rows_hold_paper_and_ours_side_by_side(written: Path) -> None:
    table = pd.read_csv(written / "rin_table2.csv", dtype=str, keep_default_na=False)
    cifar = table[table["paper row"] == "CIFAR-10 32x32"].set_index("run")
    assert list(cifar.index) == ["rin_cifar10", "rin_fmnist", "rin_fmnist_long"]
    ours = cifar.loc["rin_fmnist"]
    assert (ours["FID paper"], ours["FID ours"]) == ("1.81", "87.65 (singular)")
    assert (ours["IS paper"], ours["IS ours"]) == ("10.3", report.DASH)
    assert "IS: not available" in ours["notes"] and "exact SVD method" in ours["notes"]
    assert ours["our setting"] == "Fashion-MNIST 32x32; 1,024 samples vs 2,048 train images; CPU scale"
    assert (ours["KID ours"], ours["N samples"], ours["N reference"]) == ("0.0823 ± 0.0012", "1,024", "2,048")
    assert ours["card"] == "cards/rin_fmnist.md"
    assert (ours["params paper"], ours["params ours"], ours["GFLOPs ours"]) == ("31M", "5.41M", "0.412")
    assert (ours["samples ours"], ours["train steps ours"], ours["images seen ours"]) == ("1,024", "4,000", "128,000")
    assert (ours["sampling steps paper"], ours["sampling steps ours"]) == ("1,000", "100 (ddpm)")
    long = cifar.loc["rin_fmnist_long"]
    assert (long["FID ours"], long["IS ours"]) == ("21.50", "4.32") and "singular" not in long["notes"]
    assert long["KID ours"] == report.DASH and "KID: not in eval/metrics.json" in long["notes"]  # an older evaluate
    missing = cifar.loc["rin_cifar10"]
    assert missing["FID ours"] == report.DASH and "outputs/rin_cifar10/eval/metrics.json not found" in missing["notes"]
    unmapped = table[table["run"] == report.DASH]
    assert len(unmapped) == 4 and unmapped["notes"].str.contains("no run of ours").all()


def test_report_files_figures_and_unplaced_runs(written: Path) -> None:
    for key, table in report.PAPER_TABLES.items():
        csv = pd.read_csv(written / f"{key}.csv", dtype=str, keep_default_na=False)
        tex = (written / f"{key}.tex").read_text()
        assert tex.count(r" \\") == len(csv) + 1  # header + one line per row
        assert list(csv.columns) == report.columns(table)
    assert (written / "loss.png").exists() and (written / "fid.png").exists()
    assert (written / "grids" / "rin_fmnist.png").exists()
    md = (written / "report.md").read_text()
    assert "![proxy KID against images seen and training PFLOP](quality.png)" in md
    assert "(rin_fmnist, rin_fmnist_long): a proxy, KID of 256 EMA samples (ddpm, 50 steps) vs 2,048 train" in md
    assert Image.open(written / "quality.png").size[0] > 800  # two panels: images seen, training PFLOP
    assert "Runs in no table (add them to params.yaml evaluation.report): `tiny`." in md
    assert "samples/grid.png not found) for `rin_cifar10`, `rin_fmnist_long`, `tiny`." in md


def test_single_evaluation_draws_no_fid_curve(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "outputs" / "rin_fmnist", tmp_path / "outputs" / "rin_fmnist")
    md = report.write_report({"rin_fmnist": MAPPING["rin_fmnist"]}, ["rin_fmnist"],
                             run_dirs(tmp_path / "outputs", ["rin_fmnist"]), tmp_path / "report").read_text()
    assert "fewer than two evaluations exist" in md and "![training loss](loss.png)" in md
    assert not (tmp_path / "report" / "fid.png").exists()
    assert "quality.png" in md  # its train_log.json has proxy points


def test_paper_constants_cover_the_papers_numbers() -> None:
    rows = {row.key: row for table in report.PAPER_TABLES.values() for row in table.rows}
    assert rows["cifar10"].metrics == {"FID": 1.81, "IS": 10.3} and rows["cifar10"].params == "31M"
    assert rows["imagenet64"].metrics == {"FID": 1.23, "IS": 66.5}
    assert (rows["imagenet128"].metrics["IS"], rows["imagenet128"].gflops) == (144.1, 194)
    assert (rows["imagenet256"].params, rows["imagenet256"].gflops, rows["imagenet512"].gflops) == ("410M", 334, 425)
    assert rows["kinetics600"].metrics["IS"] == 17.7 and rows["kinetics600"].gflops == 387
    assert (rows["adm_s"].metrics["FID"], rows["adm_meme"].metrics["FID"]) == (49.56, 41.10)
    meme = [row for key in ("meme_table1", "meme_table2") for row in report.PAPER_TABLES[key].rows]
    assert all("arXiv 2306.04990" in row.source or "CompVis/latent-diffusion" in row.source for row in meme)
    assert all("unverified" in row.source for row in meme if "arXiv 2306.04990 Table" in row.source)
    rin = [row for key in ("rin_table2", "rin_table3") for row in report.PAPER_TABLES[key].rows]
    assert all(re.search(r"arXiv 2212\.11972 (Table|Fig\.) \d", row.source) for row in rin)


def test_mapping_to_a_missing_row_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.report\.x\.row must be one of \['cifar10'"):
        report.write_report({"x": ReportRow("rin_table2", "cifar100", "")}, [], {}, tmp_path / "r")


def test_shipped_mapping_places_the_default_run() -> None:
    params = load_params("params.yaml")
    report.check_mapping(params.evaluation.report)
    assert params.evaluation.report["rin_fmnist"].table == "rin_table2"


def test_latex_escapes_special_characters() -> None:
    frame = pd.DataFrame({"a_b": ["~9.14 & 50%"], "c": [report.DASH]})
    tex = report.latex_table(frame, "Table §2", "t")
    assert r"a\_b & c \\" in tex and r"\textasciitilde{}9.14 \& 50\% & --- \\" in tex and r"\S{}2" in tex
    assert r"n \textless{}= 2048" in report.latex_table(pd.DataFrame({"x": ["n <= 2048"]}), "c", "t")


# --- a report a reader can read ------------------------------------------------------------------------------------


def _tables(md: str) -> list[list[str]]:
    """The Markdown tables of a document: each as its lines."""
    tables, current = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables, current = [*tables, current], []
    return tables + ([current] if current else [])


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_every_table_fits_the_prefect_artifact_pane_with_ours_beside_the_papers(written: Path) -> None:
    md = (written / "report.md").read_text()
    tables = _tables(md)
    assert len(tables) == len(report.PAPER_TABLES)
    for lines in tables:
        widths = {len(_cells(line)) for line in lines}
        assert len(widths) == 1 and widths.pop() <= 7, lines[0]
        # cells do not wrap in the artifact view: the widest cell of each column sets the table's width
        assert report.nowrap_width("\n".join(lines)) <= report.ARTIFACT_PANE_PX, lines[0]
    header = _cells(tables[0][0])
    assert header[header.index("FID paper") + 1:header.index("FID paper") + 4] == ["FID ours (N)", "KID ours", "floor"]
    row = next(_cells(line) for line in tables[0] if "[rin_fmnist](cards/rin_fmnist.md)" in line)
    assert row[header.index("FID ours (N)")] == "87.65 (1,024)"  # the FID with its N
    assert row[header.index("KID ours")] == "0.0823 ± 0.0012" and row[header.index("floor")] == "26.01"
    assert row[header.index("FID paper")] == "1.81"
    glossed = next(_cells(line) for line in tables[0] if "imagenet256.md" in line)
    assert glossed[header.index("FID paper")] == "4.51\\*"  # the paper's gloss is a line below the table
    assert "\\* The paper's values in full: ImageNet 256x256: FID 4.51 (3.42 with input scaling)" in md
    # our setting and the recipe's differences: one line per run below its table
    assert ("- `rin_fmnist` (CIFAR-10 32x32): Fashion-MNIST 32x32; 1,024 samples vs 2,048 train images; CPU scale; "
            "against the paper's recipe, 5 differ: dataset, model.patch, train.steps, train.lr, ... "
            "(`recipe rin_fmnist`).") in md
    for card in re.findall(r"\]\((cards/[^)]+)\)", md):  # every card the tables link to exists
        assert (written / card).is_file(), card


def test_the_width_estimate_counts_what_the_artifact_view_shows() -> None:
    narrow = "| a | b |\n|---|---|\n| [run](cards/run.md) | `x` |\n"
    assert report.nowrap_width(narrow) == 3 * report.CHAR_PX + 1 * report.CHAR_PX + 2 * report.CELL_PADDING_PX
    wide = "| " + " | ".join(["Fashion-MNIST 32x32; 2,560 samples vs 60,000 train images; CPU scale"] * 2) + " |\n"
    assert report.nowrap_width(wide) > report.ARTIFACT_PANE_PX  # the old "our setting" column alone nearly fills it


def test_no_local_path_and_no_spec_reference(written: Path) -> None:
    texts = {p.relative_to(written).as_posix(): p.read_text() for p in [written / "report.md",
                                                                          *(written / "cards").glob("*.md")]}
    for name, text in texts.items():
        assert "SPEC" not in text, name
        assert str(written.parent) not in text and "/home/" not in text, name
        # an absolute path: a slash after a space, quote, bracket or backtick, not part of a URL
        assert not re.search(r"(^|[\s(`'\"])/[A-Za-z0-9_.-]+/", text, re.M), (name, re.findall(r"\S*/\S+", text))
    assert "data/refstats/fashion_mnist/train-10000.npz" not in texts["cards/rin_fmnist_long.md"]  # absolute: cut
    assert "refstats/fashion_mnist/train-10000.npz" in texts["cards/rin_fmnist_long.md"]


def test_each_card_carries_its_provenance(written: Path) -> None:
    card = (written / "cards" / "rin_fmnist.md").read_text()
    for needed in ("1,024 images, sha256 `" + "5a17" * 16 + "`",  # N and the samples' hash
                   "the first 2,048 images of the train split (data/refstats/fashion_mnist/train-2048.npz)",
                   "sha256 `7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34`",  # feature network
                   "PIL bicubic of each uint8 image to 299x299",  # resize
                   "- **sampler and steps**: ddpm, 100 steps",
                   "outputs/rin_fmnist/train/ema.safetensors md5 `b7df867c6bd5d17cfb775c5b41d94e57`",  # weights
                   f"`{COMMIT}`", "`evaluate@rin_fmnist`, digest sha256 `",
                   "its eval/metrics.json is the one dvc.lock records",
                   "| params | 31M | 5.41M |", "| images seen | 38,400,000 | 128,000 |",  # the cost columns
                   "5 settings differ: dataset, model.patch, train.steps, train.lr, train.optimizer",
                   "arXiv 2212.11972 Table 2", "exact SVD method"):  # sources, notes
        assert needed in card, needed
    long = (written / "cards" / "rin_fmnist_long.md").read_text()
    assert "differs from the one dvc.lock records" in long and "no `sample@rin_fmnist_long` entry" in long
    assert "samples' sha256: not in eval/metrics.json" in long
    paper_only = (written / "cards" / "rin_table2.imagenet64.md").read_text()
    assert "No run of ours" in paper_only and "| train steps | 150,000 | — |" in paper_only


def test_the_stage_digest_is_dvcs_own(written: Path) -> None:
    """The card's digest is DVC's dict_sha256 of the lock entry without its outputs (flows/stages.py keys tasks so)."""
    from dvc.utils import dict_sha256

    stages, _ = report.read_lock(FIXTURES / "dvc.lock")
    entry = {k: v for k, v in stages["evaluate@rin_fmnist"].items() if k != "outs"}
    assert f"digest sha256 `{dict_sha256(entry)}`" in (written / "cards" / "rin_fmnist.md").read_text()


def test_rows_at_different_n_are_not_ranked(written: Path) -> None:
    md = (written / "report.md").read_text()
    table = _tables(md)[0]
    runs = [m for line in table for m in re.findall(r"\[(\w+)\]\(cards/\1\.md\)", line)]
    assert runs == ["rin_cifar10", "rin_fmnist", "rin_fmnist_long"]  # by name; by FID it would be _long first
    section = md.split("## RIN Table 2")[1].split("## RIN Table 3")[0]
    assert "**" not in section and "best" not in section.lower()
    assert ("scored at different N or against different references (N = 1,024 vs 2,048 train (Fashion-MNIST): "
            "`rin_fmnist`; N = 10,000 vs 10,000 train (Fashion-MNIST): `rin_fmnist_long`)") in section
    assert "do not rank these rows against each other by FID" in section


def test_one_protocol_is_said_to_be_shared(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "outputs" / "rin_fmnist", tmp_path / "outputs" / "rin_fmnist")
    md = report.write_report({"rin_fmnist": MAPPING["rin_fmnist"]}, ["rin_fmnist"],
                             run_dirs(tmp_path / "outputs", ["rin_fmnist"]), tmp_path / "report").read_text()
    assert "share one protocol (N = 1,024 vs 2,048 train" in md and "do not rank" not in md
    card = (tmp_path / "report" / "cards" / "rin_fmnist.md").read_text()
    assert "dvc.lock not read (the report was not given --dvc-lock)" in card and "`unknown`" in card


def test_dvc_lock_that_is_not_one_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "dvc.lock"
    bad.write_text("stages: [1, 2\n")
    with pytest.raises(ConfigError, match=r"dvc\.lock: not valid YAML .*git checkout dvc\.lock"):
        report.read_lock(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"dvc\.lock: not a dvc\.lock \(no `stages` mapping\)"):
        report.read_lock(bad)
    assert report.read_lock(tmp_path / "none.lock") == (None, "none.lock not found (no stage has run under `dvc "
                                                                 "repro` here)")


def test_git_commit_is_read_or_unknown(tmp_path: Path) -> None:
    assert report.git_commit(tmp_path) == "unknown"  # not a git checkout
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("a")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=tmp_path, check=True, env=os.environ | env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert report.git_commit(tmp_path) == head
    (tmp_path / "outputs").mkdir()
    for rel in ("dvc.lock", "outputs/metrics.json"):  # what a running `dvc repro` rewrites is not a source change
        (tmp_path / rel).write_text("a")
    subprocess.run(["git", "add", "dvc.lock", "outputs"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "y"], cwd=tmp_path, check=True, env=os.environ | env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    for rel in ("dvc.lock", "outputs/metrics.json"):
        (tmp_path / rel).write_text("b")
    assert report.git_commit(tmp_path) == head
    (tmp_path / "f").write_text("b")
    assert report.git_commit(tmp_path) == f"{head} + uncommitted changes"
    assert report.git_commit(tmp_path / "outputs") == f"{head} + uncommitted changes"  # from a subfolder too
