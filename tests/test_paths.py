"""cam.study.paths.Results: where notebooks write, and how a table is saved."""

import pandas as pd

from cam.study import paths


def test_results_default_and_explicit_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path / "results")
    default = paths.Results("synthetic")
    assert default.figures == tmp_path / "results" / "synthetic" / "figures"
    assert default.figures.is_dir() and default.tables.is_dir()
    explicit = paths.Results("synthetic", tmp_path / "ci")
    assert explicit.tables == tmp_path / "ci" / "tables" and explicit.tables.is_dir()


def test_save_table_writes_csv_and_markdown(tmp_path):
    out = paths.Results("x", tmp_path)
    out.save_table(pd.DataFrame({"images": [35, 34]}, index=["a", "b"]), "01-counts")
    assert pd.read_csv(out.tables / "01-counts.csv", index_col=0)["images"].tolist() == [35, 34]
    markdown = (out.tables / "01-counts.md").read_text()
    assert markdown.splitlines()[0].startswith("|") and "| a " in markdown
