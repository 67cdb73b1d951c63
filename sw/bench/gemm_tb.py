# amaranth: UnusedElaboratable=no
"""cocotb test bench for :class:`m3vit.hw.gemm.GemmEngine`: stimulus, golden results, driver.

Not a test module itself: ``tests/sim/gemm/test_gemm_engine.py`` (correctness) and
:mod:`m3vit.sw.bench.gemm_utilization_tb` (the utilization benchmark) import it. The
configuration the DUT was generated from comes from
:func:`m3vit.sim.cocotb_runner.bench_config`.

A :class:`Pass` is one GEMM with its operands; :func:`make_pass` draws random operands
(INT8 edges, large biases, multipliers and shifts that both saturate and do not; for a
``wide`` pass, INT16 results at and beyond both saturation limits; for a ``row_scale``
pass, per-token multipliers and shifts for each N-tile, their extremes included) and
:meth:`Pass.expected` computes the results with :mod:`m3vit.sw.quant.numerics` — the golden
model's own functions. :class:`TB` turns a list of passes into the engine's five input
streams (in the order its docstring specifies: weight tiles row by row, or column by column
for a transposed pass; a row_scale pass's scales in the top three lanes of each N-tile's
last K-slice, with random bits in the shift lane's top two, which the engine ignores),
drives them all and collects the
output in one cycle loop. With ``interleaved`` the parameters and weights come from one
in-order source, as from a single DDR read stream (:class:`SharedOrder`).

The engine's intake (weight rows, parameter records and table entries a beat: its
``rows_per_beat``, ``params_per_beat`` and ``table_entries``) is read off the DUT's port
widths, so one bench drives the test engines (one row and one record a beat) and the
top's (:func:`m3vit.hw.engine.router.intake_shape`: four 64-byte rows and 32 records from
each 256-byte read entry on the ZCU104) alike.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import cocotb
import torch
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

from m3vit.hw.gemm import COUNTER_NAMES, GEMM_PARAM, TABLE_ENTRIES, GemmEngine
from m3vit.hw.isa import GemmOp
from m3vit.sim.cocotb_runner import bench_config

from ..quant import numerics

CLOCK_PERIOD_NS = 10
INT8_MIN, INT8_MAX = -128, 127
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
INT32_MAX = 2**31 - 1
UINT16_MAX = 2**16 - 1


@dataclass
class Pass:
    """One GEMM pass and its operands (integer tensors in int64)."""

    op: GemmOp
    x: torch.Tensor  # (M, K) INT8 activations
    w: torch.Tensor  # (N, K) INT8 weights
    bias: torch.Tensor  # (N,) INT32
    mult: torch.Tensor  # (N,) uint16
    shift: torch.Tensor  # (N,) 0..62
    table: torch.Tensor | None = None  # (256,) INT8, loaded before the pass when set
    transposed: bool = False  # weight tiles stream column by column
    wide: bool = False  # the command's ``wide`` bit (INT16 results in mode INT8 only)
    name: str = field(default="")
    # A row_scale pass (mode INT8): (N-tiles, M) per-token multipliers (uint16) and shifts
    # (0..63) replacing mult and shift, N-tile j's for its gemm_cols channels.
    row_mult: torch.Tensor | None = None
    row_shift: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def int16(self) -> bool:
        """Whether the pass's results are INT16: ``wide`` counts in mode INT8 only."""
        return self.wide and self.op == GemmOp.INT8

    @property
    def row_scale(self) -> bool:
        """Whether the pass is requantized per token (the command's ``row_scale`` bit)."""
        return self.row_mult is not None

    def expected(self) -> torch.Tensor:
        """(M, N) results from the golden model's functions."""
        if self.row_scale:
            # Each N-tile's rows with their own multiplier and shift (P·V's requantization,
            # as numerics.attention_pv applies it), the channels' bias; the scale's lanes
            # of the last K-slice count as 0.
            acc = numerics.gemm(scale_free(self.x), self.w, self.bias)
            tiles = self.row_mult.shape[0]
            return torch.cat([
                numerics.requantize(part, self.row_mult[j][:, None], self.row_shift[j][:, None])
                for j, part in enumerate(acc.chunk(tiles, dim=1))], dim=1)
        if self.op == GemmOp.INT32:
            return numerics.gemm(self.x, self.w, self.bias)
        if self.int16:
            return numerics.requantize16(numerics.gemm(self.x, self.w, self.bias),
                                         self.mult, self.shift)
        y = numerics.linear(self.x, self.w, self.bias, self.mult, self.shift)
        if self.op == GemmOp.INT8_TABLE:
            y = numerics.table_lookup(y, self.table)
        return y


def _int8(rng: random.Random, shape: tuple[int, ...], edge_fraction: float) -> torch.Tensor:
    """Uniform INT8 with a fraction of entries forced to −128 or 127."""
    values = [
        rng.choice((INT8_MIN, INT8_MAX)) if rng.random() < edge_fraction
        else rng.randint(INT8_MIN, INT8_MAX)
        for _ in range(int(torch.tensor(shape).prod()))
    ]
    return torch.tensor(values, dtype=torch.int64).reshape(shape)


#: Channel kinds of an INT16 (``wide``) pass besides ``random``: results saturated high and
#: low, INT16 values beyond INT8 of either sign, and values around a saturation limit.
INT16_KINDS = ("sat_hi", "sat_lo", "mid_hi", "mid_lo", "edge")


def _int16_channel(rng: random.Random, kind: str, k: int, bias_limit: int
                   ) -> tuple[int, int, int]:
    """``(bias, mult, shift)`` of an INT16 channel whose results are of ``kind`` for every
    token, whatever its accumulator (``|acc| ≤ k · 128²``)."""
    acc_bits = (k * INT8_MIN * INT8_MIN).bit_length()
    if kind in ("sat_hi", "sat_lo"):
        # |acc + bias| ≥ 2^29 − 2^acc_bits, times ≥ 2^15, over ≤ 2^28: beyond 2^15.
        sign = 1 if kind == "sat_hi" else -1
        magnitude = rng.choice((bias_limit, rng.randint(2**29, bias_limit)))
        return sign * magnitude, rng.randint(2**15, UINT16_MAX), rng.randint(0, 28)
    if kind in ("mid_hi", "mid_lo"):
        # bias / 2^s in ±[1000, 30000], acc / 2^s below 2^9: INT16, never INT8 nor saturated.
        s = max(acc_bits - 9, 0)
        t = rng.randint(0, 15)  # mult = 2^t, shift = s + t: the same value
        sign = 1 if kind == "mid_hi" else -1
        return sign * (rng.randint(1000, 30000) << s), 1 << t, s + t
    # "edge": bias / 2^s within 8 of a limit, acc / 2^s small: around 32767 or −32768.
    s = min(max(acc_bits - 3, 0), 15)
    limit = rng.choice((INT16_MAX, INT16_MIN))
    return ((limit + rng.randint(-8, 8)) << s) + rng.randint(0, (1 << s) - 1), 1, s


def scale_free(x: torch.Tensor) -> torch.Tensor:
    """A row_scale pass's activations as the array takes them: its last K-slice's top three
    lanes (the row's scale) as 0."""
    x = x.clone()
    x[:, -3:] = 0
    return x


def _row_scales(rng: random.Random, acc: torch.Tensor, tiles: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles, M) multipliers and shifts of a row_scale pass whose sums are ``acc``.

    Mostly a shift that maps the row's median ``|acc|`` (over the N-tile's channels) onto
    INT8 give or take a few bits, so that results saturate on some channels and not on
    others; multipliers 0, 1, 65535 or random, shifts 0, 62, 63 at random; the first
    tokens of each N-tile take the extremes in turn (M = 0, 1, 65535 and shift 0, 62, 63)
    where there are enough of them.
    """
    tokens = acc.shape[0]
    extremes = [(0, None), (1, 0), (UINT16_MAX, 62), (None, 63), (UINT16_MAX, 0)]
    mult = torch.zeros(tiles, tokens, dtype=torch.int64)
    shift = torch.zeros(tiles, tokens, dtype=torch.int64)
    for j, part in enumerate(acc.chunk(tiles, dim=1)):
        for m in range(tokens):
            forced = extremes[(m + j) % len(extremes)] if tokens * tiles >= 6 else (None, None)
            scale = forced[0] if forced[0] is not None else rng.choice(
                (0, 1, UINT16_MAX, rng.randint(2**15, UINT16_MAX), rng.randint(0, UINT16_MAX),
                 rng.randint(0, UINT16_MAX)))
            typical = int(part[m].abs().median()) * max(scale, 1)
            s = min(max(typical.bit_length() - 7 + rng.randint(-3, 3), 0), 63)
            if forced[1] is not None:
                s = forced[1]
            elif rng.random() < 0.1:
                s = rng.choice((0, 62, 63))
            mult[j, m], shift[j, m] = scale, s
    return mult, shift


def make_pass(rng: random.Random, op: GemmOp, tokens: int, k: int, n: int, *,
              transposed: bool = False, wide: bool = False, row_scale_tiles: int = 0) -> Pass:
    """Random operands for one pass, chosen to exercise every path of the output stage.

    Biases range from small to as large as keeps every sum in INT32 (the quantizer's
    guarantee); multipliers include 0, 1, 65535 and normalised values; shifts sit near the
    one that maps the typical accumulator onto INT8, with offsets that saturate, round to
    zero, or use the extremes 0 and 62.

    ``wide`` sets the command's bit; in mode INT8 (INT16 results) shifts then sit near the
    one that maps the typical accumulator onto INT16, and some channels (at least one of
    each :data:`INT16_KINDS` but ``edge`` when N ≥ 4, at random positions) saturate high or
    low for every token, land beyond INT8 without saturating, or straddle a saturation
    limit. In the other modes ``wide`` changes nothing (the engine ignores it).

    ``row_scale_tiles`` > 0 makes a ``row_scale`` pass (mode INT8, not ``wide``) of that
    many N-tiles: per-token multipliers and shifts, different for every N-tile, replace the
    channels' (:func:`_row_scales`); the channels' ``mult`` and ``shift`` are still drawn
    and streamed, and must be ignored.
    """
    if row_scale_tiles and (op != GemmOp.INT8 or wide or n % row_scale_tiles):
        raise ValueError("a row_scale pass is mode INT8, not wide, of whole N-tiles")
    int16 = wide and op == GemmOp.INT8
    x = _int8(rng, (tokens, k), 0.1)
    w = _int8(rng, (n, k), 0.1)
    if tokens > 1 and n > 1:
        # One token and one channel at the extremes: the largest and smallest sums.
        x[0] = INT8_MIN
        w[0] = INT8_MIN
        w[1] = INT8_MAX
    bias_limit = INT32_MAX - k * INT8_MIN * INT8_MIN
    bias, mult, shift = [], [], []
    kinds = ["random"] * n
    if int16:
        kinds = [rng.choice(("random",) * 3 + INT16_KINDS) for _ in range(n)]
        if n >= 4:
            required = INT16_KINDS[:4]
            for channel, kind in zip(rng.sample(range(n), len(required)), required, strict=True):
                kinds[channel] = kind
    for kind in kinds:
        if kind != "random":
            channel = _int16_channel(rng, kind, k, bias_limit)
            for values, value in zip((bias, mult, shift), channel, strict=True):
                values.append(value)
            continue
        magnitude = rng.choice((2**4, 2**12, 2**20, 2**28, bias_limit))
        bias.append(rng.choice((bias_limit, -bias_limit)) if magnitude == bias_limit
                    else rng.randint(-magnitude, magnitude))
        mult.append(rng.choice((0, 1, UINT16_MAX, rng.randint(2**15, UINT16_MAX),
                                rng.randint(0, UINT16_MAX))))
        typical = (abs(bias[-1]) + 128 * 64 * k) * max(mult[-1], 1)
        s = typical.bit_length() - (15 if int16 else 7) + rng.randint(-4, 4)
        shift.append(rng.choice((0, 62)) if rng.random() < 0.1 else min(max(s, 0), 62))
    table = _int8(rng, (TABLE_ENTRIES,), 0.05) if op == GemmOp.INT8_TABLE else None
    row_mult = row_shift = None
    if row_scale_tiles:
        acc = numerics.gemm(scale_free(x), w, torch.tensor(bias, dtype=torch.int64))
        row_mult, row_shift = _row_scales(rng, acc, row_scale_tiles)
    return Pass(
        op=op,
        x=x,
        w=w,
        bias=torch.tensor(bias, dtype=torch.int64),
        mult=torch.tensor(mult, dtype=torch.int64),
        shift=torch.tensor(shift, dtype=torch.int64),
        table=table,
        transposed=transposed,
        wide=wide,
        name=(f"{op.name} M={tokens} K={k} N={n}" + (" wide" if wide else "")
              + (" transposed" if transposed else "") + (" row_scale" if row_scale_tiles else "")),
        row_mult=row_mult,
        row_shift=row_shift,
    )


def _per_beat(payload, item_bits: int, name: str) -> int:
    """Items of ``item_bits`` bits a beat of the DUT's ``payload`` signal carries.

    Raises
    ------
    AssertionError
        If the payload is not a whole number of items: the DUT is not a
        :class:`~m3vit.hw.gemm.GemmEngine` of the bench's configuration.
    """
    width = len(payload)
    assert width % item_bits == 0 and width > 0, (
        f"{name} payload of {width} bits is not whole items of {item_bits} bits")
    return width // item_bits


class SharedOrder:
    """The beat order of several input ports fed by one in-order source.

    Models one DDR read stream whose beats are steered to different engine streams
    (per N-tile: its parameters, then its weight tiles): a port may offer its next beat only
    when that beat is the source's next one, so a beat the engine does not take blocks every
    later beat of every port.
    """

    def __init__(self) -> None:
        self.name = "shared"
        self.order: list[StreamPort] = []
        self.position = 0

    def turn_of(self, port: StreamPort) -> bool:
        """Whether the source's next beat is ``port``'s."""
        return self.position < len(self.order) and self.order[self.position] is port


class StreamPort:
    """One stream of the DUT: its signal handles and, for an input, the beats to send.

    ``gap_probability`` inserts idle cycles at random; ``bytes_per_cycle`` instead limits the
    rate like a bus of that width (a beat of ``beat_bytes`` goes out when enough bandwidth
    has accrued; at most one beat's worth is banked while the DUT is not taking).
    ``pauses`` maps a beat's index to idle cycles before it is first offered: a gap at a
    chosen point.
    """

    def __init__(self, dut, prefix: str, rng: random.Random, *, gap_probability: float = 0.0,
                 bytes_per_cycle: float | None = None, beat_bytes: int = 1) -> None:
        self.name = prefix
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.payload = getattr(dut, f"{prefix}__payload")
        self.rng = rng
        self.gap_probability = gap_probability
        self.bytes_per_cycle = bytes_per_cycle
        self.beat_bytes = beat_bytes
        self.credit = float(beat_bytes)
        self.beats: list[int] = []
        self.position = 0
        self.holding = False
        self.driven_valid = False
        self.driven_payload: int | None = None
        self.idle_cycles = 0
        self.taken_cycles: list[int] = []
        self.shared: SharedOrder | None = None
        self.pauses: dict[int, int] = {}

    def drive(self) -> None:
        """Present the next beat (or idle) for this cycle; a held beat stays unchanged."""
        if self.bytes_per_cycle is not None:
            self.credit = min(self.credit + self.bytes_per_cycle, float(self.beat_bytes))
        if self.holding:
            return
        valid = self.position < len(self.beats)
        if valid and self.pauses.get(self.position, 0) > 0:
            self.pauses[self.position] -= 1
            valid = False
        if valid and self.shared is not None and not self.shared.turn_of(self):
            valid = False
        if valid and self.rng.random() < self.gap_probability:
            valid = False
            self.idle_cycles += 1
        if valid and self.bytes_per_cycle is not None and self.credit < self.beat_bytes:
            valid = False
        if valid != self.driven_valid:
            self.driven_valid = valid
            self.valid.value = valid
        if valid and self.driven_payload != self.beats[self.position]:
            self.driven_payload = self.beats[self.position]
            self.payload.value = self.driven_payload

    def sample(self, cycle: int) -> None:
        """After the cycle settled: was the presented beat taken at the coming edge?"""
        taken = self.driven_valid and bool(self.ready.value)
        if taken:
            self.position += 1
            self.taken_cycles.append(cycle)
            if self.shared is not None:
                self.shared.position += 1
            if self.bytes_per_cycle is not None:
                self.credit -= self.beat_bytes
        self.holding = self.driven_valid and not taken


class TB:
    """Clock, reset, and one cycle loop that drives every input stream and checks the output.

    Handshakes are decided on a settled cycle, as in the toolchain bench: inputs are written
    after a rising edge and ``valid & ready`` is sampled in the ``ReadOnly`` phase. One
    coroutine serves all six streams, which is what keeps a 32 × 32 run at a few seconds.

    Parameters
    ----------
    dut : cocotb handle
        The ``gemm_engine`` top.
    gaps : bool
        Random idle cycles on every input stream.
    backpressure : bool
        Random ``ready`` low on the result stream.
    weight_bytes_per_cycle : float, optional
        Limit the weight stream to this bandwidth (the utilization benchmark).
    interleaved : bool
        Parameters and weights from one in-order source (:class:`SharedOrder`): for each
        N-tile, its ``gemm_cols`` parameter records, then its ``k_slices`` weight tiles.

    Attributes
    ----------
    rows_per_beat, params_per_beat, table_entries : int
        The DUT's intake, from its port widths: weight rows (or columns) a ``weights``
        beat, parameter records a ``params`` beat, table entries a ``table`` beat.
    """

    def __init__(self, dut, *, gaps: bool, backpressure: bool,
                 weight_bytes_per_cycle: float | None = None,
                 interleaved: bool = False) -> None:
        self.dut = dut
        self.log = dut._log
        self.config = bench_config()
        self.seed = cocotb.RANDOM_SEED
        # cocotb derives it from COCOTB_RANDOM_SEED and the test name; logged for reruns.
        self.log.info("test seed %d", self.seed)
        seeds = random.Random(self.seed)
        self.rng = random.Random(seeds.getrandbits(64))
        gap = 0.3 if gaps else 0.0
        cfg = self.config
        # The engine's intake, read off the DUT (the configuration does not say how the
        # engine was built): one row and one record a beat in the benches of tests/sim/,
        # the top's intake in the utilization benchmark. Nothing random is drawn here, so a
        # bench's stimulus does not depend on it.
        self.rows_per_beat = _per_beat(dut.weights__payload, 8 * cfg.gemm_cols, "weights")
        self.params_per_beat = _per_beat(dut.params__payload, GEMM_PARAM.size, "params")
        self.table_entries = _per_beat(dut.table__payload, 8, "table")

        def port(prefix: str, **kwargs) -> StreamPort:
            return StreamPort(dut, prefix, random.Random(seeds.getrandbits(64)), **kwargs)

        self.command = port("command", gap_probability=gap)
        # A weight beat is rows_per_beat rows of gemm_cols bytes: a bandwidth limit of one
        # beat's bytes a cycle lets one beat through a cycle, as the top's read router does.
        self.weights = port("weights", gap_probability=gap,
                            bytes_per_cycle=weight_bytes_per_cycle,
                            beat_bytes=cfg.gemm_cols * self.rows_per_beat)
        self.activations = port("activations", gap_probability=gap)
        self.params = port("params", gap_probability=gap)
        self.table = port("table", gap_probability=gap)
        self.inputs = [self.command, self.weights, self.activations, self.params, self.table]
        self.shared = SharedOrder() if interleaved else None
        self.weights.shared = self.params.shared = self.shared
        self.sink_rng = random.Random(seeds.getrandbits(64))
        # The ignored bits of the scales' shift lanes (drawn last: the other streams' draws
        # stay those of a bench without row_scale passes).
        self.scale_rng = random.Random(seeds.getrandbits(64))
        self.backpressure = backpressure
        self.results_valid = dut.results__valid
        self.results_ready = dut.results__ready
        self.results_payload = dut.results__payload
        self.output_stall_cycles = 0
        self.result_cycles: list[int] = []
        self.cycle = 0
        self.edge = RisingEdge(dut.clk)
        # The payload layouts of the hardware itself (building the component elaborates
        # nothing; it also checks the intake read off the DUT).
        engine = GemmEngine(cfg, rows_per_beat=self.rows_per_beat,
                            params_per_beat=self.params_per_beat,
                            table_entries=self.table_entries)
        self.layouts = SimpleNamespace(
            command=engine.command.payload.shape(),
            weights=engine.weights.payload.shape(),
            activations=engine.activations.payload.shape(),
            params=engine.params.payload.shape(),
            results=engine.results.payload.shape(),
        )
        Clock(dut.clk, CLOCK_PERIOD_NS, unit="ns").start()

    async def reset(self) -> None:
        """Hold ``rst`` for two cycles with every stream idle."""
        for stream_port in self.inputs:
            stream_port.valid.value = 0
            stream_port.payload.value = 0
            # What the port believes it drives, for a reset between runs.
            stream_port.driven_valid = False
            stream_port.driven_payload = 0
            stream_port.holding = False
        self.results_ready.value = 0
        self.dut.rst.value = 1
        for _ in range(2):
            await self.edge
        self.dut.rst.value = 0
        await self.edge

    def counters(self) -> dict[str, int]:
        """The DUT's performance counters now."""
        return {name: int(getattr(self.dut, f"counters__{name}").value) for name in COUNTER_NAMES}

    # ---- beats ------------------------------------------------------------------------------

    def command_beat(self, op: GemmOp, tokens: int = 0, k_slices: int = 0,
                     n_tiles: int = 0, transposed: bool = False, wide: bool = False,
                     row_scale: bool = False) -> int:
        """Payload bits of one command."""
        return self.layouts.command.const({
            "op": op, "tokens": tokens, "k_slices": k_slices, "n_tiles": n_tiles,
            "transposed": transposed, "wide": wide, "row_scale": row_scale,
        }).as_bits()

    def scale_lanes(self, mult: int, shift: int) -> list[int]:
        """A token's scale as the top three lanes of its last K-slice: the multiplier's
        low and high byte, the shift in the last lane's low 6 bits (random top bits)."""
        lanes = [mult & 0xFF, mult >> 8, shift | self.scale_rng.getrandbits(2) << 6]
        return [lane - 256 if lane >= 128 else lane for lane in lanes]

    def queue_pass(self, gemm: Pass) -> None:
        """Append one pass (and its table load) to the input streams, in protocol order."""
        rows, cols = self.config.pe_rows, self.config.gemm_cols
        tokens, k = gemm.x.shape
        n = gemm.w.shape[0]
        if k % rows or n % cols:
            raise ValueError(f"K={k} and N={n} must be multiples of {rows} and {cols}")
        k_slices, n_tiles = k // rows, n // cols
        if gemm.table is not None:
            self.command.beats.append(self.command_beat(GemmOp.LOAD_TABLE))
            # T entries a beat (the engine's ``table_entries``: the payload's width / 8),
            # entry 0 in the low byte.
            per_beat = self.table_entries
            entries = [value & 0xFF for value in gemm.table.tolist()]
            self.table.beats += [
                sum(e << (8 * i) for i, e in enumerate(entries[b:b + per_beat]))
                for b in range(0, len(entries), per_beat)]
        self.command.beats.append(
            self.command_beat(gemm.op, tokens, k_slices, n_tiles, gemm.transposed, gemm.wide,
                              gemm.row_scale))
        w = gemm.w.tolist()
        x = gemm.x.tolist()
        # W rows (or columns) a weight beat and P records a parameter beat; W divides
        # pe_rows (and, for a transposed pass, gemm_cols) and P gemm_cols, so a tile's rows
        # and an N-tile's records are whole beats and beats never straddle two of them.
        per_row_beat, per_param_beat = self.rows_per_beat, self.params_per_beat
        for j in range(n_tiles):
            if self.shared is not None:
                per_tile = cols if gemm.transposed else rows
                self.shared.order += ([self.params] * (cols // per_param_beat)
                                      + [self.weights] * (k_slices * per_tile // per_row_beat))
            for s in range(k_slices):
                if gemm.transposed:
                    # Column c of the tile: row j·C + c of W over the slice, in the first
                    # pe_rows lanes (rows <= cols).
                    beats = [w[j * cols + c][s * rows:(s + 1) * rows] + [0] * (cols - rows)
                             for c in range(cols)]
                else:
                    beats = [[w[j * cols + c][s * rows + r] for c in range(cols)]
                             for r in range(rows)]
                # rows_per_beat rows (or columns) a beat, the first in element 0.
                self.weights.beats += [
                    self.layouts.weights.const(beats[b:b + per_row_beat]).as_bits()
                    for b in range(0, len(beats), per_row_beat)]
                for m in range(tokens):
                    lanes = x[m][s * rows:(s + 1) * rows]
                    if gemm.row_scale and s == k_slices - 1:
                        lanes = lanes[:-3] + self.scale_lanes(int(gemm.row_mult[j, m]),
                                                              int(gemm.row_shift[j, m]))
                    self.activations.beats.append(
                        self.layouts.activations.const(lanes).as_bits())
            records = [{"bias": int(gemm.bias[channel]), "mult": int(gemm.mult[channel]),
                        "shift": int(gemm.shift[channel])}
                       for channel in range(j * cols, (j + 1) * cols)]
            # params_per_beat records a beat, the N-tile's first channel in element 0.
            self.params.beats += [
                self.layouts.params.const(records[b:b + per_param_beat]).as_bits()
                for b in range(0, cols, per_param_beat)]

    def decode(self, op: GemmOp, bits: int, int16: bool = False) -> list[int]:
        """One result beat (a word) as its ``pe_cols`` integers (``pe_cols / 2`` INT16 ones,
        bits 16c … 16c + 15 of the ``int8`` view, with ``int16``)."""
        view = self.layouts.results.from_bits(bits)
        if op != GemmOp.INT32:
            # The INT8 modes (INT16 results too) leave the upper bits of the union zero.
            assert bits >> (8 * self.config.pe_cols) == 0, f"upper bits set in {bits:#x}"
        if int16:
            low = view.int8.as_bits()
            halves = [(low >> (16 * c)) & 0xFFFF for c in range(self.config.pe_cols // 2)]
            return [h - (1 << 16) if h >> 15 else h for h in halves]
        return list(view.int32 if op == GemmOp.INT32 else view.int8)

    # ---- the cycle loop -----------------------------------------------------------------------

    async def run(self, result_count: int, *, max_cycles: int) -> list[int]:
        """Drive all queued beats and collect ``result_count`` raw result beats.

        Checks every cycle that a result offered and not taken stays unchanged.
        """
        results: list[int] = []
        pending: int | None = None
        driven_ready = None
        start = self.cycle
        while len(results) < result_count:
            await self.edge
            self.cycle += 1
            assert self.cycle - start <= max_cycles, (
                f"timeout: {len(results)} of {result_count} results after {max_cycles} cycles; "
                + ", ".join(f"{p.name} {p.position}/{len(p.beats)}"
                            for p in self.inputs)
                + ("" if self.shared is None else
                   f", shared {self.shared.position}/{len(self.shared.order)}")
            )
            for stream_port in self.inputs:
                stream_port.drive()
            ready = not (self.backpressure and self.sink_rng.random() < 0.5)
            if ready != driven_ready:
                driven_ready = ready
                self.results_ready.value = ready
            await ReadOnly()
            for stream_port in self.inputs:
                stream_port.sample(self.cycle)
            valid = bool(self.results_valid.value)
            payload = int(self.results_payload.value) if valid else None
            if pending is not None:
                assert valid and payload == pending, (
                    f"result changed before it was taken: held {pending:#x}, now "
                    f"valid={valid} payload={payload}"
                )
            pending = payload if valid and not ready else None
            self.output_stall_cycles += valid and not ready
            if valid and ready:
                results.append(payload)
                self.result_cycles.append(self.cycle)
        await self.edge
        self.cycle += 1
        self.results_ready.value = 0
        return results

    async def run_passes(self, passes: list[Pass], *, max_cycles: int | None = None) -> None:
        """Queue, run and check a list of passes, in order, against the golden model."""
        for gemm in passes:
            self.queue_pass(gemm)
        await self.run_queued(passes, max_cycles=max_cycles)

    async def run_queued(self, passes: list[Pass], *, max_cycles: int | None = None) -> None:
        """Run what is queued and check it: ``passes`` are the queued passes, in order."""
        words, cols = self.config.gemm_words, self.config.gemm_cols
        # Words a token and N-tile: twice as many for INT16 results, half the lanes each.
        per_row = [words * (2 if gemm.int16 else 1) for gemm in passes]
        counts = [gemm.tokens * (gemm.w.shape[0] // cols) * row
                  for gemm, row in zip(passes, per_row, strict=True)]
        if max_cycles is None:
            beats = sum(len(p.beats) for p in self.inputs)
            max_cycles = 20 * beats + 1000
        raw = await self.run(sum(counts), max_cycles=max_cycles)
        position = 0
        for gemm, count, row in zip(passes, counts, per_row, strict=True):
            expected = gemm.expected()
            got = torch.zeros_like(expected)
            width = cols // row  # channels a word
            for index, bits in enumerate(raw[position:position + count]):
                # Results: for each N-tile, for each token, its words.
                j, rest = divmod(index, gemm.tokens * row)
                m, v = divmod(rest, row)
                first = j * cols + v * width
                got[m, first:first + width] = torch.tensor(
                    self.decode(gemm.op, bits, gemm.int16))
            position += count
            wrong = (got != expected).nonzero().tolist()
            assert not wrong, (
                f"{gemm.name}: {len(wrong)} of {expected.numel()} results differ; first "
                f"(token, channel, DUT, golden): "
                f"{[(m, n, int(got[m, n]), int(expected[m, n])) for m, n in wrong[:5]]}"
            )
            self.log.info("%s: %d results exact", gemm.name, expected.numel())
        for stream_port in self.inputs:
            left = len(stream_port.beats) - stream_port.position
            assert left == 0, f"{stream_port.name}: {left} beats were never taken"
