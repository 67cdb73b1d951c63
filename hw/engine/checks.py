"""The instruction checks: what the controller verifies before an instruction starts.

An instruction is refused, before anything of it starts, when its opcode or a mode is not
in the instruction set (``ILLEGAL_OPCODE``), a count is zero or over the configuration's
capacity (``SHAPE_OVER_CAPACITY``), or a buffer range or its DDR range lies outside the
buffer or ``DATA_SIZE`` (``ADDRESS_OUT_OF_RANGE``). The rules are those of ``docs/isa.md``
(:mod:`m3vit.hw.isa_checks`).
"""

import functools
import operator

from amaranth.hdl import Const, Module, Mux, Signal, Value
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from ..config import AccelConfig
from ..isa import (
    GEMM_RECORD_BYTES,
    INSTRUCTION,
    LN_RECORD_BYTES,
    OPERANDS,
    GemmMode,
    Opcode,
    RowMode,
    TableUnit,
    WeightSource,
)
from ..isa_checks import (
    BODY_ONLY_FIELDS,
    FLAG_REQUIRES,
    NOT_IN_BODY,
    SHAPE_BOUNDS,
    allowed_values,
    enum_fields,
)

__all__ = ["RANGE_BOUNDS", "InstructionChecks", "checks_control"]


def _any(values) -> Value:
    return functools.reduce(operator.or_, values)


def _all(values) -> Value:
    return functools.reduce(operator.and_, values)

#: A buffer range: ``base + Σ (n − 1) · s`` over up to three (count, stride) terms (its
#: last word), from ``first``.
_RANGE = data.StructLayout({"used": 1, "base": 32, "first": 32,
                            "terms": data.ArrayLayout(data.StructLayout({"n": 16, "s": 16}), 3)})

#: Where a range of the checked instruction lies: its first and last buffer word (the last
#: valid from ``CHECK2``), and whether the instruction has it.
RANGE_BOUNDS = data.StructLayout({"used": 1, "first": 32, "last": 40})


def checks_control(config: AccelConfig) -> wiring.Signature:
    """The controller's side of the checks.

    Returns
    -------
    wiring.Signature
        Its members (flows seen from the controller):

        register_sums : Out(1)
            State ``CHECK1``: register the ranges' products and sums (the verdicts are valid
            the cycle after).
        loop_active, routed : Out(1)
            An ``EXPERTS`` body is running; a ``ROUTE`` has completed in this run.
        ctx_count, ctx_offset, expert_offset : Out
            The ``EXPERTS`` iteration's token count, queue offset and expert DDR offset.
        task_offset : Out(64)
            ``TASK_SELECT · stride`` of the last ``TASKS``.
        opcode_ok, shape_ok, buffer_ok, ddr_ok : In(1)
            The verdicts (``buffer_ok`` and ``ddr_ok`` from the registered sums).
        ddr_offset, ddr_bytes : In(48)
            The instruction's DDR range (``per_task`` and expert offsets added).
        tokens : In(16)
            A ``GEMM``'s token count (the iteration's count for an expert ``GEMM``).
        route_beats, softmax_beats, softmax_out_beats : In(16)
            Beats per row of a ``ROUTE`` (experts) and a ``SOFTMAX`` (length), and the
            words a ``SOFTMAX`` writes a row (its probabilities and their scale).
        ranges : In(ArrayLayout(RANGE_BOUNDS, 3))
            The instruction's buffer ranges (``GEMM``: activations, results, buffer weights
            or the residual's x; ``SOFTMAX``: logits, probabilities), for the hazard check
            against a background softmax.
    """
    entries = config.max_tokens * config.max_top_k
    return wiring.Signature({
        "register_sums": Out(1),
        "loop_active": Out(1),
        "routed": Out(1),
        "ctx_count": Out(range(config.max_tokens + 1)),
        "ctx_offset": Out(range(entries + 1)),
        "expert_offset": Out(48),
        "task_offset": Out(64),
        "opcode_ok": In(1),
        "shape_ok": In(1),
        "buffer_ok": In(1),
        "ddr_ok": In(1),
        "ddr_offset": In(48),
        "ddr_bytes": In(48),
        "tokens": In(16),
        "route_beats": In(16),
        "softmax_beats": In(16),
        "softmax_out_beats": In(16),
        "ranges": In(data.ArrayLayout(RANGE_BOUNDS, 3)),
    })


class InstructionChecks(wiring.Component):
    """Opcode, capacity and address checks of the fetched instruction.

    Parameters
    ----------
    config : AccelConfig
        The capacities checked against and the buffer's depth.

    Attributes
    ----------
    control : In(checks_control(config))
        The controller's context and the verdicts.
    instruction : In(INSTRUCTION)
        The fetched instruction.
    data_size : In(64)
        ``DATA_SIZE``: DDR ranges must end at or below it.
    routed_rows, routed_entries : In
        The dispatcher's ``rows`` and ``entries`` of the last ``ROUTE``.

    Notes
    -----
    Each instruction touches up to three buffer ranges and one DDR range (an INT32
    ``GEMM`` a second, its results); a range is a base plus Σ (count − 1) · stride. The
    products are registered in ``CHECK1`` and the sums compared in ``CHECK2``, so the
    checks cost two cycles, not timing.
    """

    def __init__(self, config: AccelConfig):
        self.config = config
        entries = config.max_tokens * config.max_top_k
        super().__init__({
            "control": In(checks_control(config)),
            "instruction": In(INSTRUCTION),
            "data_size": In(64),
            "routed_rows": In(16),
            "routed_entries": In(range(entries + 1)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        C = cfg.pe_cols
        ctl = self.control
        args = self.instruction.args
        rng = [Signal(_RANGE, name=f"range{k}") for k in range(3)]
        ddr_used = Signal()
        m.d.comb += [
            # INT16 logits: C/2 experts a word.
            ctl.route_beats.eq((args.route.experts + C // 2 - 1) >> exact_log2(C // 2)),
            ctl.softmax_beats.eq((args.softmax.length + C - 1) >> exact_log2(C)),
            # The row's scale takes its last word's top three lanes: L + 3 lanes a row.
            ctl.softmax_out_beats.eq((args.softmax.length + C + 2) >> exact_log2(C)),
            # A GEMM in an EXPERTS body runs the iteration's tokens, its rows mapped per
            # RowMode; its ranges are checked with the rows it actually touches.
            ctl.tokens.eq(Mux(args.gemm.expert, ctl.ctx_count, args.gemm.tokens)),
        ]
        self._legal_and_in_shape(m)
        self._opcodes(m, rng, ddr_used)
        self._verdicts(m, rng, ddr_used)
        return m

    def _legal_and_in_shape(self, m: Module) -> None:
        """``opcode_ok`` and ``shape_ok`` from the declarations of :mod:`~m3vit.hw.isa_checks`
        (the ISA model evaluates the same ones on integers)."""
        ctl = self.control
        op = self.instruction.opcode
        args = self.instruction.args
        with m.Switch(op):     # an opcode not in the set matches no case: opcode_ok = 0
            for legal in Opcode:
                with m.Case(legal):
                    a = getattr(args, legal.name.lower()) if OPERANDS[legal].size else None
                    m.d.comb += [ctl.opcode_ok.eq(self._legal(legal, a)),
                                 ctl.shape_ok.eq(self._in_shape(legal, a))]

    def _legal(self, op: Opcode, a) -> Value:
        """Every enum field holds an allowed encoding; body-only fields and opcodes only
        inside an ``EXPERTS`` body."""
        ctl = self.control
        terms = [Const(1)]
        for name, _ in enum_fields(op):
            terms.append(_any(Value.cast(a[name]) == v for v in allowed_values(op, name)))
        if op in BODY_ONLY_FIELDS:
            used = _any(Value.cast(a[name]) != 0 for name in BODY_ONLY_FIELDS[op])
            terms.append(~used | ctl.loop_active)
        if op in NOT_IN_BODY:
            terms.append(~ctl.loop_active)
        for (flag_op, flag), needs in FLAG_REQUIRES.items():
            if flag_op == op:
                held = _all(_any(Value.cast(a[name]) == v.value for v in values)
                            for name, values in needs.items())
                terms.append(~a[flag] | held)
        return _all(terms)

    def _in_shape(self, op: Opcode, a) -> Value:
        """Every declared count in ``1 … capacity``, then the rules on run-time state."""
        cfg = self.config
        ctl = self.control
        terms = [Const(1)]
        for bound in SHAPE_BOUNDS.get(op, ()):
            # An expert GEMM in a body runs the iteration's count in place of ``tokens``.
            value = ctl.tokens if (op, bound.field) == (Opcode.GEMM, "tokens") \
                else a[bound.field]
            terms.append(value >= 1)
            limit, scale = bound.limit(cfg), bound.scale(cfg)
            if limit is not None:
                terms.append((value if scale == 1 else value * scale) <= limit)
        if op == Opcode.ROUTE:
            terms.append(a.experts >= a.top_k)
        if op == Opcode.COMBINE:
            terms += [ctl.routed, a.rows <= self.routed_rows]
        if op == Opcode.GEMM:
            # A fused residual add takes every result word: as many as a RESIDUAL may.
            words = (a.n_tiles * ctl.tokens) << exact_log2(cfg.gemm_words)
            terms.append(~a.residual | (words <= cfg.max_residual_words))
        return _all(terms)

    def _opcodes(self, m: Module, rng, ddr_used: Signal) -> None:
        """Per opcode: the buffer and DDR ranges it touches."""
        cfg = self.config
        C, R = cfg.pe_cols, cfg.pe_rows
        G, log_words = cfg.gemm_cols, exact_log2(cfg.gemm_words)  # an N-tile: V = G / C words
        log_axi = exact_log2(cfg.axi_bytes)
        ctl = self.control
        op = self.instruction.opcode
        args = self.instruction.args

        def buffer_range(k, base, *terms, first=None):
            m.d.comb += [rng[k].used.eq(1), rng[k].base.eq(base),
                         rng[k].first.eq(base if first is None else first)]
            for t, (count, stride) in enumerate(terms):
                m.d.comb += [rng[k].terms[t].n.eq(count - 1), rng[k].terms[t].s.eq(stride)]

        def ddr_range(offset, nbytes, per_task=0):
            m.d.comb += [ddr_used.eq(1),
                         ctl.ddr_offset.eq(offset + Mux(per_task, ctl.task_offset, 0)),
                         ctl.ddr_bytes.eq(nbytes)]

        def touched_rows(mode):
            return Mux(mode == RowMode.GATHER, self.routed_rows,
                       Mux(mode == RowMode.QUEUE, ctl.ctx_offset + ctl.tokens, ctl.tokens))

        def whole_beats(words):
            return ((words * C + cfg.axi_bytes - 1) >> log_axi) << log_axi

        with m.Switch(op):
            with m.Case(Opcode.GEMM):
                g = args.gemm
                buffer_range(0, g.src, (g.k_slices, g.src_stride),
                             (touched_rows(g.src_rows), 1))
                with m.If(g.mode == GemmMode.INT16):
                    buffer_range(1, g.dst, (g.n_tiles << (log_words + 1), g.dst_stride),
                                 (touched_rows(g.dst_rows), 1))
                with m.Elif(g.mode != GemmMode.INT32):
                    buffer_range(1, g.dst, (g.n_tiles << log_words, g.dst_stride),
                                 (touched_rows(g.dst_rows), 1))
                with m.If(g.wsrc == WeightSource.BUFFER_ROWS):
                    buffer_range(2, g.wbuf + R - 1, (g.n_tiles << log_words, g.wstride),
                                 (g.k_slices, R), first=g.wbuf)
                with m.Elif(g.wsrc == WeightSource.BUFFER_COLUMNS):
                    buffer_range(2, g.wbuf + G - 1, (g.k_slices, g.wstride), (g.n_tiles, G),
                                 first=g.wbuf)
                with m.Elif(g.residual):
                    # The residual's x, read where the results are written, from wbuf.
                    buffer_range(2, g.wbuf, (g.n_tiles << log_words, g.dst_stride),
                                 (touched_rows(g.dst_rows), 1))
                tile_bytes = Mux(g.wsrc == WeightSource.DDR, g.k_slices * (R * G), 0)
                ddr_range(g.ddr + Mux(g.expert, ctl.expert_offset, 0),
                          g.n_tiles * (GEMM_RECORD_BYTES * G + tile_bytes), g.per_task)
                # (INT32 results: checked as a second DDR range in _verdicts.)
            with m.Case(Opcode.LAYERNORM):
                a = args.layernorm
                buffer_range(0, a.src, (a.beats, a.stride), (a.rows, 1))
                buffer_range(1, a.dst, (a.beats, a.stride), (a.rows, 1))
                ddr_range(a.ddr, a.beats * (LN_RECORD_BYTES * C))
            with m.Case(Opcode.SOFTMAX):
                a = args.softmax
                buffer_range(0, a.src, (ctl.softmax_beats, a.stride), (a.rows, 1))
                # The rows' probabilities, each row's scale in its last word's top lanes.
                buffer_range(1, a.dst, (ctl.softmax_out_beats, a.stride), (a.rows, 1))
            with m.Case(Opcode.RESIDUAL):
                a = args.residual
                buffer_range(0, a.src_a, (a.words, 1))
                buffer_range(1, a.src_b, (a.words, 1))
                buffer_range(2, a.dst, (a.words, 1))
            with m.Case(Opcode.LOAD):
                a = args.load
                buffer_range(0, a.dst, (a.words, a.dst_stride))
                ddr_range(a.ddr, whole_beats(a.words))
            with m.Case(Opcode.STORE):
                a = args.store
                buffer_range(0, a.src, (a.words, a.src_stride))
                ddr_range(a.ddr, whole_beats(a.words))
            with m.Case(Opcode.LOAD_TABLE):
                a = args.load_table
                ddr_range(a.ddr, Mux(a.unit == TableUnit.GEMM, 256, 512), a.per_task)
            with m.Case(Opcode.ROUTE):
                a = args.route
                buffer_range(0, a.src, (ctl.route_beats, a.stride), (a.rows, 1))
            with m.Case(Opcode.COMBINE):
                a = args.combine
                buffer_range(0, a.src, (a.beats, a.src_stride), (self.routed_entries, 1))
                buffer_range(1, a.dst, (a.beats, a.dst_stride), (a.rows, 1))
                with m.If(a.residual):
                    buffer_range(2, a.res_src, (a.beats, a.dst_stride), (a.rows, 1))

    def _verdicts(self, m: Module, rng, ddr_used: Signal) -> None:
        """``CHECK1`` registers each range's last word and the DDR end; ``CHECK2`` compares."""
        cfg = self.config
        ctl = self.control
        g = self.instruction.args.gemm
        rng_last = [Signal(40, name=f"range{k}_last") for k in range(3)]
        ddr_end = Signal(65)
        with m.If(ctl.register_sums):
            for k in range(3):
                terms = rng[k].terms
                m.d.sync += rng_last[k].eq(Mux(rng[k].used,
                                               rng[k].base + terms[0].n * terms[0].s
                                               + terms[1].n * terms[1].s
                                               + terms[2].n * terms[2].s, 0))
            m.d.sync += ddr_end.eq(Mux(ddr_used, ctl.ddr_offset + ctl.ddr_bytes, 0))
        # INT32 results of a GEMM: a second DDR range (bytes = n_tiles · tokens · 4G).
        out_end = Signal(65)
        m.d.sync += out_end.eq(g.out_ddr + g.n_tiles * ctl.tokens * (4 * cfg.gemm_cols))
        for k in range(3):
            m.d.comb += [ctl.ranges[k].used.eq(rng[k].used), ctl.ranges[k].first.eq(rng[k].first),
                         ctl.ranges[k].last.eq(rng_last[k])]
        depth = cfg.act_buffer_words
        m.d.comb += [
            ctl.buffer_ok.eq((rng_last[0] < depth) & (rng_last[1] < depth)
                             & (rng_last[2] < depth)),
            ctl.ddr_ok.eq((ddr_end <= self.data_size)
                          & ((self.instruction.opcode != Opcode.GEMM) | (g.mode != GemmMode.INT32)
                             | (out_end <= self.data_size))),
        ]
