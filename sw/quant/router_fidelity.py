"""Where the integer router stops picking the float router's experts, stage by stage.

The router is the one place where a small numeric error becomes a different computation
(``docs/numerics.md``): a token whose second and third expert are nearly tied in float
may go to the other expert in the integer model. Two measurements find out why.

:func:`router_fidelity` follows the integer router's own pipeline on the integer model's
activations and asks at each stage which top-k expert *set* that stage's values would
pick, against the float model routing its own activations (the reference):

``input``
    the float router (float weights) on the integer model's LN2 output, dequantized:
    what the drift of the integer activations up to the router costs;
``weights``
    the router GEMM's INT32 accumulators, rescaled exactly per channel
    (``acc · mult / 2^shift``, not rounded): adds the INT8 router weights;
``logits``
    the INT16 logits the hardware stores and its top-k ranks (ties to the lower expert):
    adds their rounding and saturation; the integer model's routing.

Each stage's figure includes the losses of the stages above it. A disagreement is a
*near-tie* when the integer logits of the k-th and (k+1)-th expert are within one step of
the exp table (2^8 logit steps, the INT8 logit step of the design before INT16 logits):
their scores are then equal or one table step apart.

:func:`precision_what_if` asks what would restore the agreement: the float model run with
the integer model's rounding at every point it stores a tensor (``trace_float`` with a
``fake_quant``), the residual stream, the attention probabilities and the router logits
each at a chosen width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..model.m3vit import M3ViT
from . import golden
from . import numerics as nx
from .package import QuantizedModel
from .quantize import trace_float

__all__ = ["INTEGER_WIDTHS", "STAGES", "activation_error", "format_fidelity",
           "precision_what_if", "router_fidelity", "summary", "top_k_sets"]

STAGES = {
    "input": "float router on the integer LN2 output",
    "weights": "INT32 router accumulators (INT8 weights)",
    "logits": "INT16 router logits (the integer model)",
}
"""The stages of :func:`router_fidelity`, in pipeline order, with what each one ranks."""

INTEGER_WIDTHS = {"residual": 8, "probs_relative": nx.PROB_BITS, "router": 16, "other": 8}
"""The integer model's widths in :func:`precision_what_if`'s terms: the residual stream
(``x0``, ``x1``, ``x2``), the attention probabilities (bits relative to their row's
largest), the router logits, and every other activation, all INT8."""


def top_k_sets(values: torch.Tensor, k: int) -> torch.Tensor:
    """The sorted indices of the ``k`` largest ``values`` per row (last dimension).

    Integer values break ties to the lower index, as the hardware's top-k does; float
    values as ``torch.topk`` does (exact ties do not occur in float logits).
    """
    n = values.shape[-1]
    if values.dtype.is_floating_point:
        index = values.topk(k, dim=-1).indices
    else:
        key = values.to(torch.int64) * n + (n - 1 - torch.arange(n))
        index = key.topk(k, dim=-1).indices
    return index.sort(dim=-1).values


def _agree(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a == b).all(dim=-1)


@torch.no_grad()
def router_fidelity(model: M3ViT, pkg: QuantizedModel, images: torch.Tensor
                    ) -> dict[str, dict[int, dict[str, Any]]]:
    """Top-k set agreement of the integer router with the float one, stage by stage.

    Parameters
    ----------
    model : M3ViT
        The float model.
    pkg : QuantizedModel
        Its quantized package.
    images : torch.Tensor
        (N, C, H, W) float images, normalised as the model's input.

    Returns
    -------
    dict
        ``{task: {block: {"tokens", "agreement", "stages": {stage: share},
        "disagreements", "near_ties"}}}``: ``agreement`` is the ``logits`` stage (the
        integer model), ``near_ties`` how many of the ``disagreements`` are near-ties
        (module docstring).
    """
    cfg = model.cfg
    model.eval()
    t, scales, k = pkg.tensors, pkg.params["scales"], cfg.top_k
    image_q = golden.quantize_image(images, scales["input"])
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for task in cfg.task_names:
        ref = trace_float(model, images, task)
        _, cap = golden.forward(t, cfg, image_q, task, capture=True)
        out[task] = {}
        for i in cfg.moe_blocks:
            p = f"blocks.{i}"
            r = f"{p}.router.{task}"
            want = ref[f"{p}.experts"].reshape(-1, k).sort(dim=-1).values
            h2 = cap[f"{p}.ln2"].reshape(-1, cfg.embed_dim)
            float_in = h2.to(torch.float32) * scales[f"{p}.ln2"]
            acc = nx.gemm(h2, t[f"{r}.weight"], t.get(f"{r}.bias"))
            rescaled = (acc.double() * t[f"{r}.mult"].double()
                        * torch.pow(2.0, -t[f"{r}.shift"].double()))
            logits = nx.requantize16(acc, t[f"{r}.mult"], t[f"{r}.shift"])
            picks = {
                "input": top_k_sets(model.blocks[i].moe.router_logits(float_in, task), k),
                "weights": top_k_sets(rescaled, k),
                "logits": top_k_sets(logits, k),
            }
            # The stage chain ends where the model routes: it must be the golden model's.
            assert torch.equal(picks["logits"],
                               cap[f"{p}.experts"].reshape(-1, k).sort(dim=-1).values)
            missed = ~_agree(picks["logits"], want)
            if k < logits.shape[-1]:
                ranked = logits.sort(dim=-1, descending=True).values
                tie = (ranked[:, k - 1] - ranked[:, k]) < 1 << nx.ROUTER_LOGIT_SHIFT
            else:
                tie = torch.zeros_like(missed)
            stages = {name: float(_agree(pick, want).double().mean())
                      for name, pick in picks.items()}
            out[task][i] = {"tokens": len(want), "agreement": stages["logits"],
                            "stages": stages, "disagreements": int(missed.sum()),
                            "near_ties": int((missed & tie).sum())}
    return out


@torch.no_grad()
def activation_error(model: M3ViT, pkg: QuantizedModel, images: torch.Tensor, task: str,
                     blocks: tuple[int, ...] = (0, 1)) -> dict[str, float]:
    """Relative error of the integer model's stored tensors against the float model's.

    ``‖x_int · s − x_float‖ / ‖x_float‖`` at each point of the embedding and of
    ``blocks`` (the integer model on its own activations, as it runs): where the drift
    that reaches the router starts.
    """
    cfg = model.cfg
    model.eval()
    scales = pkg.params["scales"]
    ref = trace_float(model, images, task)
    _, cap = golden.forward(pkg.tensors, cfg, golden.quantize_image(images, scales["input"]),
                            task, capture=True)
    names = ["x0"] + [f"blocks.{i}.{point}" for i in blocks
                      for point in ("ln1", "q", "k", "v", "attn_out", "x1", "ln2", "mlp_out",
                                    "x2")]
    out = {}
    for name in names:
        want = ref[name].double()
        got = cap[name].double().reshape(want.shape) * scales[name]
        out[name] = float((got - want).norm() / want.norm())
    return out


def _fake_quant(scales: Mapping[str, float], widths: Mapping[str, int | None], task: str):
    """The ``fake_quant`` hook of :func:`precision_what_if` for one set of ``widths``."""
    def kind(name: str) -> str:
        leaf = name.rsplit(".", 1)[-1]
        if name == "x0" or leaf in ("x1", "x2"):
            return "residual"
        if leaf == "probs":
            return "probs"
        if name.endswith(f".router.{task}"):
            return "router"
        return "other"

    # Absolute probabilities where "probs" is given, else relative ones (the integer model).
    absolute = "probs" in widths
    relative = None if absolute else widths.get("probs_relative",
                                                INTEGER_WIDTHS["probs_relative"])

    def hook(name: str, value: torch.Tensor) -> torch.Tensor:
        what = kind(name)
        if what == "probs" and not absolute:
            if relative is None:
                return value
            # Steps of the row's largest probability (its 1/Σ applied after P·V instead).
            top, steps = value.amax(dim=-1, keepdim=True), 2.0 ** relative - 1
            return (value / top * steps).round() / steps * top
        bits = widths[what] if what == "probs" else widths.get(what, INTEGER_WIDTHS[what])
        if bits is None:
            return value
        if what == "probs":
            # Unsigned fractions: 0 … 2^bits − 1 steps of 2^-bits, as the softmax unit.
            steps = 2.0 ** bits
            return (value * steps).round().clamp(max=steps - 1) / steps
        # Signed, at the calibrated INT8 step made 2^(bits - 8) times finer.
        step = scales[name] * 2.0 ** (8 - bits)
        top = 2 ** (bits - 1) - 1
        return (value / step).round().clamp(-top - 1, top) * step

    return hook


@torch.no_grad()
def precision_what_if(model: M3ViT, scales: Mapping[str, float], images: torch.Tensor,
                      variants: Mapping[str, Mapping[str, int | None]]
                      ) -> dict[str, dict[str, dict[int, float]]]:
    """Router agreement of fake-quantized float models with the float model.

    Parameters
    ----------
    model : M3ViT
        The float model.
    scales : mapping
        The calibrated activation scales (``pkg.params["scales"]``).
    images : torch.Tensor
        (N, C, H, W) float images.
    variants : mapping
        Name → widths, a subset of :data:`INTEGER_WIDTHS`'s keys mapped to bits (``None``:
        float); keys left out keep the integer model's width. ``{}`` approximates the
        integer model itself. ``"probs_relative": b`` rounds each attention row to
        ``2^b − 1`` steps of its own largest probability (the integer model's 7 bits: the
        P·V output stage applies the row's 1/Σ); ``"probs": b`` rounds them to absolute
        steps of ``2^-b`` instead (the design before).

    Returns
    -------
    dict
        ``{variant: {task: {block: agreement}}}``.
    """
    cfg = model.cfg
    model.eval()
    out: dict[str, dict[str, dict[int, float]]] = {name: {} for name in variants}
    for task in cfg.task_names:
        ref = trace_float(model, images, task)
        for name, widths in variants.items():
            got = trace_float(model, images, task, _fake_quant(scales, widths, task))
            out[name][task] = {
                i: float(_agree(got[f"blocks.{i}.experts"].sort(dim=-1).values,
                                ref[f"blocks.{i}.experts"].sort(dim=-1).values
                                ).double().mean())
                for i in cfg.moe_blocks}
    return out


def summary(blocks: Mapping[int, Mapping[str, Any]]) -> dict[str, float]:
    """One task's :func:`router_fidelity` blocks together: ``tokens``, ``agreement`` (over
    every token routing), ``lowest`` (block), ``disagreements`` and ``near_ties``."""
    tokens = sum(b["tokens"] for b in blocks.values())
    return {"tokens": tokens,
            "agreement": sum(b["agreement"] * b["tokens"] for b in blocks.values())
            / max(1, tokens),
            "lowest": min(b["agreement"] for b in blocks.values()),
            "disagreements": sum(b["disagreements"] for b in blocks.values()),
            "near_ties": sum(b["near_ties"] for b in blocks.values())}


def format_fidelity(fidelity: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> str:
    """:func:`router_fidelity` as a plain-text table per task, blocks as columns."""
    lines = []
    for task, blocks in fidelity.items():
        cols = list(blocks)
        t = summary(blocks)
        missed, ties = t["disagreements"], t["near_ties"]
        lines.append(f"router top-k agreement {task}: {t['agreement']:.1%} of "
                     f"{t['tokens']:,} token routings; {ties:,} of the {missed:,} "
                     f"disagreements ({ties / max(1, missed):.0%}) are near-ties")
        lines.append(f"  {'stage':<42}" + "".join(f"{'block ' + str(i):>10}" for i in cols))
        for stage, text in STAGES.items():
            lines.append(f"  {text:<42}"
                         + "".join(f"{blocks[i]['stages'][stage]:>10.1%}" for i in cols))
        ties = [blocks[i]["near_ties"] / max(1, blocks[i]["disagreements"]) for i in cols]
        lines.append(f"  {'near-ties among the disagreements':<42}"
                     + "".join(f"{share:>10.0%}" for share in ties))
    return "\n".join(lines)
