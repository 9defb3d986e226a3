"""A report as Prefect artifacts (flows.artifacts): its cards become artifacts it links by id, its figures are
embedded, the other files it links are named; checked on a real Prefect server by reading the artifacts back."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from flows.artifacts import artifact_key, artifact_markdown, publish_markdown

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                       "AAAABJRU5ErkJggg==")  # a 1x1 image


def _report(folder: Path) -> Path:
    (folder / "cards").mkdir(parents=True)
    (folder / "claims" / "cards").mkdir(parents=True)
    (folder / "cards" / "rin_fmnist.md").write_text("# rin_fmnist\n\n![grid](../grids/rin_fmnist.png)\n")
    (folder / "claims" / "cards" / "schedule.md").write_text("# schedule\n\nback to [rin](../../cards/rin_fmnist.md) "
                                                            "and [the report](../../report.md)\n")
    (folder / "grids").mkdir()
    (folder / "grids" / "rin_fmnist.png").write_bytes(PNG)
    (folder / "loss.png").write_bytes(PNG)
    (folder / "rin_table2.csv").write_text("a,b\n")
    report = folder / "report.md"
    report.write_text("| run | x |\n|---|---|\n| [rin_fmnist](cards/rin_fmnist.md) | 1 |\n\n"
                      "[card](claims/cards/schedule.md), [csv](rin_table2.csv), [gone](cards/gone.md), "
                      "[paper](https://arxiv.org/abs/2212.11972), [top](#provenance)\n\n![loss](loss.png)\n")
    return report


def test_links_become_artifacts_figures_are_embedded_and_other_files_named(tmp_path):
    report = _report(tmp_path / "report")
    published: dict[str, str] = {}

    def publish(path: Path, text: str) -> str:
        published[path.relative_to(report.parent).as_posix()] = text
        return f"/artifacts/artifact/id-{len(published)}"

    md = artifact_markdown(report.read_text(), report.parent, publish, "outputs/report/ of the checkout",
                           (report, "/artifacts/key/the-report"))
    assert sorted(published) == ["cards/rin_fmnist.md", "claims/cards/schedule.md"]  # each card once
    assert "[rin_fmnist](/artifacts/artifact/id-1)" in md and "[card](/artifacts/artifact/id-2)" in md
    assert "[rin](/artifacts/artifact/id-1)" in published["claims/cards/schedule.md"]  # a card's own link
    assert "[the report](/artifacts/key/the-report)" in published["claims/cards/schedule.md"]  # not published twice
    png = base64.b64encode(PNG).decode()
    assert f"![loss](data:image/png;base64,{png})" in md
    assert f"![grid](data:image/png;base64,{png})" in published["cards/rin_fmnist.md"]  # relative to the card
    assert "csv (`rin_table2.csv`, in outputs/report/ of the checkout)" in md
    assert "gone (`cards/gone.md`: not written)" in md
    assert "[paper](https://arxiv.org/abs/2212.11972)" in md and "[top](#provenance)" in md
    assert not re.search(r"\]\((?!/artifacts/|data:|https:|#)", md)  # no relative link is left


def test_figures_beyond_the_budget_are_named_not_embedded(tmp_path, monkeypatch):
    import flows.artifacts

    report = _report(tmp_path / "report")
    monkeypatch.setattr(flows.artifacts, "MAX_EMBEDDED_CHARS", len(base64.b64encode(PNG)))  # room for one figure
    md = artifact_markdown("![a](loss.png) ![b](grids/rin_fmnist.png)", report.parent, lambda p, t: "", "the folder")
    assert md.count("data:image/png") == 1
    assert "*b: `grids/rin_fmnist.png` in the folder (too large to embed in a Prefect artifact)*" in md


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("rin-table2-cpu", "cards/rin_fmnist.md") == "rin-table2-cpu-cards-rin-fmnist"
    assert artifact_key("claims-cpu", "cards/Self_Cond.md") == "claims-cpu-cards-self-cond"
    assert re.fullmatch(r"[a-z0-9-]+", artifact_key("x", "a b/c__d.e.md"))


def test_the_report_and_its_cards_on_a_real_prefect_server(prefect_server, tmp_path, monkeypatch):
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _report(tmp_path / "report")
    monkeypatch.chdir(tmp_path)
    report = Path("report") / "report.md"  # relative, as the flows pass it

    @flow(name="artifact-check")
    def publish_it() -> str:
        return publish_markdown(report, "rin-table2-test", "rin_table2 at test scale", "outputs/report/")

    report_id = publish_it()

    async def read(key: str):
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return found[-1]

    shown = asyncio.run(read("rin-table2-test"))
    assert str(shown.id) == report_id and "data:image/png;base64," in shown.data
    card_id = re.search(r"\[rin_fmnist\]\(/artifacts/artifact/([0-9a-f-]+)\)", shown.data).group(1)
    card = asyncio.run(read("rin-table2-test-cards-rin-fmnist"))
    assert str(card.id) == card_id and card.data.startswith("# rin_fmnist")
    back = asyncio.run(read("rin-table2-test-claims-cards-schedule"))
    assert "[the report](/artifacts/key/rin-table2-test)" in back.data
