"""Reading a user's image files and fitting them, and their label maps, to a model's input.

Every model of the toolkit, whatever it was trained on (synthetic scenes or NYUD-v2), takes
images normalised one way: RGB in [0, 1], then per channel ``(x - IMAGE_MEAN) / IMAGE_STD``
with :data:`m3vit.sw.model.data.IMAGE_MEAN` / :data:`~m3vit.sw.model.data.IMAGE_STD`. So a
photograph is read, made RGB, fitted to the preset's ``img_size`` and normalised by
:func:`load_image` exactly as the training data was.

Reading (:func:`read_image`, Pillow)
    8-bit RGB, greyscale (``L``, copied to three channels), with alpha (``RGBA``, ``LA``:
    composited on black, as the alpha would be were the picture displayed on a black
    screen), palette (``P``), CMYK/YCbCr (converted by Pillow) and 16-bit greyscale PNGs
    (``I;16``: scaled by 1/65535, no 8-bit rounding on the way). A 32-bit float image
    (``F``) is stretched from its own minimum to its maximum. EXIF orientation is applied,
    so a phone picture is upright. An animated GIF or a multi-page TIFF gives its first
    frame.

Fitting (:func:`fit`)
    Scale so the picture *covers* ``img_size`` keeping its aspect ratio (bilinear, with
    antialiasing when shrinking), then crop the centre. No padding, no stretching: a
    640x480 (width x height) photograph for the 128x256 (height x width) ``edge-moe`` is
    scaled to 256x192 and its middle 128 rows are kept. Label maps are fitted the
    same way with nearest-neighbour sampling (``nearest=True``), so labels stay labels and
    the pixels line up with the image's.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import M3VitError
from .data import IMAGE_MEAN, IMAGE_STD

__all__ = ["IMAGE_SUFFIXES", "fit", "image_files", "load_image", "model_input", "normalise",
           "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
"""File endings ``--image-dir`` picks up (case-insensitive)."""

# A decompression bomb is refused, from its header, before it can exhaust memory. Pillow
# warns above ~89 M pixels and refuses above ~179 M; this tool reads up to 2**27 (134 M)
# without Pillow's warning and refuses more in one line.
_MAX_PIXELS = 1 << 27


def read_image(source) -> np.ndarray:
    """Read an image file (or a ``PIL.Image.Image``) as RGB float32 (H, W, 3) in [0, 1].

    Raises
    ------
    M3VitError
        One line naming the file when it is missing, not an image, empty, truncated or
        absurdly large.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        # An image from Image.open decodes lazily: a cut-off file fails here, by its name.
        name = getattr(source, "filename", "") or "image"
        try:
            source.load()
            return _to_rgb(ImageOps.exif_transpose(source) or source, name)
        except (OSError, SyntaxError, ValueError) as e:
            raise M3VitError(f"{name}: damaged or truncated image ({_first_line(e)})") from None
    path = Path(source)
    name = str(path)
    if not path.exists():
        raise M3VitError(f"{name}: no such file")
    if path.is_dir():
        raise M3VitError(f"{name}: is a folder (use --image-dir for a folder of images)")
    if path.stat().st_size == 0:
        raise M3VitError(f"{name}: empty file (0 bytes), not an image")

    def too_big(size: str = "") -> M3VitError:
        return M3VitError(f"{name}: too many pixels{size} for this tool ({_MAX_PIXELS:,} "
                          "at most); scale it down first")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > _MAX_PIXELS:
                raise too_big(f" ({img.width}x{img.height})")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img, name)
    except UnidentifiedImageError:
        raise M3VitError(f"{name}: not an image Pillow can read") from None
    except Image.DecompressionBombError:
        # Refused by Pillow at open (over twice its limit), before the size is known here.
        raise too_big() from None
    except PermissionError:
        raise M3VitError(f"{name}: permission denied (make it readable)") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports a cut-off file as OSError("image file is truncated ...").
        raise M3VitError(f"{name}: damaged or truncated image ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def _to_rgb(img, name: str) -> np.ndarray:
    """A loaded Pillow image as float32 RGB in [0, 1] (see the module docstring)."""
    if img.width < 1 or img.height < 1:
        raise M3VitError(f"{name}: zero-size image ({img.width}x{img.height})")
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale PNGs open as I;16 (newer Pillow) or I (32-bit); their range is
        # 0..65535 either way.
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a / 65535.0, 0.0, 1.0)
        return np.repeat(a[..., None], 3, axis=2).astype(np.float32)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return np.repeat(a[..., None], 3, axis=2).astype(np.float32)
    try:
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            return rgba[..., :3] * rgba[..., 3:4]
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except ValueError:
        # Pillow cannot convert a few rare modes to RGB (premultiplied "La").
        raise M3VitError(f"{name}: colour mode {mode} is not supported; save it as RGB "
                         "first") from None


def fit(array: torch.Tensor, size: tuple[int, int], *, nearest: bool = False) -> torch.Tensor:
    """Scale (C, H, W) ``array`` to cover ``size`` keeping its aspect, then crop the centre.

    Parameters
    ----------
    array : torch.Tensor
        (C, H, W) image (float) or label/target map (any dtype with ``nearest=True``).
    size : tuple of int
        (height, width) wanted.
    nearest : bool
        Nearest-neighbour sampling (label maps, depth with holes); else bilinear with
        antialiasing.

    Returns
    -------
    torch.Tensor
        (C, *size), the dtype of ``array``.
    """
    _, h, w = array.shape
    th, tw = size
    scale = max(th / h, tw / w)
    # Round so the scaled side never falls a pixel short of the target.
    sh, sw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = array.unsqueeze(0)
    if (sh, sw) != (h, w):
        if nearest:
            x = F.interpolate(x.double(), size=(sh, sw), mode="nearest-exact").to(array.dtype)
        else:
            x = F.interpolate(x.float(), size=(sh, sw), mode="bilinear", align_corners=False,
                              antialias=sh < h or sw < w).to(array.dtype)
    top, left = (sh - th) // 2, (sw - tw) // 2
    return x[0, :, top:top + th, left:left + tw].contiguous()


def normalise(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] → the model's input normalisation (module docstring)."""
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=torch.float32)[:, None, None]
    return (rgb.float() - mean) / std


def model_input(rgb: torch.Tensor, img_size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] of any size → the model's input: fitted to ``img_size``
    (:func:`fit`) and normalised (:func:`normalise`)."""
    return normalise(fit(rgb, tuple(img_size)).clamp(0.0, 1.0))


def load_image(source, img_size: tuple[int, int]) -> torch.Tensor:
    """Read, fit and normalise one image for a model of input ``img_size``: (3, H, W).

    ``source`` is a path or a ``PIL.Image.Image``; errors as :func:`read_image`.
    """
    return model_input(torch.from_numpy(read_image(source)).permute(2, 0, 1), img_size)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of ``folder`` (by :data:`IMAGE_SUFFIXES`), sorted by name.

    Raises
    ------
    M3VitError
        If the folder does not exist or holds no image file.
    """
    path = Path(folder)
    if not path.is_dir():
        raise M3VitError(f"{path}: no such folder")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise M3VitError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files
