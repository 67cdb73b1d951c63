"""Reading a user's image files and fitting them to a model's input (m3vit.sw.model.imageio).

Every picture is made here with Pillow from seeded numpy arrays, so each expected value is
known exactly: what the reader returns per mode, the shape and the rows the fit keeps, the
normalisation, and the one-line error for each kind of bad file.
"""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from m3vit.sw.errors import M3VitError
from m3vit.sw.model.data import IMAGE_MEAN, IMAGE_STD
from m3vit.sw.model.imageio import fit, image_files, load_image, read_image

SEED = 19


@pytest.fixture
def rgb():
    """A seeded 21 x 37 (height x width) 8-bit RGB picture: odd sizes, wider than tall."""
    return np.random.default_rng(SEED).integers(0, 256, (21, 37, 3), dtype=np.uint8)


def _save(tmp_path, name, picture, **options):
    path = tmp_path / name
    picture.save(path, **options)
    return path


def test_rgb_png_is_read_exactly(tmp_path, rgb):
    x = read_image(_save(tmp_path, "a.png", Image.fromarray(rgb)))
    assert x.dtype == np.float32 and x.shape == (21, 37, 3)
    np.testing.assert_array_equal(x, rgb.astype(np.float32) / 255.0)


def test_greyscale_is_copied_to_three_channels(tmp_path, rgb):
    grey = rgb[..., 0]
    x = read_image(_save(tmp_path, "g.png", Image.fromarray(grey, mode="L")))
    assert x.shape == (21, 37, 3)
    for channel in range(3):
        np.testing.assert_array_equal(x[..., channel], grey.astype(np.float32) / 255.0)


def test_alpha_is_composited_on_black(tmp_path, rgb):
    alpha = np.random.default_rng(SEED + 1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    rgba = np.dstack([rgb, alpha])
    x = read_image(_save(tmp_path, "a.png", Image.fromarray(rgba, mode="RGBA")))
    want = (rgb.astype(np.float32) / 255.0) * (alpha.astype(np.float32) / 255.0)[..., None]
    np.testing.assert_array_equal(x, want)
    assert x[alpha == 0].max() == 0.0
    # Greyscale with alpha (LA) the same way.
    la = np.dstack([rgb[..., 1], alpha])
    x = read_image(_save(tmp_path, "la.png", Image.fromarray(la, mode="LA")))
    want = (rgb[..., 1].astype(np.float32) / 255.0) * (alpha.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(x[..., 2], want)


def test_palette_image_reads_its_colours(tmp_path):
    palette = np.array([[0, 0, 0], [255, 0, 0], [10, 200, 30], [7, 8, 9]], dtype=np.uint8)
    index = np.random.default_rng(SEED).integers(0, 4, (9, 13), dtype=np.uint8)
    picture = Image.fromarray(index, mode="L")
    picture.putpalette(palette.tobytes())
    assert picture.mode == "P"
    x = read_image(_save(tmp_path, "p.png", picture))
    np.testing.assert_array_equal(x, palette[index].astype(np.float32) / 255.0)
    # With a transparent index: those pixels are black, the others keep their colour.
    x = read_image(_save(tmp_path, "pt.png", picture, transparency=1))
    want = palette[index].astype(np.float32) / 255.0
    want[index == 1] = 0.0
    np.testing.assert_array_equal(x, want)


def test_16_bit_greyscale_keeps_its_precision(tmp_path):
    grey = np.random.default_rng(SEED).integers(0, 65536, (17, 11), dtype=np.uint16)
    grey[0, 0], grey[0, 1] = 0, 65535
    path = _save(tmp_path, "g16.png", Image.fromarray(grey))
    assert Image.open(path).mode == "I;16"
    x = read_image(path)
    want = (grey.astype(np.float64) / 65535.0).astype(np.float32)
    for channel in range(3):
        np.testing.assert_array_equal(x[..., channel], want)
    # Finer than 8 bits: values 1/65535 apart stay apart.
    assert len(np.unique(x[..., 0])) == len(np.unique(grey))


def test_jpeg_is_read_as_pillow_decodes_it(tmp_path, rgb):
    path = _save(tmp_path, "a.jpg", Image.fromarray(rgb), quality=95)
    x = read_image(path)
    decoded = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(x, decoded)
    assert x.shape == (21, 37, 3)


@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, rgb, orientation, turn):
    """EXIF 3: upside down; 6: turn 90° clockwise to view; 8: 90° anticlockwise."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    x = read_image(_save(tmp_path, "o.png", Image.fromarray(rgb), exif=exif))
    np.testing.assert_array_equal(x, np.rot90(rgb, turn).astype(np.float32) / 255.0)


def test_pil_image_is_read_like_its_file(tmp_path, rgb):
    path = _save(tmp_path, "a.png", Image.fromarray(rgb))
    with Image.open(path) as picture:
        np.testing.assert_array_equal(read_image(picture), read_image(path))


@pytest.mark.parametrize("size, img_size", [
    ((21, 37), (32, 32)),      # smaller than the preset: scaled up
    ((480, 640), (128, 256)),  # a photograph for edge-moe: scaled down, rows cropped
    ((300, 40), (32, 32)),     # tall and narrow
    ((32, 32), (32, 32)),      # already the size
])
def test_load_image_fits_any_size_to_the_model_input(tmp_path, size, img_size):
    picture = np.random.default_rng(SEED).integers(0, 256, (*size, 3), dtype=np.uint8)
    x = load_image(_save(tmp_path, "x.png", Image.fromarray(picture)), img_size)
    assert x.shape == (3, *img_size) and x.dtype == torch.float32


def test_load_image_normalises_like_the_training_data(tmp_path):
    colour = np.array([255, 0, 128], dtype=np.uint8)
    flat = np.broadcast_to(colour, (40, 50, 3)).copy()
    x = load_image(_save(tmp_path, "flat.png", Image.fromarray(flat)), (32, 32))
    want = (torch.tensor(colour / 255.0, dtype=torch.float32) - torch.tensor(IMAGE_MEAN)) \
        / torch.tensor(IMAGE_STD)
    # A flat picture stays flat through the bilinear scaling.
    torch.testing.assert_close(x, want[:, None, None].expand(3, 32, 32), rtol=0, atol=1e-6)
    # Unchanged size: exactly the pixel values, normalised.
    x = load_image(_save(tmp_path, "same.png", Image.fromarray(flat[:32, :32])), (32, 32))
    assert torch.equal(x, ((torch.from_numpy(flat[:32, :32] / 255.0).float().permute(2, 0, 1)
                            - torch.tensor(IMAGE_MEAN)[:, None, None])
                           / torch.tensor(IMAGE_STD)[:, None, None]))


def test_fit_crops_the_centre_without_scaling_when_one_side_fits():
    x = torch.arange(8.0).reshape(1, 2, 4)
    assert torch.equal(fit(x, (2, 2)), torch.tensor([[[1.0, 2.0], [5.0, 6.0]]]))
    tall = torch.arange(6.0).reshape(1, 6, 1).expand(1, 6, 2)
    assert torch.equal(fit(tall, (2, 2)), torch.tensor([[[2.0, 2.0], [3.0, 3.0]]]))


def test_fit_of_a_label_map_keeps_its_labels():
    """A 480 x 640 map of eight 60-row bands, fitted to 128 x 256: scaled to 192 x 256 (24-row
    bands), its rows 32 … 159 kept, so bands 1 to 6 and nothing but band values."""
    labels = (torch.arange(480) // 60).reshape(1, 480, 1).expand(1, 480, 640).clone()
    out = fit(labels, (128, 256), nearest=True)
    assert out.shape == (1, 128, 256) and out.dtype == torch.int64
    assert set(out.unique().tolist()) == {1, 2, 3, 4, 5, 6}
    assert out[0, 0].unique().tolist() == [1] and out[0, -1].unique().tolist() == [6]
    # Labels never blend: a two-class map scaled up keeps exactly its two values.
    small = torch.tensor([[[3, 7], [7, 3]]])
    assert set(fit(small, (5, 9), nearest=True).unique().tolist()) == {3, 7}
    assert fit(small, (5, 9), nearest=True).shape == (1, 5, 9)


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG that claims the given size: its header and an almost empty IDAT chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_bad_files_are_one_line_naming_the_file(tmp_path, rgb):
    png = _save(tmp_path, "good.png", Image.fromarray(rgb)).read_bytes()
    jpeg = _save(tmp_path, "good.jpg", Image.fromarray(rgb)).read_bytes()
    cases = {
        "notes.png": (b"these are notes, not a picture\n", "not an image"),
        "empty.png": (b"", "empty file (0 bytes)"),
        "cut.png": (png[:len(png) // 2], "damaged or truncated"),
        "cut.jpg": (jpeg[:len(jpeg) - 100], "damaged or truncated"),
        "header.png": (png[:40], "not an image"),
        "huge.png": (_header_only_png(12_000, 12_000), "too many pixels (12000x12000)"),
        "bomb.png": (_header_only_png(20_000, 20_000), "too many pixels"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(M3VitError) as e:
            read_image(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and reason in message, message
        assert "\n" not in message
    for path, reason in ((tmp_path / "missing.png", "no such file"),
                         (tmp_path, "is a folder")):
        with pytest.raises(M3VitError, match=reason) as e:
            load_image(path, (32, 32))
        assert str(e.value).startswith(f"{path}: ")


def test_a_pil_image_of_a_cut_file_and_an_unconvertible_mode_are_one_line(tmp_path, rgb):
    png = _save(tmp_path, "good.png", Image.fromarray(rgb)).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(png[:len(png) // 2])
    with Image.open(cut) as picture, pytest.raises(M3VitError) as e:
        read_image(picture)   # Image.open read the header only: decoding fails here
    assert str(e.value).startswith(f"{cut}: damaged or truncated")
    with pytest.raises(M3VitError, match="image: colour mode La is not supported"):
        read_image(Image.new("La", (3, 2)))


def test_image_files_lists_pictures_by_name(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.txt", "d.webp", ".hidden", "e.tiff"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in image_files(tmp_path)] == ["a.jpg", "b.PNG", "d.webp", "e.tiff"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(M3VitError, match="no image files"):
        image_files(empty)
    with pytest.raises(M3VitError, match="no such folder"):
        image_files(tmp_path / "nowhere")
