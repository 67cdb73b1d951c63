"""cocotb bench for :class:`m3vit.hw.vector.LayerNormUnit` (ports ``ln__*`` of the bench top).

Run by ``tests/sim/test_vector.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; not a
pytest module. One generic test body is expanded over the data case and the flow options
(random input gaps, random output back-pressure). Each case is a list of groups: a parameter
load (gain and bias of every channel), then commands back to back, each checked beat for beat
against :func:`m3vit.sw.quant.numerics.layernorm` on the same integers.
"""

import itertools
from dataclasses import dataclass

import cocotb
import torch

from m3vit.hw.vector import LN_EPS_BITS, LayerNormUnit, lane_layout, row_beat_layout
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.stream_tb import Bench, StreamSink, StreamSource, check_stream_block, expand, pack
from m3vit.sw.quant import numerics

PREFIX = "ln"
INT8_MIN, INT8_MAX = -128, 127
GAIN_MIN, GAIN_MAX = -(2**15), 2**15 - 1
EPS_MAX = 2**LN_EPS_BITS - 1
# Largest bias for which the golden model's int64 sum t·g + b + 2^(shift−1) cannot wrap.
BIAS_MAX = 2**62 - 1
# First beat in to last beat out, beyond one cycle per beat and one longest row (a row's
# first output needs its whole row): sums, V, the 27-stage isqrt, the 32-stage reciprocal,
# the 10-stage output datapath and the queues (measured 84 at 4 lanes, 87 at 32).
FILL_CYCLES_MAX = 96


@dataclass
class Command:
    x: torch.Tensor  # (rows, D) int64
    shift: int
    eps_term: int


@dataclass
class Group:
    gain: list[int]  # max_dim channels
    bias: list[int]
    commands: list[Command]


def pick_dims(cfg, rng, count: int) -> list[int]:
    """D = lanes, 2·lanes, max_dim, then random multiples of lanes."""
    lanes = cfg.pe_cols
    fixed = [lanes, 2 * lanes, cfg.max_dim]
    return [fixed[i] if i < 3 else lanes * rng.randint(1, cfg.max_dim // lanes)
            for i in range(count)]


def pick_shift(rng) -> int:
    # Mostly the quantizer's range (outputs neither all zero nor all saturated), some anywhere.
    return rng.randint(28, 44) if rng.random() < 0.7 else rng.randint(0, 62)


def random_params(cfg, rng) -> tuple[list[int], list[int]]:
    scale = 2 ** rng.randint(0, 50)
    gain = [rng.randint(GAIN_MIN, GAIN_MAX) for _ in range(cfg.max_dim)]
    bias = [rng.randint(-scale, scale) for _ in range(cfg.max_dim)]
    return gain, bias


def random_rows(rng, rows: int, dim: int) -> torch.Tensor:
    if rng.random() < 0.5:
        values = [[rng.randint(INT8_MIN, INT8_MAX) for _ in range(dim)] for _ in range(rows)]
    else:  # activation-like: a spread around a row offset, with the odd outlier
        values = [[max(INT8_MIN, min(INT8_MAX, round(rng.gauss(rng.randint(-40, 40), 12))))
                   for _ in range(dim)] for _ in range(rows)]
    return torch.tensor(values, dtype=torch.int64)


def make_groups(case: str, rng, cfg) -> list[Group]:
    """The stimulus of one data case."""
    groups = []
    if case == "random":
        for _ in range(3):
            gain, bias = random_params(cfg, rng)
            commands = [
                Command(random_rows(rng, rng.randint(1, 4), dim), pick_shift(rng),
                        rng.randint(1, 2 ** rng.randint(1, 24)))
                for dim in pick_dims(cfg, rng, 4)
            ]
            groups.append(Group(gain, bias, commands))
    elif case == "equal":
        # d = 0 for every channel: y = sat8(round_half_up(b / 2^shift)).
        for _ in range(2):
            gain, bias = random_params(cfg, rng)
            commands = []
            for dim in pick_dims(cfg, rng, 4):
                rows = torch.tensor([[rng.choice([INT8_MIN, INT8_MAX, 0, rng.randint(-128, 127)])]
                                     * dim for _ in range(3)], dtype=torch.int64)
                commands.append(Command(rows, pick_shift(rng), rng.randint(1, 1000)))
            groups.append(Group(gain, bias, commands))
    elif case == "extremes":
        for _ in range(2):
            gain = [rng.choice([GAIN_MIN, GAIN_MAX, -GAIN_MAX, 0, 1])
                    for _ in range(cfg.max_dim)]
            bias = [rng.choice([BIAS_MAX, -BIAS_MAX - 1, 0, 2**46, -(2**46)])
                    for _ in range(cfg.max_dim)]
            commands = []
            for dim in pick_dims(cfg, rng, 3):
                lo, hi = INT8_MIN, INT8_MAX
                patterns = [
                    [lo] * dim,
                    [hi] * dim,
                    [lo if i % 2 else hi for i in range(dim)],
                    [hi] + [lo] * (dim - 1),  # one outlier: |t| closest to 2^31
                    [lo] * (dim - 1) + [hi],
                    [hi] * (dim - 1) + [lo],
                ]
                x = torch.tensor(patterns, dtype=torch.int64)
                for shift in (0, 1, 31, 46, 62):
                    commands.append(Command(x, shift, rng.choice([1, EPS_MAX])))
            groups.append(Group(gain, bias, commands))
    elif case == "throughput":
        gain, bias = random_params(cfg, rng)
        lanes = cfg.pe_cols
        commands = [
            Command(random_rows(rng, 48, lanes), 36, 100),
            Command(random_rows(rng, 24, 2 * lanes), 36, 100),
            Command(random_rows(rng, 12, cfg.max_dim), 36, 100),
        ]
        groups.append(Group(gain, bias, commands))
    else:
        raise ValueError(f"unknown data case {case!r}")
    return groups


class TB:
    """The LayerNorm ports of the bench top: command, input, parameter and output streams."""

    def __init__(self, dut, *, input_gaps: bool, backpressure: bool) -> None:
        self.bench = Bench(dut)
        self.cfg = bench_config()
        self.lanes = self.cfg.pe_cols
        self.cmd_layout = LayerNormUnit.cmd_layout(self.cfg)
        self.param_layout = LayerNormUnit.param_layout(self.cfg)
        self.x_layout = lane_layout(self.cfg)
        self.y_layout = row_beat_layout(self.cfg)
        self.stimulus_rng = self.bench.rng()
        self.cmd = StreamSource(self.bench, f"{PREFIX}__cmd", gaps=input_gaps)
        self.x = StreamSource(self.bench, f"{PREFIX}__x", gaps=input_gaps)
        self.params = StreamSource(self.bench, f"{PREFIX}__params", gaps=input_gaps)
        self.y = StreamSink(self.bench, f"{PREFIX}__y", backpressure=backpressure)

    def param_beats(self, group: Group) -> list[int]:
        lanes = self.lanes
        return [
            pack(self.param_layout, {"beat": j, "gain": group.gain[j * lanes:(j + 1) * lanes],
                                     "bias": group.bias[j * lanes:(j + 1) * lanes]})
            for j in range(self.cfg.max_dim // lanes)
        ]

    async def run(self, groups: list[Group]) -> tuple[list, list]:
        """Drive every group; return (DUT beats, expected beats) as (lanes list, last)."""
        lanes = self.lanes
        x_beats, expected = [], []
        for group in groups:
            for command in group.commands:
                rows, dim = command.x.shape
                y = numerics.layernorm(command.x, torch.tensor(group.gain[:dim]),
                                       torch.tensor(group.bias[:dim]), command.shift,
                                       command.eps_term)
                beats = dim // lanes
                for r in range(rows):
                    for j in range(beats):
                        x_beats.append(pack(self.x_layout,
                                            command.x[r, j * lanes:(j + 1) * lanes].tolist()))
                        expected.append((y[r, j * lanes:(j + 1) * lanes].tolist(),
                                         j == beats - 1))
        receiving = cocotb.start_soon(self.y.receive(len(expected)))
        sending = cocotb.start_soon(self.x.send(x_beats))
        for group in groups:
            # Accepted only once the previous group has drained (params.ready = ~busy).
            await self.params.send(self.param_beats(group))
            await self.cmd.send([
                pack(self.cmd_layout, {"beats": c.x.shape[1] // lanes, "rows": c.x.shape[0],
                                       "shift": c.shift, "eps_term": c.eps_term})
                for c in group.commands
            ])
        await sending
        raw = await receiving
        got = [(list(beat.data), bool(beat.last)) for beat in map(self.y_layout.from_bits, raw)]
        return got, expected


def check_streaming(tb: TB, commands: list[Command], n_beats: int, busy_cycles: int) -> None:
    """One beat per cycle in and out, apart from one bubble per command and the fill."""
    lanes = tb.lanes
    bubbles = sum(t1 - t0 - 1 for t0, t1 in itertools.pairwise(tb.x.accepted))
    elapsed = tb.y.accepted[-1] - tb.x.accepted[0] + 1
    longest = max(c.x.shape[1] // lanes for c in commands)
    tb.bench.log.info("%d beats (%d rows) in %d cycles, %d busy, %d input bubbles", n_beats,
                      sum(c.x.shape[0] for c in commands), elapsed, busy_cycles, bubbles)
    assert bubbles <= len(commands), f"{bubbles} idle input cycles while streaming"
    # Steady state of the last command (D = max_dim): one row every D / lanes cycles.
    rows, dim = commands[-1].x.shape
    row_beats = dim // lanes
    row_ends = tb.y.accepted[-rows * row_beats + row_beats - 1::row_beats]
    per_row = [t1 - t0 for t0, t1 in itertools.pairwise(row_ends)]
    tb.bench.log.info("D=%d at %d lanes: %d beats per row, cycles per row %s", dim, lanes,
                      row_beats, per_row)
    assert set(per_row) == {row_beats}, f"rows of {row_beats} beats every {per_row} cycles"
    assert elapsed <= n_beats + longest + FILL_CYCLES_MAX, (
        f"{n_beats} beats took {elapsed} cycles (longest row {longest} beats)"
    )


CASES = expand(["random", "equal", "extremes"], streaming_only=["throughput"])


@cocotb.test(timeout_time=10, timeout_unit="ms")
@cocotb.parametrize((("case", "input_gaps", "backpressure"), CASES))
async def test_layernorm(dut, case: str, input_gaps: bool, backpressure: bool) -> None:
    """Every output beat equals ``numerics.layernorm`` of its row, in order, with ``last``."""
    tb = TB(dut, input_gaps=input_gaps, backpressure=backpressure)
    groups = make_groups(case, tb.stimulus_rng, tb.cfg)
    n_beats, busy_cycles = await check_stream_block(
        tb.bench, PREFIX, lambda: tb.run(groups), golden="numerics.layernorm",
        sources=[tb.x], sink=tb.y, input_gaps=input_gaps, backpressure=backpressure)
    if case == "throughput":
        check_streaming(tb, groups[0].commands, n_beats, busy_cycles)
