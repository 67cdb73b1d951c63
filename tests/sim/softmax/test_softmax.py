"""cocotb bench for :class:`m3vit.hw.vector.SoftmaxUnit` (ports ``sm__*`` of the bench top).

Run by ``tests/sim/test_vector.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; not a
pytest module. One generic test body is expanded over the data case and the flow options.
Each case is a list of groups: an exp-table load, then commands back to back; every output
beat is compared with :func:`m3vit.sw.quant.numerics.softmax` (attention mode: INT8 logits,
one a lane) or :func:`~m3vit.sw.quant.numerics.router_scores` (router mode: INT16 logits, two
lanes each, little-endian) of its row; in router mode the upper half of each output beat must
hold ``max − l`` of the lower half's logits. Padded positions of a row's last beat are driven
with random values (the block must ignore them); their outputs must be 0 (a router padded
position's ``max − l`` lane is unspecified and not compared).
"""

import itertools
import math
from dataclasses import dataclass

import cocotb
import torch

from m3vit.hw.vector import SoftmaxMode, SoftmaxUnit, lane_layout
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.stream_tb import Bench, StreamSink, StreamSource, check_stream_block, expand, pack
from m3vit.sw.quant import numerics

PREFIX = "sm"
INT8_MIN, INT8_MAX = -128, 127
INT16_MIN, INT16_MAX = numerics.INT16_MIN, numerics.INT16_MAX
# First beat in to last beat out, beyond one cycle per beat and one longest row (a row's
# first output needs its whole row): the max tree, the sum tree, the 17-stage reciprocal
# and the queues (measured 56 at 4 lanes).
FILL_CYCLES_MAX = 64


@dataclass
class Command:
    logits: torch.Tensor  # (rows, L) int64: INT8 (attention) or INT16 (router) values
    mode: SoftmaxMode

    def positions(self, lanes: int) -> int:
        """Logits per beat: one a lane (attention) or one per two lanes (router)."""
        return lanes // 2 if self.mode == SoftmaxMode.ROUTER else lanes

    def beats(self, lanes: int) -> int:
        """Beats per row."""
        return math.ceil(self.logits.shape[1] / self.positions(lanes))


@dataclass
class Group:
    table: torch.Tensor  # 256 entries, numerics.exp_table
    commands: list[Command]


def random_table(rng) -> torch.Tensor:
    # Logit scales from nearly flat (every E ≈ 2^15) to steep (E[u] = 0 beyond a few steps).
    return numerics.exp_table(10 ** rng.uniform(-3, 0.3))


def pick_lengths(cfg, rng, count: int) -> list[int]:
    """Ragged lengths first (1, 17, 65, 129, max_tokens, lanes) where they fit, then random."""
    fixed = [n for n in (1, 17, 65, 129, cfg.max_tokens, cfg.pe_cols) if n <= cfg.max_tokens]
    return [fixed[i] if i < len(fixed) else rng.randint(1, cfg.max_tokens)
            for i in range(count)]


def pick_router_lengths(cfg, rng, count: int) -> list[int]:
    """Router rows (E experts, H = lanes / 2 a beat): 1, H, H + 1, 2H − 1, max_experts where
    they fit, then random."""
    half = cfg.pe_cols // 2
    fixed = [n for n in (1, half, half + 1, 2 * half - 1, cfg.max_experts)
             if 1 <= n <= cfg.max_experts]
    return [fixed[i] if i < len(fixed) else rng.randint(1, cfg.max_experts)
            for i in range(count)]


def random_logits(rng, rows: int, length: int) -> torch.Tensor:
    if rng.random() < 0.5:
        values = [[rng.randint(INT8_MIN, INT8_MAX) for _ in range(length)] for _ in range(rows)]
    else:  # many logits near the maximum, as in a trained attention row
        values = [[max(INT8_MIN, min(INT8_MAX, round(rng.gauss(rng.randint(-60, 60), 8))))
                   for _ in range(length)] for _ in range(rows)]
    return torch.tensor(values, dtype=torch.int64)


def clamp16(x: float) -> int:
    return max(INT16_MIN, min(INT16_MAX, round(x)))


def random_router_row(rng, length: int) -> list[int]:
    """One token's INT16 logits, of one of several shapes (a table step is 256 logit steps)."""
    kind = rng.choice(["full", "clustered", "near_ties", "few_values"])
    if kind == "full":  # the whole INT16 range: d up to 65535, u up to 255
        return [rng.randint(INT16_MIN, INT16_MAX) for _ in range(length)]
    if kind == "clustered":  # within a few table steps of each other
        centre, spread = rng.randint(INT16_MIN, INT16_MAX), rng.choice([40, 300, 3000])
        return [clamp16(rng.gauss(centre, spread)) for _ in range(length)]
    if kind == "near_ties":  # logits one or two LSBs apart, around a step boundary of d
        top = rng.randint(INT16_MIN + 1024, INT16_MAX)
        base = top - 256 * rng.randint(0, 3)
        return [top] + [clamp16(base + rng.randint(-2, 2)) for _ in range(length - 1)]
    # Many equal logits: a few values, some one LSB or one table step apart.
    value = rng.randint(INT16_MIN + 600, INT16_MAX)
    values = [value, value - 1, value - 255, value - 256, value - 257, rng.randint(INT16_MIN,
                                                                                   value)]
    values = values[:rng.randint(1, len(values))]
    return [rng.choice(values) for _ in range(length)]


def random_router_logits(rng, rows: int, length: int) -> torch.Tensor:
    return torch.tensor([random_router_row(rng, length) for _ in range(rows)],
                        dtype=torch.int64)


def random_command(rng, cfg, index: int) -> Command:
    """An attention or a router command (ragged lengths first, see the pickers)."""
    rows = rng.randint(1, 3)
    if rng.random() < 0.5:
        length = pick_lengths(cfg, rng, index + 1)[index]
        return Command(random_logits(rng, rows, length), SoftmaxMode.ATTENTION)
    length = pick_router_lengths(cfg, rng, index + 1)[index]
    return Command(random_router_logits(rng, rows, length), SoftmaxMode.ROUTER)


def make_groups(case: str, rng, cfg) -> list[Group]:
    """The stimulus of one data case."""
    groups = []
    if case == "random":
        for _ in range(2):
            commands = [random_command(rng, cfg, index) for index in range(8)]
            groups.append(Group(random_table(rng), commands))
    elif case == "uniform":
        # Equal logits: every e = E[0] = 2^15, p = round_half_up(2^15·floor(2^31 / (L·2^15)) …).
        commands = []
        for length in pick_lengths(cfg, rng, 6):
            rows = torch.tensor([[rng.randint(INT8_MIN, INT8_MAX)] * length for _ in range(2)],
                                dtype=torch.int64)
            commands.append(Command(rows, SoftmaxMode.ATTENTION))
        for length in pick_router_lengths(cfg, rng, 6):
            rows = torch.tensor([[rng.randint(INT16_MIN, INT16_MAX)] * length for _ in range(2)]
                                + [[INT16_MIN] * length, [INT16_MAX] * length],
                                dtype=torch.int64)
            commands.append(Command(rows, SoftmaxMode.ROUTER))
        groups.append(Group(random_table(rng), commands))
    elif case == "extremes":
        for scale in (1e-4, 2.0):  # flat table (S up to L·2^15) and steep table (e mostly 0)
            commands = []
            for length in pick_lengths(cfg, rng, 4):
                lo, hi = INT8_MIN, INT8_MAX
                patterns = [
                    [lo] * length,
                    [hi] * length,
                    [hi] + [lo] * (length - 1),  # u = 255 for all but one
                    [lo] * (length - 1) + [hi],
                    [lo if i % 2 else hi for i in range(length)],
                ]
                commands.append(Command(torch.tensor(patterns, dtype=torch.int64),
                                        SoftmaxMode.ATTENTION))
            for length in pick_router_lengths(cfg, rng, 4):
                lo, hi = INT16_MIN, INT16_MAX
                # d on both sides of every table-step boundary, up to 65535 (u = 255).
                steps = [0, 1, 255, 256, 257, 511, 512, 65279, 65280, 65535]
                patterns = [
                    [lo] * length,
                    [hi] * length,
                    [hi] + [lo] * (length - 1),  # d = 65535 for all but one
                    [lo] * (length - 1) + [hi],
                    [lo if i % 2 else hi for i in range(length)],
                    [hi - steps[i % len(steps)] for i in range(length)],
                    [hi - steps[-1 - i % len(steps)] for i in range(length)],
                ]
                commands.append(Command(torch.tensor(patterns, dtype=torch.int64),
                                        SoftmaxMode.ROUTER))
            groups.append(Group(numerics.exp_table(scale), commands))
    elif case == "router":
        # Router rows: one per token over E experts (E = 4, 16, max_experts), ties included.
        commands = []
        for experts in (4, 16, cfg.max_experts):
            logits = random_router_logits(rng, 12, experts)
            logits[0] = logits[0, 0]  # all experts tied
            top = max(int(logits[1, 0]), INT16_MIN + 1)
            logits[1] = top - torch.arange(experts) % 2  # pairs one LSB apart
            commands.append(Command(logits, SoftmaxMode.ROUTER))
        groups.append(Group(random_table(rng), commands))
    elif case == "throughput":
        lanes = cfg.pe_cols
        commands = [
            Command(random_router_logits(rng, 32, lanes // 2), SoftmaxMode.ROUTER),  # 1 beat
            Command(random_logits(rng, 8, min(129, cfg.max_tokens)), SoftmaxMode.ATTENTION),
            Command(random_logits(rng, 6, cfg.max_tokens), SoftmaxMode.ATTENTION),
        ]
        groups.append(Group(random_table(rng), commands))
    else:
        raise ValueError(f"unknown data case {case!r}")
    return groups


class TB:
    """The softmax ports of the bench top: command, logits, table and output streams."""

    def __init__(self, dut, *, input_gaps: bool, backpressure: bool) -> None:
        self.bench = Bench(dut)
        self.cfg = bench_config()
        self.lanes = self.cfg.pe_cols
        self.cmd_layout = SoftmaxUnit.cmd_layout(self.cfg)
        # The bench top's unit takes several table entries a beat (as the engine's does):
        # how many, from the port's width.
        width = len(getattr(dut, f"{PREFIX}__table__payload"))
        self.table_entries = next(w for w in (1 << k for k in range(9))
                                  if SoftmaxUnit.table_layout(w).size == width)
        self.table_layout = SoftmaxUnit.table_layout(self.table_entries)
        self.logits_layout = lane_layout(self.cfg)
        self.out_layout = SoftmaxUnit.out_layout(self.cfg)
        self.stimulus_rng = self.bench.rng()
        self.cmd = StreamSource(self.bench, f"{PREFIX}__cmd", gaps=input_gaps)
        self.logits = StreamSource(self.bench, f"{PREFIX}__logits", gaps=input_gaps)
        self.table = StreamSource(self.bench, f"{PREFIX}__table", gaps=input_gaps)
        self.probs = StreamSink(self.bench, f"{PREFIX}__probs", backpressure=backpressure)

    def command_beats(self, command: Command, table: torch.Tensor) -> tuple[list, list]:
        """One command's logit payloads and expected output beats (lanes list, last); a lane
        the block may set freely is ``None``."""
        lanes, rng = self.lanes, self.stimulus_rng
        rows, length = command.logits.shape
        per_beat, beats = command.positions(lanes), command.beats(lanes)
        pad = beats * per_beat - length
        router = command.mode == SoftmaxMode.ROUTER
        out = (numerics.router_scores if router else numerics.softmax)(command.logits, table)
        payloads, expected = [], []
        for r in range(rows):
            row_in = command.logits[r].tolist()
            row_out = out[r].tolist() + [0] * pad
            if router:  # ignored padding, then H INT16 logits a beat, little-endian
                row_in += [rng.randint(INT16_MIN, INT16_MAX) for _ in range(pad)]
                row_max = max(command.logits[r].tolist())
                row_d = [row_max - logit for logit in command.logits[r].tolist()]
                row_d += [None] * pad  # unspecified
            else:
                row_in += [rng.randint(INT8_MIN, INT8_MAX) for _ in range(pad)]
            for j in range(beats):
                chunk = slice(j * per_beat, (j + 1) * per_beat)
                if router:
                    payloads.append(sum((v & 0xFFFF) << (16 * h)
                                        for h, v in enumerate(row_in[chunk])))
                    expected.append((row_out[chunk] + row_d[chunk], j == beats - 1))
                else:
                    payloads.append(pack(self.logits_layout, row_in[chunk]))
                    expected.append((row_out[chunk], j == beats - 1))
        return payloads, expected

    async def run(self, groups: list[Group]) -> tuple[list, list]:
        """Drive every group; return (DUT beats, expected beats) as (lanes list, last)."""
        logit_beats, expected = [], []
        for group in groups:
            for command in group.commands:
                payloads, beats = self.command_beats(command, group.table)
                logit_beats += payloads
                expected += beats
        receiving = cocotb.start_soon(self.probs.receive(len(expected)))
        sending = cocotb.start_soon(self.logits.send(logit_beats))
        for group in groups:
            # Accepted only once the previous group has drained (table.ready = ~busy).
            w, entries = self.table_entries, [int(e) for e in group.table]
            await self.table.send([pack(self.table_layout, {"index": u,
                                                            "value": entries[u * w:(u + 1) * w]})
                                   for u in range(len(entries) // w)])
            await self.cmd.send([
                pack(self.cmd_layout, {"length": c.logits.shape[1], "rows": c.logits.shape[0],
                                       "mode": c.mode})
                for c in group.commands
            ])
        await sending
        raw = await receiving
        got = [([None if e is None else int(g) for g, e in zip(beat.data, want, strict=True)],
                bool(beat.last))
               for beat, (want, _) in zip(map(self.out_layout.from_bits, raw), expected,
                                          strict=True)]
        return got, expected


def check_streaming(tb: TB, commands: list[Command], n_beats: int, busy_cycles: int) -> None:
    """One beat per cycle in and out, apart from one bubble per command and the fill."""
    lanes = tb.lanes
    bubbles = sum(t1 - t0 - 1 for t0, t1 in itertools.pairwise(tb.logits.accepted))
    elapsed = tb.probs.accepted[-1] - tb.logits.accepted[0] + 1
    longest = max(c.beats(lanes) for c in commands)
    tb.bench.log.info("%d beats (%d rows) in %d cycles, %d busy, %d input bubbles", n_beats,
                      sum(c.logits.shape[0] for c in commands), elapsed, busy_cycles, bubbles)
    assert bubbles <= len(commands), f"{bubbles} idle input cycles while streaming"
    # Steady state of the second command (129 long where max_tokens allows): one row every
    # ceil(L / lanes) cycles at the output.
    start = commands[0].logits.shape[0] * commands[0].beats(lanes)
    rows, length = commands[1].logits.shape
    row_beats = commands[1].beats(lanes)
    row_ends = [tb.probs.accepted[start + (r + 1) * row_beats - 1] for r in range(rows)]
    per_row = [t1 - t0 for t0, t1 in itertools.pairwise(row_ends)]
    tb.bench.log.info("L=%d at %d lanes: %d beats per row, cycles per row %s", length, lanes,
                      row_beats, per_row)
    assert set(per_row) == {row_beats}, f"rows of {row_beats} beats every {per_row} cycles"
    assert elapsed <= n_beats + longest + FILL_CYCLES_MAX, (
        f"{n_beats} beats took {elapsed} cycles (longest row {longest} beats)"
    )


CASES = expand(["random", "uniform", "extremes", "router"], streaming_only=["throughput"])


@cocotb.test(timeout_time=10, timeout_unit="ms")
@cocotb.parametrize((("case", "input_gaps", "backpressure"), CASES))
async def test_softmax(dut, case: str, input_gaps: bool, backpressure: bool) -> None:
    """Every output beat equals the golden softmax / router scores of its row."""
    tb = TB(dut, input_gaps=input_gaps, backpressure=backpressure)
    groups = make_groups(case, tb.stimulus_rng, tb.cfg)
    n_beats, busy_cycles = await check_stream_block(
        tb.bench, PREFIX, lambda: tb.run(groups), golden="numerics.softmax / router_scores",
        sources=[tb.logits], sink=tb.probs, input_gaps=input_gaps, backpressure=backpressure)
    if case == "throughput":
        check_streaming(tb, groups[0].commands, n_beats, busy_cycles)
