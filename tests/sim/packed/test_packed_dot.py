"""cocotb bench for :class:`m3vit.hw.packed.PackedArray` (two INT8 products per DSP).

Run by ``tests/sim/test_packed.py``; not a pytest module. Each instance of the bench top
(``p<rows>x<pairs>x<chain>``) gets random vectors and tiles, the extremes (−128 × −128 in
every lane, and the other corners) and tile loads between back-to-back vectors; under the
``random`` flow vectors come with gaps, under ``free`` every cycle. Outside the cycles in
which the array takes a tile (the load and the ``chain − 1`` after it) the weight port
holds random garbage, which must not matter. Every output is checked against Python
integers, in order, and on the exact cycle: ``latency`` after its vector.
"""

import cocotb
from cocotb.triggers import FallingEdge

from m3vit.hw.packed import PackedArray
from m3vit.sim.stream_tb import Bench

SHAPES = [(32, 2, 4, 2), (14, 1, 7, 1), (3, 2, 1, 3)]
FLOWS = ["free", "random"]
CORNERS = [-128, 127, -1, 0]


def _pack(values: list[int], bits: int = 8) -> int:
    mask = (1 << bits) - 1
    return sum((v & mask) << (bits * i) for i, v in enumerate(values))


class Unit:
    """One instance's ports, its tile and its expected outputs."""

    def __init__(self, bench: Bench, rows: int, pairs: int, chain: int, group: int):
        dut, name = bench.dut, f"p{rows}x{pairs}x{chain}"
        self.bench, self.rows, self.cols, self.chain = bench, rows, 2 * pairs, chain
        unit = PackedArray(rows, pairs, chain, group)
        self.position = [unit.position(r) for r in range(rows)]
        self.latency, self.sum_bits = unit.latency, unit.sum_bits
        self.port = {p: getattr(dut, f"{name}__{p}")
                     for p in ("x", "x_valid", "w", "load", "y", "y_valid")}
        self.tile = [[0] * self.cols for _ in range(rows)]
        self.garbage = bench.rng()

    def random_tile(self, rng) -> list[list[int]]:
        return [[rng.randint(-128, 127) for _ in range(self.cols)] for _ in range(self.rows)]

    def _outputs(self) -> list[int]:
        raw = int(self.port["y"].value)
        mask, half = (1 << self.sum_bits) - 1, 1 << (self.sum_bits - 1)
        out = []
        for c in range(self.cols):
            v = (raw >> (self.sum_bits * c)) & mask
            out.append(v - (1 << self.sum_bits) if v & half else v)
        return out

    async def run(self, steps: list) -> None:
        """``steps``: ("load", tile[, vector]), ("x", vector) or ("idle",); checks every
        output. A vector given with a load enters in the load's cycle (as the GEMM engine
        swaps tiles with a slice's first token) and sees the new tile."""
        port, edge = self.port, self.bench.edge
        fall = FallingEdge(self.bench.dut.clk)
        expected = {}  # cycle → column sums
        cycle = 0  # inputs are driven, and outputs read, at the falling edge in a cycle
        hold_until = [-1] * self.rows  # the last cycle each row must still hold the tile
        last_load = None
        assert next(s for s in steps if s[0] != "idle")[0] == "load", \
            "the array keeps its tile through reset: load one first"
        await fall
        for step in steps + [("idle",)] * (self.latency + 2):
            port["x_valid"].value = 0
            port["load"].value = 0
            if step[0] == "load":
                assert last_load is None or cycle - last_load >= self.chain, \
                    "the bench broke the contract: loads closer than chain cycles"
                last_load = cycle
                self.tile = step[1]
                port["load"].value = 1
                hold_until = [cycle + k for k in self.position]
            # Each row holds its tile through the cycle its chain position takes it, and is
            # garbage after (as a loader refilling the shadow tile in row order makes it).
            port["w"].value = _pack([
                v for r, row in enumerate(self.tile)
                for v in (row if cycle <= hold_until[r]
                          else [self.garbage.randint(-128, 127) for _ in row])])
            x = step[1] if step[0] == "x" else step[2] if len(step) > 2 else None
            if x is not None:
                port["x"].value = _pack(x)
                port["x_valid"].value = 1
                expected[cycle + self.latency] = [
                    sum(x[r] * self.tile[r][c] for r in range(self.rows))
                    for c in range(self.cols)]
            await edge
            await fall
            cycle += 1
            want = expected.pop(cycle, None)
            got_valid = int(port["y_valid"].value)
            assert got_valid == (want is not None), f"cycle {cycle}: y_valid {got_valid}"
            if want is not None:
                got = self._outputs()
                assert got == want, f"cycle {cycle}: {got} != {want}"
        assert not expected


def random_steps(unit: Unit, rng, count: int, gaps: bool) -> list:
    steps = []
    for i in range(count):
        if i and i % 17 == 0:
            steps += [("idle",)] * unit.chain  # loads are chain cycles apart at least
        if i % 17 == 0:
            steps.append(("load", unit.random_tile(rng)))
        if gaps and rng.random() < 0.3:
            steps.append(("idle",))
        steps.append(("x", [rng.randint(-128, 127) for _ in range(unit.rows)]))
    return steps


def corner_steps(unit: Unit) -> list:
    """Every corner value in every lane of x and of both halves of the tile (−128 × −128
    everywhere too), and vectors of mixed signs along the chains."""
    steps = []
    half = unit.cols // 2
    for hi in CORNERS:
        for lo in CORNERS:
            steps.append(("load", [[lo] * half + [hi] * half for _ in range(unit.rows)]))
            steps += [("x", [x] * unit.rows) for x in CORNERS]
            steps.append(("x", [(-128 if r % 2 else 127) for r in range(unit.rows)]))
            steps += [("idle",)] * unit.chain  # the next load no closer than the contract
    return steps


async def _unit(dut, shape) -> Unit:
    bench = Bench(dut)
    for rows, pairs, chain, _ in SHAPES:  # an earlier failed test may have left them high
        for port in ("x_valid", "load"):
            getattr(dut, f"p{rows}x{pairs}x{chain}__{port}").value = 0
    await bench.reset()
    return Unit(bench, *shape)


@cocotb.parametrize(flow=FLOWS, shape=SHAPES)
async def test_random_vectors(dut, flow, shape):
    """Random tiles and vectors, a new tile every 17 vectors."""
    unit = await _unit(dut, shape)
    await unit.run(random_steps(unit, unit.bench.rng(), 300, flow == "random"))


@cocotb.parametrize(flow=FLOWS, shape=SHAPES)
async def test_extremes(dut, flow, shape):
    """−128 × −128 in every lane and the other corners, back to back or with gaps."""
    unit = await _unit(dut, shape)
    steps = corner_steps(unit)
    if flow == "random":
        rng = unit.bench.rng()
        steps = [s for step in steps
                 for s in ([("idle",)] if rng.random() < 0.3 else []) + [step]]
    await unit.run(steps)


@cocotb.parametrize(flow=FLOWS, shape=SHAPES)
async def test_tile_loads_between_back_to_back_vectors(dut, flow, shape):
    """A load between two vectors: the one before sees the old tile along the whole chain,
    the one after the new; loads as close as allowed (``chain`` cycles apart). Random
    flow: some of the vectors between loads are gaps."""
    unit = await _unit(dut, shape)
    rng = unit.bench.rng()
    steps = [("load", unit.random_tile(rng))] + [("idle",)] * (unit.chain - 1)
    for _ in range(40):
        x = [rng.randint(-128, 127) for _ in range(unit.rows)]
        steps.append(("x", x))
        # Half the loads come with a vector, which sees the new tile.
        steps.append(("load", unit.random_tile(rng)) + ((x,) if rng.random() < 0.5 else ()))
        for _ in range(unit.chain - 1):
            gap = flow == "random" and rng.random() < 0.5
            steps.append(("idle",) if gap else
                         ("x", [rng.randint(-128, 127) for _ in range(unit.rows)]))
    await unit.run(steps)
