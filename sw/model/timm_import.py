"""Initialise the M³ViT backbone from a timm ``VisionTransformer`` (M³ViT starts from DeiT).

Dense blocks, attention, patch embedding, cls token, position embedding and the final
norm are copied. Experts are initialised from the dense MLP of their block:

* if the expert hidden width H equals the dense width, every expert is a copy of the
  MLP ("sparse upcycling");
* if H divides the dense width into ``S`` slices, expert ``e`` takes slice ``e mod S`` of
  the dense MLP — fc1 rows, fc1 bias and fc2 columns — and a copy of the fc2 bias
  (the partitioning of "MoEfication"). With ``edge-moe`` (768 → 2 × 384) experts
  alternate between the two halves of the dense MLP.

Routers keep their seeded random initialisation, so the experts diverge once
fine-tuning starts. No weights are downloaded: ``timm.create_model(pretrained=False)``
builds the network locally, and :func:`load_timm_weights` accepts any instance.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import M3VitError
from .config import ModelConfig
from .m3vit import M3ViT

# Kept alive for the life of the process: the operator schemas it declares vanish with it.
_torchvision_schemas: torch.library.Library | None = None


def import_timm() -> ModuleType:
    """Import timm, making torchvision importable beside the CPU build of torch.

    ``import timm`` imports torchvision. PyPI's torchvision wheels are CUDA builds whose
    compiled ops fail to load beside the pinned CPU torch, and torchvision's import then
    stops at registering fake kernels for ``torchvision::nms``/``qnms``. When (and only
    when) its ``_C`` library cannot load, those two schemas are declared here so the pure
    Python parts of torchvision import; calling a torchvision C++ op still raises.
    ViTs use none.
    """
    global _torchvision_schemas
    if "timm" in sys.modules:
        return sys.modules["timm"]
    tv_spec = importlib.util.find_spec("torchvision")
    if importlib.util.find_spec("timm") is None or tv_spec is None:
        raise M3VitError("timm/torchvision are not installed: run `make install`")
    if "torchvision" not in sys.modules and _torchvision_schemas is None:
        try:
            torch.ops.load_library(str(Path(tv_spec.origin).parent / "_C.so"))
        except OSError:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _torchvision_schemas = lib
    import timm

    return timm


def create_timm_vit(name: str, cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Build timm model ``name`` locally (random init, no download) at ``cfg``'s image size.

    Raises
    ------
    M3VitError
        If timm has no model of that name.
    """
    timm = import_timm()
    if name not in timm.list_models():
        raise M3VitError(f"timm has no model {name!r} (e.g. vit_tiny_patch16_224)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(
            name, pretrained=False, img_size=cfg.img_size, num_classes=0
        ).eval()


def _check_compatible(vit: nn.Module, cfg: ModelConfig) -> None:
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not hasattr(vit, "pos_embed"):
        raise M3VitError(f"{type(vit).__name__} is not a timm VisionTransformer")
    found = {
        "embed_dim": vit.embed_dim,
        "depth": len(blocks),
        "num_heads": blocks[0].attn.num_heads,
        "patch_size": vit.patch_embed.patch_size[0],
        "mlp_hidden": blocks[0].mlp.fc1.out_features,
        "in_chans": vit.patch_embed.proj.in_channels,
    }
    want = {k: getattr(cfg, k) for k in found}
    bad = {k: (found[k], want[k]) for k in found if found[k] != want[k]}
    if bad:
        detail = ", ".join(f"{k} {f} != {w}" for k, (f, w) in bad.items())
        raise M3VitError(f"timm model does not match preset {cfg.name!r}: {detail}")
    if getattr(vit, "cls_token", None) is None or getattr(vit, "num_reg_tokens", 0):
        raise M3VitError("only ViTs with one cls token and no register tokens can be imported")
    if getattr(vit, "no_embed_class", False):
        raise M3VitError("ViTs whose position embedding skips the cls token are not supported")
    extras = [
        n for n, m in vit.named_modules()
        if n.rsplit(".", 1)[-1] in ("ls1", "ls2", "q_norm", "k_norm", "norm_pre")
        and not isinstance(m, nn.Identity)
    ]
    if extras:
        raise M3VitError(f"ViT uses layers M³ViT does not have: {', '.join(extras[:3])}")


def _resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resample the patch part of a (1, 1+N, D) position embedding."""
    cls, patches = pos[:, :1], pos[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise M3VitError("cannot resample a non-square position embedding: build the timm "
                         "model at the preset's image size")
    img = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


@torch.no_grad()
def load_timm_weights(model: M3ViT, vit: nn.Module) -> None:
    """Copy a timm ViT's weights into ``model`` (see the module docstring for experts).

    Raises
    ------
    M3VitError
        If the ViT's shape differs from the model's configuration.
    """
    cfg = model.cfg
    _check_compatible(vit, cfg)
    model.patch_embed.proj.load_state_dict(vit.patch_embed.proj.state_dict())
    model.cls_token.copy_(vit.cls_token)
    pos = vit.pos_embed
    if pos.shape[1] != cfg.n_tokens:
        pos = _resample_pos_embed(pos, cfg.grid)
    model.pos_embed.copy_(pos)
    model.norm.load_state_dict(vit.norm.state_dict())
    for ours, theirs in zip(model.blocks, vit.blocks, strict=True):
        for name in ("norm1", "norm2"):
            getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())
        ours.attn.qkv.load_state_dict(theirs.attn.qkv.state_dict())
        ours.attn.proj.load_state_dict(theirs.attn.proj.state_dict())
        if ours.is_moe:
            _init_experts(ours.moe.experts, theirs.mlp, cfg)
        else:
            ours.mlp.fc1.load_state_dict(theirs.mlp.fc1.state_dict())
            ours.mlp.fc2.load_state_dict(theirs.mlp.fc2.state_dict())


def _init_experts(experts: nn.ModuleList, mlp: nn.Module, cfg: ModelConfig) -> None:
    dense, h = cfg.mlp_hidden, cfg.expert_hidden
    if dense % h:
        raise M3VitError(
            f"expert hidden width {h} does not divide the dense MLP width {dense}: "
            "experts cannot be initialised from it"
        )
    n_slices = dense // h
    for e, expert in enumerate(experts):
        rows = slice((e % n_slices) * h, (e % n_slices + 1) * h)
        expert.fc1.weight.copy_(mlp.fc1.weight[rows])
        expert.fc1.bias.copy_(mlp.fc1.bias[rows])
        expert.fc2.weight.copy_(mlp.fc2.weight[:, rows])
        expert.fc2.bias.copy_(mlp.fc2.bias)


def from_timm(name: str, cfg: ModelConfig, seed: int = 0) -> M3ViT:
    """Build an :class:`M3ViT` for ``cfg`` initialised from timm model ``name``."""
    model = M3ViT(cfg, seed=seed)
    load_timm_weights(model, create_timm_vit(name, cfg, seed=seed))
    return model
