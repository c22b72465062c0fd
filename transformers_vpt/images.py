"""The one image loader of the project: every path (pipeline, CLI, evaluation, LLaMA-Factory plugin, data tools)
opens images here, so that an image, its region boxes and its crops are always in the same pixels.

Rules:

* **Viewer pixels.** The EXIF orientation is applied (`PIL.ImageOps.exif_transpose`) before anything else: sizes,
  crop boxes (``path_x0,y0,x1,y1``), region boxes and drawings refer to the image as a viewer shows it.
* **8-bit RGB.** 16-bit and 32-bit integer images are scaled to 8 bits (``value / 257``), float images from [0, 1]
  (or clipped to [0, 255] when their values are larger), transparent images are composited on white (as
  transformers' ``convert_to_rgb`` does), everything else is converted with PIL.
* **Errors per image.** A missing, unreadable, truncated or too large (`PIL.Image.DecompressionBombError`) file
  raises `ImageLoadError`, a `VPTUserError` naming the file, so callers can report it per record.
"""

from __future__ import annotations

import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from .errors import VPTUserError

__all__ = [
    "IMAGE_RESOLUTION",
    "MIN_IMAGE_SIDE",
    "ImageInput",
    "ImageLoadError",
    "cap_image",
    "fit_image",
    "image_size",
    "load_image",
    "to_rgb",
]

IMAGE_RESOLUTION = 512
"""The released long-side cap (``image_resolution``) of every image the Qwen-VL tower sees, and of DINOv2 inputs."""
SEG_IMAGE_RESOLUTION = 1024
"""The released long-side cap of SAM inputs."""
MIN_IMAGE_SIDE = 28
"""Sides shorter than this are stretched to it (released rule; one 28-pixel patch of Qwen2-VL's 2x2 merge)."""
MAX_ASPECT_RATIO = 200
"""A longer/shorter side ratio above this is squeezed to 180:1 (released rule; Qwen2-VL refuses more than 200)."""

ImageInput = Union[Image.Image, str, os.PathLike]

# EXIF orientations that swap width and height (transpose, rotate 90, transverse, rotate 270).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageLoadError(VPTUserError):
    """An image that cannot be opened or decoded (the message names the file and the reason)."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """An ``L`` image of a 16/32-bit integer or float single-channel image, scaled instead of clipped."""
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        values = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        values = values.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in viewer orientation as an 8-bit RGB image (see the module rules); the input is not changed."""
    image = ImageOps.exif_transpose(image)  # a copy (without the orientation tag) or the image itself
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _open_errors(path: str, error: BaseException) -> ImageLoadError:
    if isinstance(error, FileNotFoundError):
        return ImageLoadError(f"missing image file {path}")
    if isinstance(error, Image.DecompressionBombError):
        return ImageLoadError(f"image {path} is too large to decode safely ({error})")
    reason = " ".join(str(error).split()) or type(error).__name__
    return ImageLoadError(f"cannot read image {path}: {reason}")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` in viewer pixels (EXIF orientation applied), read from the header only."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                orientation = image.getexif().get(_EXIF_ORIENTATION)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise _open_errors(path, error) from error
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def load_image(source: ImageInput) -> Image.Image:
    """An 8-bit RGB image in viewer pixels from a PIL image, a path, or a crop path ``"path_x0,y0,x1,y1"``.

    The crop box of a crop path is in viewer pixels and must lie inside the image (it is never padded).

    Raises:
        ImageLoadError: The file is missing, unreadable, truncated or too large, or the crop box lies outside it.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    from .regions import split_crop_path  # regions imports this module

    text = os.fspath(source)
    try:
        path, box = split_crop_path(text)
    except ValueError as error:
        raise ImageLoadError(str(error)) from error
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, inside the error handling
            image = to_rgb(opened)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise _open_errors(path, error) from error
    if box is None:
        return image
    if box[2] > image.width or box[3] > image.height:
        raise ImageLoadError(f"crop box {box} of {text!r} lies outside the {image.width}x{image.height} image")
    return image.crop(box)


def cap_image(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` downscaled (NEAREST) so that its long side is at most ``max_side``; None or 0 means no cap."""
    if max_side is not None and (not isinstance(max_side, int) or isinstance(max_side, bool) or max_side < 0):
        raise ValueError(f"max_side must be a non-negative integer or None, got {max_side!r}")
    width, height = image.size
    if not max_side or max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    return image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.NEAREST)


def fit_image(image: Image.Image, max_side: int | None = IMAGE_RESOLUTION) -> Image.Image:
    """The released image rule, applied before every image processor (main images, crops, re-encoded images).

    1. the long side is capped at ``max_side`` (`cap_image`: NEAREST, sides truncated; None or 0: no cap);
    2. a side under `MIN_IMAGE_SIDE` is stretched to it, the other side kept (NEAREST);
    3. an aspect ratio over `MAX_ASPECT_RATIO` is squeezed to 180:1 (NEAREST).
    """
    image = cap_image(image, max_side)
    if min(image.size) < MIN_IMAGE_SIDE:
        image = image.resize((max(image.width, MIN_IMAGE_SIDE), max(image.height, MIN_IMAGE_SIDE)), Image.NEAREST)
    if image.width / image.height > MAX_ASPECT_RATIO:
        image = image.resize((image.height * 180, image.height), Image.NEAREST)
    elif image.height / image.width > MAX_ASPECT_RATIO:
        image = image.resize((image.width, image.width * 180), Image.NEAREST)
    return image
