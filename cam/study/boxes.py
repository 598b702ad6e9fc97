"""Detection on the synthetic grains (appendix A03): scenes of several grains with boxes taken
from their exact masks, a small anchor-free detector, and how much of a map falls in its box.

* :func:`make_scenes` composes one to ``max_grains`` grains (:func:`cam.study.grains.draw_grain`,
  each drawn on its own tile and pasted where it overlaps no other) and paints them in one go
  (:func:`cam.study.grains.paint`), so each scene has one background, one focus blur and one
  noise, and every grain its exact mask; a grain's box is its mask's bounding rectangle
  (OpenCV's ``boundingRect``, converted with ``keras.utils.bounding_boxes``), its class the
  grain type.
* :func:`build_detector` is a CenterNet-style detector (Zhou et al., "Objects as points",
  2019) in plain Keras: one stride-4 grid, and per cell a class heatmap, a box size and a
  centre offset, all in one output tensor. :class:`CenterDecoder` turns that tensor into one
  box and class probabilities per cell, the callable ``cam.targets.Box`` takes for a
  detector cam has no built-in decoding for; :func:`detect` keeps the heatmap's peaks.
* :func:`inside_box_fraction` is the share of a map's positive mass inside its box
  (:func:`cam.metrics.energy_in_mask` on the box as a mask); a uniform map gets the box's
  share of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from . import synthetic
from .grains import draw_grain, paint

#: The detector's output stride: one prediction per 4x4 pixels.
STRIDE = 4
#: Pixels kept free between two grains of a scene.
GAP = 2


@dataclass(frozen=True)
class Scenes:
    """Synthetic scenes with their ground truth.

    ``images`` (N, H, W, 3) uint8; per scene ``boxes[i]`` (k, 4) float32 ``"xyxy"`` pixels,
    ``labels[i]`` (k,) int64 grain types (:data:`cam.study.synthetic.SYNTHETIC_CLASSES`) and
    ``masks[i]`` (k, H, W) bool, each grain's exact pixels."""

    images: np.ndarray
    boxes: list
    labels: list
    masks: list

    def __len__(self) -> int:
        return len(self.images)

    @property
    def counts(self) -> np.ndarray:
        """Grains per scene, (N,)."""
        return np.array([len(b) for b in self.boxes])


def mask_boxes(masks) -> np.ndarray:
    """The bounding boxes of (k, H, W) boolean masks, (k, 4) float32 ``"xyxy"`` in pixel
    edges: a mask covering columns 3..5 gives x0 = 3, x1 = 6. Each mask must be non-empty."""
    from keras.utils import bounding_boxes

    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (k, H, W), got shape {masks.shape}")
    if len(masks) and not masks.reshape(len(masks), -1).any(axis=1).all():
        raise ValueError("every mask needs at least one pixel to have a box")
    xywh = np.array([cv2.boundingRect(m.astype(np.uint8)) for m in masks], np.float32)
    return np.asarray(bounding_boxes.convert_format(xywh.reshape(-1, 4), source="xywh",
                                                    target="xyxy"), np.float32)


def box_masks(boxes, size: tuple[int, int]) -> np.ndarray:
    """(k, H, W) bool: the pixels whose centres lie inside each ``"xyxy"`` box."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    height, width = size
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    inside_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])
    inside_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])
    return inside_y[:, :, None] & inside_x[:, None, :]


def tile_sides(size: int) -> tuple[int, int]:
    """The default range of grain tiles in a scene of side ``size``: 42% to 58% of it, at
    least :data:`cam.study.synthetic.MIN_SIZE` (grains of 17 to 45 pixels at 96)."""
    return (max(synthetic.MIN_SIZE, round(0.42 * size)),
            max(synthetic.MIN_SIZE, round(0.58 * size)))


def compose_scene(rng: np.random.Generator, size: int = 96, max_grains: int = 3,
                  tile: tuple[int, int] | None = None, tries: int = 30):
    """One scene: 1..``max_grains`` grains of random types, each drawn on a square tile of a
    random side in ``tile`` (default :func:`tile_sides`) and placed at random where it keeps
    :data:`GAP` pixels from the others (a grain that finds no room in ``tries`` places is left
    out; the first always fits). Returns (image (size, size, 3) uint8, masks (k, size, size) bool, labels (k,))."""
    tile = tile_sides(size) if tile is None else tile
    if not synthetic.MIN_SIZE <= tile[0] <= tile[1] <= size:
        raise ValueError(f"tile must be (low, high) with {synthetic.MIN_SIZE} <= low <= high <= "
                         f"size {size}, got {tile}")
    if max_grains < 1:
        raise ValueError(f"max_grains must be >= 1, got {max_grains}")
    layers = [np.zeros((size, size), np.uint8) for _ in range(4)]  # body, interior, feature, light
    masks, labels = [], []
    wanted = int(rng.integers(1, max_grains + 1))
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * GAP + 1, 2 * GAP + 1))
    for _ in range(wanted):
        label = int(rng.integers(len(synthetic.SYNTHETIC_CLASSES)))
        side = int(rng.integers(tile[0], tile[1] + 1))
        body, interior, feature, light = draw_grain(synthetic.SYNTHETIC_CLASSES[label], rng, side)
        grain = (body > 0) | feature
        taken = cv2.dilate(np.any(masks, axis=0).astype(np.uint8), kernel) > 0 if masks else None
        for _ in range(tries):
            y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
            if taken is None or not (taken[y:y + side, x:x + side] & grain).any():
                break
        else:
            continue
        where = (slice(y, y + side), slice(x, x + side))
        for layer, part in zip(layers, (body, interior, feature, light)):
            layer[where] = np.maximum(layer[where], np.asarray(part, np.uint8) * (
                255 if part.dtype == bool else 1))
        mask = np.zeros((size, size), bool)
        mask[where] = grain
        masks.append(mask)
        labels.append(label)
    body, interior, feature, light = layers
    image = paint(rng, size, body, interior, feature > 0, light > 0)
    return image, np.stack(masks), np.array(labels, np.int64)


def make_scenes(n: int, size: int = 96, seed: int = 0, max_grains: int = 3,
                tile: tuple[int, int] | None = None) -> Scenes:
    """``n`` scenes (:func:`compose_scene`); scene ``i`` depends only on ``(seed, i)`` and the
    other arguments, so a smaller set is a prefix of a larger one."""
    images = np.empty((n, size, size, 3), np.uint8)
    boxes, labels, masks = [], [], []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        images[i], scene_masks, scene_labels = compose_scene(rng, size, max_grains, tile)
        boxes.append(mask_boxes(scene_masks))
        labels.append(scene_labels)
        masks.append(scene_masks)
    return Scenes(images, boxes, labels, masks)


# --------------------------------------------------------------------------- the detector


def center_targets(scenes: Scenes, num_classes: int, stride: int = STRIDE) -> np.ndarray:
    """CenterNet training targets, (N, g, g, num_classes + 5) float32 with g = size / stride:
    per class a Gaussian heatmap that is exactly 1 at each box's centre cell, then at the centre
    cells the box's log width and height in cells, its centre's offset from the cell's centre
    (in cells, in [-0.5, 0.5)), and a 1 marking the cell."""
    n, size = len(scenes), scenes.images.shape[1]
    if size % stride:
        raise ValueError(f"image side {size} is not a multiple of the stride {stride}")
    grid = size // stride
    out = np.zeros((n, grid, grid, num_classes + 5), np.float32)
    centres = np.arange(grid) + 0.5
    for i, (boxes, labels) in enumerate(zip(scenes.boxes, scenes.labels)):
        for (x0, y0, x1, y1), label in zip(boxes / stride, labels):
            cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
            col, row = min(int(cx), grid - 1), min(int(cy), grid - 1)
            sigma = max(0.5, math.sqrt(w * h) / 6)
            gauss = np.exp(-((centres[None] - (col + 0.5)) ** 2
                             + (centres[:, None] - (row + 0.5)) ** 2) / (2 * sigma**2))
            out[i, ..., label] = np.maximum(out[i, ..., label], gauss)
            out[i, row, col, num_classes:] = [math.log(w), math.log(h), cx - col - 0.5,
                                              cy - row - 0.5, 1.0]
    return out


def center_loss(num_classes: int):
    """The loss of :func:`build_detector` against :func:`center_targets`, per image: the
    penalty-reduced focal loss on the heatmap plus the L1 losses of size and offset at the
    centre cells, each divided by the image's number of boxes."""
    from keras import ops

    def loss(target, output):
        heat, logits = target[..., :num_classes], output[..., :num_classes]
        centre = ops.cast(ops.equal(heat, 1.0), "float32")
        probability = ops.sigmoid(logits)
        positive = centre * (1 - probability) ** 2 * ops.log_sigmoid(logits)
        negative = ((1 - centre) * (1 - heat) ** 4 * probability ** 2
                    * ops.log_sigmoid(-logits))
        cells = target[..., -1]
        count = ops.maximum(ops.sum(cells, axis=(1, 2)), 1.0)
        focal = -ops.sum(positive + negative, axis=(1, 2, 3))
        regression = ops.sum(ops.abs(output[..., num_classes:] - target[..., num_classes:-1])
                             * cells[..., None], axis=(1, 2, 3))
        return (focal + regression) / count

    return loss


def build_detector(num_classes: int, image_size: int = 96, width: int = 32):
    """A small CenterNet: convolution blocks down to stride 8 for context, upsampled and joined
    with the stride-4 features into ``"features"`` (image_size / 4 square, the layer A03
    explains), then a 3x3 and two 1x1 convolutions to one (B, g, g, num_classes + 4) output:
    class logits (the heatmap before its sigmoid), log box width and height in cells, centre
    offset in cells. Takes raw [0, 255] RGB pixels."""
    import keras
    from keras import layers as L

    def block(x, filters, stride, name):
        x = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                     name=f"{name}_conv")(x)
        return L.ReLU(name=name)(L.BatchNormalization(name=f"{name}_bn")(x))

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = L.Rescaling(1 / 127.5, offset=-1, name="rescale")(inputs)
    x = block(x, width // 2, 1, "stem")
    x = block(x, width, 2, "down2")           # stride 2
    fine = block(x, 2 * width, 2, "down4")    # stride 4
    x = block(fine, 2 * width, 2, "down8")    # stride 8: more context per cell
    x = block(x, 2 * width, 1, "block8")
    x = L.UpSampling2D(2, interpolation="bilinear", name="up4")(x)
    x = L.Concatenate(name="join")([fine, x])
    features = block(x, 2 * width, 1, "features")
    h = L.Conv2D(width, 3, padding="same", activation="relu", name="head_conv")(features)
    prior = -math.log((1 - 0.1) / 0.1)  # start every class at probability 0.1
    heat = L.Conv2D(num_classes, 1, name="heatmap",
                    bias_initializer=keras.initializers.Constant(prior))(h)
    geometry = L.Conv2D(4, 1, name="geometry")(h)
    outputs = L.Concatenate(name="predictions")([heat, geometry])
    return keras.Model(inputs, outputs, name="grain_centernet")


class CenterDecoder:
    """Decodes :func:`build_detector`'s output (B, g, g, classes + 4) to one box per cell:
    ``decode(output) -> (boxes (B, g*g, 4) "xyxy" pixels, probabilities (B, g*g, classes))``
    in ``keras.ops``, the callable ``cam.targets.Box`` takes. Holds no model."""

    def __init__(self, num_classes: int, grid: int, stride: int = STRIDE):
        self.num_classes, self.grid, self.stride = int(num_classes), int(grid), int(stride)
        cells = (np.arange(grid, dtype=np.float32) + 0.5)
        cx, cy = np.meshgrid(cells, cells)  # (g, g): column, row centres in cells
        self.centres = np.stack([cx, cy], -1).reshape(1, grid * grid, 2)

    @property
    def key(self) -> tuple:
        return ("CenterDecoder", self.num_classes, self.grid, self.stride)

    def __call__(self, output):
        from keras import ops

        if isinstance(output, (list, tuple)):
            (output,) = output
        c = self.num_classes
        flat = ops.reshape(output, (-1, self.grid * self.grid, c + 4))
        half = ops.exp(flat[..., c:c + 2]) / 2
        centre = ops.convert_to_tensor(self.centres) + flat[..., c + 2:c + 4]
        boxes = ops.concatenate([centre - half, centre + half], axis=-1) * self.stride
        return boxes, ops.sigmoid(flat[..., :c])

    def __repr__(self):
        return f"CenterDecoder({self.num_classes} classes, {self.grid}x{self.grid} grid)"


def train_detector(model, scenes: Scenes, num_classes: int, epochs: int = 30,
                   batch_size: int = 16, learning_rate: float = 0.003, seed: int = 0,
                   flips: bool = True) -> dict:
    """Fit ``model`` (:func:`build_detector`) to ``scenes`` with Adam and a cosine schedule;
    with ``flips`` the training set is doubled by horizontal and vertical flips (grain types
    do not change under a flip). Returns the Keras history."""
    import keras

    images, targets = scenes.images.astype(np.float32), center_targets(scenes, num_classes)
    if flips:
        flip = _flip_targets(targets, num_classes)
        images = np.concatenate([images, images[:, ::-1], images[:, :, ::-1]])
        targets = np.concatenate([targets, flip(targets, 1), flip(targets, 2)])
    keras.utils.set_random_seed(seed)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=center_loss(num_classes))
    history = model.fit(images, targets, epochs=epochs, batch_size=batch_size, shuffle=True,
                        verbose=0)
    return history.history


def _flip_targets(targets, num_classes):
    """Targets of images flipped along axis 1 (rows) or 2 (columns): the grid flips, and the
    offset along the flipped axis changes sign (sizes do not)."""
    def flip(t, axis):
        t = np.flip(t, axis).copy()
        offset = num_classes + (3 if axis == 1 else 2)  # y offset for rows, x for columns
        t[..., offset] = np.where(t[..., -1] > 0, -t[..., offset], 0)
        return t
    return flip


def detect(decoder: CenterDecoder, output, threshold: float = 0.3, max_detections: int = 5,
           at_least: int = 0):
    """The detections of each image: each cell predicts its most probable class, and the cells
    that are the maximum of their 3x3 neighbourhood (CenterNet's non-max suppression) with a
    probability >= ``threshold`` are kept, best first, at most ``max_detections``; the best
    ``at_least`` peaks are kept whatever their probability. Returns per image a (boxes (k, 4)
    xyxy, classes (k,), scores (k,)) tuple of NumPy arrays."""
    from cam import backend as B

    output = np.asarray(output, np.float32)
    boxes, probabilities = (B.numpy(t) for t in decoder(B.tensor(output)))
    grid = decoder.grid
    best, classes = probabilities.max(axis=-1), probabilities.argmax(axis=-1)
    heat = best.reshape(-1, grid, grid)
    found = []
    for i in range(len(heat)):
        peaks = heat[i] >= cv2.dilate(heat[i], np.ones((3, 3), np.uint8))
        score = np.where(peaks, heat[i], -1.0).ravel()
        cells = np.argsort(-score, kind="stable")[:max_detections]
        keep = score[cells] >= threshold
        keep[:at_least] = True
        cells = cells[keep & (score[cells] >= 0)]
        found.append((boxes[i, cells], classes[i, cells].astype(np.int64), score[cells]))
    return found


def iou_matrix(a, b) -> np.ndarray:
    """IoU of every ``"xyxy"`` box in ``a`` (k, 4) with every one in ``b`` (m, 4), (k, m)
    (``keras.utils.bounding_boxes.compute_iou``)."""
    from keras.utils import bounding_boxes

    from cam import backend as B

    a, b = np.asarray(a, np.float32).reshape(-1, 4), np.asarray(b, np.float32).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    return B.numpy(bounding_boxes.compute_iou(a, b, "xyxy")).astype(np.float32)


def match_detections(detections, scenes: Scenes, iou: float = 0.5):
    """Greedy matching of each image's detections (best first) to its ground-truth boxes at
    IoU >= ``iou``: a detection is a true positive when it matches an unmatched box of its
    class. Returns (true positives, detections, ground-truth boxes, boxes found whatever the
    class) counted over all images."""
    tp = found_any = 0
    for (boxes, classes, _), truth, labels in zip(detections, scenes.boxes, scenes.labels):
        overlaps = iou_matrix(boxes, truth)
        used, used_any = np.zeros(len(truth), bool), np.zeros(len(truth), bool)
        for k in range(len(boxes)):
            hit = (overlaps[k] >= iou) & ~used & (labels == classes[k])
            if hit.any():
                used[np.argmax(np.where(hit, overlaps[k], -1))] = True
                tp += 1
            any_hit = (overlaps[k] >= iou) & ~used_any
            if any_hit.any():
                used_any[np.argmax(np.where(any_hit, overlaps[k], -1))] = True
        found_any += int(used_any.sum())
    return tp, sum(len(d[0]) for d in detections), int(scenes.counts.sum()), found_any


# --------------------------------------------------------------------------- the maps


def inside_box_fraction(maps, boxes) -> np.ndarray:
    """(N,) the share of each map's positive mass inside its ``"xyxy"`` box (pixel centres
    inside the box), :func:`cam.metrics.energy_in_mask` on the box as a mask; NaN for a map
    with no positive value. ``maps`` (N, H, W) at the image's size, ``boxes`` (N, 4)."""
    from cam import metrics

    maps = np.asarray(maps, np.float32)
    return metrics.energy_in_mask(maps, box_masks(boxes, maps.shape[1:3]))


def box_area_fraction(boxes, size: tuple[int, int]) -> np.ndarray:
    """(N,) each box's share of the image's pixels (pixel centres inside the box): what a
    uniform map puts inside it."""
    return box_masks(boxes, size).mean(axis=(1, 2))


def outline_boxes(fig, boxes, color: str = "white") -> None:
    """Draw box ``i`` (``"xyxy"`` pixels) on every panel of row ``i`` of ``fig``, a grid of
    image panels such as :func:`cam.plot.compare_methods` makes."""
    from matplotlib.patches import Rectangle

    rows = np.asarray(fig.axes, dtype=object).reshape(len(boxes), -1)
    for row, (x0, y0, x1, y1) in zip(rows, np.asarray(boxes, np.float32)):
        for ax in row:  # imshow puts pixel centres on integers: pixel edges are at -0.5
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor=color, linewidth=1.2))
