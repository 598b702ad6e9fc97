"""Where a saliency map sits: centroids, the shift between two maps, and where each cell of a
layer's grid looks in the input.

Used by notebook 07 to measure the lateral shift between FastAblationCAM and Grad-CAM maps and
to test its candidate causes. Coordinates are (row, column) in input-pixel indices: pixel i
has its centre at i. Shifts are "b relative to a": a positive column shift means b lies to the
right of a. tests/test_shift.py checks the functions against values worked out by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import keras
import numpy as np
from scipy import ndimage, signal

from .. import maps as M
from ..graph import Split, needed_calls

#: Upsampling conventions compared in notebook 07.
UPSAMPLING = ("half-pixel", "align-corners", "nearest")


def _batch(maps, name: str = "maps") -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"{name} must be a (B, H, W) batch of maps, got shape {maps.shape}")
    return maps


def centroid(maps) -> np.ndarray:
    """Centre of mass (row, col) of each non-negative map, (B, 2); NaN for an all-zero map.

    Negative values are clipped to 0 first (a map's centroid is a weighted mean position).
    """
    maps = np.maximum(_batch(maps), 0)
    out = np.full((len(maps), 2), np.nan)
    for i, m in enumerate(maps):
        if m.sum() > 0:
            out[i] = ndimage.center_of_mass(m)
    return out


def centroid_offset(a, b) -> np.ndarray:
    """Centroid of b minus centroid of a, (B, 2) as (rows, cols); NaN where either is all zero."""
    a, b = _batch(a, "a"), _batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {a.shape} and {b.shape}")
    return centroid(b) - centroid(a)


def _parabola_peak(left: float, centre: float, right: float) -> float:
    """Offset in (-0.5, 0.5) of the vertex of the parabola through three samples at -1, 0, 1."""
    curvature = left - 2 * centre + right
    return 0.0 if curvature >= 0 else float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))


def correlation_shift(a, b, max_shift: int | None = None, subpixel: bool = True) -> np.ndarray:
    """The (rows, cols) shift s that maximises the cross-correlation of each pair of maps, (B, 2).

    b(y, x) ~ a(y - s_row, x - s_col): a positive s_col means b is a moved right. The maps are
    made zero-mean first (so the overlap of two positive maps does not pull the peak to zero
    shift), ``max_shift`` bounds |s| per axis, and ``subpixel`` refines the integer peak with a
    parabola through its neighbours along each axis. NaN where either map is constant.
    """
    a, b = _batch(a, "a"), _batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {a.shape} and {b.shape}")
    _, h, w = a.shape
    if max_shift is not None and max_shift < 0:
        raise ValueError(f"max_shift must be None or >= 0, got {max_shift}")
    out = np.full((len(a), 2), np.nan)
    for i, (x, y) in enumerate(zip(a, b)):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        corr = signal.correlate(y - y.mean(), x - x.mean(), mode="full", method="fft")
        # corr[k + (h - 1), l + (w - 1)] = sum_n y[n + (k, l)] x[n]: peaks at the shift of b.
        if max_shift is not None:
            keep = np.full(corr.shape, -np.inf)
            r0, c0 = max(h - 1 - max_shift, 0), max(w - 1 - max_shift, 0)
            keep[r0:h + max_shift, c0:w + max_shift] = corr[r0:h + max_shift, c0:w + max_shift]
            corr = keep
        r, c = np.unravel_index(np.argmax(corr), corr.shape)
        dr = dc = 0.0
        if subpixel:
            if 0 < r < corr.shape[0] - 1 and np.isfinite(corr[r - 1:r + 2, c]).all():
                dr = _parabola_peak(*corr[r - 1:r + 2, c])
            if 0 < c < corr.shape[1] - 1 and np.isfinite(corr[r, c - 1:c + 2]).all():
                dc = _parabola_peak(*corr[r, c - 1:c + 2])
        out[i] = (r - (h - 1) + dr, c - (w - 1) + dc)
    return out


def upsample(maps, size: tuple[int, int], method: str = "half-pixel") -> np.ndarray:
    """(B, h, w) maps to (B, H, W) with one of three conventions (see :data:`UPSAMPLING`).

    * ``half-pixel``: bilinear, cell j's value at pixel (j + 0.5) * H / h - 0.5 (OpenCV's
      INTER_LINEAR, what :func:`cam.maps.upsample_maps` does);
    * ``align-corners``: bilinear with the corner cells on the corner pixels, cell j at
      j * (H - 1) / (h - 1) (``scipy.ndimage.zoom(order=1)``, used by tf-keras-vis);
    * ``nearest``: each cell fills its block of pixels (OpenCV's INTER_NEAREST).
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be a (B, h, w) batch, got shape {maps.shape}")
    height, width = size
    if method == "half-pixel":
        return M.upsample_maps(maps, size)
    if method == "align-corners":
        # grid_mode=False maps the first and last cells onto the first and last pixels
        factors = (1, height / maps.shape[1], width / maps.shape[2])
        return ndimage.zoom(maps, factors, order=1, grid_mode=False).astype(np.float32)
    if method == "nearest":
        return np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST)
                         for m in maps]).astype(np.float32)
    raise ValueError(f"method must be one of {UPSAMPLING}, got {method!r}")


def cell_positions(cells: int, pixels: int, method: str = "half-pixel") -> np.ndarray:
    """The pixel at which an upsampling convention places each of ``cells`` grid cells."""
    j = np.arange(cells, dtype=np.float64)
    if method in ("half-pixel", "nearest"):
        return (j + 0.5) * pixels / cells - 0.5
    if method == "align-corners":
        return j * (pixels - 1) / max(cells - 1, 1)
    raise ValueError(f"method must be one of {UPSAMPLING}, got {method!r}")


@dataclass(frozen=True)
class ReceptiveField:
    """Geometry of a layer's grid in input pixels, per axis (rows, cols).

    ``centres[axis][j]`` is the input pixel at the centre of cell j's receptive field,
    ``jump`` the distance between neighbouring cells, ``size`` the receptive field's width.
    """

    centres: tuple[np.ndarray, np.ndarray]
    jump: tuple[float, float]
    size: tuple[float, float]


_POOLS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


def _pair_of(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def receptive_field(model: keras.Model, layer: str) -> ReceptiveField:
    """Receptive-field centres of every cell of ``layer``'s grid, from the kernel, stride,
    dilation and padding of the convolutions, poolings and ZeroPadding2D layers before it.

    For one axis, a layer with kernel k (dilated: d(k - 1) + 1), stride s and p pixels of
    padding before the first input cell maps cell 0's centre c and spacing j to
    c + ((k - 1) / 2 - p) j and j s; 'same' padding puts floor(total / 2) before, as
    TensorFlow does. Branches that meet (concatenation, addition) must agree on centres and
    spacing; the size is the widest branch's. Needs a model
    built at a fixed image size.
    """
    split = Split(model, layer)
    graph = split.graph
    if any(d is None for d in graph.input_specs[0].shape[1:3]):
        raise ValueError("receptive_field needs a model built at a fixed image size "
                         "(image_size=None leaves the grid sizes unknown)")
    geometry = {graph.input_keys[0]: ((0.0, 0.0), (1.0, 1.0), (1.0, 1.0))}  # centre, jump, size
    for call in needed_calls(split.trunk_calls, {split.target}):
        op = call.operation
        ins = [geometry[k] for k in call.arg_keys if k in geometry]
        if not ins:
            continue
        if any(g[:2] != ins[0][:2] for g in ins[1:]):
            raise ValueError(f"layer {call.name!r} merges branches whose cells are centred "
                             f"differently {[g[:2] for g in ins]} (centre, jump per axis)")
        centre, jump = list(ins[0][0]), list(ins[0][1])
        size = [max(g[2][axis] for g in ins) for axis in range(2)]  # the widest branch
        in_shape = tuple(graph.specs[call.arg_keys[0]].shape[1:3])
        out_shape = tuple(call.out_specs[0].shape[1:3]) if len(call.out_specs[0].shape) == 4 else None
        if isinstance(op, keras.layers.ZeroPadding2D):
            for axis in range(2):
                centre[axis] -= op.padding[axis][0] * jump[axis]
        elif isinstance(op, _CONVS + _POOLS):
            kernel = _pair_of(op.kernel_size if isinstance(op, _CONVS) else op.pool_size)
            stride = _pair_of(op.strides)
            dilation = _pair_of(getattr(op, "dilation_rate", 1))
            for axis in range(2):
                k = dilation[axis] * (kernel[axis] - 1) + 1
                before = 0
                if op.padding == "same":
                    total = max((out_shape[axis] - 1) * stride[axis] + k - in_shape[axis], 0)
                    before = total // 2
                centre[axis] += ((k - 1) / 2 - before) * jump[axis]
                size[axis] += (k - 1) * jump[axis]
                jump[axis] *= stride[axis]
        elif out_shape != in_shape:
            raise ValueError(f"layer {call.name!r} ({type(op).__name__}) changes the grid from "
                             f"{in_shape} to {out_shape} in a way receptive_field does not know")
        for key in call.out_keys:
            geometry[key] = (tuple(centre), tuple(jump), tuple(size))
    centre, jump, size = geometry[split.target]
    h, w = split.target_shape[:2]
    centres = tuple(c + j * np.arange(n) for c, j, n in zip(centre, jump, (h, w)))
    return ReceptiveField(centres, tuple(jump), tuple(size))


def gradient_centres(model: keras.Model, layer: str, image, batch_size: int = 8) -> np.ndarray:
    """Empirical receptive-field centre of each cell of ``layer`` for one image, (h, w, 2).

    For cell (i, j), the gradient of the sum of its channels with respect to the input; the
    centre is the centroid of |gradient| summed over colour channels (the pixels whose change
    moves that cell most). Costs one forward and backward pass of the trunk per cell.
    """
    import tensorflow as tf

    split = Split(model, layer)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be one (H, W, C) image, got shape {image.shape}")
    h, w = split.target_shape[:2]
    cells = [(i, j) for i in range(h) for j in range(w)]
    out = np.empty((h * w, 2))
    for start in range(0, len(cells), batch_size):
        chunk = np.array(cells[start:start + batch_size])
        x = tf.constant(np.repeat(image[None], len(chunk), axis=0))
        with tf.GradientTape() as tape:
            tape.watch(x)
            activation, _ = split.trunk(x)
            picked = tf.gather_nd(activation, np.c_[np.arange(len(chunk)), chunk])
            total = tf.reduce_sum(picked)
        grads = np.abs(tape.gradient(total, x).numpy()).sum(axis=-1)
        out[start:start + len(chunk)] = centroid(grads)
    return out.reshape(h, w, 2)


#: Ways of turning a raw map into a [0, 1] map, compared in notebook 07.
NORMALISATIONS = ("relu-max", "minmax")


def normalise(maps, how: str = "relu-max") -> np.ndarray:
    """``relu-max``: ReLU, then divide by the maximum (cam's default); ``minmax``: no ReLU,
    (m - min) / (max - min) per map (tf-keras-vis' ``normalize``). A constant map becomes 0."""
    maps = _batch(maps)
    if how == "relu-max":
        return M.normalize_maps(maps)
    if how == "minmax":
        flat = maps.reshape(len(maps), -1)
        low, span = flat.min(axis=1), np.ptp(flat, axis=1)
        out = (flat - low[:, None]) / np.where(span > 0, span, 1)[:, None]
        return out.reshape(maps.shape).astype(np.float32)
    raise ValueError(f"how must be one of {NORMALISATIONS}, got {how!r}")


def last_conv_layer(model: keras.Model) -> str:
    """The layer an automatic Grad-CAM layer picker chooses: the last convolution with a 4-D
    output (tf-keras-vis' ``seek_penultimate_conv_layer``), by its candidate name."""
    from ..graph import LayerGraph

    graph = LayerGraph.from_model(model)
    names = {graph.short_name(c.name): c for c in graph.calls}
    convs = [name for name, _ in graph.candidates()
             if name in names and isinstance(names[name].operation, _CONVS)]
    if not convs:
        raise ValueError(f"model {model.name!r} has no convolution with a spatial output")
    return convs[-1]


def summarise_offsets(offsets, confidence: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> dict:
    """Mean and bootstrap CI of the row and column offsets and of their length, over images.

    ``offsets`` is (N, 2) (rows, cols) in pixels; NaN rows (undefined maps) are dropped and
    counted. Returns a flat dict: ``images``, ``undefined``, and for ``rows``, ``cols`` and
    ``length`` the mean, ``low`` and ``high``.
    """
    from ..metrics import bootstrap_ci

    offsets = np.asarray(offsets, dtype=np.float64)
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise ValueError(f"offsets must be (N, 2) (rows, cols), got shape {offsets.shape}")
    valid = offsets[~np.isnan(offsets).any(axis=1)]
    out = {"images": len(valid), "undefined": len(offsets) - len(valid)}
    for name, values in (("rows", valid[:, 0]), ("cols", valid[:, 1]),
                         ("length", np.hypot(valid[:, 0], valid[:, 1]))):
        mean, low, high = bootstrap_ci(values, confidence, resamples, seed)
        out.update({name: mean, f"{name} low": low, f"{name} high": high})
    return out


def verdict(summary: dict, systematic: float = 2.0, negligible: float = 1.0) -> str:
    """Words for a :func:`summarise_offsets` result: ``none`` when the mean length is below
    ``negligible`` pixels; ``systematic <direction>`` when the CI of the mean row or column
    offset excludes 0 and that mean is at least ``systematic`` pixels; else ``scatter``."""
    if not summary["images"]:
        return "undefined"
    if summary["length"] < negligible:
        return "none"
    words = []
    for axis, (neg, pos) in (("rows", ("up", "down")), ("cols", ("left", "right"))):
        low, high, mean = summary[f"{axis} low"], summary[f"{axis} high"], summary[axis]
        if abs(mean) >= systematic and (low > 0 or high < 0):
            words.append(f"{abs(mean):.1f} px {pos if mean > 0 else neg}")
    return "systematic " + ", ".join(words) if words else "scatter, no common direction"


def to_image(maps, size: tuple[int, int], how: str = "relu-max",
             method: str = "half-pixel") -> np.ndarray:
    """Raw (B, h, w) maps to [0, 1] maps on the image: :func:`normalise` with ``how``, then
    :func:`upsample` with ``method``."""
    return upsample(normalise(maps, how), size, method)
