"""Task metrics against hand-computed values, and the trivial baselines."""

import math

import pytest
import torch

from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import TaskSpec
from m3vit.sw.model.data import TEST_SEED, TRAIN_SEED, make_scenes
from m3vit.sw.model.metrics import (
    baseline_metrics,
    confusion_matrix,
    depth_rmse,
    edge_f1,
    evaluate_predictions,
    iou_from_confusion,
    miou,
    pixel_accuracy,
)

# 2x2 example: class 0 has TP 1, FN 1, FP 0 -> IoU 1/2; class 1 has TP 2, FP 1 -> IoU 2/3;
# class 2 appears nowhere and is skipped.
PRED = torch.tensor([[0, 1], [1, 1]])
TARGET = torch.tensor([[0, 1], [0, 1]])


def test_confusion_matrix_rows_are_targets():
    cm = confusion_matrix(PRED, TARGET, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_confusion_matrices_add_over_batches():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (6, 7, 9), generator=g)
    target = torch.randint(0, 5, (6, 7, 9), generator=g)
    whole = confusion_matrix(pred, target, 5)
    parts = confusion_matrix(pred[:2], target[:2], 5) + confusion_matrix(pred[2:], target[2:], 5)
    assert torch.equal(whole, parts)
    assert int(whole.sum()) == pred.numel()


def test_iou_and_miou_hand_example():
    iou = iou_from_confusion(confusion_matrix(PRED, TARGET, 3))
    assert iou[0].item() == pytest.approx(1 / 2)
    assert iou[1].item() == pytest.approx(2 / 3)
    assert math.isnan(iou[2].item())
    assert miou(PRED, TARGET, 3) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_miou_counts_a_class_predicted_but_absent_from_target():
    pred = torch.tensor([[0, 2], [1, 1]])
    target = torch.tensor([[0, 1], [1, 1]])
    # class 0: 1/1, class 1: 2/3, class 2 (false positive only): 0
    assert miou(pred, target, 3) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_perfect_prediction_scores_one():
    labels = torch.tensor([[[0, 3], [3, 1]]])
    assert miou(labels, labels, 4) == 1.0
    assert pixel_accuracy(labels, labels) == 1.0


def test_pixel_accuracy_hand_example():
    assert pixel_accuracy(PRED, TARGET) == 0.75


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.tensor([0, 3]), torch.tensor([0, 1]), "prediction label 3"),
        (torch.tensor([0, 1]), torch.tensor([-1, 1]), "target label -1"),
        (torch.tensor([0, 1, 1]), torch.tensor([0, 1]), "shape"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer"),
    ],
)
def test_confusion_matrix_refuses_bad_labels(pred, target, match):
    with pytest.raises(M3VitError, match=match):
        confusion_matrix(pred, target, 3)


def test_depth_rmse_hand_example():
    assert depth_rmse(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 6.0])) == 1.0
    assert depth_rmse(torch.zeros(2), torch.tensor([3.0, 4.0])) == pytest.approx(math.sqrt(12.5))
    with pytest.raises(M3VitError, match="shape"):
        depth_rmse(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2))


def test_edge_f1_hand_example():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # TP 1, FN 1 (the -1.0), FP 1 (the 0.5): F1 = 2 / (2 + 1 + 1)
    assert edge_f1(logits, target) == 0.5
    # Raising the threshold to 1 drops the false positive: TP 1, FN 1 -> 2/3.
    assert edge_f1(logits, target, threshold=1.0) == pytest.approx(2 / 3)


def test_edge_f1_threshold_is_strict_and_conventions():
    target = torch.tensor([1.0, 0.0])
    assert edge_f1(torch.tensor([0.0, -1.0]), target) == 0.0  # logit 0 is not an edge
    assert edge_f1(torch.tensor([1e-3, -1.0]), target) == 1.0
    assert edge_f1(torch.tensor([-1.0, -1.0]), torch.zeros(2)) == 1.0  # nothing to find


def test_baseline_hand_example():
    train = {
        "semseg": torch.tensor([[[0, 0], [0, 1]], [[1, 1], [2, 0]]]),  # 0 is the majority
        "depth": torch.tensor([1.0, 3.0]).view(2, 1, 1, 1),
        "edge": torch.zeros(2, 1, 1, 1),
    }
    test = {
        "semseg": torch.tensor([[[0, 1], [2, 2]]]),
        "depth": torch.tensor([2.0, 4.0]).view(2, 1, 1, 1),
        "edge": torch.tensor([1.0, 0.0]).view(2, 1, 1, 1),
    }
    got = baseline_metrics(train, test, 3)
    # Predicting 0 everywhere: class 0 IoU 1/4, classes 1 and 2 IoU 0.
    assert got["semseg/miou"] == pytest.approx(1 / 12)
    assert got["semseg/pixel_acc"] == 0.25
    # Mean training depth 2: errors 0 and 2.
    assert got["depth/rmse"] == pytest.approx(math.sqrt(2))
    assert got["edge/f1"] == 0.0


def test_baseline_on_generated_scenes_is_far_from_perfect():
    train = make_scenes(300, (32, 32), n_classes=4, seed=TRAIN_SEED)
    test = make_scenes(200, (32, 32), n_classes=4, seed=TEST_SEED)
    got = baseline_metrics(train, test, 4)
    assert got["semseg/miou"] < 0.3, got
    assert got["semseg/pixel_acc"] < 0.9, got
    assert got["depth/rmse"] > 2.0, got
    assert got["edge/f1"] == 0.0


TASKS = (
    TaskSpec("semseg", "semseg", 3),
    TaskSpec("depth", "depth", 1),
    TaskSpec("edge", "edge", 1),
)


def test_evaluate_predictions_matches_the_metrics():
    logits = torch.nn.functional.one_hot(PRED, 3).permute(2, 0, 1)[None].float()
    preds = {
        "semseg": logits,
        "depth": torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]),
        "edge": torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]]),
    }
    targets = {
        "semseg": TARGET[None],
        "depth": torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]]),
        "edge": torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]]),
    }
    got = evaluate_predictions(preds, targets, TASKS)
    assert got == {
        "semseg/miou": pytest.approx((1 / 2 + 2 / 3) / 2),
        "semseg/pixel_acc": 0.75,
        "depth/rmse": 1.0,
        "edge/f1": 0.5,
    }
    assert evaluate_predictions(preds, targets, TASKS[1:2]) == {"depth/rmse": 1.0}


def test_evaluate_predictions_refuses_missing_or_misshapen_outputs():
    targets = {"semseg": TARGET[None]}
    with pytest.raises(M3VitError, match="no prediction for task 'semseg'"):
        evaluate_predictions({}, targets, TASKS[:1])
    with pytest.raises(M3VitError, match=r"expects logits \(N, 3, H, W\)"):
        evaluate_predictions({"semseg": torch.zeros(1, 4, 2, 2)}, targets, TASKS[:1])
    with pytest.raises(M3VitError, match="no target for task 'depth'"):
        evaluate_predictions({"depth": torch.zeros(1, 1, 2, 2)}, targets, TASKS[1:2])
