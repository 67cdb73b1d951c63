"""Training, evaluation and checkpoints of the float M³ViT on the synthetic scenes or on
data the caller gives (NYUD-v2: :mod:`m3vit.sw.model.nyud`).

Every task is trained jointly: each step runs the backbone once per task (each task routes
its tokens with its own gates), sums the task losses and the weighted load-balancing
losses, and takes one AdamW step. Held-out synthetic data comes from another seed than
training; for a real data set, its held-out split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import M3VitError, short_repr
from .config import ModelConfig, TaskSpec
from .data import TEST_SEED, TRAIN_SEED, make_scenes
from .m3vit import M3ViT
from .metrics import IGNORE_INDEX, baseline_metrics, evaluate_predictions

CHECKPOINT_FORMAT = "m3vit-checkpoint"
#: Version 2 adds ``hash`` (:func:`checkpoint_hash`): torch.load does not check its zip's
#: CRCs, so a flipped bit in a weight would otherwise load as a silently different model.
#: Version 1 files (no hash) are still read.
CHECKPOINT_VERSION = 2
_READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Parameters
    ----------
    steps : int
        Optimizer steps.
    batch_size : int
        Images per step.
    lr : float
        Peak AdamW learning rate (linear warm-up over 5 % of the steps, cosine decay).
    weight_decay : float
        AdamW weight decay.
    n_train, n_test : int
        Synthetic training and held-out images.
    seed : int
        Seed of the initialisation and the batch order.
    """

    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    n_train: int = 4000
    n_test: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_train", "n_test"):
            if getattr(self, name) < 1:
                raise M3VitError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise M3VitError(f"lr must be > 0, got {self.lr!r}")


def task_loss(task: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Training loss of one task: cross-entropy, L1 depth or boundary BCE.

    Pixels without ground truth add nothing: semseg labels :data:`IGNORE_INDEX` and depth
    targets of 0 (NYUD-v2's missing readings); a batch with none of its pixels labelled
    has loss 0 for that task.
    """
    if task.kind == "semseg":
        if task.n_out <= IGNORE_INDEX:
            labelled = target != IGNORE_INDEX
            if not bool(labelled.any()):
                return pred.sum() * 0.0
            return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)
        return F.cross_entropy(pred, target)
    if task.kind == "depth":
        valid = target > 0
        if bool(valid.all()):
            return F.l1_loss(pred, target)  # the synthetic scenes: every pixel has a depth
        if not bool(valid.any()):
            return pred.sum() * 0.0
        return F.l1_loss(pred[valid], target[valid])
    return F.binary_cross_entropy_with_logits(pred, target)


def scenes_for(cfg: ModelConfig, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic scenes at the model's image size with its class count."""
    n_classes = next((t.n_out for t in cfg.tasks if t.kind == "semseg"), 2)
    return make_scenes(n, cfg.img_size, n_classes=n_classes, seed=seed)


@torch.no_grad()
def predict(
    model: M3ViT, images: torch.Tensor, tasks: tuple[str, ...] | None = None, batch: int = 64
) -> dict[str, torch.Tensor]:
    """Single-task predictions of ``model`` for each of ``tasks`` (default: all)."""
    was_training = model.training
    model.eval()
    try:
        names = tasks or model.cfg.task_names
        starts = range(0, len(images), batch)
        return {t: torch.cat([model(images[i : i + batch], task=t) for i in starts]) for t in names}
    finally:
        model.train(was_training)


def evaluate(
    model: M3ViT, data: dict[str, torch.Tensor], task: str | None = None
) -> dict[str, float]:
    """Held-out metrics of ``model`` on ``data`` for ``task`` (default: every task).

    See :func:`m3vit.sw.model.metrics.evaluate_predictions` for the metric names.
    """
    tasks = [model.cfg.task(task)] if task else list(model.cfg.tasks)
    preds = predict(model, data["image"], tuple(t.name for t in tasks))
    return evaluate_predictions(preds, {t.name: data[t.kind] for t in tasks}, tasks)


def _lr_at(step: int, tc: TrainConfig) -> float:
    warmup = max(1, tc.steps // 20)
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, tc.steps - warmup)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    cfg: ModelConfig,
    tc: TrainConfig,
    *,
    model: M3ViT | None = None,
    progress: bool = True,
    data: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> tuple[M3ViT, dict[str, Any]]:
    """Train ``cfg`` (or continue ``model``) and evaluate it on held-out data.

    Parameters
    ----------
    cfg : ModelConfig
        The model to train.
    tc : TrainConfig
        Hyper-parameters; ``n_train`` and ``n_test`` size the synthetic splits.
    model : M3ViT, optional
        A model to continue from (e.g. :func:`~m3vit.sw.model.timm_import.from_timm`).
    progress : bool
        Show a progress bar.
    data : (dict, dict), optional
        Training and held-out data in the layout of
        :func:`m3vit.sw.model.data.make_scenes` (e.g. the NYUD-v2 train and val splits of
        :func:`m3vit.sw.model.nyud.load_nyud`) instead of synthetic scenes; ``n_train``
        and ``n_test`` are then ignored.

    Returns
    -------
    model : M3ViT
        The trained model, in eval mode.
    report : dict
        ``metrics`` and ``baseline`` on the held-out data, ``final_loss`` and the
        training configuration.
    """
    if data is None:
        train_data = scenes_for(cfg, tc.n_train, TRAIN_SEED)
        test_data = scenes_for(cfg, tc.n_test, TEST_SEED)
    else:
        train_data, test_data = data
    n_train = len(train_data["image"])
    model = model if model is not None else M3ViT(cfg, seed=tc.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=tc.lr,
    )
    gen = torch.Generator().manual_seed(tc.seed)
    order = torch.randperm(n_train, generator=gen)
    batch_size = min(tc.batch_size, n_train)  # a small real split: every image each step
    cursor = 0
    bar = tqdm(range(tc.steps), desc=f"train {cfg.name}", disable=not progress, unit="step")
    loss_ema = None
    for step in bar:
        if cursor + batch_size > n_train:
            order, cursor = torch.randperm(n_train, generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        x = train_data["image"][idx]
        loss = x.new_zeros(())
        for task in cfg.tasks:
            pred, aux = model.forward_task(x, task.name)
            loss = loss + task_loss(task, pred, train_data[task.kind][idx]) + aux
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, tc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}")
    model.eval()
    n_classes = next((t.n_out for t in cfg.tasks if t.kind == "semseg"), 2)
    report = {
        "metrics": evaluate(model, test_data),
        "baseline": baseline_metrics(train_data, test_data, n_classes),
        "final_loss": loss_ema,
        "train": dataclasses.asdict(tc),
    }
    return model, report


# ---- checkpoints -----------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike, model: M3ViT, report: dict[str, Any], *, overwrite: bool = False
) -> Path:
    """Write ``model`` and its report to ``path`` atomically.

    Raises
    ------
    M3VitError
        If ``path`` exists and ``overwrite`` is false: a user's file is never replaced
        without being asked.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise M3VitError(f"{path} exists: pass --force to overwrite it or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    config = model.cfg.to_dict()
    blob = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config,
        "state_dict": state,
        "report": json.loads(json.dumps(report)),
        "hash": checkpoint_hash(config, state),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(
    path: str | os.PathLike, preset: str | None = None
) -> tuple[M3ViT, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : path-like
        The checkpoint file.
    preset : str, optional
        If given, the checkpoint must have been trained for this preset.

    Raises
    ------
    M3VitError
        Missing or unreadable file, another format or version, a checkpoint of another
        preset, or weights that do not match the stored configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise M3VitError(f"checkpoint {path} not found: train one with `m3vit train`")
    try:
            # A damaged pickle makes torch warn about its protocol before failing: the one
        # line below says all there is to say.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        kind = type(e).__name__
        raise M3VitError(f"{path} is not a readable m3vit checkpoint ({kind})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise M3VitError(f"{path} is not an m3vit checkpoint")
    version = blob.get("version")
    if type(version) is not int or version not in _READABLE_VERSIONS:
        raise M3VitError(
            f"{path} has checkpoint version {short_repr(version)}; this toolkit reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}"
        )
    state, cfg_dict = blob.get("state_dict"), blob.get("config")
    if (not isinstance(cfg_dict, dict) or not isinstance(state, dict)
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                       for k, v in state.items())):
        raise M3VitError(f"{path}: damaged checkpoint (no config or weights): train again")
    if version >= 2:
        try:
            expected = checkpoint_hash(cfg_dict, state)
        except (TypeError, ValueError) as e:
            raise M3VitError(f"{path}: damaged checkpoint ({e}): train again") from None
        if blob.get("hash") != expected:
            raise M3VitError(f"{path}: checksum mismatch (a damaged or edited checkpoint): "
                             "train again or restore it")
    try:
        cfg = ModelConfig.from_dict(cfg_dict)
    except M3VitError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise M3VitError(f"{path}: invalid model config ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if preset is not None and cfg.name != preset:
        raise M3VitError(
            f"{path} was trained for preset {cfg.name!r}, not {preset!r}: "
            f"pass --preset {cfg.name} or another checkpoint"
        )
    model = M3ViT(cfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise M3VitError(f"{path}: weights do not match its configuration ({first})") from None
    report = blob.get("report", {})
    return model.eval(), report if isinstance(report, dict) else {}


def checkpoint_hash(config: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a checkpoint's config (canonical JSON) and weights (each name, dtype,
    shape and bytes, in name order), as lowercase hex.

    Raises
    ------
    TypeError, ValueError
        A config that is not JSON or a state entry that is not a tensor.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, allow_nan=False).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
