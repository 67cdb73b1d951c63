"""cocotb bench for :class:`m3vit.hw.vector.SoftmaxUnit` (ports ``sm__*`` of the bench top).

Run by ``tests/sim/test_vector.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; not a
pytest module. One generic test body is expanded over the data case and the flow options.
Each case is a list of groups: an exp-table load, then commands back to back; every output
beat is compared with :func:`m3vit.sw.quant.numerics.softmax` (attention mode) or
:func:`~m3vit.sw.quant.numerics.router_scores` (router mode) of its row. Padded lanes of a row's
last beat are driven with random values (the block must ignore them) and must come out 0.
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
# First beat in to last beat out, beyond one cycle per beat and one longest row (a row's
# first output needs its whole row): the max tree, the sum tree, the 17-stage reciprocal
# and the queues (measured 56 at 4 lanes).
FILL_CYCLES_MAX = 64


@dataclass
class Command:
    logits: torch.Tensor  # (rows, L) int64
    mode: SoftmaxMode


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


def random_logits(rng, rows: int, length: int) -> torch.Tensor:
    if rng.random() < 0.5:
        values = [[rng.randint(INT8_MIN, INT8_MAX) for _ in range(length)] for _ in range(rows)]
    else:  # many logits near the maximum, as in a trained attention row
        values = [[max(INT8_MIN, min(INT8_MAX, round(rng.gauss(rng.randint(-60, 60), 8))))
                   for _ in range(length)] for _ in range(rows)]
    return torch.tensor(values, dtype=torch.int64)


def random_mode(rng) -> SoftmaxMode:
    return rng.choice([SoftmaxMode.ATTENTION, SoftmaxMode.ROUTER])


def make_groups(case: str, rng, cfg) -> list[Group]:
    """The stimulus of one data case."""
    groups = []
    if case == "random":
        for _ in range(2):
            commands = [Command(random_logits(rng, rng.randint(1, 3), length), random_mode(rng))
                        for length in pick_lengths(cfg, rng, 7)]
            groups.append(Group(random_table(rng), commands))
    elif case == "uniform":
        # Equal logits: every e = E[0] = 2^15, p = round_half_up(2^15·floor(2^31 / (L·2^15)) …).
        commands = []
        for length in pick_lengths(cfg, rng, 6):
            rows = torch.tensor([[rng.randint(INT8_MIN, INT8_MAX)] * length for _ in range(2)],
                                dtype=torch.int64)
            commands.append(Command(rows, random_mode(rng)))
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
                logits = torch.tensor(patterns, dtype=torch.int64)
                commands += [Command(logits, SoftmaxMode.ATTENTION),
                             Command(logits, SoftmaxMode.ROUTER)]
            groups.append(Group(numerics.exp_table(scale), commands))
    elif case == "router":
        # Router rows: one per token over E experts (E = 4, 16, max_experts), ties included.
        commands = []
        for experts in (4, 16, cfg.max_experts):
            logits = random_logits(rng, 12, experts)
            logits[0] = logits[0, 0]  # all experts tied
            commands.append(Command(logits, SoftmaxMode.ROUTER))
        groups.append(Group(random_table(rng), commands))
    elif case == "throughput":
        lanes = cfg.pe_cols
        commands = [
            Command(random_logits(rng, 32, lanes), SoftmaxMode.ROUTER),  # one-beat rows
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

    async def run(self, groups: list[Group]) -> tuple[list, list]:
        """Drive every group; return (DUT beats, expected beats) as (lanes list, last)."""
        lanes, rng = self.lanes, self.stimulus_rng
        logit_beats, expected = [], []
        for group in groups:
            for command in group.commands:
                rows, length = command.logits.shape
                golden = (numerics.router_scores if command.mode == SoftmaxMode.ROUTER
                          else numerics.softmax)
                out = golden(command.logits, group.table)
                beats = math.ceil(length / lanes)
                pad = beats * lanes - length
                for r in range(rows):
                    row_in = command.logits[r].tolist()
                    row_in += [rng.randint(INT8_MIN, INT8_MAX) for _ in range(pad)]  # ignored
                    row_out = out[r].tolist() + [0] * pad
                    for j in range(beats):
                        logit_beats.append(pack(self.logits_layout,
                                                row_in[j * lanes:(j + 1) * lanes]))
                        expected.append((row_out[j * lanes:(j + 1) * lanes], j == beats - 1))
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
        got = [(list(beat.data), bool(beat.last))
               for beat in map(self.out_layout.from_bits, raw)]
        return got, expected


def check_streaming(tb: TB, commands: list[Command], n_beats: int, busy_cycles: int) -> None:
    """One beat per cycle in and out, apart from one bubble per command and the fill."""
    lanes = tb.lanes
    bubbles = sum(t1 - t0 - 1 for t0, t1 in itertools.pairwise(tb.logits.accepted))
    elapsed = tb.probs.accepted[-1] - tb.logits.accepted[0] + 1
    longest = max(math.ceil(c.logits.shape[1] / lanes) for c in commands)
    tb.bench.log.info("%d beats (%d rows) in %d cycles, %d busy, %d input bubbles", n_beats,
                      sum(c.logits.shape[0] for c in commands), elapsed, busy_cycles, bubbles)
    assert bubbles <= len(commands), f"{bubbles} idle input cycles while streaming"
    # Steady state of the second command (129 long where max_tokens allows): one row every
    # ceil(L / lanes) cycles at the output.
    start = commands[0].logits.shape[0] * math.ceil(commands[0].logits.shape[1] / lanes)
    rows, length = commands[1].logits.shape
    row_beats = math.ceil(length / lanes)
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
