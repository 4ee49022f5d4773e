"""Frames as they come: any image the page hands over -> the uint8 RGB square the models were trained on.

Webcam frames arrive as base64 data URLs (Gradio's stream; `load_data_url`), uploads as files
(`load_image_file`), both checked for size before they are decoded; frames handed over as numpy
arrays (the benchmark) are taken as they are. Arrays may be of any size up to 50 megapixels, grayscale (H, W) or
(H, W, 1), RGB or RGBA, uint8, 16-bit or float, mirrored (a selfie preview) or not, and as `None`
between stream events. Value ranges: uint16 frames are 16-bit (0..65535, dark stays dark); other
integer frames hold 8-bit values (0..255); float frames are 0..1 when no value exceeds 1, else 0..255;
anything outside those is refused.
Uploaded files are decoded here, with one clear `ValueError` for anything that is not a readable image
of reasonable size. `model_view` then resizes the way `quant.data` decodes a data set: shorter side to
the model's image size (bicubic, antialiased), centre crop -- for the CIFAR models a 32x32 square.
"""
from __future__ import annotations

import base64
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from quant.data import _resize, float_to_8bit, pil_to_rgb

MAX_PIXELS = 50_000_000   # uploads beyond 50 megapixels are refused, not decoded
MAX_FILE_BYTES = 50 << 20


def to_rgb(frame) -> np.ndarray:
    """A numpy array or PIL image -> uint8 RGB (H, W, 3); alpha is composited over white."""
    if isinstance(frame, Image.Image):
        return _pil_to_rgb(frame)
    if frame is None:
        raise ValueError("no image")
    try:
        a = np.asarray(frame)
    except ValueError:  # a ragged nested sequence
        raise ValueError("expected an image array, got a sequence of rows of different lengths") from None
    if a.dtype == object or not (a.dtype == bool or np.issubdtype(a.dtype, np.number)):
        raise ValueError(f"expected an image array, got an array of {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"the image is empty ({a.shape[1]}x{a.shape[0]} pixels)")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ValueError(f"the image is {a.shape[1]}x{a.shape[0]} pixels; the app takes images up to "
                         f"{MAX_PIXELS / 1e6:.0f} megapixels")
    a = _to_uint8(a)
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:].astype(np.float32) / 255
        return (a[..., :3] * alpha + 255 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """uint8 as is; bool as 0/255; uint16 scaled down; other integers 0..255; floats in 0..1 (or 0..255) scaled.
    `a` is not empty (`to_rgb` checks)."""
    if not a.dtype.isnative:  # big-endian bytes (a '>u2' 16-bit frame, say): the same values in native order
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"expected a real-valued image, got {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        return float_to_8bit(a)
    if a.dtype == np.uint16:  # 16-bit whatever its values, as PIL's 16-bit images: a dark frame stays dark
        return (a // 257).astype(np.uint8)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{a.dtype} image values must lie in 0..255 (8-bit; give 16-bit images as uint16), "
                         f"got {lo}..{hi}")
    return a.astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image as uint8 RGB, pixel for pixel as `quant.data` decodes a data set's."""
    return to_rgb(np.asarray(pil_to_rgb(img)))


def load_image_file(path: str | os.PathLike) -> np.ndarray:
    """Decode an uploaded file into uint8 RGB (H, W, 3), or raise ValueError saying what is wrong with it."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not an image file")
    try:
        nbytes = os.path.getsize(path)
    except OSError:
        raise ValueError("the uploaded file is gone (upload it again)") from None
    if nbytes == 0:
        raise ValueError("the uploaded file is empty")
    if nbytes > MAX_FILE_BYTES:
        raise ValueError(f"the file is {nbytes:,} bytes; the app takes images up to {MAX_FILE_BYTES >> 20} MiB "
                         f"({MAX_FILE_BYTES:,} bytes)")
    return _decode(path)


def load_data_url(url: str) -> np.ndarray:
    """Decode a `data:image/...;base64,...` URL (how Gradio streams webcam frames) into uint8 RGB (H, W, 3),
    refusing it by its length and image header before any pixel is decoded."""
    head, sep, payload = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise ValueError("the page sent a frame that is not a base64 image")
    if len(payload) * 3 // 4 > MAX_FILE_BYTES:
        raise ValueError(f"the frame is over {MAX_FILE_BYTES >> 20} MiB; the app takes images up to "
                         f"{MAX_FILE_BYTES >> 20} MiB")
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise ValueError("the page sent a frame whose base64 data is damaged") from None
    if not data:
        raise ValueError("the page sent an empty frame")
    return _decode(io.BytesIO(data))


def _decode(source) -> np.ndarray:
    """A path or file object of an image -> uint8 RGB (H, W, 3), its pixel count checked from the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h <= MAX_PIXELS:  # else refused below, undecoded
                    img.draft("RGB", (512, 512))  # JPEG: decode at a reduced scale, the models see 32x32 anyway
                    img = ImageOps.exif_transpose(img)  # phone photos: upright as shown (a decoded copy)
    except Image.DecompressionBombError:
        raise ValueError(f"the image is too large to decode (over {MAX_PIXELS / 1e6:.0f} megapixels)") from None
    except UnidentifiedImageError:
        raise ValueError("the file is not an image the app can read (PNG, JPEG, WebP, GIF, BMP, TIFF)") from None
    except Exception as e:  # truncated or damaged data: PIL's errors vary by format (OSError, SyntaxError and
        # EOFError mostly; ValueError from PPM or XPM, IndexError from QOI, NotImplementedError from DDS, ...)
        raise ValueError(f"the image file is truncated or damaged ({e or type(e).__name__})") from None
    if w * h > MAX_PIXELS:
        raise ValueError(f"the image is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels); the app takes "
                         f"images up to {MAX_PIXELS / 1e6:.0f} megapixels")
    return _pil_to_rgb(img)


def model_view(rgb: np.ndarray, size: int, mirrored: bool = False) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 (size, size, 3): un-mirror, shorter side to `size`, centre crop."""
    if mirrored:
        rgb = rgb[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(rgb))
    k = min(img.size) // (4 * size)
    if k >= 2:  # a box reduction first keeps big webcam frames cheap (the bicubic pass then sees <= 8x)
        img = img.reduce(k)
    return _resize(img, size)
