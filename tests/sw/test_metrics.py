"""Task metrics against hand-computed values, and the trivial baselines."""

import math

import pytest
import torch

from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import TaskSpec
from m3vit.sw.model.data import TEST_SEED, TRAIN_SEED, make_scenes
from m3vit.sw.model.metrics import (
    IGNORE_INDEX,
    baseline_metrics,
    confusion_matrix,
    delta_m,
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


# ---- pixels without ground truth (NYUD-v2) ---------------------------------------------

X = IGNORE_INDEX


def test_ignored_pixels_count_in_no_class():
    # Row 0 is the 2x2 hand example's first row; row 1 is entirely unlabelled, and what
    # was predicted there (class 2, a false positive were it counted) must not matter.
    pred = torch.tensor([[0, 1], [2, 2]])
    target = torch.tensor([[0, 1], [X, X]])
    cm = confusion_matrix(pred, target, 3, ignore_index=X)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert miou(pred, target, 3, ignore_index=X) == 1.0        # class 2 absent: skipped
    assert pixel_accuracy(pred, target, ignore_index=X) == 1.0
    # The same pixels without the ignore rule: 255 is no class.
    with pytest.raises(M3VitError, match="target label 255"):
        confusion_matrix(pred, target, 3)


def test_partly_ignored_hand_example():
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    target = torch.tensor([[0, 1, X], [0, 1, X]])
    # Labelled: the 2x2 hand example (class 0 IoU 1/2, class 1 IoU 2/3, accuracy 3/4).
    assert miou(pred, target, 2, ignore_index=X) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert pixel_accuracy(pred, target, ignore_index=X) == 0.75


def test_all_ignored_rows_and_sets():
    pred = torch.zeros(2, 3, dtype=torch.long)
    target = torch.full((2, 3), X)
    assert int(confusion_matrix(pred, target, 4, ignore_index=X).sum()) == 0
    assert miou(pred, target, 4, ignore_index=X) == 0.0
    assert pixel_accuracy(pred, target, ignore_index=X) == 0.0
    # Adding an all-ignored image to a set changes none of its figures.
    a_pred, a_target = PRED[None], TARGET[None]
    both_pred = torch.cat([a_pred, torch.ones_like(a_pred)])
    both_target = torch.cat([a_target, torch.full_like(a_target, X)])
    assert miou(both_pred, both_target, 3, X) == miou(a_pred, a_target, 3)
    assert pixel_accuracy(both_pred, both_target, X) == pixel_accuracy(a_pred, a_target)


def test_ignore_index_may_not_be_a_class():
    with pytest.raises(M3VitError, match="ignore_index 1 is one of the 3 classes"):
        confusion_matrix(PRED, TARGET, 3, ignore_index=1)


def test_depth_rmse_over_valid_pixels_only():
    pred = torch.tensor([1.0, 2.0, 7.0, 4.0])
    target = torch.tensor([1.0, 2.0, 0.0, 6.0])   # pixel 2 has no depth: its 7 is not scored
    assert depth_rmse(pred, target) == pytest.approx(math.sqrt(4 / 3))
    with pytest.raises(M3VitError, match="no valid target pixel"):
        depth_rmse(pred, torch.zeros(4))


def test_evaluate_predictions_skips_pixels_without_ground_truth():
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1], [1, 1]]), 3)
    logits = logits.permute(2, 0, 1)[None].float()
    preds = {"semseg": logits, "depth": torch.tensor([[[[1.0, 9.0], [3.0, 4.0]]]])}
    targets = {"semseg": torch.tensor([[[0, X], [0, 1]]]),
               "depth": torch.tensor([[[[1.0, 0.0], [3.0, 6.0]]]])}
    got = evaluate_predictions(preds, targets, TASKS[:2])
    # Labelled: (0 -> 0), (0 -> 1), (1 -> 1): class 0 IoU 1/2, class 1 IoU 1/2.
    assert got == {"semseg/miou": pytest.approx(0.5), "semseg/pixel_acc": pytest.approx(2 / 3),
                   "depth/rmse": pytest.approx(math.sqrt(4 / 3))}


def test_baseline_fits_and_scores_labelled_pixels_only():
    train = {"semseg": torch.tensor([[[X, X, X], [1, 1, 0]]]),   # 255 is no majority
             "depth": torch.tensor([0.0, 0.0, 2.0, 4.0]).view(4, 1, 1, 1)}
    test = {"semseg": torch.tensor([[[1, X], [0, 1]]]),
            "depth": torch.tensor([3.0, 0.0]).view(2, 1, 1, 1)}
    got = baseline_metrics(train, test, 2)
    assert got["semseg/pixel_acc"] == pytest.approx(2 / 3)      # predicts 1 on 3 pixels
    assert got["semseg/miou"] == pytest.approx((0 + 2 / 3) / 2)
    assert got["depth/rmse"] == 0.0                              # mean 3 of the valid depths


def test_delta_m_hand_example():
    metrics = {"semseg/miou": 0.44, "semseg/pixel_acc": 0.7, "depth/rmse": 0.55}
    # semseg +10 %, depth (lower is better) 0.55 vs 0.5 is 10 % worse: mean 0.
    assert delta_m(metrics, {"semseg/miou": 0.4, "depth/rmse": 0.5}) == pytest.approx(0.0)
    # M3ViT's NYUD-v2 single-task figures: +0.23 % and +5.98 %.
    got = delta_m(metrics, {"semseg/miou": 0.439, "depth/rmse": 0.585})
    assert got == pytest.approx(100 * ((0.44 - 0.439) / 0.439 - (0.55 - 0.585) / 0.585) / 2)
    assert delta_m(metrics, {"depth/rmse": 0.44}) == pytest.approx(-25.0)


@pytest.mark.parametrize(("baselines", "match"), [
    ({}, "no single-task baselines"),
    ({"normals/mean": 19.8}, "no metric of that name"),
    ({"depth/rmse": 0.0}, "must be a number > 0"),
    ({"depth/rmse": float("nan")}, "must be a number > 0"),
])
def test_delta_m_refuses_bad_baselines(baselines, match):
    with pytest.raises(M3VitError, match=match):
        delta_m({"depth/rmse": 0.5}, baselines)
