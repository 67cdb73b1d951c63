"""Synthetic scene generator: determinism, layout, label consistency, learnable cues."""

import colorsys
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m3vit.sw.errors import M3VitError
from m3vit.sw.model.data import (
    FAR_DEPTH,
    NEAR_DEPTH,
    SHAPES,
    TEST_SEED,
    TEXTURES,
    TRAIN_SEED,
    SceneDataset,
    class_appearance,
    denormalize_image,
    make_scenes,
    save_scene_figure,
    save_scene_images,
)
from m3vit.sw.model.metrics import baseline_metrics, depth_rmse, miou

SIZES = [((32, 32), 4), ((128, 256), 19), ((48, 64), 2), ((32, 32), 40)]


def assert_scenes_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_gives_identical_scenes():
    a = make_scenes(8, (32, 32), n_classes=4, seed=123)
    b = make_scenes(8, (32, 32), n_classes=4, seed=123)
    assert_scenes_equal(a, b)


def test_different_seeds_give_different_scenes():
    a = make_scenes(8, (32, 32), n_classes=4, seed=TRAIN_SEED)
    b = make_scenes(8, (32, 32), n_classes=4, seed=TEST_SEED)
    for k in a:
        assert not torch.equal(a[k], b[k]), k
    # No held-out image is a training image (compare every pair of the first few).
    assert not any(torch.equal(x, y) for x in a["image"] for y in b["image"])


def test_first_scenes_do_not_depend_on_n():
    few = make_scenes(3, (32, 32), n_classes=4, seed=7)
    many = make_scenes(10, (32, 32), n_classes=4, seed=7)
    assert_scenes_equal(few, {k: v[:3] for k, v in many.items()})


def test_global_random_state_untouched():
    # The legacy global NumPy state is exactly what must stay untouched.
    np_state = np.random.get_state()[1].copy()  # noqa: NPY002
    torch_state = torch.random.get_rng_state().clone()
    make_scenes(4, (32, 32), n_classes=4, seed=0)
    assert np.array_equal(np.random.get_state()[1], np_state)  # noqa: NPY002
    assert torch.equal(torch.random.get_rng_state(), torch_state)


@pytest.mark.parametrize(("img_size", "n_classes"), SIZES)
def test_shapes_dtypes_and_ranges(img_size, n_classes):
    n = 6
    h, w = img_size
    s = make_scenes(n, img_size, n_classes=n_classes, seed=0)
    assert set(s) == {"image", "semseg", "depth", "edge"}
    assert s["image"].shape == (n, 3, h, w) and s["image"].dtype == torch.float32
    assert s["semseg"].shape == (n, h, w) and s["semseg"].dtype == torch.int64
    assert s["depth"].shape == (n, 1, h, w) and s["depth"].dtype == torch.float32
    assert s["edge"].shape == (n, 1, h, w) and s["edge"].dtype == torch.float32
    assert 0 <= int(s["semseg"].min()) and int(s["semseg"].max()) < n_classes
    assert float(s["depth"].min()) >= NEAR_DEPTH - 1e-4
    assert float(s["depth"].max()) <= FAR_DEPTH + 1e-4
    assert set(s["edge"].unique().tolist()) <= {0.0, 1.0}
    assert torch.isfinite(s["image"]).all()


def test_image_is_roughly_normalised():
    image = make_scenes(300, (32, 32), n_classes=4, seed=0)["image"]
    mean, std = image.mean(dim=(0, 2, 3)), image.std(dim=(0, 2, 3))
    assert (mean.abs() < 0.5).all(), mean
    assert ((std > 0.5) & (std < 2.0)).all(), std


@pytest.mark.parametrize("n_classes", [2, 4, 19, 40])
def test_every_class_appears(n_classes):
    semseg = make_scenes(300, (32, 32), n_classes=n_classes, seed=0)["semseg"]
    counts = torch.bincount(semseg.reshape(-1), minlength=n_classes)
    assert (counts > 0).all(), f"classes never drawn: {torch.nonzero(counts == 0).tolist()}"
    # Background is the majority, but objects cover a real share of the pixels.
    fg = 1 - counts[0] / counts.sum()
    assert 0.08 < fg < 0.4, fg


@pytest.mark.parametrize(("img_size", "n_classes"), SIZES[:2])
def test_edges_lie_on_instance_boundaries(img_size, n_classes):
    s = make_scenes(20, img_size, n_classes=n_classes, seed=3)
    sem, depth, edge = s["semseg"], s["depth"][:, 0], s["edge"][:, 0].bool()
    # Along a row the background depth is constant and each object is flat at its own
    # (continuous random) depth, so a depth or class change along a row is exactly an
    # instance boundary: both pixels are edges, and nowhere else along rows.
    change = (sem[:, :, 1:] != sem[:, :, :-1]) | (depth[:, :, 1:] != depth[:, :, :-1])
    assert change.any()
    assert edge[:, :, 1:][change].all() and edge[:, :, :-1][change].all()
    # Every edge pixel has a 4-neighbour of another class or depth.
    padded_sem = F.pad(sem, (1, 1, 1, 1), mode="replicate")
    padded_depth = F.pad(depth[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    h, w = sem.shape[1:]
    differs = torch.zeros_like(edge)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded_sem[:, dy : dy + h, dx : dx + w] != sem
        differs |= padded_depth[:, dy : dy + h, dx : dx + w] != depth
    assert not (edge & ~differs).any()
    # The background alone (wall/floor horizon included) carries no edges: rows that are
    # background, with background rows above and below, have none.
    bg_row = F.pad((sem == 0).all(dim=2), (1, 1), value=True)
    quiet = bg_row[:, :-2] & bg_row[:, 1:-1] & bg_row[:, 2:]
    assert quiet.any()
    assert not edge.any(dim=2)[quiet].any()


def test_depth_grows_upwards_on_the_floor():
    s = make_scenes(50, (32, 32), n_classes=4, seed=0)
    depth = s["depth"][:, 0]
    background_bottom = depth[:, -1][s["semseg"][:, -1] == 0]
    assert background_bottom.numel() > 0
    assert (background_bottom < 2.0).all()
    # Column-wise the background depth never decreases going up (floor then wall).
    bg = s["semseg"] == 0
    up = depth[:, :-1, :] >= depth[:, 1:, :] - 1e-4
    both_bg = bg[:, :-1, :] & bg[:, 1:, :]
    assert up[both_bg].all()


def test_cues_are_linearly_readable():
    """Per-pixel least squares on a 5x5 neighbourhood (and the row) beats the baselines by far.

    A weak learner: if it wins clearly, depth and class are inferable from local appearance.
    """
    n_classes = 4
    train = make_scenes(300, (32, 32), n_classes=n_classes, seed=TRAIN_SEED)
    test = make_scenes(100, (32, 32), n_classes=n_classes, seed=TEST_SEED)

    def features(s: dict) -> torch.Tensor:
        x = s["image"].double()
        n = x.shape[0]
        patches = F.unfold(x, 5, padding=2).view(n, 75, 32, 32)
        # The row, as the model's position embedding gives it: the floor's depth depends on it.
        row = torch.linspace(-1, 1, 32, dtype=x.dtype).view(1, 1, 32, 1).expand(n, 1, 32, 32)
        f = torch.cat([patches, patches.square(), row, torch.ones_like(row)], 1)
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])

    a_train, a_test = features(train), features(test)
    # Ridge normal equations: a 152x152 solve instead of a QR of the whole design matrix.
    gram = a_train.T @ a_train + 1e-3 * torch.eye(a_train.shape[1], dtype=a_train.dtype)
    targets = torch.cat(
        [
            F.one_hot(train["semseg"].reshape(-1), n_classes).double(),
            train["depth"].reshape(-1, 1).double(),
        ],
        dim=1,
    )
    fitted = a_test @ torch.linalg.solve(gram, a_train.T @ targets)
    labels = fitted[:, :n_classes].argmax(1)
    depth = fitted[:, n_classes:].view(test["depth"].shape)
    base = baseline_metrics(train, test, n_classes)
    got_miou = miou(labels.view(test["semseg"].shape), test["semseg"], n_classes)
    got_rmse = depth_rmse(depth, test["depth"])
    print(f"least squares: mIoU {got_miou:.3f}, RMSE {got_rmse:.3f}; baselines {base}")
    assert got_miou > base["semseg/miou"] + 0.5, (got_miou, base)
    assert got_rmse < 0.5 * base["depth/rmse"], (got_rmse, base)


@pytest.mark.parametrize("n_classes", range(2, 65))
def test_same_texture_classes_are_far_apart_in_hue(n_classes):
    looks = [class_appearance(c, n_classes) for c in range(1, n_classes)]
    hues = [colorsys.rgb_to_hsv(*rgb)[0] for rgb, _, _ in looks]
    for (_, t1, _), (_, t2, _) in itertools.pairwise(looks):
        assert t1 != t2
    min_step = 4 / (4 * math.ceil((n_classes - 1) / 4))
    for i, j in itertools.combinations(range(n_classes - 1), 2):
        if looks[i][1] == looks[j][1]:
            d = abs(hues[i] - hues[j])
            assert min(d, 1 - d) >= min_step - 1e-9, (n_classes, i + 1, j + 1)


def test_class_appearance_covers_the_scheme():
    looks = [class_appearance(c, 40) for c in range(1, 40)]
    assert {t for _, t, _ in looks} == set(TEXTURES)
    assert {s for _, _, s in looks} == set(SHAPES)
    assert all(rgb.max() - rgb.min() > 0.5 for rgb, _, _ in looks)  # saturated, never grey
    with pytest.raises(M3VitError, match="foreground class"):
        class_appearance(0, 40)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": -1, "img_size": (32, 32), "n_classes": 4}, "scene count"),
        ({"n": 1, "img_size": (8, 32), "n_classes": 4}, "img_size"),
        ({"n": 1, "img_size": (32,), "n_classes": 4}, "img_size"),
        ({"n": 1, "img_size": (32, 32), "n_classes": 1}, "n_classes"),
        ({"n": 1, "img_size": (32, 32), "n_classes": 65}, "n_classes"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, match):
    with pytest.raises(M3VitError, match=match):
        make_scenes(**kwargs, seed=0)


def test_dataset_items_and_batches():
    scenes = make_scenes(5, (32, 32), n_classes=4, seed=0)
    ds = SceneDataset(scenes)
    assert len(ds) == 5
    item = ds[2]
    assert torch.equal(item["semseg"], scenes["semseg"][2])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert torch.equal(batch["depth"], scenes["depth"][:4])
    assert len(SceneDataset.generate(3, (32, 32), n_classes=4, seed=0)) == 3


def test_dataset_refuses_ragged_tensors():
    with pytest.raises(M3VitError, match="differ in length"):
        SceneDataset({"image": torch.zeros(3, 3, 4, 4), "semseg": torch.zeros(2, 4, 4)})
    with pytest.raises(M3VitError, match="at least one"):
        SceneDataset({})


def test_scene_figure_is_a_png(tmp_path):
    path = tmp_path / "scenes.png"
    save_scene_figure(make_scenes(3, (32, 32), n_classes=4, seed=0), path, n=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scene_images_are_plain_pictures(tmp_path, capsys):
    """``save_scene_images`` (``m3vit scenes --raw``): each scene's image as 8-bit RGB, the
    de-normalised pixels rounded; never over an existing file without ``overwrite``."""
    from PIL import Image

    from m3vit.sw.cli import main

    scenes = make_scenes(2, (24, 40), n_classes=4, seed=3)
    paths = save_scene_images(scenes["image"], tmp_path / "s.png")
    assert [p.name for p in paths] == ["s-0.png", "s-1.png"]
    for path, image in zip(paths, scenes["image"], strict=True):
        picture = Image.open(path)
        assert picture.mode == "RGB" and picture.size == (40, 24)
        want = (denormalize_image(image) * 255).round().to(torch.uint8).permute(1, 2, 0)
        assert np.array_equal(np.asarray(picture), want.numpy())
    with pytest.raises(M3VitError, match=r"s-0\.png exists"):
        save_scene_images(scenes["image"], tmp_path / "s.png")
    out = tmp_path / "one.png"
    argv = ["scenes", "--img-size", "24x40", "--n", "1", "--seed", "3", "--raw", "--out", str(out)]
    assert main(argv) == 0 and Image.open(out).size == (40, 24)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(paths[0])))
    capsys.readouterr()
    assert main(argv) == 2 and "exists: pass --force" in capsys.readouterr().err
