"""cocotb bench for :class:`m3vit.hw.vector.SoftmaxUnit` (ports ``sm__*`` of the bench top).

Run by ``tests/sim/test_vector.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; not a
pytest module. One generic test body is expanded over the data case and the flow options.
Each case is a list of groups: an exp-table load, then commands back to back, attention and
router mixed. Attention mode (INT8 logits, one a lane): each row is the probability beats
of :func:`~m3vit.sw.quant.numerics.softmax`, ending with the row's scale in the top three
lanes of the last — ``M``'s low and high byte and ``sh`` of
:func:`m3vit.sw.quant.numerics.row_scale` of the row's ``rcp`` and the command's
``mult``/``shift`` (drawn per command: corner values such as 0, 1, 65535 and shifts 0 … 62
first, then random; the ``scales`` case sweeps every bit length of ``mult``) — or in a beat
of its own after them where the row's last beat has fewer than three padded lanes. Router
mode (INT16 logits, two lanes each, little-endian): the beats of
:func:`~m3vit.sw.quant.numerics.router_scores`, whose upper half must hold ``max − l`` of
the lower half's logits. Padded positions of a row's last beat are
driven with random values (the block must ignore them); their outputs must be 0 (a router
padded position's ``max − l`` lane is unspecified and not compared). While the stimulus runs,
``busy`` is checked wherever it falls: every command taken before has delivered all of its
beats.
"""

import bisect
import itertools
import math
from dataclasses import dataclass

import cocotb
import torch
from cocotb.triggers import FallingEdge, ReadOnly

from m3vit.hw.vector import SoftmaxMode, SoftmaxUnit, lane_layout
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.stream_tb import Bench, StreamSink, StreamSource, check_stream_block, expand, pack
from m3vit.sw.quant import numerics

PREFIX = "sm"
INT8_MIN, INT8_MAX = -128, 127
INT16_MIN, INT16_MAX = numerics.INT16_MIN, numerics.INT16_MAX
# First beat in to last output beat, beyond one cycle per output beat and one longest row
# (a row's first output needs its whole row): the max tree, the sum tree, the 17-stage
# reciprocal, the row scale and the queues (measured 59 at 4 lanes, 58 at 8).
FILL_CYCLES_MAX = 64
#: (mult, shift) of the first attention commands of every group, then random ones: a
#: product far over 16 bits with sh clamped at 0 (z = 16 where rcp = 2^16), one of at most
#: 2^16 (z = 0, or 1 where rcp = 2^16), a zero product with the largest shift.
CORNER_SCALES = [(65535, 5), (1, 17), (0, 62)]
CORNER_MULTS = [0, 1, 2, 65535]
CORNER_SHIFTS = [0, 5, 16, 17, 40, 62]


@dataclass
class Command:
    logits: torch.Tensor  # (rows, L) int64: INT8 (attention) or INT16 (router) values
    mode: SoftmaxMode
    # Attention: the P·V requantization the row scales fold in; router: ignored by the block
    # (random values are sent). None until :func:`assign_scales`.
    mult: int | None = None
    shift: int | None = None

    def positions(self, lanes: int) -> int:
        """Logits per beat: one a lane (attention) or one per two lanes (router)."""
        return lanes // 2 if self.mode == SoftmaxMode.ROUTER else lanes

    def beats(self, lanes: int) -> int:
        """Input beats per row."""
        return math.ceil(self.logits.shape[1] / self.positions(lanes))

    def out_beats(self, lanes: int) -> int:
        """Output beats per row: one per input beat, and for an attention row one more
        where its last beat has no three padded lanes for the row's scale."""
        if self.mode == SoftmaxMode.ROUTER:
            return self.beats(lanes)
        return math.ceil((self.logits.shape[1] + 3) / lanes)


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
    elif case == "scales":
        # Short commands back to back, attention and router mixed, their mult/shift queued
        # in order inside the block: each attention command's mult of another bit length,
        # twice, so that z = bitlen(rcp · mult) − 16 takes every value from 0 to 16.
        lanes, commands = cfg.pe_cols, []
        bits = rng.sample(range(17), 17) + rng.sample(range(17), 17)
        for b in bits:
            length = rng.choice([1, 2, lanes, lanes + 1, rng.randint(1, cfg.max_tokens)])
            mult = rng.randrange(1 << b >> 1, 1 << b)  # b bits (0 for b = 0)
            commands.append(Command(random_logits(rng, rng.randint(1, 2), length),
                                    SoftmaxMode.ATTENTION, mult, rng.randint(0, 62)))
            if rng.random() < 0.5:
                length = rng.randint(1, cfg.pe_cols // 2 + 1)
                commands.append(Command(random_router_logits(rng, 1, length),
                                        SoftmaxMode.ROUTER))
        # Then 120 one-beat attention rows, a command each: under back-pressure more
        # attention commands are in flight than the block queues (32), so it must refuse
        # commands until one drains.
        commands += [Command(random_logits(rng, 1, rng.randint(1, lanes)), SoftmaxMode.ATTENTION)
                     for _ in range(120)]
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


def assign_scales(groups: list[Group], rng) -> None:
    """Give every attention command without one its ``mult``/``shift``:
    :data:`CORNER_SCALES` for the first ones of each group, then corner or random values
    (mostly mult ≈ 2^15 … 2^16, the P·V ratio's range; else of any bit length). Router
    commands get random ones, which the block must ignore."""
    for group in groups:
        for command in group.commands:
            if command.mode == SoftmaxMode.ROUTER:  # ignored: anything
                command.mult, command.shift = rng.randrange(1 << 16), rng.randint(0, 63)
        attention = [c for c in group.commands
                     if c.mode == SoftmaxMode.ATTENTION and c.mult is None]
        for k, command in enumerate(attention):
            if k < len(CORNER_SCALES):
                command.mult, command.shift = CORNER_SCALES[k]
                continue
            draw = rng.random()
            command.mult = (rng.choice(CORNER_MULTS) if draw < 0.2
                            else rng.randint(1 << 15, (1 << 16) - 1) if draw < 0.6
                            else rng.randrange(1 << rng.randint(1, 16)))  # any magnitude
            command.shift = (rng.choice(CORNER_SHIFTS) if rng.random() < 0.4
                             else rng.randint(0, numerics.MAX_SHIFT))


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
        if router:
            out = numerics.router_scores(command.logits, table)
        else:
            out, rcp = numerics.softmax(command.logits, table)
            scale, sh = numerics.row_scale(rcp, command.mult, command.shift)
        payloads, expected = [], []
        out_beats = command.out_beats(lanes)
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
                # The row's scale in its last output beat's top lanes: M's bytes, sh.
                m_row, sh_row = int(scale[r, 0]), int(sh[r, 0])
                row_out += [0] * (out_beats * lanes - len(row_out))
                row_out[-3:] = [m_row & 0xFF, m_row >> 8, sh_row]
                for j in range(out_beats):
                    expected.append((row_out[j * lanes:(j + 1) * lanes], j == out_beats - 1))
            for j in range(beats):
                chunk = slice(j * per_beat, (j + 1) * per_beat)
                if router:
                    payloads.append(sum((v & 0xFFFF) << (16 * h)
                                        for h, v in enumerate(row_in[chunk])))
                    expected.append((row_out[chunk] + row_d[chunk], j == beats - 1))
                else:
                    payloads.append(pack(self.logits_layout, row_in[chunk]))
        return payloads, expected

    async def watch_busy(self, command_outputs: list[int]) -> None:
        """Wherever ``busy`` falls, each command taken before has delivered all its beats
        (``command_outputs``, in order): busy never drops early. Runs until cancelled."""
        busy = self.bench.dut[f"{PREFIX}__busy"]
        owed = list(itertools.accumulate(command_outputs, initial=0))
        while True:
            await FallingEdge(busy)
            await ReadOnly()
            now = self.bench.cycle()
            taken = bisect.bisect_left(self.cmd.accepted, now)
            delivered = bisect.bisect_left(self.probs.accepted, now)
            assert delivered == owed[taken], (
                f"busy low at cycle {now} with {delivered} of the {owed[taken]} beats of the "
                f"{taken} commands taken delivered")

    async def run(self, groups: list[Group]) -> tuple[list, list]:
        """Drive every group; return (DUT beats, expected beats) as (lanes list, last)."""
        logit_beats, expected, command_outputs = [], [], []
        for group in groups:
            for command in group.commands:
                payloads, beats = self.command_beats(command, group.table)
                logit_beats += payloads
                expected += beats
                command_outputs.append(len(beats))
        watching = cocotb.start_soon(self.watch_busy(command_outputs))
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
                                       "mode": c.mode, "mult": c.mult, "shift": c.shift})
                for c in group.commands
            ])
        await sending
        raw = await receiving
        watching.cancel()
        got = [([None if e is None else int(g) for g, e in zip(beat.data, want, strict=True)],
                bool(beat.last))
               for beat, (want, _) in zip(map(self.out_layout.from_bits, raw), expected,
                                          strict=True)]
        return got, expected


def check_streaming(tb: TB, commands: list[Command], n_beats: int, busy_cycles: int) -> None:
    """One beat per cycle out, apart from the fill; in, apart from one bubble per command
    and one per attention row whose scale takes a beat of its own."""
    lanes = tb.lanes
    bubbles = sum(t1 - t0 - 1 for t0, t1 in itertools.pairwise(tb.logits.accepted))
    elapsed = tb.probs.accepted[-1] - tb.logits.accepted[0] + 1
    longest = max(c.beats(lanes) for c in commands)
    scale_beats = sum(c.logits.shape[0] * (c.out_beats(lanes) - c.beats(lanes))
                      for c in commands)
    tb.bench.log.info("%d beats (%d rows) in %d cycles, %d busy, %d input bubbles", n_beats,
                      sum(c.logits.shape[0] for c in commands), elapsed, busy_cycles, bubbles)
    assert bubbles <= len(commands) + scale_beats, f"{bubbles} idle input cycles while streaming"
    # Steady state of the second command (129 long where max_tokens allows): one row every
    # ceil((L + 3) / lanes) cycles at the output (the probabilities, the scale in the last
    # beat's top lanes or a beat of its own).
    start = commands[0].logits.shape[0] * commands[0].out_beats(lanes)
    rows, length = commands[1].logits.shape
    row_beats = commands[1].out_beats(lanes)
    row_ends = [tb.probs.accepted[start + (r + 1) * row_beats - 1] for r in range(rows)]
    per_row = [t1 - t0 for t0, t1 in itertools.pairwise(row_ends)]
    tb.bench.log.info("L=%d at %d lanes: %d beats per row, cycles per row %s", length, lanes,
                      row_beats, per_row)
    assert set(per_row) == {row_beats}, f"rows of {row_beats} beats every {per_row} cycles"
    assert elapsed <= n_beats + longest + FILL_CYCLES_MAX, (
        f"{n_beats} beats took {elapsed} cycles (longest row {longest} beats)"
    )


CASES = expand(["random", "uniform", "extremes", "router", "scales"],
               streaming_only=["throughput"])


@cocotb.test(timeout_time=10, timeout_unit="ms")
@cocotb.parametrize((("case", "input_gaps", "backpressure"), CASES))
async def test_softmax(dut, case: str, input_gaps: bool, backpressure: bool) -> None:
    """Every output beat equals the golden row scale, softmax or router scores of its row."""
    tb = TB(dut, input_gaps=input_gaps, backpressure=backpressure)
    groups = make_groups(case, tb.stimulus_rng, tb.cfg)
    assign_scales(groups, tb.stimulus_rng)
    n_beats, busy_cycles = await check_stream_block(
        tb.bench, PREFIX, lambda: tb.run(groups), golden="numerics.softmax / router_scores",
        sources=[tb.logits], sink=tb.probs, input_gaps=input_gaps, backpressure=backpressure)
    if case == "throughput":
        check_streaming(tb, groups[0].commands, n_beats, busy_cycles)
