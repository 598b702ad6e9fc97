"""The explainer template: what every CAM method shares, and the two kinds of method.

Every explainer is called the same way::

    explainer = cam.FastAblationCAM(model, layer="relu")
    maps = explainer(images, targets=None, upsample=True, normalize=True)
    result = explainer.explain(images)  # an Explanation: maps, raw maps, targets, scores

A method is a short class in :mod:`cam.methods` on one of two templates, registered once in
``cam.METHODS`` (which the command line, :func:`cam.explain` and ``cam.__all__`` read):

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
from dataclasses import dataclass, field

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from . import backend as B
from . import batching
from . import combine as C
from . import maps as M
from . import targets as T
from .graph import Split

MODES = ("head", "full")

#: model -> {(layer, score, reshape): _Shared}: explainers on the same model and layer share
#: one split and its compiled functions, so a second explainer (another method, another
#: window) does not trace or compile the network again (seconds for DenseNet-169).
_SHARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Shared:
    """A split and the compiled functions that depend only on it (and on the model's
    weights, which every backend reads at call time)."""

    def __init__(self, model, layer, score, reshape):
        self.split = Split(model, layer, score, reshape)
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


def release(model, layer=None) -> int:
    """Drop what cam keeps for ``model`` (every layer, or only ``layer``): its splits and
    compiled functions, which hold traced copies of the network (tens of MB for a large
    model). Explainers built before keep working and compile again when called. cam keeps
    nothing alive once the model is dropped, so this is for freeing memory early. Returns
    how many layers were released."""
    per_model = _SHARED.get(model, {})
    keys = [k for k in per_model if layer is None or k[0] == layer or
            per_model[k].split.layer == layer]
    for key in keys:
        del per_model[key]
    if not per_model:
        _SHARED.pop(model, None)
    return len(keys)


def _chunked(fn, rows: int, *tensors):
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
        self._trunk = self.shared_compiled("trunk", lambda: self.split.trunk, part="trunk")
        self._head = self.shared_compiled("head", lambda: self.split.head, part="head")
        self._full = self.shared_compiled("full", lambda: self.split.full)

    def compiled(self, fn, part: str = "full") -> B.Compiled:
        """``fn`` compiled for the backend, reading the variables of ``part`` of the model
        (:meth:`cam.graph.Split.variables`)."""
        return B.compiled(fn, self.split.variables(part))

    def shared_compiled(self, key, make_fn, gradient: bool = False, fuse: bool = False,
                        part: str = "full") -> B.Compiled:
        """The compiled ``make_fn()`` that every explainer on this model and layer shares under
        ``key``; ``make_fn`` must depend only on the split and on what ``key`` names, and read
        only the variables of ``part`` (``"trunk"``, ``"head"`` or ``"full"``): on JAX those
        are passed in on every call, so a head-only function passes the head's few.
        ``fuse``: compile with XLA on TensorFlow too (see :func:`cam.backend.compiled`)."""
        split = self._shared.split
        if gradient:
            return self._shared.get(key, lambda: B.gradient(make_fn(), split.variables(part)))
        return self._shared.get((key, fuse), lambda: B.compiled(make_fn(), split.variables(part),
                                                                fuse))

    def rows_per_call(self, part: str, backward: bool = False) -> int:
        """Rows (images or perturbed copies) one compiled call of ``part`` takes under the
        memory budget (:mod:`cam.batching`); ``backward`` for a call that also runs a
        backward pass (which keeps the forward's tensors)."""
        return batching.rows_per_call(self.split.bytes_per_row(part, backward))

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
        target = T.resolve(targets, len(images), self.split)
        if features is None:
            features = self.features(images)
        else:
            self._check_features(features, images)
        x, activation, bypass, outputs = (features.images, features.activation,
                                          list(features.bypass), features.scores)
        if isinstance(target, T.Predicted):
            params = {"k": ops.cast(ops.argmax(outputs, axis=1), "int32")}
        else:
            params = keras.tree.map_structure(B.tensor, target.params(len(images)))
        scores = target.score(outputs, params)
        raw = self.raw_maps(x, activation, bypass, target, params, scores)
        # Everything stays on the device until here: one copy to the host per call.
        flat_outputs = keras.tree.flatten(outputs)
        classes = params["k"] if isinstance(target, T.Class) else ops.zeros((0,), "int32")
        raw, scores, classes, *flat_outputs = B.to_host(raw, scores, classes, *flat_outputs)
        outputs = keras.tree.pack_sequence_as(features.scores, flat_outputs)
        if self.split.num_classes is not None:
            self._check_logits(outputs)
        raw = raw.astype(np.float32, copy=False)
        out = M.normalize_maps(raw, threshold) if normalize else raw
        maps = M.upsample_maps(out, images.shape[1:3]) if upsample else out
        return Explanation(maps=maps, raw=raw,
                           targets=classes if isinstance(target, T.Class) else None,
                           scores=outputs, method=self.name, layer=self.layer,
                           target=target, target_scores=scores)

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
        split but the target activation)."""
        rows = min(self.rows_per_call("trunk"), ops.shape(images)[0])
        activation, bypass = _chunked(self._trunk, rows, images)
        if self.mode == "full":
            scores = _chunked(self._full, min(self.rows_per_call("full"), rows), images)
        else:
            scores = _chunked(lambda a, *b: self._head(a, list(b)), rows, activation, *bypass)
        return activation, list(bypass), scores

    def raw_maps(self, images, activation, bypass, target, params, scores):
        """The method: (B, h, w) raw maps for a batch, given the ``images``, the trunk's target
        ``activation`` (B, h, w, C) and ``bypass`` tensors, the ``target``
        (:class:`cam.targets.Target`) with its per-image ``params`` and the target's scores
        (B,), all backend tensors on the device; returns a tensor there. The templates below
        implement it; a new kind of method overrides it."""
        raise NotImplementedError


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


class GradientExplainer(Explainer):
    """Template of the gradient methods: one backward pass per image batch, through the head
    only (``mode="head"``) or the whole network (``mode="full"``).

    A method implements :meth:`channel_weights`; the map is sum_k w_k A_k over the channels.
    """

    def __init__(self, model, layer=None, score="logit", mode="head", reshape=None):
        super().__init__(model, layer, score, mode, reshape)
        # shared by every gradient method on this model, layer and mode: they differ only in
        # what they make of the gradient
        self._gradients = self.gradient_function(T.Class(0))

    def gradient_function(self, target) -> B.Compiled:
        """The compiled gradient of ``target``'s scores, shared by every gradient method on
        this model, layer and mode (they differ only in what they make of the gradient)."""
        split, mode = self.split, self.mode
        score = _head_scores if mode == "head" else _full_scores
        return self.shared_compiled(
            ("gradients", mode, target.key), lambda: lambda *a: score(split, target, *a),
            gradient=True, part="head" if mode == "head" else "full")

    def channel_weights(self, activation, gradients):
        """The hook: weights from the target activation A (B, h, w, C) and the gradient of
        each image's class score dy/dA (same shape), backend tensors (write it with
        ``keras.ops``; :mod:`cam.combine` has the common ones). Return (B, C) channel
        weights, or (B, h, w, C) for a weight per cell and channel."""
        raise NotImplementedError

    def raw_maps(self, images, activation, bypass, target, params, scores):
        rows = min(self.rows_per_call("head" if self.mode == "head" else "full", backward=True),
                   ops.shape(activation)[0])
        gradients = self.gradient_function(target)
        names = sorted(params)

        def one_call(activation, images, *rest):
            bypass, values = rest[:len(rest) - len(names)], rest[len(rest) - len(names):]
            start = activation if self.mode == "head" else ops.zeros_like(activation)
            watched, grads = gradients(start, list(bypass), images, dict(zip(names, values)))
            return C.weighted_channel_sum(watched, self.channel_weights(watched, grads))

        return _chunked(one_call, rows, activation, images, *bypass,
                        *(params[n] for n in names))


def _head_scores(split, target, activation, bypass, images, params):
    # the gradient is taken with respect to the first argument, the target activation
    return target.score(split.head(activation, bypass), params), activation


def _full_scores(split, target, delta, bypass, images, params):
    # the whole network, with a zero ``delta`` added to the target activation: the gradient
    # with respect to it is the gradient with respect to the activation
    seen = []

    def add(t):
        seen.append(t)
        return t + delta

    return target.score(split.full(images, replace=add), params), seen[0]


def per_row(params, image):
    """Each row's image's parameters: ``params`` gathered by the rows' image numbers."""
    return keras.tree.map_structure(lambda p: ops.take(p, image, axis=0), params)


def check_batch_size(batch_size) -> int | None:
    """None (the memory budget decides, :mod:`cam.batching`) or an int >= 1."""
    if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1):
        raise ValueError(f"batch_size must be None (chosen from the memory budget) or an int "
                         f">= 1, got {batch_size!r}")
    return None if batch_size is None else int(batch_size)


def score_rows(score, count: int, masks: int, rows: int, *args, desc: str = ""):
    """Every (image, mask) pair of ``count`` images and ``masks`` masks, as one list of
    ``count * masks`` rows (row r: image r // masks, mask r % masks), scored by the compiled
    ``score(*args, index)`` in calls of ``rows`` rows; ``index`` is the call's row numbers
    (rows past the end repeat the last image's masks and are dropped). Returns the
    (count, masks) scores, on the device: no host copy, no loop over images."""
    total = count * masks
    calls, rows = batching.plan(total, rows)
    out = [score(*args, ops.arange(start, start + rows, dtype="int32"))
           for start in tqdm(range(0, calls * rows, rows), desc=f"{desc} ({total} rows, "
                             f"{calls} calls of {rows})", leave=False, disable=calls < 8)]
    joined = out[0] if len(out) == 1 else ops.concatenate(out, axis=0)
    return ops.reshape(joined[:total], (count, masks))


class AblationExplainer(Explainer):
    """Template of the ablation methods: ablated copies of the target activation scored
    through the head only (``mode="head"``) or the whole network (``mode="full"``), in one
    compiled function.

    A method implements :meth:`masks` (what each ablation sets to ``ablation_value``) and
    :meth:`combine` (how the ablated scores become a map, in ``keras.ops``).

    Every ablation of every image in a call is one row of a list (:func:`score_rows`), cut
    into equal compiled calls: several images share a call whenever they fit, and everything
    stays on the device until the explain call's one copy to the host. ``batch_size``: rows
    per compiled call at most; None (the default) takes the memory budget
    (:mod:`cam.batching`) over the bytes of one row through the head (or the whole
    network in full mode).

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
        batch_size = check_batch_size(batch_size)
        value = float(ablation_value)
        if not np.isfinite(value):
            raise ValueError(f"ablation_value must be finite, got {ablation_value!r}")
        self.ablation_value = value
        if fuse is not None and not isinstance(fuse, (bool, np.bool_)):
            raise ValueError(f"fuse must be None (decide from the head's layers), True or "
                             f"False, got {fuse!r}")
        self.fuse = _light_head(self.split) if fuse is None else bool(fuse)
        #: Rows (ablated copies) per compiled call at most.
        self.batch_size = batch_size or self.rows_per_call(mode)
        self._device_masks: dict = {}
        self._score_head = self.scoring_function(T.Class(0), "head")
        self._score_full = self.scoring_function(T.Class(0), "full")

    def scoring_function(self, target, mode: str | None = None) -> B.Compiled:
        """The compiled scoring of ablated rows for ``target``'s kind, through the head or the
        whole network; shared by every ablation method on this model and layer with this
        ablation value."""
        split, value, mode = self.split, self.ablation_value, mode or self.mode
        if mode == "head":
            return self.shared_compiled(
                ("score_head", value, target.key),
                lambda: lambda *a: _score_head(split, value, target, *a), fuse=self.fuse,
                part="head")
        return self.shared_compiled(("score_full", value, target.key),
                                    lambda: lambda *a: _score_full(split, value, target, *a))

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

    def combine(self, activation, scores, ablated, masks):
        """The hook: (B, h, w) raw maps from the activation (B, h, w, C), the unablated
        scores y (B,), the ablated scores (B, N) and the N :meth:`masks`, all backend tensors
        on the device (write it with ``keras.ops``; :mod:`cam.combine` has the common
        steps)."""
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

    def checked_masks(self, masks) -> np.ndarray:
        """Boolean masks as they are; float masks checked to lie in [0, 1], as float32."""
        masks = np.asarray(masks)
        if masks.dtype != bool:
            if not np.issubdtype(masks.dtype, np.floating):
                raise TypeError(f"masks must be boolean or float, got dtype {masks.dtype}")
            if not ((masks >= 0) & (masks <= 1)).all():  # also refuses NaN
                raise ValueError("float masks are the fraction of each cell ablated and must "
                                 "lie in [0, 1]")
            masks = masks.astype(np.float32, copy=False)
        return masks

    def mask_settings(self) -> tuple:
        """What :meth:`masks` depends on besides the grid (a method's window, stride, ...): the
        masks kept on the device are made again when it changes."""
        return ()

    def device_masks(self, grid_shape: tuple):
        """The :meth:`masks` for a grid as (NumPy array, tensor on the device), made once per
        grid and :meth:`mask_settings`, and kept."""
        key = (tuple(int(d) for d in grid_shape), self.mask_settings())
        if key not in self._device_masks:
            masks = self.checked_masks(self.masks(key[0]))
            self._device_masks[key] = (masks, B.tensor(masks))
        return self._device_masks[key]

    def mask_batches(self, masks: np.ndarray) -> list:
        """Masks cut into equal batches of at most ``batch_size`` (the last padded with masks
        that ablate nothing, False or 0.0), as tensors: for scoring one image's masks batch by
        batch (:meth:`ablated_scores`)."""
        masks = self.checked_masks(masks)
        size = min(self.batch_size, len(masks))  # no padding when one batch holds every mask
        pad = -len(masks) % size
        padded = np.concatenate([masks, np.zeros((pad,) + masks.shape[1:], masks.dtype)])
        return [B.tensor(padded[i:i + size]) for i in range(0, len(padded), size)]

    def ablated_scores(self, image, activation, bypass, target: int, masks) -> np.ndarray:
        """Class score with each mask applied, for one image: (len(masks),), on the host.

        ``masks`` is an array of masks or the output of :meth:`mask_batches` (each batch one
        compiled call). For timing and inspecting single images; :meth:`explain` scores
        every image's ablations together."""
        if isinstance(masks, np.ndarray):
            count, masks = len(masks), self.mask_batches(masks)
        else:
            count = None
        params = {"k": B.tensor([int(target)], "int32")}
        source = activation if self.mode == "head" else image
        scorer = self._score_head if self.mode == "head" else self._score_full
        out = [score_rows(scorer, 1, ops.shape(batch)[0], ops.shape(batch)[0], source,
                          list(bypass), batch, params)[0] for batch in masks]
        scores = B.concat_numpy(out)  # one device-to-host copy
        return scores if count is None else scores[:count]

    def images_per_call(self, masks: int) -> int:
        """Images whose ablations one compiled call scores together: as many as fit
        ``batch_size`` rows when an image has fewer masks than that, else 1."""
        return max(1, self.batch_size // masks)

    def raw_maps(self, images, activation, bypass, target, params, scores):
        masks, device = self.device_masks(ops.shape(activation)[1:])
        count = ops.shape(activation)[0]
        source = activation if self.mode == "head" else images
        ablated = score_rows(self.scoring_function(target), count, len(masks), self.batch_size,
                             source, list(bypass), device, params, desc=self.name)
        return self.combine(activation, scores, ablated, device)


def _light_head(split) -> bool:
    """Whether the head after the layer has no convolution or attention layer (pooling,
    dense, normalisation, activations): where XLA's fusing pays on the CPU."""
    heavy = ("Conv", "Attention")
    return not any(word in type(call.operation).__name__ for call in split.head_calls
                   for word in heavy)


def _rows(index, masks: int, count):
    """Row numbers -> (image, mask) numbers; rows past the last image repeat its masks."""
    return ops.minimum(index // masks, count - 1), index % masks


def _score_head(split, ablation_value, target, activation, bypass, masks, params, index):
    # activation (k, h, w, C) and bypass (k, ...) of k images, masks (N, ...), the target's
    # per-image params; index (R,): the rows of this call. Each row is one image's activation
    # with one mask applied, through the head: (R,) target scores.
    image, mask = _rows(index, ops.shape(masks)[0], ops.shape(activation)[0])
    dense = affine_head(split)
    channel = tuple(masks.shape[1:3]) == (1, 1)  # static shapes: channel or cell masks
    if dense is not None and (channel or masks.shape[-1] == 1):
        outputs = _affine_rows(dense, ablation_value, activation, masks, image, mask)
    else:
        rows = _ablate(ops.take(activation, image, axis=0), ops.take(masks, mask, axis=0),
                       ablation_value)
        outputs = split.head(rows, [ops.take(b, image, axis=0) for b in bypass])
    return target.score(outputs, per_row(params, image))


def affine_head(split):
    """The Dense layer of a head that is global average pooling, then (inference-time
    identities: Dropout) one Dense layer whose activation is linear or removed (its logits),
    with nothing bypassing the target: a head affine in the target activation, where a
    channel mask's effect has a closed form. None for any other head."""
    if split.tokens is not None or split.bypass or len(split.outputs) != 1:
        return None
    ops_ = [call.operation for call in split.head_calls]
    if len(ops_) < 2 or not isinstance(ops_[0], keras.layers.GlobalAveragePooling2D) \
            or ops_[0].keepdims or ops_[0].data_format != "channels_last":
        return None
    *middle, dense = ops_[1:]
    if not isinstance(dense, keras.layers.Dense) or \
            any(not isinstance(op, keras.layers.Dropout) for op in middle):
        return None
    removed = id(split.head_calls[-1]) in split.overrides
    linear = dense.activation in (None, keras.activations.linear)
    return dense if (linear or removed) and dense.lora_rank is None else None


def _affine_rows(dense, ablation_value, activation, masks, image, mask):
    # A GAP + Dense head: ablating sets the activation to A (1 - m) + v m = A + (v - A) m,
    # which moves the pooled value p by the mean over the grid of (v - A) m; the head's output
    # is then (p + that) W + b, without materialising the ablated copies.
    pooled = ops.mean(activation, axis=(1, 2))  # (k, C)
    p = ops.take(pooled, image, axis=0)  # (R, C)
    value = ops.cast(ablation_value, p.dtype)
    if tuple(masks.shape[1:3]) == (1, 1):  # channel masks (N, 1, 1, C): (v - p) m
        m = ops.cast(ops.take(masks, mask, axis=0)[:, 0, 0, :], p.dtype)
        moved = p + (value - p) * m
    else:  # cell masks (N, h, w, 1): per image and mask, sum_ij m_ij (v - A_ij) / hw
        k, h, w, c = (ops.shape(activation)[i] for i in range(4))
        n = ops.shape(masks)[0]
        cells = ops.reshape(ops.cast(masks, p.dtype), (n, h * w))
        shifts = ops.einsum("nq,bqc->bnc", cells, ops.reshape(value - activation, (k, h * w, c)))
        shifts = ops.reshape(shifts, (k * n, c)) / ops.cast(h * w, p.dtype)
        moved = p + ops.take(shifts, image * n + mask, axis=0)
    out = ops.matmul(moved, dense.kernel)
    return ops.cast(out + dense.bias if dense.use_bias else out, "float32")


def _ablate(activation, mask, ablation_value):
    value = ops.cast(ablation_value, activation.dtype)
    if keras.backend.standardize_dtype(mask.dtype) == "bool":
        # the exact path: ablated cells are set, the rest untouched
        return ops.where(mask, value, activation)
    # a fraction m in [0, 1] ablated: A (1 - m) + value m (m = 0 and 1 give A and value)
    mask = ops.cast(mask, activation.dtype)
    return activation * (1 - mask) + value * mask


def _score_full(split, ablation_value, target, images, bypass, masks, params, index):
    # the same rows through the whole network: images (k, H, W, C); bypass unused
    image, mask = _rows(index, ops.shape(masks)[0], ops.shape(images)[0])
    mask = ops.take(masks, mask, axis=0)
    outputs = split.full(ops.take(images, image, axis=0),
                         replace=lambda t: _ablate(t, mask, ablation_value))
    return target.score(outputs, per_row(params, image))
