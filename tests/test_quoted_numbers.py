"""The findings quote the committed tables truthfully: docs/findings.md's table blocks are what
``python -m cam.study.tables`` (``make findings``) builds from results/polen23e/tables/*.md, and
every number in the prose of README.md's "What the study found" and of docs/findings.md is a
rounding of a number in a table that its section links or includes (cam/study/tables.py says
exactly what counts, and which few numbers are exempt as not being measurements).

When a notebook rewrites its tables: ``make findings``, then fix the prose it reports.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from cam.study import tables

pytestmark = pytest.mark.study  # about the repository's pages, not a backend

ROAD = "results/polen23e/tables/05-road.md"


def test_table_blocks_are_current():
    text = tables.FINDINGS.read_text()
    assert tables.BLOCK.search(text), "docs/findings.md includes no table block"
    assert tables.regenerate(text) == text, "the table blocks are stale: run `make findings`"


@pytest.mark.parametrize("page", list(tables.CHECKED), ids=lambda p: p.name)
def test_quoted_numbers_are_in_the_cited_tables(page):
    only = tables.CHECKED[page]
    assert only is None or f"## {only}\n" in page.read_text(), f"no section {only!r}"
    assert tables.misquoted(page, only=only) == []


def test_every_checked_section_cites_a_table():
    """A section quoting numbers without citing a table would fail every number anyway; this
    says why, and guards the README section's links."""
    for page, only in tables.CHECKED.items():
        for heading, body in tables.sections(page.read_text()):
            if (only is None or heading == only) and tables.quoted_numbers(body):
                assert tables.cited_tables(body, page), f"{page.name} § {heading}"


def planted(body: str) -> str:
    """A page of one section that links the ROAD table, as README.md's section would."""
    return f"# Page\n\n## What the study found\n\nSee [ROAD](../{ROAD}). {body}\n"


def check(body: str, page=tables.FINDINGS) -> list[str]:
    return tables.misquoted(page, planted(body))


def road_ms(method: str) -> str:
    """The committed ROAD table's ms/image of ``method``, as prose quotes it ("2,478")."""
    import csv

    with open(tables.ROOT / ROAD.replace(".md", ".csv")) as f:
        row = next(r for r in csv.DictReader(f) if r["method"].startswith(method))
    return f"{round(float(row['ms/image'])):,}"


def misquote(number: str) -> str:
    """``number`` with its first two digits swapped (a different number of the same shape)."""
    digits = [i for i, c in enumerate(number) if c.isdigit()]
    if len(digits) < 2 or number[digits[0]] == number[digits[1]]:
        raise ValueError(f"cannot misquote {number!r}")
    chars = list(number)
    chars[digits[0]], chars[digits[1]] = chars[digits[1]], chars[digits[0]]
    return "".join(chars)


def test_a_planted_wrong_number_is_caught():
    ablation = road_ms("Ablation-CAM")
    assert check(f"Grad-CAM scores 0.298 and Ablation-CAM 0.281 (23 images, {ablation} ms).") \
        == []
    problems = check("Grad-CAM scores 0.298 and Ablation-CAM 0.287.")
    assert len(problems) == 1 and "0.287 is in none of 05-road.md" in problems[0]
    # too precise, a wrong thousand, a wrong percentage, a range's wrong end
    for wrong in ["0.2982", f"{misquote(road_ms('Score-CAM'))} ms", "29.9%", "0.298-0.287"]:
        assert check(f"It reads {wrong}."), wrong


def test_a_wrong_number_in_the_real_pages_is_caught():
    import re

    readme = tables.README.read_text()
    quoted = re.search(r"(\d[\d,.]*)x faster than rerunning", readme).group(1)
    wrong = readme.replace(f"{quoted}x faster", f"{misquote(quoted)}x faster")
    assert any(misquote(quoted) in p for p in tables.misquoted(tables.README, wrong,
                                                               "What the study found"))
    findings = tables.FINDINGS.read_text()
    assert "(0.237 and 0.190" in findings
    wrong = findings.replace("(0.237 and 0.190", "(0.237 and 0.195")
    assert any("0.195" in p for p in tables.misquoted(tables.FINDINGS, wrong))


def test_a_number_needs_its_own_sections_or_paragraphs_table():
    """0.298 is in 05-road.md: a section, or a paragraph, that cites only the agreement table
    may not quote it; a paragraph that cites no table cites its section's."""
    road, agreement = (f"[t](../results/polen23e/tables/{name}.md)"
                       for name in ("05-road", "03-agreement"))
    text = (f"# Page\n\n## A\n\n{road} 0.298\n\n* no link, 0.298\n* {agreement} 0.298\n\n"
            f"## B\n\n{agreement} 0.298\n")
    problems = tables.misquoted(tables.FINDINGS, text)
    assert [p.split(": ", 1)[1] for p in problems] == ["0.298 is in none of 03-agreement.md"] * 2
    assert "§ A" in problems[0] and "§ B" in problems[1]


def test_a_ratio_must_be_a_cell_of_its_own():
    """A ratio (22x) is a measurement: a number in a header or label (05-road.md's "MoRF 25%")
    does not back it. The README's stale "about 22x and 30x" beside the ROAD table is caught."""
    assert check(f"ROAD removes 25% of the pixels; occlusion costs {road_ms('Occlusion')} ms.") \
        == []
    assert check("Occlusion costs 25x as much.")
    problems = check("Score-CAM and occlusion cost about 22x and 30x as much.")
    assert [p.rsplit(": ", 1)[1].split()[0] for p in problems] == ["22x", "30x"]


def test_roundings_and_percentages():
    values = {Decimal("0.2981"), Decimal("1293.4"), Decimal("0.882"), Decimal("-0.0003")}
    values = {abs(v) for v in values}
    for good in ["0.298", "0.30", "0.3", "1,293", "1293.4", "88.2%", "0.000"]:
        assert tables.is_rounding(good, values), good
    for bad in ["0.299", "0.2982", "1,294", "88.2", "8.82%", "0.001"]:
        assert not tables.is_rounding(bad, values), bad


def test_what_counts_as_a_quoted_number():
    text = ("**88.2%** top-1 on 161 images at 224 px, 1,293x, 0.98-1.52x, 12-13% of a pass; "
            "DenseNet-169, `conv4_block32_concat`, conv4, w1, 7x7x1664, 224x224, "
            "tf-keras-vis 0.8.7, Rong et al. 2022, [link](../results/x/tables/04-speed.md).")
    assert tables.quoted_numbers(text) == ["88.2%", "161", "1,293x", "0.98x", "1.52x", "12%", "13%"]


def test_the_exemptions_are_few_and_explained():
    assert len(tables.NOT_MEASURED) <= 10
    assert all(why.strip() for _pattern, why in tables.NOT_MEASURED)
    # an exemption covers its phrase, not the number elsewhere
    assert tables.quoted_numbers("at 224 px; 224 ms") == ["224"]
    assert check("Trained on 644 images; 644 ms per image.") == [
        "docs/findings.md § What the study found: 644 is in none of 05-road.md"]


def test_columns_and_rows_select_from_a_table():
    table = tables.read_table(tables.ROOT / ROAD)
    header, align, body = tables.select(table, "method; LeRF - MoRF", "^Grad-CAM")
    assert header == ["method", "LeRF - MoRF"] and align[1].endswith(":")
    assert [row[0] for row in body] == ["Grad-CAM", "Grad-CAM++"]
    with pytest.raises(ValueError, match="no column"):
        tables.select(table, "method; no such column", None)
    markdown = tables.to_markdown(header, align, body)
    assert markdown.splitlines()[2].split("|")[1:3] == [" Grad-CAM   ", "      0.2981 "]


def test_a_cell_with_a_bar_is_read_and_escaped():
    table = tables.read_table(tables.ROOT / "results/polen23e/tables/06-ablated-tensor-pairs.md")
    assert table[0][-1] == "max drop / |score|"
    assert r"max drop / \|score\|" in tables.to_markdown(*table)


def test_the_script_checks_without_writing(capsys):
    before = tables.FINDINGS.read_text()
    assert tables.main(["--check"]) == 0, capsys.readouterr().out
    assert tables.FINDINGS.read_text() == before
