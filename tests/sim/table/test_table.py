"""cocotb bench for :class:`m3vit.hw.vector.TableLookup` (ports ``tab__*`` of the bench top).

Run by ``tests/sim/test_vector.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; not a
pytest module. One generic test body is expanded over the data case and the flow options.
Each case is a list of groups: a full table write, then a burst of beats, checked against
:func:`m3vit.sw.quant.numerics.table_lookup` with that group's table. Under back-pressure the next
table is written while the previous group's beats still wait in the block, which must not
change them (a beat sees the table as it stood when the beat was accepted); the ``rewrite``
case writes entries while beats stream and checks each beat against the table as the DUT
had it on the beat's accept cycle.
"""

import itertools
from dataclasses import dataclass, field

import cocotb
import torch

from m3vit.hw.vector import TableLookup, row_beat_layout
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.stream_tb import Bench, StreamSink, StreamSource, check_stream_block, expand, pack
from m3vit.sw.quant import numerics

PREFIX = "tab"
INT8_MIN, INT8_MAX = -128, 127
FILL_CYCLES_MAX = 5  # first beat in to last beat out, beyond one per beat (measured 3)


@dataclass
class Group:
    table: list[int]  # 256 INT8 entries
    q: torch.Tensor  # (beats, lanes) int64 inputs
    last: list[bool]  # per beat, passed through
    # Writes (index, value) driven while this group's beats stream, instead of before them.
    concurrent_writes: list[tuple[int, int]] = field(default_factory=list)


def gelu_like_table(rng) -> list[int]:
    scale_in, scale_out = rng.uniform(0.01, 0.1), rng.uniform(0.01, 0.1)
    codes = torch.tensor([q if q < 128 else q - 256 for q in range(256)], dtype=torch.float64)
    x = codes * scale_in
    gelu = 0.5 * x * (1 + torch.erf(x / 2**0.5))
    return torch.clamp(torch.floor(gelu / scale_out + 0.5), INT8_MIN, INT8_MAX).long().tolist()


def random_inputs(rng, beats: int, lanes: int) -> torch.Tensor:
    return torch.tensor([[rng.randint(INT8_MIN, INT8_MAX) for _ in range(lanes)]
                         for _ in range(beats)], dtype=torch.int64)


def make_groups(case: str, rng, cfg) -> list[Group]:
    """The stimulus of one data case."""
    lanes = cfg.pe_cols

    def framed(q: torch.Tensor) -> list[bool]:
        return [rng.random() < 0.2 for _ in range(q.shape[0])]

    groups = []
    if case == "random":
        for _ in range(3):
            table = ([rng.randint(INT8_MIN, INT8_MAX) for _ in range(256)]
                     if rng.random() < 0.5 else gelu_like_table(rng))
            q = random_inputs(rng, rng.randint(1, 30), lanes)
            groups.append(Group(table, q, framed(q)))
    elif case == "extremes":
        # Every code through an identity, a negation and a saturating table.
        codes = torch.tensor([c - 256 if c > 127 else c for c in range(256)], dtype=torch.int64)
        q = codes.reshape(-1, lanes)
        identity = codes.tolist()
        negation = [max(INT8_MIN, min(INT8_MAX, -c)) for c in identity]
        step = [INT8_MAX if c >= 0 else INT8_MIN for c in identity]
        groups = [Group(t, q, framed(q)) for t in (identity, negation, step)]
    elif case == "rewrite":
        # Table entries rewritten while beats stream: each beat must see the table as it
        # stood when the beat was taken, and a write must never share a cycle with a beat.
        q = random_inputs(rng, 60, lanes)
        writes = [(rng.randint(0, 255), rng.randint(INT8_MIN, INT8_MAX)) for _ in range(150)]
        groups.append(Group(gelu_like_table(rng), q, framed(q), writes))
    elif case == "throughput":
        q = random_inputs(rng, 200, lanes)
        groups.append(Group(gelu_like_table(rng), q, [True] * q.shape[0]))
    else:
        raise ValueError(f"unknown data case {case!r}")
    return groups


class TB:
    """The table-lookup ports of the bench top: table writes, input and output streams."""

    def __init__(self, dut, *, input_gaps: bool, backpressure: bool) -> None:
        self.bench = Bench(dut)
        self.cfg = bench_config()
        self.beat_layout = row_beat_layout(self.cfg)
        self.table_layout = TableLookup.table_layout()
        self.stimulus_rng = self.bench.rng()
        self.table = StreamSource(self.bench, f"{PREFIX}__table", gaps=input_gaps)
        self.i = StreamSource(self.bench, f"{PREFIX}__i", gaps=input_gaps)
        self.o = StreamSink(self.bench, f"{PREFIX}__o", backpressure=backpressure)

    async def run(self, groups: list[Group]) -> tuple[list, list]:
        """Drive every group; return (DUT beats, expected beats) as (lanes list, last).

        Expected values come from replaying the table writes in the order the DUT took them
        (its accept cycles), so concurrent writes are checked exactly.
        """
        n_beats = sum(g.q.shape[0] for g in groups)
        receiving = cocotb.start_soon(self.o.receive(n_beats))
        beats_taken = 0
        expected = []
        for g in groups:
            await self.table.send([pack(self.table_layout, {"index": i, "value": v})
                                   for i, v in enumerate(g.table)])
            table, first_write = list(g.table), len(self.table.accepted)
            beats = [pack(self.beat_layout, {"data": row.tolist(), "last": last})
                     for row, last in zip(g.q, g.last, strict=True)]
            writing = cocotb.start_soon(self.table.send(
                [pack(self.table_layout, {"index": i, "value": v})
                 for i, v in g.concurrent_writes]))
            await self.i.send(beats)
            await writing
            # Replay: a write taken on cycle t is visible to beats taken after t.
            write_cycles = self.table.accepted[first_write:]
            beat_cycles = self.i.accepted[beats_taken:]
            clash = set(write_cycles) & set(beat_cycles)
            assert not clash, f"a table write and an input beat were taken on cycles {clash}"
            pending = list(zip(write_cycles, g.concurrent_writes, strict=True))
            for row, last, cycle in zip(g.q, g.last, beat_cycles, strict=True):
                while pending and pending[0][0] < cycle:
                    index, value = pending.pop(0)[1]
                    table[index] = value
                y = numerics.table_lookup(row, torch.tensor(table))
                expected.append((y.tolist(), last))
            beats_taken = len(self.i.accepted)
        raw = await receiving
        got = [(list(beat.data), bool(beat.last))
               for beat in map(self.beat_layout.from_bits, raw)]
        return got, expected


def check_streaming(tb: TB, n_beats: int, busy_cycles: int) -> None:
    """One beat per cycle in and out, with no bubble, apart from the fill."""
    bubbles = sum(t1 - t0 - 1 for t0, t1 in itertools.pairwise(tb.i.accepted))
    elapsed = tb.o.accepted[-1] - tb.i.accepted[0] + 1
    tb.bench.log.info("%d beats in %d cycles, %d busy, %d input bubbles", n_beats, elapsed,
                      busy_cycles, bubbles)
    assert bubbles == 0, f"{bubbles} idle input cycles while streaming"
    assert elapsed <= n_beats + FILL_CYCLES_MAX, (
        f"{n_beats} beats took {elapsed} cycles: not one beat per cycle"
    )


CASES = expand(["random", "extremes", "rewrite"], streaming_only=["throughput"])


@cocotb.test(timeout_time=10, timeout_unit="ms")
@cocotb.parametrize((("case", "input_gaps", "backpressure"), CASES))
async def test_table(dut, case: str, input_gaps: bool, backpressure: bool) -> None:
    """Every output beat equals ``numerics.table_lookup`` with the table of its group."""
    tb = TB(dut, input_gaps=input_gaps, backpressure=backpressure)
    groups = make_groups(case, tb.stimulus_rng, tb.cfg)
    n_beats, busy_cycles = await check_stream_block(
        tb.bench, PREFIX, lambda: tb.run(groups), golden="numerics.table_lookup",
        sources=[tb.i], sink=tb.o, input_gaps=input_gaps, backpressure=backpressure)
    if case == "throughput":
        check_streaming(tb, n_beats, busy_cycles)
