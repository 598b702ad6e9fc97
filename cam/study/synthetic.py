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

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

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
_RADIUS_RANGE: dict[str, tuple[float, float]] = {
    "tricolpate": (0.56, 0.70),
    "periporate": (0.56, 0.72),
    "echinate": (0.42, 0.54),
    "reticulate": (0.64, 0.78),
    "triangular": (0.52, 0.64),
    "monosulcate": (0.62, 0.76),  # half the long axis
}
# With these ranges no grain pixel lies farther than ~0.82 half-sides from the grain
# centre, which leaves room for a random position with the grain clear of the border.
_BORDER = 2  # pixels kept free of grain between the grain and the image edge


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

_SHIFT = 4  # sub-pixel bits for cv2 drawing calls
_ONE = 1 << _SHIFT


def _fix(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates -> int32 fixed point for cv2 calls with ``shift=_SHIFT``."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


def _polar_polygon(cx: float, cy: float, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _fill_poly(mask: np.ndarray, points: np.ndarray) -> None:
    cv2.fillPoly(mask, [_fix(points).reshape(-1, 1, 2)], 255, lineType=cv2.LINE_8, shift=_SHIFT)


def _fill_ellipse(mask: np.ndarray, cx: float, cy: float, half_long: float, half_short: float,
                  angle_rad: float) -> None:
    cv2.ellipse(mask, (int(round(cx * _ONE)), int(round(cy * _ONE))),
                (max(1, int(round(half_long * _ONE))), max(1, int(round(half_short * _ONE)))),
                math.degrees(angle_rad), 0, 360, 255, thickness=-1, lineType=cv2.LINE_8, shift=_SHIFT)


def _disc(mask: np.ndarray, cx: float, cy: float, r: float, value: int = 255, thickness: int = -1) -> None:
    cv2.circle(mask, (int(round(cx * _ONE)), int(round(cy * _ONE))), max(1, int(round(r * _ONE))),
               value, thickness=thickness, lineType=cv2.LINE_8, shift=_SHIFT)


def _kernel(radius: int) -> np.ndarray:
    d = 2 * max(0, radius) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def _scattered_points(rng: np.random.Generator, n: int, max_r: float, min_dist: float,
                      tries: int = 400) -> np.ndarray:
    """Up to ``n`` points uniform in a disc of radius ``max_r`` at least ``min_dist`` apart."""
    pts: list[tuple[float, float]] = []
    for _ in range(tries):
        if len(pts) == n:
            break
        r = max_r * math.sqrt(rng.random())
        a = rng.uniform(0, 2 * math.pi)
        p = (r * math.cos(a), r * math.sin(a))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_dist**2 for q in pts):
            pts.append(p)
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


# --------------------------------------------------------------------------- geometry per class


def _outline_radii(name: str, rng: np.random.Generator, R: float, angles: np.ndarray,
                   phi: float) -> np.ndarray:
    """Radius of the grain body outline at each polar angle (before translation)."""
    if name == "triangular":
        # Rounded triangle with convex sides; corners at phi + 2*pi*k/3.
        k = rng.uniform(0.14, 0.19)
        radii = R * (1 + k * np.cos(3 * (angles - phi)))
    elif name == "monosulcate":
        a = R
        b = R * rng.uniform(0.56, 0.70)
        t = angles - phi
        radii = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    else:
        radii = np.full_like(angles, R)
    # Slight irregularity so no two grains share an exact outline.
    wobble = sum(
        rng.uniform(0, 0.012) * np.cos(m * angles + rng.uniform(0, 2 * math.pi)) for m in (2, 3, 5)
    )
    return radii * (1 + wobble)


def _draw_features(name: str, rng: np.random.Generator, size: int, cx: float, cy: float, R: float,
                   phi: float, angles: np.ndarray, radii: np.ndarray,
                   feature: np.ndarray, light: np.ndarray) -> None:
    """Paint the class-specific features into ``feature`` (uint8 0/255, body features are
    clipped to ``interior`` by the caller); ``light`` marks lighter pore centres."""
    if name == "tricolpate":
        # Three meridional furrows, from inside the grain out to the margin.
        for k in range(3):
            a = phi + 2 * math.pi * k / 3 + rng.normal(0, 0.05)
            inner, outer = rng.uniform(0.30, 0.40) * R, rng.uniform(0.95, 1.02) * R
            mid, half_len = (inner + outer) / 2, (outer - inner) / 2
            half_w = max(1.0, R * rng.uniform(0.06, 0.085))
            _fill_ellipse(feature, cx + mid * math.cos(a), cy + mid * math.sin(a), half_len, half_w, a)
    elif name == "monosulcate":
        # One long furrow along the long axis (slightly off-centre).
        off = R * rng.uniform(-0.08, 0.08)
        half_len = R * rng.uniform(0.72, 0.86)
        half_w = max(1.0, R * rng.uniform(0.07, 0.10))
        _fill_ellipse(feature, cx - off * math.sin(phi), cy + off * math.cos(phi), half_len, half_w, phi)
    elif name in ("periporate", "triangular"):
        if name == "periporate":
            rp = max(1.5, R * rng.uniform(0.095, 0.12))
            n = int(rng.integers(6, 10))
            pts = _scattered_points(rng, n, 0.78 * R - rp, min_dist=3.2 * rp)
            centres = pts + np.array([cx, cy])
        else:
            rp = max(1.5, R * rng.uniform(0.12, 0.15))
            corner = phi + 2 * math.pi * np.arange(3) / 3
            r_corner = np.interp(np.mod(corner, 2 * math.pi), angles, radii, period=2 * math.pi)
            r_pore = r_corner - rp - max(2.0, 0.08 * R)
            centres = np.stack([cx + r_pore * np.cos(corner), cy + r_pore * np.sin(corner)], axis=1)
        ring = max(1, int(round(rp * 0.45)))
        for x, y in centres:
            _disc(feature, x, y, rp)
            _disc(light, x, y, max(0.6, rp - ring))
    elif name == "echinate":
        # Spines on the outline (triangles pointing outwards) ...
        n = int(rng.integers(14, 21))
        spine_len = R * rng.uniform(0.20, 0.26)
        base = R * rng.uniform(0.10, 0.13)
        start = rng.uniform(0, 2 * math.pi)
        for k in range(n):
            a = start + 2 * math.pi * k / n + rng.normal(0, 0.04)
            r0 = np.interp(np.mod(a, 2 * math.pi), angles, radii, period=2 * math.pi) * 0.92
            tip = (cx + (r0 + spine_len) * math.cos(a), cy + (r0 + spine_len) * math.sin(a))
            nx, ny = -math.sin(a) * base / 2, math.cos(a) * base / 2
            bx, by = cx + r0 * math.cos(a), cy + r0 * math.sin(a)
            _fill_poly(feature, np.array([[bx - nx, by - ny], tip, [bx + nx, by + ny]]))
        # ... and spines seen end-on as dark dots on the face.
        rd = max(1.0, R * rng.uniform(0.07, 0.09))
        pts = _scattered_points(rng, int(rng.integers(10, 18)), 0.78 * R, min_dist=3.0 * rd)
        for x, y in pts:
            _disc(feature, cx + x, cy + y, rd)
    elif name == "reticulate":
        # Polygonal net: Voronoi cell borders of jittered seeds (cv2 distance-transform labels).
        spacing = R * rng.uniform(0.28, 0.36)
        ext = int(math.ceil(R * 1.3))
        seeds = np.full((size, size), 255, np.uint8)
        step = spacing
        ys = np.arange(cy - ext, cy + ext + step, step)
        for row, y in enumerate(ys):
            xs = np.arange(cx - ext + (step / 2) * (row % 2), cx + ext + step, step)
            for x in xs:
                sx = int(round(x + rng.normal(0, 0.18 * step)))
                sy = int(round(y + rng.normal(0, 0.18 * step)))
                if 0 <= sx < size and 0 <= sy < size:
                    seeds[sy, sx] = 0
        _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
        width = max(1, int(round(R / 28)))
        edges = cv2.morphologyEx(labels.astype(np.float32), cv2.MORPH_GRADIENT,
                                 np.ones((width + 1, width + 1), np.uint8)) > 0
        feature[edges] = 255
    else:  # pragma: no cover - guarded by _check_label
        raise AssertionError(name)


# --------------------------------------------------------------------------- public API


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
    half = size / 2

    # ---- geometry: size, rotation, position
    lo, hi = _RADIUS_RANGE[name]
    R = rng.uniform(lo, hi) * half
    phi = rng.uniform(0, 2 * math.pi)
    n_vertices = max(64, int(4 * R))
    angles = np.linspace(0, 2 * math.pi, n_vertices, endpoint=False)
    radii = _outline_radii(name, rng, R, angles, phi)
    # Farthest grain pixel from the centre (spines reach at most 0.92 r + 0.26 R beyond).
    extent = float(radii.max()) * (1.20 if name == "echinate" else 1.0) + 1.0
    reach = int(math.ceil(extent)) + _BORDER + 1
    cx = rng.uniform(reach, size - 1 - reach) if size - 1 - 2 * reach > 0 else (size - 1) / 2
    cy = rng.uniform(reach, size - 1 - reach) if size - 1 - 2 * reach > 0 else (size - 1) / 2

    body = np.zeros((size, size), np.uint8)
    _fill_poly(body, _polar_polygon(cx, cy, radii, angles))
    rim_w = max(1, int(round(size / 110)))
    interior = cv2.erode(body, _kernel(rim_w))

    feature = np.zeros_like(body)
    light = np.zeros_like(body)
    _draw_features(name, rng, size, cx, cy, R, phi, angles, radii, feature, light)
    if name == "echinate":
        # Spines cross the rim and stick out of the body; they all count.
        feature_m = feature > 0
    else:
        # Apertures and net lines live on the face, inside the rim.
        feature_m = (feature > 0) & (interior > 0)
    light_m = (light > 0) & feature_m
    body_m = body > 0
    grain_m = body_m | feature_m

    # ---- colours (RGB, float 0..255)
    tone = rng.uniform(0, 1)  # 0 = pale yellow, 1 = brown
    grain_rgb = (1 - tone) * np.array([232, 198, 112]) + tone * np.array([178, 120, 62])
    grain_rgb = grain_rgb + rng.normal(0, 4, 3)
    feature_rgb = grain_rgb * rng.uniform(0.42, 0.55)
    rim_rgb = grain_rgb * rng.uniform(0.62, 0.72)
    bg_rgb = np.array([236.0, 234.0, 226.0]) + rng.normal(0, 5, 3)

    ramp = np.arange(size, dtype=np.float32) / size - 0.5
    g_angle = rng.uniform(0, 2 * math.pi)
    g_amp = rng.uniform(0.03, 0.10)
    gradient = 1 + g_amp * (ramp[None, :] * math.cos(g_angle) + ramp[:, None] * math.sin(g_angle))
    img = (gradient[..., None] * bg_rgb.astype(np.float32)).astype(np.float32)

    # Grain body: brighter centre, darker towards the rim, faint granular texture.
    dist = cv2.distanceTransform(body, cv2.DIST_L2, 5)
    depth = np.sqrt(dist / max(float(dist.max()), 1.0))
    shade = 0.80 + 0.25 * depth
    texture = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), max(0.8, size / 160))
    texture *= 7.0 / max(float(texture.std()), 1e-6)
    body_rgb = (shade[..., None] * grain_rgb.astype(np.float32) + texture[..., None]).astype(np.float32)
    rim_m = body_m & (interior == 0)
    cv2.copyTo(body_rgb, body_m.view(np.uint8), img)
    img[rim_m] = rim_rgb
    img[feature_m] = feature_rgb
    img[light_m] = grain_rgb * 1.08

    # ---- optics: focus blur, sensor noise
    sigma = rng.uniform(0.35, 1.1) * size / 128
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.uniform(2.0, 4.5) * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

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
