"""Pictures a person can read from a run's predictions: ``m3vit run --out DIR``.

For every image ``NAME`` (a file's stem, a NYUD-v2 id, or ``image<i>`` for synthetic
scenes) and every task ``TASK`` of the run, :func:`write_pictures` writes into the folder:

``NAME.TASK.png``
    *semseg*: the argmax class map at the model's input size, an indexed (mode ``P``) PNG
    whose palette is :func:`class_palette` (pixel value = class index); *depth*: the depth
    in metres in the ``magma`` colour map, bright = near, stretched from the image's own
    nearest to its farthest prediction, which the PNG keeps as the text chunks
    ``depth_min_m`` and ``depth_max_m``; *edge*: a black/white mask, white where the edge
    logit is above 0.
``NAME.TASK.npy``
    The raw float prediction (n_out, H, W) for that image: what
    :attr:`TaskOutputs.predictions <m3vit.sw.runtime.driver.TaskOutputs.predictions>` holds.
``NAME.png``
    One figure: the input as the model saw it (fitted, de-normalised) beside each task's
    picture, with the classes it shows (semseg) or its colour bar in metres (depth).
``legend.TASK.png``
    Once per run and semseg task: every class index, its colour and its name (``class k``).

The class palette is the PASCAL VOC label colour map, extended to any number of classes:
the bits of the class index, three at a time, set the high bits of red, green and blue
(class 0 black, 1 dark red, 2 dark green, 3 olive, 4 navy, …). It gives every index below
256 its own colour and keeps the first classes far apart.

Nothing in the folder is overwritten unless ``force`` is given; :func:`output_files` names
every file a run will write, so a caller can check before spending the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import M3VitError
from ..model.config import ModelConfig, TaskSpec
from ..model.data import denormalize_image
from ..model.imageio import load_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = [
    "DEPTH_COLOUR_MAP",
    "LEGEND_PREFIX",
    "class_palette",
    "depth_picture",
    "depth_range",
    "edge_picture",
    "legend_figure",
    "output_files",
    "output_names",
    "read_images",
    "semseg_picture",
    "side_by_side",
    "task_picture",
    "write_pictures",
]

#: Matplotlib colour map of the depth pictures; drawn reversed so that near is bright.
DEPTH_COLOUR_MAP = "magma"
#: Stem of the per-run legend of each semseg task (``legend.TASK.png``).
LEGEND_PREFIX = "legend"
#: Classes a figure's legend lists (the most pixels first); legend.TASK.png has them all.
_FIGURE_LEGEND_CLASSES = 10
_MAX_PALETTE = 256  # an indexed PNG holds at most 256 colours


def class_palette(n_classes: int) -> np.ndarray:
    """The colour of every class: the PASCAL VOC label colour map (module docstring).

    Parameters
    ----------
    n_classes : int
        Classes including the background class 0; 1 to 256.

    Returns
    -------
    numpy.ndarray
        (n_classes, 3) uint8 RGB, row ``k`` the colour of class ``k``; no two rows equal.

    Raises
    ------
    M3VitError
        For a count outside 1 … 256 (an indexed PNG holds at most 256 colours).
    """
    if not 1 <= n_classes <= _MAX_PALETTE:
        raise M3VitError(f"a class palette has 1 to {_MAX_PALETTE} colours, got {n_classes!r}")
    index = np.arange(n_classes)
    rgb = np.zeros((n_classes, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            rgb[:, channel] |= (((index >> (3 * bit + channel)) & 1) << (7 - bit)).astype(
                np.uint8)
    return rgb


def _array(prediction) -> np.ndarray:
    """A (n_out, H, W) prediction as a float numpy array."""
    x = prediction.detach().cpu().numpy() if isinstance(prediction, torch.Tensor) else (
        np.asarray(prediction))
    if x.ndim != 3:
        raise M3VitError(f"a prediction is (n_out, H, W), got shape {x.shape}")
    return x


def semseg_picture(prediction) -> Image.Image:
    """The argmax class map of one semseg prediction as an indexed PNG image.

    Parameters
    ----------
    prediction : torch.Tensor or numpy.ndarray
        (n_classes, H, W) class scores of one image.

    Returns
    -------
    PIL.Image.Image
        Mode ``P``, (W, H) pixels, each the index of its class; the palette is
        :func:`class_palette` of ``n_classes``.
    """
    from PIL import Image

    scores = _array(prediction)
    n_classes = scores.shape[0]
    labels = scores.argmax(axis=0).astype(np.uint8)
    picture = Image.fromarray(labels)        # mode L ...
    picture.putpalette(class_palette(n_classes).tobytes())   # ... becomes P
    return picture


def depth_range(prediction) -> tuple[float, float]:
    """The nearest and farthest depth (metres) of one depth prediction (1, H, W)."""
    depth = _array(prediction)[0]
    return float(depth.min()), float(depth.max())


def depth_picture(prediction) -> Image.Image:
    """One depth prediction in the depth colour map, bright = near, with its scale.

    Parameters
    ----------
    prediction : torch.Tensor or numpy.ndarray
        (1, H, W) depth in metres.

    Returns
    -------
    PIL.Image.Image
        RGB, (W, H) pixels; the image's nearest depth is the colour map's brightest
        colour, its farthest the darkest. ``picture.info`` holds ``depth_min_m`` and
        ``depth_max_m`` (:func:`depth_range`, as text), which :func:`write_pictures` saves
        as PNG text chunks.
    """
    from matplotlib import colormaps
    from PIL import Image

    depth = _array(prediction)[0].astype(np.float64)
    near, far = depth_range(prediction)
    cmap = colormaps[DEPTH_COLOUR_MAP]
    lut = np.round(cmap(np.arange(cmap.N))[:, :3] * 255).astype(np.uint8)
    # A flat prediction has no scale to stretch: all of it is drawn as the nearest.
    t = (far - depth) / (far - near) if far > near else np.ones_like(depth)
    picture = Image.fromarray(lut[np.round(t * (cmap.N - 1)).astype(np.intp)])
    picture.info.update({"depth_min_m": f"{near:.6g}", "depth_max_m": f"{far:.6g}",
                         "colour_map": f"{DEPTH_COLOUR_MAP}, bright = near"})
    return picture


def edge_picture(prediction) -> Image.Image:
    """One edge prediction as a mask: white (255) where the logit is above 0, else black.

    Parameters
    ----------
    prediction : torch.Tensor or numpy.ndarray
        (1, H, W) edge logits.

    Returns
    -------
    PIL.Image.Image
        Mode ``L``, (W, H) pixels of 0 and 255.
    """
    from PIL import Image

    return Image.fromarray(np.where(_array(prediction)[0] > 0, 255, 0).astype(np.uint8))


def task_picture(spec: TaskSpec, prediction) -> Image.Image:
    """:func:`semseg_picture`, :func:`depth_picture` or :func:`edge_picture` by task kind."""
    pictures: dict[str, Callable] = {"semseg": semseg_picture, "depth": depth_picture,
                                     "edge": edge_picture}
    return pictures[spec.kind](prediction)


def _pictured_tasks(model: ModelConfig, tasks: Sequence[str]) -> list[TaskSpec]:
    return [model.task(task) for task in tasks]


def output_names(stems: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """One distinct output name per image, from its file stem.

    A stem whose files would clash with an earlier image's (two ``photo.jpg`` in different
    folders, ``photo.png`` beside ``photo.jpg``) or with a legend (an image called
    ``legend``) gets ``-2``, ``-3``, … appended. Names are compared without case, for the
    file systems that ignore it.

    Parameters
    ----------
    stems : sequence of str
        The images' file stems, in order.
    tasks : sequence of str
        The run's tasks (their files are part of each name's).

    Returns
    -------
    list of str
        Names in the order of ``stems``.
    """
    claimed = {f"{LEGEND_PREFIX}.{task}.png".lower() for task in tasks}
    names = []
    for stem in stems:
        stem = stem or "image"
        for k in range(1, len(stems) + 2):
            name = stem if k == 1 else f"{stem}-{k}"
            files = {f.lower() for f in _image_files(name, tasks)}
            if not files & claimed:
                break
        claimed |= files
        names.append(name)
    return names


def _image_files(name: str, tasks: Sequence[str]) -> list[str]:
    return [f"{name}.{task}.{ext}" for task in tasks for ext in ("png", "npy")] + [f"{name}.png"]


def output_files(names: Sequence[str], model: ModelConfig, tasks: Sequence[str]) -> list[str]:
    """Every file name :func:`write_pictures` writes for ``names`` and ``tasks``, in order."""
    legends = [f"{LEGEND_PREFIX}.{spec.name}.png" for spec in _pictured_tasks(model, tasks)
               if spec.kind == "semseg"]
    return legends + [f for name in names for f in _image_files(name, tasks)]


def _open_new(path: Path, force: bool):
    """``path`` opened for writing; refused if it exists, unless ``force``."""
    try:
        return open(path, "wb" if force else "xb")
    except FileExistsError:
        raise M3VitError(f"{path} exists: pass --force to overwrite it or choose another "
                         "--out") from None


def write_pictures(out: str | os.PathLike, names: Sequence[str], images: torch.Tensor,
                   predictions: Mapping[str, torch.Tensor], model: ModelConfig, *,
                   force: bool = False, title: str = "") -> list[Path]:
    """Write the pictures of a run into ``out`` (the files of the module docstring).

    Parameters
    ----------
    out : path-like
        The folder; created if missing.
    names : sequence of str
        One distinct name per image (:func:`output_names`).
    images : torch.Tensor
        (N, 3, H, W) the normalised images the model ran on.
    predictions : mapping of str to torch.Tensor
        Per task its (N, n_out, H, W) float predictions.
    model : ModelConfig
        The model that ran (each task's kind and class count).
    force : bool
        Overwrite files that exist; otherwise one existing file is an error.
    title : str
        Added to each figure's title (say, the model and the board).

    Returns
    -------
    list of Path
        The files written, in the order of :func:`output_files`.

    Raises
    ------
    M3VitError
        If ``out`` is a file, or a file to write exists and ``force`` is not given.
    """
    from PIL.PngImagePlugin import PngInfo

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise M3VitError(f"{folder} is a file, not a folder: choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    if len(names) != len(images) or len(set(names)) != len(names):
        raise M3VitError(f"need one distinct name per image, got {len(names)} for "
                         f"{len(images)} images")
    specs = _pictured_tasks(model, list(predictions))
    written = []
    for spec in specs:
        if spec.kind == "semseg":
            path = folder / f"{LEGEND_PREFIX}.{spec.name}.png"
            with _open_new(path, force) as f:
                legend_figure(spec.n_out, spec.name).savefig(f, format="png")
            written.append(path)
    for i, name in enumerate(names):
        panels = {}
        for spec in specs:
            prediction = _array(predictions[spec.name][i])
            picture = task_picture(spec, prediction)
            info = PngInfo()
            for key, value in picture.info.items():
                info.add_text(key, value)
            path = folder / f"{name}.{spec.name}.png"
            with _open_new(path, force) as f:
                picture.save(f, format="PNG", pnginfo=info)
            written.append(path)
            path = folder / f"{name}.{spec.name}.npy"
            with _open_new(path, force) as f:
                np.save(f, prediction)
            written.append(path)
            panels[spec.name] = prediction
        path = folder / f"{name}.png"
        figure = side_by_side(images[i], panels, model,
                              title=f"{name}: {title}" if title else name)
        with _open_new(path, force) as f:
            figure.savefig(f, format="png")
        written.append(path)
    return written


def legend_figure(n_classes: int, task: str = "semseg") -> Figure:
    """Every class of a semseg task: its index, its colour and its name (``class k``).

    Returns
    -------
    matplotlib.figure.Figure
        Columns of at most 20 classes, each a colour swatch and ``k  class k``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    palette = class_palette(n_classes) / 255.0
    per_column = 20
    columns = math.ceil(n_classes / per_column)
    rows = min(n_classes, per_column)
    fig = Figure(figsize=(1.9 * columns, 0.26 * rows + 0.45), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.4 / (0.26 * rows + 0.45)))
    ax.set_xlim(0, columns)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    for k in range(n_classes):
        col, row = divmod(k, per_column)
        ax.add_patch(Rectangle((col + 0.06, row + 0.12), 0.22, 0.76, facecolor=palette[k],
                               edgecolor="0.5", linewidth=0.5))
        ax.text(col + 0.34, row + 0.5, f"{k:>2}  class {k}", va="center", fontsize=8,
                family="monospace")
    fig.suptitle(f"{task}: {n_classes} classes", fontsize=9)
    return fig


def side_by_side(image: torch.Tensor, predictions: Mapping[str, object], model: ModelConfig,
                 *, title: str = "") -> Figure:
    """One image and its predictions side by side, each with its legend or colour bar.

    Parameters
    ----------
    image : torch.Tensor
        (3, H, W) normalised image the model ran on; drawn de-normalised.
    predictions : mapping of str to array
        Per task its (n_out, H, W) prediction for this image.
    model : ModelConfig
        The model that ran.
    title : str
        The figure's title.

    Returns
    -------
    matplotlib.figure.Figure
        Rendered with Agg (no pyplot): save it or show it in a notebook.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    h, w = model.img_size
    columns = 1 + len(predictions)
    panel = 2.6
    fig = Figure(figsize=(panel * columns * max(w / h, 1.0) + 0.6, panel + 1.4), dpi=100,
                 layout="constrained")
    axes = fig.subplots(1, columns, squeeze=False)[0]
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].imshow(denormalize_image(image.detach().float()).permute(1, 2, 0).numpy())
    axes[0].set_title(f"input ({h}x{w}, as fitted)", fontsize=9)
    for ax, (task, prediction) in zip(axes[1:], predictions.items(), strict=True):
        spec = model.task(task)
        x = _array(prediction)
        if spec.kind == "semseg":
            palette = class_palette(spec.n_out) / 255.0
            labels = x.argmax(axis=0)
            ax.imshow(labels, cmap=ListedColormap(palette), vmin=-0.5,
                      vmax=spec.n_out - 0.5, interpolation="nearest")
            present, counts = np.unique(labels, return_counts=True)
            shown = present[np.argsort(-counts, kind="stable")][:_FIGURE_LEGEND_CLASSES]
            handles = [Patch(facecolor=palette[k], edgecolor="0.5", label=f"class {k}")
                       for k in shown]
            more = len(present) - len(shown)
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02),
                      ncol=2, fontsize=7, frameon=False, handlelength=1.0,
                      title=f"+{more} more: legend.{task}.png" if more else None,
                      title_fontsize=7)
            ax.set_title(f"{task}: class per pixel", fontsize=9)
        elif spec.kind == "depth":
            near, far = depth_range(x)
            shown = ax.imshow(x[0], cmap=f"{DEPTH_COLOUR_MAP}_r", vmin=near,
                              vmax=far if far > near else near + 1e-6)
            bar = fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.03)
            bar.set_ticks([near, far] if far > near else [near])
            bar.set_ticklabels([f"{near:.2f} m", f"{far:.2f} m"] if far > near
                               else [f"{near:.2f} m"], fontsize=7)
            bar.set_label("depth (bright = near)", fontsize=7)
            ax.set_title(f"{task}: depth in metres", fontsize=9)
        else:
            ax.imshow(x[0] > 0, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{task}: edges (logit > 0)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def read_images(files: Sequence[str | os.PathLike], img_size: tuple[int, int], *,
                warn: Callable[[str], None]) -> tuple[list[Path], torch.Tensor]:
    """Read, fit and normalise image files (:func:`~m3vit.sw.model.imageio.load_image`),
    skipping the ones that cannot be read.

    Parameters
    ----------
    files : sequence of path-like
        The files, in order; a file named twice is read once.
    img_size : tuple of int
        The model's (height, width).
    warn : callable
        Called with the one-line reason (``FILE: …``) of each file skipped.

    Returns
    -------
    files : list of Path
        The files read, in order.
    images : torch.Tensor
        (N, 3, H, W) their normalised images.

    Raises
    ------
    M3VitError
        If no file was given or none could be read: the reason for one file, else how many
        (each has been passed to ``warn``).
    """
    unique = list(dict.fromkeys(Path(f) for f in files))
    if not unique:
        raise M3VitError("no image files given")
    kept, images, reasons = [], [], []
    for path in unique:
        try:
            images.append(load_image(path, img_size))
            kept.append(path)
        except M3VitError as e:
            reasons.append(str(e))
    if not images:
        if len(reasons) == 1:
            raise M3VitError(reasons[0])
        for reason in reasons:
            warn(reason)
        raise M3VitError(f"none of the {len(reasons)} image files could be read "
                         "(the warnings above say why)")
    for reason in reasons:
        warn(reason)
    return kept, torch.stack(images)
