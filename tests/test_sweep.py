"""cam.sweep.verdicts on a hand-made table."""

import numpy as np
import pandas as pd

from cam import sweep


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
