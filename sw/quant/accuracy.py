"""Float versus integer accuracy of a quantized model on held-out scenes."""

from __future__ import annotations

from typing import Any

import torch

from ..model.data import TEST_SEED
from ..model.m3vit import M3ViT
from ..model.metrics import LOWER_IS_BETTER, evaluate_predictions
from ..model.train import evaluate, scenes_for
from . import golden
from .package import QuantizedModel
from .router_fidelity import format_fidelity, router_fidelity


def golden_predict(pkg: QuantizedModel, images: torch.Tensor, task: str,
                   batch: int = 32) -> torch.Tensor:
    """Float predictions (B, n_out, H, W) of the golden integer model, batch by batch."""
    return torch.cat([golden.predict(pkg.tensors, pkg.config, pkg.params,
                                     images[i : i + batch], task)
                      for i in range(0, len(images), batch)])


def relative_loss(name: str, float_value: float, int_value: float) -> float:
    """How much worse the integer model is, relative to the float one (> 0 = worse)."""
    if float_value == 0:
        return 0.0 if int_value == float_value else float("inf")
    worse = int_value - float_value if name.split("/")[-1] in LOWER_IS_BETTER \
        else float_value - int_value
    return worse / abs(float_value)


def router_agreement(model: M3ViT, pkg: QuantizedModel, images: torch.Tensor
                     ) -> dict[str, dict[int, float]]:
    """Share of tokens whose top-k expert *set* is the same in float and integer.

    Per task and MoE block; each model routes its own activations (the integer model's
    drift included), as they would run: the ``scores`` stage of
    :func:`~m3vit.sw.quant.router_fidelity.router_fidelity`.
    """
    return {task: {i: b["agreement"] for i, b in blocks.items()}
            for task, blocks in router_fidelity(model, pkg, images).items()}


def accuracy_report(model: M3ViT, pkg: QuantizedModel, n_test: int = 300,
                    n_router: int = 64, test: dict[str, torch.Tensor] | None = None,
                    source: str = "scenes") -> dict[str, Any]:
    """Held-out metrics of the float and the integer model, their relative loss per
    metric, and the router agreement (on the first ``n_router`` held-out images).

    The held-out data is ``n_test`` synthetic scenes, or ``test`` when given (a dict in
    the layout of :func:`m3vit.sw.model.data.make_scenes`, e.g. NYUD-v2's val split),
    which ``source`` names in the report.
    """
    cfg = model.cfg
    if test is None:
        test = scenes_for(cfg, n_test, TEST_SEED)
    float_metrics = evaluate(model, test)
    preds = {t: golden_predict(pkg, test["image"], t) for t in cfg.task_names}
    int_metrics = evaluate_predictions(preds, {t.name: test[t.kind] for t in cfg.tasks},
                                       cfg.tasks)
    report: dict[str, Any] = {
        "preset": cfg.name,
        "held_out_images": len(test["image"]),
        "held_out": source,
        "calibration": pkg.params.get("calibration", {}),
        "metrics": {k: {"float": float_metrics[k], "int": int_metrics[k],
                        "relative_loss": relative_loss(k, float_metrics[k], int_metrics[k])}
                    for k in float_metrics},
    }
    if cfg.moe:
        fidelity = router_fidelity(model, pkg, test["image"][:n_router])
        report["router"] = fidelity
        report["router_agreement"] = {task: {i: b["agreement"] for i, b in blocks.items()}
                                      for task, blocks in fidelity.items()}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The accuracy report as a plain-text table."""
    cal = report.get("calibration", {})
    lines = [f"preset {report['preset']}: {report['held_out_images']} held-out "
             f"{report.get('held_out', 'scenes')}, calibration '{cal.get('statistic')}' on "
             f"{cal.get('images')} {cal.get('data', 'scenes')}"
             + (f", router range '{cal['router_range']}'" if "router_range" in cal else ""),
             f"{'metric':<18} {'float':>9} {'integer':>9} {'rel. loss':>10}"]
    for k, m in report["metrics"].items():
        lines.append(f"{k:<18} {m['float']:>9.4f} {m['int']:>9.4f} "
                     f"{m['relative_loss']:>+10.2%}")
    if "router" in report:
        lines.append(format_fidelity(report["router"]))
    return "\n".join(lines)
