"""Train DenseNet-169 from scratch on POLEN23E (or the synthetic stand-in) on a small CPU.

The recipe, chosen for 644 training images and a 2-core CPU:

* images decoded once (by content, see :mod:`cam.study.data`) and cached as uint8 arrays;
* augmentation for microscope slides, where orientation means nothing: flips, 90-degree
  rotations, a small zoom, brightness and contrast;
* AdamW with a linear warm-up and cosine decay, label smoothing;
* BatchNormalization momentum 0.9 (see :data:`cam.study.models.BN_MOMENTUM`);
* training at a lower resolution than the 224 px the saliency study uses, then the
  BatchNorm statistics re-estimated at 224 px on the training images ("FixRes"-style: the
  objects look larger at 224 px, and the statistics of every layer shift with them).

The held-out fold is never used to choose anything: it is scored every few epochs only to
draw the learning curve, and the model kept is the last one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

from . import data, paths
from .models import ARCHITECTURES, CHECKPOINT_STEM


@dataclass
class TrainConfig:
    architecture: str = "densenet169"  # a key of cam.study.models.ARCHITECTURES
    held_out_fold: int = 0
    train_size: int = 160
    eval_size: int = 224
    epochs: int = 24
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    zoom: float = 0.1
    eval_every: int = 4
    recalibrate_bn: bool = True
    finetune_epochs: int = 2
    finetune_lr: float = 2e-4
    seed: int = 0


def cached_images(root: Path, files, size: int,
                  cache_dir: Path = paths.CACHE_DIR) -> np.ndarray:
    """Decode ``files`` once at ``size`` px and keep them in ``data/cache`` (git-ignored)."""
    files = list(files)
    digest = hashlib.sha256(("\n".join(files) + f"|{size}|{Path(root).resolve()}").encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"images-{size}-{digest}.npy"
    if path.is_file():
        array = np.load(path)
        if array.shape == (len(files), size, size, 3):
            return array
    array = data.load_images(root, files, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, array)
    os.replace(partial, path)  # an interrupted write never leaves a truncated cache behind
    return array


def augmenter(zoom: float, seed: int) -> keras.Sequential:
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
        keras.layers.RandomZoom((-zoom, zoom), fill_mode="reflect", seed=seed + 1),
        keras.layers.RandomBrightness(0.15, value_range=(0, 255), seed=seed + 2),
        keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=seed + 3),
    ], name="augment")


def training_dataset(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig) -> tf.data.Dataset:
    aug = augmenter(cfg.zoom, cfg.seed)
    rng = tf.random.Generator.from_seed(cfg.seed)

    def rotate(x, y):
        k = rng.uniform((), 0, 4, dtype=tf.int32)
        return tf.image.rot90(x, k), y

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.shuffle(len(images), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).map(rotate)
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=1)
    return ds.prefetch(2)


class HeldOutCurve(keras.callbacks.Callback):
    """Scores the held-out fold every few epochs, for the learning curve only."""

    def __init__(self, images, labels, every: int, batch_size: int):
        super().__init__()
        self.images, self.labels, self.every, self.batch_size = images, labels, every, batch_size
        self.points: dict[int, float] = {}  # epoch (1-based) -> held-out accuracy

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            probs = self.model.predict(self.images.astype(np.float32), batch_size=self.batch_size, verbose=0)
            self.points[epoch + 1] = float((probs.argmax(1) == self.labels).mean())
            print(f"epoch {epoch + 1}: held-out accuracy {self.points[epoch + 1]:.3f} "
                  f"at {self.images.shape[1]}px (learning curve only)", flush=True)


def recalibrate_batchnorm(model: keras.Model, images: np.ndarray, batch_size: int = 32,
                          passes: int = 2) -> None:
    """Re-estimate BatchNorm moving statistics on ``images`` (no weight changes).

    Runs the images through the model in training mode with every trainable weight frozen by
    running no optimizer step; only BatchNorm's moving mean and variance move.
    """
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    saved = [l.momentum for l in bns]
    try:
        for step, start in enumerate(tqdm(
                [s for _ in range(passes) for s in range(0, len(images), batch_size)],
                desc=f"re-estimating BatchNorm statistics at {images.shape[1]}px", leave=False)):
            # A cumulative average over the first pass, then exponential over the second.
            momentum = step / (step + 1) if step < len(images) // batch_size else 0.9
            for layer in bns:
                layer.momentum = momentum
            model(images[start:start + batch_size].astype(np.float32), training=True)
    finally:
        for layer, m in zip(bns, saved):
            layer.momentum = m


def finetune_at_eval_size(model: keras.Model, images: np.ndarray, one_hot: np.ndarray,
                          cfg: TrainConfig) -> pd.DataFrame:
    """A few epochs at the evaluation size with a small, decaying learning rate ("FixRes"):
    grains look 1.4x larger at 224 px than at 160 px, and BatchNorm statistics alone do not
    carry the filters across that change of scale."""
    steps = len(images) // cfg.batch_size
    model.compile(
        optimizer=keras.optimizers.AdamW(
            keras.optimizers.schedules.CosineDecay(cfg.finetune_lr, steps * cfg.finetune_epochs),
            weight_decay=cfg.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    history = model.fit(training_dataset(images, one_hot, cfg), epochs=cfg.finetune_epochs,
                        verbose=2)
    return pd.DataFrame(history.history)


def compiled_model(cfg: TrainConfig, classes: int, steps: int) -> keras.Model:
    """``cfg.architecture`` for ``classes`` classes, compiled with AdamW on a warm-up then
    cosine schedule of ``steps`` steps an epoch, and label-smoothed cross-entropy."""
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {cfg.architecture!r}")
    model = ARCHITECTURES[cfg.architecture](classes, image_size=None)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=steps * (cfg.epochs - cfg.warmup_epochs),
        warmup_target=cfg.learning_rate, warmup_steps=steps * cfg.warmup_epochs)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    return model


def train(root: Path, folds: pd.DataFrame, classes: tuple[str, ...], cfg: TrainConfig,
          out_stem: str | None = None, out_dir: Path = paths.MODELS_DIR):
    """Train on every fold but ``cfg.held_out_fold``; return (model, history, summary).

    With ``out_stem`` the final weights are saved as a checkpoint, compressed
    (:func:`cam.study.models.save_checkpoint`).
    """
    from .models import save_checkpoint

    started = time.time()
    keras.utils.set_random_seed(cfg.seed)
    train_rows = folds[folds["fold"] != cfg.held_out_fold]
    test_rows = folds[folds["fold"] == cfg.held_out_fold]
    x_train = cached_images(root, train_rows["file"], cfg.train_size)
    y_train = train_rows["label"].to_numpy()
    x_test_small = cached_images(root, test_rows["file"], cfg.train_size)
    x_test = cached_images(root, test_rows["file"], cfg.eval_size)
    y_test = test_rows["label"].to_numpy()

    model = compiled_model(cfg, len(classes), len(x_train) // cfg.batch_size)
    one_hot = keras.utils.to_categorical(y_train, len(classes))
    ds = training_dataset(x_train, one_hot, cfg)
    held_out_curve = HeldOutCurve(x_test_small, y_test, cfg.eval_every, cfg.batch_size)
    history = model.fit(
        ds, epochs=cfg.epochs, verbose=2,
        callbacks=[
            held_out_curve,
            # the latest weights, so an interrupted run leaves something to inspect
            keras.callbacks.ModelCheckpoint(paths.CACHE_DIR / "last.weights.h5",
                                            save_weights_only=True),
        ],
    )
    curve = pd.DataFrame(history.history)
    curve.insert(0, "epoch", np.arange(1, len(curve) + 1))
    curve["held_out_accuracy"] = curve["epoch"].map(held_out_curve.points)
    train_seconds = time.time() - started

    def accuracy(images):
        probs = model.predict(images.astype(np.float32), batch_size=cfg.batch_size, verbose=0)
        return float((probs.argmax(1) == y_test).mean()), probs

    acc_train_size, _ = accuracy(x_test_small)
    acc_before, _ = accuracy(x_test)
    if cfg.recalibrate_bn:
        recalibrate_batchnorm(model, cached_images(root, train_rows["file"], cfg.eval_size),
                              cfg.batch_size)
    acc_recalibrated, _ = accuracy(x_test)
    if cfg.finetune_epochs:
        x_train_eval = cached_images(root, train_rows["file"], cfg.eval_size)
        tuned = finetune_at_eval_size(model, x_train_eval, one_hot, cfg)
        tuned.insert(0, "epoch", np.arange(len(curve) + 1, len(curve) + len(tuned) + 1))
        tuned["stage"] = f"fine-tune at {cfg.eval_size}px"
        curve["stage"] = f"train at {cfg.train_size}px"
        curve = pd.concat([curve, tuned], ignore_index=True)
    acc_eval, probs = accuracy(x_test)
    summary = {
        "held_out_fold": cfg.held_out_fold,
        "held_out_images": int(len(y_test)),
        "train_images": int(len(y_train)),
        f"held_out_accuracy_at_{cfg.train_size}px": acc_train_size,
        f"held_out_accuracy_at_{cfg.eval_size}px_before_bn_recalibration": acc_before,
        f"held_out_accuracy_at_{cfg.eval_size}px_after_bn_recalibration": acc_recalibrated,
        f"held_out_accuracy_at_{cfg.eval_size}px": acc_eval,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "config": asdict(cfg),
        "classes": list(classes),
    }
    if out_stem:
        from .evaluate import record_sample

        save_checkpoint(model, summary, out_stem, out_dir)
        curve.to_csv(Path(out_dir) / f"{out_stem}-history.csv", index=False)
        record_sample(out_stem, out_dir, root, folds)
    return model, curve, summary, probs


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cam.study.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--stem", default=CHECKPOINT_STEM)
    args = vars(parser.parse_args(argv))
    stem = args.pop("stem")
    cfg = TrainConfig(**args)
    root = data.polen23e_root()
    folds = data.read_fold_table()
    _, _, summary, _ = train(root, folds, data.POLEN23E_CLASSES, cfg, out_stem=stem)
    print(json.dumps({k: v for k, v in summary.items() if k != "classes"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
