"""NYUD-v2 as M³ViT reads it: the multi-task ``NYUD_MT`` folder.

M³ViT reports on NYUD-v2 through the ``NYUD_MT`` class of its ``data/nyud.py`` (taken from
the Multi-Task-Learning-PyTorch project, itself from ASTMT). This module reads the same
folder into the dict :func:`m3vit.sw.model.data.make_scenes` returns, fitted to a preset's
input, so training, evaluation, calibration and the board run take it in place of the
synthetic scenes.

Layout (``ID`` is one line of a split list)::

    ROOT/images/ID.jpg          RGB photograph (640x480 in the published archive)
    ROOT/segmentation/ID.png    one channel: 0 = unlabelled, 1..40 = the 40 NYUD classes
    ROOT/depth/ID.npy           (H, W) float depth in metres, 0 where the sensor gave none
    ROOT/edge/ID.npy            (H, W) boundary map, 0/1
    ROOT/normals/ID.npy         (H, W, 3) surface normals (no task of ours reads them)
    ROOT/gt_sets/train.txt      the split lists, one image id a line
    ROOT/gt_sets/val.txt

What is read, and how (:func:`load_nyud`):

* **semseg**: label ``k`` in 1..40 becomes class ``k - 1``; label 0 becomes
  :data:`IGNORE_INDEX`, which no metric or loss counts — M³ViT's ``_load_semseg`` does
  the same (0 → 256, then minus 1), evaluating over 40 classes without the background.
* **depth**: as stored, in metres; NaN, infinite and negative values become 0, which the
  metrics treat as *no ground truth* (:func:`m3vit.sw.model.metrics.depth_rmse`).
* **edge**: 1 where the stored value is above 0.5, else 0.
* A target map whose size differs from its image's is first brought to the image's size by
  nearest-neighbour sampling, as M³ViT's reader does with ``cv2.INTER_NEAREST``.
* Every image and map is then fitted to the preset's ``img_size`` by
  :func:`m3vit.sw.model.imageio.fit`: scaled to *cover* it keeping the aspect ratio, then
  the centre cropped. Images are sampled bilinearly and normalised exactly as the synthetic
  scenes (:func:`~m3vit.sw.model.imageio.load_image`'s pipeline); label, depth and edge
  maps nearest-neighbour, so they stay labels and line up with the image's pixels. For
  ``edge-moe`` (128 x 256) a 640 x 480 photograph is scaled to 256 x 192 and its middle
  128 rows are kept; for ``m3vit-s`` (480 x 640) nothing is resampled.

Only what the model's tasks need is read (a model without an edge task never opens
``edge/``). Anything wrong with the folder — a missing folder, split list, file, or an
array of the wrong shape — is one :class:`~m3vit.sw.errors.M3VitError` line naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import M3VitError
from .config import ModelConfig, TaskSpec
from .imageio import fit, model_input, read_image
from .metrics import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "LAYOUT", "NYUD_CLASSES", "check_nyud_model", "iter_nyud",
           "load_nyud", "nyud_config", "nyud_ids"]

NYUD_CLASSES = 40
"""Semantic classes of NYUD-v2 as M³ViT evaluates it (the 40-class labelling, no
background class)."""

LAYOUT = ("the NYUD_MT layout: images/ID.jpg, segmentation/ID.png, depth/ID.npy, "
          "edge/ID.npy, gt_sets/SPLIT.txt listing one ID a line")
"""The folder layout in one line, for error messages."""

# Task kind -> (folder, file ending) of its ground truth.
_TARGETS = {"semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"),
            "edge": ("edge", ".npy")}


def nyud_config(cfg: ModelConfig) -> ModelConfig:
    """The configuration of ``cfg`` for NYUD-v2.

    Parameters
    ----------
    cfg : ModelConfig
        A preset, whatever its semseg class count (``tiny`` 4, ``edge-moe`` 19).

    Returns
    -------
    ModelConfig
        ``cfg`` with every semseg head given :data:`NYUD_CLASSES` outputs (``cfg`` itself
        when it has them already).
    """
    tasks = tuple(t if t.kind != "semseg" else TaskSpec(t.name, t.kind, NYUD_CLASSES)
                  for t in cfg.tasks)
    return cfg if tasks == cfg.tasks else cfg.replace(tasks=tasks)


def check_nyud_model(cfg: ModelConfig) -> None:
    """Refuse a model whose semseg head does not have NYUD-v2's 40 classes.

    Parameters
    ----------
    cfg : ModelConfig
        The model's configuration (from a checkpoint or a package).

    Raises
    ------
    M3VitError
        One line naming the task and its class count.
    """
    for t in cfg.tasks:
        if t.kind == "semseg" and t.n_out != NYUD_CLASSES:
            raise M3VitError(
                f"the {cfg.name} model's {t.name} head has {t.n_out} classes, NYUD-v2 has "
                f"{NYUD_CLASSES}: use a model trained with `m3vit train --dataset nyud`")


def _root(root: str | os.PathLike | None) -> Path:
    if root is None or str(root) == "":      # Path("") would be the working folder
        raise M3VitError(f"no NYUD-v2 folder given (--data DIR, a folder in {LAYOUT})")
    path = Path(root)
    if not path.is_dir():
        raise M3VitError(f"{path}: no such folder (NYUD-v2 must be in {LAYOUT})")
    if not (path / "images").is_dir():
        raise M3VitError(f"{path}: no images/ folder, so not {LAYOUT}")
    return path


def nyud_ids(root: str | os.PathLike, split: str = "val") -> list[str]:
    """The image ids ``gt_sets/<split>.txt`` lists, in its order (blank lines skipped).

    Parameters
    ----------
    root : path-like
        The NYUD_MT folder.
    split : str
        ``"train"`` or ``"val"`` (any list in ``gt_sets/``).

    Returns
    -------
    list of str
        The ids, file names without their endings.

    Raises
    ------
    M3VitError
        If the folder is not the NYUD_MT layout, the split list is missing or empty, or a
        line is not a plain file name.
    """
    path = _root(root)
    sets = path / "gt_sets"
    if not isinstance(split, str) or not split or "/" in split or split.startswith("."):
        raise M3VitError(f"split must be a name such as 'train' or 'val', got {split!r}")
    listing = sets / f"{split}.txt"
    if not listing.is_file():
        have = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
        raise M3VitError(f"{path}: no split list gt_sets/{split}.txt (have: "
                         f"{', '.join(have) or 'none'}); expected {LAYOUT}")
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise M3VitError(f"{listing}: unreadable split list ({type(e).__name__})") from None
    ids = [line.strip() for line in lines if line.strip()]
    for i in ids:
        # An id is a file name stem; one with a separator would read outside the folders.
        if "/" in i or "\\" in i or i in (".", ".."):
            raise M3VitError(f"{listing}: {i!r} is not an image id (a file name without "
                             "its ending)")
    if not ids:
        raise M3VitError(f"{listing} lists no image")
    return ids


def _needed(cfg: ModelConfig, keys: Iterable[str] | None) -> tuple[str, ...]:
    """What to read: ``image`` and the target of each of the model's task kinds."""
    wanted = ("image", *dict.fromkeys(t.kind for t in cfg.tasks))
    if keys is None:
        return wanted
    keys = tuple(keys)
    for k in keys:
        if k not in wanted:
            raise M3VitError(f"cannot load {k!r} for the {cfg.name} model (it needs "
                             f"{', '.join(wanted)})")
    return keys


def _read_semseg(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            labels = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise M3VitError(f"{path}: not a label PNG Pillow can read") from None
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise M3VitError(f"{path}: a label map must be one channel of integers, got "
                         f"shape {labels.shape} {labels.dtype}")
    if labels.size == 0:
        raise M3VitError(f"{path}: empty label map")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > NYUD_CLASSES:
        raise M3VitError(f"{path}: label {lo if lo < 0 else hi} is outside 0..{NYUD_CLASSES} "
                         f"(0 = unlabelled, 1..{NYUD_CLASSES} = the NYUD-v2 classes)")
    out = labels.astype(np.int64) - 1
    out[labels == 0] = IGNORE_INDEX
    return out


def _read_array(path: Path, what: str) -> np.ndarray:
    """A 2-D numeric .npy map ((H, W), or (H, W, 1) / (1, H, W)) as float64."""
    try:
        # No pickles: a data file must not be able to run code.
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise M3VitError(f"{path}: not a readable .npy array ({why})") from None
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[2]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:2])
    if a.ndim != 2 or a.dtype.kind not in "uif" or 0 in a.shape:
        raise M3VitError(f"{path}: a {what} map must be an (H, W) array of numbers, got "
                         f"shape {a.shape} {a.dtype}")
    return a.astype(np.float64)


def _to_image_size(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) map → (1, *size) by nearest-neighbour sampling (M³ViT's INTER_NEAREST)."""
    if tuple(a.shape[-2:]) == size:
        return a
    return F.interpolate(a[None].double(), size=size, mode="nearest-exact")[0].to(a.dtype)


def _load_one(root: Path, image_id: str, keys: Sequence[str],
              img_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Image and targets of one id, fitted to ``img_size`` (module docstring)."""
    out: dict[str, torch.Tensor] = {}
    image_path = root / "images" / f"{image_id}.jpg"
    if not image_path.is_file():
        raise M3VitError(f"{root}: image {image_id!r} has no images/{image_id}.jpg")
    rgb = torch.from_numpy(read_image(image_path)).permute(2, 0, 1)
    size = (int(rgb.shape[1]), int(rgb.shape[2]))
    if "image" in keys:
        # load_image's pipeline, on the pixels already read (their size is needed here).
        out["image"] = model_input(rgb, img_size)
    for kind in keys:
        if kind == "image":
            continue
        folder, ending = _TARGETS[kind]
        path = root / folder / f"{image_id}{ending}"
        if not path.is_file():
            raise M3VitError(f"{root}: image {image_id!r} has no {folder}/{image_id}{ending} "
                             f"for the {kind} task")
        if kind == "semseg":
            target = torch.from_numpy(_read_semseg(path))[None]
        elif kind == "depth":
            d = _read_array(path, "depth")
            d[~np.isfinite(d) | (d < 0)] = 0.0      # no reading: the metrics skip it
            target = torch.from_numpy(d.astype(np.float32))[None]
        else:
            e = _read_array(path, "edge")
            if not np.isfinite(e).all() or e.min() < 0 or e.max() > 1:
                raise M3VitError(f"{path}: an edge map holds values in [0, 1], got "
                                 f"{np.nanmin(e):g}..{np.nanmax(e):g}")
            target = torch.from_numpy((e > 0.5).astype(np.float32))[None]
        fitted = fit(_to_image_size(target, size), img_size, nearest=True)
        out[kind] = fitted[0] if kind == "semseg" else fitted
    return out


def iter_nyud(
    root: str | os.PathLike | None,
    cfg: ModelConfig,
    split: str = "val",
    n: int | None = None,
    *,
    chunk: int = 64,
    keys: Iterable[str] | None = None,
    progress: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`load_nyud` in pieces, for a split too large to hold at once.

    ``m3vit-s`` at 480 x 640 takes ~7.4 MB an image (image, labels, depth), so its train
    split alone ~5.9 GB.

    Parameters
    ----------
    root, cfg, split, n, keys, progress
        As :func:`load_nyud`.
    chunk : int
        Images a piece holds at most.

    Yields
    ------
    dict of str to torch.Tensor
        Consecutive pieces of what :func:`load_nyud` returns, in split-list order.

    Raises
    ------
    M3VitError
        As :func:`load_nyud`; the folder and the model are checked when the first piece
        is asked for, before any image is read.
    """
    if chunk < 1:
        raise M3VitError(f"chunk must be >= 1, got {chunk!r}")
    path = _root(root)
    check_nyud_model(cfg)
    wanted = _needed(cfg, keys)
    ids = nyud_ids(path, split)
    if n is not None:
        if n < 1:
            raise M3VitError(f"the number of NYUD-v2 images must be >= 1, got {n!r}")
        ids = ids[:n]
    for kind in wanted:
        if kind != "image" and not (path / _TARGETS[kind][0]).is_dir():
            raise M3VitError(f"{path}: no {_TARGETS[kind][0]}/ folder, which the "
                             f"{kind} task needs; expected {LAYOUT}")
    bar = tqdm(total=len(ids), desc=f"NYUD-v2 {split}", unit="image", disable=not progress,
               leave=False)
    h, w = cfg.img_size
    shapes = {"image": (3, h, w), "semseg": (h, w), "depth": (1, h, w), "edge": (1, h, w)}
    try:
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            out = {k: torch.empty((len(part), *shapes[k]),
                                  dtype=torch.int64 if k == "semseg" else torch.float32)
                   for k in wanted}
            for j, image_id in enumerate(part):
                for k, v in _load_one(path, image_id, wanted, (h, w)).items():
                    out[k][j] = v
                bar.update()
            yield out
    finally:
        bar.close()


def load_nyud(
    root: str | os.PathLike | None,
    cfg: ModelConfig,
    split: str = "val",
    n: int | None = None,
    *,
    keys: Iterable[str] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Read a NYUD-v2 split (the NYUD_MT layout) for the model ``cfg``.

    Parameters
    ----------
    root : path-like
        The folder holding ``images/``, ``segmentation/``, ``depth/``, ``edge/`` and
        ``gt_sets/`` (module docstring).
    cfg : ModelConfig
        The model: its ``img_size`` and its tasks, whose semseg head must have
        :data:`NYUD_CLASSES` outputs (:func:`nyud_config`).
    split : str
        The split list ``gt_sets/<split>.txt`` to read: ``"train"`` or ``"val"``.
    n : int, optional
        Read only the first ``n`` ids of the list (all of them when it lists fewer).
    keys : iterable of str, optional
        What to read: by default ``"image"`` and the target of each of the model's task
        kinds; e.g. ``("image",)`` for calibration.
    progress : bool
        Show a progress bar (stderr).

    Returns
    -------
    dict of str to torch.Tensor
        As :func:`m3vit.sw.model.data.make_scenes`: ``"image"`` float32 (N, 3, H, W)
        normalised like the synthetic scenes; ``"semseg"`` int64 (N, H, W) in 0..39 or
        :data:`IGNORE_INDEX`; ``"depth"`` float32 (N, 1, H, W) in metres, 0 = no ground
        truth; ``"edge"`` float32 (N, 1, H, W) of 0/1 — each only if the model has such
        a task.

    Raises
    ------
    M3VitError
        One line for a model without 40 semseg classes, a folder not in the NYUD_MT
        layout, a missing split list or file, or an unreadable or misshapen map.
    """
    parts = list(iter_nyud(root, cfg, split, n, chunk=1 << 30, keys=keys,
                           progress=progress))
    return parts[0]
