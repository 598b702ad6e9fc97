"""The perturbation engine: one machinery under Ablation-CAM, FastAblationCAM, ReciproCAM,
Occlusion and Score-CAM.

A method says only what it perturbs and how the perturbed scores combine into a map:

* :meth:`PerturbationExplainer.masks`: its masks (N, ...) for a grid, made once per grid and
  :meth:`~PerturbationExplainer.mask_settings` and kept on the device (Score-CAM's masks
  depend on each image: it overrides :meth:`~PerturbationExplainer.row_masks`);
* :attr:`~PerturbationExplainer.APPLIES_TO`: where they apply, ``"activation"`` (the explained
  layer's output) or ``"input"`` (the pixels), and :meth:`~PerturbationExplainer.perturb`, how
  (in ``keras.ops``);
* :meth:`~PerturbationExplainer.combine`: how the scores become a (B, h, w) map.

The engine owns the rest. Every (image, mask) pair of an explain call is one row of a list
(row r: image r // N, mask r % N), scored in equal compiled calls of ``batch_size`` rows (the
last padded by repeating the last image's masks, dropped afterwards), with progress shown for
long runs. Everything stays on the device until the explain call's one copy to the host.

Where the rows go is decided in Python, once, from the explainer's own settings
(:attr:`PerturbationExplainer.path`):

``"pooled"``
    an ablation of channels or cells before a head that begins with global average pooling:
    the moved pooled vectors in closed form, then the rest of the head (:mod:`cam.pooled`);
``"head"``
    the perturbed activation through the head only, the bypass tensors gathered per row;
``"full"``
    ``mode="full"``: the whole network, the activation replaced as soon as it is computed;
``"input"``
    perturbed images through the whole network (Occlusion, Score-CAM).

``batch_size`` (rows per call) comes from the memory budget (:mod:`cam.batching`) over the
bytes of one row on that path; the trunk pass before it is budgeted too
(:meth:`cam.explainers.Explainer.forward`). :data:`PATHS` counts the explain calls per path.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from . import backend as B
from . import batching
from . import pooled as P
from . import targets as T
from .explainers import Explainer, check_batch_size, per_row

#: Explain calls per path ("pooled", "head", "full", "input"), counted in Python when an
#: explain call picks its compiled scoring: how a test sees which path ran.
PATHS: Counter = Counter()
#: Calls of at least this many compiled scoring calls show a progress bar.
PROGRESS_CALLS = 8
#: Score drops at most this fraction of the score are float32 rounding (the head batched
#: differently), not evidence: a layer whose every drop is that small is one the score
#: ignores (cam.explainers.ZeroMapWarning).
ROUNDING = 1e-6


def score_rows(score, count: int, masks: int, rows: int, *args, desc: str = ""):
    """Every (image, mask) pair of ``count`` images and ``masks`` masks, as one list of
    ``count * masks`` rows, scored by the compiled ``score(*args, index)`` in calls of at
    most ``rows`` rows (:func:`cam.batching.plan`); ``index`` is the call's row numbers (rows
    past the end repeat the last image's masks and are dropped). Returns the (count, masks)
    scores, on the device: no host copy, no loop over images."""
    total = count * masks
    calls, rows = batching.plan(total, rows)
    starts = tqdm(range(0, calls * rows, rows), leave=False, disable=calls < PROGRESS_CALLS,
                  desc=f"{desc} ({total} rows, {calls} calls of {rows})")
    out = [score(*args, ops.arange(start, start + rows, dtype="int32")) for start in starts]
    joined = out[0] if len(out) == 1 else ops.concatenate(out, axis=0)
    return ops.reshape(joined[:total], (count, masks))


class PerturbationExplainer(Explainer):
    """Template of the perturbation methods (see the module docstring).

    ``batch_size``: rows per compiled call at most; None (the default) takes the memory budget
    over the bytes of one row on the explainer's :attr:`path`. ``fuse``: compile the
    head-only scoring with XLA on TensorFlow; None fuses when the head has no convolution or
    attention layer (cheaper on the CPU there, slower to compile on convolutions).
    """

    #: Where the masks apply: "activation" (the layer's output) or "input" (the pixels).
    APPLIES_TO: ClassVar[str] = "activation"
    #: What the masks are, for the pooled-head shortcut: "channel" (N, 1, 1, C), "cell"
    #: (N, h, w, 1), or None (anything else: no shortcut).
    MASK_KIND: ClassVar[str | None] = None
    #: Whether :meth:`perturb` is the ablation A (1 - m) + v m of :mod:`cam.pooled` (with
    #: v the first of :meth:`perturb_args`), which the shortcut computes in closed form.
    ABLATES: ClassVar[bool] = False

    def __init__(self, model, layer=None, score="logit", mode="head", reshape=None,
                 batch_size=None, fuse=None):
        super().__init__(model, layer, score, mode, reshape)
        batch_size = check_batch_size(batch_size)
        if fuse is not None and not isinstance(fuse, (bool, np.bool_)):
            raise ValueError(f"fuse must be None (decide from the head's layers), True or "
                             f"False, got {fuse!r}")
        self.fuse = _light_head(self.split) if fuse is None else bool(fuse)
        self.pooled_head = P.find(self.split) if self.ABLATES else None
        #: Rows (perturbed copies) per compiled call at most.
        self.batch_size = batch_size or batching.rows_per_call(self.bytes_per_row())
        self._device_masks: dict = {}
        self._channels: dict = {}  # id of masks kept in _device_masks -> mask_channels

    # -- what a method says -------------------------------------------------------------

    def masks(self, grid_shape: tuple) -> np.ndarray:
        """The hook: masks (N, ...) for a grid (h, w, C) of the layer's activation, or the
        images' (H, W, C) where :attr:`APPLIES_TO` is "input", broadcastable against it."""
        raise NotImplementedError

    def mask_settings(self) -> tuple:
        """What :meth:`masks` depends on besides the grid (a window, a stride): the masks
        kept on the device are made again when it changes."""
        return ()

    @staticmethod
    def perturb(rows, masks, *args):
        """The hook: rows (R, ...) of activations or images perturbed by their masks (R, ...),
        in ``keras.ops``; ``args`` are :meth:`perturb_args`. A static function: explainers
        of one kind share its compiled scoring."""
        raise NotImplementedError

    def perturb_args(self, images, activation) -> tuple:
        """Tensors :meth:`perturb` takes besides the rows and masks (a fill value, ...)."""
        return ()

    def combine(self, activation, scores, perturbed, masks):
        """The hook: (B, h, w) raw maps from the activation (B, h, w, C), the unperturbed
        scores y (B,), the perturbed scores (B, N) and the masks, all tensors on the device
        (write it with ``keras.ops``; :mod:`cam.combine` has the common steps)."""
        raise NotImplementedError

    # -- cost ----------------------------------------------------------------------------

    def grid_shape(self) -> tuple:
        """The shape the masks apply to, per image: the layer's (h, w, C) or the input's."""
        if self.APPLIES_TO == "input":
            return tuple(self.split.input_shape[1:])
        return tuple(self.split.target_shape)

    @property
    def evaluations_per_image(self) -> int:
        """Perturbed copies scored per image."""
        return self.evaluations(self.grid_shape())

    def evaluations(self, grid_shape: tuple) -> int:
        """Perturbations per image for a grid (see :meth:`masks`)."""
        if any(d is None for d in grid_shape):
            raise ValueError(f"{self.name} at {self.layer!r} perturbs a grid of shape "
                             f"{tuple(grid_shape)}, which depends on the image size; call "
                             f"evaluations(shape) with a known shape")
        return len(self.masks(tuple(grid_shape)))

    @property
    def whole_network(self) -> bool:
        return self.path in ("full", "input")

    @property
    def path(self) -> str:
        """Where the rows go: "pooled", "head", "full" or "input" (the module docstring)."""
        if self.APPLIES_TO == "input":
            return "input"
        if self.mode == "full":
            return "full"
        if self.pooled_head is not None and self.MASK_KIND in P.KINDS:
            return "pooled"
        return "head"

    def bytes_per_row(self) -> int:
        """Bytes one row costs on :attr:`path` (what ``batch_size`` is budgeted from)."""
        if self.path == "pooled":
            return self.pooled_head.bytes_per_row()
        return self.split.bytes_per_row("head" if self.path == "head" else "full")

    # -- the engine ----------------------------------------------------------------------

    def device_masks(self, grid_shape: tuple):
        """The :meth:`masks` for a grid as (NumPy array, tensor on the device), made once per
        grid and :meth:`mask_settings`, and kept."""
        key = (tuple(int(d) for d in grid_shape), self.mask_settings())
        if key not in self._device_masks:
            masks = checked_masks(self.masks(key[0]))
            self._device_masks[key] = (masks, B.tensor(masks))
        return self._device_masks[key]

    def row_masks(self, images, activation):
        """(masks, per_image) for an explain call: the shared masks on the device, N of them
        (row r takes mask r % N), or, ``per_image``, B N masks (row r takes mask r)."""
        source = images if self.APPLIES_TO == "input" else activation
        return self.device_masks(ops.shape(source)[1:])[1], False

    @property
    def scorer(self) -> B.Compiled:
        """The compiled scoring of rows that :meth:`explain` uses for a class target."""
        return self.scoring_function(T.Class(0))

    def pooled_kind(self, masks: np.ndarray | None = None) -> str | None:
        """How the pooled path moves a row (None off that path): "cell" and "channel" move
        the pooled vector; "dense", where every mask ablates one channel before a Dense
        layer, moves that layer's output by a kernel row (:mod:`cam.pooled`). Decided in
        Python from the masks (this method's own for its layer by default)."""
        if self.path != "pooled":
            return None
        if self.MASK_KIND == "cell" or self.pooled_head.dense is None:
            return self.MASK_KIND
        if masks is None:
            grid = self.grid_shape()
            if None in grid:
                return self.MASK_KIND
            masks = self.device_masks(grid)[0]
        return "dense" if self.mask_channels(masks) is not None else "channel"

    def mask_channels(self, masks: np.ndarray):
        """The channel each mask ablates, on the device, where every mask ablates exactly one
        (:func:`cam.pooled.one_channel`), else None; kept for this method's own masks."""
        own = any(masks is kept for kept, _ in self._device_masks.values())
        if own and id(masks) in self._channels:
            return self._channels[id(masks)]
        index = P.one_channel(masks)
        channels = None if index is None else B.tensor(index)
        if own:
            self._channels[id(masks)] = channels
        return channels

    def scoring_function(self, target, kind: str | None = None) -> B.Compiled:
        """The compiled scoring of rows on :attr:`path` for ``target``'s kind (and on the
        pooled path, :meth:`pooled_kind`'s ``kind``), shared by every explainer on this model
        and layer that perturbs the same way."""
        path, split, perturb = self.path, self.split, type(self).perturb
        per_image = self.per_image_masks
        if path == "pooled":
            kind = kind or self.pooled_kind()
            perturb = {"channel": P.channel_moved, "cell": P.cell_moved,
                       "dense": P.dense_moved}[kind]
            per_image = kind == "cell"
        key = ("rows", path, perturb.__qualname__, per_image, target.key)
        fuse = self.fuse and path in ("pooled", "head")
        pooled_head = self.pooled_head
        return self.shared_compiled(
            key, lambda: lambda *a: _score(split, pooled_head, path, perturb, per_image,
                                           target, *a),
            fuse=fuse, part="head" if path in ("pooled", "head") else "full")

    #: Whether :meth:`row_masks` gives each image its own masks.
    per_image_masks: ClassVar[bool] = False

    def perturbed_scores(self, features, targets=None, masks=None) -> np.ndarray:
        """The target's score of every (image, mask) row, (B, N) on the host: the explain
        call's scores before :meth:`combine`, for inspecting and timing. ``features`` from
        :meth:`features`; ``masks``: this method's own (None) or any (N, ...) masks."""
        if features.split is not self.split:
            raise ValueError("features must come from an explainer on this model and layer")
        target = T.resolve(targets, features.count, self.split)
        params = self.target_params(target, features.scores, features.count)
        return B.numpy(self.score_all(features.images, features.activation, features.bypass,
                                      target, params, masks))

    def score_all(self, images, activation, bypass, target, params, masks=None):
        """(B, N) scores of every row on the device; ``masks``: NumPy masks (N, ...) instead
        of :meth:`row_masks`."""
        if masks is None:
            device, per_image = self.row_masks(images, activation)
            source = images if self.APPLIES_TO == "input" else activation
            host = None if per_image else self.device_masks(ops.shape(source)[1:])[0]
        else:
            host, per_image = checked_masks(masks), False
            device = B.tensor(host)
        path, count, kind = self.path, ops.shape(activation)[0], self.pooled_kind(host)
        n = ops.shape(device)[0] // (count if per_image else 1)
        args = self.perturb_args(images, activation)
        source = images if path in ("full", "input") else activation
        if kind is not None:
            source = ops.mean(activation, axis=(1, 2))
            if kind == "cell":
                device = P.cell_shifts(activation, device, *args)
            elif kind == "dense":  # each mask's channel; p W + b once per image
                device = self.mask_channels(host)
                args = (*args, self.pooled_head.dense_outputs(source))
        PATHS[path] += 1
        return score_rows(self.scoring_function(target, kind), count, n, self.batch_size,
                          source, list(bypass), device, args, params, desc=self.name)

    def raw_maps(self, images, activation, bypass, target, params, scores):
        return self.raw_maps_and_sensitivity(images, activation, bypass, target, params,
                                             scores)[0]

    def raw_maps_and_sensitivity(self, images, activation, bypass, target, params, scores):
        """The maps and, for masks of the layer's activation, each image's largest score
        drop |y - y_perturbed| beyond float32 rounding of y (0: no perturbation of the
        layer moves the score); None for masks of the input."""
        if type(self).raw_maps is not PerturbationExplainer.raw_maps:  # a method's own raw_maps says nothing
            return super().raw_maps_and_sensitivity(images, activation, bypass, target,
                                                    params, scores)
        masks, _ = self.row_masks(images, activation)
        perturbed = self.score_all(images, activation, bypass, target, params)
        maps = self.combine(activation, scores, perturbed, masks)
        if self.APPLIES_TO == "input":
            return maps, None
        drops = ops.abs(ops.expand_dims(scores, 1) - perturbed)
        rounding = ROUNDING * ops.abs(ops.expand_dims(scores, 1))
        return maps, ops.max(ops.where(drops <= rounding, 0.0, drops), axis=1)


class AblationExplainer(PerturbationExplainer):
    """Template of the ablation methods: masks of the layer's activation set to
    ``ablation_value``. Boolean masks set their True cells and leave the others exactly as
    they are; float masks give the fraction of each cell ablated, m in [0, 1]: the activation
    becomes A (1 - m) + ablation_value m (ReciproCAM's Gaussian keep weights)."""

    ABLATES = True

    def __init__(self, model, layer=None, score="logit", batch_size=None, ablation_value=0.0,
                 mode="head", reshape=None, fuse=None):
        value = float(ablation_value)
        if not np.isfinite(value):
            raise ValueError(f"ablation_value must be finite, got {ablation_value!r}")
        self.ablation_value = value
        super().__init__(model, layer, score, mode, reshape, batch_size, fuse)

    def perturb_args(self, images, activation) -> tuple:
        return (B.tensor(np.float32(self.ablation_value)),)

    @staticmethod
    def perturb(rows, masks, value):
        value = ops.cast(value, rows.dtype)
        if keras.backend.standardize_dtype(masks.dtype) == "bool":
            return ops.where(masks, value, rows)  # exact: ablated cells set, the rest untouched
        masks = ops.cast(masks, rows.dtype)
        return rows * (1 - masks) + value * masks


def checked_masks(masks) -> np.ndarray:
    """Boolean masks as they are; float masks checked to lie in [0, 1], as float32."""
    masks = np.asarray(masks)
    if masks.dtype != bool:
        if not np.issubdtype(masks.dtype, np.floating):
            raise TypeError(f"masks must be boolean or float, got dtype {masks.dtype}")
        if not ((masks >= 0) & (masks <= 1)).all():  # also refuses NaN
            raise ValueError("float masks are the fraction of each cell perturbed and must lie "
                             "in [0, 1]")
        masks = masks.astype(np.float32, copy=False)
    return masks


def _light_head(split) -> bool:
    """Whether the head after the layer has no convolution or attention layer (pooling,
    dense, normalisation, activations): where XLA's fusing pays on the CPU."""
    heavy = ("Conv", "Attention")
    return not any(word in type(call.operation).__name__ for call in split.head_calls
                   for word in heavy)


def _score(split, pooled_head, path, perturb, per_image, target, source, bypass, masks, args,
           params, index):
    # source (k, ...) per image: images, activations or pooled vectors; masks (N, ...) shared
    # or (k N, ...) per image; index (R,): this call's rows. Returns the (R,) target scores.
    count = ops.shape(source)[0]
    n = ops.shape(masks)[0] // count if per_image else ops.shape(masks)[0]
    image = ops.minimum(index // n, count - 1)
    mask = ops.take(masks, ops.minimum(index, count * n - 1) if per_image else index % n,
                    axis=0)
    if perturb is P.dense_moved:  # the pooled path, a Dense layer's output moved
        value, dense_outputs = args
        moved = perturb(source, dense_outputs, image, mask, value,
                        pooled_head.dense.operation.kernel)
        outputs = pooled_head.scores(moved, [ops.take(b, image, axis=0) for b in bypass],
                                     after_dense=True)
        return target.score(outputs, per_row(params, image))
    rows = ops.take(source, image, axis=0)
    if path == "input":
        outputs = split.full(perturb(rows, mask, *args))
    elif path == "full":
        outputs = split.full(rows, replace=lambda t: perturb(t, mask, *args))
    else:
        rows_bypass = [ops.take(b, image, axis=0) for b in bypass]
        moved = perturb(rows, mask, *args)
        outputs = pooled_head.scores(moved, rows_bypass) if path == "pooled" else \
            split.head(moved, rows_bypass)
    return target.score(outputs, per_row(params, image))
