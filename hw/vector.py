"""The vector unit: the accelerator's element-wise and row-wise INT8 operations.

Four blocks, each a :class:`~amaranth.lib.wiring.Component` parameterised by an
:class:`~m3vit.hw.config.AccelConfig` and bit-exact to the function of ``docs/numerics.md``
(and :mod:`m3vit.sw.quant.numerics`) named in its docstring:

* :class:`LayerNormUnit` — integer LayerNorm over token rows (``layernorm``);
* :class:`SoftmaxUnit` — row-relative attention probabilities over INT8 logits, each row
  ending with its P·V scale (``softmax``, ``row_scale``), and router scores over INT16
  logits (``router_scores``);
* :class:`ResidualAdd` — the residual add across scales (``residual_add``);
* :class:`TableLookup` — a 256-entry INT8 table such as GELU (``table_lookup``).

Conventions shared by all four
------------------------------
* ``lanes = cfg.pe_cols`` INT8 values travel per beat as ``ArrayLayout(signed(8), lanes)``;
  a row of D values is ``D / lanes`` beats, the first beat holding elements 0 … lanes−1.
* Every interface is an :mod:`amaranth.lib.stream`: a beat moves on a rising edge where
  ``valid & ready``; ``valid`` never depends on ``ready``; a ``ready`` may depend on the
  ``valid`` of another input of the same block (a join). Outputs come from a registered queue,
  so output ``valid``/``payload`` are register outputs.
* A command (``cmd``) describes a whole tensor (a count of rows or beats plus per-command
  parameters). A command is taken while the block's front end is idle, so commands follow
  each other back to back, and beats of consecutive commands overlap inside the pipeline
  (each beat carries its own parameters down the pipe). A command whose geometry is zero or
  exceeds the configuration is consumed and ignored: it takes no input and gives no output
  (the compiler never issues one; this keeps a bad command from hanging the block).
* Each block outputs ``busy`` (a command or a beat is in flight anywhere in the block) and
  ``busy_cycles``, a free-running 32-bit count of cycles with ``busy`` high since reset
  (read it before and after a run and subtract modulo 2^32).
* Parameters and tables are written through their own stream, accepted only while the block
  is not busy (``ready = ~busy``), except :class:`TableLookup`, whose writes take priority
  over lookups (see there). A writer therefore never races a computation.

Timing (300 MHz)
----------------
Internal datapaths are non-stalling pipelines with a register after every adder or
comparator level of a reduction, after every wide multiply twice (the DSP48E2 M and P
registers), and around the 64-bit add/shift/saturate of LayerNorm. Back-pressure never
reaches into a pipeline: each pipeline ends in a queue and a beat (or row) enters the
pipeline only when a credit for that queue is free, so no clock enable fans out to wide
pipeline registers. The long-latency operations of a row — LayerNorm's integer square root
and both blocks' reciprocal — are fully pipelined (one result bit per stage), so a new row
can start every cycle and throughput is one beat per cycle on every port.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .config import AccelConfig
from .pipeline import check_config as _check_config
from .pipeline import credit_counter as _credits
from .pipeline import output_queue as _queue
from .pipeline import pipeline_delay as _delay
from .pipeline import pipeline_reg as _reg

__all__ = [
    "BUSY_COUNTER_BITS",
    "INT8",
    "LN_BIAS_BITS",
    "LN_EPS_BITS",
    "LN_GAIN_BITS",
    "ROW_COUNT_BITS",
    "SHIFT_BITS",
    "LayerNormUnit",
    "ResidualAdd",
    "SoftmaxMode",
    "SoftmaxUnit",
    "TableLookup",
    "lane_layout",
    "row_beat_layout",
]

INT8 = signed(8)
"""An INT8 activation lane."""
ROW_COUNT_BITS = 16
"""Width of every command's row count (rows per command ≤ 65,535)."""
SHIFT_BITS = 6
"""Right shifts are 0 … 62 (``numerics.MAX_SHIFT``)."""
BUSY_COUNTER_BITS = 32
"""Width of each block's ``busy_cycles`` counter (wraps modulo 2^32)."""
LN_GAIN_BITS = 16
"""LayerNorm gain: signed 16-bit (the quantizer keeps |g| < 2^15)."""
LN_BIAS_BITS = 64
"""LayerNorm bias: signed 64-bit, the quantizer's int64, so no bias the package can hold is
cut. The bias add and the shift run in 64-bit two's complement like the golden model's int64
(exact whenever that model does not wrap, i.e. for every |b| < 2^62)."""
LN_EPS_BITS = 52
"""LayerNorm ``eps_term``: unsigned, < 2^52, so that V = Σd² + eps_term < 2^53."""

_RCP_NUMERATOR = 1 << 31  # floor(2^31 / x) for LayerNorm (LN_RCP_BITS) and softmax (RCP_BITS)
_EXP_SHAPE = unsigned(16)  # exp table entries: uint16 ≤ 32768
_PROB_SHIFT = 24  # RCP_BITS − PROB_BITS
_PROB_MULT = 127 << 9  # numerics.PROB_MULT: E[0] = 2^15 becomes exactly 127
_ROW_MULT_BITS = 16  # numerics.ROW_MULT_BITS: the row scale's M
_SCORE_SHIFT = 16  # RCP_BITS − SCORE_BITS
_PROB_MAX = 127
_SCORE_MAX = (1 << 15) - 1


class SoftmaxMode(enum.Enum, shape=1):
    """What a :class:`SoftmaxUnit` command reads and computes."""

    #: Attention probabilities over INT8 logits (one a lane): ``u = min(m − l, 255)``,
    #: ``round_half_up(e·65024 / 2^24)`` (0 … 127, relative to the row's largest), each
    #: row ending with its scale: ``row_scale(floor(2^31 / Σe), mult, shift)``.
    ATTENTION = 0
    #: Router scores over INT16 logits (one per two lanes): ``u = min((m − l) >> 8, 255)``,
    #: ``min(32767, round_half_up(e·rcp / 2^16))`` (scale 2^−15), each with ``m − l``.
    ROUTER = 1


def lane_layout(cfg: AccelConfig, shape=INT8) -> data.ArrayLayout:
    """One beat of ``cfg.pe_cols`` lanes of ``shape`` (INT8 by default)."""
    return data.ArrayLayout(shape, cfg.pe_cols)


def row_beat_layout(cfg: AccelConfig, shape=INT8) -> data.StructLayout:
    """An output beat: ``data`` (the lanes) and ``last`` (the beat closes a row/command)."""
    return data.StructLayout({"data": lane_layout(cfg, shape), "last": 1})


def _tree(m: Module, name: str, values: list, combine) -> tuple[Value, int]:
    """Reduce ``values`` pairwise with ``combine``, one register stage per tree level.

    Returns the registered result and the number of levels (the latency in cycles).
    """
    level = 0
    while len(values) > 1:
        values = [
            _reg(m, combine(values[i], values[i + 1]), name=f"{name}_l{level}_{i // 2}")
            for i in range(0, len(values), 2)
        ]
        level += 1
    return values[0], level


def _busy_counter(m: Module, busy: Value, busy_cycles: Value) -> None:
    m.d.sync += busy_cycles.eq(busy_cycles + busy)


class _IsqrtPipeline(wiring.Component):
    """Exact ``floor(sqrt(value))``, one root bit per stage, a new value every cycle.

    The digit-by-digit (restoring) method: each stage appends two bits of the value to the
    remainder and subtracts ``4·root + 1`` when it fits. Latency ``root_bits`` cycles; a
    ``tag`` travels with each value. Non-stalling (``always_ready`` streams).
    """

    def __init__(self, root_bits: int, tag_shape):
        self._root_bits = root_bits
        self._tag_shape = tag_shape
        super().__init__({
            "i": In(stream.Signature(
                data.StructLayout({"value": unsigned(2 * root_bits), "tag": tag_shape}),
                always_ready=True)),
            "o": Out(stream.Signature(
                data.StructLayout({"value": unsigned(root_bits), "tag": tag_shape}),
                always_ready=True)),
        })

    def elaborate(self, platform):
        m = Module()
        n = self._root_bits
        valid, rest, tag = self.i.valid, self.i.payload.value, self.i.payload.tag
        rem, root = Const(0, n + 2), Const(0, 1)
        for k in reversed(range(n)):
            current = Cat(rest[2 * k:2 * k + 2], rem)  # 4·rem + next two bits
            trial = Cat(Const(1, 2), root)  # 4·root + 1
            fits = current >= trial
            stage = f"isqrt{k}"
            valid = _reg(m, valid, name=f"{stage}_valid")
            tag = _reg(m, tag, self._tag_shape, name=f"{stage}_tag")
            rest = _reg(m, rest[:2 * k], name=f"{stage}_rest") if k else rest[:0]
            # rem ≤ 2·root < 2^(n+1) after every step (the classic bound).
            rem = _reg(m, Mux(fits, current - trial, current), unsigned(n + 2),
                       name=f"{stage}_rem")
            root = _reg(m, Cat(fits, root), unsigned(n - k), name=f"{stage}_root")
        m.d.comb += [
            self.o.valid.eq(valid),
            self.o.payload.value.eq(root),
            self.o.payload.tag.eq(tag),
        ]
        return m


class _ReciprocalPipeline(wiring.Component):
    """``floor(2^31 / value)``, one quotient bit per stage, a new value every cycle.

    Restoring division of the constant 2^31. ``quotient_bits`` must cover the quotient:
    the caller guarantees ``value > 2^31 >> quotient_bits`` (LayerNorm: 32 bits, any
    value ≥ 1; softmax: 17 bits, sums ≥ 2^15). A zero divisor gives all ones. Latency
    ``quotient_bits`` cycles; non-stalling.
    """

    def __init__(self, value_bits: int, quotient_bits: int, tag_shape):
        self._value_bits = value_bits
        self._quotient_bits = quotient_bits
        self._tag_shape = tag_shape
        super().__init__({
            "i": In(stream.Signature(
                data.StructLayout({"value": unsigned(value_bits), "tag": tag_shape}),
                always_ready=True)),
            "o": Out(stream.Signature(
                data.StructLayout({"value": unsigned(quotient_bits), "tag": tag_shape}),
                always_ready=True)),
        })

    def elaborate(self, platform):
        m = Module()
        w, q_bits = self._value_bits, self._quotient_bits
        valid, divisor, tag = self.i.valid, self.i.payload.value, self.i.payload.tag
        # The numerator's bits above the quotient form the starting remainder (< divisor).
        rem, quotient = Const(_RCP_NUMERATOR >> q_bits, w), Const(0, 1)
        for i in reversed(range(q_bits)):
            current = Cat(Const((_RCP_NUMERATOR >> i) & 1, 1), rem)  # 2·rem + next bit
            fits = current >= divisor
            stage = f"rcp{i}"
            valid = _reg(m, valid, name=f"{stage}_valid")
            tag = _reg(m, tag, self._tag_shape, name=f"{stage}_tag")
            rem = _reg(m, Mux(fits, current - divisor, current), unsigned(w),
                       name=f"{stage}_rem")
            quotient = _reg(m, Cat(fits, quotient), unsigned(q_bits - i),
                            name=f"{stage}_quotient")
            divisor = _reg(m, divisor, name=f"{stage}_divisor") if i else divisor
        m.d.comb += [
            self.o.valid.eq(valid),
            self.o.payload.value.eq(quotient),
            self.o.payload.tag.eq(tag),
        ]
        return m


class LayerNormUnit(wiring.Component):
    """Integer LayerNorm over token rows, bit-exact to ``numerics.layernorm``.

    For each row of D INT8 values x (D = ``beats · lanes``)::

        S = Σx, Q = Σx²                      (one pass, while the row streams in)
        V = D²·Q − D·S² + eps_term           (= Σ(D·x_i − S)² + eps_term, exact)
        r = floor(2^31 / isqrt(V))           (pipelined isqrt, then pipelined reciprocal)
        d_i = D·x_i − S, t_i = d_i·r
        y_i = sat8(round_half_up((t_i·g_i + b_i) / 2^shift))

    The single-pass V is algebraically the numerics' Σd² (``Σ(Dx−S)² = D²Q − D·S²``), so
    no second pass over the row is needed before the square root.

    Parameters
    ----------
    cfg : AccelConfig
        ``lanes = cfg.pe_cols`` values per beat; rows up to ``cfg.max_dim`` values.

    Attributes
    ----------
    cmd : In(stream.Signature(LayerNormUnit.cmd_layout(cfg)))
        One beat per tensor: ``beats`` (D / lanes, 1 … max_dim / lanes), ``rows``
        (≥ 1), ``shift`` (0 … 62) and ``eps_term`` (≥ 1, < 2^52; 0 is tolerated and gives
        y = sat8(round_half_up(b / 2^shift)) on a constant row). Taken when the previous
        command's rows have all been accepted on ``x``.
    x : In(stream.Signature(lane_layout(cfg)))
        ``rows · beats`` beats, row-major, first beat = channels 0 … lanes−1.
    params : In(stream.Signature(LayerNormUnit.param_layout(cfg)))
        Writes ``gain`` (signed 16) and ``bias`` (signed 64) of channels
        ``beat·lanes … beat·lanes + lanes − 1``. ``ready = ~busy``: parameters change only
        between runs, and every row uses the values written before its command.
    y : Out(stream.Signature(row_beat_layout(cfg)))
        The normalised rows, beat for beat; ``last`` marks the final beat of each row.
    busy : Out(1)
        A command is being taken or a beat is anywhere between ``x`` and ``y``.
    busy_cycles : Out(unsigned(32))
        Cycles with ``busy`` high since reset (wraps).

    Notes
    -----
    Widths (for ``max_dim`` = D_max): S signed ``log2(128·D_max)+1``, Q ≤ 2^14·D_max,
    Σd² ≤ D_max³·2^14 (< 2^41 for 384), V < 2^53 (27-bit root), r ≤ 2^31 (32 bits),
    d = D·x − S ≤ 255·(D−1) (18 bits for 384), t = d·r with |t| ≤ 2^31 (33 bits:
    |d_i| ≤ isqrt(V) because d_i² ≤ V), t·g < 2^46 in 48 bits, then the 64-bit sum.

    Structure: the front end writes each beat into a row buffer queue and sums x and x²
    through a registered adder tree; a row's (S, Q) enter the V / isqrt / reciprocal
    pipeline (about 66 stages), whose result r waits in a small queue; the back end
    pops r and the row's beats and runs the per-lane datapath (10 stages). The row buffer
    holds ``max_dim/lanes`` plus the stats latency in beats, so later rows stream in while
    earlier ones wait for r: steady-state throughput is one beat per cycle (D=192 at 32
    lanes: 6 cycles per row); latency 86 cycles at 32 lanes (83 at 4) from a row's last beat
    in to its first beat out.
    """

    @staticmethod
    def cmd_layout(cfg: AccelConfig) -> data.StructLayout:
        """The ``cmd`` payload for ``cfg``."""
        return data.StructLayout({
            "beats": unsigned((cfg.max_dim // cfg.pe_cols).bit_length()),
            "rows": unsigned(ROW_COUNT_BITS),
            "shift": unsigned(SHIFT_BITS),
            "eps_term": unsigned(LN_EPS_BITS),
        })

    @staticmethod
    def param_layout(cfg: AccelConfig) -> data.StructLayout:
        """The ``params`` payload for ``cfg``: one beat of gains and biases."""
        return data.StructLayout({
            "beat": unsigned(max(1, (cfg.max_dim // cfg.pe_cols - 1).bit_length())),
            "gain": lane_layout(cfg, signed(LN_GAIN_BITS)),
            "bias": lane_layout(cfg, signed(LN_BIAS_BITS)),
        })

    def __init__(self, cfg: AccelConfig):
        self._cfg = _check_config(cfg)
        if (cfg.max_dim ** 3 << 14).bit_length() > LN_EPS_BITS:
            raise ValueError(f"max_dim must keep Σd² < 2^{LN_EPS_BITS} (≤ 4096), got "
                             f"{cfg.max_dim!r}")
        super().__init__({
            "cmd": In(stream.Signature(self.cmd_layout(cfg))),
            "x": In(stream.Signature(lane_layout(cfg))),
            "params": In(stream.Signature(self.param_layout(cfg))),
            "y": Out(stream.Signature(row_beat_layout(cfg))),
            "busy": Out(1),
            "busy_cycles": Out(BUSY_COUNTER_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        s = SimpleNamespace()   # what the sections share; each adds what it declares
        s.max_beats = cfg.max_dim // cfg.pe_cols
        s.cmd_layout = self.cmd_layout(cfg)
        s.sum_shape = signed((128 * cfg.max_dim).bit_length() + 1)
        s.beats_shape = s.cmd_layout["beats"].shape
        s.root_bits = (LN_EPS_BITS + 2) // 2  # V < 2^(LN_EPS_BITS + 1)
        self._front_end(m, s)
        self._statistics(m, s)
        self._back_end(m, s)
        in_flight = Signal(range(s.buf.depth + s.out_pipeline + s.oq.depth + 1))
        m.d.sync += in_flight.eq(in_flight + s.accept - (s.oq.r_en & s.oq.r_rdy))
        m.d.comb += self.busy.eq(s.active | (in_flight != 0))
        _busy_counter(m, self.busy, self.busy_cycles)
        return m

    def _front_end(self, m: Module, s: SimpleNamespace) -> None:
        """Commands, input beats into the row buffer, Σx and Σx² per row."""
        cfg = self._cfg
        lanes = cfg.pe_cols
        log_lanes = lanes.bit_length() - 1
        max_beats = s.max_beats
        sq_shape = unsigned(((1 << 14) * cfg.max_dim).bit_length())
        s.active = active = Signal()
        cur = Signal(s.cmd_layout)
        beat = Signal(range(max_beats))
        with m.If(~active):
            m.d.comb += self.cmd.ready.eq(1)
            with m.If(self.cmd.valid):
                p = self.cmd.payload
                m.d.sync += [
                    active.eq((p.rows != 0) & (p.beats != 0) & (p.beats <= max_beats)),
                    cur.eq(p),
                    beat.eq(0),
                ]

        # Rows in flight in the stats pipeline / r queue (V, isqrt, reciprocal ≈ 64 stages).
        tree_levels = log_lanes
        stats_latency = 2 + tree_levels + 1 + 6 + s.root_bits + 32 + 3
        s.row_queue_entries = stats_latency + 8
        s.row_end = row_end = beat == cur.beats - 1
        s.stats_free = stats_free = Signal()
        buf, buf_w, s.buf_r = _queue(m, "row_buffer", lane_layout(cfg),
                                     max_beats + stats_latency + 8)
        s.buf = buf
        m.d.comb += self.x.ready.eq(active & buf.w_rdy & (~row_end | stats_free))
        s.accept = accept = self.x.valid & self.x.ready
        m.d.comb += [buf.w_en.eq(accept), buf_w.eq(self.x.payload)]
        with m.If(accept):
            m.d.sync += beat.eq(Mux(row_end, 0, beat + 1))
            with m.If(row_end):
                m.d.sync += cur.rows.eq(cur.rows - 1)
                with m.If(cur.rows == 1):
                    m.d.sync += active.eq(0)

        s.front_tag = front_tag = data.StructLayout({
            "first": 1, "last": 1, "beats": s.beats_shape, "shift": unsigned(SHIFT_BITS),
            "eps_term": unsigned(LN_EPS_BITS)})
        tag0 = Signal(front_tag)
        m.d.comb += [
            tag0.first.eq(beat == 0), tag0.last.eq(row_end), tag0.beats.eq(cur.beats),
            tag0.shift.eq(cur.shift), tag0.eps_term.eq(cur.eps_term),
        ]
        xs = [_reg(m, self.x.payload[i], name=f"ln_x{i}") for i in range(lanes)]
        squares = [_reg(m, x * x, unsigned(15), name=f"ln_sq{i}") for i, x in enumerate(xs)]
        xs = [_reg(m, x, name=f"ln_xd{i}") for i, x in enumerate(xs)]
        beat_sum, _ = _tree(m, "ln_sum", xs, lambda a, b: a + b)
        beat_sq, _ = _tree(m, "ln_sq", squares, lambda a, b: a + b)
        tree_valid = _delay(m, accept, 2 + tree_levels, name="ln_tree_valid")
        tree_tag = _delay(m, tag0, 2 + tree_levels, front_tag, name="ln_tree_tag")

        s.acc_sum = acc_sum = Signal(s.sum_shape)
        s.acc_sq = acc_sq = Signal(sq_shape)
        s.stats_valid = stats_valid = Signal()
        s.stats_tag = stats_tag = Signal(front_tag)
        m.d.sync += stats_valid.eq(tree_valid & tree_tag.last)
        with m.If(tree_valid):
            m.d.sync += [
                acc_sum.eq(Mux(tree_tag.first, beat_sum, acc_sum + beat_sum)),
                acc_sq.eq(Mux(tree_tag.first, beat_sq, acc_sq + beat_sq)),
                stats_tag.eq(tree_tag),
            ]

    def _statistics(self, m: Module, s: SimpleNamespace) -> None:
        """V = D²·Q − D·S² + eps_term, isqrt, r = floor(2^31 / isqrt(V)), into the r queue."""
        cfg = self._cfg
        log_lanes = cfg.pe_cols.bit_length() - 1
        sumsq_bits = (cfg.max_dim ** 3 << 14).bit_length()
        acc_sum, acc_sq, stats_tag = s.acc_sum, s.acc_sq, s.stats_tag
        s.row_tag = row_tag = data.StructLayout({"sum": s.sum_shape, "beats": s.beats_shape,
                                                 "shift": unsigned(SHIFT_BITS)})
        tag_v = Signal(row_tag)
        m.d.comb += [tag_v.sum.eq(acc_sum), tag_v.beats.eq(stats_tag.beats),
                     tag_v.shift.eq(stats_tag.shift)]
        # v1, v2: S² and beats²; v3, v4: beats²·Q and beats·S² (two registers per multiply);
        # v5: Σd² = D²·Q − D·S² (lanes is a power of two: the D factors are shifts).
        v_valid = _delay(m, s.stats_valid, 5, name="v_valid")
        v_tag = _delay(m, tag_v, 5, row_tag, name="v_tag")
        v_eps = _delay(m, stats_tag.eps_term, 5, name="v_eps")
        v1_sq = _delay(m, acc_sq, 2, name="v_sq")
        v2_sum2 = _delay(m, acc_sum * acc_sum, 2, unsigned(2 * s.sum_shape.width - 1),
                         name="v_sum2")
        v2_beats2 = _delay(m, stats_tag.beats * stats_tag.beats, 2, name="v_beats2")
        v2_beats = _delay(m, stats_tag.beats, 2, name="v_beats")
        v4_dq = _delay(m, v2_beats2 * v1_sq, 2, name="v_dq")  # D²·Q / lanes²
        v4_ds = _delay(m, v2_beats * v2_sum2, 2, name="v_ds")  # D·S² / lanes
        v5_sumsq = _reg(m, (v4_dq << 2 * log_lanes) - (v4_ds << log_lanes),
                        unsigned(sumsq_bits), name="v_sumsq")
        m.submodules.isqrt = isqrt = _IsqrtPipeline(s.root_bits, row_tag)
        m.submodules.reciprocal = reciprocal = _ReciprocalPipeline(s.root_bits, 32, row_tag)
        m.d.sync += [
            isqrt.i.valid.eq(v_valid),
            isqrt.i.payload.value.eq(v5_sumsq + v_eps),
            isqrt.i.payload.tag.eq(v_tag),
        ]
        wiring.connect(m, isqrt.o, reciprocal.i)

        rq_layout = data.StructLayout({"r": unsigned(32), "row": row_tag})
        rq, rq_w, s.rq_r = _queue(m, "r_queue", rq_layout, s.row_queue_entries)
        s.rq = rq
        m.d.comb += [
            rq.w_en.eq(reciprocal.o.valid),
            rq_w.r.eq(reciprocal.o.payload.value),
            rq_w.row.eq(reciprocal.o.payload.tag),
        ]
        m.d.comb += s.stats_free.eq(_credits(m, "ln_rows", rq.depth, s.accept & s.row_end,
                                             rq.r_en & rq.r_rdy))

    def _params(self, m: Module):
        """The gains and biases, one memory word per beat; returns its read port."""
        cfg = self._cfg
        param_layout = self.param_layout(cfg)
        param_mem = Memory(shape=data.StructLayout({"gain": param_layout["gain"].shape,
                                                    "bias": param_layout["bias"].shape}),
                           depth=cfg.max_dim // cfg.pe_cols, init=[])
        m.submodules.params = param_mem
        param_write = param_mem.write_port()
        param_read = param_mem.read_port()
        m.d.comb += [
            self.params.ready.eq(~self.busy),
            param_write.en.eq(self.params.valid & ~self.busy),
            param_write.addr.eq(self.params.payload.beat),
            param_write.data.gain.eq(self.params.payload.gain),
            param_write.data.bias.eq(self.params.payload.bias),
        ]
        return param_read

    def _back_end(self, m: Module, s: SimpleNamespace) -> None:
        """y_i = sat8(round_half_up((d_i·r·g_i + b_i) / 2^shift)), into the output queue."""
        cfg = self._cfg
        lanes = cfg.pe_cols
        log_lanes = lanes.bit_length() - 1
        d_shape = signed((255 * cfg.max_dim).bit_length() + 1)
        param_read = self._params(m)
        rq, rq_r, buf, buf_r = s.rq, s.rq_r, s.buf, s.buf_r

        out_layout = row_beat_layout(cfg)
        s.out_pipeline = 10
        oq, oq_w, oq_r = _queue(m, "out_queue", out_layout, s.out_pipeline + 8)
        s.oq = oq
        issue = Signal()
        out_free = _credits(m, "ln_out", oq.depth, issue, oq.r_en & oq.r_rdy)
        j = Signal(range(s.max_beats))
        head = rq_r.row
        row_last = j == head.beats - 1
        m.d.comb += [
            issue.eq(rq.r_rdy & buf.r_rdy & out_free),
            buf.r_en.eq(issue),
            rq.r_en.eq(issue & row_last),
        ]
        with m.If(issue):
            m.d.sync += j.eq(Mux(row_last, 0, j + 1))

        # c1: the row's r, S, D and shift beside the beat.
        c1_valid = _reg(m, issue, name="c1_valid")
        c1_last = _reg(m, row_last, name="c1_last")
        c1_j = _reg(m, j, name="c1_j")
        c1_r = _reg(m, rq_r.r, name="c1_r")
        c1_sum = _reg(m, head.sum, name="c1_sum")
        c1_beats = _reg(m, head.beats, name="c1_beats")
        c1_shift = _reg(m, head.shift, name="c1_shift")
        # 2^(shift−1) (0 for shift 0), decoded one output bit per LUT, not by a 64-bit shifter.
        c1_half = _reg(m, Cat(*(head.shift == i + 1 for i in range(64))), name="c1_half")
        c1_xs = [_reg(m, buf_r[i], name=f"c1_x{i}") for i in range(lanes)]
        # c2: (D / lanes)·x as shift-and-add in LUTs (a ≤ 4-bit factor; no DSP for it).
        c2_valid, c2_last, c2_j = _reg(m, c1_valid), _reg(m, c1_last), _reg(m, c1_j)
        c2_r, c2_shift, c2_sum = _reg(m, c1_r), _reg(m, c1_shift), _reg(m, c1_sum)
        c2_half = _reg(m, c1_half)
        c2_dx = [_reg(m, sum(Mux(c1_beats[b], x << b, 0) for b in range(len(c1_beats))),
                      signed(8 + len(c1_beats)), name=f"c2_dx{i}")
                 for i, x in enumerate(c1_xs)]
        # c3: d = D·x − S.
        c3_valid, c3_last, c3_j = _reg(m, c2_valid), _reg(m, c2_last), _reg(m, c2_j)
        c3_r, c3_shift, c3_half = _reg(m, c2_r), _reg(m, c2_shift), _reg(m, c2_half)
        c3_d = [_reg(m, (dx << log_lanes) - c2_sum, d_shape, name=f"c3_d{i}")
                for i, dx in enumerate(c2_dx)]
        # c4, c5: t = d·r, two registers after the multiply; |t| ≤ 2^31 fits 33 bits. The
        # channel's gain and bias are read now, to arrive (c5) just before they are used.
        c4_valid, c4_last = _reg(m, c3_valid), _reg(m, c3_last)
        c4_shift, c4_half = _reg(m, c3_shift), _reg(m, c3_half)
        c4_j = _reg(m, c3_j, name="c4_j")
        c4_t = [_reg(m, d * c3_r, name=f"c4_t{i}") for i, d in enumerate(c3_d)]
        m.d.comb += param_read.addr.eq(c4_j)
        c5_valid, c5_last = _reg(m, c4_valid), _reg(m, c4_last)
        c5_shift, c5_half = _reg(m, c4_shift), _reg(m, c4_half)
        c5_t = [_reg(m, t[:33].as_signed(), name=f"c5_t{i}") for i, t in enumerate(c4_t)]
        c5_g = [param_read.data.gain[i] for i in range(lanes)]
        c5_b = [param_read.data.bias[i] for i in range(lanes)]
        self._scale_and_round(m, oq, oq_w, lanes, c5_valid, c5_last, c5_shift, c5_half,
                              c5_t, c5_g, c5_b)
        m.d.comb += [
            self.y.valid.eq(oq.r_rdy),
            self.y.payload.eq(oq_r),
            oq.r_en.eq(self.y.ready),
        ]

    @staticmethod
    def _scale_and_round(m: Module, oq, oq_w, lanes: int, c5_valid, c5_last, c5_shift,
                         c5_half, c5_t, c5_g, c5_b) -> None:
        """Stages c6 … c9: ×g, +b + 2^(shift−1), the shift and the saturation, into the
        output queue ``oq`` (its write side ``oq_w``)."""
        # c6, c7: P = t·g (|P| ≤ 2^46), two registers after the multiply; b + 2^(shift−1)
        # (64-bit) beside it, and the saturation mask (bits ≥ shift + 7).
        c6_valid, c6_last, c6_shift = _reg(m, c5_valid), _reg(m, c5_last), _reg(m, c5_shift)
        c6_p = [_reg(m, t * g, name=f"c6_p{i}")
                for i, (t, g) in enumerate(zip(c5_t, c5_g, strict=True))]
        c6_bh = [_reg(m, b + c5_half, signed(64), name=f"c6_bh{i}") for i, b in enumerate(c5_b)]
        c6_mask = _reg(m, Cat(*(c5_shift + 7 <= i for i in range(64))), name="c6_mask")
        c7_valid, c7_last, c7_shift = _reg(m, c6_valid), _reg(m, c6_last), _reg(m, c6_shift)
        c7_p = [_reg(m, p[:48].as_signed(), name=f"c7_p{i}") for i, p in enumerate(c6_p)]
        c7_bh = [_reg(m, v) for v in c6_bh]
        c7_mask = _reg(m, c6_mask)
        # c8: X = P + b + 2^(shift−1), 64-bit two's complement like the golden int64.
        c8_valid, c8_last, c8_shift = _reg(m, c7_valid), _reg(m, c7_last), _reg(m, c7_shift)
        c8_mask = _reg(m, c7_mask)
        c8_x = [_reg(m, p + bh, signed(64), name=f"c8_x{i}") for i, (p, bh) in
                enumerate(zip(c7_p, c7_bh, strict=True))]
        # c9: bits [shift, shift+8) of X and whether X >> shift leaves [-128, 127].
        c9_valid, c9_last = _reg(m, c8_valid), _reg(m, c8_last)
        c9_low, c9_high, c9_low_sat = [], [], []
        for i, x in enumerate(c8_x):
            negative = x[63]
            extended = Cat(x, negative.replicate(8))
            c9_low.append(_reg(m, extended.bit_select(c8_shift, 8), name=f"c9_low{i}"))
            c9_high.append(_reg(m, ~negative & (x.as_unsigned() & c8_mask).any(),
                                name=f"c9_high{i}"))
            c9_low_sat.append(_reg(m, negative & (~x.as_unsigned() & c8_mask).any(),
                                   name=f"c9_lowsat{i}"))
        m.d.comb += [oq.w_en.eq(c9_valid), oq_w.last.eq(c9_last)]
        for i in range(lanes):
            m.d.comb += oq_w.data[i].eq(
                Mux(c9_high[i], 127, Mux(c9_low_sat[i], -128, c9_low[i].as_signed())))


class SoftmaxUnit(wiring.Component):
    """Row softmax and router scores, bit-exact to ``numerics.softmax`` and ``row_scale`` /
    ``router_scores``.

    For each row of L logits l (ATTENTION: INT8; ROUTER: INT16)::

        m = max_j l_j,  d_j = m − l_j
        ATTENTION: u_j = d_j                 (d_j ≤ 255 always: the numerics' min is moot)
        ROUTER:    u_j = d_j >> 8            (d_j ≤ 65535: likewise; ``ROUTER_LOGIT_SHIFT``)
        e_j = E[u_j]                         (the loaded exp table)
        S = Σ_j e_j,  rcp = floor(2^31 / S)  (pipelined reciprocal)
        ATTENTION: p_j = round_half_up(e_j·65024 / 2^24)        (``PROB_MULT``; 0 … 127)
                   prod = rcp·mult (< 2^33),  z = max(0, bitlen(prod) − 16)
                   M = prod >> z (floor),  sh = max(0, shift − z)    (``row_scale``)
        ROUTER:    p_j = min(32767, round_half_up(e_j·rcp / 2^16))

    Attention probabilities are relative to the row's largest (E[0] = 2^15 gives exactly
    127); the row's normalisation ``rcp``, folded with the command's P·V requantization
    ``mult``/``shift`` into a 16-bit multiplier M and a shift sh, leaves the unit in the
    top three lanes of the row's last beat, for the GEMM that computes P·V
    (``numerics.attention_pv``), which takes them from its last K-slice.

    Parameters
    ----------
    cfg : AccelConfig
        ``lanes = cfg.pe_cols`` INT8 logits (or ``lanes / 2`` INT16 ones) per beat;
        attention rows up to ``cfg.max_tokens`` long, router rows up to ``cfg.max_experts``.
    table_entries : int
        Exp-table entries written per ``table`` beat, a power of two ≤ 256 (the engine
        writes one AXI beat's worth: a 256-entry table in ``256 / table_entries`` cycles).

    Attributes
    ----------
    cmd : In(stream.Signature(SoftmaxUnit.cmd_layout(cfg)))
        One beat per tensor: ``length`` L (ATTENTION 1 … max_tokens, ROUTER 1 …
        max_experts; any value: ragged rows are fine), ``rows`` (≥ 1), ``mode``
        (:class:`SoftmaxMode`, per command) and, for ATTENTION (ignored for ROUTER), the
        P·V requantization ``mult`` (unsigned 16-bit) and ``shift`` (0 … 63) that every
        row's scale folds with the row's rcp.
    logits : In(stream.Signature(lane_layout(cfg)))
        ATTENTION: each row is ``ceil(L / lanes)`` beats, logit j in lane j of its beat.
        ROUTER: a beat holds H = ``lanes / 2`` signed 16-bit logits, logit h in bits
        [16h, 16h + 16) of the beat (lane 2h its low byte, lane 2h + 1 its high byte: the
        little-endian INT16 array of the router GEMM), so a row is ``ceil(L / H)`` beats.
        The **padded positions** of a row's last beat (≥ L) are ignored: they take no part
        in the maximum or the sum, whatever they hold. Rows are not packed across beats.
    table : In(stream.Signature(SoftmaxUnit.table_layout(table_entries)))
        Writes ``table_entries`` entries of the exp table at once, uint16: entries
        ``index · table_entries`` … ``index · table_entries + table_entries − 1``, the
        first in ``value[0]``. ``ready = ~busy``. The
        table must be one of ``numerics.exp_table`` (E[0] = 2^15, so S ≥ 2^15 and
        rcp ≤ 2^16: the reciprocal is computed to 17 bits); with another table the outputs
        are unspecified.
    probs : Out(stream.Signature(SoftmaxUnit.out_layout(cfg)))
        Unsigned 16-bit lanes; ``last`` marks the final beat of each row. ATTENTION: each
        row is ``ceil((L + 3) / lanes)`` beats: one per ``logits`` beat, lane j holding
        p_j, 0 … 127 (the low 8 bits are the INT8 probability; padded lanes are 0), and
        the row's **scale** in the last beat's top three lanes — lane ``lanes − 3`` ``M &
        0xFF``, ``lanes − 2`` ``M >> 8``, ``lanes − 1`` sh — which are padding when L mod
        ``lanes`` is 1 … ``lanes − 3``; otherwise the scale comes in a beat of its own after
        the row's probabilities, every other lane 0. The low bytes are the buffer words
        that P·V reads as its K-slices, the scale in its last. ROUTER: one beat per
        ``logits`` beat, no scale; lane h < H holds the score p_h, 0 … 32767 (0 for padded
        positions), and lane H + h holds d_h = m − l_h, 0 … 65535 (the dispatcher ranks by
        it; unspecified for padded positions).
    busy : Out(1)
        A command is being taken or a beat is anywhere between ``logits`` and ``probs``.
    busy_cycles : Out(unsigned(32))
        Cycles with ``busy`` high since reset (wraps).

    Notes
    -----
    Three passes per row, each a pipeline over a queue: (A) beats enter the logits queue
    while a registered compare tree finds the row maximum; (B) once the maximum is known,
    the row is read back, each lane looks up its own copy of the table (the table is
    replicated per lane — 256×16 bits each, stored as ``256 / table_entries`` words of
    ``table_entries`` entries, so every lane reads every cycle and a write fills a word) and
    the e values go to the e queue and a registered adder tree; the sum enters a 17-stage
    reciprocal pipeline, and behind it the row's scale is formed (one 17×16-bit product
    per row — a single DSP48E2, M and P registered — then a registered leading-one detector
    on its top 17 bits, which is z, and a registered barrel shift and saturating subtract);
    (C) an attention row's e values are multiplied by 65024 (router rows: by rcp) and
    rounded, its scale put in its last beat's top lanes (or a beat after it). Row r+1 is in
    A while row r is in B and row r−1 in C, so the steady state is one output beat per cycle
    in both modes: a 129-long attention row at 32 lanes is 5 beats, its scale in the
    fifth's lanes 29 … 31, 5 cycles; a router row 1 beat, 1 cycle. The logits queue holds a full row
    plus the tree latency and the e queue a full row plus the sum/reciprocal/scale
    latency, which is also what lets rows of one beat (router rows) stream. Sum width:
    ``log2(65535·max(max_tokens, max_experts))`` bits (S < 2^26 for 1,024 tokens).
    ``mult``/``shift`` wait for the row's rcp in a small queue of attention commands
    (written when a command is taken, read when its last row's rcp comes out), so they do
    not travel down the pipeline with every beat; while it is full (33 attention commands
    still short of their last rcp, only with many one-row commands and a stalled output) a
    new command waits.

    Router mode shares the attention datapath: the max tree's first level takes each lane
    pair (2h, 2h + 1) either as INT16 logit h or as 2^8 times the larger of two INT8
    logits, so the tree above it compares 16-bit values; stage B forms the 16-bit d of
    lanes 0 … H−1 (attention: 2^8 times the INT8 d) and indexes the table with its high
    byte in both modes; lanes H … lanes−1, unused by router rows, carry d_h down the e
    queue (out of the sum) and through their multiplier with ``2^16`` in place of rcp, so
    the output's ``round(d·2^16 / 2^16)`` is d itself: no extra storage and no extra DSP.
    In attention mode every lane multiplies by the constant 65024 instead, so the lanes'
    multipliers stay as they are (e ≤ 2^15 gives at most 127: the clamp to 127 is kept
    only against a table outside the contract).

    Raises
    ------
    ValueError
        For ``cfg.pe_cols`` < 4 (the row scale needs three lanes) or a ``table_entries``
        that is not a power of two from 1 to 256.
    """

    @staticmethod
    def cmd_layout(cfg: AccelConfig) -> data.StructLayout:
        """The ``cmd`` payload for ``cfg``."""
        return data.StructLayout({
            "length": unsigned(cfg.max_tokens.bit_length()),
            "rows": unsigned(ROW_COUNT_BITS),
            "mode": SoftmaxMode,
            "mult": unsigned(_ROW_MULT_BITS),
            "shift": unsigned(SHIFT_BITS),
        })

    @staticmethod
    def table_layout(table_entries: int = 1) -> data.StructLayout:
        """The ``table`` payload: ``table_entries`` consecutive exp-table entries, word
        ``index`` of the table."""
        return data.StructLayout({
            "index": unsigned(max(1, (256 // table_entries - 1).bit_length())),
            "value": data.ArrayLayout(_EXP_SHAPE, table_entries),
        })

    @staticmethod
    def out_layout(cfg: AccelConfig) -> data.StructLayout:
        """The ``probs`` payload for ``cfg``."""
        return row_beat_layout(cfg, unsigned(16))

    def __init__(self, cfg: AccelConfig, table_entries: int = 1):
        self._cfg = _check_config(cfg)
        if cfg.pe_cols < 4:
            raise ValueError(f"SoftmaxUnit needs pe_cols >= 4 (a row's scale is three "
                             f"lanes), got {cfg.pe_cols}")
        if not (isinstance(table_entries, int) and 1 <= table_entries <= 256
                and table_entries & (table_entries - 1) == 0):
            raise ValueError(f"table_entries must be a power of two from 1 to 256, got "
                             f"{table_entries!r}")
        self.table_entries = table_entries
        super().__init__({
            "cmd": In(stream.Signature(self.cmd_layout(cfg))),
            "logits": In(stream.Signature(lane_layout(cfg))),
            "table": In(stream.Signature(self.table_layout(table_entries))),
            "probs": Out(stream.Signature(self.out_layout(cfg))),
            "busy": Out(1),
            "busy_cycles": Out(BUSY_COUNTER_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        s = SimpleNamespace()   # what the stages share; each adds what it declares
        s.lanes = cfg.pe_cols
        s.log_lanes = s.lanes.bit_length() - 1
        s.half = s.lanes // 2  # INT16 router logits per beat
        # Attention rows up to max_tokens INT8 logits, router rows up to max_experts INT16.
        s.max_row_beats = max(-(-cfg.max_tokens // s.lanes), -(-cfg.max_experts // s.half))
        s.rcp_bits = 17  # S ≥ 2^15 ⇒ floor(2^31 / S) ≤ 2^16
        s.tree_levels = s.log_lanes
        s.scale_latency = 4  # the row-scale product (M, P), z, then M and sh
        self._stage_a(m, s)
        self._stage_b(m, s)
        self._stage_c(m, s)
        # Beats between ``logits`` and ``probs``: a logit beat counts from its acceptance, a
        # scale's own beat from its issue into stage C (while its row's beats are still counted,
        # in the e queue), and both until they leave the output queue.
        in_flight = Signal(range(s.lq.depth + s.eq.depth + s.oq.depth + 32))
        m.d.sync += in_flight.eq(in_flight + s.accept + s.issue_scale
                                 - (s.oq.r_en & s.oq.r_rdy))
        m.d.comb += self.busy.eq(s.active | (in_flight != 0))
        _busy_counter(m, self.busy, self.busy_cycles)
        return m

    def _stage_a(self, m: Module, s: SimpleNamespace) -> None:
        """A: commands, the logits queue, the row maximum."""
        cfg = self._cfg
        lanes, log_lanes, half, max_row_beats = s.lanes, s.log_lanes, s.half, s.max_row_beats
        tree_levels = s.tree_levels
        s.active = active = Signal()
        rows_left = Signal(ROW_COUNT_BITS)
        mode = Signal(SoftmaxMode)
        router = mode == SoftmaxMode.ROUTER
        row_beats = Signal(range(max_row_beats + 1))
        # Valid INT8 lanes − 1 in a row's last beat; a router logit h is lanes 2h and 2h + 1,
        # so there it is 2·((L − 1) mod H) + 1.
        last_lanes_m1 = Signal(log_lanes)
        beat = Signal(range(max_row_beats))
        # The attention commands' mult and shift, until their last row's rcp is out of the
        # reciprocal (``_row_scale``): a command (either mode) waits while the queue is full.
        pq_entry = data.StructLayout({"mult": unsigned(_ROW_MULT_BITS),
                                      "shift": unsigned(SHIFT_BITS)})
        s.pq, pq_w, s.pq_r = _queue(m, "param_queue", pq_entry, 32)
        with m.If(~active):
            m.d.comb += self.cmd.ready.eq(s.pq.w_rdy)
            with m.If(self.cmd.valid & s.pq.w_rdy):
                p = self.cmd.payload
                cmd_router = p.mode == SoftmaxMode.ROUTER
                router_last_m1 = Cat(Const(1, 1), (p.length - 1)[:log_lanes - 1])
                runs = ((p.rows != 0) & (p.length != 0)
                        & Mux(cmd_router, p.length <= cfg.max_experts,
                              p.length <= cfg.max_tokens))
                m.d.comb += [
                    s.pq.w_en.eq(runs & ~cmd_router),
                    pq_w.mult.eq(p.mult),
                    pq_w.shift.eq(p.shift),
                ]
                m.d.sync += [
                    active.eq(runs),
                    rows_left.eq(p.rows),
                    mode.eq(p.mode),
                    row_beats.eq(Mux(cmd_router, (p.length + half - 1) >> (log_lanes - 1),
                                     (p.length + lanes - 1) >> log_lanes)),
                    last_lanes_m1.eq(Mux(cmd_router, router_last_m1, p.length - 1)),
                    beat.eq(0),
                ]

        # ``cmd_end``: the beat's row is its command's last (read with ``last``).
        # ``room``: the row's last beat leaves its top three lanes to the row's scale.
        logit_entry = data.StructLayout({"data": lane_layout(cfg), "lanes_m1": unsigned(log_lanes),
                                         "last": 1, "cmd_end": 1, "mode": SoftmaxMode,
                                         "room": 1})
        lq, lq_w, s.lq_r = _queue(m, "logit_queue", logit_entry,
                                  max_row_beats + tree_levels + 8)
        s.lq = lq
        max_entries = 32
        mq, mq_w, s.mq_r = _queue(m, "max_queue", data.StructLayout({"max": signed(16)}),
                                  max_entries)
        s.mq = mq
        row_end = beat == row_beats - 1
        lanes_m1 = Mux(row_end, last_lanes_m1, lanes - 1)
        s.accept = accept = Signal()
        max_free = _credits(m, "sm_max", mq.depth, accept & row_end, mq.r_en & mq.r_rdy)
        m.d.comb += [
            self.logits.ready.eq(active & lq.w_rdy & (~row_end | max_free)),
            accept.eq(self.logits.valid & self.logits.ready),
            lq.w_en.eq(accept),
            lq_w.data.eq(self.logits.payload),
            lq_w.lanes_m1.eq(lanes_m1),
            lq_w.last.eq(row_end),
            lq_w.cmd_end.eq(rows_left == 1),
            lq_w.mode.eq(mode),
            lq_w.room.eq(last_lanes_m1 <= lanes - 4),
        ]
        with m.If(accept):
            m.d.sync += beat.eq(Mux(row_end, 0, beat + 1))
            with m.If(row_end):
                m.d.sync += rows_left.eq(rows_left - 1)
                with m.If(rows_left == 1):
                    m.d.sync += active.eq(0)

        # Padded lanes become the neutral element of the maximum: −128 (attention), and
        # −2^15 = 0x8000 for a padded router logit (lanes 0 and 1 are always real).
        masked = []
        for i in range(lanes):
            pad = Mux(router, 0, -128) if i % 2 == 0 else Const(-128, INT8)
            masked.append(_reg(m, Mux((i <= lanes_m1) if i else 1, self.logits.payload[i], pad),
                               INT8, name=f"sm_masked{i}"))
        masked_router = _reg(m, router, name="sm_masked_router")
        # The tree's first level: each lane pair as the INT16 router logit it holds, or as
        # the larger of two INT8 logits, times 2^8 (so that stage B indexes the table with
        # the high byte of m − l in both modes); the levels above compare 16-bit values.
        pairs = []
        for h in range(half):
            low, high = masked[2 * h], masked[2 * h + 1]
            pairs.append(_reg(m, Cat(Mux(masked_router, low, 0),
                                     Mux(masked_router | (low < high), high, low)).as_signed(),
                              signed(16), name=f"sm_max_pair{h}"))
        row_max, _ = _tree(m, "sm_max", pairs, lambda a, b: Mux(a >= b, a, b))
        max_valid = _delay(m, accept, 1 + tree_levels, name="sm_max_valid")
        max_first = _delay(m, beat == 0, 1 + tree_levels, name="sm_max_first")
        max_last = _delay(m, row_end, 1 + tree_levels, name="sm_max_last")
        running_max = Signal(signed(16))
        new_max = Mux(max_first | (row_max > running_max), row_max, running_max)
        with m.If(max_valid):
            m.d.sync += running_max.eq(new_max)
        m.d.comb += [mq.w_en.eq(max_valid & max_last), mq_w.max.eq(new_max)]

    def _stage_b(self, m: Module, s: SimpleNamespace) -> None:
        """B: e_j = E[u_j] through per-lane table copies; S; rcp; the row's scale."""
        cfg = self._cfg
        lanes, half, tree_levels, rcp_bits = s.lanes, s.half, s.tree_levels, s.rcp_bits
        lq, lq_r, mq, mq_r = s.lq, s.lq_r, s.mq, s.mq_r
        sum_bits = ((1 << 16) * max(cfg.max_tokens, cfg.max_experts)).bit_length()
        e_entry = data.StructLayout({"e": lane_layout(cfg, _EXP_SHAPE), "last": 1, "room": 1})
        b_latency = 3
        rcp_latency = tree_levels + 1 + rcp_bits + s.scale_latency
        eq, eq_w, s.eq_r = _queue(m, "e_queue", e_entry,
                                  s.max_row_beats + b_latency + rcp_latency + 8)
        s.eq = eq
        rq_entry = data.StructLayout({"rcp": unsigned(rcp_bits), "mode": SoftmaxMode,
                                      "scale_m": unsigned(_ROW_MULT_BITS),
                                      "scale_sh": unsigned(SHIFT_BITS)})
        rq, rq_w, s.rq_r = _queue(m, "rcp_queue", rq_entry, b_latency + rcp_latency + 8)
        s.rq = rq
        issue_b = Signal()
        e_free = _credits(m, "sm_e", eq.depth, issue_b, eq.r_en & eq.r_rdy)
        rcp_free = _credits(m, "sm_rcp", rq.depth, issue_b & lq_r.last, rq.r_en & rq.r_rdy)
        m.d.comb += [
            issue_b.eq(lq.r_rdy & mq.r_rdy & e_free & (~lq_r.last | rcp_free)),
            lq.r_en.eq(issue_b),
            mq.r_en.eq(issue_b & lq_r.last),
        ]
        b_first = Signal(init=1)
        with m.If(issue_b):
            m.d.sync += b_first.eq(lq_r.last)

        b1_valid = _reg(m, issue_b, name="b1_valid")
        b1_first, b1_last = _reg(m, b_first), _reg(m, lq_r.last)
        b1_cmd_end = _reg(m, lq_r.cmd_end, name="b1_cmd_end")
        b1_room = _reg(m, lq_r.room, name="b1_room")
        b1_mode = _reg(m, lq_r.mode, SoftmaxMode)
        router = lq_r.mode == SoftmaxMode.ROUTER
        # Router logit h is lanes 2h, 2h + 1, valid iff 2h + 1 ≤ lanes_m1 (which is odd);
        # lanes ≥ H hold no router logit and carry d below.
        b1_lane_valid = []
        for i in range(lanes):
            valid = Const(1) if i == 0 else i <= lq_r.lanes_m1
            if 0 < i < half:
                valid = Mux(router, 2 * i <= lq_r.lanes_m1, valid)
            b1_lane_valid.append(_reg(m, valid, unsigned(1), name=f"b1_lane{i}"))
        # d = m − l ≥ 0 for a real lane: INT8 d ≤ 255 and INT16 d ≤ 65535, so the numerics'
        # min(u, 255) is moot in both modes. The attention m is 2^8 times the INT8 maximum,
        # and so is each lane's l: the table index is the high byte of d in both modes. Lanes
        # ≥ H carry no router logit and need only the 8-bit attention difference.
        b1_d = []
        for i in range(lanes):
            if i < half:
                logit = Cat(Mux(router, lq_r.data[2 * i], 0),
                            Mux(router, lq_r.data[2 * i + 1], lq_r.data[i])).as_signed()
                b1_d.append(_reg(m, (mq_r.max - logit)[:16], unsigned(16), name=f"b1_d{i}"))
            else:
                b1_d.append(_reg(m, (mq_r.max[8:].as_signed() - lq_r.data[i])[:8],
                                 unsigned(8), name=f"b1_d{i}"))
        b1_index = [d[8:] if i < half else d for i, d in enumerate(b1_d)]
        b2_valid, b2_first, b2_last = _reg(m, b1_valid), _reg(m, b1_first), _reg(m, b1_last)
        b2_cmd_end = _reg(m, b1_cmd_end, name="b2_cmd_end")
        b2_room = _reg(m, b1_room, name="b2_room")
        b2_mode = _reg(m, b1_mode, SoftmaxMode)
        b2_router = b2_mode == SoftmaxMode.ROUTER
        b2_lane_valid = [_reg(m, v) for v in b1_lane_valid]
        b2_d = [_reg(m, d, name=f"b2_d{h}") for h, d in enumerate(b1_d[:half])]
        looked_up = self._exp_tables(m, b1_index)
        b3_valid, b3_first, b3_last = _reg(m, b2_valid), _reg(m, b2_first), _reg(m, b2_last)
        b3_cmd_end = _reg(m, b2_cmd_end, name="b3_cmd_end")
        b3_room = _reg(m, b2_room, name="b3_room")
        b3_mode = _reg(m, b2_mode, SoftmaxMode)
        b3_router = b3_mode == SoftmaxMode.ROUTER
        b3_e = []
        for i in range(lanes):
            e = Mux(b2_lane_valid[i], looked_up[i], 0)
            if i >= half:  # router mode: d of logit i − H, for the output
                e = Mux(b2_router, b2_d[i - half], e)
            b3_e.append(_reg(m, e, _EXP_SHAPE, name=f"b3_e{i}"))
        m.d.comb += [eq.w_en.eq(b3_valid), eq_w.last.eq(b3_last), eq_w.room.eq(b3_room)]
        m.d.comb += [eq_w.e[i].eq(e) for i, e in enumerate(b3_e)]

        # The tree's two halves, then their sum, from which router mode leaves out the upper
        # half (its d values): one mask on one partial sum instead of one per lane.
        lower_sum, half_levels = _tree(m, "sm_sum_lower", b3_e[:half], lambda a, b: a + b)
        upper_sum, _ = _tree(m, "sm_sum_upper", b3_e[half:], lambda a, b: a + b)
        upper_router = _delay(m, b3_router, half_levels, name="sm_sum_router")
        beat_sum = _reg(m, lower_sum + Mux(upper_router, 0, upper_sum), name="sm_sum_top")
        sum_valid = _delay(m, b3_valid, tree_levels, name="sm_sum_valid")
        sum_first = _delay(m, b3_first, tree_levels, name="sm_sum_first")
        sum_last = _delay(m, b3_last, tree_levels, name="sm_sum_last")
        sum_mode = _delay(m, b3_mode, tree_levels, SoftmaxMode, name="sm_sum_mode")
        sum_cmd_end = _delay(m, b3_cmd_end, tree_levels, name="sm_sum_cmd_end")
        row_sum = Signal(sum_bits)
        with m.If(sum_valid):
            m.d.sync += row_sum.eq(Mux(sum_first, beat_sum, row_sum + beat_sum))
        tag_layout = data.StructLayout({"mode": SoftmaxMode, "cmd_end": 1})
        m.submodules.reciprocal = reciprocal = _ReciprocalPipeline(sum_bits, rcp_bits,
                                                                   tag_layout)
        m.d.comb += [
            reciprocal.i.payload.value.eq(row_sum),
        ]
        m.d.sync += [
            reciprocal.i.valid.eq(sum_valid & sum_last),
            reciprocal.i.payload.tag.mode.eq(sum_mode),
            reciprocal.i.payload.tag.cmd_end.eq(sum_cmd_end),
        ]
        self._row_scale(m, s, reciprocal.o, rq.w_en, rq_w)

    def _row_scale(self, m: Module, s: SimpleNamespace, rcp, rq_w_en, rq_w) -> None:
        """The row's P·V scale behind the reciprocal, into the rcp queue: ``M``, ``sh`` of
        ``numerics.row_scale(rcp, mult, shift)`` (attention rows; unused for router rows).

        ``mult``/``shift`` are the head of the attention-command queue, which every
        attention command enters when taken, long before its first rcp (the whole
        max/e/sum/reciprocal latency), and leaves with its last row's rcp. Latency
        ``s.scale_latency``: the 17×16-bit product (a DSP48E2 with its M and P registers),
        z = bitlen(prod >> 16) = max(0, bitlen(prod) − 16) registered, then M = prod >> z
        and sh = max(0, shift − z) registered."""
        pq, pq_r = s.pq, s.pq_r
        valid, tag, value = rcp.valid, rcp.payload.tag, rcp.payload.value
        attention = tag.mode == SoftmaxMode.ATTENTION
        m.d.comb += pq.r_en.eq(valid & attention & tag.cmd_end)
        prod_bits = s.rcp_bits + _ROW_MULT_BITS  # rcp ≤ 2^16: prod < 2^33
        prod1 = _reg(m, value * pq_r.mult, unsigned(prod_bits), name="sm_scale_prod1")  # M
        prod2 = _reg(m, prod1, name="sm_scale_prod2")  # P
        # z = bitlen(prod >> 16): a leading-one detector on the product's top 17 bits.
        top = prod2[_ROW_MULT_BITS:]
        z = Const(0, range(len(top) + 1))
        for k in range(len(top)):
            z = Mux(top[k], k + 1, z)
        prod3, z3 = _reg(m, prod2, name="sm_scale_prod3"), _reg(m, z, name="sm_scale_z3")
        shift3 = _delay(m, pq_r.shift, 3, name="sm_scale_shift")
        scale_m = _reg(m, (prod3 >> z3)[:_ROW_MULT_BITS], name="sm_scale_m4")
        scale_sh = _reg(m, Mux(shift3 > z3, shift3 - z3, 0), unsigned(SHIFT_BITS),
                        name="sm_scale_sh4")
        latency = s.scale_latency
        assert latency == 4  # the four registers above
        m.d.comb += [
            rq_w_en.eq(_delay(m, valid, latency, name="sm_scale_valid")),
            rq_w.rcp.eq(_delay(m, value, latency, name="sm_scale_rcp")),
            rq_w.mode.eq(_delay(m, tag.mode, latency, SoftmaxMode, name="sm_scale_mode")),
            rq_w.scale_m.eq(scale_m),
            rq_w.scale_sh.eq(scale_sh),
        ]

    def _exp_tables(self, m: Module, index) -> list:
        """One copy of the exp table per lane (written together while idle), read at
        ``index[lane]``; returns each copy's entry, one cycle later.

        A copy is ``256 / W`` words of W entries (W = ``table_entries``): a write fills a
        word, a read fetches the word and the entry is picked from it by the index's low
        bits, registered beside the read."""
        W = self.table_entries
        low_bits = (W - 1).bit_length()
        word_layout = data.ArrayLayout(_EXP_SHAPE, W)
        table_write = self.table.valid & ~self.busy
        m.d.comb += self.table.ready.eq(~self.busy)
        looked_up = []
        for i in range(self._cfg.pe_cols):
            table = Memory(shape=word_layout, depth=256 // W, init=[])
            m.submodules[f"exp_table{i}"] = table
            write, read = table.write_port(), table.read_port()
            m.d.comb += [
                write.en.eq(table_write),
                write.addr.eq(self.table.payload.index),
                write.data.eq(self.table.payload.value),
                read.addr.eq(index[i][low_bits:]),
            ]
            if W == 1:
                looked_up.append(read.data[0])
                continue
            low = _reg(m, index[i][:low_bits], unsigned(low_bits), name=f"b2_low{i}")
            looked_up.append(read.data[low])
        return looked_up

    def _stage_c(self, m: Module, s: SimpleNamespace) -> None:
        """C: p_j = round_half_up(e_j · 65024 / 2^24) (router: e_j · rcp / 2^16), clamped;
        router d passed through; an attention row's scale in its last beat's top three
        lanes, or in a beat of its own after the row where those lanes hold keys."""
        cfg = self._cfg
        half = s.half
        eq, eq_r, rq, rq_r = s.eq, s.eq_r, s.rq, s.rq_r
        c_latency = 4
        oq, oq_w, oq_r = _queue(m, "out_queue", self.out_layout(cfg), c_latency + 8)
        s.oq = oq
        # The row at the head of the rcp queue has sent its probabilities and its scale is
        # still to go, in a beat of its own (an attention row whose last beat has no room).
        extra = Signal()
        router = rq_r.mode == SoftmaxMode.ROUTER
        # The probability beat at the e queue's head ends its row (with the row's scale in
        # its top lanes, for an attention row).
        ends_row = eq_r.last & (router | eq_r.room)
        issue_c, issue_prob = Signal(), Signal()
        s.issue_scale = issue_scale = Signal()
        out_free = _credits(m, "sm_out", oq.depth, issue_c, oq.r_en & oq.r_rdy)
        m.d.comb += [
            issue_scale.eq(rq.r_rdy & out_free & extra),
            issue_prob.eq(eq.r_rdy & rq.r_rdy & out_free & ~extra),
            issue_c.eq(issue_scale | issue_prob),
            eq.r_en.eq(issue_prob),
            rq.r_en.eq(issue_scale | (issue_prob & ends_row)),
        ]
        with m.If(issue_prob & eq_r.last & ~ends_row):
            m.d.sync += extra.eq(1)
        with m.If(issue_scale):
            m.d.sync += extra.eq(0)
        c1_valid = _reg(m, issue_c, name="c1_valid")
        c1_last = _reg(m, extra | ends_row, name="c1_last")
        c1_router = _reg(m, router, name="c1_router")
        # The beat carries the scale in its top three lanes; a scale beat nothing else.
        c1_scale = _reg(m, extra | (ends_row & ~router), name="c1_scale")
        c1_scale_only = _reg(m, extra, name="c1_scale_only")
        # Attention lanes multiply by PROB_MULT, router lanes < H by rcp. Lanes ≥ H hold d in
        # router mode: multiplied by 2^16 instead, d·2^16 >> 16 is d again, so d reaches the
        # output through the lane's own DSP, with no extra registers beside it.
        c1_rcp = _reg(m, Mux(router, rq_r.rcp, _PROB_MULT), unsigned(s.rcp_bits), name="c1_rcp")
        c1_rcp_upper = _reg(m, Mux(router, 1 << _SCORE_SHIFT, _PROB_MULT),
                            unsigned(s.rcp_bits), name="c1_rcp_upper")
        c1_e = [_reg(m, eq_r.e[i], name=f"c1_e{i}") for i in range(s.lanes)]
        # The scale's three lanes: M's low and high byte, sh.
        scale_lanes = [rq_r.scale_m[:8], rq_r.scale_m[8:], rq_r.scale_sh]
        c3_scale_lanes = [_delay(m, v, 3, name=f"c_scale{i}") for i, v in enumerate(scale_lanes)]
        # c2, c3: the 16×17-bit product, two registers (DSP48E2 M and P).
        c2_valid, c2_last, c2_router = _reg(m, c1_valid), _reg(m, c1_last), _reg(m, c1_router)
        c2_scale, c2_scale_only = _reg(m, c1_scale), _reg(m, c1_scale_only)
        c2_p = [_reg(m, e * (c1_rcp if i < half else c1_rcp_upper), name=f"c2_p{i}")
                for i, e in enumerate(c1_e)]
        c3_valid, c3_last, c3_router = _reg(m, c2_valid), _reg(m, c2_last), _reg(m, c2_router)
        c3_scale, c3_scale_only = _reg(m, c2_scale), _reg(m, c2_scale_only)
        c3_p = [_reg(m, p, name=f"c3_p{i}") for i, p in enumerate(c2_p)]
        c4_valid, c4_last = _reg(m, c3_valid), _reg(m, c3_last)
        c4_out = []
        top = s.lanes - len(c3_scale_lanes)  # the scale's first lane
        for i, p in enumerate(c3_p):
            prob = (p + (1 << (_PROB_SHIFT - 1))) >> _PROB_SHIFT
            if i < half:
                score = (p + (1 << (_SCORE_SHIFT - 1))) >> _SCORE_SHIFT
                router_out = Mux(score > _SCORE_MAX, _SCORE_MAX, score)
            else:  # d·2^16, exact
                router_out = p[_SCORE_SHIFT:_SCORE_SHIFT + 16]
            out = Mux(c3_router, router_out, Mux(prob > _PROB_MAX, _PROB_MAX, prob))
            if i >= top:
                out = Mux(c3_scale, c3_scale_lanes[i - top], out)
            else:
                out = Mux(c3_scale_only, 0, out)
            c4_out.append(_reg(m, out, unsigned(16), name=f"c4_out{i}"))
        m.d.comb += [oq.w_en.eq(c4_valid), oq_w.last.eq(c4_last)]
        m.d.comb += [oq_w.data[i].eq(v) for i, v in enumerate(c4_out)]
        m.d.comb += [
            self.probs.valid.eq(oq.r_rdy),
            self.probs.payload.eq(oq_r),
            oq.r_en.eq(self.probs.ready),
        ]


class ResidualAdd(wiring.Component):
    """Residual add across scales, bit-exact to ``numerics.residual_add``.

    ``y = sat8(round_half_up((a·mult_a + b·mult_b) / 2^shift))``, lane by lane, with
    unsigned 16-bit multipliers and one shared shift per command.

    Parameters
    ----------
    cfg : AccelConfig
        ``lanes = cfg.pe_cols`` values per beat.

    Attributes
    ----------
    cmd : In(stream.Signature(ResidualAdd.cmd_layout(cfg)))
        ``beats`` (≥ 1; up to ``max_tokens · max_dim / lanes``), ``mult_a``, ``mult_b``
        (unsigned 16) and ``shift`` (0 … 62).
    a, b : In(stream.Signature(lane_layout(cfg)))
        The two operands, beat for beat. A beat pair moves when both are valid (and the
        block has room): ``a.ready`` and ``b.ready`` are the same signal and depend on both
        ``valid``s (a join).
    y : Out(stream.Signature(row_beat_layout(cfg)))
        The sums; ``last`` marks the command's final beat.
    busy : Out(1)
        A command is being taken or a beat is in flight.
    busy_cycles : Out(unsigned(32))
        Cycles with ``busy`` high since reset (wraps).

    Notes
    -----
    |a·mult_a + b·mult_b| < 2^24, so the sum is 25 bits and every shift ≥ 25 gives 0
    (``(x + 2^(s−1)) >> s`` with 0 < x + 2^(s−1) < 2^s); the hardware shifts by
    ``min(shift, 25)``, which gives the same result, in a 26-bit datapath. Pipeline: input
    registers, two 8×16 products (two registers), the 3-input sum, the shift, saturation
    into the output queue — 8 cycles from a beat in to its result out, one beat per cycle.
    """

    _SHIFT_LIMIT = 25

    @staticmethod
    def cmd_layout(cfg: AccelConfig) -> data.StructLayout:
        """The ``cmd`` payload for ``cfg``."""
        return data.StructLayout({
            "beats": unsigned(cfg.max_residual_words.bit_length()),
            "mult_a": unsigned(16),
            "mult_b": unsigned(16),
            "shift": unsigned(SHIFT_BITS),
        })

    def __init__(self, cfg: AccelConfig):
        self._cfg = _check_config(cfg)
        super().__init__({
            "cmd": In(stream.Signature(self.cmd_layout(cfg))),
            "a": In(stream.Signature(lane_layout(cfg))),
            "b": In(stream.Signature(lane_layout(cfg))),
            "y": Out(stream.Signature(row_beat_layout(cfg))),
            "busy": Out(1),
            "busy_cycles": Out(BUSY_COUNTER_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        lanes = cfg.pe_cols
        limit = self._SHIFT_LIMIT
        cmd_layout = self.cmd_layout(cfg)

        active = Signal()
        left = Signal(cmd_layout["beats"].shape)
        mult_a, mult_b = Signal(16), Signal(16)
        shift = Signal(range(limit + 1))
        with m.If(~active):
            m.d.comb += self.cmd.ready.eq(1)
            with m.If(self.cmd.valid):
                p = self.cmd.payload
                m.d.sync += [
                    active.eq(p.beats != 0),
                    left.eq(p.beats),
                    mult_a.eq(p.mult_a),
                    mult_b.eq(p.mult_b),
                    shift.eq(Mux(p.shift > limit, limit, p.shift)),
                ]

        latency = 6
        oq, oq_w, oq_r = _queue(m, "out_queue", row_beat_layout(cfg), latency + 8)
        issue = Signal()
        out_free = _credits(m, "res_out", oq.depth, issue, oq.r_en & oq.r_rdy)
        m.d.comb += [
            issue.eq(active & self.a.valid & self.b.valid & out_free),
            self.a.ready.eq(issue),
            self.b.ready.eq(issue),
        ]
        with m.If(issue):
            m.d.sync += left.eq(left - 1)
            with m.If(left == 1):
                m.d.sync += active.eq(0)

        r1_valid, r1_last = _reg(m, issue, name="r1_valid"), _reg(m, left == 1, name="r1_last")
        r1_a = [_reg(m, self.a.payload[i], name=f"r1_a{i}") for i in range(lanes)]
        r1_b = [_reg(m, self.b.payload[i], name=f"r1_b{i}") for i in range(lanes)]
        r1_ma, r1_mb, r1_shift = _reg(m, mult_a), _reg(m, mult_b), _reg(m, shift)
        r1_half = _reg(m, Cat(*(shift == i + 1 for i in range(limit))), name="r1_half")
        # r2, r3: the 8×16-bit products, two registers after the multiply.
        r3_valid = _delay(m, r1_valid, 2, name="r_valid")
        r3_last = _delay(m, r1_last, 2, name="r_last")
        r3_shift = _delay(m, r1_shift, 2, name="r_shift")
        r3_half = _delay(m, r1_half, 2, name="r_half")
        r3_pa = [_delay(m, a * r1_ma, 2, signed(25), name=f"r_pa{i}") for i, a in enumerate(r1_a)]
        r3_pb = [_delay(m, b * r1_mb, 2, signed(25), name=f"r_pb{i}") for i, b in enumerate(r1_b)]
        r4_valid, r4_last, r4_shift = _reg(m, r3_valid), _reg(m, r3_last), _reg(m, r3_shift)
        r4_x = [_reg(m, pa + pb + r3_half, signed(27), name=f"r4_x{i}")
                for i, (pa, pb) in enumerate(zip(r3_pa, r3_pb, strict=True))]
        r5_valid, r5_last = _reg(m, r4_valid), _reg(m, r4_last)
        r5_y = [_reg(m, x >> r4_shift, signed(27), name=f"r5_y{i}") for i, x in enumerate(r4_x)]
        m.d.comb += [oq.w_en.eq(r5_valid), oq_w.last.eq(r5_last)]
        m.d.comb += [oq_w.data[i].eq(Mux(y > 127, 127, Mux(y < -128, -128, y)))
                     for i, y in enumerate(r5_y)]
        m.d.comb += [
            self.y.valid.eq(oq.r_rdy),
            self.y.payload.eq(oq_r),
            oq.r_en.eq(self.y.ready),
        ]

        in_flight = Signal(range(oq.depth + latency + 1))
        m.d.sync += in_flight.eq(in_flight + issue - (oq.r_en & oq.r_rdy))
        m.d.comb += self.busy.eq(active | (in_flight != 0))
        _busy_counter(m, self.busy, self.busy_cycles)
        return m


class TableLookup(wiring.Component):
    """A 256-entry INT8 table applied to every lane, bit-exact to ``numerics.table_lookup``.

    ``y = table[q & 0xFF]``: entries 0 … 127 are q = 0 … 127, entries 128 … 255 are
    q = −128 … −1 (GELU, or any per-layer INT8 → INT8 function the compiler tabulates).

    Parameters
    ----------
    cfg : AccelConfig
        ``lanes = cfg.pe_cols`` values per beat.

    Attributes
    ----------
    i : In(stream.Signature(row_beat_layout(cfg)))
        Input beats; ``last`` is passed through unchanged (framing of the producer).
    o : Out(stream.Signature(row_beat_layout(cfg)))
        The looked-up beats, in order, with the input's ``last``.
    table : In(stream.Signature(TableLookup.table_layout()))
        Writes entry ``index`` (0 … 255). Always ready: a write takes priority over an input
        beat in the same cycle (``i.ready`` is low while ``table.valid`` is high). Each
        beat is looked up in the table as it stands on the cycle the beat is accepted, so
        rewriting the table between two groups of beats needs no draining.
    busy : Out(1)
        A beat is in flight.
    busy_cycles : Out(unsigned(32))
        Cycles with ``busy`` high since reset (wraps).

    Notes
    -----
    The table is replicated per lane (256×8 bits each: four LUTs per bit as LUTRAM), so all
    lanes read every cycle. The read address comes straight from the input beat; latency is
    one cycle into the output queue, throughput one beat per cycle.
    """

    @staticmethod
    def table_layout() -> data.StructLayout:
        """The ``table`` payload: one INT8 entry."""
        return data.StructLayout({"index": unsigned(8), "value": signed(8)})

    def __init__(self, cfg: AccelConfig):
        self._cfg = _check_config(cfg)
        super().__init__({
            "i": In(stream.Signature(row_beat_layout(cfg))),
            "o": Out(stream.Signature(row_beat_layout(cfg))),
            "table": In(stream.Signature(self.table_layout())),
            "busy": Out(1),
            "busy_cycles": Out(BUSY_COUNTER_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        lanes = self._cfg.pe_cols
        oq, oq_w, oq_r = _queue(m, "out_queue", row_beat_layout(self._cfg), 4)
        issue = Signal()
        out_free = _credits(m, "tab_out", oq.depth, issue, oq.r_en & oq.r_rdy)
        m.d.comb += [
            self.table.ready.eq(1),
            self.i.ready.eq(~self.table.valid & out_free),
            issue.eq(self.i.valid & self.i.ready),
        ]
        for i in range(lanes):
            table = Memory(shape=signed(8), depth=256, init=[])
            m.submodules[f"table{i}"] = table
            write, read = table.write_port(), table.read_port()
            m.d.comb += [
                write.en.eq(self.table.valid),
                write.addr.eq(self.table.payload.index),
                write.data.eq(self.table.payload.value),
                read.addr.eq(self.i.payload.data[i].as_unsigned()),
                oq_w.data[i].eq(read.data),
            ]
        t1_valid = _reg(m, issue, name="t1_valid")
        m.d.comb += [oq.w_en.eq(t1_valid), oq_w.last.eq(_reg(m, self.i.payload.last))]
        m.d.comb += [
            self.o.valid.eq(oq.r_rdy),
            self.o.payload.eq(oq_r),
            oq.r_en.eq(self.o.ready),
        ]

        in_flight = Signal(range(oq.depth + 2))
        m.d.sync += in_flight.eq(in_flight + issue - (oq.r_en & oq.r_rdy))
        m.d.comb += self.busy.eq(in_flight != 0)
        _busy_counter(m, self.busy, self.busy_cycles)
        return m
