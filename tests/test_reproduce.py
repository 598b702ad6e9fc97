"""cam.study.reproduce: which notebooks run, with which parameters, and the messages when data is missing."""

from __future__ import annotations

import json

import pandas as pd
import papermill
import pytest

from cam.study import download, paths, reproduce


def test_study_notebooks_in_order_appendix_only_on_synthetic():
    polen = [nb.name for nb in reproduce.notebooks("polen23e")]
    synthetic = [nb.name for nb in reproduce.notebooks("synthetic")]
    assert polen == sorted(polen) and polen[0].startswith("01-")
    assert not any(name.startswith("A") for name in polen)
    assert synthetic[:len(polen)] == polen
    assert synthetic[len(polen):] == sorted(nb.name for nb in paths.NOTEBOOKS_DIR.glob("A*.ipynb"))


def test_only_picks_by_prefix_and_names_what_is_missing():
    assert [nb.name[:2] for nb in reproduce.notebooks("polen23e", ("03", "01"))] == ["01", "03"]
    with pytest.raises(SystemExit, match="no notebook starts with 99; the polen23e notebooks are 01-"):
        reproduce.notebooks("polen23e", ("99",))


@pytest.mark.parametrize("small", [False, True])
def test_parameters_are_only_those_a_notebook_declares(tmp_path, small):
    for notebook in reproduce.notebooks("synthetic"):
        declared = papermill.inspect_notebook(str(notebook))
        params = reproduce.parameters_for(notebook, "synthetic", tmp_path, small)
        assert set(params) <= set(declared), notebook.name
        assert params["dataset"] == "synthetic" and params["output_dir"] == str(tmp_path.resolve())
    if small:
        saliency = reproduce.parameters_for(paths.NOTEBOOKS_DIR / "03-saliency.ipynb",
                                           "synthetic", tmp_path, small)
        assert saliency["image_size"] == reproduce.SMALL["synthetic"]["image_size"]


def test_prepare_only_writes_parameterised_copies(tmp_path):
    reproduce.run("synthetic", tmp_path, small=True, prepare_only=True, only=("01",))
    book = json.loads((tmp_path / "executed" / "01-data.ipynb").read_text())
    injected = [c for c in book["cells"]
                if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and "samples_per_class = 2" in "".join(injected[0]["source"])
    assert not (tmp_path / "tables" / "00-wall-times.csv").exists()  # nothing ran


def test_wall_times_replace_a_notebooks_row(tmp_path):
    reproduce.record_wall_time(tmp_path, "01-data", 12.0, "polen23e")
    reproduce.record_wall_time(tmp_path, "02-train-or-load", 30.0, "polen23e")
    reproduce.record_wall_time(tmp_path, "01-data", 10.0, "polen23e")
    table = pd.read_csv(tmp_path / "00-wall-times.csv")
    assert table["notebook"].tolist() == ["01-data", "02-train-or-load"]
    assert table["seconds"].tolist() == [10.0, 30.0]
    assert "Total: 40 s" in (tmp_path / "00-wall-times.md").read_text()


def test_missing_data_and_failed_download_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.POLEN23E_ENV, raising=False)
    monkeypatch.setattr(paths, "POLEN23E_DEFAULT_DIR", tmp_path / "absent")

    def offline(*args, **kwargs):
        raise RuntimeError("could not reach figshare.com")

    monkeypatch.setattr(download, "download_polen23e", offline)
    with pytest.raises(SystemExit) as stop:
        reproduce.ensure_polen23e()
    message = str(stop.value)
    assert "could not reach figshare.com" in message
    assert f"export {paths.POLEN23E_ENV}=" in message and "make demo" in message


def test_a_wrong_polen23e_dir_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.POLEN23E_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="is not a directory"):
        reproduce.ensure_polen23e()
