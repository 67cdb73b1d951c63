"""Damaged files end in one line (issue #18): a short Hypothesis fuzz of every format
through the CLI, and the holes it found, each pinned by a test of its own."""

import json
import struct
import subprocess
import sys

import pytest
import torch

from m3vit.sw.cli import main
from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import ConfigError, get_preset
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.model.train import load_checkpoint, save_checkpoint


@pytest.mark.xdist_group("soc_ci")   # its run report comes from the CI SoC model
def test_fuzzing_every_format_ends_in_one_line_or_the_original(tmp_path):
    """60 drawn mutations a format (truncations, bit flips, spliced bytes, header fields
    set to odd values and re-signed): every case is refused in one `m3vit: error:` line
    or accepted with the original content; no traceback, hang, or change to the corpus,
    under an 8 GiB address-space limit."""
    figures = tmp_path / "fuzz.json"
    run = subprocess.run([sys.executable, "-m", "m3vit.sw.bench.fuzz_files", "--examples",
                          "60", "--work", str(tmp_path / "fuzz"), "--json", str(figures)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(figures.read_text())
    formats = {r["format"] for r in result["rows"]}
    assert formats == {"m3q", "m3x", "checkpoint", "manifest", "report"}
    assert result["cases"] >= 5 * 55
    for fmt in formats:
        rejected = sum(r["rejected"] for r in result["rows"] if r["format"] == fmt)
        assert rejected > 0, fmt


def one_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("m3vit: error: "), err
    return err


@pytest.fixture
def checkpoint(tmp_path):
    model = M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0)
    return save_checkpoint(tmp_path / "t.pt", model, {"steps": 0}), model


def test_a_flipped_weight_bit_is_refused(checkpoint, capsys):
    """torch.load does not check its zip's CRCs: the checkpoint's own hash does."""
    path, _ = checkpoint
    data = bytearray(path.read_bytes())
    blob = torch.load(path, weights_only=True)
    w = blob["state_dict"]["patch_embed.proj.weight"].flatten()[:4].numpy().tobytes()
    data[data.find(w) + 1] ^= 0x10
    path.write_bytes(bytes(data))
    assert "checksum mismatch" in one_line(capsys, ["evaluate", str(path), "--n-test", "2"])


def test_a_version_1_checkpoint_still_loads(checkpoint):
    path, model = checkpoint
    blob = torch.load(path, weights_only=True)
    blob["version"] = 1
    del blob["hash"]
    torch.save(blob, path)
    loaded, _ = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


@pytest.mark.parametrize("change", [{"depth": 10**9}, {"img_size": (2**20, 2**20)},
                                    {"embed_dim": "64"}, {"mlp_ratio": float("nan")}])
def test_a_config_beyond_reason_is_refused_before_anything_is_built(change):
    with pytest.raises(ConfigError):
        get_preset("tiny").replace(**change)


def _m3x_with(path, edit):
    """The .m3x at ``path`` with its header edited and re-signed (a writer gone wrong)."""
    from m3vit.sw.compiler.executable import MAGIC, _digest

    data = path.read_bytes()
    (n,) = struct.unpack_from("<I", data, 8)
    head, tail = json.loads(data[12:12 + n]), data[12 + n:]
    cut = sum(sum(v) for v in head["program_sizes"].values())
    edit(head)
    head["sha256"] = _digest(head, tail[:cut], tail[cut:])
    raw = json.dumps(head).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(raw)) + raw + tail)


@pytest.mark.parametrize("edit", [
    lambda h: h["regions"].update({next(iter(h["regions"])): None}),
    lambda h: h.update(input=[h["image_size"], 64]),
    lambda h: h.update(input_scale=-1.0),
    lambda h: h["out_scales"].pop("depth"),
])
def test_a_resigned_m3x_with_bad_fields_is_refused(tmp_path, edit):
    from m3vit.hw.flow.generate import get_config
    from m3vit.sw.compiler.executable import compile_executable, load_executable
    from m3vit.sw.quant.quantize import quantize

    pkg = quantize(M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0), n_calib=2)
    path = compile_executable(pkg, get_config("ci")).save(tmp_path / "t.m3x")
    _m3x_with(path, edit)
    with pytest.raises(M3VitError, match="unreadable configuration"):
        load_executable(path)


def test_a_manifest_that_is_not_an_object_is_one_line(tmp_path):
    from m3vit.hw.flow.vivado.collect import check_replaceable

    (tmp_path / "m3vit_ci.bit").write_bytes(b"BIT")
    for text in ("[]", '{"bitstreams": null}', '{"bitstreams": {"m3vit_ci": 3}}'):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(M3VitError, match="unrecorded configuration"):
            check_replaceable(tmp_path, "m3vit_ci", "0x1", force=False)


def test_a_damaged_report_is_one_line(tmp_path, capsys):
    report = {"format": "m3vit-run/1", "board": "sim", "clock_mhz": 300.0, "model": "tiny",
              "array": "4x8", "config_hash": "0x1", "images": 1, "schedule": "REGISTER",
              "tasks": {"semseg": {"kind": "semseg", "metrics": {}, "bit_exact": True,
                                   "bit_exact_images": 1, "runs": [{"cycles": "many"}],
                                   "mean": {}}}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report))
    err = one_line(capsys, ["report", str(path)])
    assert "report.tasks.semseg.runs[0].cycles is 'many'" in err
