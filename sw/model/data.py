"""Deterministic synthetic multi-task scenes: image, semantic labels, depth and edges.

The scenes are small enough to train the tiny preset in minutes on two CPU cores, yet every
target has to be *read from the image*, so a trained model clearly beats the trivial
baselines (:func:`m3vit.sw.model.metrics.baseline_metrics`):

* **Background** (class 0) is a back wall above a random horizon and a floor below it. The
  floor's inverse depth grows linearly towards the bottom row (a ground plane seen by a
  level camera), so its depth varies smoothly from ``FAR_DEPTH`` to ``NEAR_DEPTH``.
* **Foreground objects** (1 to 4 per scene, up to ``4 * W / H`` in wide images) stand on
  the floor at a depth drawn from ``OBJECT_DEPTH_RANGE``: farther objects are smaller
  (apparent size ~ 1 / depth), sit higher (nearer the horizon) and are foggier. They are
  painted far to near, so nearer objects occlude farther ones.
* **Aerial perspective**: every surface is blended towards a dark, grey-blue fog colour by
  ``1 - exp(-depth / FOG_DEPTH)``, so brightness and saturation fall with depth; on the
  floor this is the brightness gradient that gives its depth away.
* **Edges** mark both pixels on either side of a change of instance (object or background),
  which includes every change of class.
* **Noise**: a global exposure factor in [0.9, 1.1] and Gaussian pixel noise (sigma 0.03 on
  the [0, 1] scale) before normalisation with :data:`IMAGE_MEAN` / :data:`IMAGE_STD`.

Class appearance
----------------
Foreground class ``c`` (``i = c - 1``; ``m`` is the number of foreground classes,
``n_classes - 1``, rounded up to a multiple of 4) is:

* hue ``i / m`` of the colour wheel (saturated, so never confused with the grey background),
* texture ``TEXTURES[i % 4]``: solid, horizontal stripes, checker or dots (dark parts at
  0.4 of the base colour, phase random per object), with a period of
  4 pixels below 96-pixel images and 8 pixels otherwise, so that one 4x4 (tiny) or 16x16
  (edge-moe) patch shows at least one full period,
* shape ``SHAPES[i % 3]``: disc, rectangle or upright triangle.

Neighbouring classes always differ in texture. Because ``m`` is a multiple of 4, classes
with the same texture are at least four hue steps apart, also across the wrap-around of the
colour wheel (36 degrees with 40 classes, 72 with 19), so every class is separable from a
single patch.

Splits
------
Image ``i`` of ``make_scenes(..., seed=s)`` is drawn from its own generator seeded with
``SeedSequence(s, spawn_key=(i,))``: the first images do not depend on ``n``, and two seeds
never share an image. Training uses :data:`TRAIN_SEED` (or any seed other than
:data:`TEST_SEED`); held-out evaluation always uses :data:`TEST_SEED`, so held-out scenes are
never trained on.
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import M3VitError

TRAIN_SEED = 0
"""Seed of the training split (any seed other than :data:`TEST_SEED` is a training seed)."""
TEST_SEED = 1
"""Seed of the held-out split; never train on it."""

MIN_IMG_SIDE = 16
MAX_CLASSES = 64

NEAR_DEPTH = 1.5
"""Depth (metres) of the floor at the bottom image row."""
FAR_DEPTH = 10.0
"""Depth (metres) of the back wall, and of the floor at the horizon."""
OBJECT_DEPTH_RANGE = (2.0, 6.0)
"""Depths (metres) objects are drawn from, uniformly."""
FOG_DEPTH = 8.0
"""Attenuation length (metres) of the aerial-perspective fog."""

TEXTURES = ("solid", "stripes", "checker", "dots")
SHAPES = ("disc", "rectangle", "triangle")

# Fixed per-channel constants (not dataset statistics) so every split is normalised alike;
# they bring generated images to roughly zero mean and unit scale.
IMAGE_MEAN = (0.45, 0.44, 0.44)
IMAGE_STD = (0.16, 0.14, 0.12)

_FOG_RGB = np.array([0.22, 0.24, 0.30])
_FLOOR_RGB = np.array([0.72, 0.66, 0.58])
_WALL_RGB = np.array([0.62, 0.64, 0.68])
_PIXEL_NOISE = 0.03
# Apparent radius of an object at 2 m, as a fraction of the shorter image side.
_RADIUS_AT_2M = 0.3


def _check_args(n: int, img_size: tuple[int, int], n_classes: int) -> tuple[int, int]:
    if n < 0:
        raise M3VitError(f"scene count must be >= 0, got {n!r}")
    try:
        h, w = (int(s) for s in img_size)
    except (TypeError, ValueError):
        raise M3VitError(f"img_size must be (height, width), got {img_size!r}") from None
    if h < MIN_IMG_SIDE or w < MIN_IMG_SIDE:
        raise M3VitError(f"img_size must be at least {MIN_IMG_SIDE}x{MIN_IMG_SIDE}, got {h}x{w}")
    if not 2 <= n_classes <= MAX_CLASSES:
        raise M3VitError(f"n_classes must be between 2 and {MAX_CLASSES}, got {n_classes!r}")
    return h, w


def class_appearance(cls: int, n_classes: int) -> tuple[np.ndarray, str, str]:
    """Colour, texture and shape of foreground class ``cls`` (module docstring's scheme).

    Parameters
    ----------
    cls : int
        Foreground class, ``1 <= cls < n_classes``.
    n_classes : int
        Number of classes including the background.

    Returns
    -------
    rgb : numpy.ndarray
        Base colour, shape (3,), in [0, 1] (before fog).
    texture : str
        One of :data:`TEXTURES`.
    shape : str
        One of :data:`SHAPES`.
    """
    if not 1 <= cls < n_classes:
        raise M3VitError(f"foreground class must be in [1, {n_classes}), got {cls!r}")
    i = cls - 1
    hue_steps = 4 * math.ceil((n_classes - 1) / 4)
    rgb = np.array(colorsys.hsv_to_rgb(i / hue_steps, 0.85, 0.95))
    return rgb, TEXTURES[i % len(TEXTURES)], SHAPES[i % len(SHAPES)]


def _texture_period(h: int, w: int) -> int:
    return 4 if min(h, w) < 96 else 8


def _texture_mask(
    texture: str, rows: np.ndarray, cols: np.ndarray, period: int
) -> np.ndarray | None:
    """Dark pixels of ``texture`` given integer object coordinates ``rows`` (H, 1) and
    ``cols`` (1, W); ``None`` for the solid texture (no dark pixels)."""
    half = period // 2
    if texture == "solid":
        return None
    if texture == "stripes":
        return np.broadcast_to((rows // half) % 2 == 1, (rows.shape[0], cols.shape[1]))
    if texture == "checker":
        return (rows // half + cols // half) % 2 == 1
    # dots: a dark disc of radius ~period/4 centred in each period x period cell
    dy = rows % period - (period - 1) / 2
    dx = cols % period - (period - 1) / 2
    return dy * dy + dx * dx <= (period / 4 + 0.3) ** 2


def _shape_mask(shape: str, yc: np.ndarray, xc: np.ndarray, r: float, aspect: float) -> np.ndarray:
    """Pixels inside a shape of half-height ``r`` centred at the origin (pixel-centre coords)."""
    if shape == "disc":
        return yc * yc + xc * xc <= r * r
    if shape == "rectangle":
        return (np.abs(yc) <= r) & (np.abs(xc) <= r * aspect)
    # upright triangle: apex at the top, base (half-width r * aspect) at the bottom
    return (np.abs(yc) <= r) & (np.abs(xc) <= (yc + r) * 0.5 * aspect)


def _fog(rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Blend ``rgb`` (..., 3) towards the fog colour by ``1 - exp(-depth / FOG_DEPTH)``."""
    f = (1.0 - np.exp(-depth / FOG_DEPTH))[..., None]
    return rgb * (1.0 - f) + _FOG_RGB * f


def _fog_colour(rgb: np.ndarray, depth: float) -> np.ndarray:
    """:func:`_fog` of one colour at one depth (scalar arithmetic, it runs per object)."""
    f = 1.0 - math.exp(-depth / FOG_DEPTH)
    return rgb * (1.0 - f) + _FOG_RGB * f


def _max_objects(h: int, w: int) -> int:
    # Four objects per square of image, so wide images are not left mostly empty.
    return max(4, round(4 * w / h))


def _render_scene(
    rng: np.random.Generator, h: int, w: int, appearance: list[tuple[np.ndarray, str, str]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One scene: image (H, W, 3) in [0, 1] before noise, semseg, depth, instance ids.

    ``appearance[c]`` is :func:`class_appearance` of class ``c`` (entry 0 unused).
    """
    n_classes = len(appearance)
    side = min(h, w)
    period = _texture_period(h, w)
    yy = np.arange(h, dtype=np.float64)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float64)[None, :] + 0.5
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]

    horizon = rng.uniform(0.3, 0.5) * h
    # Floor: inverse depth linear in the row, FAR_DEPTH at the horizon, NEAR_DEPTH at the
    # bottom; the wall above the horizon is at FAR_DEPTH. Both depend on the row only.
    t = np.clip((yy[:, 0] - horizon) / (h - horizon), 0.0, 1.0)
    row_depth = 1.0 / (1 / FAR_DEPTH + (1 / NEAR_DEPTH - 1 / FAR_DEPTH) * t)
    tint = rng.uniform(-0.05, 0.05, size=3)
    row_base = np.where((yy >= horizon), _FLOOR_RGB + tint, _WALL_RGB + tint)
    rgb = np.repeat(_fog(row_base, row_depth)[:, None, :], w, axis=1)
    depth = np.repeat(row_depth[:, None], w, axis=1)
    semseg = np.zeros((h, w), dtype=np.int64)
    instance = np.zeros((h, w), dtype=np.int64)

    n_objects = int(rng.integers(1, _max_objects(h, w) + 1))
    classes = rng.integers(1, n_classes, size=n_objects)
    depths = rng.uniform(*OBJECT_DEPTH_RANGE, size=n_objects)
    # One draw for the remaining per-object parameters: size jitter, aspect, column, phase.
    params = rng.random((n_objects, 5))
    order = np.argsort(-depths, kind="stable")  # far to near: nearer ones occlude
    for inst_id, k in enumerate(order, start=1):
        cls, z = int(classes[k]), float(depths[k])
        colour, texture, shape = appearance[cls]
        jitter, aspect, column, phase_y, phase_x = params[k]
        r = _RADIUS_AT_2M * side * (2.0 / z) * (0.8 + 0.4 * jitter)
        aspect = 0.7 + 0.7 * aspect
        # The object stands on the floor: its bottom is the floor row at its depth.
        t_z = (1 / z - 1 / FAR_DEPTH) / (1 / NEAR_DEPTH - 1 / FAR_DEPTH)
        cy = horizon + t_z * (h - horizon) - r
        cx = column * w
        yc, xc = yy - cy, xx - cx
        inside = _shape_mask(shape, yc, xc, r, aspect)
        # Texture in object coordinates with a random phase, so it moves with the object.
        dark = _texture_mask(
            texture,
            rows - math.floor(cy) + int(phase_y * period),
            cols - math.floor(cx) + int(phase_x * period),
            period,
        )
        rgb[inside] = _fog_colour(colour, z)
        if dark is not None:
            rgb[inside & dark] = _fog_colour(0.4 * colour, z)
        depth[inside] = z
        semseg[inside] = cls
        instance[inside] = inst_id

    rgb *= rng.uniform(0.9, 1.1)  # global exposure
    return rgb, semseg, depth, instance


def _instance_edges(instance: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another instance (both sides of each boundary)."""
    edge = np.zeros(instance.shape, dtype=bool)
    vertical = instance[1:, :] != instance[:-1, :]
    horizontal = instance[:, 1:] != instance[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def make_scenes(
    n: int, img_size: tuple[int, int], *, n_classes: int, seed: int
) -> dict[str, torch.Tensor]:
    """Generate ``n`` synthetic multi-task scenes (module docstring for what they show).

    Parameters
    ----------
    n : int
        Number of scenes.
    img_size : tuple of int
        (height, width) in pixels, each at least 16.
    n_classes : int
        Semantic classes including the background class 0, from 2 to 64.
    seed : int
        Split seed. Image ``i`` depends only on ``(seed, i)``, never on ``n`` or on any
        global random state. Use :data:`TRAIN_SEED` for training and :data:`TEST_SEED` for
        held-out evaluation.

    Returns
    -------
    dict of str to torch.Tensor
        ``"image"``: float32 (n, 3, H, W), normalised with :data:`IMAGE_MEAN` /
        :data:`IMAGE_STD`; ``"semseg"``: int64 (n, H, W) in ``[0, n_classes)``;
        ``"depth"``: float32 (n, 1, H, W) in metres, in ``[NEAR_DEPTH, FAR_DEPTH]``;
        ``"edge"``: float32 (n, 1, H, W) of 0/1 instance boundaries.

    Raises
    ------
    M3VitError
        For a negative ``n``, an image side below 16 or ``n_classes`` outside [2, 64].
    """
    h, w = _check_args(n, img_size, n_classes)
    image = np.empty((n, 3, h, w), dtype=np.float32)
    semseg = np.empty((n, h, w), dtype=np.int64)
    depth = np.empty((n, 1, h, w), dtype=np.float32)
    edge = np.empty((n, 1, h, w), dtype=np.float32)
    mean = np.array(IMAGE_MEAN)[:, None, None]
    std = np.array(IMAGE_STD)[:, None, None]
    appearance = [(np.zeros(3), "solid", "disc")]  # background placeholder, never drawn
    appearance += [class_appearance(c, n_classes) for c in range(1, n_classes)]
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        rgb, semseg[i], depth[i, 0], instance = _render_scene(rng, h, w, appearance)
        rgb = rgb.transpose(2, 0, 1) + rng.normal(0.0, _PIXEL_NOISE, size=(3, h, w))
        image[i] = (rgb - mean) / std
        edge[i, 0] = _instance_edges(instance)
    return {
        "image": torch.from_numpy(image),
        "semseg": torch.from_numpy(semseg),
        "depth": torch.from_numpy(depth),
        "edge": torch.from_numpy(edge),
    }


class SceneDataset(Dataset):
    """Map-style dataset over a dict of equally long tensors (e.g. :func:`make_scenes`).

    Item ``i`` is ``{key: tensor[i]}``, which PyTorch's default collate stacks back into a
    batch dict.

    Parameters
    ----------
    tensors : mapping of str to torch.Tensor
        Per-sample tensors sharing their first dimension.

    Raises
    ------
    M3VitError
        If ``tensors`` is empty or the first dimensions differ.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise M3VitError("SceneDataset needs at least one tensor")
        lengths = {k: int(v.shape[0]) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise M3VitError(f"SceneDataset tensors differ in length: {lengths}")
        self.tensors = dict(tensors)
        self._len = next(iter(lengths.values()))

    @classmethod
    def generate(
        cls, n: int, img_size: tuple[int, int], *, n_classes: int, seed: int
    ) -> SceneDataset:
        """Dataset of ``make_scenes(n, img_size, n_classes=n_classes, seed=seed)``."""
        return cls(make_scenes(n, img_size, n_classes=n_classes, seed=seed))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


def denormalize_image(image: torch.Tensor) -> torch.Tensor:
    """Undo the :data:`IMAGE_MEAN` / :data:`IMAGE_STD` normalisation; (..., 3, H, W) in [0, 1]."""
    mean = torch.tensor(IMAGE_MEAN, dtype=image.dtype)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=image.dtype)[:, None, None]
    return (image * std + mean).clamp(0.0, 1.0)


def save_scene_images(images: torch.Tensor, path: str | os.PathLike[str], *,
                      overwrite: bool = False) -> list[Path]:
    """Save each scene's image alone as an 8-bit RGB PNG, as a camera would have taken it.

    Parameters
    ----------
    images : torch.Tensor
        (n, 3, H, W) normalised images (:func:`make_scenes`'s ``"image"``).
    path : str or os.PathLike
        The PNG for one image; for more, its stem gets ``-0``, ``-1``, … .
    overwrite : bool
        Replace files that exist; otherwise an existing file is an error.

    Returns
    -------
    list of Path
        The files written.
    """
    from PIL import Image

    path = Path(path)
    n = int(images.shape[0])
    paths = [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}")
                                   for i in range(n)]
    for p in paths:
        if p.exists() and not overwrite:
            raise M3VitError(f"{p} exists: pass --force to overwrite it or choose another --out")
    pixels = (denormalize_image(images.float()) * 255).round().to(torch.uint8)
    for p, image in zip(paths, pixels, strict=True):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(p, format="PNG")
    return paths


_COLUMN_TITLES = {
    "image": "image",
    "semseg": "semseg",
    "depth": f"depth ({NEAR_DEPTH:g}-{FAR_DEPTH:g} m, bright=near)",
    "edge": "edge",
}


def save_scene_figure(
    scenes: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    n: int = 4,
    *,
    n_classes: int | None = None,
) -> None:
    """Save a PNG grid of image, semseg, depth and edge for the first ``n`` scenes.

    Parameters
    ----------
    scenes : mapping of str to torch.Tensor
        Output of :func:`make_scenes` (or predictions in the same layout); the ``"image"``
        key is required, missing target keys leave their column out.
    path : str or os.PathLike
        Destination PNG.
    n : int
        Rows to draw (capped at the number of scenes).
    n_classes : int, optional
        Class count, which sets the label colours; by default one more than the largest
        label in ``scenes["semseg"]``. Each class is drawn in its base colour
        (:func:`class_appearance`), the background in black.
    """
    # Figure + savefig renders through Agg without touching pyplot's global backend.
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if "image" not in scenes:
        raise M3VitError("save_scene_figure needs an 'image' tensor")
    columns = [k for k in ("image", "semseg", "depth", "edge") if k in scenes]
    rows = min(n, int(scenes["image"].shape[0]))
    if rows < 1:
        raise M3VitError(f"save_scene_figure needs at least one scene, got n={n!r}")
    _, _, h, w = scenes["image"].shape
    cell = 2.2
    fig = Figure(figsize=(cell * len(columns) * max(w / h, 1.0), cell * rows), dpi=100)
    axes = fig.subplots(rows, len(columns), squeeze=False)
    if "semseg" in scenes:
        n_classes = n_classes or max(int(scenes["semseg"].max()) + 1, 2)
        label_colours = [(0.0, 0.0, 0.0)] + [
            tuple(class_appearance(c, n_classes)[0]) for c in range(1, n_classes)
        ]
        label_cmap = ListedColormap(label_colours)
    for r in range(rows):
        for c, key in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(_COLUMN_TITLES[key], fontsize=9)
            x = scenes[key][r].detach().cpu()
            if key == "image":
                ax.imshow(denormalize_image(x.float()).permute(1, 2, 0).numpy())
            elif key == "semseg":
                ax.imshow(x.numpy(), cmap=label_cmap, vmin=-0.5, vmax=n_classes - 0.5,
                          interpolation="nearest")
            elif key == "depth":
                ax.imshow(x[0].numpy(), cmap="viridis_r", vmin=NEAR_DEPTH, vmax=FAR_DEPTH)
            else:
                ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    fig.tight_layout()
    fig.savefig(os.fspath(path))
