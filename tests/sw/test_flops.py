"""The MAC counter against an independent closed-form count."""

import pytest

from m3vit.sw.model.config import get_preset
from m3vit.sw.model.flops import count_macs, mac_report
from m3vit.sw.model.m3vit import M3ViT


def closed_form_macs(cfg) -> dict[str, int]:
    """Per-image MACs of a single-task forward, written out from the architecture."""
    n, d, p = cfg.n_tokens, cfg.embed_dim, cfg.patch_size
    n_moe = len(cfg.moe_blocks)
    n_dense = cfg.depth - n_moe
    per_attn = n * d * 3 * d + 2 * n * n * d + n * d * d   # qkv, Q·Kᵀ + P·V, proj
    return {
        "patch_embed": cfg.n_patches * cfg.in_chans * p * p * d,
        "attention": cfg.depth * per_attn,
        "mlp": n_dense * 2 * n * d * cfg.mlp_hidden,
        "router": n_moe * n * d * cfg.n_experts,
        "experts": n_moe * n * cfg.top_k * 2 * d * cfg.expert_hidden,
    }


@pytest.mark.parametrize("preset", ["tiny", "edge-moe"])
def test_counter_matches_closed_form(preset):
    cfg = get_preset(preset)
    model = M3ViT(cfg)
    for task in cfg.tasks:
        got = count_macs(model, task.name)
        want = closed_form_macs(cfg)
        want["head"] = cfg.n_patches * cfg.embed_dim * task.n_out
        want["total"] = sum(want.values())
        assert got == want


def test_edge_moe_figures(capsys):
    cfg = get_preset("edge-moe")
    report = mac_report(M3ViT(cfg))
    with capsys.disabled():
        print("\n" + report.format())
    seg = report.single["semseg"]
    # REFERENCE.md's breakdown of the edge-moe backbone, in millions of MACs.
    assert round(seg["attention"] / 1e6) == 305
    assert round(seg["mlp"] / 1e6) == 228
    assert round(seg["experts"] / 1e6) == 228
    assert round(seg["patch_embed"] / 1e6) == 19
    assert round((seg["total"] - seg["head"]) / 1e6) == 783      # "≈784 M" in REFERENCE.md
    # The all-task forward runs the backbone once per task: single-task halves the cost.
    backbone = seg["total"] - seg["head"]
    heads = sum(s["head"] for s in report.single.values())
    assert report.all_tasks["total"] == 2 * backbone + heads
    # Top-2 of 16 experts: the expert MACs are 2/16 of running every expert.
    assert report.every_expert_macs == seg["experts"] * 8


def test_counter_counts_only_chosen_experts():
    # Doubling k doubles the expert MACs and nothing else.
    cfg = get_preset("tiny")
    k2 = count_macs(M3ViT(cfg), "depth")
    k4 = count_macs(M3ViT(cfg.replace(top_k=4)), "depth")
    assert k4["experts"] == 2 * k2["experts"]
    assert {k: v for k, v in k4.items() if k not in ("experts", "total")} == \
        {k: v for k, v in k2.items() if k not in ("experts", "total")}
