"""cocotb bench for :class:`m3vit.hw.engine.Engine`: programs in, DDR bytes out, bit-exact.

Run by ``tests/sim/test_top.py``; not a pytest module. The bench
(:class:`m3vit.sim.engine_tb.EngineBench`) plays the two DMA engines in Python on the
engine's ``rd_*``/``wr_*`` streams (random gaps on read data, random back-pressure on
commands and write data, a random write-response delay), so the controller, the address
generators, the buffer and the units are checked on their own; the AXI side is checked by
the DMA bench. Expected DDR contents come from the instruction model
(``m3vit.sw.compiler.isa_model``) or, for the dense block, from the golden model.
"""

import cocotb

from m3vit.hw.isa import GemmMode, Opcode, WeightSource
from m3vit.sim.engine_tb import EngineBench
from m3vit.sim.stream_tb import Bench
from m3vit.sw.bench.programs import (
    GEMM_CHAIN_HAZARDS,
    SOFTMAX_HAZARDS,
    attention_case,
    bad_program_cases,
    dense_block_case,
    embedding_head_case,
    gemm_case,
    gemm_chain_case,
    model_stop,
    random_gemm_cases,
    softmax_overlap_case,
    strided_load_store_case,
    task_select_case,
    vector_case,
)

FLOWS = ["free", "random"]


def _seed(bench: Bench) -> int:
    return bench.rng().getrandbits(32)


@cocotb.parametrize(flow=FLOWS)
async def test_gemm_programs(dut, flow):
    """Random GEMM shapes, modes and weight sources (DDR, buffer rows, buffer columns)."""
    tb = EngineBench(dut, flow)
    await tb.reset()
    for case in random_gemm_cases(tb.cfg, _seed(tb), 10):
        await tb.check(case)
    # A residual add in the output stage, in place, on a full and a one-token pass.
    seed = _seed(tb)
    for tokens, mode in ((tb.cfg.max_tokens, GemmMode.INT8), (1, GemmMode.INT8_TABLE)):
        await tb.check(gemm_case(tb.cfg, seed + tokens, tokens, 2, 2, mode, WeightSource.DDR,
                                 residual=True))
    # Three GEMMs in a row: the second's reads start before the first's last result
    # unless it reads those results (or writes the first's inputs, a later write).
    for i, hazard in enumerate(GEMM_CHAIN_HAZARDS):
        await tb.check(gemm_chain_case(tb.cfg, seed + 20 + i, hazard))
        await tb.check(gemm_chain_case(tb.cfg, seed + 30 + i, hazard, tokens=1, k_slices=1,
                                       n_tiles=1))
    # INT16 results (the router's logits) from each weight source: 2V words a token.
    for i, wsrc in enumerate(WeightSource):
        await tb.check(gemm_case(tb.cfg, seed + 7 + i, 5 + 28 * i, 2, 2, GemmMode.INT16, wsrc))
    # Per-row scales (P·V after a softmax) from each weight source, with a fused residual.
    for i, wsrc in enumerate(WeightSource):
        await tb.check(gemm_case(tb.cfg, seed + 11 + i, 3 + 37 * i, 2, 2, GemmMode.INT8, wsrc,
                                 residual=wsrc == WeightSource.DDR, row_scale=True))


@cocotb.parametrize(flow=FLOWS)
async def test_vector_programs(dut, flow):
    """LayerNorm, softmax (ragged rows) and residual add through the buffer."""
    tb = EngineBench(dut, flow)
    await tb.reset()
    C = tb.cfg.pe_cols
    seed = _seed(tb)
    for i, (op, rows, length) in enumerate([
        (Opcode.LAYERNORM, 5, tb.cfg.max_dim), (Opcode.LAYERNORM, 1, C),
        (Opcode.SOFTMAX, 7, tb.cfg.max_tokens), (Opcode.SOFTMAX, 3, C + 1),
        (Opcode.SOFTMAX, 2, 1), (Opcode.RESIDUAL, 9, 3 * C),
    ]):
        await tb.check(vector_case(tb.cfg, seed + i, op, rows, length))
    await tb.check(strided_load_store_case(tb.cfg, seed))
    # A GEMM right after the (background) softmax: held back on every kind of hazard.
    for i, hazard in enumerate(SOFTMAX_HAZARDS):
        await tb.check(softmax_overlap_case(tb.cfg, seed + i, hazard))


@cocotb.test()
async def test_bad_programs_stop_cleanly(dut):
    """Each bad program stops the RTL with its error code and pc, as it stops the ISA model
    (the checks are declared once, in m3vit.hw.isa_checks); the next good run is correct."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    good = vector_case(tb.cfg, 7, Opcode.RESIDUAL, 3, tb.cfg.pe_cols)
    for case in bad_program_cases(tb.cfg):
        model = model_stop(tb.cfg, case)
        assert model == (case.error, case.error_pc), f"{case.name}: the ISA model {model}"
        await tb.check(case)      # the RTL: the same code at the same pc
        await tb.check(good)


@cocotb.test()
async def test_dense_block(dut):
    """A whole dense ViT block of the ``tiny`` preset, bit-exact against the golden model."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    cycles = await tb.check(dense_block_case(tb.cfg))
    tb.log.info("dense tiny block: %d cycles (%.1f us at %.0f MHz)", cycles,
                cycles / tb.cfg.clock_mhz, tb.cfg.clock_mhz)


@cocotb.test()
async def test_task_select(dut):
    """TASK_SELECT picks a task's per-task weights in one program; different results."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    outputs = set()
    for task in (0, 2, 1, 0):
        case = task_select_case(tb.cfg, 11, task)
        await tb.check(case)
        outputs.add(case.expected)
    assert len(outputs) == 3, "tasks did not select different weights"


@cocotb.test()
async def test_attention(dut):
    """Multi-head attention of a ``tiny`` block, heads and projection against golden."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    await tb.check(attention_case(tb.cfg))


@cocotb.test()
async def test_embedding_and_head(dut):
    """Patch embedding, cls and position embedding; final LayerNorm and the INT32 task head."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    await tb.check(embedding_head_case(tb.cfg))

