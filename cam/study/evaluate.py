"""Scoring a classifier on its held-out fold: predictions, per-class table, confusion matrix,
training curves (used by notebooks/02-train-or-load), and the recorded sample of held-out
predictions that the checkpoint test replays (``python -m cam.study.evaluate``)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from sklearn.metrics import classification_report, confusion_matrix  # noqa: E402

from . import data, paths  # noqa: E402
from .models import CHECKPOINT_STEM, checkpoint_paths, load_checkpoint  # noqa: E402

#: How many held-out images the checkpoint's JSON records predictions for (the test replays them).
RECORDED_SAMPLE = 23


def held_out(folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    rows = folds[folds["fold"] == fold].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"fold {fold} is empty; folds are {sorted(folds['fold'].unique())}")
    return rows


def recorded_sample(rows: pd.DataFrame, n: int = RECORDED_SAMPLE) -> pd.DataFrame:
    """One held-out image per class (the first by name), a fixed sample for the checkpoint test."""
    return rows.groupby("label", sort=True).head(1).head(n).reset_index(drop=True)


def per_class_table(labels: np.ndarray, predictions: np.ndarray, classes) -> pd.DataFrame:
    report = classification_report(labels, predictions, labels=range(len(classes)),
                                   target_names=list(classes), output_dict=True, zero_division=0)
    table = pd.DataFrame(report).T.rename(columns={"recall": "accuracy (recall)"})
    table["support"] = table["support"].astype(int)
    return table.round(3)


def confusion_figure(labels, predictions, classes, title: str):
    matrix = confusion_matrix(labels, predictions, labels=range(len(classes)))
    fig, ax = plt.subplots(figsize=(10, 8.5))
    sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", cbar=False, square=True,
                xticklabels=classes, yticklabels=classes, ax=ax, annot_kws={"size": 7})
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def curves_figure(history: pd.DataFrame):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(history["epoch"], history["loss"], label="training loss")
    left.set(xlabel="epoch", ylabel="loss (label-smoothed cross-entropy)")
    right.plot(history["epoch"], history["accuracy"], label="training (augmented)")
    if "held_out_accuracy" in history:
        points = history.dropna(subset=["held_out_accuracy"])
        right.plot(points["epoch"], points["held_out_accuracy"], "o-", label="held-out fold")
    right.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    return fig


def predict(model, root: Path, files, size: int, batch_size: int = 16) -> np.ndarray:
    """Class probabilities for ``files`` (relative to ``root``) decoded at ``size`` px."""
    images = data.load_images(root, files, size)
    return model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)


def record_sample(stem: str = CHECKPOINT_STEM, directory: Path = paths.MODELS_DIR,
                  root: Path | None = None, folds: pd.DataFrame | None = None) -> dict:
    """Store the checkpoint's predictions on :func:`recorded_sample` in its JSON.

    tests/test_models.py replays them: the committed weights must predict the same classes
    for the same held-out files, decoded the same way.
    """
    meta = json.loads(checkpoint_paths(stem, directory)[1].read_text())
    size = meta["config"]["eval_size"]
    model, record = load_checkpoint(stem, directory, image_size=size)
    folds = data.read_fold_table() if folds is None else folds
    rows = recorded_sample(held_out(folds, record["held_out_fold"]))
    images = data.load_images(root or data.polen23e_root(), rows["file"], size, progress=False)
    predictions = model.predict(images.astype(np.float32), verbose=0).argmax(1)
    record["recorded_sample"] = {
        "files": rows["file"].tolist(),
        "labels": rows["label"].astype(int).tolist(),
        "predictions": predictions.astype(int).tolist(),
        "accuracy": float((predictions == rows["label"].to_numpy()).mean()),
    }
    meta = checkpoint_paths(stem, directory)[1]
    meta.write_text(json.dumps(record, indent=2) + "\n")
    return record["recorded_sample"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m cam.study.evaluate",
        description="Record a checkpoint's predictions on a fixed held-out sample in its JSON.")
    parser.add_argument("--stem", default=CHECKPOINT_STEM)
    args = parser.parse_args(argv)
    sample = record_sample(args.stem)
    print(f"recorded {len(sample['files'])} held-out predictions, accuracy {sample['accuracy']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
