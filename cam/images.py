"""Reading images for the command line (and the study): decode by content, square, resize.

Pillow decodes (so a TIFF named .jpg still reads), OpenCV pads and resizes.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """A file that cannot be decoded to an image."""


def read_rgb(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Decode an image by its content (JPEG, TIFF, PNG ... whatever its name says) to RGB uint8:
    the file at ``path``, or its bytes ``data`` already read (``path`` then names it in errors:
    an archive member, say)."""
    path = Path(path)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: scale to 8 bits (Pillow's RGB conversion would clip it)
                wide = np.asarray(img, dtype=np.float64)
                gray = np.round(wide * 255.0 / max(wide.max(), 1.0)).astype(np.uint8)
                array = np.repeat(gray[..., None], 3, axis=-1)
            else:
                array = np.asarray(img.convert("RGB"))
    except UnidentifiedImageError as err:  # its message names a BytesIO for bytes: say it plainly
        raise ImageError(f"cannot decode {path}: not an image format Pillow reads") from err
    except (OSError, SyntaxError) as err:
        raise ImageError(f"cannot decode {path}: {err}") from err
    if array.size == 0 or min(array.shape[:2]) < 2:
        raise ImageError(f"{path} decodes to an empty image of shape {array.shape}")
    return array


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Pad an image to a square with its median border colour, then resize to ``size``.

    Padding keeps the object's aspect ratio (a plain resize would squash oblong pollen
    grains); the median border colour is the background in microscope images.
    """
    h, w = image.shape[:2]
    side = max(h, w)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    fill = np.median(border, axis=0).astype(image.dtype).tolist()
    top, left = (side - h) // 2, (side - w) // 2
    padded = cv2.copyMakeBorder(
        image, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=fill
    )
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(padded, (size, size), interpolation=interpolation)


def fit_to_input(image: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """An RGB uint8 image made the model's input (``python -m cam explain``'s preprocessing):
    padded to a square with its border colour and resized for a square input (a plain resize
    otherwise), gray for a one-channel model, raw 0-255 pixels (the project's models rescale
    inside the model)."""
    if height == width:
        image = square_resize(image, height)
    else:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    if channels != 3:
        raise ValueError(f"the model takes {channels}-channel images; the command line reads "
                         f"RGB or grayscale images only")
    return image
