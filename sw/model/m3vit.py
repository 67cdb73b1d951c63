"""The M³ViT float model in PyTorch.

A ViT backbone (patch embedding, cls token, learned position embedding, pre-norm blocks)
whose odd blocks replace the MLP by a Mixture-of-Experts layer, with one router per task
per MoE layer ("multi-gate") or one task-conditioned router, and per-task dense heads.

Single-task inference (``model(x, task="depth")``) runs the backbone with that task's
routers and that task's head only; the all-task forward runs the backbone once per task,
because each task routes its tokens differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import M3VitError
from .config import ModelConfig, TaskSpec

__all__ = [
    "M3ViT",
    "MoELayer",
    "Routing",
    "cv_squared",
    "load_balancing_loss",
    "route",
]


# ---- routing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """Routing decision for a batch of tokens.

    Attributes
    ----------
    probs : torch.Tensor
        (M, E) softmax over all experts.
    experts : torch.Tensor
        (M, k) chosen experts, most probable first; ties go to the lower expert index.
    scores : torch.Tensor
        (M, k) the chosen experts' probabilities, *not* renormalised.
    """

    probs: torch.Tensor
    experts: torch.Tensor
    scores: torch.Tensor


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """Route tokens: softmax over all experts, then top-k of the probabilities.

    Parameters
    ----------
    logits : torch.Tensor
        (M, E) router logits (no bias).
    top_k : int
        Experts per token.

    Returns
    -------
    Routing
        The probabilities, the chosen experts and their (unrenormalised) scores.

    Notes
    -----
    A stable descending sort keeps equal probabilities in index order, which is the
    lower-index tie-break the hardware implements; ``torch.topk`` promises no order.
    """
    probs = logits.softmax(dim=-1)
    experts = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return Routing(probs=probs, experts=experts, scores=probs.gather(1, experts))


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, ``var(x) / (mean(x)² + 1e-10)``.

    The variance is the unbiased one and a single value gives 0, as in M³ViT's gate.
    """
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def load_balancing_loss(routing: Routing, n_experts: int) -> torch.Tensor:
    """Load-balancing loss of one gate: cv²(importance) + cv²(load), unweighted.

    Importance is each expert's summed score over the tokens (differentiable); load is the
    number of tokens that chose it (a count, so without router noise it carries no
    gradient — M³ViT's gate uses noise std 0 at inference, and we train without noise).
    """
    gates = torch.zeros_like(routing.probs).scatter(1, routing.experts, routing.scores)
    importance = gates.sum(0)
    load = F.one_hot(routing.experts, n_experts).sum(dim=(0, 1)).float()
    return cv_squared(importance) + cv_squared(load)


# ---- building blocks -------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (a strided convolution, as timm's ViT)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(
            cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # Explicit matmuls rather than scaled_dot_product_attention: the same arithmetic
        # the accelerator performs, and every op is visible to the MAC counter.
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear(D→H) + GELU + Linear(H→D): the dense MLP and, with its own H, one expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MoELayer(nn.Module):
    """Mixture of experts with per-task routers, executed expert by expert.

    Parameters
    ----------
    cfg : ModelConfig
        Supplies E, k, D, H, the tasks and the gate variant.

    Notes
    -----
    ``gate == "multi"``: ``routers[task]`` is a bias-free Linear(D→E) per task.
    ``gate == "task_cond"``: one bias-free Linear(2D→E) fed ``x ⊕ task_embed[task]``;
    since the task part is constant over tokens it acts as a per-task logit offset.

    The forward pass is the accelerator's computation-reordering schedule: gather each
    expert's tokens, run the expert once on them, scale by the scores and scatter-add.
    Experts that no token chose are never run.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.gate = cfg.gate
        self.task_names = cfg.task_names
        self.experts = nn.ModuleList(
            Mlp(cfg.embed_dim, cfg.expert_hidden) for _ in range(cfg.n_experts)
        )
        if cfg.gate == "multi":
            self.routers = nn.ModuleDict(
                {t: nn.Linear(cfg.embed_dim, cfg.n_experts, bias=False) for t in cfg.task_names}
            )
        else:
            self.task_embed = nn.Parameter(torch.zeros(len(cfg.tasks), cfg.embed_dim))
            self.router = nn.Linear(2 * cfg.embed_dim, cfg.n_experts, bias=False)

    def router_logits(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """(M, E) router logits for flat tokens ``x`` (M, D) of ``task``."""
        if self.gate == "multi":
            return self.routers[task](x)
        t = self.task_embed[self.task_names.index(task)].expand(x.shape[0], -1)
        return self.router(torch.cat([x, t], dim=-1))

    def forward(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the layer output (B, N, D) and this gate's load-balancing loss."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = route(self.router_logits(flat, task), self.top_k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (routing.experts == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            y = expert(flat.index_select(0, token)) * routing.scores[token, slot, None]
            out = out.index_add(0, token, y)
        return out.reshape(shape), load_balancing_loss(routing, self.n_experts)


class Block(nn.Module):
    """Pre-norm transformer block; ``moe`` replaces the MLP by an :class:`MoELayer`."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.is_moe = moe
        if moe:
            self.moe = MoELayer(cfg)
        else:
            self.mlp = Mlp(cfg.embed_dim, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x))
        if self.is_moe:
            y, aux = self.moe(self.norm2(x), task)
            return x + y, aux
        return x + self.mlp(self.norm2(x)), x.new_zeros(())


# ---- heads -----------------------------------------------------------------------------


class LinearHead(nn.Module):
    """Per-token linear head on the token grid, bilinearly upsampled to the image.

    This is the head the accelerator runs: one small GEMM over the patch tokens; the
    upsampling is done by the host.
    """

    def __init__(self, cfg: ModelConfig, task: TaskSpec):
        super().__init__()
        self.grid = cfg.grid
        self.img_size = cfg.img_size
        self.proj = nn.Linear(cfg.embed_dim, task.n_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map patch tokens (B, N, D) to a (B, n_out, H, W) prediction."""
        y = self.proj(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)
        return F.interpolate(y, size=self.img_size, mode="bilinear", align_corners=False)


class SetrPupHead(nn.Module):
    """SETR-PUP style decoder (float only): conv3×3 + BN + ReLU + 2× upsampling stages.

    ``log2(patch_size)`` stages (at most 4, as in SETR-PUP) bring the token grid back
    towards the image resolution; a 1×1 conv gives the outputs and a final bilinear
    resize covers any remaining factor.
    """

    def __init__(self, cfg: ModelConfig, task: TaskSpec):
        super().__init__()
        self.grid = cfg.grid
        self.img_size = cfg.img_size
        n_stages = max(1, min(4, round(math.log2(cfg.patch_size))))
        layers: list[nn.Module] = []
        ch_in = cfg.embed_dim
        for _ in range(n_stages):
            layers += [
                nn.Conv2d(ch_in, cfg.decoder_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(cfg.decoder_channels),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ]
            ch_in = cfg.decoder_channels
        layers.append(nn.Conv2d(ch_in, task.n_out, 1))
        self.decoder = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map patch tokens (B, N, D) to a (B, n_out, H, W) prediction."""
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)
        y = self.decoder(x)
        if tuple(y.shape[-2:]) != tuple(self.img_size):
            y = F.interpolate(y, size=self.img_size, mode="bilinear", align_corners=False)
        return y


# ---- the model -------------------------------------------------------------------------


class M3ViT(nn.Module):
    """Multi-task Mixture-of-Experts Vision Transformer.

    Parameters
    ----------
    cfg : ModelConfig
        Architecture (see :mod:`m3vit.sw.model.config`).
    seed : int
        Seed of the parameter initialisation; the global RNG is left untouched.

    Examples
    --------
    >>> model = M3ViT(get_preset("tiny"))
    >>> out = model(torch.zeros(2, 3, 32, 32), task="semseg")   # (2, 4, 32, 32)
    >>> outs = model(torch.zeros(2, 3, 32, 32))                  # {"semseg": ..., "depth": ...}
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embed = PatchEmbed(cfg)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.embed_dim))
            moe_blocks = set(cfg.moe_blocks)
            self.blocks = nn.ModuleList(Block(cfg, i in moe_blocks) for i in range(cfg.depth))
            self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
            head_cls = LinearHead if cfg.head == "linear" else SetrPupHead
            self.heads = nn.ModuleDict({t.name: head_cls(cfg, t) for t in cfg.tasks})
            self._init_weights()

    def _init_weights(self) -> None:
        # timm's ViT initialisation: truncated normal (std 0.02) for linear weights,
        # cls token and position embedding; zero biases; unit LayerNorm.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, MoELayer) and m.gate == "task_cond":
                nn.init.trunc_normal_(m.task_embed, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`M3VitError` unless ``x`` is a (B, C, H, W) batch of this model."""
        want = (self.cfg.in_chans, *self.cfg.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise M3VitError(
                f"input of shape {tuple(x.shape)} does not fit preset {self.cfg.name!r}: "
                f"expected (batch, {want[0]}, {want[1]}, {want[2]})"
            )

    def forward_features(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone for one task: normed tokens (B, N+1, D) and the summed balance loss."""
        self.cfg.task(task)  # one clear error for an unknown task
        self.check_input(x)
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        aux = t.new_zeros(())
        for block in self.blocks:
            t, a = block(t, task)
            aux = aux + a
        return self.norm(t), aux

    def forward_task(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-task forward: prediction (B, n_out, H, W) and weighted balance loss."""
        tokens, aux = self.forward_features(x, task)
        return self.heads[task](tokens[:, 1:]), self.cfg.balance_weight * aux

    def forward(
        self, x: torch.Tensor, task: str | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Predict one task (``task`` given) or every task (a dict keyed by task name)."""
        if task is not None:
            return self.forward_task(x, task)[0]
        return {name: self.forward_task(x, name)[0] for name in self.cfg.task_names}
