"""The analytic cycle model: its bookkeeping, its routing and ``m3vit estimate``.

Its error against the SoC model is checked in ``tests/e2e/test_runtime.py`` (small cases)
and ``make bench`` (``edge-moe``).
"""

import functools

import pytest

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.registers import Schedule
from m3vit.sw.cli import main
from m3vit.sw.compiler.estimate import (
    CostModel,
    estimate_package,
    estimate_program,
    format_estimate,
    uniform_routing,
)
from m3vit.sw.compiler.executable import compile_executable
from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import get_preset
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.model.train import scenes_for
from m3vit.sw.quant.package import save_package
from m3vit.sw.quant.quantize import quantize


@functools.cache
def tiny16():
    pkg = quantize(M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0), n_calib=4)
    return pkg, compile_executable(pkg, CI, max_batch=4)


def test_uniform_routing_shares_every_choice():
    layers = uniform_routing(n_tokens=17, n_experts=4, top_k=2, batch=3, layers=2)
    assert len(layers) == 2 and all(len(images) == 3 for images in layers)
    assert layers[0][0] == [9, 9, 8, 8] and sum(layers[1][2]) == 34


def test_phases_add_up_and_batches_cost_more_per_run_less_per_image():
    pkg, exe = tiny16()
    images = scenes_for(exe.model, 4, seed=3)["image"]
    runs = {b: estimate_package(pkg, exe, batch=b, images=images) for b in (1, 2, 4)}
    for result in runs.values():
        assert result["routing"] == "golden"
        assert sum(p["cycles"] for p in result["phases"].values()) == \
            pytest.approx(result["cycles"])
        assert set(result["phases"]) >= {"attention", "experts", "head"}
    assert runs[1]["cycles"] < runs[2]["cycles"] < runs[4]["cycles"]
    assert runs[4]["per_image"] < runs[1]["per_image"]
    # Token by token reads an expert's weights per choice: many more cycles.
    tbt = estimate_package(pkg, exe, batch=1, images=images,
                           schedule=Schedule.TOKEN_BY_TOKEN)
    assert tbt["phases"]["experts"]["cycles"] > 2 * runs[1]["phases"]["experts"]["cycles"]
    text = format_estimate(runs[2], "title")
    assert "experts" in text and "an image" in text and "routing: golden" in text


def test_without_the_package_the_routing_is_assumed_uniform():
    _, exe = tiny16()
    result = estimate_package(None, exe, batch=2)
    assert result["routing"] == "uniform" and result["cycles"] > 0


def test_an_moe_program_needs_its_routing():
    _, exe = tiny16()
    with pytest.raises(M3VitError, match="EXPERTS loop and the routing has 0 layer"):
        estimate_program(exe.program, CI)


@pytest.mark.parametrize("config", [CI, ZCU104], ids=["ci", "zcu104"])
def test_a_gemm_starts_beside_the_one_before_unless_it_reads_its_last_results(config):
    from m3vit.sw.bench.programs import (
        GEMM_CHAIN_HAZARDS,
        SOFTMAX_HAZARDS,
        gemm_chain_case,
        softmax_overlap_case,
    )

    chain = {h: estimate_program(gemm_chain_case(config, 0, h).program, config)["cycles"]
             for h in GEMM_CHAIN_HAZARDS}
    # A write over the first's inputs is no hazard for the reads; the first's results
    # leave N-tile by N-tile (tokens = their stride), so reads of its first N-tile start
    # beside it, and a read of its last N-tile (however few words) waits for it.
    assert chain["writes_inputs"] == chain["none"] == chain["reads_results"]
    assert chain["weights_are_results"] >= chain["none"]
    assert chain["touches_last_result"] > chain["none"]
    # After a background softmax, a GEMM touching its ranges waits for it; one that does
    # not runs beside it.
    soft = {h: estimate_program(softmax_overlap_case(config, 0, h).program, config)["cycles"]
            for h in SOFTMAX_HAZARDS}
    for hazard in SOFTMAX_HAZARDS[1:]:
        assert soft[hazard] > soft["none"], hazard


def test_cost_model_is_fitted_per_array_depth():
    ci, zcu = CostModel.for_config(CI), CostModel.for_config(ZCU104)
    assert (ci.gemm_fill, zcu.gemm_fill) == (132, 205)
    assert ci.gemm_fill < CostModel.for_config(ZCU104.replace(pe_rows=16, pe_cols=16)
                                               ).gemm_fill < zcu.gemm_fill


def test_estimate_cli(tmp_path, capsys):
    pkg, _ = tiny16()
    m3q = save_package(tmp_path / "t16.m3q", pkg)
    assert main(["estimate", str(m3q), "--config", "ci", "--batch", "2", "--json",
                 str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "estimated:" in out and "batch of 2" in out and "routing: golden" in out
    assert (tmp_path / "e.json").stat().st_size > 100
    assert main(["compile", str(m3q), "--config", "ci"]) == 0
    capsys.readouterr()
    m3x = tmp_path / "t16.ci.m3x"
    assert main(["estimate", str(m3x), "--schedule", "token"]) == 0
    assert "routing: uniform" in capsys.readouterr().out
    for argv, message in ((["estimate", str(m3q), "--config", "ci", "--batch", "5"],
                           "use --batch 4"),
                          (["estimate", str(m3x), "--config", "ci"], "leave it out"),
                          (["estimate", str(m3x), "--batch", "9"], "is not in 1…4")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def test_expert_bytes_come_from_the_routing_where_the_trace_is_cut_short():
    from m3vit.hw.isa import Opcode
    from m3vit.hw.registers import TRACE_DEPTH
    from m3vit.sw.bench.throughput import _expert_read_bytes, markdown
    from m3vit.sw.compiler.phases import decode_all
    from m3vit.sw.runtime.driver import TraceEntry

    _, exe = tiny16()
    program = exe.program_for(1)
    ops = decode_all(program)
    trace = [TraceEntry(pc=pc, opcode=op.value, start=pc, end=pc + 1, read_bytes=(100,),
                        write_bytes=0, drain=False) for pc, (op, _) in enumerate(ops)]
    body_gemms = sum(op == Opcode.GEMM and f["expert"] for op, f in ops)
    assert body_gemms == 4     # FC1 and FC2 of tiny's two MoE layers
    # A whole trace: the body GEMMs' reads; one entry short of the run: none.
    assert _expert_read_bytes(trace, program, len(ops) - 1) == 100 * body_gemms
    assert _expert_read_bytes(trace, program, len(ops)) is None
    row = {"task": "semseg", "batch": 4, "cycles": 8, "per_image": 2, "ms_per_image": 0.0,
           "images_per_s": 1, "read_per_image": 1e6, "expert_per_image": 5e5, "exact": True}
    table = {"rows": [dict(row, expert_from="trace")], "refused": {}}
    assert "¹" not in markdown(table)
    table["rows"].append(dict(row, expert_from="routing"))
    assert "0.50 MB ¹ |" in markdown(table) and f"first {TRACE_DEPTH:,} entries" in markdown(table)
