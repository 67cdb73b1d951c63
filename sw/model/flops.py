"""Multiply-accumulate counting by running the model.

The counts come from :class:`torch.utils.flop_counter.FlopCounterMode` over a real
forward pass, so they are what the model executed: the MoE layers run only the top-k
experts each token chose (expert by expert on the gathered tokens), and a single-task
forward runs only that task's routers and head. Only matrix products and convolutions
are counted (one MAC = two FLOPs); LayerNorm, softmax, GELU and the upsampling are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .m3vit import M3ViT

CATEGORIES = ("patch_embed", "attention", "mlp", "router", "experts", "head")

# Module-name patterns of each category; each counted module appears in exactly one, so the
# categories add up to the total (checked in :func:`count_macs`).
_PATTERNS = {
    "patch_embed": re.compile(r"\.patch_embed$"),
    "attention": re.compile(r"\.blocks\.\d+\.attn$"),
    "mlp": re.compile(r"\.blocks\.\d+\.mlp$"),
    "router": re.compile(r"\.blocks\.\d+\.moe\.(routers\.\w+|router)$"),
    "experts": re.compile(r"\.blocks\.\d+\.moe\.experts\.\d+$"),
    "head": re.compile(r"\.heads\.\w+$"),
}


def count_macs(model: M3ViT, task: str | None = None, *, seed: int = 0) -> dict[str, int]:
    """MACs of one image's forward pass, by category.

    Parameters
    ----------
    model : M3ViT
        The model to run (its routing decides nothing about the counts: every token runs
        exactly ``top_k`` experts, whatever they are).
    task : str, optional
        Single-task forward for ``task``; ``None`` runs the all-task forward.
    seed : int
        Seed of the random input image.

    Returns
    -------
    dict of str to int
        One entry per :data:`CATEGORIES` plus ``"total"``.
    """
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_chans, *cfg.img_size, generator=gen)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, task=task)
    finally:
        model.train(was_training)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    macs = {cat: 0 for cat in CATEGORIES}
    for name, flops in by_module.items():
        for cat, pattern in _PATTERNS.items():
            if pattern.search(name):
                macs[cat] += flops // 2
    macs["total"] = counter.get_total_flops() // 2
    uncounted = macs["total"] - sum(macs[c] for c in CATEGORIES)
    if uncounted:
        raise RuntimeError(f"{uncounted} MACs fall in no category: update flops._PATTERNS")
    return macs


@dataclass(frozen=True)
class MacReport:
    """Single-task versus all-task cost of one model.

    Attributes
    ----------
    preset : str
        Preset name.
    single : dict
        Per task, :func:`count_macs` of its single-task forward.
    all_tasks : dict
        :func:`count_macs` of the all-task forward (the backbone runs once per task).
    every_expert_macs : int
        What the MoE layers would cost if every token ran all E experts (the dense
        counterfactual the top-k routing avoids), for one task.
    """

    preset: str
    single: dict[str, dict[str, int]]
    all_tasks: dict[str, int]
    every_expert_macs: int

    def format(self) -> str:
        """A plain-text table for the CLI."""
        cols = [*self.single, "all tasks"]
        rows = [*CATEGORIES, "total"]
        table = [[f"{'MACs (M)':<12}", *(f"{c:>12}" for c in cols)]]
        for r in rows:
            vals = [self.single[t][r] for t in self.single] + [self.all_tasks[r]]
            table.append([f"{r:<12}", *(f"{v / 1e6:>12.2f}" for v in vals)])
        lines = [" ".join(row) for row in table]
        first = next(iter(self.single.values()))
        saving = 1 - first["total"] / self.all_tasks["total"]
        lines += [
            "",
            f"single-task inference runs {first['total'] / 1e6:.1f} M MACs, "
            f"{saving:.0%} fewer than the all-task forward ({self.all_tasks['total'] / 1e6:.1f} M)",
        ]
        if first["experts"]:
            lines.append(
                f"experts: {first['experts'] / 1e6:.1f} M MACs with top-k routing vs "
                f"{self.every_expert_macs / 1e6:.1f} M if every token ran every expert"
            )
        return "\n".join(lines)


def mac_report(model: M3ViT) -> MacReport:
    """Measure single-task and all-task MACs of ``model`` (see :func:`count_macs`)."""
    cfg = model.cfg
    single = {t: count_macs(model, t) for t in cfg.task_names}
    first = next(iter(single.values()))
    every = first["experts"] * cfg.n_experts // cfg.top_k if cfg.moe else 0
    return MacReport(cfg.name, single, count_macs(model, None), every)
