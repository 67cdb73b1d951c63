"""The profile of a run (:mod:`m3vit.sw.runtime.profile`): phases named from the program,
the trace summed by phase, the table and the timeline, on a compiled ``tiny`` model and
synthetic traces (the hardware trace itself: ``tests/e2e/test_runtime.py``)."""

import functools

import pytest

from m3vit.hw.config import CI
from m3vit.hw.isa import INSTRUCTION_BYTES, Opcode, decode
from m3vit.sw.compiler.executable import compile_executable
from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import get_preset
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.quant.quantize import quantize
from m3vit.sw.runtime.driver import TraceEntry
from m3vit.sw.runtime.profile import (
    PHASES,
    build_profile,
    expert_bodies,
    expert_visits,
    format_profile,
    format_visits,
    instruction_phases,
    save_profile_figure,
)


@functools.cache
def tiny_program() -> bytes:
    return compile_executable(quantize(M3ViT(get_preset("tiny"), seed=0), n_calib=4),
                              CI).program


def test_phases_follow_the_model():
    program = tiny_program()
    ops = [decode(program[i:i + INSTRUCTION_BYTES])[0]
           for i in range(0, len(program), INSTRUCTION_BYTES)]
    phases = instruction_phases(program)
    assert len(phases) == len(ops)
    assert phases[0] == "patch embedding" and phases[-1] == "head"
    # Phases come in the model's order, block after block.
    order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert order[:4] == ["patch embedding", "attention", "dense MLP", "attention"]
    tiny = get_preset("tiny")
    assert order.count("router") == order.count("experts") == len(tiny.moe_blocks)
    assert order.count("attention") == tiny.depth
    # Every EXPERTS loop and its body are "experts", ROUTE is the router's, COMBINE combines.
    for op, phase in zip(ops, phases, strict=True):
        if op == Opcode.EXPERTS:
            assert phase == "experts"
        if op == Opcode.ROUTE:
            assert phase == "router"
        if op == Opcode.COMBINE:
            assert phase == "combine"
        if op == Opcode.SOFTMAX:
            assert phase in ("attention", "router")


def _trace(program: bytes) -> list[TraceEntry]:
    """One entry per instruction, 100 cycles each, 1,000 bytes read per port."""
    n = len(program) // INSTRUCTION_BYTES
    return [TraceEntry(pc, 0x20, 100 * pc, 100 * (pc + 1), (1000, 1000, 1000), 10)
            for pc in range(n)]


def test_profile_sums_the_trace_by_phase(tmp_path):
    program = tiny_program()
    trace = _trace(program)
    cycles = trace[-1].end
    prof = build_profile(trace, program, clock_mhz=300.0, cycles=cycles, n_ports=3,
                         instructions=len(trace) + 5)
    assert list(prof["phases"]) == [p for p in PHASES if p in prof["phases"]]
    assert sum(r["cycles"] for r in prof["phases"].values()) == cycles
    assert sum(r["instructions"] for r in prof["phases"].values()) == len(trace)
    assert prof["hp_ports"] == [0, 1, 3] and prof["peak_gbps"] == 14.15
    assert prof["truncated"]
    row = prof["phases"]["attention"]
    # 1,000 bytes per 100 cycles at 300 MHz: 3 GB/s per port.
    assert row["read_gbps"] == pytest.approx([3.0] * 3)
    assert row["of_peak"] == pytest.approx(9.0 / 14.15)
    text = format_profile(prof, "tiny")
    assert "HP3 GB/s" in text and "experts" in text and "first instructions" in text
    png = save_profile_figure(prof, tmp_path / "t.png")
    assert png.stat().st_size > 1000
    with pytest.raises(M3VitError, match="exists"):
        save_profile_figure(prof, png)


def test_an_empty_trace_is_one_clear_error():
    with pytest.raises(M3VitError, match="trace is empty"):
        build_profile([], tiny_program(), clock_mhz=300.0, cycles=1, n_ports=1)


def test_expert_visits_are_the_passes_of_each_experts_body():
    program = tiny_program()
    bodies = expert_bodies(program)
    assert bodies and all(first <= last for first, last in bodies)
    first, last = bodies[0]
    trace, cycle = [], 0

    def run(pc, span, drain=False):
        nonlocal cycle
        trace.append(TraceEntry(pc, 0x20, cycle, cycle + span, (500, 500, 0), 0, drain))
        cycle += span

    run(first - 1, 10)                       # the EXPERTS instruction itself: no visit
    for span in (100, 300, 200):             # three visits of the body
        for pc in range(first, last + 1):
            run(pc, span)
        run(last, 7, drain=True)             # the last GEMM's tail belongs to its visit
    run(last + 1, 50)                        # COMBINE: ends the loop
    visits = expert_visits(trace, program)
    body = last - first + 1
    assert [v["cycles"] for v in visits] == [body * s + 7 for s in (100, 300, 200)]
    assert all(v["layer"] == 0 and v["read_bytes"] == 1000 * (body + 1) for v in visits)
    prof = build_profile(trace, program, clock_mhz=300.0, cycles=cycle, n_ports=3)
    text = format_visits(prof)
    # Least, median and most cycles of the layer's three visits.
    least, median, most = (body * s + 7 for s in (100, 200, 300))
    assert f"{'MoE layer 0':<16} {3:>6} {least:>7,} {median:>7,} {most:>7,}" in text
    assert text in format_profile(prof)
