"""Post-training INT8 quantization of a float M³ViT into a quantized package.

1. **Calibrate**: run the float model on calibration scenes for every task, recording each
   activation that the integer model stores as INT8 (:func:`trace_float`), and take one
   statistic per tensor (:data:`STATISTICS`).
2. **Quantize** weights per output channel (symmetric INT8), biases to INT32 at
   ``s_x · s_w``, and derive every requantization multiplier/shift, LayerNorm gain/bias,
   residual-add multipliers and 256-entry table from the scales (:func:`quantize_model`).

The tensor names produced here are the ones :mod:`m3vit.sw.quant.golden` reads; ``docs/numerics.md``
gives the arithmetic.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import M3VitError
from ..model.config import ModelConfig
from ..model.data import make_scenes
from ..model.m3vit import M3ViT, route
from . import numerics as nx
from .package import QuantizedModel

CALIB_SEED = 2
"""Seed of the calibration scenes: neither the training (0) nor the held-out (1) seed."""
STATISTICS = ("max", "percentile")
ROUTER_RANGES = ("max", "top")
"""How the router's exp-table step ``s_r`` is set (the INT16 logits are at ``s_r / 2^8``;
``docs/numerics.md``, router fidelity).
``max``: as every tensor, from the largest |logit|. ``top``: from the range top-k needs —
the largest first logit to the smallest (k+1)-th logit of a calibration token, widened by
:data:`TOP_RANGE_MARGIN` of its span each side and centred by a constant bias (neither the
softmax nor the top-k changes under a constant), where that is finer than ``max`` (with 16
experts top-2 on ``edge-moe`` about twice finer; with 4 experts it can be coarser, and
``max`` is kept). It was made for INT8 logits, so that fewer near-ties rounded to one
value; with INT16 logits it no longer helps, while logits below the range saturate and
then weigh too much in the softmax sum."""
TOP_RANGE_MARGIN = 0.125
"""Share of the top-k range added on each side by ``router_range="top"``: room for tokens
beyond the calibration's (a top logit that saturates at 127 ties with the next)."""
"""``max``: the largest |x| seen (no clipping). ``percentile``: the 99.99th percentile of
|x| (clips rare outliers, finer steps for the rest)."""


# ---- float trace -----------------------------------------------------------------------


@torch.no_grad()
def trace_float(model: M3ViT, x: torch.Tensor, task: str,
                fake_quant: Callable[[str, torch.Tensor], torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
    """Run ``model``'s single-task forward, returning every quantization point by name.

    Mirrors :meth:`M3ViT.forward_task` op for op (a test checks the head output is
    identical), naming tensors as :func:`m3vit.sw.quant.golden.forward` captures them.

    ``fake_quant(name, value)``, when given, replaces each tensor the integer model stores
    (and the attention probabilities, ``blocks.i.probs``, which are not captured) by what
    it returns before the rest of the forward uses it: a float model with the integer
    model's rounding at chosen points and widths (:mod:`m3vit.sw.quant.router_fidelity`).
    """
    def fq(name: str, v: torch.Tensor) -> torch.Tensor:
        return v if fake_quant is None else fake_quant(name, v)

    cap: dict[str, torch.Tensor] = {"input": x}
    pe = model.patch_embed(x)
    cap["patch"] = torch.cat([pe.flatten(), model.cls_token.flatten()])
    cap["pos"] = model.pos_embed
    t = fq("x0", torch.cat([model.cls_token.expand(x.shape[0], -1, -1), pe], dim=1)
           + model.pos_embed)
    cap["x0"] = t
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        h = fq(f"{p}.ln1", block.norm1(t))
        attn = block.attn
        b, n, d = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, d // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = fq(f"{p}.q", q), fq(f"{p}.k", k), fq(f"{p}.v", v)
        logits = fq(f"{p}.logits", (q * attn.scale) @ k.transpose(-2, -1))
        probs = fq(f"{p}.probs", logits.softmax(dim=-1))
        o = fq(f"{p}.attn_out", (probs @ v).transpose(1, 2).reshape(b, n, d))
        proj = fq(f"{p}.proj", attn.proj(o))
        t1 = fq(f"{p}.x1", t + proj)
        h2 = fq(f"{p}.ln2", block.norm2(t1))
        cap.update({f"{p}.ln1": h, f"{p}.q": q, f"{p}.k": k, f"{p}.v": v,
                    f"{p}.logits": logits, f"{p}.attn_out": o, f"{p}.proj": proj,
                    f"{p}.x1": t1, f"{p}.ln2": h2})
        if block.is_moe:
            layer = block.moe
            flat = h2.reshape(-1, d)
            router_logits = fq(f"{p}.router.{task}", layer.router_logits(flat, task))
            r = route(router_logits, layer.top_k)
            out = torch.zeros_like(flat)
            fc1, gelu, fc2 = [], [], []
            for e, expert in enumerate(layer.experts):
                token, slot = (r.experts == e).nonzero(as_tuple=True)
                if token.numel() == 0:
                    continue
                a = fq(f"{p}.experts.fc1", expert.fc1(flat[token]))
                g = fq(f"{p}.experts.gelu", expert.act(a))
                y = fq(f"{p}.experts.fc2", expert.fc2(g))
                fc1.append(a)
                gelu.append(g)
                fc2.append(y)
                out = out.index_add(0, token, y * r.scores[token, slot, None])
            y = fq(f"{p}.mlp_out", out.reshape(h2.shape))
            cap.update({f"{p}.router.{task}": router_logits, f"{p}.experts": r.experts,
                        f"{p}.experts.fc1": torch.cat(fc1), f"{p}.experts.gelu": torch.cat(gelu),
                        f"{p}.experts.fc2": torch.cat(fc2)})
        else:
            a = fq(f"{p}.fc1", block.mlp.fc1(h2))
            g = fq(f"{p}.gelu", block.mlp.act(a))
            y = fq(f"{p}.mlp_out", block.mlp.fc2(g))
            cap.update({f"{p}.fc1": a, f"{p}.gelu": g})
        t = fq(f"{p}.x2", t1 + y)
        cap.update({f"{p}.mlp_out": y, f"{p}.x2": t})
    normed = fq("norm", model.norm(t))
    cap["norm"] = normed
    cap[f"heads.{task}"] = model.heads[task].proj(normed[:, 1:])
    return cap


def _statistic(x: torch.Tensor, statistic: str) -> float:
    a = x.detach().abs().flatten().double()
    if statistic == "max" or a.numel() < 2:
        return float(a.max()) if a.numel() else 0.0
    k = max(1, math.ceil(a.numel() * 0.9999))
    return float(a.kthvalue(k).values)


@torch.no_grad()
def calibrate(
    model: M3ViT, images: torch.Tensor, statistic: str = "max", batch: int = 64,
    router_range: str = "max",
) -> dict[str, float]:
    """Per-tensor activation scales (``statistic / 127``) over ``images`` and every task.

    With ``router_range="top"`` (:data:`ROUTER_RANGES`) each router's scale comes from the
    range its top-k needs instead, and ``scales["<router>.centre"]`` holds the logit value
    the quantizer moves to 0 with a constant bias.
    """
    if statistic not in STATISTICS:
        raise M3VitError(f"calibration statistic must be one of {STATISTICS}, got {statistic!r}")
    if router_range not in ROUTER_RANGES:
        raise M3VitError(f"router range must be one of {ROUTER_RANGES}, got {router_range!r}")
    cfg = model.cfg
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    # Per router: the largest first and the smallest (k+1)-th logit of any token.
    tops: dict[str, list[float]] = {}
    model.eval()
    for task in cfg.task_names:
        for i in range(0, len(images), batch):
            for name, value in trace_float(model, images[i : i + batch], task).items():
                if name.endswith(".experts") or name.startswith("heads."):
                    continue
                seen[name].append(value.flatten())
                if router_range == "top" and name.endswith(f".router.{task}"):
                    ranked = value.reshape(-1, cfg.n_experts).sort(dim=-1,
                                                                   descending=True).values
                    hi = float(ranked[:, 0].max())
                    lo = float(ranked[:, min(cfg.top_k, cfg.n_experts - 1)].min())
                    old = tops.get(name, [hi, lo])
                    tops[name] = [max(old[0], hi), min(old[1], lo)]
    scales = {}
    for name, values in seen.items():
        peak = _statistic(torch.cat(values), statistic)
        scales[name] = peak / 127 if peak > 0 else 1.0
    for name, (hi, lo) in tops.items():
        span = (hi - lo) * (1 + 2 * TOP_RANGE_MARGIN)
        # 254 steps, so the rounded ends stay within ±127; kept only when finer than the
        # max statistic's (with few experts the (k+1)-th logit spans nearly everything).
        if 0 < span / 254 < scales[name]:
            scales[name] = span / 254
            scales[f"{name}.centre"] = (hi + lo) / 2
    return scales


# ---- parameter derivation --------------------------------------------------------------


def requant_params(ratio: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned 16-bit multiplier and shift with ``mult / 2^shift ≈ ratio`` (> 0).

    The multiplier is normalised into [2^15, 2^16) — 16 significant bits — unless the shift
    would exceed :data:`numerics.MAX_SHIFT`, where it is left smaller.
    """
    r = torch.as_tensor(ratio, dtype=torch.float64)
    if (r <= 0).any() or not torch.isfinite(r).all():
        raise M3VitError("requantization ratio must be positive and finite (scale of 0?)")
    shift = (nx.MULT_BITS - 1 - torch.floor(torch.log2(r))).to(torch.int64)
    if (shift < 0).any():
        raise M3VitError(f"requantization ratio {float(r.max()):.3g} is too large for a "
                         "16-bit multiplier: the calibration scales are inconsistent")
    shift = shift.clamp(max=nx.MAX_SHIFT)
    mult = torch.round(r * torch.pow(2.0, shift.double())).to(torch.int64)
    over = mult >= 1 << nx.MULT_BITS                 # rounding carried into bit 16
    mult = torch.where(over, (mult + 1) >> 1, mult)
    shift = torch.where(over, shift - 1, shift)
    return mult, shift


def residual_params(ratio_a: float, ratio_b: float) -> torch.Tensor:
    """``[mult_a, mult_b, shift]`` for :func:`numerics.residual_add` (one shared shift)."""
    _, shift = requant_params(max(ratio_a, ratio_b))
    s = int(shift)
    mults = [round(r * 2.0**s) for r in (ratio_a, ratio_b)]
    if max(mults) >= 1 << nx.MULT_BITS:
        s -= 1
        mults = [round(r * 2.0**s) for r in (ratio_a, ratio_b)]
    return torch.tensor([*mults, s], dtype=torch.int64)


def _pv_params(s_v: float, s_out: float) -> torch.Tensor:
    """``[mult, shift]`` of P·V's requantization, applied per row with the softmax's rcp.

    The probabilities are ``127 · e / 2^15`` of their row's largest and ``rcp = 2^31 / Σe``,
    so ``e_j / Σe = p_j · rcp / (127 · 2^16)`` and the ratio is ``s_v / (127 · 2^16 ·
    s_out)`` (:func:`numerics.row_scale`). The row multiplier drops up to 16 low bits of
    ``rcp · mult``, which the shift must cover: ``shift`` ≥ 17.
    """
    mult, shift = requant_params(s_v / (127 * 2.0 ** 16 * s_out))
    if int(shift) <= nx.ROW_MULT_BITS:
        raise M3VitError(f"attention output scale {s_out:.3g} is too fine for values of scale "
                         f"{s_v:.3g}: the calibration scales are inconsistent")
    return torch.stack((mult, shift))


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: returns (int8 weights, float64 scales per row)."""
    w = w.detach().double().reshape(w.shape[0], -1)
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_activation(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A float constant (cls token, position embedding) as INT8 at ``scale``."""
    return torch.round(x.detach().double() / scale).clamp(-128, 127).to(torch.int8)


def quantize_bias(b: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """INT32 bias at ``scale`` (= s_x · s_w per channel); zeros when there is none."""
    if b is None:
        return torch.zeros(scale.shape, dtype=torch.int32)
    q = torch.round(b.detach().double() / scale)
    if q.abs().max() >= 2**31:
        raise M3VitError("a bias does not fit INT32 at its scale: calibration scales too small")
    return q.to(torch.int32)


def _linear_params(
    out: dict[str, torch.Tensor], name: str, weight: torch.Tensor, bias: torch.Tensor | None,
    s_in: float, s_out: torch.Tensor | float,
) -> torch.Tensor:
    wq, ws = quantize_weight(weight)
    mult, shift = requant_params(s_in * ws / torch.as_tensor(s_out, dtype=torch.float64))
    out.update({f"{name}.weight": wq, f"{name}.bias": quantize_bias(bias, s_in * ws),
                f"{name}.mult": mult.to(torch.int32), f"{name}.shift": shift.to(torch.int8)})
    return ws


def _layernorm_params(
    out: dict[str, torch.Tensor], name: str, ln: torch.nn.LayerNorm, s_in: float, s_out: float
) -> None:
    dim = ln.normalized_shape[0]
    gamma = ln.weight.detach().double()
    beta = ln.bias.detach().double()
    peak = float(gamma.abs().max()) * math.sqrt(dim) / s_out
    # The largest shift with |g| < 2^15 (a 16-bit signed gain).
    shift = nx.LN_RCP_BITS + math.floor(math.log2((2**15 - 1) / peak)) if peak > 0 else 40
    shift = max(nx.LN_RCP_BITS - 16, min(shift, nx.MAX_SHIFT - 2))
    gain = torch.round(gamma * math.sqrt(dim) / s_out * 2.0 ** (shift - nx.LN_RCP_BITS))
    bias = torch.round(beta / s_out * 2.0**shift)
    eps_term = max(1, round(ln.eps * dim**3 / s_in**2))
    out.update({f"{name}.gain": gain.to(torch.int32), f"{name}.bias": bias.to(torch.int64),
                f"{name}.cfg": torch.tensor([shift, eps_term], dtype=torch.int64)})


def gelu_table(s_in: float, s_out: float) -> torch.Tensor:
    """INT8 GELU table: entry ``q & 0xFF`` holds ``sat8(round_half_up(gelu(q·s_in) / s_out))``."""
    q = torch.arange(-128, 128, dtype=torch.float64)
    y = torch.floor(F.gelu(q * s_in) / s_out + 0.5).clamp(-128, 127).to(torch.int8)
    table = torch.empty(256, dtype=torch.int8)
    table[q.to(torch.int64) & 0xFF] = y
    return table


@torch.no_grad()
def quantize_model(
    model: M3ViT, scales: dict[str, float], settings: dict[str, Any]
) -> QuantizedModel:
    """Integer tensors and parameters of ``model`` at the calibrated ``scales``."""
    cfg = model.cfg
    s = scales
    t: dict[str, torch.Tensor] = {}
    # Patch embedding; the cls token joins its output at the same scale.
    _linear_params(t, "patch", model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                   s["input"], s["patch"])
    t["cls"] = quantize_activation(model.cls_token.flatten(), s["patch"])
    t["pos"] = quantize_activation(model.pos_embed[0], s["pos"])
    t["embed"] = residual_params(s["patch"] / s["x0"], s["pos"] / s["x0"])
    s_x = s["x0"]
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        _layernorm_params(t, f"{p}.ln1", block.norm1, s_x, s[f"{p}.ln1"])
        d = cfg.embed_dim
        qkv_out = torch.tensor([s[f"{p}.q"]] * d + [s[f"{p}.k"]] * d + [s[f"{p}.v"]] * d,
                               dtype=torch.float64)
        _linear_params(t, f"{p}.qkv", block.attn.qkv.weight, block.attn.qkv.bias,
                       s[f"{p}.ln1"], qkv_out)
        logit_ratio = s[f"{p}.q"] * s[f"{p}.k"] * block.attn.scale / s[f"{p}.logits"]
        t[f"{p}.attn.logit"] = torch.stack(requant_params(logit_ratio))
        t[f"{p}.attn.exp"] = nx.exp_table(s[f"{p}.logits"]).to(torch.int32)
        t[f"{p}.attn.pv"] = _pv_params(s[f"{p}.v"], s[f"{p}.attn_out"])
        _linear_params(t, f"{p}.proj", block.attn.proj.weight, block.attn.proj.bias,
                       s[f"{p}.attn_out"], s[f"{p}.proj"])
        t[f"{p}.res1"] = residual_params(s_x / s[f"{p}.x1"], s[f"{p}.proj"] / s[f"{p}.x1"])
        _layernorm_params(t, f"{p}.ln2", block.norm2, s[f"{p}.x1"], s[f"{p}.ln2"])
        s_h = s[f"{p}.ln2"]
        if block.is_moe:
            _moe_params(t, p, block.moe, cfg, s)
        else:
            _linear_params(t, f"{p}.fc1", block.mlp.fc1.weight, block.mlp.fc1.bias, s_h,
                           s[f"{p}.fc1"])
            t[f"{p}.gelu"] = gelu_table(s[f"{p}.fc1"], s[f"{p}.gelu"])
            _linear_params(t, f"{p}.fc2", block.mlp.fc2.weight, block.mlp.fc2.bias,
                           s[f"{p}.gelu"], s[f"{p}.mlp_out"])
        t[f"{p}.res2"] = residual_params(s[f"{p}.x1"] / s[f"{p}.x2"],
                                         s[f"{p}.mlp_out"] / s[f"{p}.x2"])
        s_x = s[f"{p}.x2"]
    _layernorm_params(t, "norm", model.norm, s_x, s["norm"])
    for task in cfg.task_names:
        head = model.heads[task].proj
        wq, ws = quantize_weight(head.weight)
        t[f"heads.{task}.weight"] = wq
        t[f"heads.{task}.bias"] = quantize_bias(head.bias, s["norm"] * ws)
        t[f"heads.{task}.out_scale"] = (s["norm"] * ws).to(torch.float32)
    params = {"scales": dict(sorted(s.items())), "calibration": settings}
    return QuantizedModel(config=cfg, tensors=t, params=params)


def _moe_params(t: dict, p: str, layer, cfg: ModelConfig, s: dict[str, float]) -> None:
    s_h = s[f"{p}.ln2"]
    for task_index, task in enumerate(cfg.task_names):
        r = f"{p}.router.{task}"
        if cfg.gate == "multi":
            weight, bias = layer.routers[task].weight, None
        else:
            # x ⊕ task_embed through one router = x·W_x + (task_embed·W_t): a per-task bias.
            weight = layer.router.weight[:, : cfg.embed_dim]
            bias = layer.router.weight[:, cfg.embed_dim :] @ layer.task_embed[task_index]
        centre = s.get(f"{r}.centre", 0.0)
        if centre:
            # router_range "top": a constant bias brings the top-k range's middle to 0.
            offset = torch.full((weight.shape[0],), -centre, dtype=torch.float64)
            bias = offset if bias is None else bias.detach().double() + offset
        # INT16 logits 2^8 times finer than the INT8 step s[r] the exp table keeps: the
        # table is indexed with (max − l) >> 8 and the top-k ranks the INT16 logits.
        _linear_params(t, r, weight, bias, s_h, s[r] / 2**nx.ROUTER_LOGIT_SHIFT)
        t[f"{r}.exp"] = nx.exp_table(s[r]).to(torch.int32)
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for expert in layer.experts:
        one: dict[str, torch.Tensor] = {}
        _linear_params(one, "fc1", expert.fc1.weight, expert.fc1.bias, s_h, s[f"{p}.experts.fc1"])
        _linear_params(one, "fc2", expert.fc2.weight, expert.fc2.bias, s[f"{p}.experts.gelu"],
                       s[f"{p}.experts.fc2"])
        for k, v in one.items():
            parts[k].append(v)
    for k, v in parts.items():
        t[f"{p}.experts.{k}"] = torch.stack(v)
    t[f"{p}.experts.gelu"] = gelu_table(s[f"{p}.experts.fc1"], s[f"{p}.experts.gelu"])
    t[f"{p}.combine"] = torch.stack(requant_params(
        2.0**-nx.SCORE_BITS * s[f"{p}.experts.fc2"] / s[f"{p}.mlp_out"]))


def quantize(
    model: M3ViT, *, n_calib: int = 256, statistic: str = "max", seed: int = CALIB_SEED,
    images: torch.Tensor | None = None, source: str | None = None,
    router_range: str = "max",
) -> QuantizedModel:
    """Calibrate ``model`` and quantize it.

    Parameters
    ----------
    model : M3ViT
        The trained float model.
    n_calib : int
        Synthetic calibration scenes (seed ``seed``) when ``images`` is not given.
    statistic : str
        One of :data:`STATISTICS`.
    seed : int
        Seed of the synthetic calibration scenes.
    images : torch.Tensor, optional
        Calibration images (N, 3, H, W), normalised as the model's input, instead of
        synthetic scenes: e.g. NYUD-v2 training images for a model trained on them.
    source : str, optional
        What ``images`` are, recorded in the package's calibration settings.
    router_range : str
        One of :data:`ROUTER_RANGES`: how the router logits' step is set.
    """
    cfg = model.cfg
    if images is None:
        n_classes = next((tk.n_out for tk in cfg.tasks if tk.kind == "semseg"), 2)
        images = make_scenes(n_calib, cfg.img_size, n_classes=n_classes, seed=seed)["image"]
        settings: dict[str, Any] = {"statistic": statistic, "images": n_calib, "seed": seed}
    else:
        if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.in_chans, *cfg.img_size):
            raise M3VitError(f"calibration images must be (N, {cfg.in_chans}, "
                             f"{cfg.img_size[0]}, {cfg.img_size[1]}), got "
                             f"{tuple(images.shape)}")
        settings = {"statistic": statistic, "images": len(images),
                    "data": source or "given images"}
    scales = calibrate(model, images, statistic, router_range=router_range)
    if router_range != "max":
        settings["router_range"] = router_range
    return quantize_model(model, scales, settings)


# ---- package validation ----------------------------------------------------------------


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a quantized package of ``cfg`` must hold."""
    d, n, e = cfg.embed_dim, cfg.n_tokens, cfg.n_experts
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name: str, n_out: int, n_in: int, lead: tuple[int, ...] = ()) -> None:
        shapes.update({f"{name}.weight": (*lead, n_out, n_in), f"{name}.bias": (*lead, n_out),
                       f"{name}.mult": (*lead, n_out), f"{name}.shift": (*lead, n_out)})

    def ln(name: str) -> None:
        shapes.update({f"{name}.gain": (d,), f"{name}.bias": (d,), f"{name}.cfg": (2,)})

    lin("patch", d, cfg.in_chans * cfg.patch_size**2)
    shapes.update({"cls": (d,), "pos": (n, d), "embed": (3,)})
    for i in range(cfg.depth):
        p = f"blocks.{i}"
        ln(f"{p}.ln1")
        lin(f"{p}.qkv", 3 * d, d)
        shapes.update({f"{p}.attn.logit": (2,), f"{p}.attn.exp": (256,), f"{p}.attn.pv": (2,)})
        lin(f"{p}.proj", d, d)
        shapes[f"{p}.res1"] = (3,)
        ln(f"{p}.ln2")
        if i in cfg.moe_blocks:
            for task in cfg.task_names:
                lin(f"{p}.router.{task}", e, d)
                shapes[f"{p}.router.{task}.exp"] = (256,)
            lin(f"{p}.experts.fc1", cfg.expert_hidden, d, (e,))
            lin(f"{p}.experts.fc2", d, cfg.expert_hidden, (e,))
            shapes.update({f"{p}.experts.gelu": (256,), f"{p}.combine": (2,)})
        else:
            lin(f"{p}.fc1", cfg.mlp_hidden, d)
            lin(f"{p}.fc2", d, cfg.mlp_hidden)
            shapes[f"{p}.gelu"] = (256,)
        shapes[f"{p}.res2"] = (3,)
    ln("norm")
    for task in cfg.tasks:
        shapes.update({f"heads.{task.name}.weight": (task.n_out, d),
                       f"heads.{task.name}.bias": (task.n_out,),
                       f"heads.{task.name}.out_scale": (task.n_out,)})
    return shapes


def validate_package(pkg: QuantizedModel) -> None:
    """Check ``pkg`` holds exactly the tensors its configuration needs, with their shapes.

    Raises
    ------
    M3VitError
        Naming the first missing, unexpected or misshapen tensors.
    """
    want = tensor_shapes(pkg.config)
    have = {k: tuple(v.shape) for k, v in pkg.tensors.items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        parts = []
        for label, names in (("missing", missing), ("unexpected", extra), ("misshapen", wrong)):
            if names:
                parts.append(f"{label} {', '.join(names[:3])}{' …' if len(names) > 3 else ''}")
        raise M3VitError(f"package does not match its {pkg.config.name!r} config: "
                         + "; ".join(parts))
    if "scales" not in pkg.params or "input" not in pkg.params["scales"]:
        raise M3VitError("package has no activation scales: re-run `m3vit quantize`")
