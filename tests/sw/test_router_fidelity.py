"""Router fidelity (issue #20): the stage table, near-ties and the precision what-if."""

import functools

import torch

from m3vit.sw.model.config import get_preset
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.model.train import scenes_for
from m3vit.sw.quant import golden
from m3vit.sw.quant.accuracy import router_agreement
from m3vit.sw.quant.package import QuantizedModel
from m3vit.sw.quant.quantize import quantize, trace_float
from m3vit.sw.quant.router_fidelity import (
    STAGES,
    format_fidelity,
    precision_what_if,
    router_fidelity,
    top_k_sets,
)


@functools.cache
def tiny():
    model = M3ViT(get_preset("tiny"), seed=0).eval()
    return model, quantize(model, n_calib=8)


def images(n=4):
    return scenes_for(get_preset("tiny"), n, seed=1)["image"]


def test_top_k_sets_break_integer_ties_to_the_lower_index():
    ints = torch.tensor([[3, 7, 7, 1], [5, 5, 5, 5]])
    assert top_k_sets(ints, 2).tolist() == [[1, 2], [0, 1]]
    assert top_k_sets(torch.tensor([[0.1, 0.9, 0.3]]), 2).tolist() == [[1, 2]]


def test_a_fake_quant_hook_that_changes_nothing_changes_nothing():
    model, _ = tiny()
    x = images(2)
    plain = trace_float(model, x, "semseg")
    seen = []
    hooked = trace_float(model, x, "semseg", lambda name, v: seen.append(name) or v)
    assert plain.keys() == hooked.keys()
    assert all(torch.equal(plain[k], hooked[k]) for k in plain)
    # Every stored tensor passes the hook, and the probabilities, which are not stored.
    assert {"x0", "blocks.0.ln1", "blocks.0.probs", "blocks.1.router.semseg",
            "blocks.1.experts.fc1", "blocks.3.x2", "norm"} <= set(seen)
    assert "blocks.0.probs" not in plain


def test_the_stage_chain_ends_at_the_integer_model_and_counts_near_ties():
    model, pkg = tiny()
    x = images()
    fid = router_fidelity(model, pkg, x)
    assert set(fid) == {"semseg", "depth"}
    for blocks in fid.values():
        assert set(blocks) == set(model.cfg.moe_blocks)
        for b in blocks.values():
            assert b["tokens"] == 4 * model.cfg.n_tokens
            assert set(b["stages"]) == set(STAGES)
            assert all(0.0 <= v <= 1.0 for v in b["stages"].values())
            assert b["agreement"] == b["stages"]["logits"]
            assert b["disagreements"] == round((1 - b["agreement"]) * b["tokens"])
            assert 0 <= b["near_ties"] <= b["disagreements"]
    assert router_agreement(model, pkg, x) == {
        t: {i: b["agreement"] for i, b in blocks.items()} for t, blocks in fid.items()}
    text = format_fidelity(fid)
    assert "router top-k agreement semseg" in text and "INT16 router logits" in text


def test_a_router_whose_logits_all_tie_disagrees_only_in_near_ties():
    """Zero router weights: every INT16 logit 0, every score equal; the integer model then
    picks experts 0 and 1 for every token, each disagreement a near-tie."""
    model, pkg = tiny()
    t = dict(pkg.tensors)
    r = "blocks.1.router.semseg"
    t[f"{r}.weight"] = torch.zeros_like(t[f"{r}.weight"])
    t[f"{r}.bias"] = torch.zeros_like(t[f"{r}.bias"])
    broken = QuantizedModel(config=pkg.config, tensors=t, params=pkg.params)
    x = images()
    block = router_fidelity(model, broken, x)["semseg"][1]
    ref = trace_float(model, x, "semseg")["blocks.1.experts"].sort(dim=-1).values
    want = (ref == torch.tensor([0, 1])).all(dim=-1).double().mean()
    assert block["agreement"] == float(want)
    assert block["stages"]["logits"] == block["agreement"]
    assert block["disagreements"] > 0 and block["near_ties"] == block["disagreements"]
    _, cap = golden.forward(t, pkg.config, golden.quantize_image(
        x, pkg.params["scales"]["input"]), "semseg", capture=True)
    assert (cap["blocks.1.experts"].sort(dim=-1).values == torch.tensor([0, 1])).all()


def test_what_if_in_float_agrees_everywhere_and_integer_widths_do_not():
    model, pkg = tiny()
    x = images(8)
    got = precision_what_if(model, pkg.params["scales"], x, {
        "float": {"residual": None, "probs": None, "router": None, "other": None},
        "integer": {},
    })
    assert got["float"] == {t: {1: 1.0, 3: 1.0} for t in ("semseg", "depth")}
    # Row-relative probabilities with enough steps are the float ones again.
    wide = precision_what_if(model, pkg.params["scales"], x, {"relative": {
        "residual": None, "router": None, "other": None, "probs_relative": 40}})
    assert wide["relative"] == got["float"]
    # Rounding every stored tensor as the integer model does moves some routings.
    assert min(v for blocks in got["integer"].values() for v in blocks.values()) < 1.0


def test_the_bench_measures_a_model_and_writes_its_tables():
    from m3vit.sw.bench.router_fidelity import MODELS, VARIANTS, markdown, measure

    r = measure("tiny, top-1", MODELS["tiny, top-1"], quick=True)
    assert r["config"].top_k == 1
    assert set(r["what_if"]) == set(VARIANTS)
    text = markdown([r])
    assert "### tiny, top-1: E = 4, top-1" in text
    # one stage table per task
    assert text.count("| INT16 router logits (the integer model) |") == 2
    assert "| absolute probabilities at 2^-7 (the design before) |" in text
    assert "| top |" in text and r["top"]["calibration"]["router_range"] == "top"
    assert list(r["drift"])[:3] == ["x0", "blocks.0.ln1", "blocks.0.q"]
    assert all(0.0 < v < 1.0 for v in r["drift"].values())


def test_router_range_top_maps_the_top_k_range_to_the_middle_of_int8():
    """The largest first logit and the smallest (k+1)-th of the calibration tokens land at
    ±127 / (1 + 2·margin) steps from the centre; every other tensor keeps its scale."""
    from m3vit.sw.quant.quantize import TOP_RANGE_MARGIN, calibrate

    model, _ = tiny()
    x = images(8)
    plain = calibrate(model, x)
    top = calibrate(model, x, router_range="top")
    edge = 127 / (1 + 2 * TOP_RANGE_MARGIN)
    centred = 0
    for task in model.cfg.task_names:
        logits = trace_float(model, x, task)
        for i in model.cfg.moe_blocks:
            r = f"blocks.{i}.router.{task}"
            ranked = logits[r].double().sort(dim=-1, descending=True).values
            span = float(ranked[:, 0].max() - ranked[:, model.cfg.top_k].min())
            if span * (1 + 2 * TOP_RANGE_MARGIN) / 254 >= plain[r]:
                # Not finer than the max statistic: that one is kept, uncentred.
                assert top[r] == plain[r] and f"{r}.centre" not in top
                continue
            centred += 1
            steps = (ranked - top[f"{r}.centre"]) / top[r]
            assert abs(float(steps[:, 0].max()) - edge) < 0.01
            assert abs(float(steps[:, model.cfg.top_k].min()) + edge) < 0.01
            assert top[r] < plain[r]
    assert centred > 0
    assert {k: v for k, v in top.items() if ".router." not in k} == {
        k: v for k, v in plain.items() if ".router." not in k}
