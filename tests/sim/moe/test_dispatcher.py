"""cocotb bench for :class:`m3vit.hw.moe.Dispatcher` (ports ``disp__*`` of the MoE bench top).

Run by ``tests/sim/test_moe.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; not a
pytest module. One generic test body is expanded over the data case and the flow option
(random gaps on the command and score streams). Each routing is an (M, E) matrix of INT16
router logits and an exp table; its score beats carry, as the softmax unit's router mode
does, H = lanes / 2 experts a beat: the :func:`m3vit.sw.quant.numerics.router_scores` in
lanes 0 … H−1 and ``max − logit`` in lanes H … 2H−1 (padded experts random: the block must
ignore them). After the block goes idle every table entry is read back through the block's
read ports — the list lookup for every active position, the slot table for every token, the
queue for every position — and compared with :func:`golden_tables`, built on
:func:`m3vit.sw.quant.numerics.route` (top-k of the logits, not of the scores).
"""

import itertools
import math
from dataclasses import dataclass

import cocotb
import torch
from amaranth.lib import data
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from m3vit.hw.moe import Dispatcher, slot_layout
from m3vit.hw.vector import SoftmaxUnit
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.stream_tb import Bench, StreamSource, pack
from m3vit.sw.compiler.isa_model import visit_order
from m3vit.sw.quant import numerics

PREFIX = "disp"
INT16_MIN, INT16_MAX = numerics.INT16_MIN, numerics.INT16_MAX
#: Cycles ``busy`` stays high beyond M·S (top-k, ``SCORES_PER_CYCLE`` experts a cycle:
#: ``Dispatcher.steps_per_token``) + E (scan) + M·k (queue) when scores never wait: 3 to
#: drain the top-k list, 1 into the scan, 1 into the queue pass, 4 through its pipeline
#: (measured), and the levels of the tree a step's candidates are merged in
#: (``Dispatcher.select_levels``, added where the configuration is known).
OVERHEAD_CYCLES = 9


@dataclass
class Route:
    """One dispatcher command and its router logits (``None`` for an illegal command)."""

    rows: int
    experts: int
    top_k: int
    logits: torch.Tensor | None = None  # (rows, experts) INT16 values, int64
    table: torch.Tensor | None = None  # numerics.exp_table


@dataclass
class Tables:
    """Everything the dispatcher exposes after a routing, as plain integers."""

    rows: int
    top_k: int
    entries: int
    n_active: int
    active: list[tuple[int, int, int]]  # (expert, start, count) per list position
    slots: list[list[tuple[int, int, int]]]  # per token, choices 0 … k−1: (expert, score, pos)
    queue: list[int]  # token per queue position

    def summary(self) -> tuple[int, int, int, int]:
        return self.rows, self.top_k, self.entries, self.n_active


def golden_tables(route: Route) -> Tables:
    """The dispatch tables of ``docs/isa.md`` (``ROUTE``) over ``numerics.route``."""
    rows, experts, k = route.rows, route.experts, route.top_k
    _, chosen, chosen_scores = numerics.route(route.logits, route.table, k)
    count = torch.bincount(chosen.flatten(), minlength=experts)
    start = torch.cumsum(count, 0) - count
    # A stable sort of the (token, choice) pairs by expert keeps tokens ascending per expert.
    order = torch.argsort(chosen.flatten(), stable=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(rows * k)
    pos = pos.reshape(rows, k)
    active = [(e, int(start[e]), int(count[e])) for e in visit_order(count.tolist())]
    slots = [[(int(chosen[t, j]), int(chosen_scores[t, j]), int(pos[t, j])) for j in range(k)]
             for t in range(rows)]
    return Tables(rows, k, rows * k, len(active), active, slots, (order // k).tolist())


def random_table(rng) -> torch.Tensor:
    """An exp table from nearly flat to steep (one table step = 256 logit steps)."""
    return numerics.exp_table(10 ** rng.uniform(-3, 0.3))


def clamp16(x: float) -> int:
    return max(INT16_MIN, min(INT16_MAX, round(x)))


def uniform_logits(rng, rows: int, experts: int, lo: int = INT16_MIN, hi: int = INT16_MAX
                   ) -> torch.Tensor:
    """Logits drawn uniformly from [lo, hi] (from the bench's seeded stream)."""
    return torch.tensor([[rng.randint(lo, hi) for _ in range(experts)] for _ in range(rows)],
                        dtype=torch.int64)


def realistic_logits(rng, rows: int, experts: int) -> torch.Tensor:
    """INT16 logits over the whole range, or a few clear favourites as a trained gate gives."""
    if rng.random() < 0.5:
        return uniform_logits(rng, rows, experts)
    spread = rng.choice([300, 3000, 10000])
    return torch.tensor([[clamp16(rng.gauss(0, spread)) for _ in range(experts)]
                         for _ in range(rows)], dtype=torch.int64)


def tied_logits(rng, rows: int, experts: int) -> torch.Tensor:
    """Logits from a few values, so most comparisons are ties; values one LSB or one table
    step (256) apart, which share a score or differ by one table entry."""
    v = rng.randint(INT16_MIN + 512, INT16_MAX)
    values = rng.choice([[0, 1], [v, v - 1, v - 256], [INT16_MIN, INT16_MAX], [5],
                         [v, v - 1, v - 2, v - 255, v - 256, v - 257]])
    return torch.tensor([[rng.choice(values) for _ in range(experts)] for _ in range(rows)],
                        dtype=torch.int64)


def near_tie_logits(rng, rows: int, experts: int) -> torch.Tensor:
    """Every token's logits within a few LSBs of each other (INT8 logits could not tell
    them apart, and most share one score), around a table-step boundary or not."""
    logits = []
    for _ in range(rows):
        base = rng.choice([256 * rng.randint(-120, 120), rng.randint(INT16_MIN + 8, INT16_MAX)])
        logits.append([clamp16(base + rng.randint(-3, 3)) for _ in range(experts)])
    return torch.tensor(logits, dtype=torch.int64)


def random_route(rng, rows: int, experts: int, top_k: int, logits=realistic_logits) -> Route:
    return Route(rows, experts, top_k, logits(rng, rows, experts), random_table(rng))


def degenerate_routes(rng, cfg) -> list[Route]:
    """Routings at the edges of the counting sort and of the ranking."""
    top = cfg.max_top_k
    routes = []
    # Every token to the same experts (one full queue per chosen expert, the rest empty).
    row = realistic_logits(rng, 1, 16 if cfg.max_experts >= 16 else cfg.max_experts)
    routes.append(Route(cfg.max_tokens, row.shape[1], top, row.repeat(cfg.max_tokens, 1),
                        random_table(rng)))
    # One token per expert: token t's favourite is expert t (k = 1) ...
    experts = min(cfg.max_experts, cfg.max_tokens)
    logits = uniform_logits(rng, experts, experts, -1000, 1000)
    logits.fill_diagonal_(INT16_MAX)
    routes.append(Route(experts, experts, 1, logits, random_table(rng)))
    # ... and, with k = 2, experts 2t and 2t + 1 (tied, so the lower one comes first).
    if top >= 2:
        half = experts // 2
        logits = uniform_logits(rng, half, experts, -1000, 1000)
        logits[torch.arange(half), 2 * torch.arange(half)] = 20000
        logits[torch.arange(half), 2 * torch.arange(half) + 1] = 20000
        routes.append(Route(half, experts, 2, logits, random_table(rng)))
    # The logits decide where the scores cannot: distinct logits within 16 LSBs (u = 0, so
    # every score of a token is equal under any table) in an order unrelated to the expert
    # index; ranking the scores, ties to the lower index, would pick experts 0 … k−1.
    experts = min(cfg.max_experts, 16)
    base = torch.tensor([[rng.randint(INT16_MIN, INT16_MAX - 2 * experts)] for _ in range(12)])
    ladder = torch.tensor([[(e * 5 + t) % experts for e in range(experts)] for t in range(12)])
    routes.append(Route(12, experts, min(top, experts), base + ladder, random_table(rng)))
    # Some experts never chosen: their logits are −2^15, and k of the others are above.
    experts = cfg.max_experts
    logits = realistic_logits(rng, 30, experts).clamp(min=INT16_MIN + 1)
    never = rng.sample(range(experts), experts - max(top, experts // 3))
    logits[:, never] = INT16_MIN
    routes.append(Route(30, experts, top, logits, random_table(rng)))
    # E = k: every token chooses every expert, in descending logit order.
    routes.append(random_route(rng, 25, top, top, tied_logits))
    routes.append(random_route(rng, 7, top, top))
    # E not a multiple of the experts a beat (the last beat's padded lanes are ignored),
    # E = 1.
    half = cfg.pe_cols // 2
    for experts in (half + 1, 2 * half - 1, cfg.pe_cols + 1, 1):
        if experts <= cfg.max_experts:
            routes.append(random_route(rng, rng.randint(5, 20), experts,
                                       rng.randint(1, min(top, experts))))
    # One token; the largest routing the configuration holds.
    routes.append(random_route(rng, 1, cfg.max_experts, top))
    routes.append(random_route(rng, cfg.max_tokens, cfg.max_experts, top))
    return routes


def illegal_routes(cfg) -> list[Route]:
    """Commands outside the configuration: consumed and ignored."""
    top, experts = cfg.max_top_k, cfg.max_experts
    return [
        Route(0, experts, 1),
        Route(cfg.max_tokens + 1, experts, 1),
        Route(4, experts, 0),
        Route(4, experts, top + 1),
        Route(4, top - 1 if top > 1 else 0, top),  # fewer experts than choices
        Route(4, experts + 1, 1),
        Route(4, 0, 1),
    ]


def expert_counts(cfg) -> list[int]:
    """E ∈ {4, 16} where the configuration holds them, and its maximum."""
    return sorted({e for e in (4, 16) if e <= cfg.max_experts} | {cfg.max_experts})


def make_routes(case: str, rng, cfg) -> list[Route]:
    """The stimulus of one data case (illegal commands are inserted by the test body)."""
    top = cfg.max_top_k
    # Token counts kept small where E is large: a token costs E cycles.
    def some_rows(experts: int) -> int:
        return rng.choice([1, 2, rng.randint(1, max(1, min(cfg.max_tokens, 1200 // experts)))])

    if case == "router":
        return [random_route(rng, some_rows(e), e, rng.randint(1, min(top, e)))
                for e in expert_counts(cfg) for _ in range(3)]
    if case == "ties":
        return [random_route(rng, some_rows(e), e, rng.randint(1, min(top, e)), logits)
                for e in expert_counts(cfg) for logits in (tied_logits, near_tie_logits)]
    if case == "degenerate":
        return degenerate_routes(rng, cfg)
    if case == "illegal":
        return [random_route(rng, 12, e, min(top, e)) for e in expert_counts(cfg)]
    if case == "back_to_back":
        return [random_route(rng, rng.randint(1, 8), e, rng.randint(1, min(top, e)),
                             rng.choice([realistic_logits, tied_logits, near_tie_logits]))
                for e in expert_counts(cfg) for _ in range(3)]
    if case == "throughput":
        return [random_route(rng, rows, e, min(top, e))
                for e in expert_counts(cfg) for rows in (1, max(1, min(cfg.max_tokens,
                                                                         640 // e)))]
    raise ValueError(f"unknown data case {case!r}")


class TB:
    """The dispatcher's ports: command and score streams, status, the three read ports."""

    def __init__(self, dut, *, input_gaps: bool) -> None:
        self.bench = Bench(dut)
        self.dut = dut
        self.cfg = bench_config()
        self.overhead = OVERHEAD_CYCLES + Dispatcher.select_levels(self.cfg)
        self.cmd_layout = Dispatcher.cmd_layout(self.cfg)
        self.scores_layout = SoftmaxUnit.out_layout(self.cfg)
        self.slot_layout = data.ArrayLayout(slot_layout(self.cfg), self.cfg.max_top_k)
        self.stimulus_rng = self.bench.rng()
        self.pad_rng = self.bench.rng()
        self.cmd = StreamSource(self.bench, f"{PREFIX}__cmd", gaps=input_gaps)
        self.scores = StreamSource(self.bench, f"{PREFIX}__scores", gaps=input_gaps)
        for name in ("list_index", "slot_addr", "slot_en", "queue_addr", "queue_en"):
            self.port(name).value = 0
        self.busy_intervals: list[tuple[int, int]] = []  # (first busy cycle, first idle one)
        self.completed: list[tuple[int, int, int, int]] = []  # status when busy fell
        cocotb.start_soon(self._monitor())

    def port(self, name: str):
        return self.dut[f"{PREFIX}__{name}"]

    def status(self) -> tuple[int, int, int, int]:
        return tuple(self.port(name).value.to_unsigned()
                     for name in ("rows", "top_k", "entries", "n_active"))

    async def _monitor(self) -> None:
        """Record every busy interval and the status the block shows when it ends."""
        busy = self.port("busy")
        while True:
            await RisingEdge(busy)
            busy_since = self.bench.cycle()
            await FallingEdge(busy)
            await ReadOnly()
            self.busy_intervals.append((busy_since, self.bench.cycle()))
            self.completed.append(self.status())

    def cmd_payload(self, route: Route) -> int:
        return pack(self.cmd_layout, {"rows": route.rows, "experts": route.experts,
                                      "top_k": route.top_k})

    def score_beats(self, route: Route) -> list[int]:
        """ceil(E / H) beats per token, ``last`` on its last: H scores, then the H experts'
        ``max − logit``; padded experts random in both."""
        half = self.cfg.pe_cols // 2
        beats = math.ceil(route.experts / half)
        scores = numerics.router_scores(route.logits, route.table)
        distances = route.logits.amax(dim=-1, keepdim=True) - route.logits
        payloads = []
        for score_row, distance_row in zip(scores.tolist(), distances.tolist(), strict=True):
            pad = beats * half - route.experts
            score_row += [self.pad_rng.randint(0, 2**16 - 1) for _ in range(pad)]
            distance_row += [self.pad_rng.randint(0, 2**16 - 1) for _ in range(pad)]
            payloads += [pack(self.scores_layout,
                              {"data": score_row[b * half:(b + 1) * half]
                                       + distance_row[b * half:(b + 1) * half],
                               "last": b == beats - 1})
                         for b in range(beats)]
        return payloads

    async def route(self, routes: list[Route]) -> None:
        """Send the commands back to back with all their score beats; wait for idle."""
        beats = [beat for r in routes if r.logits is not None for beat in self.score_beats(r)]
        sending = cocotb.start_soon(self.scores.send(beats))
        await self.cmd.send([self.cmd_payload(r) for r in routes])
        await sending
        await self.wait_idle(within=routes[-1].experts + routes[-1].rows * routes[-1].top_k
                             + 2 * self.overhead)

    async def wait_idle(self, within: int) -> None:
        for _ in range(within):
            await ReadOnly()
            if not self.port("busy").value:
                return
            await self.bench.edge
        raise AssertionError(f"busy still high {within} cycles after the last score beat "
                             "(the scan and the queue pass take E + M·k + a few)")

    async def read(self, addr: str, en: str | None, data: str, addresses: list[int]) -> list:
        """Read ``addresses`` one per cycle through a registered read port.

        With an enable, the cycle after the last read drives another address with the
        enable low, and the data must stay as it was.
        """
        values = []
        if not addresses:
            return values
        for n in range(len(addresses) + 2):
            await self.bench.edge
            last = n >= len(addresses)
            self.port(addr).value = addresses[0] if last else addresses[n]
            if en is not None:
                self.port(en).value = not last
            await ReadOnly()
            value = self.port(data).value.to_unsigned()
            if 1 <= n <= len(addresses):
                values.append(value)
            elif n == len(addresses) + 1 and en is not None:
                assert value == values[-1], f"{data} changed while {en} was low"
        await self.bench.edge
        return values

    async def read_tables(self, expected: Tables) -> Tables:
        """Every entry of the expected tables' extent, read back from the block."""
        await self.bench.edge
        await ReadOnly()
        rows, top_k, entries, n_active = self.status()
        positions = list(range(min(max(n_active, expected.n_active), self.cfg.max_experts)))
        experts = await self.read("list_index", None, "list_expert", positions)
        starts = await self.read("list_index", None, "list_start", positions)
        counts = await self.read("list_index", None, "list_count", positions)
        slots = await self.read("slot_addr", "slot_en", "slot", list(range(expected.rows)))
        queue = await self.read("queue_addr", "queue_en", "queue_token",
                                list(range(expected.entries)))
        slot_views = [self.slot_layout.from_bits(raw) for raw in slots]
        return Tables(
            rows, top_k, entries, n_active,
            list(zip(experts, starts, counts, strict=True)),
            [[(int(s[j].expert), int(s[j].score), int(s[j].pos)) for j in range(expected.top_k)]
             for s in slot_views],
            queue,
        )


def check_tables(got: Tables, expected: Tables, what: str) -> None:
    assert got.summary() == expected.summary(), (
        f"{what}: (rows, top_k, entries, n_active) {got.summary()} != {expected.summary()}")
    assert got.active == expected.active, f"{what}: active list {got.active} != {expected.active}"
    bad_slots = [(t, g, e) for t, (g, e) in enumerate(zip(got.slots, expected.slots,
                                                          strict=True)) if g != e]
    assert not bad_slots, (f"{what}: {len(bad_slots)} of {expected.rows} slot rows differ; "
                           f"(token, DUT, golden): {bad_slots[:3]}")
    bad_queue = [(q, g, e) for q, (g, e) in enumerate(zip(got.queue, expected.queue,
                                                          strict=True)) if g != e]
    assert not bad_queue, (f"{what}: {len(bad_queue)} of {expected.entries} queue positions "
                           f"differ; (position, DUT, golden): {bad_queue[:4]}")


def describe(route: Route) -> str:
    return f"M={route.rows} E={route.experts} k={route.top_k}"


CASES = [(case, gaps) for case in ("router", "ties", "degenerate", "illegal", "back_to_back")
         for gaps in (False, True)] + [("throughput", False)]


@cocotb.test(timeout_time=20, timeout_unit="ms")
@cocotb.parametrize((("case", "input_gaps"), CASES))
async def test_dispatcher(dut, case: str, input_gaps: bool) -> None:
    """Every table entry equals the golden dispatch of its logits."""
    tb = TB(dut, input_gaps=input_gaps)
    routes = make_routes(case, tb.stimulus_rng, tb.cfg)
    await tb.bench.reset()
    legal_done = []
    if case == "back_to_back":
        await tb.route(routes)
        legal_done = routes
        expected = golden_tables(routes[-1])
        check_tables(await tb.read_tables(expected), expected, describe(routes[-1]))
    else:
        expected = None
        for index, route in enumerate(routes):
            if case == "illegal" and index > 0:
                # The next routing's scores are already waiting: none may be taken.
                taken_before = len(tb.scores.accepted)
                waiting = cocotb.start_soon(tb.scores.send(tb.score_beats(route)))
                for bad in illegal_routes(tb.cfg):
                    await tb.cmd.send([tb.cmd_payload(bad)])
                    await tb.bench.cycles(3)
                    await tb.wait_idle(within=1)
                assert len(tb.scores.accepted) == taken_before, "an illegal command took scores"
                check_tables(await tb.read_tables(expected), expected,
                             f"after illegal commands, {describe(routes[index - 1])}")
                await tb.cmd.send([tb.cmd_payload(route)])
                await waiting
                await tb.wait_idle(within=route.experts + route.rows * route.top_k
                                   + 2 * tb.overhead)
            else:
                await tb.route([route])
            legal_done.append(route)
            expected = golden_tables(route)
            check_tables(await tb.read_tables(expected), expected, describe(route))

    # One busy interval per legal command, each ending with that command's status.
    assert tb.completed == [golden_tables(r).summary() for r in legal_done], (
        tb.completed)
    durations = [end - start for start, end in tb.busy_intervals]
    for route, cycles in zip(legal_done, durations, strict=True):
        ideal = (route.rows * Dispatcher.steps_per_token(tb.cfg, route.experts)
                 + route.experts + route.rows * route.top_k)
        tb.bench.log.info("%s: busy %d cycles = M·S + E + M·k + %d", describe(route), cycles,
                          cycles - ideal)
        if input_gaps:
            assert cycles >= ideal + tb.overhead
        else:
            assert cycles == ideal + tb.overhead, (describe(route), cycles, ideal)
    if case == "back_to_back" and not input_gaps:
        # The next command is taken in the first idle cycle.
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(tb.busy_intervals)]
        assert set(gaps) == {1}, gaps
    if input_gaps:
        assert tb.scores.idle_cycles > 0, "input_gaps=True but no idle cycle was inserted"
    tb.bench.log.info("%d routings checked; %d idle score cycles", len(legal_done),
                      tb.scores.idle_cycles)
