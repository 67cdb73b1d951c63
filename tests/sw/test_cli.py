"""The m3vit command line: help, figures, and one clear line for every bad input."""

import re
import subprocess
import sys

import pytest

from m3vit.sw.cli import main
from m3vit.sw.model.config import get_preset
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.model.train import save_checkpoint


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return str(save_checkpoint(tmp_path / "tiny.pt", M3ViT(get_preset("tiny")), {}))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["flops", "--preset", "huge"],
         "unknown preset 'huge' (choose from tiny, edge-moe, m3vit-s)"),
        (["flops", "--preset", "tiny", "--task", "normals"], "unknown task 'normals'"),
        (["flops", "--preset", "tiny", "--top-k", "5"], "top_k must be between 1 and n_experts=4"),
        (["flops", "--preset", "tiny", "--img-size", "30x32"], "not divisible by the patch size 4"),
        (["flops", "--preset", "tiny", "--img-size", "big"], "expected HEIGHTxWIDTH"),
        (["evaluate", "missing.pt"], "checkpoint missing.pt not found"),
        (["train", "--steps", "0", "--quiet", "--out", "/nonexistent/x.pt"], "steps must be >= 1"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and re.match(r"m3vit( [a-z-]+)?: error: ", err)
    assert message in err
    assert "Traceback" not in out + err


def test_checkpoint_of_another_preset(capsys, tiny_checkpoint):
    code, _, err = run(capsys, "evaluate", tiny_checkpoint, "--preset", "edge-moe")
    assert code == 2
    assert err.strip() == (
        f"m3vit: error: {tiny_checkpoint} was trained for preset 'tiny', not 'edge-moe': "
        "pass --preset tiny or another checkpoint"
    )


def test_train_refuses_to_overwrite_before_training(capsys, tiny_checkpoint):
    code, _, err = run(capsys, "train", "--out", tiny_checkpoint, "--quiet")
    assert code == 2 and "exists: pass --force" in err


def test_evaluate_one_task(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "evaluate", tiny_checkpoint, "--task", "depth", "--n-test", "20")
    assert code == 0
    assert "depth/rmse" in out and "semseg/miou" not in out


def test_inspect_package_and_corrupt_package(capsys, tmp_path):
    from m3vit.sw.quant.package import save_package
    from m3vit.sw.quant.quantize import quantize

    pkg = quantize(M3ViT(get_preset("tiny")), n_calib=4)
    path = save_package(tmp_path / "tiny.m3q", pkg)
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0 and "preset tiny" in out and "content hash" in out
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF                                  # one flipped weight byte
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, "inspect", str(path))
    assert code == 2 and err.count("\n") == 1 and "content hash mismatch" in err
    path.write_bytes(bytes(data[: len(data) // 2]))     # truncated
    code, _, err = run(capsys, "inspect", str(path))
    assert code == 2 and err.count("\n") == 1 and str(path) in err


def test_presets_and_flops(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "edge-moe" in out and "129" in out
    code, out, _ = run(capsys, "flops", "--preset", "tiny")
    assert code == 0 and "fewer than the all-task forward" in out


def test_bitstream_help_says_what_happens_with_and_without_vivado(capsys):
    code, out, _ = run(capsys, "bitstream", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "With Vivado on PATH (it must be Vivado 2025.2" in text
    assert "Without Vivado, write the project, print the commands to run" in text
    assert "exit with status 2" in text
    for option in ("--config", "--out", "--build-dir", "--jobs", "--force", "--scripts-only",
                   "--collect"):
        assert option in out


def test_console_script_help_and_error():
    exe = [sys.executable, "-m", "m3vit.sw.cli"]
    help_text = subprocess.run([*exe, "--help"], capture_output=True, text=True, check=True)
    for command in ("presets", "flops", "train", "evaluate", "import-timm", "quantize",
                    "inspect", "scenes", "generate", "resources", "bitstream", "compile", "run",
                    "report"):
        assert command in help_text.stdout
    bad = subprocess.run([*exe, "flops", "--preset", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "m3vit: error: unknown preset 'nope' (choose from tiny, edge-moe, m3vit-s)"
    ]
