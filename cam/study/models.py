"""DenseNet-169 for POLEN23E: the architecture, and checkpoints that are verified on load."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import keras

from .. import sanity
from . import paths

#: Keras' default BatchNormalization momentum (0.99) averages over ~100 steps. POLEN23E gives
#: ~20 steps an epoch, so the inference statistics would trail the weights by ~5 epochs and
#: validation accuracy would sit near chance while training accuracy climbs.
BN_MOMENTUM = 0.9

CHECKPOINT_STEM = "densenet169-polen23e-fold0"


def build_densenet169(num_classes: int, image_size: int | None = 224, dropout: float = 0.2,
                      bn_momentum: float = BN_MOMENTUM) -> keras.Model:
    """DenseNet-169 (``keras.applications``, no pretrained weights) with a classifier head.

    The model takes RGB images with values in [0, 255] (float) and rescales them itself, so
    the images a user passes to an explainer are the pixels shown in the overlays. The layer
    names are those of ``keras.applications.DenseNet169``: the last feature map is ``relu``
    (7x7x1664 at 224 px), the final dense block's output is ``conv5_block32_concat``.
    ``image_size=None`` builds a model that accepts any square or non-square size. Weights are
    initialised from Keras' global seed (``keras.utils.set_random_seed``); this function does
    not reset it.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    shape = (image_size, image_size, 3) if image_size else (None, None, 3)
    inputs = keras.Input(shape, name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    backbone = keras.applications.DenseNet169(include_top=False, weights=None, input_tensor=x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="densenet169_polen23e")
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = bn_momentum
    return model


def build_small_cnn(num_classes: int, image_size: int | None = 128, width: int = 32) -> keras.Model:
    """A small CNN for the synthetic stand-in: trains in a minute on a CPU.

    Same conventions as :func:`build_densenet169`: raw [0, 255] pixels in, a last feature map
    named ``relu``, ``avg_pool`` and a softmax ``predictions`` layer.
    """
    shape = (image_size, image_size, 3) if image_size else (None, None, 3)
    inputs = keras.Input(shape, name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    for block, filters in enumerate((width, 2 * width, 4 * width), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{block}")(x)
    x = keras.layers.Conv2D(4 * width, 3, padding="same", use_bias=False, name="conv4")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


#: Builders by name, as recorded in a checkpoint's ``config["architecture"]``.
ARCHITECTURES = {"densenet169": build_densenet169, "small_cnn": build_small_cnn}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def study_checkpoint(dataset: str, fold: int = 0, architecture: str | None = None
                     ) -> tuple[str, Path]:
    """(stem, directory) of the checkpoint the notebooks share for ``dataset``: the committed
    DenseNet-169 in ``models/`` for POLEN23E, else the small CNN that notebook 02 trains into
    ``data/models/`` (``architecture`` overrides the default of each)."""
    architecture = architecture or ("densenet169" if dataset == "polen23e" else "small_cnn")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, "
                         f"got {architecture!r}")
    directory = paths.MODELS_DIR if dataset == "polen23e" else paths.DATA_DIR / "models"
    return f"{architecture.replace('_', '-')}-{dataset}-fold{fold}", directory


def checkpoint_paths(stem: str = CHECKPOINT_STEM, directory: str | Path = paths.MODELS_DIR):
    """(weights file, metadata JSON) of a checkpoint. The weights are stored gzip-compressed
    (``<stem>.weights.h5.gz``); the JSON records the SHA-256 of the ``.weights.h5`` inside."""
    directory = Path(directory)
    return directory / f"{stem}.weights.h5.gz", directory / f"{stem}.json"


def compress_file(source: str | Path, target: str | Path) -> None:
    """``source`` gzip-compressed (level 9) into ``target``, with no name or time in the gzip
    header: the same weights always give the same bytes, so Git sees no change."""
    with open(source, "rb") as src, open(target, "wb") as raw, \
            gzip.GzipFile("", "wb", compresslevel=9, fileobj=raw, mtime=0) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def unpacked_weights(stem: str = CHECKPOINT_STEM, directory: str | Path = paths.MODELS_DIR,
                     cache_dir: str | Path = paths.CACHE_DIR) -> Path:
    """The checkpoint's ``.weights.h5``, decompressed once into ``cache_dir`` (git-ignored).

    The cached copy is used while its SHA-256 is the one the JSON records; otherwise the
    ``.gz`` is decompressed again and its bytes are checked against that SHA-256 before they
    replace the copy (a ``ValueError`` names both digests when they differ).
    """
    packed, meta = checkpoint_paths(stem, directory)
    if not packed.is_file() or not meta.is_file():
        raise FileNotFoundError(
            f"checkpoint {packed.name} (with {meta.name}) not found in {packed.parent}; "
            f"train one with `make train` (python -m cam.study.train)"
        )
    expected = json.loads(meta.read_text())["sha256"]
    cached = Path(cache_dir) / f"{stem}.weights.h5"
    if cached.is_file() and sha256_file(cached) == expected:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    try:
        with gzip.open(packed, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        actual = sha256_file(partial)
        if actual != expected:
            raise ValueError(f"{packed} decompresses to SHA-256 {actual}, but {meta.name} "
                             f"records {expected}: the file is corrupt or was replaced")
        os.replace(partial, cached)  # whole or not at all, also when two processes race
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # not gzip, truncated, bad CRC
        raise ValueError(f"{packed} cannot be decompressed ({error}): the file is corrupt or "
                         f"was replaced (a Git LFS pointer?)") from None
    finally:
        partial.unlink(missing_ok=True)
    return cached


def strip_optimizer(source: str | Path, target: str | Path) -> None:
    """Copy a Keras ``.weights.h5`` file without its ``optimizer`` group.

    Keras writes a trained model's optimizer moments next to its weights (for DenseNet-169
    with AdamW that triples the file, 150 MB instead of 50 MB); inference needs the weights
    alone, and ``load_weights`` reads such a file unchanged.
    """
    import h5py

    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            if name != "optimizer":
                src.copy(src[name], dst, name=name)


def save_checkpoint(model: keras.Model, metadata: dict, stem: str = CHECKPOINT_STEM,
                    directory: str | Path = paths.MODELS_DIR) -> Path:
    """Write the weights (without the optimizer, gzip-compressed) and a JSON with the SHA-256
    of the uncompressed ``.weights.h5``, the architecture and ``metadata``."""
    packed, meta = checkpoint_paths(stem, directory)
    packed.parent.mkdir(parents=True, exist_ok=True)
    full = packed.with_name(f"{stem}.partial.weights.h5")
    weights = packed.with_name(f"{stem}.weights.h5")
    model.save_weights(full)
    strip_optimizer(full, weights)
    full.unlink()
    compress_file(weights, packed)
    record = {
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "architecture": architecture_signature(model),
        **metadata,
    }
    weights.unlink()
    meta.write_text(json.dumps(record, indent=2) + "\n")
    return packed


def architecture_signature(model: keras.Model) -> dict:
    """What must match for weights to mean the same thing: layer count, parameters, output."""
    return {
        "name": model.name,
        "layers": len(model.layers),
        "parameters": int(model.count_params()),
        "output_shape": list(model.output_shape[1:]),
    }


def load_checkpoint(stem: str = CHECKPOINT_STEM, directory: str | Path = paths.MODELS_DIR,
                    image_size: int | None = 224, cache_dir: str | Path = paths.CACHE_DIR
                    ) -> tuple[keras.Model, dict]:
    """Rebuild the architecture, check the weights' SHA-256 (:func:`unpacked_weights`) and
    signature, and load them."""
    weights = unpacked_weights(stem, directory, cache_dir)
    record = json.loads(checkpoint_paths(stem, directory)[1].read_text())
    architecture = record.get("config", {}).get("architecture", "densenet169")
    model = ARCHITECTURES[architecture](len(record["classes"]), image_size=image_size)
    expected = dict(record["architecture"])
    found = architecture_signature(model)
    if {k: v for k, v in found.items() if k != "output_shape"} != \
            {k: v for k, v in expected.items() if k != "output_shape"}:
        raise ValueError(f"architecture mismatch: checkpoint has {expected}, built {found}")
    model.load_weights(weights)
    return model, record


# DenseNet layer names (keras.applications): "conv4_block12_1_conv", "pool3_conv", "conv1_conv".
_DENSE_BLOCK = re.compile(r"^(conv\d+)_block(\d+)_")
_STEM_OR_TRANSITION = re.compile(r"^(conv1|pool\d+)_")


def randomisation_stages(model, block_group: int = 16) -> list[tuple[str, list[str]]]:
    """The stages of the model-randomisation check (:func:`cam.sanity.randomisation_check`)
    for a DenseNet: the classifier, then each dense block in chunks of ``block_group`` blocks,
    top chunk first (``conv5 blocks 17-32``, ...); a transition (``poolN_*``) and the final
    ``bn`` join the chunk just before them, and the stem is ``conv1``. Any other model gets
    :func:`cam.sanity.randomisation_stages`' default (one stage per weighted layer)."""
    if block_group < 1:
        raise ValueError(f"block_group must be >= 1, got {block_group}")

    def group(layer, previous):
        dense, other = _DENSE_BLOCK.match(layer.name), _STEM_OR_TRANSITION.match(layer.name)
        if dense:
            return f"{dense[1]} blocks {(int(dense[2]) - 1) // block_group}"
        if other and other[1] == "conv1":
            return "conv1"
        if (other or isinstance(layer, keras.layers.BatchNormalization)) and previous is not None:
            return previous  # a transition or a BN belongs with what comes before it
        return layer.name

    stages = sanity.randomisation_stages(model, group)
    return [(_stage_label(key, names), names) for key, names in stages]


def _stage_label(key: str, names: list[str]) -> str:
    blocks = sorted({int(m[2]) for n in names if (m := _DENSE_BLOCK.match(n))})
    if blocks:
        return f"{key.split()[0]} blocks {blocks[0]}-{blocks[-1]}"
    return key
