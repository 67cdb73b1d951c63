"""The bit-exact golden model: one task's integer forward pass.

Built only from the per-operation functions of :mod:`m3vit.sw.quant.numerics` — the units each
RTL block is compared with — over the integer tensors of a quantized package
(:mod:`m3vit.sw.quant.quantize` names them). Vectorised over the batch; the MoE layer loops
over experts (gathering each expert's tokens, the accelerator's schedule), never over
elements.

The host side of the data path is here too: :func:`quantize_image`, :func:`patchify` (the
only work the host does before the accelerator) and :func:`dequantize_head` +
:func:`upsample` after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.config import ModelConfig
from . import numerics as nx

Tensors = dict[str, torch.Tensor]


# ---- host side -------------------------------------------------------------------------


def quantize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Host: float image → INT8, ``sat8(round_half_up(image / scale))``."""
    return nx.saturate(torch.floor(image.double() / scale + 0.5).to(torch.int64))


def patchify(image_q: torch.Tensor, patch: int) -> torch.Tensor:
    """Host: (B, C, H, W) → (B, N_patches, C·p·p) rows in the conv weight's (c, y, x) order."""
    b, c, h, w = image_q.shape
    x = image_q.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def dequantize_head(acc: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """Host: the head's INT32 accumulators (B, N, n_out) → float, per output channel."""
    return acc.double() * out_scale.double()


def upsample(tokens: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Host: (B, N, n_out) per-token predictions → (B, n_out, H, W), bilinear."""
    y = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *cfg.grid).float()
    return F.interpolate(y, size=cfg.img_size, mode="bilinear", align_corners=False)


# ---- operations with their parameters looked up by name ---------------------------------


def _linear(t: Tensors, name: str, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
    return nx.linear(x, t[f"{name}.weight"], t.get(f"{name}.bias"), t[f"{name}.mult"],
                     t[f"{name}.shift"], wide=wide)


def _layernorm(t: Tensors, name: str, x: torch.Tensor) -> torch.Tensor:
    shift, eps_term = t[f"{name}.cfg"].tolist()
    return nx.layernorm(x, t[f"{name}.gain"], t[f"{name}.bias"], shift, eps_term)


def _residual(t: Tensors, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mult_a, mult_b, shift = t[name].tolist()
    return nx.residual_add(a, b, mult_a, mult_b, shift)


def _requant(t: Tensors, name: str, acc: torch.Tensor) -> torch.Tensor:
    mult, shift = t[name].tolist()
    return nx.requantize(acc, mult, shift)


def attention(
    t: Tensors, p: str, h: torch.Tensor, cfg: ModelConfig, cap: Tensors | None
) -> torch.Tensor:
    """Multi-head attention of block prefix ``p`` on INT8 input (B, N, D) → INT8 (B, N, D)."""
    b, n, d = h.shape
    qkv = _linear(t, f"{p}.qkv", h).reshape(b, n, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)               # (B, heads, N, dh)
    logits = _requant(t, f"{p}.attn.logit", nx.matmul(q, k.transpose(-2, -1)))
    probs, rcp = nx.softmax(logits, t[f"{p}.attn.exp"])
    mult, shift = t[f"{p}.attn.pv"].tolist()
    out = nx.attention_pv(probs, v, rcp, mult, shift).transpose(1, 2).reshape(b, n, d)
    if cap is not None:
        cap.update({f"{p}.q": q, f"{p}.k": k, f"{p}.v": v, f"{p}.logits": logits,
                    f"{p}.probs": probs, f"{p}.attn_out": out})
    return _linear(t, f"{p}.proj", out)


def dense_mlp(t: Tensors, p: str, h: torch.Tensor, cap: Tensors | None) -> torch.Tensor:
    """FC1 → GELU table → FC2 of a dense block."""
    pre = _linear(t, f"{p}.fc1", h)
    act = nx.table_lookup(pre, t[f"{p}.gelu"])
    out = _linear(t, f"{p}.fc2", act)
    if cap is not None:
        cap.update({f"{p}.fc1": pre, f"{p}.gelu": act})
    return out


def route(t: Tensors, p: str, x: torch.Tensor, task: str, top_k: int):
    """Router of ``task``: INT16 logits, scores (2^-15), chosen experts (the top-k of the
    logits) and their scores."""
    r = f"{p}.router.{task}"
    logits = _linear(t, r, x, wide=True)
    scores, experts, chosen = nx.route(logits, t[f"{r}.exp"], top_k)
    return logits, scores, experts, chosen


def expert_ffn(t: Tensors, p: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """One expert on its gathered INT8 tokens (M_e, D) → INT8 (M_e, D)."""
    def lin(name: str, v: torch.Tensor) -> torch.Tensor:
        q = f"{p}.experts.{name}"
        return nx.linear(v, t[f"{q}.weight"][e], t[f"{q}.bias"][e], t[f"{q}.mult"][e],
                         t[f"{q}.shift"][e])

    return lin("fc2", nx.table_lookup(lin("fc1", x), t[f"{p}.experts.gelu"]))


def moe(
    t: Tensors, p: str, h: torch.Tensor, task: str, cfg: ModelConfig, cap: Tensors | None
) -> torch.Tensor:
    """MoE layer, expert by expert: route, gather, FC1 → GELU → FC2, × score, combine."""
    shape = h.shape
    flat = h.reshape(-1, shape[-1])
    logits, scores, experts, chosen = route(t, p, flat, task, cfg.top_k)
    expert_out = torch.zeros(*experts.shape, shape[-1], dtype=torch.int64)
    for e in range(cfg.n_experts):
        token, slot = (experts == e).nonzero(as_tuple=True)
        if token.numel():
            expert_out[token, slot] = expert_ffn(t, p, e, flat[token])
    mult, shift = t[f"{p}.combine"].tolist()
    out = nx.moe_combine(expert_out, chosen, mult, shift).reshape(shape)
    if cap is not None:
        cap.update({f"{p}.router": logits, f"{p}.scores": scores, f"{p}.experts": experts,
                    f"{p}.expert_out": expert_out})
    return out


def forward(
    t: Tensors, cfg: ModelConfig, image_q: torch.Tensor, task: str, capture: bool = False
) -> tuple[torch.Tensor, Tensors]:
    """One task's integer forward pass.

    Parameters
    ----------
    t : dict of str to torch.Tensor
        The quantized package's tensors.
    cfg : ModelConfig
        Its model configuration.
    image_q : torch.Tensor
        (B, C, H, W) INT8 image (:func:`quantize_image`).
    task : str
        The task whose routers and head run.
    capture : bool
        Also return every layer's intermediate tensors, keyed like the quantizer's
        calibration points (``blocks.3.ln2``, ``blocks.3.router``, ...).

    Returns
    -------
    head : torch.Tensor
        (B, N_patches, n_out) INT32 head accumulators.
    captured : dict
        Intermediates (empty unless ``capture``).
    """
    cfg.task(task)
    cap: Tensors | None = {} if capture else None
    patches = patchify(nx.saturate(image_q), cfg.patch_size)
    pe = _linear(t, "patch", patches)
    cls = t["cls"].expand(pe.shape[0], 1, -1)
    x = _residual(t, "embed", torch.cat([cls, pe], dim=1), t["pos"])
    if cap is not None:
        cap.update({"input": image_q, "patch": pe, "x0": x})
    for i in range(cfg.depth):
        p = f"blocks.{i}"
        h = _layernorm(t, f"{p}.ln1", x)
        x1 = _residual(t, f"{p}.res1", x, attention(t, p, h, cfg, cap))
        h2 = _layernorm(t, f"{p}.ln2", x1)
        if i in cfg.moe_blocks:
            y = moe(t, p, h2, task, cfg, cap)
        else:
            y = dense_mlp(t, p, h2, cap)
        x_next = _residual(t, f"{p}.res2", x1, y)
        if cap is not None:
            cap.update({f"{p}.ln1": h, f"{p}.x1": x1, f"{p}.ln2": h2, f"{p}.mlp_out": y,
                        f"{p}.x2": x_next})
        x = x_next
    normed = _layernorm(t, "norm", x)
    head = nx.gemm(normed[:, 1:], t[f"heads.{task}.weight"], t[f"heads.{task}.bias"])
    if cap is not None:
        cap.update({"norm": normed, f"heads.{task}": head})
    return head, cap or {}


def predict(
    t: Tensors, cfg: ModelConfig, params: dict, image: torch.Tensor, task: str
) -> torch.Tensor:
    """Float image → the task's float prediction (B, n_out, H, W), like the float model."""
    head, _ = forward(t, cfg, quantize_image(image, params["scales"]["input"]), task)
    return upsample(dequantize_head(head, t[f"heads.{task}.out_scale"]), cfg)
