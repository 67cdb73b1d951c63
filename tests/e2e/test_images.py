"""A user's own images on the simulated board: ``m3vit run --image … --out …`` and
``Accelerator.infer`` of files and PIL images.

The ``tiny`` model compiled for the CI configuration, as in ``test_runtime.py``; the picture
is a synthetic scene saved as a plain PNG at a size no preset has, so it is scaled and
cropped on the way in. Each image is ~1 M simulated cycles: the file runs three.
"""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from m3vit.hw.config import CI
from m3vit.sw.cli import main
from m3vit.sw.compiler.executable import compile_executable, load_executable
from m3vit.sw.model.config import get_preset
from m3vit.sw.model.data import make_scenes, save_scene_images
from m3vit.sw.model.imageio import load_image
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.quant import golden
from m3vit.sw.quant.package import save_package
from m3vit.sw.quant.quantize import quantize
from m3vit.sw.runtime.driver import Accelerator
from m3vit.sw.runtime.pictures import class_palette
from m3vit.sw.runtime.session import load_report

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("soc_ci")]

SEED = 29


@functools.cache
def tiny_package():
    return quantize(M3ViT(get_preset("tiny"), seed=0), n_calib=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The package (.m3q and its CI .m3x), a 40 x 56 picture and a file that is not one."""
    folder = tmp_path_factory.mktemp("images")
    m3q = save_package(folder / "tiny.m3q", tiny_package())
    assert main(["compile", str(m3q), "--config", "ci"]) == 0
    scene = make_scenes(1, (40, 56), n_classes=4, seed=SEED)["image"]
    photo = save_scene_images(scene, folder / "photo.png")[0]
    notes = folder / "notes.png"
    notes.write_text("these are notes, not a picture\n")
    return {"m3q": m3q, "m3x": folder / "tiny.ci.m3x", "photo": photo, "notes": notes}


def golden_prediction(photo, task):
    """The prediction of the golden model for ``photo`` as the runtime makes it."""
    pkg, exe = tiny_package(), compile_executable(tiny_package(), CI)
    x = load_image(photo, pkg.config.img_size)[None]
    heads, _ = golden.forward(pkg.tensors, pkg.config,
                              golden.quantize_image(x, exe.input_scale), task)
    scale = torch.tensor(exe.out_scales[task], dtype=torch.float64)
    return golden.upsample(golden.dequantize_head(heads, scale), pkg.config)[0]


def test_run_writes_readable_pictures_and_skips_a_bad_file(files, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "run.json"
    status = main(["run", str(files["m3x"]), "--image", str(files["photo"]), str(files["notes"]),
                   "--out", str(out), "--check", str(files["m3q"]), "--json", str(report)])
    captured = capsys.readouterr()
    # One warning for the bad file, the run of the good one, then one error line at the end.
    assert status == 2
    warnings = [line for line in captured.err.splitlines() if line.startswith("m3vit: warning")]
    assert warnings == [f"m3vit: warning: {files['notes']}: not an image Pillow can read; "
                        "skipped"]
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("m3vit: error: 1 of 2 image files could not be read")
    assert "1 image file(s) (no targets, no metric)" in captured.out and "1/1" in captured.out
    saved = load_report(report)
    assert saved["image_files"] == [str(files["photo"])]
    for task in ("semseg", "depth"):
        assert saved["tasks"][task]["bit_exact"] is True
        assert saved["tasks"][task]["metrics"] == {}

    assert sorted(p.name for p in out.iterdir()) == sorted([
        "legend.semseg.png", "photo.png", "photo.semseg.png", "photo.semseg.npy",
        "photo.depth.png", "photo.depth.npy"])
    # Each .npy is the runtime's prediction: the golden model's, bit for bit, dequantised.
    for task in ("semseg", "depth"):
        npy = np.load(out / f"photo.{task}.npy")
        assert npy.shape == ((4, 32, 32) if task == "semseg" else (1, 32, 32))
        assert torch.equal(torch.from_numpy(npy), golden_prediction(files["photo"], task))
    semseg = Image.open(out / "photo.semseg.png")
    assert semseg.format == "PNG" and semseg.mode == "P" and semseg.size == (32, 32)
    labels = np.asarray(semseg)
    assert np.array_equal(labels, np.load(out / "photo.semseg.npy").argmax(0))
    palette = {tuple(c) for c in class_palette(4)}
    colours = {tuple(c) for c in np.asarray(semseg.convert("RGB")).reshape(-1, 3)}
    assert colours <= palette
    depth = Image.open(out / "photo.depth.png")
    assert depth.mode == "RGB" and depth.size == (32, 32)
    d = np.load(out / "photo.depth.npy")
    assert depth.text["depth_min_m"] == f"{d.min():.6g}"
    assert depth.text["depth_max_m"] == f"{d.max():.6g}"
    figure = Image.open(out / "photo.png")
    assert figure.size[0] > 600 and figure.size[1] > 200
    assert Image.open(out / "legend.semseg.png").size[1] > 50


def test_every_file_bad_or_a_clash_is_one_line_before_running(files, tmp_path, capsys):
    m3x = str(files["m3x"])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")

    def run(*args):
        status = main(["run", m3x, *args])
        return status, capsys.readouterr().err.strip().splitlines()

    status, err = run("--image", str(files["notes"]))
    assert status == 2 and err == [f"m3vit: error: {files['notes']}: not an image Pillow can "
                                   "read"]
    status, err = run("--image", str(files["notes"]), str(empty))
    assert status == 2 and len(err) == 3 and err[1].endswith("; skipped")
    assert err[-1] == ("m3vit: error: none of the 2 image files could be read (the warnings "
                       "above say why)")
    status, err = run("--image", str(files["photo"]), "--images", "3", "--seed", "2")
    assert status == 2 and err == ["m3vit: error: --images and --seed choose synthetic "
                                   "scenes: leave them out with --image/--image-dir"]
    status, err = run("--image", str(files["photo"]), "--dataset", "nyud", "--data", "NYUD")
    assert status == 2 and err == ["m3vit: error: --dataset picks images to run: leave it out "
                                   "with --image/--image-dir"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.depth.npy").write_bytes(b"mine")
    status, err = run("--image-dir", str(files["photo"].parent), "--out", str(out))
    assert status == 2 and len(err) == 2 and err[0].endswith("; skipped")
    assert err[1] == (f"m3vit: error: {out / 'photo.depth.npy'} exists (1 of the files this "
                      "run writes do): pass --force to overwrite them or choose another --out")
    assert (out / "photo.depth.npy").read_bytes() == b"mine"


def test_infer_takes_image_files_and_pil_images(files):
    """A path and a PIL image in one list: loaded, fitted and run like the tensor."""
    with Accelerator.open("sim", config=CI, watchdog_cycles=1_500_000) as acc:
        acc.load(load_executable(files["m3x"]))
        with Image.open(files["photo"]) as picture:
            out = acc.infer([files["photo"], picture], "semseg")
    want = golden_prediction(files["photo"], "semseg")
    assert torch.equal(out.predictions[0], want) and torch.equal(out.predictions[1], want)
