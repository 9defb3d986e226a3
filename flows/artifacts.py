"""A Markdown report as Prefect artifacts that read in the Prefect UI as they do on disk.

The UI shows an artifact's Markdown on its own page, where the report's relative links lead nowhere: its cards
(cards/<run>.md) become artifacts of their own, linked by id; its figures are embedded as data URIs, which the UI
draws; other files it links (the CSV and LaTeX tables) are named, with the folder they are in.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|/|#)", re.I)  # a URL, an absolute path in the UI, or an anchor
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml"}
# Figures are embedded while an artifact's data URIs stay within this many characters; the rest are named. The UI
# drew a report with 0.73 MB of them and showed nothing of one with 1.7 MB (Prefect 3, Chromium).
MAX_EMBEDDED_CHARS = 700_000


def artifact_key(prefix: str, relative: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for a file linked from the report:
    ("rin-table2-cpu", "cards/rin_fmnist.md") -> "rin-table2-cpu-cards-rin-fmnist"."""
    stem = relative.rsplit(".", 1)[0] if relative.endswith(".md") else relative
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", f"{prefix}-{stem}".lower())).strip("-")


def artifact_markdown(markdown: str, folder: Path, publish: Callable[[Path, str], str], where: str,
                      itself: tuple[Path, str] | None = None) -> str:
    """`markdown` (a file of `folder`) with its relative links rewritten for the Prefect UI. `publish(path, text)`
    makes an artifact of a linked Markdown file (its own links rewritten the same way) and returns its UI address;
    `where` names `folder` for the reader (e.g. "outputs/report/ of workspace 'claims-cpu'"); `itself`: the file
    `markdown` was read from and its address, for the cards that link back to it."""
    done: dict[Path, str] = {itself[0].resolve(): itself[1]} if itself else {}
    root = folder.resolve()

    def rewrite(text: str, base: Path) -> str:
        budget = [MAX_EMBEDDED_CHARS]  # per artifact: each card is one of its own

        def sub(m: re.Match[str]) -> str:
            bang, label, target = m.groups()
            if EXTERNAL.match(target):
                return m.group(0)
            path = (base / target).resolve()
            shown = path.relative_to(root).as_posix() if path.is_relative_to(root) else target
            if not path.is_file():
                return f"{label} (`{shown}`: not written)" if not bang else f"*{label}: `{shown}` not written*"
            mime = IMAGE_TYPES.get(path.suffix.lower())
            if bang and mime:
                data = base64.b64encode(path.read_bytes()).decode()
                if len(data) > budget[0]:
                    return f"*{label}: `{shown}` in {where} (too large to embed in a Prefect artifact)*"
                budget[0] -= len(data)
                return f"![{label}](data:{mime};base64,{data})"
            if not bang and path.suffix == ".md":
                if path not in done:
                    done[path] = ""  # a cycle of links publishes each file once
                    done[path] = publish(path, rewrite(path.read_text(), path.parent))
                if done[path]:
                    return f"[{label}]({done[path]})"
            return f"{label} (`{shown}`, in {where})"

        return LINK.sub(sub, text)

    return rewrite(markdown, folder)


def publish_markdown(path: Path, key: str, description: str, where: str) -> str:
    """`path` as the artifact `key`, every Markdown file it links as an artifact `<key>-<its path>` (linked by id),
    its figures embedded. Returns the report artifact's id. Call it inside a flow or task run."""
    folder = path.parent.resolve()

    def publish(card: Path, text: str) -> str:
        relative = card.relative_to(folder).as_posix() if card.is_relative_to(folder) else card.name
        made = create_markdown_artifact(key=artifact_key(key, relative), markdown=text,
                                        description=f"{relative}, linked from {key}")
        return f"/artifacts/artifact/{made}"

    markdown = artifact_markdown(path.read_text(), folder, publish, where, (path, f"/artifacts/key/{key}"))
    return str(create_markdown_artifact(key=key, markdown=markdown, description=description))
