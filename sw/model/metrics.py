"""Dense-prediction metrics for the three task kinds, and the trivial baselines to beat.

All metrics are pooled over every pixel of every image (one confusion matrix or one sum of
squares for the whole set), not averaged per image, so they do not depend on how the set is
batched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..errors import M3VitError
from .config import TaskSpec


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


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Pixel confusion matrix.

    Parameters
    ----------
    pred, target : torch.Tensor
        Integer class labels of the same shape (any number of dimensions).
    n_classes : int
        Number of classes; labels must lie in ``[0, n_classes)``.

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


def miou(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> float:
    """Mean intersection over union.

    The mean runs over the classes present in the target *or* the prediction (non-empty
    union); classes absent from both are skipped rather than counted as 0 or 1. A class
    that is predicted but never true therefore counts with IoU 0.

    Parameters
    ----------
    pred, target : torch.Tensor
        Integer class labels of the same shape.
    n_classes : int
        Number of classes.

    Returns
    -------
    float
        mIoU in [0, 1]; 0.0 for empty inputs.
    """
    iou = iou_from_confusion(confusion_matrix(pred, target, n_classes))
    present = ~iou.isnan()
    return float(iou[present].mean()) if bool(present.any()) else 0.0


def pixel_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of pixels whose predicted label equals the target label.

    Parameters
    ----------
    pred, target : torch.Tensor
        Integer class labels of the same shape.

    Returns
    -------
    float
        Accuracy in [0, 1]; 0.0 for empty inputs.
    """
    _check_same_shape("pixel_accuracy", pred, target)
    if target.numel() == 0:
        return 0.0
    return float((pred == target).double().mean())


def depth_rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Root-mean-square depth error over all pixels, in the units of the target.

    Parameters
    ----------
    pred, target : torch.Tensor
        Depths of the same shape, e.g. (N, 1, H, W) in metres.

    Returns
    -------
    float
        ``sqrt(mean((pred - target) ** 2))``.
    """
    _check_same_shape("depth_rmse", pred, target)
    if target.numel() == 0:
        raise M3VitError("depth_rmse of an empty set is undefined")
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
    if "semseg" in train and "semseg" in test:
        _check_labels("training semseg", train["semseg"], n_classes)
        majority = int(torch.bincount(train["semseg"].reshape(-1), minlength=n_classes).argmax())
        pred = torch.full_like(test["semseg"], majority)
        out["semseg/miou"] = miou(pred, test["semseg"], n_classes)
        out["semseg/pixel_acc"] = pixel_accuracy(pred, test["semseg"])
    if "depth" in train and "depth" in test:
        mean_depth = float(train["depth"].double().mean())
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
        depth task, ``"<name>/f1"`` per edge task.

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
            out[f"{task.name}/miou"] = miou(labels, target, task.n_out)
            out[f"{task.name}/pixel_acc"] = pixel_accuracy(labels, target)
        elif task.kind == "depth":
            out[f"{task.name}/rmse"] = depth_rmse(pred, target)
        elif task.kind == "edge":
            out[f"{task.name}/f1"] = edge_f1(pred, target)
        else:  # TaskSpec validates kinds; a new kind must be scored here
            raise M3VitError(f"no metric for task kind {task.kind!r}")
    return out
