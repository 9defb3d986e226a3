"""The report stage on a fixed metrics set: golden Markdown and CSV, dashes with reasons, the paper constants."""

from __future__ import annotations

import os
import shutil
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
    report.write_report(MAPPING, names, run_dirs(outputs, set(names) | set(MAPPING)), out, differing=differing)
    return out


@pytest.mark.parametrize("name", ["report.md", "rin_table2.csv", "meme_table1.csv"])
def test_report_matches_golden(written: Path, name: str) -> None:
    actual = (written / name).read_text()
    if UPDATE:
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
    assert ours["our setting"] == "Fashion-MNIST 32x32, 1024 samples, CPU scale"
    assert (ours["params paper"], ours["params ours"], ours["GFLOPs ours"]) == ("31M", "5.41M", "0.412")
    assert (ours["samples ours"], ours["train steps ours"], ours["images seen ours"]) == ("1,024", "4,000", "128,000")
    assert (ours["sampling steps paper"], ours["sampling steps ours"]) == ("1,000", "100 (ddpm)")
    long = cifar.loc["rin_fmnist_long"]
    assert (long["FID ours"], long["IS ours"]) == ("21.50", "4.32") and "singular" not in long["notes"]
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
    assert "Runs in no table (add them to params.yaml evaluation.report): `tiny`." in md
    assert "samples/grid.png not found) for `rin_cifar10`, `rin_fmnist_long`, `tiny`." in md


def test_single_evaluation_draws_no_fid_curve(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "outputs" / "rin_fmnist", tmp_path / "outputs" / "rin_fmnist")
    md = report.write_report({"rin_fmnist": MAPPING["rin_fmnist"]}, ["rin_fmnist"],
                             run_dirs(tmp_path / "outputs", ["rin_fmnist"]), tmp_path / "report").read_text()
    assert "fewer than two evaluations exist" in md and "![training loss](loss.png)" in md
    assert not (tmp_path / "report" / "fid.png").exists()


def test_paper_constants_cover_spec_numbers() -> None:
    rows = {row.key: row for table in report.PAPER_TABLES.values() for row in table.rows}
    assert rows["cifar10"].metrics == {"FID": 1.81, "IS": 10.3} and rows["cifar10"].params == "31M"
    assert rows["imagenet64"].metrics == {"FID": 1.23, "IS": 66.5}
    assert (rows["imagenet128"].metrics["IS"], rows["imagenet128"].gflops) == (144.1, 194)
    assert (rows["imagenet256"].params, rows["imagenet256"].gflops, rows["imagenet512"].gflops) == ("410M", 334, 425)
    assert rows["kinetics600"].metrics["IS"] == 17.7 and rows["kinetics600"].gflops == 387
    assert (rows["adm_s"].metrics["FID"], rows["adm_meme"].metrics["FID"]) == (49.56, 41.10)
    meme = [row for key in ("meme_table1", "meme_table2") for row in report.PAPER_TABLES[key].rows]
    assert all("SPEC §2" in row.source for row in meme)
    assert all("unverified" in row.source for row in meme if "delta" not in row.source)


def test_mapping_to_a_missing_row_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.report\.x\.row must be one of \['cifar10'"):
        report.write_report({"x": ReportRow("rin_table2", "cifar100", "")}, [], {}, tmp_path / "r")


def test_shipped_mapping_places_the_default_run() -> None:
    params = load_params("params.yaml")
    report.check_mapping(params.evaluation.report)
    assert params.evaluation.report["rin_fmnist"].table == "rin_table2"


def test_latex_escapes_special_characters() -> None:
    frame = pd.DataFrame({"a_b": ["~9.14 & 50%"], "c": [report.DASH]})
    tex = report.latex_table(frame, "SPEC §2", "t")
    assert r"a\_b & c \\" in tex and r"\textasciitilde{}9.14 \& 50\% & --- \\" in tex and r"\S{}2" in tex
    assert r"n \textless{}= 2048" in report.latex_table(pd.DataFrame({"x": ["n <= 2048"]}), "c", "t")
