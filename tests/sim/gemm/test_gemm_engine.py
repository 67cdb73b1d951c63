# amaranth: UnusedElaboratable=no
"""cocotb bench for :class:`m3vit.hw.gemm.GemmEngine`, bit-exact against ``m3vit.sw.numerics``.

Run by ``tests/sim/test_gemm.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; it is
not a pytest module. One generic test body is expanded over shapes (one token, fewer tokens
than the accumulator hazard distance, ragged M, several K-slices and N-tiles, M =
``max_tokens``), the three output modes and two flows (everything always ready; random
gaps on every input and random back-pressure on the output). Further tests run several
passes back to back (table reloads between them), drop illegal commands and check that the
array takes one token per cycle when nothing stalls it.
"""

import cocotb
from amaranth.hdl import Shape
from gemm_tb import TB, make_pass

from m3vit.hw.gemm import GemmEngine, GemmOp

#: Single-pass geometries as (M, K-slices, N-tiles), so that the module imports without the
#: configuration (pytest collects it too); ``MAX`` stands for ``max_tokens``.
MAX = "max"
GEOMETRIES = [
    (1, 1, 1),
    # Fewer tokens than the accumulator hazard distance (with pe_rows = 2 only: a larger
    # weight tile takes longer to load than the hazard): one token over two slices; two
    # tokens, one slice per N-tile so that parameters change tile after tile; three tokens.
    (1, 2, 2),
    (2, 1, 3),
    (3, 3, 1),
    (17, 1, 3),
    (33, 2, 2),
    (65, 4, 2),
    (MAX, 1, 1),
]
FLOWS = ["free", "random"]


def geometry_name(geometry: tuple) -> str:
    """``m17_ks1_nt3`` for 17 tokens, one K-slice, three N-tiles."""
    tokens, k_slices, n_tiles = geometry
    return f"m{tokens}_ks{k_slices}_nt{n_tiles}"


@cocotb.test(timeout_time=2, timeout_unit="ms")
@cocotb.parametrize(
    geometry=[cocotb.Param(g, name=geometry_name(g)) for g in GEOMETRIES],
    mode=[GemmOp.INT8, GemmOp.INT8_TABLE, GemmOp.INT32],
    flow=FLOWS,
)
async def test_gemm_pass(dut, geometry: tuple, mode: GemmOp, flow: str) -> None:
    """One pass of the given geometry and output mode equals the golden model exactly."""
    tb = TB(dut, gaps=flow == "random", backpressure=flow == "random")
    cfg = tb.config
    tokens, k_slices, n_tiles = geometry
    tokens = cfg.max_tokens if tokens == MAX else tokens
    gemm = make_pass(tb.rng, mode, tokens, k_slices * cfg.pe_rows, n_tiles * cfg.pe_cols)
    await tb.reset()
    await tb.run_passes([gemm])

    counters = tb.counters()
    assert counters["token_beats"] == tokens * k_slices * n_tiles
    assert counters["weight_tiles"] == k_slices * n_tiles
    if flow == "random" and tokens * n_tiles >= 16:
        # The options must have taken effect, or this variant tested nothing new.
        assert tb.activations.idle_cycles > 0, "gaps requested but none inserted"
        assert tb.output_stall_cycles > 0, "back-pressure requested but never applied"
    assert not dut.illegal_command.value


@cocotb.test(timeout_time=4, timeout_unit="ms")
@cocotb.parametrize(flow=FLOWS)
async def test_back_to_back_passes(dut, flow: str) -> None:
    """Passes of every mode and shape follow each other with no drain, tables reloaded.

    The second pass loads a new table while results of the first, which used the old one,
    are still in the pipeline: the load must wait for them. Counters add up over the run.
    """
    tb = TB(dut, gaps=flow == "random", backpressure=flow == "random")
    rows, cols = tb.config.pe_rows, tb.config.pe_cols
    geometries = [(5, 2, 2), (1, 1, 1), (3, 1, 2), (40, 3, 1), (9, 1, 3), (2, 2, 1)]
    modes = [GemmOp.INT8_TABLE, GemmOp.INT8_TABLE, GemmOp.INT32, GemmOp.INT8,
             GemmOp.INT8_TABLE, GemmOp.INT32]
    passes = [make_pass(tb.rng, mode, tokens, k_slices * rows, n_tiles * cols)
              for mode, (tokens, k_slices, n_tiles) in zip(modes, geometries, strict=True)]
    # Half the first pass's channels output q = 0, i.e. table[0], the first entry the second
    # pass's table load overwrites: a load that does not wait changes those results.
    passes[0].mult[::2] = 0
    passes[1].table[0] = passes[0].table[0] ^ -1  # the bitwise complement: always different
    await tb.reset()
    await tb.run_passes(passes)

    counters = tb.counters()
    assert counters["token_beats"] == sum(m * ks * nt for m, ks, nt in geometries)
    assert counters["weight_tiles"] == sum(ks * nt for _, ks, nt in geometries)
    assert 0 < counters["busy_cycles"] <= tb.cycle
    if flow == "random":
        assert tb.output_stall_cycles > 0, "back-pressure requested but never applied"
    await tb.edge
    assert not dut.busy.value, "engine still busy after its last result"
    assert not dut.illegal_command.value


@cocotb.test(timeout_time=1, timeout_unit="ms")
async def test_illegal_commands_are_dropped(dut) -> None:
    """Zero or over-capacity geometry sets ``illegal_command`` and takes no data."""
    tb = TB(dut, gaps=False, backpressure=False)
    cfg = tb.config
    await tb.reset()
    # The tokens field is just wide enough for max_tokens; max_tokens + 1 is sendable unless
    # max_tokens = 2^n - 1 (then it cannot occur at all).
    token_field = Shape.cast(tb.layouts.command["tokens"].shape)
    for tokens, k_slices, n_tiles in [(0, 1, 1), (cfg.max_tokens + 1, 1, 1), (1, 0, 1),
                                      (1, 1, 0)]:
        if tokens < 2 ** token_field.width:
            tb.command.beats.append(tb.command_beat(GemmOp.INT8, tokens, k_slices, n_tiles))
    assert not dut.illegal_command.value
    gemm = make_pass(tb.rng, GemmOp.INT8, 7, 2 * cfg.pe_rows, cfg.pe_cols)
    await tb.run_passes([gemm])
    assert dut.illegal_command.value, "illegal commands were not flagged"
    assert tb.counters()["token_beats"] == 7 * 2


@cocotb.test(timeout_time=1, timeout_unit="ms")
async def test_one_token_per_cycle(dut) -> None:
    """With every stream ready, the array takes a token every cycle across slices and tiles.

    M > pe_rows, so each next weight tile (pe_rows beats at one per cycle) loads while the
    current one computes; the only waits allowed are for the very first tile.
    """
    tb = TB(dut, gaps=False, backpressure=False)
    cfg = tb.config
    tokens = max(cfg.pe_rows, 2 * GemmEngine(cfg).hazard_cycles) + 3
    gemm = make_pass(tb.rng, GemmOp.INT8, tokens, 3 * cfg.pe_rows, 2 * cfg.pe_cols)
    await tb.reset()
    await tb.run_passes([gemm])

    taken = tb.activations.taken_cycles
    assert taken[-1] - taken[0] + 1 == len(taken), (
        f"{len(taken)} tokens took {taken[-1] - taken[0] + 1} cycles"
    )
    counters = tb.counters()
    assert counters["weight_stall_cycles"] <= cfg.pe_rows + 2
    assert counters["output_stall_cycles"] == 0
    assert counters["param_stall_cycles"] == 0
