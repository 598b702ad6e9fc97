"""cam.study.sweep.verdicts on a hand-made table."""

import numpy as np
import pandas as pd
import pytest

from cam.study import sweep

pytestmark = pytest.mark.study  # the study's tests: `make test-backends` runs -m "not study"


def test_verdicts_by_hand():
    rows = [("a", "Grad-CAM", "", np.nan, 0.0, 0.20, 4),
            ("a", "FastAblationCAM", 1, 0.95, 0.0, 0.22, 4),   # agrees, AUC within 0.05
            ("a", "FastAblationCAM", 2, 0.95, 0.0, 0.30, 4),   # agrees but AUC 0.10 worse
            ("a", "FastAblationCAM", 3, 0.95, 0.25, 0.20, 4),  # a quarter of the maps empty
            ("a", "FastAblationCAM", 4, 0.10, 0.0, 0.20, 4)]   # disagrees
    table = pd.DataFrame(rows, columns=["layer", "method", "window", "Spearman vs Grad-CAM",
                                        "all-zero maps", "deletion AUC", "images"])
    table = table.set_index(["layer", "method", "window"])
    out = sweep.verdicts(table)
    assert out["verdict"].tolist() == ["works", "partly", "partly", "fails"]
    assert "all-zero 25%" in out.loc[("a", 3), "numbers"]


def test_sweep_rows_on_a_tiny_gap_head_model(gap_head_model):
    """On a GAP + linear head FastAblationCAM (window 1) equals Grad-CAM, so the sweep must
    report a Spearman of 1 for that row; every setting gets its row and image count."""
    from conftest import random_images

    images = random_images(gap_head_model.input_shape[1:], n=3, seed=1)
    targets = gap_head_model.predict(images, verbose=0).argmax(1)
    layer = [layer.name for layer in gap_head_model.layers
             if len(layer.output.shape) == 4][-1]
    table, raws = sweep.layer_window_sweep(gap_head_model, images, targets, [layer],
                                           windows=(1, 2), few=1, max_evaluations=10,
                                           deletion_steps=2, resamples=50, progress=False)
    methods = [m for _, m, _ in table.index]
    assert methods == ["Grad-CAM", "Ablation-CAM", "FastAblationCAM", "FastAblationCAM"]
    fast1 = table.loc[(layer, "FastAblationCAM", 1)]
    assert np.isclose(fast1["Spearman vs Grad-CAM"], 1.0, atol=1e-6)
    h, w = raws[(layer, "Grad-CAM", "")].shape[1:]
    assert fast1["images"] == (3 if h * w <= 10 else 1)  # over max_evaluations: `few` images
    assert ((table["all-zero maps"] >= 0) & (table["all-zero maps"] <= 1)).all()
    assert (table["s/image"] > 0).all()
