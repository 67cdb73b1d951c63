"""Shared test set-up."""

import pytest
import torch

# pytest-xdist runs two workers on a 2-core machine; two OpenMP threads per worker then
# spin against each other and make every matmul ~10x slower (measured here). One each.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained_tiny():
    """The tiny preset after a short training run: (model, report).

    Session-scoped and shared by every test marked ``xdist_group("trained_tiny")``, so
    the ~1-2 minute training runs once per pytest worker that needs it.
    """
    from m3vit.sw.model.config import get_preset
    from m3vit.sw.model.train import TrainConfig, train

    short = TrainConfig(steps=250, batch_size=32, n_train=2000, n_test=300, seed=0)
    return train(get_preset("tiny"), short, progress=False)


def write_nyud_folder(root, splits=None, size=(48, 64)):
    """Write a small NYUD-v2 folder in the NYUD_MT layout M³ViT reads (docs/model.md).

    Every map encodes where its pixel came from, so a test can check that the fitted maps
    line up with the fitted image: source pixel (r, c) has red ``c / (W-1)``, green
    ``r / (H-1)`` (JPEG at quality 100 without chroma subsampling), depth
    ``1 + 0.1 r + 0.001 c`` metres, semseg PNG label ``1 + (r + c) % 40`` and edge
    ``(r + c) % 7 == 0``. Every image but the first listed (train's first by default) also
    has unlabelled pixels (label 0) and depth holes (0) in its top-left corner; normals
    are unit vectors.

    Returns the folder and the split lists ``{"train": [...], "val": [...]}``.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    splits = splits or {"train": ["kitchen_0001", "office_0002", "bath_0003"],
                        "val": ["bedroom_0004", "study_0005"]}
    h, w = size
    r, c = np.mgrid[0:h, 0:w]
    for folder in ("images", "segmentation", "depth", "edge", "normals", "gt_sets"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for k, image_id in enumerate(i for ids in splits.values() for i in ids):
        rgb = np.stack([np.round(255 * c / (w - 1)), np.round(255 * r / (h - 1)),
                        np.full_like(r, 40 * k % 256)], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"{image_id}.jpg", quality=100,
                                  subsampling=0)
        labels = (1 + (r + c) % 40).astype(np.uint8)
        depth = (1 + 0.1 * r + 0.001 * c).astype(np.float32)
        if k > 0:
            labels[:4, :6] = 0
            depth[:3, :5] = 0.0
        Image.fromarray(labels).save(root / "segmentation" / f"{image_id}.png")
        np.save(root / "depth" / f"{image_id}.npy", depth)
        np.save(root / "edge" / f"{image_id}.npy", ((r + c) % 7 == 0).astype(np.float32))
        normals = np.zeros((h, w, 3), np.float32)
        normals[..., 2] = 1.0
        np.save(root / "normals" / f"{image_id}.npy", normals)
    return root, splits


@pytest.fixture
def nyud_folder(tmp_path):
    """A fresh :func:`write_nyud_folder` in the test's own folder: (root, splits)."""
    return write_nyud_folder(tmp_path / "NYUD_MT")


@pytest.fixture
def write_nyud():
    """:func:`write_nyud_folder` itself, for a test that wants other ids or sizes."""
    return write_nyud_folder
