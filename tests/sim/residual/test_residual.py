"""cocotb bench for :class:`m3vit.hw.vector.ResidualAdd` (ports ``res__*`` of the bench top).

Run by ``tests/sim/test_vector.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; not a
pytest module. One generic test body is expanded over the data case and the flow options
(random gaps on both operand streams, random output back-pressure); every output beat is
compared with :func:`m3vit.sw.quant.numerics.residual_add` of its operands and command.
"""

import itertools
from dataclasses import dataclass

import cocotb
import torch

from m3vit.hw.vector import ResidualAdd, lane_layout, row_beat_layout
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.stream_tb import Bench, StreamSink, StreamSource, check_stream_block, expand, pack
from m3vit.sw.quant import numerics

PREFIX = "res"
INT8_MIN, INT8_MAX = -128, 127
MULT_MAX = 2**16 - 1
# First beat in to last beat out beyond one cycle per beat and the bubbles between commands
# (measured 7: five pipeline stages and the output queue).
FILL_CYCLES_MAX = 10


@dataclass
class Command:
    a: torch.Tensor  # (beats, lanes) int64
    b: torch.Tensor
    mult_a: int
    mult_b: int
    shift: int


def random_operand(rng, beats: int, lanes: int) -> torch.Tensor:
    return torch.tensor([[rng.randint(INT8_MIN, INT8_MAX) for _ in range(lanes)]
                         for _ in range(beats)], dtype=torch.int64)


def make_commands(case: str, rng, cfg) -> list[Command]:
    """The stimulus of one data case."""
    lanes = cfg.pe_cols
    commands = []
    if case == "random":
        for _ in range(10):
            beats = rng.choice([1, 2, rng.randint(1, 40)])
            # Quantizer-like: multipliers in [2^15, 2^16), the shift making outputs ~INT8,
            # and some anywhere (zero multipliers, shifts that leave nothing).
            if rng.random() < 0.7:
                mult_a, mult_b = rng.randint(2**15, MULT_MAX), rng.randint(0, MULT_MAX)
                shift = rng.randint(14, 20)
            else:
                mult_a, mult_b, shift = rng.randint(0, MULT_MAX), rng.randint(0, 9), \
                    rng.randint(0, 62)
            commands.append(Command(random_operand(rng, beats, lanes),
                                    random_operand(rng, beats, lanes), mult_a, mult_b, shift))
    elif case == "extremes":
        corners = list(itertools.product((INT8_MIN, -1, 0, 1, INT8_MAX), repeat=2))
        # Every pair of operand corners, padded to whole beats.
        pairs = corners + corners[: -len(corners) % lanes]
        a = torch.tensor([p[0] for p in pairs], dtype=torch.int64).reshape(-1, lanes)
        b = torch.tensor([p[1] for p in pairs], dtype=torch.int64).reshape(-1, lanes)
        for mult_a, mult_b in ((MULT_MAX, MULT_MAX), (MULT_MAX, 0), (1, 1), (0, 0)):
            # Around the 25-bit sum: the hardware clamps shifts ≥ 25 (all give 0).
            for shift in (0, 1, 15, 16, 23, 24, 25, 26, 62):
                commands.append(Command(a, b, mult_a, mult_b, shift))
    elif case == "throughput":
        commands = [Command(random_operand(rng, n, lanes), random_operand(rng, n, lanes),
                            rng.randint(2**15, MULT_MAX), rng.randint(2**15, MULT_MAX), 16)
                    for n in (100, 1, 1, 60)]
    else:
        raise ValueError(f"unknown data case {case!r}")
    return commands


class TB:
    """The residual-add ports of the bench top: command, both operands and the output."""

    def __init__(self, dut, *, input_gaps: bool, backpressure: bool) -> None:
        self.bench = Bench(dut)
        self.cfg = bench_config()
        self.cmd_layout = ResidualAdd.cmd_layout(self.cfg)
        self.in_layout = lane_layout(self.cfg)
        self.out_layout = row_beat_layout(self.cfg)
        self.stimulus_rng = self.bench.rng()
        self.cmd = StreamSource(self.bench, f"{PREFIX}__cmd", gaps=input_gaps)
        self.a = StreamSource(self.bench, f"{PREFIX}__a", gaps=input_gaps)
        self.b = StreamSource(self.bench, f"{PREFIX}__b", gaps=input_gaps)
        self.y = StreamSink(self.bench, f"{PREFIX}__y", backpressure=backpressure)

    async def run(self, commands: list[Command]) -> tuple[list, list]:
        """Drive every command; return (DUT beats, expected beats) as (lanes list, last)."""
        expected, a_beats, b_beats = [], [], []
        for c in commands:
            y = numerics.residual_add(c.a, c.b, c.mult_a, c.mult_b, c.shift)
            beats = c.a.shape[0]
            expected += [(y[j].tolist(), j == beats - 1) for j in range(beats)]
            a_beats += [pack(self.in_layout, row.tolist()) for row in c.a]
            b_beats += [pack(self.in_layout, row.tolist()) for row in c.b]
        receiving = cocotb.start_soon(self.y.receive(len(expected)))
        sending_a = cocotb.start_soon(self.a.send(a_beats))
        sending_b = cocotb.start_soon(self.b.send(b_beats))
        await self.cmd.send([
            pack(self.cmd_layout, {"beats": c.a.shape[0], "mult_a": c.mult_a,
                                   "mult_b": c.mult_b, "shift": c.shift})
            for c in commands
        ])
        await sending_a
        await sending_b
        raw = await receiving
        got = [(list(beat.data), bool(beat.last))
               for beat in map(self.out_layout.from_bits, raw)]
        return got, expected


def check_streaming(tb: TB, commands: list[Command], n_beats: int, busy_cycles: int) -> None:
    """One beat per cycle in and out, apart from one bubble per command and the fill."""
    bubbles = sum(t1 - t0 - 1 for t0, t1 in itertools.pairwise(tb.a.accepted))
    elapsed = tb.y.accepted[-1] - tb.a.accepted[0] + 1
    tb.bench.log.info("%d beats in %d cycles, %d busy, %d input bubbles", n_beats, elapsed,
                      busy_cycles, bubbles)
    assert bubbles <= len(commands), f"{bubbles} idle input cycles while streaming"
    assert elapsed <= n_beats + len(commands) + FILL_CYCLES_MAX, (
        f"{n_beats} beats took {elapsed} cycles: not one beat per cycle"
    )


CASES = expand(["random", "extremes"], streaming_only=["throughput"])


@cocotb.test(timeout_time=10, timeout_unit="ms")
@cocotb.parametrize((("case", "input_gaps", "backpressure"), CASES))
async def test_residual(dut, case: str, input_gaps: bool, backpressure: bool) -> None:
    """Every output beat equals ``numerics.residual_add`` of its operands."""
    tb = TB(dut, input_gaps=input_gaps, backpressure=backpressure)
    commands = make_commands(case, tb.stimulus_rng, tb.cfg)
    n_beats, busy_cycles = await check_stream_block(
        tb.bench, PREFIX, lambda: tb.run(commands), golden="numerics.residual_add",
        sources=[tb.a, tb.b], sink=tb.y, input_gaps=input_gaps, backpressure=backpressure)
    if case == "throughput":
        check_streaming(tb, commands, n_beats, busy_cycles)
