"""Training the tiny preset on synthetic scenes, and checkpoints."""

import pytest
import torch

from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import get_preset
from m3vit.sw.model.train import TrainConfig, load_checkpoint, save_checkpoint

# `trained_tiny` (tests/conftest.py) is a short run (250 steps, ~1-2 min on one core); it
# already separates the model from the baselines by a wide margin.
pytestmark = pytest.mark.xdist_group("trained_tiny")


@pytest.fixture
def trained(trained_tiny):
    return trained_tiny


@pytest.mark.slow
def test_trained_tiny_beats_trivial_baselines(trained):
    _, report = trained
    m, b = report["metrics"], report["baseline"]
    print(f"\nheld-out: {m}\nbaseline: {b}")
    # Majority class scores mIoU ~0.2 on these scenes; the model must reach 0.2 more at least.
    assert m["semseg/miou"] >= b["semseg/miou"] + 0.2
    assert m["semseg/pixel_acc"] > b["semseg/pixel_acc"] + 0.05
    # Depth RMSE at most half of predicting the mean training depth everywhere.
    assert m["depth/rmse"] <= 0.5 * b["depth/rmse"]


@pytest.mark.slow
def test_checkpoint_round_trip(trained, tmp_path):
    model, report = trained
    path = save_checkpoint(tmp_path / "tiny.pt", model, report)
    loaded, loaded_report = load_checkpoint(path, preset="tiny")
    assert loaded.cfg == model.cfg
    assert loaded_report["metrics"] == pytest.approx(report["metrics"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x, task="depth"), model(x, task="depth"))


@pytest.mark.slow
def test_checkpoint_is_not_overwritten_without_asking(trained, tmp_path):
    model, report = trained
    path = tmp_path / "tiny.pt"
    path.write_bytes(b"the user's file")
    with pytest.raises(M3VitError, match="exists: pass --force"):
        save_checkpoint(path, model, report)
    assert path.read_bytes() == b"the user's file"


def test_bad_checkpoints_are_refused(tmp_path):
    from m3vit.sw.model.m3vit import M3ViT

    with pytest.raises(M3VitError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(M3VitError, match="not a readable m3vit checkpoint"):
        load_checkpoint(garbage)
    good = save_checkpoint(tmp_path / "tiny.pt", M3ViT(get_preset("tiny")), {})
    with pytest.raises(M3VitError, match="trained for preset 'tiny', not 'edge-moe'"):
        load_checkpoint(good, preset="edge-moe")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(M3VitError, match="not a readable m3vit checkpoint"):
        load_checkpoint(truncated)


def test_bad_train_config():
    with pytest.raises(M3VitError, match="steps must be >= 1, got 0"):
        TrainConfig(steps=0)
