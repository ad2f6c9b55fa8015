"""The documentation stays usable: links resolve, the README stays a short guide whose commands
are the ones CI runs, its snippet runs, and every spec section the code cites exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted([README, *(REPO / "docs").glob("*.md")])

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """Markdown without fenced blocks and code spans (brackets there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lowercase, punctuation other than '-' and '_' dropped, spaces to
    '-', repeats numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text()))
            if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto: are not checked here


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "SPEC.md", "DESIGN.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    broken = []
    for target in _links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with id '{anchor}' in {dest.name}")
    assert not broken, f"{path.relative_to(REPO)}: " + "; ".join(broken)


def test_anchor_ids_follow_github():
    page = REPO / "docs" / "results.md"
    assert "the-papers-analyses" in _anchors(page)
    assert "8-reliability" in _anchors(README)


def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_commands_are_the_ones_ci_runs():
    """The two commands at the top: the quickstart, and exactly the test command of .ci/run."""
    text = README.read_text()
    block = FENCE.search(text[text.index("## 1. Install and run"):]).group(0).splitlines()
    commands = [line for line in block[1:-1] if line and not line.startswith("#")]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert commands == ["bash scripts/setup_env.sh && .venv/bin/python -m powernorm_fairseq.quickstart",
                        ci[-1]]


def test_readme_python_snippet_runs():
    text = README.read_text()
    snippet = re.search(r"^```python\n(.*?)^```", text, re.S | re.M).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    y, x = scope["y"], scope["x"]
    assert y.shape == x.shape and bool(y.isfinite().all())
    assert "power" in scope["NORM_CHOICES"]


CITATION = re.compile(r"(?:PAPER|SPEC)\.md,?\s+(?:sections?\s+|s\.\s*)?(\d+(?:\.\d+)?)"
                      r"(?:\s*(-|and)\s*(\d+))?")


def test_citation_pattern_reads_every_form():
    def sections(text):
        first, sep, last = CITATION.search(text).groups()
        return (first, sep, last)

    assert sections("(PAPER.md sections 1-3)") == ("1", "-", "3")
    assert sections("(docs/SPEC.md section 5.1; the released") == ("5.1", None, None)
    assert sections("PAPER.md sections 0 and 5") == ("0", "and", "5")
    assert sections("PAPER.md s.7") == ("7", None, None)
    assert sections("(PAPER.md\nsection 1)") == ("1", None, None)


def test_cited_spec_sections_exist():
    """Code and presets cite "docs/SPEC.md section N": each N is a heading of
    docs/SPEC.md numbered like the spec it replaces."""
    headings = {m.group(1) for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)\.? ",
                                                 (REPO / "docs" / "SPEC.md").read_text(), re.M)}
    cited = set()
    for path in [*REPO.glob("powernorm_fairseq/**/*.py"), *REPO.glob("configs/**/*.yaml"),
                 *REPO.glob("scripts/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("analysis/*.md"),
                 *REPO.glob("results/*.md"), *DOCS]:
        for m in CITATION.finditer(path.read_text()):
            first, sep, last = m.groups()
            if sep == "-":  # "sections 1-3"
                cited |= {str(n) for n in range(int(first), int(last) + 1)}
            else:  # "section 5.1", "sections 0 and 5"
                cited |= {first, last} - {None}
    assert cited, "no citation found: the pattern no longer matches how the code cites the spec"
    assert cited <= headings, f"cited but missing in docs/SPEC.md: {sorted(cited - headings)}"
