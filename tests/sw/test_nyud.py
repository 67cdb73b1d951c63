"""The NYUD-v2 reader on a small folder in the NYUD_MT layout (``write_nyud_folder``)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from m3vit.sw.cli import main
from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import TaskSpec, get_preset
from m3vit.sw.model.data import denormalize_image
from m3vit.sw.model.imageio import load_image
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.model.nyud import (
    IGNORE_INDEX,
    NYUD_CLASSES,
    check_nyud_model,
    iter_nyud,
    load_nyud,
    nyud_config,
    nyud_ids,
)
from m3vit.sw.model.train import TrainConfig, save_checkpoint, task_loss, train

TINY = nyud_config(get_preset("tiny"))                       # 32 x 32, semseg + depth
WITH_EDGE = TINY.replace(tasks=(*TINY.tasks, TaskSpec("edge", "edge", 1)))


def load(root, cfg=TINY, split="val", n=None, **kw):
    return load_nyud(root, cfg, split, n, progress=False, **kw)


def test_nyud_config_gives_every_preset_40_classes():
    for name, classes in (("tiny", 4), ("edge-moe", 19), ("m3vit-s", 40)):
        cfg = get_preset(name)
        assert cfg.task("semseg").n_out == classes
        nyud = nyud_config(cfg)
        assert nyud.task("semseg").n_out == NYUD_CLASSES == 40
        assert nyud.task("depth") == cfg.task("depth")
        check_nyud_model(nyud)
    with pytest.raises(M3VitError, match="semseg head has 19 classes, NYUD-v2 has 40"):
        check_nyud_model(get_preset("edge-moe"))


def test_dict_layout_dtypes_and_only_the_tasks_the_model_has(nyud_folder):
    root, splits = nyud_folder
    data = load(root)
    assert set(data) == {"image", "semseg", "depth"}            # tiny has no edge task
    n = len(splits["val"])
    assert data["image"].shape == (n, 3, 32, 32) and data["image"].dtype == torch.float32
    assert data["semseg"].shape == (n, 32, 32) and data["semseg"].dtype == torch.int64
    assert data["depth"].shape == (n, 1, 32, 32) and data["depth"].dtype == torch.float32
    with_edge = load(root, WITH_EDGE)
    assert with_edge["edge"].shape == (n, 1, 32, 32)
    assert set(with_edge["edge"].unique().tolist()) == {0.0, 1.0}
    assert load(root, keys=("image",)).keys() == {"image"}
    with pytest.raises(M3VitError, match="cannot load 'edge' for the tiny model"):
        load(root, keys=("edge",))


def test_labels_map_to_classes_and_unlabelled_pixels_to_the_ignore_index(tmp_path, write_nyud):
    # 32 x 32 sources for the 32 x 32 preset: nothing is resampled, every pixel is checked.
    root, _ = write_nyud(tmp_path / "nyud", {"val": ["a", "b"]}, size=(32, 32))
    png = np.array(Image.open(root / "segmentation" / "b.png")).astype(np.int64)
    depth = np.load(root / "depth" / "b.npy")
    assert (png == 0).any() and png.max() == 40 and (depth == 0).any()
    data = load(root)
    got = data["semseg"][1].numpy()
    assert (got[png == 0] == IGNORE_INDEX).all()
    assert (got[png > 0] == png[png > 0] - 1).all()            # 1..40 -> 0..39
    assert got[png > 0].min() == 0 and got[png > 0].max() == 39
    assert torch.equal(data["depth"][1, 0], torch.from_numpy(depth))   # metres, 0 kept


def test_image_is_normalised_exactly_as_load_image(nyud_folder):
    root, splits = nyud_folder
    data = load(root, split="train")
    for i, image_id in enumerate(splits["train"]):
        assert torch.equal(data["image"][i], load_image(root / "images" / f"{image_id}.jpg",
                                                        (32, 32)))


@pytest.mark.parametrize("img_size", [(32, 32), (16, 32)], ids=["crop-columns", "crop-rows"])
def test_fitted_maps_line_up_with_the_fitted_image(nyud_folder, img_size):
    """48 x 64 sources: 32 x 32 keeps the middle columns, 16 x 32 the middle rows. Each
    fitted map pixel names its source pixel (depth = 1 + 0.1 r + 0.001 c); the image's
    red and green ramps there must show the same column and row."""
    root, _ = nyud_folder
    cfg = WITH_EDGE.replace(img_size=img_size)
    data = load(root, cfg, split="train")
    depth = data["depth"][0, 0].double()      # the first image has neither holes nor 0s
    r = torch.floor((depth - 1) * 10 + 1e-6)
    c = torch.round(((depth - 1) - 0.1 * r) * 1000)
    assert r.min() >= 0 and r.max() <= 47 and c.min() >= 0 and c.max() <= 63
    # The other maps were sampled at the very same source pixels.
    labels = 1 + (r + c).long() % 40
    assert torch.equal(data["semseg"][0], labels - 1)
    assert torch.equal(data["edge"][0, 0], ((r + c).long() % 7 == 0).float())
    # The image (bilinear) agrees with them to within half a source pixel and JPEG noise;
    # one output pixel off would be 1.5 (crop-columns) or 2 (crop-rows) source pixels.
    rgb = denormalize_image(data["image"][0]).double()
    inner = (slice(2, -2), slice(2, -2))
    col_err = (rgb[0] - c / 63)[inner].abs().max()
    row_err = (rgb[1] - r / 47)[inner].abs().max()
    assert col_err < 0.5 / 63 + 3 / 255, col_err
    assert row_err < 0.5 / 47 + 3 / 255, row_err
    # The crop is the centre: the columns (rows) cut off on each side differ by <= 1.
    h, w = img_size
    scale = max(h / 48, w / 64)
    if w / 64 < scale:
        left = (round(64 * scale) - w) // 2
        assert abs(float(c[h // 2, 0]) - left / scale) <= 1
    else:
        top = (round(48 * scale) - h) // 2
        assert abs(float(r[0, w // 2]) - top / scale) <= 1


def test_splits_keep_their_order_and_n_takes_the_first(nyud_folder):
    root, splits = nyud_folder
    assert nyud_ids(root, "train") == splits["train"]
    assert nyud_ids(root, "val") == splits["val"]
    whole = load(root, split="train")
    two = load(root, split="train", n=2)
    assert torch.equal(two["image"], whole["image"][:2])
    assert len(load(root, split="train", n=99)["image"]) == 3       # all it lists
    chunks = list(iter_nyud(root, TINY, "train", chunk=2, progress=False))
    assert [len(p["image"]) for p in chunks] == [2, 1]
    for key in whole:
        assert torch.equal(torch.cat([p[key] for p in chunks]), whole[key])


def test_stored_values_are_cleaned(tmp_path, write_nyud):
    root, _ = write_nyud(tmp_path / "nyud", {"val": ["a"]}, size=(32, 32))
    depth = np.full((32, 32), 2.0)                         # float64, like some exports
    depth[0, :3] = [np.nan, -1.0, np.inf]
    np.save(root / "depth" / "a.npy", depth)
    edge = np.zeros((1, 32, 32), np.float64)               # (1, H, W) is read as (H, W)
    edge[0, 5, :4] = [0.2, 0.5, 0.7, 1.0]
    np.save(root / "edge" / "a.npy", edge)
    data = load(root, WITH_EDGE)
    assert data["depth"][0, 0, 0, :4].tolist() == [0.0, 0.0, 0.0, 2.0]   # no ground truth
    assert data["edge"][0, 0, 5, :4].tolist() == [0.0, 0.0, 1.0, 1.0]    # above 0.5


def test_a_map_of_another_size_is_brought_to_its_images_size(tmp_path, write_nyud):
    root, _ = write_nyud(tmp_path / "nyud", {"val": ["a"]}, size=(32, 32))
    np.save(root / "depth" / "a.npy", np.full((16, 16), 3.0, np.float32))
    assert load(root)["depth"].unique().tolist() == [3.0]


def _break(root, what):
    """Damage the folder in one way; returns what the error must say."""
    if what == "no folder":
        return root / "missing", "no such folder"
    if what == "no images/":
        (root / "images").rename(root / "pictures")
        return root, "no images/ folder"
    if what == "no split list":
        (root / "gt_sets" / "val.txt").unlink()
        return root, r"no split list gt_sets/val\.txt \(have: train\)"
    if what == "empty split":
        (root / "gt_sets" / "val.txt").write_text("\n\n")
        return root, "lists no image"
    if what == "id with a path":
        (root / "gt_sets" / "val.txt").write_text("../secret\n")
        return root, "is not an image id"
    if what == "no jpg":
        (root / "images" / "study_0005.jpg").unlink()
        return root, r"image 'study_0005' has no images/study_0005\.jpg"
    if what == "no depth/":
        for f in (root / "depth").iterdir():
            f.unlink()
        (root / "depth").rmdir()
        return root, "no depth/ folder, which the depth task needs"
    if what == "no depth file":
        (root / "depth" / "study_0005.npy").unlink()
        return root, r"has no depth/study_0005\.npy for the depth task"
    if what == "depth of 3 channels":
        np.save(root / "depth" / "study_0005.npy", np.ones((48, 64, 3), np.float32))
        return root, r"depth map must be an \(H, W\) array of numbers, got shape \(48, 64, 3\)"
    if what == "pickled npy":
        np.save(root / "depth" / "study_0005.npy", np.array([{"a": 1}], dtype=object),
                allow_pickle=True)
        return root, "not a readable .npy array"
    if what == "not npy":
        (root / "depth" / "study_0005.npy").write_bytes(b"not numpy")
        return root, "not a readable .npy array"
    if what == "label 41":
        Image.fromarray(np.full((48, 64), 41, np.uint8)).save(
            root / "segmentation" / "study_0005.png")
        return root, r"label 41 is outside 0\.\.40"
    if what == "RGB labels":
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(
            root / "segmentation" / "study_0005.png")
        return root, "one channel of integers"
    raise AssertionError(what)


BROKEN = ["no folder", "no images/", "no split list", "empty split", "id with a path",
          "no jpg", "no depth/", "no depth file", "depth of 3 channels", "pickled npy",
          "not npy", "label 41", "RGB labels"]


@pytest.mark.parametrize("what", BROKEN)
def test_a_broken_layout_is_one_line(nyud_folder, what):
    root, _ = nyud_folder
    root, message = _break(root, what)
    with pytest.raises(M3VitError, match=message) as e:
        load(root)
    assert "\n" not in str(e.value)
    if what in ("no folder", "no images/", "no split list", "no depth/"):
        assert "NYUD_MT layout" in str(e.value)                # says what it must be


def test_a_model_without_40_classes_is_refused(nyud_folder):
    root, _ = nyud_folder
    with pytest.raises(M3VitError, match="tiny model's semseg head has 4 classes"):
        load(root, get_preset("tiny"))
    with pytest.raises(M3VitError, match=r"no NYUD-v2 folder given \(--data DIR"):
        load(None)


def test_losses_skip_pixels_without_ground_truth():
    semseg = TaskSpec("semseg", "semseg", 3)
    logits = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([[[0, IGNORE_INDEX], [2, IGNORE_INDEX]]])
    labelled = torch.nn.functional.cross_entropy(logits[..., 0], target[..., 0])
    assert task_loss(semseg, logits, target) == pytest.approx(float(labelled))
    assert task_loss(semseg, logits, torch.full_like(target, IGNORE_INDEX)) == 0.0
    depth = TaskSpec("depth", "depth", 1)
    pred = torch.tensor([[[[1.0, 5.0], [2.0, 9.0]]]])
    # |1 - 2| and |2 - 4| on the two pixels with a depth: mean 1.5.
    assert task_loss(depth, pred, torch.tensor([[[[2.0, 0.0], [4.0, 0.0]]]])) == 1.5
    assert task_loss(depth, pred, torch.zeros(1, 1, 2, 2)) == 0.0


def test_train_on_the_folder_reports_held_out_metrics(nyud_folder):
    root, _ = nyud_folder
    data = (load(root, split="train"), load(root, split="val"))
    tc = TrainConfig(steps=3, batch_size=8, n_train=3, n_test=2)
    model, report = train(TINY, tc, progress=False, data=data)
    assert model.cfg.task("semseg").n_out == 40
    assert set(report["metrics"]) == {"semseg/miou", "semseg/pixel_acc", "depth/rmse"}
    assert all(math.isfinite(v) for v in report["metrics"].values())
    assert math.isfinite(report["final_loss"])
    # The majority-class baseline counts labelled pixels only.
    assert 0 < report["baseline"]["semseg/pixel_acc"] < 0.1


def test_quantize_calibrates_on_given_images(nyud_folder):
    from m3vit.sw.quant.quantize import quantize

    root, _ = nyud_folder
    images = load(root, split="train", keys=("image",))["image"]
    model = M3ViT(TINY, seed=0)
    pkg = quantize(model, images=images, source="NYUD-v2 train images")
    assert pkg.params["calibration"] == {"statistic": "max", "images": 3,
                                         "data": "NYUD-v2 train images"}
    # The scales come from these images: the input's is their largest |x| / 127.
    assert pkg.params["scales"]["input"] == pytest.approx(float(images.abs().max()) / 127)
    with pytest.raises(M3VitError, match=r"calibration images must be \(N, 3, 32, 32\)"):
        quantize(model, images=images[:, :, :16])


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("m3vit: error:")
    return err[-1]


def test_cli_refuses_mismatched_dataset_arguments(nyud_folder, tmp_path, capsys):
    root, _ = nyud_folder
    out = str(tmp_path / "t.pt")
    assert main(["train", "--dataset", "nyud", "--out", out]) == 2
    assert "--dataset nyud needs --data DIR" in _err(capsys)
    assert main(["train", "--data", str(root), "--out", out]) == 2
    assert "pass --dataset nyud with it" in _err(capsys)
    # A checkpoint of the tiny preset's 4 classes is not a NYUD-v2 model.
    ckpt = save_checkpoint(tmp_path / "tiny4.pt", M3ViT(get_preset("tiny")), {})
    assert main(["evaluate", str(ckpt), "--dataset", "nyud", "--data", str(root)]) == 2
    assert "semseg head has 4 classes, NYUD-v2 has 40" in _err(capsys)
    assert main(["quantize", str(ckpt), "--calib-data", str(root), "--out",
                 str(tmp_path / "x.m3q")]) == 2
    assert "semseg head has 4 classes" in _err(capsys)
    (tmp_path / "bad.json").write_text('{"semseg/miou": "high"}')
    assert main(["evaluate", str(ckpt), "--baselines", str(tmp_path / "bad.json")]) == 2
    assert "metric name to single-task value" in _err(capsys)
