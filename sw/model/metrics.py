"""Dense-prediction metrics for the three task kinds, and the trivial baselines to beat.

All metrics are pooled over every pixel of every image (one confusion matrix or one sum of
squares for the whole set), not averaged per image, so they do not depend on how the set is
batched.

Real data has pixels without ground truth, and these follow M³ViT's evaluation
(``evaluation/eval_semseg.py`` and ``eval_depth.py`` of its repository): a semseg pixel
labelled :data:`IGNORE_INDEX` counts in no class's TP, FP or FN, and a depth pixel whose
target is 0 (no Kinect reading) is left out of the RMSE. The synthetic scenes have neither,
so their figures are the same with or without these rules. :func:`delta_m` is the
multi-task figure M³ViT reports against single-task baselines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ..errors import M3VitError
from .config import TaskSpec

IGNORE_INDEX = 255
"""Semseg target label of a pixel without ground truth (NYUD-v2's unlabelled pixels): no
metric or loss counts it. 255 as in M³ViT, whose NYUD reader maps label 0 to 255."""

LOWER_IS_BETTER = ("rmse",)
"""Metric names (the part after ``/``) where a smaller value is better; every other metric
(``miou``, ``pixel_acc``, ``f1``) is better when larger."""


def _check_same_shape(name: str, pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise M3VitError(
            f"{name}: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
        )


def _check_labels(name: str, labels: torch.Tensor, n_classes: int) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise M3VitError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        bad = lo if lo < 0 else hi
        raise M3VitError(f"{name} label {bad} is outside [0, {n_classes})")


def _drop_ignored(
    pred: torch.Tensor, target: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled pixels of ``pred`` and ``target`` (flattened when any is ignored)."""
    if ignore_index is None:
        return pred, target
    keep = target != ignore_index
    if bool(keep.all()):
        return pred, target
    return pred[keep], target[keep]


def _ignore_index(n_classes: int) -> int | None:
    """:data:`IGNORE_INDEX` unless it is a class of a model with more than 255 classes."""
    return IGNORE_INDEX if n_classes <= IGNORE_INDEX else None


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Pixel confusion matrix.

    Parameters
    ----------
    pred, target : torch.Tensor
        Integer class labels of the same shape (any number of dimensions).
    n_classes : int
        Number of classes; labels must lie in ``[0, n_classes)``.
    ignore_index : int, optional
        Target label of unlabelled pixels (e.g. :data:`IGNORE_INDEX`): those pixels are
        left out, whatever was predicted there. It must not be a class (``>= n_classes``).

    Returns
    -------
    torch.Tensor
        int64 (n_classes, n_classes); entry ``[t, p]`` counts pixels of true class ``t``
        predicted as ``p`` (rows: target, columns: prediction).

    Raises
    ------
    M3VitError
        On a shape mismatch, non-integer labels or a label outside ``[0, n_classes)``.
    """
    if n_classes < 1:
        raise M3VitError(f"n_classes must be >= 1, got {n_classes!r}")
    _check_same_shape("confusion_matrix", pred, target)
    if ignore_index is not None and 0 <= ignore_index < n_classes:
        raise M3VitError(f"ignore_index {ignore_index} is one of the {n_classes} classes")
    pred, target = _drop_ignored(pred, target, ignore_index)
    _check_labels("prediction", pred, n_classes)
    _check_labels("target", target, n_classes)
    index = target.reshape(-1).long() * n_classes + pred.reshape(-1).long()
    counts = torch.bincount(index, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class intersection over union from a confusion matrix.

    Parameters
    ----------
    cm : torch.Tensor
        (C, C) confusion matrix as returned by :func:`confusion_matrix`.

    Returns
    -------
    torch.Tensor
        float64 (C,): ``TP / (TP + FP + FN)`` per class, NaN for a class that appears in
        neither target nor prediction (its union is empty).
    """
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def miou(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int, ignore_index: int | None = None
) -> float:
    """Mean intersection over union.

    The mean runs over the classes present in the target *or* the prediction (non-empty
    union); classes absent from both are skipped rather than counted as 0 or 1. A class
    that is predicted but never true therefore counts with IoU 0. (M³ViT counts a class
    absent from both as 0; on the whole NYUD-v2 val split, where all 40 classes occur,
    the two agree.)

    Parameters
    ----------
    pred, target : torch.Tensor
        Integer class labels of the same shape.
    n_classes : int
        Number of classes.
    ignore_index : int, optional
        Target label of pixels to leave out (:func:`confusion_matrix`).

    Returns
    -------
    float
        mIoU in [0, 1]; 0.0 for empty inputs or when every pixel is ignored.
    """
    iou = iou_from_confusion(confusion_matrix(pred, target, n_classes, ignore_index))
    present = ~iou.isnan()
    return float(iou[present].mean()) if bool(present.any()) else 0.0


def pixel_accuracy(
    pred: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None
) -> float:
    """Fraction of pixels whose predicted label equals the target label.

    Parameters
    ----------
    pred, target : torch.Tensor
        Integer class labels of the same shape.
    ignore_index : int, optional
        Target label of pixels to leave out of both the count and the total.

    Returns
    -------
    float
        Accuracy in [0, 1]; 0.0 for empty inputs or when every pixel is ignored.
    """
    _check_same_shape("pixel_accuracy", pred, target)
    pred, target = _drop_ignored(pred, target, ignore_index)
    if target.numel() == 0:
        return 0.0
    return float((pred == target).double().mean())


def depth_rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Root-mean-square depth error over the valid pixels, in the units of the target.

    A pixel is valid where its target depth is > 0: NYUD-v2 stores 0 where the sensor gave
    no reading, and M³ViT's ``eval_depth`` leaves those pixels out in the same way.

    Parameters
    ----------
    pred, target : torch.Tensor
        Depths of the same shape, e.g. (N, 1, H, W) in metres.

    Returns
    -------
    float
        ``sqrt(mean((pred - target) ** 2))`` over the pixels with ``target > 0``.

    Raises
    ------
    M3VitError
        On a shape mismatch, an empty set or a target without any valid pixel.
    """
    _check_same_shape("depth_rmse", pred, target)
    if target.numel() == 0:
        raise M3VitError("depth_rmse of an empty set is undefined")
    valid = target > 0
    if not bool(valid.all()):
        # Only then select, so a target with every pixel valid sums exactly as before.
        if not bool(valid.any()):
            raise M3VitError("depth_rmse: no valid target pixel (every depth is 0 or less)")
        pred, target = pred[valid], target[valid]
    diff = pred.double() - target.double()
    return float(diff.square().mean().sqrt())


def edge_f1(pred_logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> float:
    """Pixel-wise F1 score of predicted edges.

    Parameters
    ----------
    pred_logits : torch.Tensor
        Edge logits; a pixel is an edge where ``pred_logits > threshold`` (logit 0 is
        probability 0.5).
    target : torch.Tensor
        0/1 edge map of the same shape (a pixel is an edge where it is > 0.5).
    threshold : float
        Logit threshold.

    Returns
    -------
    float
        ``2 TP / (2 TP + FP + FN)``, pooled over all pixels. When neither target nor
        prediction has an edge pixel the prediction is perfect and the score is 1.0.
    """
    _check_same_shape("edge_f1", pred_logits, target)
    pred = pred_logits > threshold
    true = target > 0.5
    tp = int((pred & true).sum())
    fp = int((pred & ~true).sum())
    fn = int((~pred & true).sum())
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 1.0


def baseline_metrics(
    train: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor], n_classes: int
) -> dict[str, float]:
    """Scores of the trivial predictors fitted on ``train`` and evaluated on ``test``.

    * semseg: every pixel gets the most frequent training class (ties: the lowest class),
    * depth: every pixel gets the mean training depth,
    * edge: no pixel is an edge (F1 0.0 whenever the test set has edges).

    Pixels without ground truth (semseg :data:`IGNORE_INDEX`, depth 0) are left out of
    both the fit and the score.

    Parameters
    ----------
    train, test : mapping of str to torch.Tensor
        Scene dicts as returned by :func:`m3vit.sw.model.data.make_scenes`; only the keys
        ``"semseg"``, ``"depth"`` and ``"edge"`` present in both are scored.
    n_classes : int
        Number of semantic classes.

    Returns
    -------
    dict of str to float
        ``"semseg/miou"``, ``"semseg/pixel_acc"``, ``"depth/rmse"``, ``"edge/f1"`` (the
        keys of :func:`evaluate_predictions` for tasks named after their kinds).
    """
    out: dict[str, float] = {}
    ignore = _ignore_index(n_classes)
    if "semseg" in train and "semseg" in test:
        labels = train["semseg"].reshape(-1)
        if ignore is not None:
            labels = labels[labels != ignore]
        _check_labels("training semseg", labels, n_classes)
        majority = int(torch.bincount(labels, minlength=n_classes).argmax())
        pred = torch.full_like(test["semseg"], majority)
        out["semseg/miou"] = miou(pred, test["semseg"], n_classes, ignore)
        out["semseg/pixel_acc"] = pixel_accuracy(pred, test["semseg"], ignore)
    if "depth" in train and "depth" in test:
        depth = train["depth"]
        if not bool((depth > 0).all()):
            depth = depth[depth > 0]
        if depth.numel() == 0:
            raise M3VitError("no valid (> 0) training depth to take the mean of")
        mean_depth = float(depth.double().mean())
        pred = torch.full_like(test["depth"], mean_depth)
        out["depth/rmse"] = depth_rmse(pred, test["depth"])
    if "edge" in train and "edge" in test:
        out["edge/f1"] = edge_f1(torch.full_like(test["edge"], -1.0), test["edge"])
    return out


def evaluate_predictions(
    preds: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    tasks: Iterable[TaskSpec],
) -> dict[str, float]:
    """Score model outputs against targets, task by task.

    Parameters
    ----------
    preds : mapping of str to torch.Tensor
        Model outputs keyed by task name: logits (N, C, H, W) for a ``semseg`` task,
        depth (N, 1, H, W) for ``depth``, edge logits (N, 1, H, W) for ``edge``.
    targets : mapping of str to torch.Tensor
        Targets keyed by task name, as :func:`m3vit.sw.model.data.make_scenes` returns them:
        labels (N, H, W), depth (N, 1, H, W), 0/1 edges (N, 1, H, W).
    tasks : iterable of TaskSpec
        The tasks to score.

    Returns
    -------
    dict of str to float
        ``"<name>/miou"`` and ``"<name>/pixel_acc"`` per semseg task, ``"<name>/rmse"`` per
        depth task, ``"<name>/f1"`` per edge task. Semseg pixels labelled
        :data:`IGNORE_INDEX` and depth pixels with target 0 are not scored.

    Raises
    ------
    M3VitError
        If a task's prediction or target is missing or has the wrong shape.
    """
    out: dict[str, float] = {}
    for task in tasks:
        for role, source in (("prediction", preds), ("target", targets)):
            if task.name not in source:
                raise M3VitError(
                    f"no {role} for task {task.name!r} (have: {', '.join(source) or 'none'})"
                )
        pred, target = preds[task.name], targets[task.name]
        if task.kind == "semseg":
            if pred.dim() != 4 or pred.shape[1] != task.n_out:
                raise M3VitError(
                    f"semseg task {task.name!r} expects logits (N, {task.n_out}, H, W), "
                    f"got {tuple(pred.shape)}"
                )
            labels = pred.argmax(dim=1)
            ignore = _ignore_index(task.n_out)
            out[f"{task.name}/miou"] = miou(labels, target, task.n_out, ignore)
            out[f"{task.name}/pixel_acc"] = pixel_accuracy(labels, target, ignore)
        elif task.kind == "depth":
            out[f"{task.name}/rmse"] = depth_rmse(pred, target)
        elif task.kind == "edge":
            out[f"{task.name}/f1"] = edge_f1(pred, target)
        else:  # TaskSpec validates kinds; a new kind must be scored here
            raise M3VitError(f"no metric for task kind {task.kind!r}")
    return out


def delta_m(metrics: Mapping[str, float], baselines: Mapping[str, float]) -> float:
    """Multi-task performance against single-task baselines, M³ViT's Δm, in per cent.

    ``Δm = (1/T) Σ_t (−1)^{l_t} (M_t − M_b,t) / M_b,t × 100``, over the T metrics in
    ``baselines``, with ``l_t = 1`` where lower is better (:data:`LOWER_IS_BETTER`, the
    depth RMSE) and 0 otherwise (mIoU): positive when the multi-task model beats its
    single-task baselines on average. M³ViT (``calculate_multi_task_performance`` in its
    ``evaluation/evaluate_utils.py``) takes one metric per task: semseg mIoU and depth RMSE.

    Parameters
    ----------
    metrics : mapping of str to float
        The multi-task model's metrics, as :func:`evaluate_predictions` names them.
    baselines : mapping of str to float
        Single-task metric per name, e.g. ``{"semseg/miou": 0.439, "depth/rmse": 0.585}``
        (mIoU as a fraction, like ``metrics``).

    Returns
    -------
    float
        Δm in per cent.

    Raises
    ------
    M3VitError
        For no baselines, a baseline the metrics lack, or a baseline that is not a finite
        number > 0.
    """
    if not baselines:
        raise M3VitError("no single-task baselines to compare with")
    total = 0.0
    for name, base in baselines.items():
        if name not in metrics:
            raise M3VitError(f"baseline {name!r} has no metric of that name (metrics: "
                             f"{', '.join(metrics) or 'none'})")
        if (isinstance(base, bool) or not isinstance(base, (int, float))
                or not math.isfinite(base) or base <= 0):
            raise M3VitError(f"baseline {name!r} must be a number > 0, got {base!r}")
        sign = -1.0 if name.rsplit("/", 1)[-1] in LOWER_IS_BETTER else 1.0
        total += sign * (metrics[name] - base) / base
    return 100.0 * total / len(baselines)
