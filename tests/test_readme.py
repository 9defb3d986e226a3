"""The README's figures against the committed files they come from: its results table row by row against
outputs/<run>/{train,eval}/metrics.json (and an ensemble's outputs/<run>_e<n>/train/metrics.json), and every
throughput, FID and FVD it quotes anywhere against those files and benchmarks/results/*.json. A re-run that commits
new metrics, or a README edit, that leaves a stale figure fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"\d+(?:\.\d+)?"


def quoted(text: str, value: float) -> bool:
    """Whether `text` is `value` rounded to as many decimals as `text` shows."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return float(text) == round(value, decimals)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def train_metrics(root: Path, run: str) -> list[dict]:
    """The train metrics of a run, or of each expert of an ensemble (outputs/<run>_e<n>/), in expert order."""
    single = root / f"outputs/{run}/train/metrics.json"
    if single.exists():
        return [load(single)]
    experts = sorted(root.glob(f"outputs/{run}_e*/train/metrics.json"), key=lambda p: int(p.parts[-3].rsplit("e")[-1]))
    assert experts, f"no train metrics for {run}"
    return [load(p) for p in experts]


def results_table(readme: str) -> list[list[str]]:
    """The rows of the README's results table (the one whose header starts `| run | trained | throughput`)."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run | trained | throughput"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def check_row(root: Path, row: list[str]) -> None:
    run_cell, trained, throughput, loss, score, counts = row
    run = re.match(r"`(\w+)`", run_cell).group(1)
    trains, ev = train_metrics(root, run), load(root / f"outputs/{run}/eval/metrics.json")
    frames = re.search(r"\((\d+) context frames\)", run_cell)
    assert (int(frames.group(1)) if frames else 0) == ev.get("context_frames", 0), f"{run}: context frames"

    m = re.fullmatch(rf"(?:(\d+) experts x )?(\d+) x (\d+) (images|clips), ({NUMBER}) min", trained)
    assert m, f"{run}: cannot read {trained!r}"
    experts, steps, batch, unit, minutes = m.groups()
    assert int(experts or 1) == len(trains), f"{run}: {len(trains)} trained networks, README says {experts or 1}"
    for t in trains:
        assert t["steps"] == int(steps) and t["images_seen"] == int(steps) * int(batch), f"{run}: {t}"
    assert quoted(minutes, sum(t["images_seen"] / t["images_per_s"] for t in trains) / 60), f"{run}: {minutes} min"

    m = re.fullmatch(rf"({NUMBER})(?:-({NUMBER}))? (img/s|clips/s)", throughput)
    assert m and m.group(3) == ("clips/s" if unit == "clips" else "img/s"), f"{run}: {throughput!r}"
    rates = sorted(t["images_per_s"] for t in trains)
    assert quoted(m.group(1), rates[0]) and quoted(m.group(2) or m.group(1), rates[-1]), f"{run}: {throughput}"

    m = re.fullmatch(rf"({NUMBER})(?:-({NUMBER}))?", loss)
    losses = sorted(t["final_loss"] for t in trains)
    assert m and quoted(m.group(1), losses[0]) and quoted(m.group(2) or m.group(1), losses[-1]), f"{run}: {loss}"

    m = re.fullmatch(rf"(FID|FVD) ({NUMBER})", score)
    assert m and quoted(m.group(2), ev[m.group(1).lower()]), f"{run}: {score} vs {ev.get(m.group(1).lower())}"

    m = re.fullmatch(r"(\d+) vs (\d+) (\w+) (?:images|clips)", counts)
    assert m and (int(m.group(1)), int(m.group(2)), m.group(3)) == (
        ev["num_samples"], ev["num_reference"], ev["reference_split"]), f"{run}: {counts}"  # fmt: skip


def committed_figures(root: Path) -> dict[str, list[float]]:
    """Every throughput, FID and FVD the committed files hold: img/s (image runs and benchmarks), clips/s (video);
    FID / FVD of the samples and of the floor (held-out real images scored the same way), and the benchmarks' FIDs."""
    figures: dict[str, list[float]] = {"img/s": [], "clips/s": [], "FID": [], "FVD": []}
    for path in root.glob("outputs/*/train/metrics.json"):
        run = path.parts[-3]
        video = (root / f"outputs/{run}/eval/metrics.json").exists() and "fvd" in load(
            root / f"outputs/{run}/eval/metrics.json")  # fmt: skip
        figures["clips/s" if video else "img/s"].append(load(path)["images_per_s"])
    for path in root.glob("outputs/*/eval/metrics.json"):
        ev = load(path)
        kind = "FVD" if "fvd" in ev else "FID"
        figures[kind] += [ev[k] for k in (kind.lower(), f"floor_{kind.lower()}") if k in ev]  # a score, its floor

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "images_per_s" and isinstance(value, (int, float)):
                    figures["img/s"].append(value)
                if key == "fid" and isinstance(value, (int, float)):  # the A/Bs' and the bias benchmark's
                    figures["FID"].append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in root.glob("benchmarks/results/*.json"):
        walk(load(path))
    return figures


def stale_figures(readme: str, figures: dict[str, list[float]]) -> list[str]:
    """README figures ('218 img/s', '32.7 clips/s', 'FID 155.0', 'FVD 496.5') that no committed file holds."""
    found = [(m.group(1), m.group(2)) for m in re.finditer(rf"({NUMBER}) (img/s|clips/s)\b", readme)]
    found += [(m.group(2), m.group(1)) for m in re.finditer(rf"\b(FID|FVD) ({NUMBER})\b", readme)]
    return [f"{text} {kind}" for text, kind in found if not any(quoted(text, v) for v in figures[kind])]


def test_the_results_table_is_what_the_committed_metrics_say():
    rows = results_table((REPO / "README.md").read_text())
    assert {re.match(r"`(\w+)`", row[0]).group(1) for row in rows} == {
        p.parts[-3] for p in REPO.glob("outputs/*/eval/metrics.json")}  # fmt: skip  # every evaluated run, once
    for row in rows:
        check_row(REPO, row)


def test_every_throughput_and_score_the_readme_quotes_is_in_a_committed_file():
    assert stale_figures((REPO / "README.md").read_text(), committed_figures(REPO)) == []


def test_a_stale_figure_is_caught(tmp_path):
    """The checks above on a copy whose README says what an earlier README did (48 clips/s, 189 img/s), and on one
    whose committed metrics moved under the README."""
    readme = (REPO / "README.md").read_text()
    figures = committed_figures(REPO)
    old = "\ntraining 8.5 minutes at 48 clips/s, 189 img/s, FID 164.5\n"
    assert stale_figures(readme + old, figures) == stale_figures(readme, figures) + ["48 clips/s", "189 img/s",
                                                                                      "164.5 FID"]  # fmt: skip

    for name in ("README.md", *(str(p.relative_to(REPO)) for p in REPO.glob("outputs/*/*/metrics.json"))):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    metrics = tmp_path / "outputs/rin_moving_fmnist/train/metrics.json"
    metrics.write_text(json.dumps(load(metrics) | {"images_per_s": 18.03}))
    row = next(r for r in results_table(readme) if r[0].startswith("`rin_moving_fmnist`"))
    with pytest.raises(AssertionError, match="rin_moving_fmnist"):
        check_row(tmp_path, row)
