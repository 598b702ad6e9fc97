"""Detection targets: explain one detection of an object detector, in the D-RISE manner.

A detector's raw outputs (before non-max suppression) are decoded to boxes and class
probabilities, one per prediction (an anchor, a query); the score of the detection to explain
is the best match among them:

    score = max over predictions p of IoU(reference box, box_p) * probability_p(class)

(Petsiuk et al., "Black-box explanation of object detectors via saliency maps", 2021; D-RISE
takes a class-vector similarity where this takes the class probability). The score is
smooth in the outputs, so gradient and perturbation methods explain it alike; the IoU and the
box formats are Keras' own (``keras.utils.bounding_boxes``).

Use it as ``cam.targets.Box`` (this module builds on :class:`cam.targets.Target` and
:mod:`cam.targets` exports it)::

    detector = keras_hub.models.RetinaNetObjectDetector(backbone=..., num_classes=3)
    box = cam.targets.Box([8, 12, 40, 44], class_id=2, decode=detector)  # xyxy pixels
    maps = cam.GradCAM(detector, "stack2_block0_out")(images, targets=box)

``decode`` is a KerasHub detector whose decoding cam knows (RetinaNet, D-FINE; the decoder
reads the model's anchors and box format once and keeps no reference to the model), or any
callable ``decode(outputs) -> (boxes, probabilities)`` in ``keras.ops``: ``outputs`` as the
explainer sees them (one tensor, or a list in the model's output order), ``boxes``
(N, P, 4) ``"xyxy"`` pixel boxes and ``probabilities`` (N, P, classes).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import keras
import numpy as np
from keras import ops
from keras.utils import bounding_boxes

from . import backend as B
from .checks import check_int
from .targets import Target

#: The box format every decoder returns and every IoU is computed in.
FORMAT = "xyxy"


class Box(Target):
    """One detection: the reference ``box`` (4 numbers, or one box per image (B, 4)) in
    ``box_format`` (a ``keras.utils.bounding_boxes`` format in pixels: ``"xyxy"``, ``"yxyx"``,
    ``"xywh"``, ``"center_xywh"``, ``"center_yxhw"``) and its class ``class_id`` (an int, or
    one per image). Its score is max_p IoU(box, box_p) * probability_p(class_id) over the
    detector's predictions p, decoded by ``decode`` (see the module docstring). A list of B
    boxes (one per image, the same ``decode``) works like one box of shape (B, 4)."""

    def __init__(self, box, class_id, decode, box_format: str = FORMAT):
        self.decode = as_decoder(decode)
        array = np.asarray(box, dtype=np.float32)
        if array.ndim not in (1, 2) or array.shape[-1] != 4 or not np.isfinite(array).all():
            raise ValueError(f"Box takes a box of 4 finite numbers (or one per image, (B, 4)), "
                             f"got {box!r}")
        if box_format.lower().startswith("rel"):
            raise ValueError(f"Box takes a box in pixels, not the relative format "
                             f"{box_format!r}: multiply by the image's size first")
        self.box = B.numpy(bounding_boxes.convert_format(
            array.reshape(-1, 4), source=box_format, target=FORMAT)).astype(np.float32)
        if ((self.box[:, 2] <= self.box[:, 0]) | (self.box[:, 3] <= self.box[:, 1])).any():
            raise ValueError(f"Box's box {np.asarray(box).tolist()} in {box_format!r} has no "
                             f"area (as xyxy: {self.box.tolist()})")
        classes = np.asarray(class_id)
        if classes.ndim > 1 or classes.dtype == bool or \
                not np.issubdtype(classes.dtype, np.integer) or (classes < 0).any():
            raise ValueError(f"Box's class_id must be an int >= 0 or one per image, got "
                             f"{class_id!r}")
        self.class_id = classes.astype(np.int64)

    @property
    def key(self):
        return ("Box", self.decode.key if hasattr(self.decode, "key") else id(self.decode))

    def params(self, count):
        boxes, classes = self.box, np.atleast_1d(self.class_id)
        for name, n in (("boxes", len(boxes)), ("class ids", len(classes))):
            if n not in (1, count):
                raise ValueError(f"Box has {n} {name} for {count} images")
        return {"box": np.broadcast_to(boxes, (count, 4)),
                "class_id": np.broadcast_to(classes, (count,)).astype(np.int32)}

    def check(self, split):
        check = getattr(self.decode, "check", None)
        if check is not None:
            check(split)
        classes = getattr(self.decode, "num_classes", None)
        if classes is not None and (self.class_id >= classes).any():
            raise ValueError(f"Box's class {int(self.class_id.max())} is out of range: the "
                             f"detector has {classes} classes, valid ids are 0..{classes - 1}")

    def score(self, outputs, params):
        boxes, probabilities = self.decode(outputs)
        return box_scores(params["box"], params["class_id"], boxes, probabilities)

    def __repr__(self):
        return f"Box({self.box.tolist()!r}, {self.class_id.tolist()!r}, {self.decode!r})"


def box_scores(box, class_id, boxes, probabilities):
    """(N,) max_p IoU(box_i, boxes_ip) * probabilities_ip[class_id_i]: ``box`` (N, 4) and
    ``boxes`` (N, P, 4) in ``"xyxy"``, ``probabilities`` (N, P, classes), ``class_id`` (N,)."""
    box = ops.cast(ops.expand_dims(box, 1), "float32")
    iou = bounding_boxes.compute_iou(box, ops.cast(boxes, "float32"), FORMAT)[:, 0, :]
    index = ops.reshape(ops.cast(class_id, "int32"), (-1, 1, 1))
    probability = ops.take_along_axis(ops.cast(probabilities, "float32"), index, axis=2)
    return ops.max(iou * probability[..., 0], axis=1)


def as_decoder(decode):
    """``decode`` as given to :class:`Box` -> a decoder: a KerasHub detector cam knows becomes
    its built-in decoder; any other callable is used as it is."""
    if isinstance(decode, keras.Model):
        kinds = {cls.__name__ for cls in type(decode).__mro__}
        for name, decoder in DETECTORS.items():
            if name in kinds:
                return decoder(decode)
        raise ValueError(f"cam has no built-in decoding for {type(decode).__name__} "
                         f"{decode.name!r} (it knows {', '.join(DETECTORS)}): pass a callable "
                         f"decode(outputs) -> (boxes (N, P, 4) xyxy pixels, probabilities "
                         f"(N, P, classes)) in keras.ops")
    if not callable(decode):
        raise ValueError(f"Box's decode must be a detector (KerasHub's "
                         f"{' or '.join(DETECTORS)}) or a callable decode(outputs) -> (boxes, "
                         f"probabilities), got {decode!r}")
    return decode


class _Decoder:
    """A built-in decoder: which of the detector's outputs it reads (by the keys of the
    model's output dict, found in the explainer's list of outputs by position) and the image
    size it decodes for. Holds NumPy arrays and strings, never the model."""

    outputs: tuple = ()

    def __init__(self, detector: keras.Model, image_size=None):
        paths = [path for path, _ in keras.tree.flatten_with_path(detector.output)]
        names = [p[0] if len(p) == 1 else p for p in paths]
        missing = [n for n in self.outputs if n not in names]
        if missing:
            raise ValueError(f"{type(detector).__name__} {detector.name!r} has no output "
                             f"{missing}: its outputs are {names}")
        self.positions = [names.index(n) for n in self.outputs]
        self.output_shapes = [tuple(s.shape) for s in keras.tree.flatten(detector.output)]
        self.image_size = _image_size(detector, image_size)
        self.num_classes = int(detector.num_classes)
        self.detector_name = detector.name

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.image_size, self.num_classes)

    def check(self, split) -> None:
        shapes = [tuple(s) for s in split.output_shapes]
        if shapes != self.output_shapes:
            raise ValueError(f"Box decodes the outputs of {self.detector_name!r} "
                             f"{self.output_shapes}; this model's are {shapes}")

    def read(self, outputs) -> list:
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return [outputs[p] for p in self.positions]

    def __repr__(self):
        return f"{type(self).__name__}({self.detector_name!r}, image_size={self.image_size})"


def _image_size(detector, image_size) -> tuple[int, int]:
    size = tuple(image_size) if image_size is not None else tuple(detector.input_shape[1:3])
    if len(size) != 2 or any(s is None for s in size):
        raise ValueError(f"{type(detector).__name__} {detector.name!r} takes images of any "
                         f"size ({detector.input_shape}), and its boxes are decoded for one "
                         f"size: pass image_size=(height, width) to cam.targets.RetinaNet or "
                         f"DFine, or build the detector with a fixed image_shape")
    return tuple(check_int("image_size", s) for s in size)


class RetinaNet(_Decoder):
    """KerasHub's ``RetinaNetObjectDetector``: ``bbox_regression`` (N, anchors, 4) decoded
    against the model's own anchors (its ``anchor_generator`` at ``image_size``) with
    ``keras.utils.bounding_boxes.decode_deltas_to_boxes`` in ``"center_xywh"`` encoding, as the
    model's ``decode_predictions`` does before non-max suppression; the class probabilities
    are the sigmoid of ``cls_logits``. ``image_size`` (height, width): the model's input size
    when it is fixed."""

    outputs = ("bbox_regression", "cls_logits")

    def __init__(self, detector, image_size=None):
        super().__init__(detector, image_size)
        generator = detector.anchor_generator
        anchors = generator(np.zeros((1, *self.image_size, 3), np.float32))
        self.anchors = B.numpy(ops.concatenate(list(anchors.values()), axis=0))
        self.anchor_format = generator.bounding_box_format
        if self.output_shapes[self.positions[0]][1] not in (None, len(self.anchors)):
            raise ValueError(f"{detector.name!r} predicts "
                             f"{self.output_shapes[self.positions[0]][1]} boxes, its anchor "
                             f"generator gives {len(self.anchors)} at {self.image_size}")

    @property
    def key(self):
        return super().key + (self.anchor_format, hashlib.sha1(self.anchors.tobytes()).hexdigest())

    def __call__(self, outputs):
        deltas, logits = self.read(outputs)
        boxes = bounding_boxes.decode_deltas_to_boxes(
            anchors=ops.convert_to_tensor(self.anchors), boxes_delta=deltas,
            anchor_format=self.anchor_format, box_format=FORMAT,
            encoded_format="center_xywh", image_shape=(*self.image_size, 3))
        return boxes, ops.sigmoid(logits)


class DFine(_Decoder):
    """KerasHub's ``DFineObjectDetector``: ``pred_boxes`` (N, queries, 4), relative
    ``center_xywh``, scaled to ``image_size`` and converted to ``xyxy`` as the model's
    ``decode_predictions`` does before non-max suppression; the class probabilities are the
    sigmoid of ``logits``."""

    outputs = ("pred_boxes", "logits")

    def __call__(self, outputs):
        relative, logits = self.read(outputs)
        height, width = self.image_size
        boxes = bounding_boxes.convert_format(
            relative * ops.convert_to_tensor([width, height, width, height], "float32"),
            source="center_xywh", target=FORMAT)
        return boxes, ops.sigmoid(logits)


#: KerasHub detector class name -> its built-in decoder.
DETECTORS: dict[str, Callable] = {
    "RetinaNetObjectDetector": RetinaNet,
    "DFineObjectDetector": DFine,
}
