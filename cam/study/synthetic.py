"""Synthetic pollen-like microscope images with exact ground-truth masks.

A small, fully controlled stand-in for POLEN23E (23 folders of light-microscope
photos of pollen grains, one grain per image on a light background). Every
image shows one yellowish/brownish grain whose class is decided by features a
CNN can learn -- the number and kind of apertures (furrows, pores), the surface
texture (spines, a reticulate net) and the outline (round, triangular,
elliptical) -- and comes with two exact boolean masks:

* ``grain_mask``: every pixel painted as part of the grain (body, rim, spines);
* ``feature_mask``: every pixel painted as a class-specific feature (furrows,
  pores, spines, net lines); always a subset of ``grain_mask``.

The masks are the pixels as drawn, before the focus blur and the noise, so they
are the ground truth a saliency map should point at.

Everything is deterministic: sample ``i`` of class ``label`` under ``seed``
is drawn from ``np.random.default_rng(np.random.SeedSequence(seed,
spawn_key=(label, i)))``, so it does not depend on how many samples are made.

Examples
--------
>>> images, labels, grain, feature = make_dataset(n_per_class=4, size=128, seed=0)
>>> images.shape, images.dtype, labels.shape
((24, 128, 128, 3), dtype('uint8'), (24,))
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .grains import draw_grain, paint

__all__ = [
    "SYNTHETIC_CLASSES",
    "MIN_SIZE",
    "SyntheticSample",
    "make_sample",
    "make_dataset",
    "write_dataset",
]

#: The synthetic classes, in label order. Named after palynological types:
#:
#: * ``tricolpate``  -- round grain, three dark elongated furrows (colpi) 120 degrees apart;
#: * ``periporate``  -- round grain, 6-9 small ring-shaped pores scattered over the surface;
#: * ``echinate``    -- small round grain with spines on the outline and spine dots on the face;
#: * ``reticulate``  -- large round grain covered by a dark polygonal net;
#: * ``triangular``  -- rounded-triangular grain with one pore at each corner;
#: * ``monosulcate`` -- elliptical grain with one long furrow along the long axis.
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "tricolpate",
    "periporate",
    "echinate",
    "reticulate",
    "triangular",
    "monosulcate",
)

#: Smallest image side accepted by :func:`make_sample` and friends.
MIN_SIZE = 32

# Grain body "radius" as a fraction of half the image side, per class (size range).


@dataclass(frozen=True)
class SyntheticSample:
    """One synthetic pollen image with its ground truth.

    Attributes
    ----------
    image : np.ndarray
        ``(H, W, 3)`` uint8 RGB image.
    label : int
        Class index into :data:`SYNTHETIC_CLASSES`.
    class_name : str
        ``SYNTHETIC_CLASSES[label]``.
    grain_mask : np.ndarray
        ``(H, W)`` bool, the exact pixels painted as the grain (body, rim, spines).
    feature_mask : np.ndarray
        ``(H, W)`` bool, the exact pixels painted as class-specific features
        (furrows, pores, spines, net lines); a subset of ``grain_mask``.
    """

    image: np.ndarray
    label: int
    class_name: str
    grain_mask: np.ndarray
    feature_mask: np.ndarray


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value, minimum: int, valid: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer {valid}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be {valid}, got {value}")
    return value


def _check_label(label) -> int:
    n = len(SYNTHETIC_CLASSES)
    valid = f"in 0..{n - 1} (one of {', '.join(f'{i}={c}' for i, c in enumerate(SYNTHETIC_CLASSES))})"
    if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= int(label) < n:
        raise ValueError(f"label must be an integer {valid}, got {label!r}")
    return int(label)


def _check_size(size) -> int:
    return _check_int("size", size, MIN_SIZE, f">= {MIN_SIZE} (image side in pixels)")


def _check_n_per_class(n_per_class) -> int:
    return _check_int("n_per_class", n_per_class, 1, ">= 1")


def _check_seed(seed) -> int:
    return _check_int("seed", seed, 0, ">= 0")


# --------------------------------------------------------------------------- drawing helpers

def make_sample(label: int, rng: np.random.Generator, size: int = 128) -> SyntheticSample:
    """Draw one synthetic pollen image of class ``label``.

    Parameters
    ----------
    label : int
        Class index, ``0 <= label < len(SYNTHETIC_CLASSES)``.
    rng : np.random.Generator
        Source of all randomness (position, rotation, size, colour, blur, noise).
        The result is a deterministic function of the generator's state.
    size : int, default 128
        Side of the square image in pixels, ``>= MIN_SIZE`` (32).

    Returns
    -------
    SyntheticSample
        The RGB image and its exact grain and feature masks. The grain never
        touches the image border (at least two background pixels on every side).

    Raises
    ------
    ValueError
        If ``label`` or ``size`` is out of range.
    TypeError
        If ``rng`` is not a ``numpy.random.Generator``.
    """
    label = _check_label(label)
    size = _check_size(size)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    name = SYNTHETIC_CLASSES[label]
    body, interior, feature_m, light_m = draw_grain(name, rng, size)
    grain_m = (body > 0) | feature_m
    image = paint(rng, size, body, interior, feature_m, light_m)
    return SyntheticSample(image=image, label=label, class_name=name,
                           grain_mask=grain_m, feature_mask=feature_m)


def _sample_rng(seed: int, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(label, index)))


def _iter_samples(n_per_class: int, size: int, seed: int):
    from tqdm.auto import tqdm

    total = n_per_class * len(SYNTHETIC_CLASSES)
    with tqdm(total=total, desc="synthetic pollen", leave=False, disable=total <= 200) as bar:
        for label in range(len(SYNTHETIC_CLASSES)):
            for i in range(n_per_class):
                yield i, make_sample(label, _sample_rng(seed, label, i), size)
                bar.update()


def make_dataset(n_per_class: int, size: int = 128, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw a balanced synthetic dataset, classes in label order.

    Parameters
    ----------
    n_per_class : int
        Images per class, ``>= 1``.
    size : int, default 128
        Image side in pixels, ``>= MIN_SIZE`` (32).
    seed : int, default 0
        Non-negative seed. Sample ``i`` of class ``label`` depends only on
        ``(seed, label, i, size)``, so a smaller dataset is a per-class prefix
        of a larger one with the same seed.

    Returns
    -------
    images : np.ndarray
        ``(N, size, size, 3)`` uint8 RGB, ``N = n_per_class * len(SYNTHETIC_CLASSES)``.
    labels : np.ndarray
        ``(N,)`` int64; ``n_per_class`` zeros, then ones, ...
    grain_masks : np.ndarray
        ``(N, size, size)`` bool.
    feature_masks : np.ndarray
        ``(N, size, size)`` bool, a subset of ``grain_masks``.

    Raises
    ------
    ValueError
        If ``n_per_class``, ``size`` or ``seed`` is out of range.

    Notes
    -----
    Shows a tqdm progress bar (``leave=False``) when ``N > 200``.
    """
    n_per_class = _check_n_per_class(n_per_class)
    size = _check_size(size)
    seed = _check_seed(seed)
    n = n_per_class * len(SYNTHETIC_CLASSES)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    grain = np.empty((n, size, size), bool)
    feature = np.empty((n, size, size), bool)
    for j, (_, s) in enumerate(_iter_samples(n_per_class, size, seed)):
        images[j], labels[j], grain[j], feature[j] = s.image, s.label, s.grain_mask, s.feature_mask
    return images, labels, grain, feature


#: The masks written beside every synthetic image.
MASK_KINDS = ("grain", "feature")


def mask_file(file: str, kind: str = "grain") -> str:
    """Where :func:`write_dataset` puts the ``kind`` mask of image ``file``, both relative to
    the dataset root: ``<class>/<stem>.png`` -> ``masks/<stem>_<kind>.png``."""
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    return f"masks/{Path(file).stem}_{kind}.png"


def write_dataset(root: str | Path, n_per_class: int, size: int = 224, seed: int = 0):
    """Write a synthetic dataset to disk in the POLEN23E one-folder-per-class layout.

    Files written (``NN`` is the zero-padded index within the class, at least two digits)::

        root/<class_name>/<class_name>_NN.png          RGB image
        root/masks/<class_name>_NN_grain.png           grain mask, single channel 0/255
        root/masks/<class_name>_NN_feature.png         feature mask, single channel 0/255

    The images are the same as ``make_dataset(n_per_class, size, seed)`` returns.
    Note that ``masks/`` sits beside the class folders: a loader that treats
    every sub-folder of ``root`` as a class must skip it.

    Parameters
    ----------
    root : str or Path
        Output folder, created if missing; existing files of the same name are overwritten.
    n_per_class : int
        Images per class, ``>= 1``.
    size : int, default 224
        Image side in pixels, ``>= MIN_SIZE`` (32).
    seed : int, default 0
        Non-negative seed (see :func:`make_dataset`).

    Returns
    -------
    pandas.DataFrame
        One row per image, classes in label order, with columns ``file``
        (image path relative to ``root``, POSIX separators), ``class``,
        ``label``, ``grain_mask`` and ``feature_mask`` (mask paths relative to ``root``).

    Raises
    ------
    ValueError
        If ``n_per_class``, ``size`` or ``seed`` is out of range.
    OSError
        If a file cannot be written.
    """
    import pandas as pd

    n_per_class = _check_n_per_class(n_per_class)
    size = _check_size(size)
    seed = _check_seed(seed)
    root = Path(root)
    digits = max(2, len(str(n_per_class - 1)))
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name in SYNTHETIC_CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)

    def _write(path: Path, array: np.ndarray) -> None:
        if not cv2.imwrite(str(path), array):
            raise OSError(f"could not write {path}")

    rows = []
    for i, s in _iter_samples(n_per_class, size, seed):
        stem = f"{s.class_name}_{i:0{digits}d}"
        file = f"{s.class_name}/{stem}.png"
        grain, feature = (mask_file(file, kind) for kind in MASK_KINDS)
        _write(root / file, cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))
        _write(root / grain, s.grain_mask.astype(np.uint8) * 255)
        _write(root / feature, s.feature_mask.astype(np.uint8) * 255)
        rows.append({"file": file, "class": s.class_name, "label": s.label,
                     "grain_mask": grain, "feature_mask": feature})
    df = pd.DataFrame(rows, columns=["file", "class", "label", "grain_mask", "feature_mask"])
    df["label"] = df["label"].astype(np.int64)
    return df
