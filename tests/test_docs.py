"""README.md and docs/*.md: every relative link and image resolves, every #anchor names a
heading, and the README stays a landing page (at most 250 lines).

A figure under results/**/figures/ may be missing, since the notebooks regenerate the figures:
allowed only when its file name is one that a notebook (notebooks/*.ipynb), the study
(cam/study/*.py) or a test (tests/*.py) writes, as a literal or an f-string pattern such as
"03-saliency-{k}.jpg".
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest

pytestmark = pytest.mark.study  # about the repository's pages, not a backend

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250


FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FIGURE_NAME = re.compile(r"""["']([^"'\n]*\.(?:png|jpe?g|svg|pdf|gif))["']""", re.IGNORECASE)


def prose(text: str) -> str:
    """``text`` with fenced code blocks blanked (line numbers kept) and inline code replaced by
    a placeholder, so that code never counts as a link or a heading."""
    lines, inside = [], None
    for line in text.split("\n"):
        fence = FENCE.match(line)
        if inside is None and fence:
            inside = fence.group(1)
            lines.append("")
        elif inside is not None:
            if fence and fence.group(1) == inside:
                inside = None
            lines.append("")
        else:
            lines.append(re.sub(r"`[^`\n]+`", "code", line))
    return "\n".join(lines)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation dropped
    except '-' and '_', spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    kept = "".join(c for c in text
                   if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    """Every anchor GitHub makes for ``page``'s headings (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    lines, inside = [], None
    for line in page.read_text(encoding="utf-8").split("\n"):  # headings outside code blocks
        fence = FENCE.match(line)
        if fence and (inside is None or fence.group(1) == inside):
            inside = fence.group(1) if inside is None else None
        elif inside is None:
            lines.append(line)
    for line in lines:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(found)


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image in ``page``'s prose."""
    text = prose(page.read_text(encoding="utf-8"))
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


@lru_cache(maxsize=None)
def figure_patterns() -> tuple[re.Pattern, ...]:
    """Figure names that the notebooks, the study or the tests write, as regular expressions
    (an f-string's {...} matches any run of characters without a '/')."""
    sources = []
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        sources += ["".join(cell["source"]) if isinstance(cell["source"], list)
                    else cell["source"] for cell in cells]
    for path in [*sorted((ROOT / "cam" / "study").glob("*.py")),
                 *sorted((ROOT / "tests").glob("*.py"))]:
        if path.resolve() != Path(__file__).resolve():  # this file must not allow itself
            sources.append(path.read_text(encoding="utf-8"))
    # An f-string's fields become a placeholder first: "{k // 2}" holds a '/' of its own.
    names = {re.sub(r"\{[^{}]*\}", "\0", m.group(1)).rsplit("/", 1)[-1]
             for source in sources for m in FIGURE_NAME.finditer(source)}
    # Figures carry their notebook's number in front ("03-", "A01-"): other names in the
    # sources (a test's "{name}.png", say) are not figures and would allow anything.
    names = {name for name in names if re.match(r"[A-Z]?\d{2}-", name)}
    return tuple(re.compile("[^/]+".join(re.escape(part) for part in name.split("\0")))
                 for name in sorted(names))


def regenerated_figure(path: Path) -> bool:
    """True for a results/**/figures/<name> path whose name some notebook, study module or
    test writes."""
    try:
        parts = path.resolve().relative_to(ROOT).parts
    except ValueError:
        return False
    if len(parts) < 3 or parts[0] != "results" or parts[-2] != "figures":
        return False
    return any(p.fullmatch(parts[-1]) for p in figure_patterns())


def problems(page: Path) -> list[str]:
    found = []
    for line, target in links(page):
        if re.match(r"(?i)(https?:|mailto:)", target):
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        if not path_part:  # a link within the page
            if unquote(anchor) not in anchors(page):
                found.append(f"{where}: no heading with this anchor")
            continue
        path = (page.parent / unquote(path_part)).resolve()
        if not path.exists():
            if not regenerated_figure(path):
                found.append(f"{where}: no such file or folder")
            continue
        if anchor and path.suffix == ".md" and unquote(anchor) not in anchors(path):
            found.append(f"{where}: no heading with this anchor in {path.name}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(page):
    assert not problems(page), "\n".join(problems(page))


def test_docs_exist_and_readme_links_them():
    docs = [p for p in PAGES if p.parent.name == "docs"]
    assert docs, "docs/*.md is empty"
    readme_targets = {target.partition("#")[0] for _, target in links(ROOT / "README.md")}
    unlinked = [p.name for p in docs if f"docs/{p.name}" not in readme_targets]
    assert not unlinked, f"docs not linked from README.md: {unlinked}"


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


# The checker itself, on cases worked out by hand.

@pytest.mark.parametrize("heading, slug", [
    ("The study, notebook by notebook", "the-study-notebook-by-notebook"),
    ("Targets: what to explain", "targets-what-to-explain"),
    ("The reference README's two open questions", "the-reference-readmes-two-open-questions"),
    ("A threshold in place of ReLU", "a-threshold-in-place-of-relu"),
    ("`cam.widgets` and the head_only flag", "camwidgets-and-the-head_only-flag"),
    ("Backends & GPU", "backends--gpu"),
    ("cam — FastAblationCAM", "cam--fastablationcam"),
    ("Use [the docs](docs/usage.md)", "use-the-docs"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_links_skip_code_and_find_images(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n![a figure](fig.png) and [`code` text](other.md#title)\n"
                    "```python\nx[0](1)  # [not](a-link.md)\n```\n"
                    "`[inline](code.md)` [multi\nline](#title)\n", encoding="utf-8")
    assert links(page) == [(3, "fig.png"), (3, "other.md#title"), (7, "#title")]
    assert anchors(page) == {"title"}


def test_regenerated_figure_rule():
    figures = ROOT / "results" / "polen23e" / "figures"
    assert regenerated_figure(figures / "03-saliency-7.jpg")    # an f-string in notebook 03
    assert regenerated_figure(figures / "05-grain-masks.jpg")   # a literal in notebook 05
    assert not regenerated_figure(figures / "99-nobody-writes-this.png")
    assert not regenerated_figure(ROOT / "results" / "polen23e" / "tables" / "05-road.jpg")
