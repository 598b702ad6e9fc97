"""The committed result tables in the findings: docs/findings.md includes them rather than
retyping them, and every number that the prose around them quotes must be in a table it cites.

    python -m cam.study.tables           # rewrite the table blocks, then report misquoted numbers
    python -m cam.study.tables --check   # write nothing: exit 1 if a block is stale or a number wrong

(``make findings`` runs the first.) A table block in docs/findings.md is everything between

    <!-- table: results/polen23e/tables/05-road.md columns="method; images; ms/image" rows="^Grad" -->
    <!-- end table -->

``columns`` (optional) keeps those columns, in that order, by header (``index`` names a first
column without a header); ``rows`` (optional) keeps the rows whose first cell matches the regular
expression. The cells are copied as the table file writes them.

A quoted number is checked in README.md's section "What the study found" and in every section
of docs/findings.md, outside the table blocks, unless :data:`NOT_MEASURED` exempts it. It must
be a rounding of a number in the tables that its paragraph or list item links or includes (one
that cites none cites its section's). A ratio (1.22x) must round a whole cell, not a number in
a label, header or note; a percentage (88.2%) may also round a fraction (0.882) times 100.
Inline code, link targets and sizes (7x7, 224x224) are not prose; the sign is ignored; a range
(5.9-7.8x) is two numbers, each with the unit.
"""

from __future__ import annotations

import argparse
import re
import sys
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FINDINGS = ROOT / "docs" / "findings.md"
README = ROOT / "README.md"
#: The pages whose prose is checked: page -> the one section checked (None: every section).
CHECKED = {README: "What the study found", FINDINGS: None}

# A table block: its indent (a block may sit in a list item), file, options and contents.
BLOCK = re.compile(r"^([ \t]*)<!-- table: (\S+)((?: \w+=\"[^\"]*\")*) -->\n(.*?)"
                   r"^[ \t]*<!-- end table -->", re.DOTALL | re.MULTILINE)
OPTION = re.compile(r'(\w+)="([^"]*)"')

#: Numbers in the prose that are not measurements, as (pattern, why): the text a pattern
#: matches is left out of the check, and nothing else is. Keep it short and say why.
NOT_MEASURED = [
    (r"\bet al\. \d{4}", "a citation's year"),
    (r"(?:TensorFlow|Keras|tf-keras-vis) \d+(?:\.\d+)+", "a software version"),
    (r"\b224 px\b", "the input size (04-speed.md writes it 224x224x3)"),
    (r"\b644 images\b", "the training set: four folds of 161 (01-folds.md counts them per class)"),
    (r"\bfold 0\b", "a fold's name"),
    (r"\b95% (?:bootstrap )?CI\b", "the confidence level, a parameter"),
    (r"\b(?:1120 channels go around|32 channels, inside|1664-channel)\b",
     "the model's structure: channel counts (DenseNet-169's, not measured)"),
    (r"\b2(?: CPU cores|-core CPU)\b", "the machine"),
    (r"\bwindows? [1-4](?:-4)?\b", "a window's size, a parameter"),
]

# A number in prose: not glued to a word (conv4, w1, DenseNet-169), nor part of a version (0.8.7).
NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)\d+(?:,\d{3})*(?:\.\d+)?(?![\w.]*\d)"
                    r"(?:%|x(?!\w)|(?![A-Za-z_]))")
SIZE = re.compile(r"\b\d+(?:x\d+)+\b")  # 7x7, 224x224, 7x7x1664: a shape, not a measurement
# A number in a table file, cells, labels and headers alike, but not glued to a name (block12).
TABLE_NUMBER = re.compile(r"(?<![A-Za-z_\d.])\d+(?:\.\d+)?(?:e-?\d+)?")
RANGE = re.compile(r"(\d)[-–](\d[\d.,]*)([%x])")  # 12-13%, 5.9-7.8x: both ends have the unit
LINKED_TABLE = re.compile(r"\]\(([^)\s]*results/[^)\s]+\.md)\)")


def read_tables(path: Path) -> list[tuple[list[str], list[str], list[list[str]]]]:
    """The pipe tables in ``path``, each as header, alignments (``:--``, ``--:``) and rows."""
    tables, lines = [], []
    for line in path.read_text().split("\n") + [""]:
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            tables.append(cut(path, lines))
            lines = []
    return tables


def read_table(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """The first pipe table in ``path``."""
    return read_tables(path)[0]


def cut(path: Path, table: list[str]) -> tuple[list[str], list[str], list[list[str]]]:
    """A table's lines cut at the columns of its alignment row: a pandas table pads every row
    to the same columns, so a cell may hold a ``|``, as in ``max drop / |score|``."""
    bars = [i for i, c in enumerate(table[1]) if c == "|"]
    cells = []
    for line in table:
        if len(line) != len(table[1]) or any(line[i] != "|" for i in bars):
            raise ValueError(f"{path}: a row that does not line up with the header: {line!r}")
        cells.append([line[a + 1:b].strip() for a, b in zip(bars, bars[1:])])
    return cells[0], cells[1], cells[2:]


def select(table, columns: str | None, rows: str | None):
    """``table`` cut down to ``columns`` ("a; b; c") and the rows whose first cell matches
    ``rows`` (a regular expression)."""
    header, align, body = table
    if rows is not None:
        body = [row for row in body if re.search(rows, row[0])]
    if columns is not None:
        names = [name.strip() for name in columns.split(";")]
        known = ["index" if i == 0 and not h else h for i, h in enumerate(header)]
        missing = [name for name in names if name not in known]
        if missing:
            raise ValueError(f"no column {missing} among {known}")
        keep = [known.index(name) for name in names]
        header, align = [header[i] for i in keep], [align[i] for i in keep]
        body = [[row[i] for i in keep] for row in body]
    return header, align, body


def to_markdown(header, align, body) -> str:
    """A GitHub pipe table, columns padded, alignments kept, ``|`` in a cell escaped."""
    rows = [[cell.replace("|", r"\|") for cell in row] for row in [header, *body]]
    widths = [max(3, *(len(row[i]) for row in rows)) for i in range(len(header))]
    rules = [":" + "-" * (w - 1) if a.startswith(":") else "-" * (w - 1) + ":"
             if a.endswith(":") else "-" * w for a, w in zip(align, widths)]
    lines = [[cell.rjust(w) if a.endswith(":") else cell.ljust(w)
              for cell, w, a in zip(row, widths, align)] for row in rows]
    lines.insert(1, rules)
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def regenerate(text: str) -> str:
    """``text`` (docs/findings.md) with every table block rebuilt from its table file."""
    def block(match):
        options = dict(OPTION.findall(match.group(3)))
        unknown = set(options) - {"columns", "rows"}
        if unknown:
            raise ValueError(f"{match.group(2)}: unknown option(s) {sorted(unknown)}")
        table = select(read_table(ROOT / match.group(2)), options.get("columns"),
                       options.get("rows"))
        indent, path, opts = match.group(1, 2, 3)
        rows = "".join(indent + line for line in to_markdown(*table).splitlines(True))
        return f"{indent}<!-- table: {path}{opts} -->\n{rows}{indent}<!-- end table -->"
    return BLOCK.sub(block, text)


def sections(text: str) -> list[tuple[str, str]]:
    """``text`` as (heading, body) pairs, one per ``#``/``##`` heading (the part before the
    first heading is the section ""); fenced code is dropped."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)
    parts = re.split(r"^#{1,2} +(.+)$", text, flags=re.MULTILINE)
    return [("", parts[0]), *zip(parts[1::2], parts[2::2])]


def paragraphs(body: str) -> list[str]:
    """``body`` cut into paragraphs and list items (an item keeps its indented lines)."""
    units, previous = [""], ""
    for line in body.split("\n"):
        if line.startswith(("* ", "- ")) or (line[:1].strip() and not previous.strip()):
            units.append("")
        units[-1] += line + "\n"
        previous = line
    return [unit for unit in units if unit.strip()]


def cited_tables(body: str, page: Path) -> list[Path]:
    """The table files that ``body`` links (relative to ``page``) or includes as a block."""
    linked = [(page.parent / link).resolve() for link in LINKED_TABLE.findall(body)]
    included = [(ROOT / m.group(2)).resolve() for m in BLOCK.finditer(body)]
    return sorted(set(linked + included))


def quoted_numbers(body: str) -> list[str]:
    """The numbers ``body``'s prose quotes, as written (``1,293x``, ``0.298``, ``88.2%``)."""
    text = re.sub(r"\s+", " ", BLOCK.sub("", body))
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)               # inline code: layer names, commands
    text = re.sub(r"\]\([^)]*\)", "]", text)             # link targets (link text stays)
    for pattern, _why in NOT_MEASURED:
        text = re.sub(pattern, "", text)
    text = SIZE.sub("", text)
    text = RANGE.sub(r"\1\3 - \2\3", text)
    return NUMBER.findall(text)


def table_values(paths: list[Path]) -> tuple[set[Decimal], set[Decimal]]:
    """The numbers in the files: every one written anywhere, in labels, headers and notes too
    (a size such as 7x7x1664 gives 7, 7 and 1664), and those that are a whole cell (pandas'
    row numbers 0, 1, 2, ... aside)."""
    texts = [path.read_text() for path in paths]
    texts += [size.replace("x", " ") for text in texts for size in SIZE.findall(text)]
    anywhere = {abs(Decimal(n)) for text in texts for n in TABLE_NUMBER.findall(text)}
    cells = set()
    for header, _align, body in (t for path in paths for t in read_tables(path)):
        for i, name in enumerate(header):
            column = [row[i] for row in body]
            if name or column != [str(k) for k in range(len(body))]:
                cells |= {abs(Decimal(c)) for c in column if re.fullmatch(TABLE_NUMBER, c)}
    return anywhere, cells


def is_rounding(quoted: str, values: set[Decimal]) -> bool:
    """Whether ``quoted`` is one of ``values`` rounded to the digits it shows (half up or half
    even), or, written with a %, a fraction in ``values`` times 100."""
    number = Decimal(quoted.rstrip("%x").replace(",", ""))
    step = Decimal(1).scaleb(number.as_tuple().exponent)
    scaled = values | {v * 100 for v in values} if quoted.endswith("%") else values
    return any(v.quantize(step, rounding=mode) == number
               for v in scaled for mode in (ROUND_HALF_UP, ROUND_HALF_EVEN))


def misquoted(page: Path, text: str | None = None, only: str | None = None) -> list[str]:
    """One line per number quoted in ``page`` (or ``text`` read as that page) that is not in
    the tables its paragraph, else its section, cites; ``only`` names the one section to check."""
    text = page.read_text() if text is None else text
    problems = []
    for heading, body in sections(text):
        if only is not None and heading.strip() != only:
            continue
        for paragraph in paragraphs(body):
            # a paragraph that cites no table of its own cites its section's
            tables = cited_tables(paragraph, page) or cited_tables(body, page)
            anywhere, cells = table_values(tables)
            names = ", ".join(t.name for t in tables) or "no table"
            for number in quoted_numbers(paragraph):
                # a ratio (1.22x) is a measurement: a whole cell, not a number in a label
                if not is_rounding(number, cells if number.endswith("x") else anywhere):
                    problems.append(f"{page.relative_to(ROOT)} § {heading or '(top)'}: "
                                    f"{number} is in none of {names}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cam.study.tables", description=__doc__
                                     .split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a block is stale or a number misquoted")
    args = parser.parse_args(argv)
    text = FINDINGS.read_text()
    fresh = regenerate(text)
    stale = fresh != text
    if stale and not args.check:
        FINDINGS.write_text(fresh)
        print(f"rewrote the table blocks of {FINDINGS.relative_to(ROOT)}")
    elif stale:
        print(f"{FINDINGS.relative_to(ROOT)}: table blocks are stale (make findings)")
    problems = [p for page, only in CHECKED.items()
                for p in misquoted(page, fresh if page == FINDINGS else None, only)]
    for problem in problems:
        print(problem)
    return 1 if problems or (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
