"""Ground-truth grain masks: segmented from POLEN23E photos, or read from the synthetic set.

POLEN23E has no masks, but every photo shows one grain on a light, nearly uniform slide
background, so a classical segmentation is enough for the localisation metrics
(:func:`cam.metrics.pointing_game`, :func:`cam.metrics.energy_in_mask`):
:func:`grain_masks` thresholds each pixel's colour distance from the background (Otsu),
closes the grain's outline, fills it, and keeps the largest component. The synthetic stand-in
was drawn with exact masks (:mod:`cam.study.synthetic`); :func:`synthetic_masks` reads them.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from . import synthetic

#: Defaults of :func:`grain_masks`, in pixels of a 224-px image (scaled with the image size).
BLUR_SIGMA, CLOSE_RADIUS, OPEN_RADIUS = 2.0, 5, 3


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def background_distance(image: np.ndarray, sigma: float) -> np.ndarray:
    """Euclidean distance in CIELAB between each (blurred) pixel and the background colour,
    the median of the image's border pixels; float32 (H, W)."""
    rgb = np.asarray(image)
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    lab = cv2.cvtColor(cv2.GaussianBlur(rgb, (0, 0), sigma), cv2.COLOR_RGB2LAB).astype(np.float32)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    return np.linalg.norm(lab - np.median(border, axis=0), axis=-1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region not connected to the image border filled in."""
    m = np.pad(mask.astype(np.uint8), 1)
    flood = m.copy()
    cv2.floodFill(flood, np.zeros((m.shape[0] + 2, m.shape[1] + 2), np.uint8), (0, 0), 1)
    return (m | (1 - flood)).astype(bool)[1:-1, 1:-1]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False if there is none)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(mask.shape, bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def grain_mask(image, blur_sigma: float | None = None, close_radius: int | None = None,
               open_radius: int | None = None, convex: bool = True) -> np.ndarray:
    """Boolean (H, W) mask of the grain in one RGB microscope image (values 0-255).

    1. colour distance from the background (:func:`background_distance`) after a Gaussian
       blur of ``blur_sigma``;
    2. Otsu's threshold on it (OpenCV);
    3. closing with a disc of ``close_radius`` (joins a transparent grain's dark rim), hole
       filling (the grain's interior), opening with a disc of ``open_radius`` (drops specks);
    4. the largest connected component, holes filled again;
    5. with ``convex=True``, its convex hull: pollen grains are nearly convex, and the hull
       restores the parts of a pale grain whose faint rim the threshold broke.

    Radii and sigma default to the module constants for 224 px, scaled with the image side.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be one (H, W, 3) RGB image, got shape {image.shape}")
    scale = min(image.shape[:2]) / 224
    sigma = blur_sigma if blur_sigma is not None else max(0.5, BLUR_SIGMA * scale)
    close = close_radius if close_radius is not None else max(1, round(CLOSE_RADIUS * scale))
    opened = open_radius if open_radius is not None else max(1, round(OPEN_RADIUS * scale))
    distance = background_distance(image, sigma)
    scaled = cv2.normalize(distance, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, binary = cv2.threshold(scaled, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, _disc(close))
    binary = fill_holes(binary).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, _disc(opened))
    mask = fill_holes(largest_component(binary))
    if convex and mask.any():
        points = cv2.findNonZero(mask.astype(np.uint8))
        hull = np.zeros(mask.shape, np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
        mask = hull.astype(bool)
    return mask


def grain_masks(images, progress: bool = False, **kwargs) -> np.ndarray:
    """:func:`grain_mask` of every image of a (N, H, W, 3) batch, bool (N, H, W)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a (N, H, W, 3) RGB batch, got shape {images.shape}")
    from tqdm.auto import tqdm

    return np.stack([grain_mask(im, **kwargs) for im in
                     tqdm(images, desc="segmenting grains", disable=not progress, leave=False)]
                    ).reshape(images.shape[:3])


def synthetic_mask_path(root: str | Path, file: str, kind: str = "grain") -> Path:
    """Where :func:`cam.study.synthetic.write_dataset` put the ``kind`` mask of image ``file``
    (``<class>/<stem>.png`` -> ``masks/<stem>_<kind>.png``)."""
    return Path(root) / synthetic.mask_file(file, kind)


def synthetic_masks(root: str | Path, files, size: int, kind: str = "grain") -> np.ndarray:
    """The exact masks of synthetic images ``files`` (paths relative to ``root``, as in the
    fold table), resized to ``size`` like the images (:func:`cam.study.data.load_images`; the
    synthetic images are square, so only resized) with area interpolation and a 50%
    threshold; bool (N, size, size)."""
    files = list(files)
    out = np.empty((len(files), size, size), bool)
    for i, file in enumerate(files):
        path = synthetic_mask_path(root, file, kind)
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise FileNotFoundError(f"no {kind} mask for {file}: {path} is missing or unreadable "
                                    f"(masks are written by cam.study.synthetic.write_dataset)")
        if mask.shape[0] != mask.shape[1]:
            raise ValueError(f"{path} is {mask.shape[1]}x{mask.shape[0]}; synthetic masks are square")
        interpolation = cv2.INTER_AREA if mask.shape[0] > size else cv2.INTER_LINEAR
        out[i] = cv2.resize(mask, (size, size), interpolation=interpolation) >= 128
    return out


def outlined(images, masks, color=(255, 0, 0), thickness: int | None = None) -> np.ndarray:
    """Copies of RGB ``images`` (N, H, W, 3) with each mask's outer outline drawn in ``color``,
    uint8; ``thickness`` defaults to 1 px per 112 px of image side. For checking masks by eye."""
    images = np.clip(np.rint(np.asarray(images)), 0, 255).astype(np.uint8)
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be (N, H, W) = {images.shape[:3]}, got {masks.shape}")
    thickness = thickness or max(1, images.shape[1] // 112)
    out = images.copy()
    for image, mask in zip(out, masks):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(image, contours, -1, color, thickness)
    return out


# --------------------------------------------------------------------------- a segmenter
# Appendix A02 explains a segmentation model with cam.targets.Region: a small encoder-decoder
# that labels each pixel of a synthetic image background (0) or grain (1), trained on the
# exact masks the synthetic images come with.


def build_grain_segmenter(image_size: int = 64, width: int = 16):
    """Encoder (two convolution blocks, each halving the grid) and decoder (two upsampling
    blocks) to (B, H, W, 2) per-pixel softmax scores: background, grain. Takes raw [0, 255]
    RGB pixels. The encoder's last activation is ``"encoder"`` (H/4 x W/4), the layer the
    appendix explains; the decoder's first block reads it and a skip from ``"block1"``."""
    import keras
    from keras import layers as L

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = L.Rescaling(1 / 255, name="rescale")(inputs)
    x = L.Conv2D(width, 3, padding="same", activation="relu", name="conv1")(x)
    block1 = L.MaxPooling2D(2, name="block1")(x)
    x = L.Conv2D(2 * width, 3, padding="same", activation="relu", name="conv2")(block1)
    x = L.MaxPooling2D(2, name="pool2")(x)
    encoder = L.Conv2D(2 * width, 3, padding="same", activation="relu", name="encoder")(x)
    x = L.UpSampling2D(2, interpolation="bilinear", name="up1")(encoder)
    x = L.Concatenate(name="skip")([x, block1])
    x = L.Conv2D(width, 3, padding="same", activation="relu", name="decoder")(x)
    x = L.UpSampling2D(2, interpolation="bilinear", name="up2")(x)
    outputs = L.Conv2D(2, 1, activation="softmax", name="pixels")(x)
    return keras.Model(inputs, outputs, name="grain_segmenter")


def train_grain_segmenter(model, images, masks, epochs: int = 12, batch_size: int = 16,
                          learning_rate: float = 0.003, seed: int = 0) -> dict:
    """Fit ``model`` to label the ``masks`` (N, H, W) bool pixels of ``images`` as grain;
    returns the Keras history (per-epoch loss and pixel accuracy)."""
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(np.asarray(images, np.float32), np.asarray(masks, np.int32),
                        epochs=epochs, batch_size=batch_size, verbose=0)
    return history.history


def mask_iou(predicted, truth) -> np.ndarray:
    """Intersection over union of two stacks of boolean masks (N, H, W), per mask (an empty
    pair counts as 1)."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"mask stacks differ in shape: {predicted.shape} and {truth.shape}")
    inter = (predicted & truth).sum(axis=(1, 2))
    union = (predicted | truth).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)
