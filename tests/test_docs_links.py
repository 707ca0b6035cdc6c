"""The documentation holds together: every relative link and image in README.md and docs/ points to a
file that exists, and the README stays a short, newcomer-first page (the rest lives under docs/)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 160

# [text](target) and ![alt](target); the target ends at the first space (a "title") or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[^)]*)?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def link_targets(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link or image outside fenced code blocks."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            found.extend((number, m.group(1)) for m in LINK.finditer(line))
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line target' for every relative link of `path` whose file or folder does not exist."""
    broken = []
    for number, target in link_targets(path.read_text(encoding="utf-8")):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        relative = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / relative).exists():
            broken.append(f"{path.relative_to(root)}:{number} {target}")
    return broken


def test_every_relative_link_resolves():
    files = markdown_files()
    assert (ROOT / "README.md").exists() and len(files) > 1
    broken = [hit for path in files for hit in broken_links(path)]
    assert not broken, "broken links (relative to each file's folder):\n" + "\n".join(broken)


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_checker_reports_a_broken_link(tmp_path):
    """Sabotage: a page with a broken link (and an image) is reported; good, external and anchor links are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "GOOD.md").write_text("# good\n")
    (tmp_path / "bench").mkdir()
    page = tmp_path / "docs" / "PAGE.md"
    page.write_text("# page\n\n[fine](GOOD.md#a-section) [web](https://example.com/x.md) [top](#page)\n"
                    "[mail](mailto:someone@example.com) [up](../bench/)\n"
                    "[gone](MISSING.md) and ![plot](../bench/results/nothing.png)\n"
                    "```\n[in code](NOT_CHECKED.md)\n```\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("[docs](docs/PAGE.md) [wrong](PAGE.md)\n", encoding="utf-8")
    assert broken_links(page, tmp_path) == ["docs/PAGE.md:5 MISSING.md", "docs/PAGE.md:5 ../bench/results/nothing.png"]
    assert [hit for p in markdown_files(tmp_path) for hit in broken_links(p, tmp_path)] == \
        ["README.md:1 PAGE.md", "docs/PAGE.md:5 MISSING.md", "docs/PAGE.md:5 ../bench/results/nothing.png"]
