"""The pictures of ``m3vit run --out`` (m3vit.sw.runtime.pictures), from made-up predictions.

No accelerator here: seeded predictions of a ``tiny`` model with an edge task added go
through the writers, and each file is decoded again with Pillow / numpy and compared with
what it must hold. ``tests/e2e/test_images.py`` runs the same on the simulated board.
"""

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import TaskSpec, get_preset
from m3vit.sw.runtime.pictures import (
    DEPTH_COLOUR_MAP,
    class_palette,
    depth_picture,
    edge_picture,
    output_files,
    output_names,
    read_images,
    semseg_picture,
    side_by_side,
    write_pictures,
)

SEED = 23
MODEL = get_preset("tiny").replace(tasks=(
    TaskSpec("semseg", "semseg", 4), TaskSpec("depth", "depth", 1), TaskSpec("edge", "edge", 1)))


def _predictions(n=2, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    h, w = MODEL.img_size
    return {"semseg": torch.randn(n, 4, h, w, generator=g),
            "depth": 1.5 + 8.5 * torch.rand(n, 1, h, w, generator=g),
            "edge": torch.randn(n, 1, h, w, generator=g)}


def test_class_palette_is_the_voc_colour_map_and_distinct():
    p = class_palette(256)
    assert p.shape == (256, 3) and p.dtype == np.uint8
    assert p[:9].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                              [128, 0, 128], [0, 128, 128], [128, 128, 128], [64, 0, 0]]
    assert len({tuple(c) for c in p}) == 256
    assert np.array_equal(class_palette(40), p[:40])
    for bad in (0, 257):
        with pytest.raises(M3VitError, match="1 to 256 colours"):
            class_palette(bad)


def test_semseg_picture_is_an_indexed_png_of_the_argmax():
    scores = _predictions()["semseg"][0]
    picture = semseg_picture(scores)
    assert picture.mode == "P" and picture.size == (32, 32)
    assert np.array_equal(np.asarray(picture), scores.argmax(0).numpy())
    assert picture.getpalette()[:12] == class_palette(4).reshape(-1).tolist()


def test_depth_picture_is_bright_near_with_its_range():
    depth = torch.tensor([[[2.0, 4.0], [6.0, 10.0]]])
    picture = depth_picture(depth)
    lut = np.round(colormaps[DEPTH_COLOUR_MAP](np.arange(256))[:, :3] * 255).astype(np.uint8)
    pixels = np.asarray(picture)
    assert picture.mode == "RGB" and picture.size == (2, 2)
    assert pixels[0, 0].tolist() == lut[255].tolist()   # nearest: the brightest
    assert pixels[1, 1].tolist() == lut[0].tolist()     # farthest: the darkest
    assert pixels[0, 1].tolist() == lut[round(6 / 8 * 255)].tolist()
    assert picture.info["depth_min_m"] == "2" and picture.info["depth_max_m"] == "10"
    flat = np.asarray(depth_picture(torch.full((1, 3, 3), 5.0)))
    assert (flat == lut[255]).all()


def test_edge_picture_is_a_mask_of_positive_logits():
    logits = torch.tensor([[[-1.0, 0.0], [0.5, 3.0]]])
    picture = edge_picture(logits)
    assert picture.mode == "L" and np.asarray(picture).tolist() == [[0, 0], [255, 255]]


def test_output_names_never_clash():
    tasks = ["semseg", "depth"]
    names = output_names(["a", "a", "A", "legend", "x", "x.semseg", ""], tasks)
    assert names == ["a", "a-2", "A-3", "legend-2", "x", "x.semseg-2", "image"]
    files = [f.lower() for f in output_files(names, MODEL, tasks)]
    assert len(files) == len(set(files)) == 1 + 5 * len(names)


def test_write_pictures_writes_what_it_names_and_never_overwrites(tmp_path):
    predictions = _predictions()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))
    names = output_names(["photo", "photo"], list(predictions))
    out = tmp_path / "new" / "out"
    written = write_pictures(out, names, images, predictions, MODEL, title="tiny")
    assert [p.name for p in written] == output_files(names, MODEL, list(predictions))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    for i, name in enumerate(names):
        for task, prediction in predictions.items():
            saved = np.load(out / f"{name}.{task}.npy")
            assert saved.dtype == np.float32 and np.array_equal(saved, prediction[i].numpy())
        semseg = Image.open(out / f"{name}.semseg.png")
        assert semseg.mode == "P" and semseg.size == (32, 32)
        assert np.array_equal(np.asarray(semseg), predictions["semseg"][i].argmax(0).numpy())
        depth = Image.open(out / f"{name}.depth.png")
        d = predictions["depth"][i]
        assert float(depth.text["depth_min_m"]) == pytest.approx(float(d.min()), rel=1e-5)
        assert float(depth.text["depth_max_m"]) == pytest.approx(float(d.max()), rel=1e-5)
        edge = np.asarray(Image.open(out / f"{name}.edge.png"))
        assert np.array_equal(edge == 255, (predictions["edge"][i, 0] > 0).numpy())
        figure = Image.open(out / f"{name}.png")
        assert figure.size[0] > 4 * 200 and figure.size[1] > 200
    legend = Image.open(out / "legend.semseg.png").convert("RGB")
    colours = {tuple(c) for c in np.asarray(legend).reshape(-1, 3)}
    assert {tuple(c) for c in class_palette(4)} <= colours   # every swatch is drawn
    # Nothing is overwritten without force, and the file is left as it was.
    before = (out / "photo.semseg.npy").read_bytes()
    with pytest.raises(M3VitError, match=r"legend\.semseg\.png exists: pass --force"):
        write_pictures(out, names, images, _predictions(seed=SEED + 1), MODEL)
    assert (out / "photo.semseg.npy").read_bytes() == before
    write_pictures(out, names, images, _predictions(seed=SEED + 1), MODEL, force=True)
    assert (out / "photo.semseg.npy").read_bytes() != before
    with pytest.raises(M3VitError, match="is a file, not a folder"):
        write_pictures(out / "photo.png", names, images, predictions, MODEL)


def test_side_by_side_draws_the_depth_range_on_its_colour_bar():
    predictions = {task: p[0] for task, p in _predictions().items()}
    fig = side_by_side(torch.zeros(3, 32, 32), predictions, MODEL, title="t")
    near, far = float(predictions["depth"].min()), float(predictions["depth"].max())
    labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
    assert f"{near:.2f} m" in labels and f"{far:.2f} m" in labels
    assert len(fig.axes) == 1 + 3 + 1   # input, three tasks, the colour bar


def test_read_images_skips_bad_files_with_one_warning_each(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    warnings = []
    files, images = read_images([good, bad, good], (32, 32), warn=warnings.append)
    assert files == [good] and images.shape == (1, 3, 32, 32)
    assert warnings == [f"{bad}: not an image Pillow can read"]
    # One bad file alone: its own reason, no warning.
    warnings.clear()
    with pytest.raises(M3VitError, match=r"bad\.png: not an image"):
        read_images([bad], (32, 32), warn=warnings.append)
    assert warnings == []
    # Several, all bad: a warning each, then one line.
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(M3VitError, match="none of the 2 image files could be read"):
        read_images([bad, empty], (32, 32), warn=warnings.append)
    assert len(warnings) == 2 and warnings[1].startswith(f"{empty}: empty file")
