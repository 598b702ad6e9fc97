"""Score a checkpoint on its held-out fold: accuracy, per-class table, confusion matrix.

``python -m cam.evaluate`` writes, under ``results/polen23e/``:

* ``tables/02-held-out-per-class.csv`` and ``.md``: precision, recall (= per-class accuracy),
  F1 and support per class, from scikit-learn;
* ``figures/02-confusion-matrix.png``;
* ``figures/02-training-curves.png`` when the checkpoint has a training history.
"""

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


def evaluate(stem: str = CHECKPOINT_STEM, out_dir: Path = paths.RESULTS_DIR / "polen23e",
             batch_size: int = 16) -> dict:
    model, record = load_checkpoint(stem)
    classes = tuple(record["classes"])
    size = record["config"]["eval_size"]
    rows = held_out(data.read_fold_table(), record["held_out_fold"])
    images = data.load_images(data.polen23e_root(), rows["file"], size)
    probs = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    predictions = probs.argmax(1)
    labels = rows["label"].to_numpy()
    accuracy = float((predictions == labels).mean())
    tables, figures = Path(out_dir) / "tables", Path(out_dir) / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    table = per_class_table(labels, predictions, classes)
    table.to_csv(tables / "02-held-out-per-class.csv")
    (tables / "02-held-out-per-class.md").write_text(table.to_markdown() + "\n")
    fig = confusion_figure(labels, predictions, classes,
                           f"held-out fold {record['held_out_fold']}: {accuracy:.1%} top-1 "
                           f"({len(labels)} images, {size}x{size})")
    fig.savefig(figures / "02-confusion-matrix.png", dpi=120)
    plt.close(fig)
    history_csv = checkpoint_paths(stem)[0].with_name(f"{stem}-history.csv")
    if history_csv.is_file():
        fig = curves_figure(pd.read_csv(history_csv))
        fig.savefig(figures / "02-training-curves.png", dpi=120)
        plt.close(fig)
    return {"accuracy": accuracy, "images": int(len(labels)), "size": size}


def record_sample(stem: str = CHECKPOINT_STEM) -> dict:
    """Store the checkpoint's predictions on :func:`recorded_sample` in its JSON."""
    model, record = load_checkpoint(stem)
    rows = recorded_sample(held_out(data.read_fold_table(), record["held_out_fold"]))
    size = record["config"]["eval_size"]
    images = data.load_images(data.polen23e_root(), rows["file"], size)
    predictions = model.predict(images.astype(np.float32), verbose=0).argmax(1)
    record["recorded_sample"] = {
        "files": rows["file"].tolist(),
        "labels": rows["label"].astype(int).tolist(),
        "predictions": predictions.astype(int).tolist(),
        "accuracy": float((predictions == rows["label"].to_numpy()).mean()),
    }
    meta = checkpoint_paths(stem)[1]
    meta.write_text(json.dumps(record, indent=2) + "\n")
    return record["recorded_sample"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cam.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stem", default=CHECKPOINT_STEM)
    parser.add_argument("--record-sample", action="store_true",
                        help="store predictions on a fixed held-out sample in the checkpoint JSON")
    args = parser.parse_args(argv)
    if args.record_sample:
        print(record_sample(args.stem))
    summary = evaluate(args.stem)
    print(f"held-out top-1 accuracy {summary['accuracy']:.1%} on {summary['images']} images "
          f"at {summary['size']}x{summary['size']}; tables and figures in results/polen23e")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
