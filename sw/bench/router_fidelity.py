"""Router fidelity (issue #20): where the integer router's top-k departs from the float one,
and which widths would bring it back.

Three models, each trained here from a fixed seed and quantized with the default
calibration (``max`` on synthetic scenes):

* ``edge-moe`` trained as ``docs/numerics.md`` records (200 steps of 8 images, 800
  training scenes; calibration on 64 scenes);
* ``tiny`` with top-1 routing, and ``tiny`` with 64 experts (600 steps each), where
  near-ties are more frequent.

For each: the float and integer task metrics on held-out scenes, the router's stage table
(:func:`m3vit.sw.quant.router_fidelity.router_fidelity`) on held-out scenes, and the
agreement of fake-quantized float models with wider residual stream, attention
probabilities and router logits (:func:`~m3vit.sw.quant.router_fidelity.precision_what_if`).

Run as ``python -m m3vit.sw.bench router``; ``--quick`` (tests) trains for a few steps.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ..model.config import get_preset
from ..model.data import TEST_SEED
from ..model.train import TrainConfig, scenes_for, train
from ..quant.accuracy import accuracy_report
from ..quant.quantize import quantize
from ..quant.router_fidelity import STAGES, activation_error, precision_what_if, summary

__all__ = ["MODELS", "VARIANTS", "bench_router", "markdown"]

MODELS: dict[str, dict[str, Any]] = {
    "edge-moe": dict(preset="edge-moe", overrides={},
                     train=TrainConfig(steps=200, batch_size=8, n_train=800, n_test=100),
                     calib=64, n_test=100, n_router=64),
    "tiny, top-1": dict(preset="tiny", overrides={"top_k": 1},
                        train=TrainConfig(steps=600, n_test=200), calib=256, n_test=200,
                        n_router=64),
    "tiny, 64 experts": dict(preset="tiny", overrides={"n_experts": 64},
                             train=TrainConfig(steps=600, n_test=200), calib=256, n_test=200,
                             n_router=64),
}
"""The models measured: preset, overrides, training, calibration scenes, held-out scenes
for the metrics and for the router."""

VARIANTS: dict[str, dict[str, int | None]] = {
    "the integer model's widths (fake-quantized)": {},
    "absolute probabilities at 2^-7 (the design before)": {"probs": 7},
    "residual stream 12-bit": {"residual": 12},
    "residual stream 16-bit": {"residual": 16},
    "those three in float": {"residual": None, "probs_relative": None, "router": None},
}
"""Width settings of the what-if table (keys of
:data:`~m3vit.sw.quant.router_fidelity.INTEGER_WIDTHS`; left out: the integer model's)."""


def measure(name: str, spec: dict[str, Any], quick: bool = False) -> dict[str, Any]:
    """Train, quantize and measure one of :data:`MODELS`."""
    torch.manual_seed(0)
    cfg = get_preset(spec["preset"], **spec["overrides"])
    tc = spec["train"]
    if quick:
        tc = TrainConfig(steps=4, batch_size=4, n_train=16, n_test=8)
    started = time.perf_counter()
    model, _ = train(cfg, tc, progress=False)
    trained = time.perf_counter() - started
    pkg = quantize(model, n_calib=4 if quick else spec["calib"])
    n_test, n_router = (8, 4) if quick else (spec["n_test"], spec["n_router"])
    report = accuracy_report(model, pkg, n_test=n_test, n_router=n_router)
    images = scenes_for(cfg, n_router, TEST_SEED)["image"]
    what_if = precision_what_if(model, pkg.params["scales"], images, VARIANTS)
    drift = activation_error(model, pkg, images, cfg.task_names[0])
    top = quantize(model, n_calib=4 if quick else spec["calib"], router_range="top")
    top_report = accuracy_report(model, top, n_test=n_test, n_router=n_router)
    return {"name": name, "config": cfg, "train": tc, "trained_s": trained,
            "report": report, "what_if": what_if, "n_router": n_router, "drift": drift,
            "top": top_report,
            "took_s": time.perf_counter() - started}


def bench_router(quick: bool = False) -> list[dict[str, Any]]:
    """:func:`measure` every model of :data:`MODELS`."""
    return [measure(name, spec, quick) for name, spec in MODELS.items()]


# Columns of the error table: x0 for the embedding, then a block's points in order.
_POINTS = ("x0", "ln1", "q", "k", "v", "attn_out", "x1", "ln2", "mlp_out", "x2")


def _mean_min(blocks: dict) -> tuple[float, float]:
    values = list(blocks.values())
    return sum(values) / len(values), min(values)


def markdown(results: list[dict[str, Any]]) -> str:
    """The bench section's tables."""
    lines = []
    for r in results:
        cfg, rep = r["config"], r["report"]
        tc = r["train"]
        lines += [f"### {r['name']}: E = {cfg.n_experts}, top-{cfg.top_k}, {cfg.depth} blocks",
                  "",
                  f"Trained {tc.steps} steps of {tc.batch_size} scenes ({tc.n_train} training "
                  f"scenes, seed {tc.seed}; {r['trained_s']:.0f} s), calibration "
                  f"'{rep['calibration'].get('statistic')}' on "
                  f"{rep['calibration'].get('images')} scenes; metrics on "
                  f"{rep['held_out_images']} held-out scenes, the router on the first "
                  f"{r['n_router']} of them.", "",
                  "| metric | float | integer | relative loss |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {m['float']:.4f} | {m['int']:.4f} | {m['relative_loss']:+.2%} |"
                  for k, m in rep["metrics"].items()]
        task0 = cfg.task_names[0]
        lines += ["", f"Relative error of the integer model's tensors ({task0}, "
                  "‖x_int·s − x_float‖ / ‖x_float‖, the integer model on its own "
                  "activations):", "",
                  "| block | " + " | ".join(_POINTS) + " |", "|---|" + "---:|" * len(_POINTS),
                  f"| embedding | {r['drift']['x0']:.1%} |" + " |" * (len(_POINTS) - 1)]
        blocks_seen = sorted({int(k.split(".")[1]) for k in r["drift"] if k != "x0"})
        lines += [f"| {i} | | " + " | ".join(f"{r['drift'][f'blocks.{i}.{point}']:.1%}"
                                            for point in _POINTS[1:]) + " |"
                  for i in blocks_seen]
        for task, blocks in rep["router"].items():
            cols = list(blocks)
            t = summary(blocks)
            missed, ties = t["disagreements"], t["near_ties"]
            lines += ["", f"**{task}**: top-{cfg.top_k} set agreement **{t['agreement']:.1%}** "
                      f"(lowest block {t['lowest']:.1%}); "
                      f"{ties:,} of the {missed:,} disagreements ({ties / max(1, missed):.0%}) "
                      "are near-ties (the integer logits of the k-th and (k+1)-th expert "
                      "within one step of the exp table, 2^8 logit steps).", "",
                      "| stage: the top-k set of … | " + " | ".join(f"block {i}" for i in cols)
                      + " |", "|---|" + "---:|" * len(cols)]
            lines += [f"| {text} | " + " | ".join(f"{blocks[i]['stages'][stage]:.1%}"
                                                  for i in cols) + " |"
                      for stage, text in STAGES.items()]
        tasks = list(rep["router"])
        lines += ["", "The router's logit step set for resolution (`m3vit quantize "
                  "--router-range top`) against the default (`max`): agreement with the "
                  "float model, mean over the tokens (lowest block), and the largest "
                  "relative loss of any task metric.", "",
                  "| router range | " + " | ".join(tasks) + " | largest metric loss |",
                  "|---|" + "---:|" * (len(tasks) + 1)]
        for label, report in (("max (default)", rep), ("top", r["top"])):
            cells = []
            for task in tasks:
                t = summary(report["router"][task])
                cells.append(f"{t['agreement']:.1%} ({t['lowest']:.1%})")
            loss = max(m["relative_loss"] for m in report["metrics"].values())
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {loss:+.2%} |")
        lines += ["", "What would restore it — fake-quantized float models (every stored "
                  "tensor rounded as the integer model does, the named ones wider): top-k "
                  "agreement with the float model, mean over the blocks (lowest block).", "",
                  "| widths | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for variant, per_task in r["what_if"].items():
            cells = []
            for task in tasks:
                mean, low = _mean_min(per_task[task])
                cells.append(f"{mean:.1%} ({low:.1%})")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m m3vit.sw.bench.router_fidelity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few training steps only")
    args = parser.parse_args(argv)
    print(markdown(bench_router(args.quick)))


if __name__ == "__main__":
    main()
