"""The explainer template: what every CAM method shares, and the two kinds of method.

Every explainer is called the same way::

    explainer = cam.FastAblationCAM(model, layer="relu")
    maps = explainer(images, targets=None, upsample=True, normalize=True)
    result = explainer.explain(images)  # an Explanation: maps, raw maps, targets, scores

A method is a short class in :mod:`cam.methods` on one of two templates, registered once in
``cam.METHODS`` (which the command line, :func:`explain` and ``cam.__all__`` read):

* :class:`GradientExplainer`: implement :meth:`~GradientExplainer.channel_weights`, which turns
  the target activation A and the gradient dy/dA into weights; the map is sum_k w_k A_k.
* :class:`AblationExplainer`: implement :meth:`~AblationExplainer.masks` (which cells or
  channels each ablation sets to ``ablation_value``, or with float masks how much of each
  cell) and :meth:`~AblationExplainer.combine` (how the ablated scores become a map).

The model is split once at the target layer (:class:`cam.graph.Split`). The trunk runs once
per image; Grad-CAM back-propagates through the head only, and the ablation methods push
fixed-size batches of ablated activations through the head only, in one compiled function,
with the tensors that bypass the target (DenseNet concatenations, ResNet shortcuts) broadcast
across the batch. ``mode="full"`` reruns the whole network instead and is kept as the oracle
the tests compare against and the baseline the benchmark measures.

Token layers (batch, tokens, C) of a Vision Transformer are explained on their patch grid
(``reshape=None`` finds a square grid, after a class token if there is one; pass
``reshape=(h, w)`` or a :class:`cam.graph.TokenGrid` for other layouts).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from . import backend as B
from . import maps as M
from .graph import Split

MODES = ("head", "full")
#: Ablated copies per compiled call by default (batch_size=None); where TensorFlow compiles
#: a light head with XLA, up to FUSED_BATCH copies of at most FUSED_BYTES in all.
BATCH, FUSED_BATCH, FUSED_BYTES = 64, 2048, 2**30
#: Images pushed through the trunk at once (bounded to keep the trunk's memory small).
TRUNK_BATCH = 16

#: model -> {(layer, score, reshape): _Shared}: explainers on the same model and layer share
#: one split and its compiled functions, so a second explainer (another method, another
#: window) does not trace or compile the network again (seconds for DenseNet-169).
_SHARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Shared:
    """A split and the compiled functions that depend only on it (and on the model's
    weights, which every backend reads at call time)."""

    def __init__(self, model, layer, score, reshape):
        self.split = Split(model, layer, score, reshape)
        self.variables = model.variables
        self.functions: dict = {}

    def get(self, key, build):
        if key not in self.functions:
            self.functions[key] = build()
        return self.functions[key]


def _shared(model, layer, score, reshape) -> _Shared:
    key = (layer, score, repr(reshape))
    per_model = _SHARED.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _Shared(model, layer, score, reshape)
    return per_model[key]


class Explainer:
    """Shared machinery: the split, input checks, targets, batching, normalising, upsampling."""

    name = "explainer"

    def __init__(self, model: keras.Model, layer: str | int | None = None, score: str = "logit",
                 mode: str = "head", reshape=None):
        B.name()  # a clear error on a backend cam does not run on
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        # reshape: how a token layer (batch, tokens, C) lays out on its grid (cam.TokenGrid)
        self._shared = _shared(model, layer, score, reshape)
        self.split = self._shared.split
        self.layer = self.split.layer
        self.score = score
        # Compiled once per model and layer (cam.backend: tf.function, jax.jit or torch.no_grad)
        # and shared by every explainer there.
        self._trunk = self.shared_compiled("trunk", lambda: self.split.trunk)
        self._head = self.shared_compiled("head", lambda: self.split.head)
        self._full = self.shared_compiled("full", lambda: self.split.full)
        self.last_targets: np.ndarray | None = None
        self.last_scores: np.ndarray | None = None

    def compiled(self, fn) -> B.Compiled:
        """``fn`` compiled for the backend, reading this explainer's model weights."""
        return B.compiled(fn, self.model.variables)

    def shared_compiled(self, key, make_fn, gradient: bool = False,
                        fuse: bool = False) -> B.Compiled:
        """The compiled ``make_fn()`` that every explainer on this model and layer shares under
        ``key``; ``make_fn`` must depend only on the split and on what ``key`` names.
        ``fuse``: compile with XLA on TensorFlow too (see :func:`cam.backend.compiled`)."""
        variables = self._shared.variables
        if gradient:
            return self._shared.get(key, lambda: B.gradient(make_fn(), variables))
        return self._shared.get((key, fuse), lambda: B.compiled(make_fn(), variables, fuse))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model.name!r}, layer={self.layer!r}, "
                f"score={self.score!r}, mode={self.mode!r})")

    # -- checks ------------------------------------------------------------------------

    def _check_images(self, images) -> np.ndarray:
        array = np.asarray(images)
        if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating)
                                       or np.issubdtype(array.dtype, np.integer)):
            raise TypeError(f"images must be a real-valued numeric array, got dtype {array.dtype}")
        expected = tuple(self.split.graph.input_specs[0].shape)
        if array.ndim != len(expected):
            raise ValueError(f"images must have shape {('B',) + expected[1:]} (a batch of images, "
                             f"rank {len(expected)}), got an array of shape {array.shape}; "
                             f"for one image use images[None]")
        for got, want in zip(array.shape[1:], expected[1:]):
            if want is not None and got != want:
                raise ValueError(f"images must have shape {('B',) + expected[1:]} to fit the model's "
                                 f"input, got {array.shape}")
        if len(array) == 0:
            raise ValueError("images is an empty batch")
        return array.astype(np.float32, copy=False)

    def _check_targets(self, targets, scores: np.ndarray) -> np.ndarray:
        n, num_classes = scores.shape
        if targets is None:
            return scores.argmax(axis=1)
        array = np.asarray(targets)
        if array.ndim == 0:
            array = np.full(n, array)
        if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"targets must be None, an int, or {n} ints (one per image); "
                             f"got {targets!r}")
        bad = array[(array < 0) | (array >= num_classes)]
        if bad.size:
            raise ValueError(f"target {int(bad[0])} is out of range: the model has "
                             f"{num_classes} classes, valid targets are 0..{num_classes - 1}")
        return array.astype(np.int64)

    def _check_logits(self, scores: np.ndarray) -> None:
        """Refuse to call probabilities logits: if the softmax is hidden where cam cannot see
        it (a subclassed head, a custom op), score='logit' would silently explain probabilities."""
        if self.score == "logit" and scores.shape[1] > 1 and (scores >= 0).all() \
                and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError(
                "score='logit', but the model's outputs are non-negative and sum to 1 like "
                "probabilities, and cam found no softmax layer or activation to remove. Pass "
                "score='probability', or give the model a Dense(..., activation='softmax') or "
                "Softmax layer as its last layer so the logits can be reached."
            )

    # -- the call --------------------------------------------------------------------------

    def __call__(self, images, targets=None, upsample: bool = True,
                 normalize: bool = True, threshold=0.0) -> np.ndarray:
        """Class activation maps for a batch of images: ``self.explain(...).maps``.

        Parameters
        ----------
        images : array (B, H, W, C)
            Already preprocessed the way the model expects; C = 1 for a grayscale model.
        targets : None, int or sequence of B ints
            Class to explain per image; None explains each image's predicted class.
        upsample : bool
            True returns (B, H, W) maps resized bilinearly with pixel-centre alignment
            (OpenCV's half-pixel convention: each cell's value sits at the centre of the image
            region it covers); False returns (B, h, w) maps on the target layer's grid.
        normalize : bool
            True applies ReLU (or ``threshold``) and divides each map by its maximum (an
            all-zero map stays zeros). False returns the raw map: the weighted channel sum
            before ReLU for Grad-CAM and Ablation-CAM, the score drop y - y_ablated per cell for
            FastAblationCAM.
        threshold : float, str or cam.maps.Quantile
            With ``normalize``, the level that replaces ReLU's 0: values at or below it become
            0 and the rest are scaled to (0, 1]. A float is an absolute level on the raw map;
            ``"q0.5"`` or ``Quantile(0.5)`` is that quantile of each map's own values
            (see :func:`cam.maps.normalize_maps`).

        Returns
        -------
        float32 numpy array, (B, H, W) or (B, h, w).
        """
        return self.explain(images, targets, upsample, normalize, threshold).maps

    def explain(self, images, targets=None, upsample: bool = True, normalize: bool = True,
                threshold=0.0) -> "Explanation":
        """The maps (as :meth:`__call__` returns them) together with the raw maps on the layer's
        grid, the class explained per image and the model's scores: an :class:`Explanation`."""
        images = self._check_images(images)
        if isinstance(targets, np.ndarray) and targets.ndim == 0:
            targets = targets.item()
        if not isinstance(targets, (type(None), int, np.integer)):
            targets = np.asarray(targets)
            if targets.ndim != 1 or len(targets) != len(images):
                got = f"{len(targets)} values" if targets.ndim == 1 else f"{targets!r}"
                raise ValueError(f"targets must be None, an int, or {len(images)} ints (one per "
                                 f"image); got {got}")
        chunks, all_targets, all_scores = [], [], []
        for start in range(0, len(images), TRUNK_BATCH):
            batch = images[start:start + TRUNK_BATCH]
            activation, bypass = self._trunk(B.tensor(batch))
            # In full mode even the unablated scores come from the whole network (the oracle
            # shares nothing with the split but the target activation).
            scores = B.numpy(self._full(B.tensor(batch)) if self.mode == "full"
                             else self._head(activation, bypass))
            if start == 0:
                self._check_logits(scores)
            chunk_targets = targets if targets is None or np.ndim(targets) == 0 \
                else targets[start:start + TRUNK_BATCH]
            chunk_targets = self._check_targets(chunk_targets, scores)
            chunks.append(self.raw_maps(batch, activation, bypass, chunk_targets,
                                        scores[np.arange(len(batch)), chunk_targets]))
            all_targets.append(chunk_targets)
            all_scores.append(scores)
        raw = np.concatenate(chunks).astype(np.float32)
        out = M.normalize_maps(raw, threshold) if normalize else raw
        maps = M.upsample_maps(out, images.shape[1:3]) if upsample else out
        return Explanation(maps=maps, raw=raw, targets=np.concatenate(all_targets),
                           scores=np.concatenate(all_scores), method=self.name, layer=self.layer)

    def raw_maps(self, images, activation, bypass, targets, scores) -> np.ndarray:
        """The method: (B, h, w) raw maps for a batch, given the trunk's target ``activation``
        (B, h, w, C) and ``bypass`` tensors, the ``targets`` (B,) and their scores (B,).
        The two templates below implement it; a new kind of method overrides it."""
        raise NotImplementedError


@dataclass(frozen=True)
class Explanation:
    """What one :meth:`Explainer.explain` call computed.

    ``maps``: as requested (normalised and/or upsampled); ``raw``: (B, h, w) before ReLU and
    normalisation, on the layer's grid; ``targets``: (B,) the class explained per image;
    ``scores``: (B, classes) the model's scores (logits or probabilities, per ``score``).
    """

    maps: np.ndarray
    raw: np.ndarray
    targets: np.ndarray
    scores: np.ndarray
    method: str
    layer: str

    @property
    def predicted(self) -> np.ndarray:
        """(B,) the class with the highest score per image."""
        return self.scores.argmax(axis=1)


class GradientExplainer(Explainer):
    """Template of the gradient methods: one backward pass per image batch, through the head
    only (``mode="head"``) or the whole network (``mode="full"``).

    A method implements :meth:`channel_weights`; the map is sum_k w_k A_k over the channels.
    """

    def __init__(self, model, layer=None, score="logit", mode="head", reshape=None):
        super().__init__(model, layer, score, mode, reshape)
        # shared by every gradient method on this model, layer and mode: they differ only in
        # what they make of the gradient
        split = self.split
        self._gradients = self.shared_compiled(
            ("gradients", mode), lambda: (lambda *a: _head_scores(split, *a)) if mode == "head"
            else (lambda *a: _full_scores(split, *a)), gradient=True)

    def channel_weights(self, activation: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        """The hook: weights from the target activation A (B, h, w, C) and the gradient of
        each image's class score dy/dA (same shape). Return (B, C) channel weights, or
        (B, h, w, C) for a weight per cell and channel."""
        raise NotImplementedError

    def raw_maps(self, images, activation, bypass, targets, scores):
        start = activation if self.mode == "head" else ops.zeros_like(activation)
        watched, grads = self._gradients(start, bypass, B.tensor(images),
                                         B.tensor(targets, "int32"))
        watched = B.numpy(watched)
        return M.weighted_channel_sum(watched, self.channel_weights(watched, B.numpy(grads)))


def _head_scores(split, activation, bypass, images, targets):
    # the gradient is taken with respect to the first argument, the target activation
    return B.take_targets(split.head(activation, bypass), targets), activation


def _full_scores(split, delta, bypass, images, targets):
    # the whole network, with a zero ``delta`` added to the target activation: the gradient
    # with respect to it is the gradient with respect to the activation
    seen = []

    def add(t):
        seen.append(t)
        return t + delta

    scores = split.full(images, replace=add)
    return B.take_targets(scores, targets), seen[0]


class AblationExplainer(Explainer):
    """Template of the ablation methods: fixed-size batches of ablated activations scored
    through the head only (``mode="head"``) or the whole network (``mode="full"``), in one
    compiled function.

    A method implements :meth:`masks` (what each ablation sets to ``ablation_value``) and
    :meth:`combine` (how the ablated scores become a map).

    ``batch_size``: ablated copies scored per compiled call (several images' copies share a
    call when they fit). None (the default) chooses up to :data:`FUSED_BATCH` copies (at
    most :data:`FUSED_BYTES` of them) where TensorFlow compiles a light head with XLA in head
    mode (every ablation of a DenseNet-169 image in one call), else :data:`BATCH`.

    ``fuse``: compile the head-only scoring with XLA on TensorFlow, which compiles the
    masking and the head into fused kernels (JAX always compiles with XLA; PyTorch runs
    eagerly). None (the default) fuses when the head has no convolution or attention layer,
    where XLA on the CPU is faster (Ablation-CAM at DenseNet-169's last layer: about 36% less
    time scoring its 1664 ablations at 64 a call) but is slower and compiles for seconds
    longer on convolutions; True or False decides.
    """

    def __init__(self, model, layer=None, score="logit", batch_size=None, ablation_value=0.0,
                 mode="head", reshape=None, fuse=None):
        super().__init__(model, layer, score, mode, reshape)
        if batch_size is not None and (
                isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                or batch_size < 1):
            raise ValueError(f"batch_size must be None (chosen from the head) or an int >= 1, "
                             f"got {batch_size!r}")
        value = float(ablation_value)
        if not np.isfinite(value):
            raise ValueError(f"ablation_value must be finite, got {ablation_value!r}")
        self.ablation_value = value
        if fuse is not None and not isinstance(fuse, (bool, np.bool_)):
            raise ValueError(f"fuse must be None (decide from the head's layers), True or "
                             f"False, got {fuse!r}")
        self.fuse = _light_head(self.split) if fuse is None else bool(fuse)
        if batch_size is None:
            batch_size = BATCH
            grid = self.split.target_shape
            if self.fuse and mode == "head" and B.name() == "tensorflow" \
                    and all(d is not None for d in grid):
                # XLA runs a light head faster in fewer, larger calls (Ablation-CAM at
                # DenseNet-169's relu: 2.35x a forward pass at 64 rows, 1.96x at 2048); the
                # ablated copies are still written (about 600 MB there), so at most
                # FUSED_BYTES of them. On JAX, also XLA, larger batches were slower (2.15x
                # at 64 rows, 3.26x at 2048).
                per_copy = 4 * int(np.prod(grid))
                batch_size = int(np.clip(FUSED_BYTES // per_copy, BATCH, FUSED_BATCH))
        self.batch_size = int(batch_size)
        # shared by every ablation method on this model and layer with this ablation value
        split, value = self.split, self.ablation_value
        self._score_head = self.shared_compiled(
            ("score_head", value), lambda: lambda *a: _score_head(split, value, *a),
            fuse=self.fuse)
        self._score_images = self.shared_compiled(
            ("score_images", value), lambda: lambda *a: _score_images(split, value, *a),
            fuse=self.fuse)
        self._score_full = self.shared_compiled(
            ("score_full", value), lambda: lambda *a: _score_full(split, value, *a))

    def masks(self, grid_shape: tuple) -> np.ndarray:
        """The hook: masks (N, h|1, w|1, C|1), one per ablation, broadcastable against the
        target's (h, w, C) grid.

        Boolean masks set their True cells to ``ablation_value`` and leave the others exactly
        as they are. Float masks give the fraction of each cell that is ablated, m in [0, 1]:
        the activation becomes A (1 - m) + ablation_value m, so m = 1 is a True cell, m = 0 a
        False one, and with ``ablation_value=0`` the activation is scaled by the keep weight
        1 - m (ReciproCAM's Gaussian-spread masks).
        """
        raise NotImplementedError

    def combine(self, activation: np.ndarray, scores: np.ndarray, ablated: np.ndarray,
                masks: np.ndarray) -> np.ndarray:
        """The hook: (B, h, w) raw maps from the activation (B, h, w, C), the unablated
        scores y (B,), the ablated scores (B, N) and the N :meth:`masks`."""
        raise NotImplementedError

    @property
    def evaluations_per_image(self) -> int:
        """Ablated forward passes (through the head, or the whole net in full mode) per image."""
        return self.evaluations(self.split.target_shape)

    def evaluations(self, grid_shape: tuple) -> int:
        """Ablations per image for a target layer output of shape (h, w, C)."""
        if any(d is None for d in grid_shape):
            raise ValueError(f"layer {self.layer!r} has shape {grid_shape}, which depends on the "
                             f"image size; call evaluations((h, w, C)) with a known grid")
        return len(self.masks(tuple(grid_shape)))

    def mask_batches(self, masks: np.ndarray) -> list:
        """Masks cut into equal batches (the last padded with masks that ablate nothing,
        False or 0.0, so the compiled function never sees a new shape), as tensors made once
        per call. Float masks are checked to lie in [0, 1] and passed as float32."""
        masks = np.asarray(masks)
        if masks.dtype != bool:
            if not np.issubdtype(masks.dtype, np.floating):
                raise TypeError(f"masks must be boolean or float, got dtype {masks.dtype}")
            if not ((masks >= 0) & (masks <= 1)).all():  # also refuses NaN
                raise ValueError("float masks are the fraction of each cell ablated and must "
                                 "lie in [0, 1]")
            masks = masks.astype(np.float32, copy=False)
        size = min(self.batch_size, len(masks))  # no padding when one batch holds every mask
        pad = -len(masks) % size
        padded = np.concatenate([masks, np.zeros((pad,) + masks.shape[1:], masks.dtype)])
        return [B.tensor(padded[i:i + size]) for i in range(0, len(padded), size)]

    def grouped_scores(self, activation, bypass, targets, masks, group: int) -> np.ndarray:
        """Ablated scores (B, N) of a batch in head mode, ``group`` images per compiled call
        (the last group padded with copies of its last image, so the call keeps one shape)."""
        count = activation.shape[0]
        mask = self.mask_batches(masks)[0]  # one batch holds every mask
        targets = np.asarray(targets)
        out = []
        for start in range(0, count, group):
            index = np.minimum(np.arange(start, start + group), count - 1)  # pads with the last
            take = B.tensor(index, "int32")
            out.append(self._score_images(
                ops.take(activation, take, axis=0), [ops.take(b, take, axis=0) for b in bypass],
                mask, B.tensor(targets[index], "int32")))
        return B.concat_numpy(out)[:count]

    def ablated_scores(self, image, activation, bypass, target: int, masks) -> np.ndarray:
        """Class score with each mask applied, for one image: (len(masks),).

        ``masks`` is an array of masks or the output of :meth:`mask_batches`.
        """
        if isinstance(masks, np.ndarray):
            count, masks = len(masks), self.mask_batches(masks)
        else:
            count = None
        target = B.tensor(int(target), "int32")
        out = []
        for batch in masks:
            if self.mode == "head":
                out.append(self._score_head(activation, bypass, batch, target))
            else:
                out.append(self._score_full(image, batch, target))
        scores = B.concat_numpy(out)  # one device-to-host copy per image
        return scores if count is None else scores[:count]

    def images_per_call(self, masks: int) -> int:
        """Images whose ablations one compiled call scores together (head mode): as many as
        fit ``batch_size`` rows when an image has fewer masks than that, else 1."""
        return max(1, self.batch_size // masks) if self.mode == "head" else 1

    def raw_maps(self, images, activation, bypass, targets, scores):
        masks = self.masks(tuple(activation.shape[1:]))
        group = min(self.images_per_call(len(masks)), len(images))
        if group > 1:
            ablated = self.grouped_scores(activation, bypass, targets, masks, group)
            return self.combine(B.numpy(activation), scores, ablated, masks)
        batches = self.mask_batches(masks)
        ablated = []
        for i in tqdm(range(len(images)), desc=f"{self.name} ({len(masks)} ablations/image)",
                      leave=False, disable=len(images) < 2):
            ablated.append(self.ablated_scores(
                B.tensor(images[i:i + 1]), activation[i:i + 1], [b[i:i + 1] for b in bypass],
                targets[i], batches)[:len(masks)])
        return self.combine(B.numpy(activation), scores, np.stack(ablated), masks)


def _light_head(split) -> bool:
    """Whether the head after the layer has no convolution or attention layer (pooling,
    dense, normalisation, activations): where XLA's fusing pays on the CPU."""
    heavy = ("Conv", "Attention")
    return not any(word in type(call.operation).__name__ for call in split.head_calls
                   for word in heavy)


def _score_images(split, ablation_value, activation, bypass, mask, targets):
    # activation (k, ...) and bypass (k, ...) of k images; mask (N, ...) for each image's
    # grid; targets (k,). All k * N ablated copies go through the head in one call: (k, N).
    k, n = ops.shape(activation)[0], ops.shape(mask)[0]
    ablated = _ablate(ops.expand_dims(activation, 1), ops.expand_dims(mask, 0), ablation_value)
    rows = ops.reshape(ablated, (k * n, *ops.shape(activation)[1:]))
    scores = split.head(rows, [ops.repeat(b, n, axis=0) for b in bypass])
    scores = ops.reshape(scores, (k, n, ops.shape(scores)[-1]))
    index = ops.reshape(ops.cast(targets, "int32"), (k, 1, 1))
    return ops.take_along_axis(scores, index, axis=2)[..., 0]


def _ablate(activation, mask, ablation_value):
    value = ops.cast(ablation_value, activation.dtype)
    if keras.backend.standardize_dtype(mask.dtype) == "bool":
        # the exact path: ablated cells are set, the rest untouched
        return ops.where(mask, value, activation)
    # a fraction m in [0, 1] ablated: A (1 - m) + value m (m = 0 and 1 give A and value)
    mask = ops.cast(mask, activation.dtype)
    return activation * (1 - mask) + value * mask


def _score_head(split, ablation_value, activation, bypass, mask, target):
    # one image: activation (1, h, w, C) and bypass (1, ...); target a scalar: (N,)
    targets = ops.reshape(ops.cast(target, "int32"), (1,))
    return _score_images(split, ablation_value, activation, bypass, mask, targets)[0]


def _score_full(split, ablation_value, image, mask, target):
    images = B.repeat_rows(image, ops.shape(mask)[0])
    return ops.take(split.full(images, replace=lambda t: _ablate(t, mask, ablation_value)),
                    target, axis=1)


def explain(method: str, model, images, **kwargs) -> np.ndarray:
    """Shortcut: ``explain("gradcam", model, images, layer=..., targets=...)``."""
    call_args = {k: kwargs.pop(k) for k in ("targets", "upsample", "normalize", "threshold")
                 if k in kwargs}
    return method_class(method)(model, **kwargs)(images, **call_args)


def method_class(method: str) -> type:
    """The explainer class registered in ``cam.METHODS`` under ``method`` (any spelling that
    :func:`cam.method_key` accepts)."""
    from . import METHODS, method_key, methods

    return getattr(methods, METHODS[method_key(method)])
