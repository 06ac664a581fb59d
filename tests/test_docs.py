"""Every file the docs point at exists: README.md, docs/*.md, the notebooks' and the code's
docstrings name paths (`fleet/round/shard.py`, `docs/ARCHITECTURE.md`, a link to a figure), and
a renamed or deleted file must not leave them pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A repository path as the docs write one: under a top-level folder of the project, no wildcard.
PATH = re.compile(r"(?<![\w/.$-])((?:fleet|tests|docs|conf|notebooks)/[\w./-]*[\w/])")
LINK = re.compile(r"\]\(([^)#\s]+)\)")


def _sources() -> list[Path]:
    out = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    out += sorted((ROOT / "fleet").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
    return out + sorted((ROOT / "conf").rglob("*.yaml"))


def missing(text: str, base: Path, links: bool = True) -> list[str]:
    """Paths named in `text` that do not exist (Markdown links, when `links`, relative to `base`;
    paths relative to the root)."""
    gone = []
    for m in PATH.finditer(text):
        p = m.group(1).rstrip(".")
        if not (ROOT / p).exists():
            gone.append(p)
    for m in LINK.finditer(text) if links else ():
        target = m.group(1)
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (base / target).exists():
            gone.append(target)
    return list(dict.fromkeys(gone))


def test_every_path_the_docs_name_exists():
    gone = {}
    for src in _sources():
        if src.name == "test_docs.py":
            continue
        found = missing(src.read_text(), src.parent, links=src.suffix == ".md")
        if found:
            gone[str(src.relative_to(ROOT))] = sorted(set(found))
    assert not gone, gone


def test_the_checker_finds_a_missing_file_and_a_dead_link():
    text = "see `fleet/round/gone.py` and ![plot](docs/nothing.png); `fleet/round/shard.py` is here"
    assert missing(text, ROOT) == ["fleet/round/gone.py", "docs/nothing.png"]
    assert missing("[ok](docs/ARCHITECTURE.md) and https://example.org/fleet/x.py", ROOT) == []
