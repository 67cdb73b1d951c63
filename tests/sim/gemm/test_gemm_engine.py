# amaranth: UnusedElaboratable=no
"""cocotb bench for :class:`m3vit.hw.gemm.GemmEngine`, bit-exact against ``sw.quant.numerics``.

Run by ``tests/sim/test_gemm.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; it is
not a pytest module. One generic test body is expanded over shapes (one token, fewer tokens
than the accumulator hazard distance, ragged M, several K-slices and N-tiles, M =
``max_tokens``), the four output modes (INT8, INT8_TABLE, INT32 and INT16: mode INT8 with
``wide``, results two words per ``pe_cols`` channels), two flows (everything always ready;
random gaps on every input and random back-pressure on the output) and, when ``pe_rows ≤
gemm_cols``, both weight orders (tiles row by row, and column by column: ``transposed``).
Further tests run several passes back to back (table reloads between them; INT16 passes
between passes of every other mode, and ``wide`` ignored outside mode INT8; transposed and
row-order passes alternating), feed parameters and weights from one in-order source, run
``row_scale`` passes (attention's P·V: per-token multipliers and shifts in the last K-slice's
top lanes, different for every N-tile) among passes of every other mode, drop illegal commands
(``row_scale`` ones each on its own) and check that the array takes one token per cycle
when nothing stalls it. On an array with ``pe_rows < 4`` every ``row_scale`` command must
be dropped as illegal. The engine may take several weight rows, parameter records and
table entries a beat (the top's intake): :class:`~m3vit.sw.bench.gemm_tb.TB` reads them off
the DUT's ports and packs the beats to match.
"""

import itertools
import os

import cocotb
from amaranth.hdl import Shape

from m3vit.hw.gemm import GemmEngine
from m3vit.hw.isa import GemmOp
from m3vit.sim.cocotb_runner import CONFIG_ENV, bench_config
from m3vit.sw.bench.gemm_tb import (
    INT8_MAX,
    INT8_MIN,
    INT16_MAX,
    INT16_MIN,
    TB,
    Pass,
    make_pass,
)
from m3vit.sw.quant import numerics

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
#: Output modes as (op, the command's ``wide`` bit): INT16 is mode INT8 with ``wide`` set.
MODES = {"INT8": (GemmOp.INT8, False), "INT8_TABLE": (GemmOp.INT8_TABLE, False),
         "INT32": (GemmOp.INT32, False), "INT16": (GemmOp.INT8, True)}


def column_order() -> bool:
    """Whether the bench's array takes tiles column by column (``pe_rows ≤ gemm_cols``;
    ``False`` while pytest merely collects this)."""
    if CONFIG_ENV not in os.environ:
        return False
    config = bench_config()
    return config.pe_rows <= config.gemm_cols


#: Weight orders of the pass matrix: column by column (``transposed``) needs pe_rows ≤ gemm_cols.
WEIGHT_ORDERS = ["rows", "columns"] if column_order() else ["rows"]


def row_scale_legal() -> bool:
    """Whether the bench's array runs ``row_scale`` passes (``pe_rows ≥ 4``; ``False``
    while pytest merely collects this)."""
    return CONFIG_ENV in os.environ and GemmEngine(bench_config()).row_scale


def assert_int16_reach(gemm: Pass) -> None:
    """An INT16 pass's golden results saturate at both INT16 limits and, unsaturated, leave
    the INT8 range on both sides: an INT8-saturating (or unsaturated) output would differ."""
    expected = gemm.expected()
    assert (expected == INT16_MAX).any() and (expected == INT16_MIN).any(), gemm.name
    inside = expected[(expected > INT16_MIN) & (expected < INT16_MAX)]
    assert (inside > INT8_MAX).any() and (inside < INT8_MIN).any(), gemm.name


def geometry_name(geometry: tuple) -> str:
    """``m17_ks1_nt3`` for 17 tokens, one K-slice, three N-tiles."""
    tokens, k_slices, n_tiles = geometry
    return f"m{tokens}_ks{k_slices}_nt{n_tiles}"


@cocotb.test(timeout_time=2, timeout_unit="ms")
@cocotb.parametrize(
    geometry=[cocotb.Param(g, name=geometry_name(g)) for g in GEOMETRIES],
    mode=[cocotb.Param(mode, name=name) for name, mode in MODES.items()],
    flow=FLOWS,
    weight_order=WEIGHT_ORDERS,
)
async def test_gemm_pass(dut, geometry: tuple, mode: tuple, flow: str,
                         weight_order: str) -> None:
    """One pass of the given geometry, output mode and weight order equals the golden model."""
    tb = TB(dut, gaps=flow == "random", backpressure=flow == "random")
    cfg = tb.config
    tokens, k_slices, n_tiles = geometry
    tokens = cfg.max_tokens if tokens == MAX else tokens
    op, wide = mode
    gemm = make_pass(tb.rng, op, tokens, k_slices * cfg.pe_rows, n_tiles * cfg.gemm_cols,
                     transposed=weight_order == "columns", wide=wide)
    if wide:
        assert_int16_reach(gemm)
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
    are still in the pipeline: the load must wait for them. INT16 passes (two words per
    ``pe_cols`` channels) follow and precede passes of every other mode and each other;
    an INT32 and an INT8_TABLE pass with ``wide`` set run as without it. Counters add up
    over the run.
    """
    tb = TB(dut, gaps=flow == "random", backpressure=flow == "random")
    rows, cols = tb.config.pe_rows, tb.config.gemm_cols
    # (M, K-slices, N-tiles, op, wide)
    plan = [(5, 2, 2, GemmOp.INT8_TABLE, False), (1, 1, 1, GemmOp.INT8_TABLE, False),
            (4, 1, 2, GemmOp.INT8, True), (3, 1, 2, GemmOp.INT32, False),
            (6, 2, 1, GemmOp.INT8, True), (40, 3, 1, GemmOp.INT8, False),
            (7, 1, 3, GemmOp.INT8, True), (9, 1, 3, GemmOp.INT8_TABLE, False),
            (2, 2, 1, GemmOp.INT32, True), (1, 1, 2, GemmOp.INT8, True),
            (3, 2, 1, GemmOp.INT8, True), (2, 1, 1, GemmOp.INT8_TABLE, True)]
    geometries = [(tokens, k_slices, n_tiles) for tokens, k_slices, n_tiles, _, _ in plan]
    passes = [make_pass(tb.rng, op, tokens, k_slices * rows, n_tiles * cols, wide=wide)
              for tokens, k_slices, n_tiles, op, wide in plan]
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
    illegal = [(0, 1, 1, False), (cfg.max_tokens + 1, 1, 1, False), (1, 0, 1, False),
               (1, 1, 0, False), (1, 0, 1, True)]
    if not column_order():
        illegal.append((1, 1, 1, True))  # a tile column must fit in a beat's element
    for tokens, k_slices, n_tiles, transposed in illegal:
        if tokens < 2 ** token_field.width:
            tb.command.beats.append(
                tb.command_beat(GemmOp.INT8, tokens, k_slices, n_tiles, transposed))
    assert not dut.illegal_command.value
    gemm = make_pass(tb.rng, GemmOp.INT8, 7, 2 * cfg.pe_rows, cfg.gemm_cols)
    await tb.run_passes([gemm])
    assert dut.illegal_command.value, "illegal commands were not flagged"
    assert tb.counters()["token_beats"] == 7 * 2


@cocotb.test(timeout_time=1, timeout_unit="ms")
async def test_one_token_per_cycle(dut) -> None:
    """With every stream ready, the array takes a token every cycle across slices and tiles.

    M > pe_rows, so each next weight tile (pe_rows / rows_per_beat beats, one a cycle) loads
    while the current one computes; the only waits allowed are for the very first tile.
    """
    tb = TB(dut, gaps=False, backpressure=False)
    cfg = tb.config
    tokens = max(cfg.pe_rows, 2 * GemmEngine(cfg).hazard_cycles) + 3
    gemm = make_pass(tb.rng, GemmOp.INT8, tokens, 3 * cfg.pe_rows, 2 * cfg.gemm_cols)
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


@cocotb.test(timeout_time=2, timeout_unit="ms")
@cocotb.parametrize(flow=FLOWS)
async def test_transposed_and_row_passes_back_to_back(dut, flow: str) -> None:
    """Passes alternate between the two weight orders with no drain between them.

    Each pass's first weight tile loads while the previous pass's last tile computes, so
    the shadow tile is filled in the order of a pass the array has not started yet: a row
    pass followed by a transposed one, a transposed one followed by a row pass, and two
    transposed ones. With every stream ready that overlap is checked, not only the results.
    With pe_rows > gemm_cols the transposed commands are illegal: dropped, taking no data,
    while the passes around them run exactly.
    """
    tb = TB(dut, gaps=flow == "random", backpressure=flow == "random")
    rows, cols = tb.config.pe_rows, tb.config.gemm_cols
    # (M, K-slices, N-tiles, transposed, mode); only the first pass uses (and loads) the
    # table, so that no table load sits between two passes.
    plan = [(9, 2, 2, False, "INT8_TABLE"), (7, 1, 2, True, "INT16"),
            (1, 1, 1, True, "INT32"), (6, 3, 1, True, "INT8"),
            (8, 1, 2, False, "INT16"), (2, 2, 3, True, "INT32"),
            (5, 1, 1, False, "INT8"), (3, 2, 2, True, "INT16")]
    columns = column_order()
    passes, legal = [], []
    for tokens, k_slices, n_tiles, transposed, mode in plan:
        op, wide = MODES[mode]
        if transposed and not columns:
            tb.command.beats.append(
                tb.command_beat(op, tokens, k_slices, n_tiles, transposed=True, wide=wide))
            continue
        gemm = make_pass(tb.rng, op, tokens, k_slices * rows, n_tiles * cols,
                         transposed=transposed, wide=wide)
        # Index of the pass's first weight beat, and of its last token.
        first_weight = len(tb.weights.beats)
        tb.queue_pass(gemm)
        passes.append(gemm)
        legal.append((first_weight, len(tb.activations.beats) - 1, tokens))
    await tb.reset()
    await tb.run_queued(passes)

    assert bool(dut.illegal_command.value) == (not columns)
    if flow == "free":
        weights, tokens_in = tb.weights.taken_cycles, tb.activations.taken_cycles
        for (_, last_token, tokens), (first_weight, _, _) in itertools.pairwise(legal):
            if tokens >= rows + 2:  # time for the next tile to start loading
                assert weights[first_weight] < tokens_in[last_token], (
                    f"weights of the pass after token {last_token} did not preload"
                )
    counters = tb.counters()
    assert counters["token_beats"] == sum(
        g.tokens * (g.x.shape[1] // rows) * (g.w.shape[0] // cols) for g in passes)


@cocotb.test(timeout_time=2, timeout_unit="ms")
@cocotb.parametrize(flow=FLOWS)
async def test_interleaved_parameter_and_weight_stream(dut, flow: str) -> None:
    """Parameters and weights from one in-order source neither deadlock nor stop the overlap.

    The source holds, per N-tile, its ``gemm_cols`` parameter records and then its
    ``k_slices`` weight tiles; a record the engine does not take blocks every weight beat
    behind it. The engine takes an N-tile's parameters once the previous N-tile's last slice
    has started, so this must not deadlock for any geometry (one K-slice and one or two
    tokens included), and with every stream ready a pass with enough tokens (and at least
    ``gemm_words`` K-slices) must still take one token per cycle across its N-tiles (the
    next tile's parameters and weights load during the current tile's last slice): the
    least such number of tokens is run.
    """
    tb = TB(dut, gaps=flow == "random", backpressure=flow == "random", interleaved=True)
    rows, cols = tb.config.pe_rows, tb.config.gemm_cols
    # Just enough tokens for a tile's last slice to cover the cycles until the parameter
    # shadow frees (its first token's way to the column sums), then the next tile's
    # parameters and weights, one beat each per cycle (a tile is pe_rows rows or, in
    # column order, gemm_cols columns).
    long = 2 + GemmEngine(tb.config).tree_latency + cols + max(rows, cols) + 1
    # The long passes have at least gemm_words K-slices: with fewer, results (a row is
    # gemm_words words, one a cycle) leave slower than tokens enter and the pass is bound
    # by its output.
    words = tb.config.gemm_words
    # The INT16 passes (two words per pe_cols channels) are short: not timed.
    plan = [(1, 1, 3, "INT8"), (2, 1, 4, "INT32"), (3, 3, 2, "INT8"), (4, 1, 3, "INT16"),
            (long, words, 3, "INT8"), (long, max(2, words), 2, "INT32"),
            (1, 2, 2, "INT16"), (2, 2, 2, "INT8")]
    passes = []
    for index, (tokens, k_slices, n_tiles, mode) in enumerate(plan):
        op, wide = MODES[mode]
        transposed = column_order() and index % 2 == 1
        passes.append(make_pass(tb.rng, op, tokens, k_slices * rows, n_tiles * cols,
                                transposed=transposed, wide=wide))
    spans = []  # (first, last) activation beat of each pass
    for gemm in passes:
        first = len(tb.activations.beats)
        tb.queue_pass(gemm)
        spans.append((first, len(tb.activations.beats) - 1))
    await tb.reset()
    await tb.run_queued(passes)

    assert tb.shared.position == len(tb.shared.order)
    if flow == "free":
        taken = tb.activations.taken_cycles
        for gemm, (first, last) in zip(passes, spans, strict=True):
            if gemm.tokens == long:
                assert taken[last] - taken[first] == last - first, (
                    f"{gemm.name}: {last - first + 1} tokens took "
                    f"{taken[last] - taken[first] + 1} cycles"
                )
    assert not dut.illegal_command.value


@cocotb.test(timeout_time=3, timeout_unit="ms")
@cocotb.parametrize(flow=FLOWS)
async def test_row_scale_passes(dut, flow: str) -> None:
    """``row_scale`` passes among passes of every other mode, back to back, equal the golden
    model: each token's results requantized with the scale its last K-slice of that N-tile
    carried in its top three lanes, which count as 0 in the sums.

    One-token passes of several N-tiles bring an N-tile's scales while the rows of the
    N-tiles before are still in the pipeline; two such passes follow each other. In a
    two-token pass the activations pause before N-tile 1's last token, long enough for
    N-tile 2's parameters and weights to load: N-tile 2 then follows at once, its scales
    in the pipeline right behind that last token's. A row_scale pass follows and precedes
    every other mode (table loads included). Scales include M = 0, 1, 65535 and shifts 0,
    62 and 63, the shift lane's top bits (ignored) are random, the parameters' mult and
    shift differ from the scales. With every stream ready, a row_scale pass's last slices
    take a token a cycle, as any pass's: the scales cost no beat. With pe_rows < 4 the
    row_scale commands are dropped as illegal, taking no data, while the others run.
    """
    tb = TB(dut, gaps=flow == "random", backpressure=flow == "random")
    rows, cols, max_tokens = tb.config.pe_rows, tb.config.gemm_cols, tb.config.max_tokens
    legal_scale = row_scale_legal()
    # (M, K-slices, N-tiles, mode, transposed when the array allows it); ROW is row_scale.
    plan = [(rows + 3, 1, 2, "ROW", False), (1, 1, 3, "ROW", False), (1, 1, 2, "ROW", False),
            (4, 1, 2, "INT16", False), (9, 2, 3, "ROW", True), (3, 2, 1, "INT32", False),
            (max_tokens, 1, 1, "ROW", False), (5, 1, 2, "INT8", False),
            (2, 3, 2, "ROW", False), (6, 1, 1, "INT8_TABLE", False),
            (17, 2, 2, "ROW", True), (2, 1, 4, "ROW", False), (3, 1, 1, "INT16", False)]
    # The two-token pass's pause: N-tile 2's parameters (gemm_cols beats) load only once
    # N-tile 1's last slice has reached the column sums.
    paused, pause = len(plan) - 2, GemmEngine(tb.config).result_latency + cols
    passes, spans = [], []
    for index, (tokens, k_slices, n_tiles, mode, transposed) in enumerate(plan):
        transposed &= column_order()
        if mode == "ROW" and not legal_scale:
            tb.command.beats.append(tb.command_beat(GemmOp.INT8, tokens, k_slices, n_tiles,
                                                    transposed, row_scale=True))
            continue
        op, wide = MODES.get(mode, (GemmOp.INT8, False))
        gemm = make_pass(tb.rng, op, tokens, k_slices * rows, n_tiles * cols,
                         transposed=transposed, wide=wide,
                         row_scale_tiles=n_tiles if mode == "ROW" else 0)
        if gemm.row_scale and tokens * n_tiles >= 6:
            # The scales must take effect: the parameters' requantization differs.
            assert (gemm.expected() != numerics.linear(gemm.x, gemm.w, gemm.bias, gemm.mult,
                                                       gemm.shift)).any(), gemm.name
        spans.append(len(tb.activations.beats))
        if index == paused:
            # N-tile 1's second token: after N-tile 0's beats and N-tile 1's first token.
            assert (tokens, k_slices) == (2, 1) and n_tiles >= 4
            tb.activations.pauses[spans[-1] + k_slices * tokens + 1] = pause
        tb.queue_pass(gemm)
        passes.append(gemm)
    await tb.reset()
    await tb.run_queued(passes)

    assert bool(dut.illegal_command.value) == (not legal_scale)
    counters = tb.counters()
    geometry = [(g.tokens, g.x.shape[1] // rows, g.w.shape[0] // cols) for g in passes]
    assert counters["token_beats"] == sum(m * ks * nt for m, ks, nt in geometry)
    assert counters["weight_tiles"] == sum(ks * nt for _, ks, nt in geometry)
    if flow == "random":
        assert tb.output_stall_cycles > 0, "back-pressure requested but never applied"
    elif legal_scale:
        taken = tb.activations.taken_cycles
        for index, (gemm, first, (tokens, k_slices, n_tiles)) in enumerate(
                zip(passes, spans, geometry, strict=True)):
            # (The paused pass waits by design.)
            for j in range(n_tiles if gemm.row_scale and index != paused else 0):
                start = first + (j * k_slices + k_slices - 1) * tokens
                assert taken[start + tokens - 1] - taken[start] == tokens - 1, (
                    f"{gemm.name}: N-tile {j}'s last slice was not taken a token a cycle")
    await tb.edge
    assert not dut.busy.value, "engine still busy after its last result"


@cocotb.test(timeout_time=1, timeout_unit="ms")
async def test_illegal_row_scale_commands(dut) -> None:
    """``row_scale`` with mode INT32 or INT8_TABLE, or with ``wide``, or at all on an array
    with pe_rows < 4, is dropped: each sets ``illegal_command`` on its own (a reset between
    them) and takes none of the data of the plain INT8 pass behind it."""
    tb = TB(dut, gaps=False, backpressure=False)
    cfg = tb.config
    cases = [(GemmOp.INT32, False), (GemmOp.INT8, True), (GemmOp.INT8_TABLE, False),
             (GemmOp.INT32, True)]
    if not row_scale_legal():
        cases.append((GemmOp.INT8, False))
    for op, wide in cases:
        await tb.reset()
        tb.command.beats.append(tb.command_beat(op, 3, 1, 2, wide=wide, row_scale=True))
        gemm = make_pass(tb.rng, GemmOp.INT8, 3, cfg.pe_rows, cfg.gemm_cols)
        await tb.run_passes([gemm])
        name = f"row_scale with {op.name}" + (" and wide" if wide else "")
        assert dut.illegal_command.value, f"{name} was not flagged"
        assert tb.counters()["token_beats"] == 3, f"{name} took data"
