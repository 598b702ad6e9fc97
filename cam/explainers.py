"""The explainer template: what every CAM method shares.

Every explainer is called the same way::

    explainer = cam.FastAblationCAM(model, layer="relu")
    maps = explainer(images, targets=None, upsample=True, normalize=True)
    result = explainer.explain(images)  # an Explanation: maps, raw maps, targets, scores

A method is a short class in :mod:`cam.methods` on one of two templates, registered once in
``cam.METHODS`` (which the command line, the explorer, :func:`cam.explain` and ``cam.__all__``
read):

* :class:`cam.gradient.GradientExplainer`: implement ``channel_weights``, which turns the
  target activation A and the gradient dy/dA into weights; the map is sum_k w_k A_k.
* :class:`cam.perturbation.PerturbationExplainer`: say what is perturbed (``masks``, applied
  to the layer's activation or to the input pixels) and how the perturbed scores combine
  into a map (``combine``); the engine does the rest.

A method describes itself: :attr:`Explainer.SETTINGS` lists its tunable settings
(:class:`Setting`), :attr:`Explainer.evaluations_per_image` its cost per image, and
:attr:`Explainer.whole_network` whether each evaluation runs the whole model.

The model is split once at the target layer (:class:`cam.graph.Split`, shared through
:mod:`cam.cache`). The trunk runs once per image in :meth:`Explainer.forward`; the method's
:meth:`Explainer.raw_maps` runs from there. ``mode="full"`` reruns the whole network instead
and is kept as the oracle the tests compare against and the baseline the benchmark measures.

Token layers (batch, tokens, C) of a Vision Transformer are explained on their patch grid
(``reshape=None`` finds a square grid, after a class token if there is one; pass
``reshape=n`` for n special tokens before a square grid, ``reshape=(h, w)`` or a
:class:`cam.TokenGrid` for other layouts).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import keras
import numpy as np
from keras import ops

from . import backend as B
from . import batching
from . import cache
from . import maps as M
from . import targets as T
from .checks import check_int
from .graph import Split

MODES = ("head", "full")
#: What ``normalize`` takes: True is "max".
NORMALIZE = (True, False, "max", "minmax")


def check_batch_size(batch_size) -> int | None:
    """None (the memory budget decides, :mod:`cam.batching`) or an int >= 1."""
    return check_int("batch_size", batch_size, allow_none=True,
                     none="chosen from the memory budget")


@dataclass(frozen=True)
class Setting:
    """One tunable setting of a method, as its constructor takes it: what the explorer and
    the command line offer. ``low``/``high`` bound an int (``high`` None: bounded only by
    the layer, which the constructor checks)."""

    name: str
    kind: type
    default: Any
    doc: str
    low: int | None = None
    high: int | None = None


def chunked(fn, rows: int, *tensors):
    """``fn`` on ``tensors`` (n, ...) in calls of ``rows`` rows, the last padded by repeating
    its last row (one shape, one trace), the outputs (a tensor or a tuple of them) joined on
    the device and cut back to n rows."""
    n = ops.shape(tensors[0])[0]
    outs = []
    for start in range(0, n, rows):
        outs.append(fn(*(B.pad_rows(t[start:start + rows], rows) for t in tensors)))
    if isinstance(outs[0], (tuple, list)):
        return tuple(_join([o[i] for o in outs], n) for i in range(len(outs[0])))
    return _join(outs, n)


def _join(parts, n):
    if isinstance(parts[0], (tuple, list)):  # a list of tensors (the bypass)
        return [_join([p[i] for p in parts], n) for i in range(len(parts[0]))]
    joined = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0)
    return joined if ops.shape(joined)[0] == n else joined[:n]


def per_row(params, image):
    """Each row's image's parameters: ``params`` gathered by the rows' image numbers."""
    return keras.tree.map_structure(lambda p: ops.take(p, image, axis=0), params)


class Explainer:
    """Shared machinery: the split, input checks, targets, batching, normalising, upsampling."""

    name = "explainer"
    #: The method's tunable settings (constructor keywords besides model, layer, score, mode,
    #: reshape and batch_size), for the explorer and the command line.
    SETTINGS: ClassVar[tuple[Setting, ...]] = ()

    def __init__(self, model: keras.Model, layer: str | int | None = None, score: str = "logit",
                 mode: str = "head", reshape=None):
        B.name()  # a clear error on a backend cam does not run on
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model
        # reshape: how a token layer (batch, tokens, C) lays out on its grid (cam.TokenGrid)
        self._shared = cache.shared(model, layer, score, reshape)
        self.split = self._shared.split
        # A layer only a call reaches has no head (cam.intercept): "head" means head-only
        # where the model allows it, so every evaluation runs the whole model there.
        self.mode = mode if self.split.head_only else "full"
        self.layer = self.split.layer
        self.score = score
        # Compiled once per model and layer (cam.backend: tf.function, jax.jit or torch.no_grad)
        # and shared by every explainer there.
        if self.split.head_only:
            self._trunk = self.shared_compiled("trunk", lambda: self.split.trunk, part="trunk")
        else:  # a layer only a call reaches: one pass gives its output and the model's scores
            self._trunk = self.shared_compiled("trunk and outputs",
                                               lambda: self.split.trunk_and_outputs)
        self._head = self.shared_compiled("head", lambda: self.split.head, part="head")
        self._full = self.shared_compiled("full", lambda: self.split.full)

    def shared_compiled(self, key, make_fn, gradient: bool = False, fuse: bool = False,
                        part: str = "full") -> B.Compiled:
        """The compiled ``make_fn()`` that every explainer on this model and layer shares under
        ``key`` (:meth:`cam.cache.Shared.compiled`); ``make_fn`` must depend only on the split
        and on what ``key`` names, and read only the variables of ``part`` (``"trunk"``,
        ``"head"`` or ``"full"``)."""
        return self._shared.compiled(key, make_fn, part, gradient, fuse)

    def rows_per_call(self, part: str, backward: bool = False) -> int:
        """Rows (images or perturbed copies) one compiled call of ``part`` takes under the
        memory budget (:mod:`cam.batching`); ``backward`` for a call that also runs a
        backward pass (which keeps the forward's tensors)."""
        return batching.rows_per_call(self.split.bytes_per_row(part, backward))

    def __repr__(self) -> str:
        settings = "".join(f", {k}={v!r}" for k, v in self.settings.items())
        return (f"{type(self).__name__}(model={self.model.name!r}, layer={self.layer!r}, "
                f"score={self.score!r}, mode={self.mode!r}{settings})")

    # -- what a method says about itself -----------------------------------------------------

    @property
    def settings(self) -> dict:
        """The current value of each of :attr:`SETTINGS`."""
        return {s.name: getattr(self, s.name) for s in self.SETTINGS}

    @property
    def evaluations_per_image(self) -> int:
        """Evaluations per image: passes of the head (or of the whole model, see
        :attr:`whole_network`) after the trunk. 1 for a method that needs one pass."""
        return 1

    @property
    def whole_network(self) -> bool:
        """Whether each evaluation runs the whole model (``mode="full"``, or a method that
        perturbs the input) rather than the head after the layer."""
        return self.mode == "full"

    # -- checks ------------------------------------------------------------------------

    def _check_images(self, images) -> np.ndarray:
        array = np.asarray(images)
        if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating)
                                       or np.issubdtype(array.dtype, np.integer)):
            raise TypeError(f"images must be a real-valued numeric array, got dtype {array.dtype}")
        expected = tuple(self.split.input_shape)
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
        targets : None, int, sequence of B ints, a cam.targets target or a callable
            What to explain per image: None, each image's predicted class; an int or B ints,
            a class; a :mod:`cam.targets` target (``Class``, ``MultiLabel``, ``Regression``,
            ``Region``, ``Output``), a list of B of them of one kind, or a callable
            ``score(outputs) -> (N,)`` in ``keras.ops`` on the model's batched outputs.
        upsample : bool
            True returns (B, H, W) maps resized bilinearly with pixel-centre alignment
            (OpenCV's half-pixel convention: each cell's value sits at the centre of the image
            region it covers); False returns (B, h, w) maps on the target layer's grid.
        normalize : bool or str
            True (or ``"max"``) applies ReLU (or ``threshold``) and divides each map by its
            maximum (an all-zero map stays zeros). ``"minmax"`` is pytorch-grad-cam's
            convention: ReLU, then (m - min m) / (max m - min m + 1e-7) per map, so each map's
            lowest value becomes 0 even where ReLU left it positive. False returns the raw map: the weighted channel sum
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
                threshold=0.0, features: "Features | None" = None) -> "Explanation":
        """The maps (as :meth:`__call__` returns them) together with the raw maps on the layer's
        grid, the class explained per image and the model's scores: an :class:`Explanation`.

        ``features``: the trunk pass of these ``images`` from :meth:`features` of any
        head-mode explainer on the same model, layer and score, so that several methods
        share one trunk pass::

            features = gradcam.features(images)
            for explainer in (gradcam, ablationcam, fastablationcam):
                explainer.explain(images, features=features)
        """
        images = self._check_images(images)
        if not (isinstance(normalize, (bool, np.bool_)) or normalize in NORMALIZE[2:]):
            raise ValueError(f"normalize must be True, False, 'max' or 'minmax', got "
                             f"{normalize!r}")
        target = T.resolve(targets, len(images), self.split)
        if features is None:
            features = self.features(images)
        else:
            self._check_features(features, images)
        x, activation, bypass, outputs = (features.images, features.activation,
                                          list(features.bypass), features.scores)
        params = self.target_params(target, outputs, len(images))
        scores = target.score(outputs, params)
        raw, sensitivity = self.raw_maps_and_sensitivity(x, activation, bypass, target,
                                                         params, scores)
        # Everything stays on the device until here: one copy to the host per call.
        flat_outputs = keras.tree.flatten(outputs)
        classes = params["k"] if isinstance(target, T.Class) else ops.zeros((0,), "int32")
        known = [] if sensitivity is None else [sensitivity]
        raw, scores, classes, *rest = B.to_host(raw, scores, classes, *known, *flat_outputs)
        known, flat_outputs = rest[:len(known)], rest[len(known):]
        outputs = keras.tree.pack_sequence_as(features.scores, flat_outputs)
        if self.split.num_classes is not None:
            self._check_logits(outputs)
        if known:
            self._warn_insensitive(known[0])
        raw = raw.astype(np.float32, copy=False)
        if normalize == "minmax":
            out = M.minmax_maps(raw, threshold)
        else:
            out = M.normalize_maps(raw, threshold) if normalize else raw
        maps = M.upsample_maps(out, images.shape[1:3]) if upsample else out
        return Explanation(maps=maps, raw=raw,
                           targets=classes if isinstance(target, T.Class) else None,
                           scores=outputs, method=self.name, layer=self.layer,
                           target=target, target_scores=scores)

    def target_params(self, target, outputs, count: int) -> dict:
        """``target``'s parameters for ``count`` images, as tensors on the device (the
        predicted class read from the model's ``outputs``)."""
        if isinstance(target, T.Predicted):
            return {"k": ops.cast(ops.argmax(outputs, axis=1), "int32")}
        return keras.tree.map_structure(B.tensor, target.params(count))

    def features(self, images) -> "Features":
        """The trunk pass of a batch of images, kept on the device: what :meth:`explain` starts
        from, and what several explainers at one layer can share (``explain(features=...)``)."""
        images = self._check_images(images)
        x = B.tensor(images)
        return Features(x, *self.forward(x), split=self.split, mode=self.mode)

    def _check_features(self, features: "Features", images: np.ndarray) -> None:
        if not isinstance(features, Features):
            raise TypeError(f"features must come from explainer.features(images), got "
                            f"{type(features).__name__}")
        if features.split is not self.split or features.mode != self.mode:
            raise ValueError(f"features were computed at layer {features.split.layer!r} "
                             f"({features.split.score}, mode {features.mode!r}); this "
                             f"{type(self).__name__} explains {self.layer!r} ({self.score}, mode "
                             f"{self.mode!r}) of {self.model.name!r}: compute them with an "
                             f"explainer on the same model, layer, score and mode")
        if features.count != len(images):
            raise ValueError(f"features are of {features.count} images, got {len(images)}")

    def forward(self, images) -> tuple:
        """The trunk on a batch of images (a backend tensor), in calls that fit the memory
        budget: (target activation, bypass tensors, model scores), all on the device. In
        full mode the scores come from the whole network (the oracle shares nothing with the
        split but the target activation). For a layer only a call reaches, one pass of the
        whole model gives both the activation and the scores."""
        rows = min(self.rows_per_call("trunk"), ops.shape(images)[0])
        if not self.split.head_only:  # InterceptedSplit: no bypass, the scores come along
            activation, scores = chunked(self._trunk, rows, images)
            return activation, [], scores
        activation, bypass = chunked(self._trunk, rows, images)
        if self.mode == "full":
            scores = chunked(self._full, min(self.rows_per_call("full"), rows), images)
        else:
            scores = chunked(lambda a, *b: self._head(a, list(b)), rows, activation, *bypass)
        return activation, list(bypass), scores

    def raw_maps_and_sensitivity(self, images, activation, bypass, target, params, scores):
        """(:meth:`raw_maps`, sensitivity): with the maps, a tensor (B,) saying how much each
        image's target score moves with the layer's cells (the templates: the largest
        |dy/dA|, or the largest score drop beyond float32 rounding), exactly 0 where it does
        not move at all (:class:`ZeroMapWarning`); None where the method does not say."""
        return self.raw_maps(images, activation, bypass, target, params, scores), None

    def _warn_insensitive(self, sensitivity: np.ndarray) -> None:
        """Warn when some images' target score does not depend on the layer's cells."""
        blind = np.flatnonzero(sensitivity == 0)
        if len(blind):
            warnings.warn(ZeroMapWarning(
                f"{self.name} at layer {self.layer!r}: the target's score does not depend on "
                f"the layer's cells for image(s) {blind[:10].tolist()}"
                f"{' ...' if len(blind) > 10 else ''} (every gradient is exactly zero, or no "
                f"perturbation moves the score), so their maps carry no evidence. Explain an "
                f"earlier layer or block; a classifier that reads only its class token (token "
                f"pooling) is blind to the patch tokens after its last attention, so explain a "
                f"layer before it or pool the tokens by average."), stacklevel=3)

    def raw_maps(self, images, activation, bypass, target, params, scores):
        """The method: (B, h, w) raw maps for a batch, given the ``images``, the trunk's target
        ``activation`` (B, h, w, C) and ``bypass`` tensors, the ``target``
        (:class:`cam.targets.Target`) with its per-image ``params`` and the target's scores
        (B,), all backend tensors on the device; returns a tensor there. The templates below
        implement it; a new kind of method overrides it."""
        raise NotImplementedError


class ZeroMapWarning(UserWarning):
    """The target's score does not depend on the explained layer's cells for some images, so
    their maps are zero (or flat) and carry no evidence."""


@dataclass(frozen=True)
class Features:
    """One trunk pass of a batch of images (:meth:`Explainer.features`), on the device:
    the images, the target activation (B, h, w, C), the bypass tensors and the model's
    scores (B, classes), with the split and mode they belong to."""

    images: object
    activation: object
    bypass: list
    scores: object
    split: Split = field(repr=False)
    mode: str = "head"

    @property
    def count(self) -> int:
        return int(ops.shape(self.images)[0])


@dataclass(frozen=True)
class Explanation:
    """What one :meth:`Explainer.explain` call computed.

    ``maps``: as requested (normalised and/or upsampled); ``raw``: (B, h, w) before ReLU and
    normalisation, on the layer's grid; ``targets``: (B,) the class explained per image
    (None for a target that is not a class); ``scores``: the model's outputs, (B, classes) for
    a classifier (logits or probabilities, per ``score``), a list for a multi-output model;
    ``target``: what was explained (:mod:`cam.targets`) and ``target_scores`` (B,) its value
    per image.
    """

    maps: np.ndarray
    raw: np.ndarray
    targets: np.ndarray
    scores: np.ndarray
    method: str
    layer: str
    target: object = None
    target_scores: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        """(B,) the class with the highest score per image."""
        return self.scores.argmax(axis=1)


