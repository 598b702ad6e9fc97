"""cam.study.paths.Results: where notebooks write, and how a table is saved."""

import pandas as pd
import pytest

from cam.study import paths

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"


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


def test_relative_folders_are_relative_to_the_repository_not_the_working_directory(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("results/polen23e") == paths.ROOT / "results" / "polen23e"
    assert paths.resolve(tmp_path) == tmp_path
    assert paths.Results("polen23e", "results/polen23e").root == paths.RESULTS_DIR / "polen23e"
    assert not (tmp_path / "results").exists()


def test_paths_inside_the_repository_are_written_relative_to_it(tmp_path, monkeypatch):
    assert paths.relative(paths.RESULTS_DIR / "polen23e") == "results/polen23e"
    assert paths.relative("results/polen23e") == "results/polen23e"
    assert paths.relative(tmp_path) == str(tmp_path.resolve())  # outside: absolute
    monkeypatch.setenv(paths.POLEN23E_ENV, str(tmp_path / "polen"))
    assert paths.shown(tmp_path / "polen") == "$POLEN23E_DIR"
    assert paths.shown(tmp_path / "polen" / "acrocomia") == "$POLEN23E_DIR/acrocomia"
    assert paths.shown(paths.MODELS_DIR) == "models"
    assert paths.shown(tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
