"""NYUD-v2 through the whole ``m3vit`` command line, ending on the simulated board.

A small folder in the NYUD_MT layout (``write_nyud_folder``: 3 train and 2 val images)
goes through ``train --dataset nyud``, ``evaluate --baselines``, ``quantize --calib-data
--report``, ``compile --config ci`` and ``run --dataset nyud --check`` on the Verilated
SoC model of the CI configuration (built or reused from ``build/soc``, as in
``test_runtime.py``; one ``tiny`` image is ~1 M simulated cycles).
"""

import json
import re

import pytest

from m3vit.sw.cli import main
from m3vit.sw.model.metrics import evaluate_predictions
from m3vit.sw.model.nyud import load_nyud
from m3vit.sw.quant.accuracy import golden_predict
from m3vit.sw.quant.package import load_package
from m3vit.sw.runtime.session import load_report

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("soc_ci")]


def test_train_evaluate_quantize_compile_and_run_on_nyud(nyud_folder, tmp_path, capsys):
    root, splits = nyud_folder
    data = ["--dataset", "nyud", "--data", str(root)]
    ckpt, m3q = tmp_path / "tiny.pt", tmp_path / "tiny.m3q"

    assert main(["train", "--preset", "tiny", *data, "--steps", "4", "--batch-size", "3",
                 "--out", str(ckpt), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "tiny: semseg head of 40 classes for NYUD-v2 (the preset has 4)" in out
    assert "3 training images (train), 2 held out (val)" in out
    assert re.search(r"semseg/miou\s+\d\.\d{4}\s+\d\.\d{4}", out)

    baselines = tmp_path / "single.json"
    baselines.write_text(json.dumps({"semseg/miou": 0.439, "depth/rmse": 0.585}))
    assert main(["evaluate", str(ckpt), *data, "--baselines", str(baselines)]) == 0
    out = capsys.readouterr().out
    assert "2 held-out images (val)" in out
    assert re.search(r"Δm [+-]\d+\.\d\d % against the single-task baselines", out)

    assert main(["quantize", str(ckpt), "--calib-data", str(root), "--report",
                 "--out", str(m3q)]) == 0
    out = capsys.readouterr().out
    assert "2 held-out NYUD-v2 val images, calibration 'max' on 3 NYUD-v2 train images" in out
    pkg = load_package(m3q)
    assert pkg.params["calibration"] == {"statistic": "max", "images": 3,
                                         "data": "NYUD-v2 train images"}

    assert main(["compile", str(m3q), "--config", "ci"]) == 0
    m3x, run_json = tmp_path / "tiny.ci.m3x", tmp_path / "run.json"
    capsys.readouterr()
    pictures = tmp_path / "pictures"
    assert main(["run", str(m3x), *data, "--config", "ci", "--check", str(m3q),
                 "--images", "1", "--json", str(run_json), "--out", str(pictures)]) == 0
    out = capsys.readouterr().out
    # The pictures are named by the NYUD-v2 id of the image.
    first = splits["val"][0]
    assert {f"{first}.semseg.png", f"{first}.depth.npy", f"{first}.png"} <= {
        p.name for p in pictures.iterdir()}
    report = load_report(run_json)
    assert report["images"] == 1
    # The metrics are those of the golden model on the first NYUD-v2 val image: scored
    # against its labels (unlabelled pixels skipped), not against a synthetic scene.
    val = load_nyud(root, pkg.config, "val", 1, progress=False)
    for task in pkg.config.tasks:
        got = report["tasks"][task.name]
        assert got["bit_exact"] is True and got["bit_exact_images"] == 1
        want = evaluate_predictions({task.name: golden_predict(pkg, val["image"], task.name)},
                                    {task.name: val[task.kind]}, [task])
        assert got["metrics"] == pytest.approx(want, abs=1e-12)
        assert re.search(rf"{task.name}\s.*{'rmse' if task.kind == 'depth' else 'miou'} "
                         rf"{want[next(iter(want))]:.3f}", out)
