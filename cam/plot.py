"""Figures: a map over its image, the raw map on its grid, and a methods-by-images grid.

Every ``show_*`` / grid function returns a matplotlib figure and, given ``save=PATH``, also
writes it with :func:`save_figure` (``.jpg`` for photographs such as overlays, ``.png`` for
charts). Images may be RGB (H, W, 3) or grayscale (H, W) / (H, W, 1), as uint8, 0-255
floats or [0, 1] floats; grayscale is shown in gray, not through a colour map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from . import maps as M
from ._optional import require

matplotlib = require("matplotlib", "cam.plot")
plt = require("matplotlib.pyplot", "cam.plot")


def overlay(image: np.ndarray, saliency: np.ndarray, cmap: str = "jet", alpha: float = 0.5,
            threshold=0.0, smooth: float = 0.0) -> np.ndarray:
    """Blend a [0, 1] map over an image: an (H, W, 3) float array in [0, 1].

    Cells at or below ``threshold`` are left uncoloured, with the colour's opacity ramping up
    from there, so weak evidence does not tint the whole picture. ``threshold`` is a level in
    [0, 1], or a quantile of this map's values (``"q0.8"`` or ``cam.maps.Quantile(0.8)``:
    colour the top 20%). ``smooth`` is the sigma (pixels) of a Gaussian blur applied to the
    map first, for softer edges; a map coarser than the image is resized bilinearly.
    """
    base = M.as_display(image)
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be one (h, w) map, got shape {saliency.shape}")
    if saliency.shape != base.shape[:2]:
        saliency = cv2.resize(saliency, base.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    if smooth > 0:
        saliency = cv2.GaussianBlur(saliency, (0, 0), smooth)
    threshold = float(M.threshold_levels(saliency[None], threshold)[0])
    colours = plt.get_cmap(cmap)(np.clip(saliency, 0, 1))[..., :3]
    return M.blend(base, saliency, colours, alpha, threshold)


#: Saved figures at sizes that suit a README: this resolution, and photographs as JPEG of this
#: quality at most this many pixels wide.
FIGURE_DPI = 100
JPEG_QUALITY = 85
MAX_JPEG_WIDTH = 1600


def save_figure(fig, path, dpi: float = FIGURE_DPI) -> None:
    """Write ``fig`` to ``path`` (folders created), cropped to what is drawn, in the format its
    suffix names: ``.jpg`` for photographs (micrographs, saliency overlays: a tenth of their
    PNG's size), at quality ``JPEG_QUALITY`` and at most ``MAX_JPEG_WIDTH`` pixels wide;
    ``.png`` for charts and tables, whose lines and text JPEG would blur."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {}
    if path.suffix.lower() in (".jpg", ".jpeg"):
        width = fig.get_tightbbox().width + 2 * matplotlib.rcParams["savefig.pad_inches"]
        dpi = min(dpi, (MAX_JPEG_WIDTH - 1) / width)  # -1: the width in pixels is rounded
        options = {"pil_kwargs": {"quality": JPEG_QUALITY, "optimize": True}}
    elif path.suffix.lower() == ".png":
        options = {"pil_kwargs": {"optimize": True}}
    fig.savefig(path, dpi=dpi, bbox_inches="tight", **options)


def _finish(fig, save):
    if save is not None:
        save_figure(fig, save)
    return fig


def show_overlay(image, saliency, title: str | None = None, save=None, colorbar: bool = False,
                 **kwargs):
    """One overlay in its own figure (see :func:`overlay` for the keyword arguments);
    ``colorbar=True`` adds the colour scale (0 = weak, 1 = strong evidence)."""
    fig, ax = plt.subplots(figsize=(4.6 if colorbar else 4, 4))
    ax.imshow(overlay(image, saliency, **kwargs))
    ax.set_axis_off()
    if colorbar:
        scale = plt.cm.ScalarMappable(cmap=kwargs.get("cmap", "jet"),
                                      norm=matplotlib.colors.Normalize(0, 1))
        fig.colorbar(scale, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title)
    return _finish(fig, save)


def show_explanation(image, raw_map, title: str | None = None, save=None, threshold=0.0,
                     **kwargs):
    """The raw map on its own grid (cell values) beside the normalised map over the image.

    ``raw_map`` is one (h, w) map straight from an explainer (``normalize=False,
    upsample=False``); ``threshold`` is applied when normalising it (see
    :func:`cam.maps.normalize_maps`), and the other keyword arguments go to :func:`overlay`.
    """
    raw_map = np.asarray(raw_map, dtype=np.float32)
    if raw_map.ndim != 2:
        raise ValueError(f"raw_map must be one (h, w) map, got shape {raw_map.shape}")
    h, w = raw_map.shape
    side = max(4.0, 0.55 * max(h, w) + 1.2)  # room for the cell values
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 * side + 1, side),
                                      gridspec_kw={"width_ratios": [1.15, 1]})
    _draw_raw(left, raw_map, annotate=True, cmap="RdBu_r")
    left.set_title(f"raw map {raw_map.shape[0]}x{raw_map.shape[1]}", fontsize=9)
    normalised = M.normalize_maps(raw_map[None], threshold)[0]
    # With a threshold, the cells it dropped (now 0) are left uncoloured, as in overlay().
    right.imshow(overlay(image, normalised, threshold=1e-6 if threshold != 0 else 0.0, **kwargs))
    right.set_axis_off()
    right.set_title("overlay" + (f", threshold {threshold}" if threshold != 0 else ""),
                    fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, save)


def show_raw(raw_map: np.ndarray, title: str | None = None, annotate: bool = True,
             cmap: str = "RdBu_r", save=None):
    """The raw (h, w) map on its own grid, diverging around 0, with each cell's value."""
    raw_map = np.asarray(raw_map, dtype=np.float32)
    if raw_map.ndim != 2:
        raise ValueError(f"raw_map must be one (h, w) map, got shape {raw_map.shape}")
    h, w = raw_map.shape
    fig, ax = plt.subplots(figsize=(0.55 * w + 1.5, 0.55 * h + 1))
    _draw_raw(ax, raw_map, annotate, cmap)
    if title:
        ax.set_title(title)
    return _finish(fig, save)


def _draw_raw(ax, raw_map: np.ndarray, annotate: bool, cmap: str) -> None:
    """The map's cells as squares, colour diverging around 0, values written in (up to 20x20)."""
    h, w = raw_map.shape
    bound = float(np.abs(raw_map).max()) or 1.0
    image = ax.imshow(raw_map, cmap=cmap, vmin=-bound, vmax=bound)
    if annotate and h * w <= 400:
        for (i, j), value in np.ndenumerate(raw_map):
            ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7 if w <= 6 else 6)
    ax.set(xticks=range(w), yticks=range(h))
    ax.figure.colorbar(image, ax=ax, fraction=0.046)


def compare_methods(images: np.ndarray, maps: Mapping[str, np.ndarray],
                    row_titles: Sequence[str] | None = None, save=None, **kwargs):
    """A grid: one row per image, the image then one overlay per method."""
    images = np.asarray(images)
    n, methods = len(images), list(maps)
    for name, m in maps.items():
        if len(m) != n:
            raise ValueError(f"maps[{name!r}] has {len(m)} maps for {n} images")
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(2.2 * (len(methods) + 1), 2.2 * n),
                             squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(M.as_display(images[i]))
        axes[i, 0].set_ylabel(row_titles[i] if row_titles else "", fontsize=8)
        for j, name in enumerate(methods, start=1):
            axes[i, j].imshow(overlay(images[i], maps[name][i], **kwargs))
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(["image"] + methods):
        axes[0, j].set_title(name, fontsize=9)
    fig.tight_layout()
    return _finish(fig, save)


def image_grid(images: np.ndarray, titles: Sequence[str] | None = None, columns: int = 8,
               save=None):
    """Thumbnails in rows of ``columns``, each with an optional title."""
    images = np.asarray(images)
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 1.55 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, image in enumerate(images):
        ax = axes.ravel()[i]
        ax.imshow(M.as_display(image))
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return _finish(fig, save)
