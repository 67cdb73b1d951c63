"""The accelerator top: instruction controller, activation buffer and the compute units.

:class:`Engine` is everything between the DMA engines and the control registers: it
fetches the program (``docs/isa.md``) through the read DMA, checks each instruction, and
runs it on the GEMM engine, the vector units and the on-chip activation buffer, moving
DDR data through the DMA streams. :class:`AcceleratorTop` wraps it with the AXI4-Lite
register file and the AXI4 master DMA engines: the design that goes to Vivado.

Datapath of the engine (one instruction at a time)::

                  ┌─────────────── activation buffer (words of C lanes) ──────────────┐
    read port A ──┤ GEMM activations │ LayerNorm x │ softmax logits │ residual a │ STORE │
    read port B ──┤ GEMM weights (Q·Kᵀ columns, P·V rows) │ residual b                 │
    write port  ◄─┤ GEMM INT8 results │ LayerNorm y │ softmax probs │ residual │ LOAD   │
                  └────────────────────────────────────────────────────────────────────┘
    read DMA  ──► program words │ GEMM parameters + weight tiles │ LayerNorm parameters │
                  tables │ LOAD data
    write DMA ◄── GEMM INT32 results (task head) │ STORE data

Each port's addresses come from a three-level loop generator (:class:`AddressGenerator`),
so every tensor walk of the ISA (slice-major rows, strided heads, transposed tiles) is a
base, three counts and three strides.
"""

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from .axi import AxiDmaPort, StreamResize, byte_beat_layout, dma_cmd_layout
from .config import AccelConfig
from .gemm import GemmEngine
from .isa import (
    GEMM_RECORD_BYTES,
    INSTRUCTION,
    INSTRUCTION_BYTES,
    LN_RECORD_BYTES,
    ExpertOrder,
    GemmOp,
    Opcode,
    RowMode,
    TableUnit,
    WeightSource,
    check_top_config,
)
from .moe import Combiner, Dispatcher
from .regfile import AxiLiteSignature, ControlRegisters
from .registers import EngineControlSignature, ErrorCode, Schedule
from .vector import LayerNormUnit, ResidualAdd, SoftmaxMode, SoftmaxUnit

__all__ = ["AcceleratorTop", "AddressGenerator", "Engine", "GatherMode", "GatherStage"]

class AddressGenerator(wiring.Component):
    """Addresses ``base + i0·s0 + i1·s1 + i2·s2`` for i0 < n0, i1 < n1, i2 < n2 (i2 fastest).

    Loaded by :attr:`start` (one cycle) with ``base``, ``count`` and ``stride``; then
    :attr:`addr` streams the ``n0·n1·n2`` addresses, one per accepted beat, with
    ``last`` on the final one. Counts of 0 are not allowed (the controller checks them).
    Only adders: the running address is kept per loop level. Each beat also carries
    ``outer`` = ``base + i0·s0 + i1·s1`` and the counters ``i1``, ``i2``, from which
    :class:`GatherStage` forms indirect addresses (``outer`` + a table entry).
    """

    def __init__(self, addr_bits: int, count_bits: int):
        self._addr_bits = addr_bits
        self._count_bits = count_bits
        super().__init__({
            "start": In(1),
            "base": In(addr_bits),
            "count": In(data.ArrayLayout(unsigned(count_bits), 3)),
            "stride": In(data.ArrayLayout(unsigned(addr_bits), 3)),
            "addr": Out(stream.Signature(data.StructLayout({
                "addr": addr_bits, "last": 1, "outer": addr_bits, "i1": count_bits,
                "i2": count_bits}))),
        })

    def elaborate(self, platform):
        m = Module()
        n = Signal(data.ArrayLayout(unsigned(self._count_bits), 3))
        s = Signal(data.ArrayLayout(unsigned(self._addr_bits), 3))
        i = [Signal(self._count_bits, name=f"i{k}") for k in range(3)]
        # a0: start of the current outer iteration, a1: of the current middle one, a2: address.
        a0, a1, a2 = (Signal(self._addr_bits, name=f"a{k}") for k in range(3))
        active = Signal()
        end = [i[k] == n[k] - 1 for k in range(3)]
        m.d.comb += [
            self.addr.valid.eq(active),
            self.addr.payload.addr.eq(a2),
            self.addr.payload.last.eq(end[0] & end[1] & end[2]),
            self.addr.payload.outer.eq(a1),
            self.addr.payload.i1.eq(i[1]),
            self.addr.payload.i2.eq(i[2]),
        ]
        with m.If(self.start):
            m.d.sync += [n.eq(self.count), s.eq(self.stride), a0.eq(self.base),
                         a1.eq(self.base), a2.eq(self.base), active.eq(1)]
            m.d.sync += [counter.eq(0) for counter in i]
        with m.Elif(self.addr.valid & self.addr.ready):
            with m.If(~end[2]):
                m.d.sync += [i[2].eq(i[2] + 1), a2.eq(a2 + s[2])]
            with m.Elif(~end[1]):
                m.d.sync += [i[2].eq(0), i[1].eq(i[1] + 1), a1.eq(a1 + s[1]),
                             a2.eq(a1 + s[1])]
            with m.Elif(~end[0]):
                m.d.sync += [i[2].eq(0), i[1].eq(0), i[0].eq(i[0] + 1), a0.eq(a0 + s[0]),
                             a1.eq(a0 + s[0]), a2.eq(a0 + s[0])]
            with m.Else():
                m.d.sync += active.eq(0)
        return m


class GatherMode(enum.Enum, shape=2):
    """What :class:`GatherStage` does to the addresses passing through it."""

    #: addresses pass unchanged (combinationally)
    NONE = 0
    #: ``outer + queue[offset + i2]``: an expert's tokens (GEMM ``src_rows = GATHER``)
    QUEUE = 1
    #: ``outer + slot[i1][i2].pos``, tagged with ``slot[i1][i2].score`` (``COMBINE``)
    SLOT = 2


class GatherStage(wiring.Component):
    """Indirect buffer addresses through the dispatcher's tables, one per cycle.

    Sits between an :class:`AddressGenerator` and a buffer read port. In mode ``NONE`` it is
    a wire; otherwise each beat reads one table entry (the dispatcher's read ports answer
    one cycle later and hold their data while not enabled) into a one-beat pipeline stage,
    so throughput stays one address per cycle and the table read is registered.

    Parameters
    ----------
    addr_bits, count_bits : int
        Widths of the generator's addresses and counters.
    slot_shape : ArrayLayout
        The dispatcher's ``slot`` output (an array of ``expert``/``score``/``pos`` structs).
    queue_bits, token_bits : int
        Widths of the queue address and of a queue entry.
    """

    def __init__(self, addr_bits: int, count_bits: int, slot_shape, queue_bits: int,
                 token_bits: int):
        self._count_bits = count_bits
        self._slots = slot_shape.length
        gen_payload = data.StructLayout({"addr": addr_bits, "last": 1, "outer": addr_bits,
                                         "i1": count_bits, "i2": count_bits})
        super().__init__({
            "mode": In(GatherMode),
            "offset": In(queue_bits),
            "i": In(stream.Signature(gen_payload)),
            "o": Out(stream.Signature(data.StructLayout({"addr": addr_bits, "last": 1,
                                                         "tag": 15}))),
            "queue_addr": Out(queue_bits),
            "queue_en": Out(1),
            "queue_token": In(token_bits),
            "slot_addr": Out(count_bits),
            "slot_en": Out(1),
            "slot": In(slot_shape),
        })

    def elaborate(self, platform):
        m = Module()
        held = Signal()                      # a beat is in the stage
        outer = Signal.like(self.i.payload.outer)
        last = Signal()
        choice = Signal(range(self._slots))
        accept = self.i.valid & (~held | self.o.ready)
        m.d.comb += [
            self.queue_addr.eq(self.offset + self.i.payload.i2),
            self.slot_addr.eq(self.i.payload.i1),
        ]
        with m.If(self.mode == GatherMode.NONE):
            m.d.comb += [self.o.valid.eq(self.i.valid), self.i.ready.eq(self.o.ready),
                         self.o.payload.addr.eq(self.i.payload.addr),
                         self.o.payload.last.eq(self.i.payload.last)]
        with m.Else():
            m.d.comb += [
                self.i.ready.eq(~held | self.o.ready),
                self.queue_en.eq(accept & (self.mode == GatherMode.QUEUE)),
                self.slot_en.eq(accept & (self.mode == GatherMode.SLOT)),
                self.o.valid.eq(held),
                self.o.payload.last.eq(last),
            ]
            slot = self.slot[choice]
            with m.If(self.mode == GatherMode.QUEUE):
                m.d.comb += self.o.payload.addr.eq(outer + self.queue_token)
            with m.Else():
                m.d.comb += [self.o.payload.addr.eq(outer + slot.pos),
                             self.o.payload.tag.eq(slot.score)]
            with m.If(accept):
                m.d.sync += [held.eq(1), outer.eq(self.i.payload.outer),
                             last.eq(self.i.payload.last), choice.eq(self.i.payload.i2)]
            with m.Elif(self.o.ready):
                m.d.sync += held.eq(0)
        return m


def _buffer_reader(m: Module, name: str, memory: Memory, addr, width: int, tag_bits: int = 0):
    """A read port of ``memory`` driven by the address stream ``addr``, back-pressured.

    ``addr`` carries ``addr`` and ``last`` (and ``tag`` when ``tag_bits``: a value that
    travels with the word). The memory answers one cycle after the address; a read is
    issued only when the queue behind it has room for its word, so the port never needs a
    clock enable. Returns ``(valid, payload, ready, last, tag)``.
    """
    port = memory.read_port()
    queue = SyncFIFOBuffered(width=width + 1 + tag_bits, depth=5)
    m.submodules[f"{name}_queue"] = queue
    in_flight = Signal(name=f"{name}_in_flight")
    last_in_flight = Signal(name=f"{name}_last_in_flight")
    tag_in_flight = Signal(max(tag_bits, 1), name=f"{name}_tag_in_flight")
    room = queue.level + in_flight < 4
    issue = addr.valid & room
    m.d.comb += [
        addr.ready.eq(room),
        port.addr.eq(addr.payload.addr),
        port.en.eq(issue),
        queue.w_en.eq(in_flight),
        queue.w_data.eq(Cat(port.data, last_in_flight, tag_in_flight[:tag_bits])),
    ]
    m.d.sync += [in_flight.eq(issue), last_in_flight.eq(addr.payload.last)]
    if tag_bits:
        m.d.sync += tag_in_flight.eq(addr.payload.tag)
    ready = Signal(name=f"{name}_ready")
    m.d.comb += queue.r_en.eq(ready)
    return (queue.r_rdy, queue.r_data[:width], ready, queue.r_data[width],
            queue.r_data[width + 1:])


class Engine(wiring.Component):
    """Instruction controller, activation buffer, GEMM engine and vector units.

    Parameters
    ----------
    config : AccelConfig
        The configuration (checked by :func:`check_top_config`).

    Attributes
    ----------
    start, abort_request : In(1)
        One-cycle requests from the control registers.
    program_base, data_base, data_size : In(64)
        DDR byte address of the program, of the data window, and the window's size.
    task_select : In(8)
        The task whose ``per_task`` blocks the program reads.
    schedule : In(Schedule)
        ``SCHEDULE.ORDER``: the order of ``EXPERTS`` loops with ``order = REGISTER``
        (sampled at start).
    busy : Out(1)
        A run is in progress.
    done, error : Out(1)
        One-cycle pulses when a run ends normally / with an error.
    error_code : Out(ErrorCode)
        The last run's error (held until the next start).
    error_pc : Out(32)
        Index of the instruction that failed.
    rd_cmd, rd_data, wr_cmd, wr_data : streams
        To / from the read and write DMA engines (byte address, beat count; AXI-wide data).
    wr_idle : In(1)
        No write command or response is outstanding in the write DMA.
    dma_error : In(1)
        A DMA saw SLVERR / DECERR since :attr:`dma_error_clear` was last pulsed.
    dma_error_clear : Out(1)
        Pulsed at the start of a run.
    counters : Out
        Free-running 32-bit counters: instructions, gemm_busy, vector_busy, weight_stall,
        and token_beats (tokens through the PE array: each is ``pe_rows · pe_cols`` MACs,
        one cycle of the array computing).
    """

    def __init__(self, config: AccelConfig):
        self.config = check_top_config(config)
        dma_cmd = dma_cmd_layout(config)
        super().__init__({
            "ctrl": Out(EngineControlSignature()),
            "rd_cmd": Out(stream.Signature(dma_cmd)),
            "rd_data": In(stream.Signature(byte_beat_layout(config.axi_bytes))),
            "wr_cmd": Out(stream.Signature(dma_cmd)),
            "wr_data": Out(stream.Signature(byte_beat_layout(config.axi_bytes))),
            "wr_idle": In(1),
            "dma_error": In(1),
            "dma_error_clear": Out(1),
            "token_beats": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        C = cfg.pe_cols
        R = cfg.pe_rows
        word_bits = 8 * C
        axi_bytes = cfg.axi_bytes
        log_axi = exact_log2(axi_bytes)
        depth = cfg.act_buffer_words

        # ---- units ------------------------------------------------------------------------
        gemm = m.submodules.gemm = GemmEngine(cfg)
        ln = m.submodules.layernorm = LayerNormUnit(cfg)
        softmax = m.submodules.softmax = SoftmaxUnit(cfg)
        residual = m.submodules.residual = ResidualAdd(cfg)
        dispatcher = m.submodules.dispatcher = Dispatcher(cfg)
        combiner = m.submodules.combiner = Combiner(cfg)

        # UltraRAM: 512 KiB in two read copies is 32 of the XCZU7EV's 96 URAM288 blocks, where
        # block RAM would take 228 of its 312 RAMB36 (Vivado and Yosys both honour ram_style).
        buffer = m.submodules.buffer = Memory(shape=unsigned(word_bits), depth=depth, init=[],
                                              attrs={"ram_style": "ultra"})
        buf_bits = ceil_log2(depth)
        gen_a = m.submodules.gen_a = AddressGenerator(buf_bits, 16)
        gen_b = m.submodules.gen_b = AddressGenerator(buf_bits, 16)
        gen_w = m.submodules.gen_w = AddressGenerator(buf_bits, 16)
        # Port A's addresses may go through the dispatcher's tables (MoE gather / combine).
        gather = m.submodules.gather = GatherStage(
            buf_bits, 16, dispatcher.slot.shape(), len(dispatcher.queue_addr),
            len(dispatcher.queue_token))
        wiring.connect(m, gen_a.addr, gather.i)
        m.d.comb += [dispatcher.queue_addr.eq(gather.queue_addr),
                     dispatcher.queue_en.eq(gather.queue_en),
                     gather.queue_token.eq(dispatcher.queue_token),
                     gather.slot.eq(dispatcher.slot)]
        a_valid, a_data, a_ready, _, a_tag = _buffer_reader(m, "port_a", buffer, gather.o,
                                                            word_bits, tag_bits=15)
        b_valid, b_data, b_ready, _, _ = _buffer_reader(m, "port_b", buffer, gen_b.addr,
                                                        word_bits)
        write = buffer.write_port()

        # Width converters between AXI beats and the units' words.
        rs_word = m.submodules.rs_word = StreamResize(axi_bytes, C)         # LOAD, weights
        rs_param = m.submodules.rs_param = StreamResize(axi_bytes, GEMM_RECORD_BYTES)
        rs_ln = m.submodules.rs_ln = StreamResize(axi_bytes, LN_RECORD_BYTES * C)
        rs_t8 = m.submodules.rs_t8 = StreamResize(axi_bytes, 1)
        rs_t16 = m.submodules.rs_t16 = StreamResize(axi_bytes, 2)
        rs_store = m.submodules.rs_store = StreamResize(C, axi_bytes)
        rs_i32 = m.submodules.rs_i32 = StreamResize(4 * C, axi_bytes)

        # ---- the current instruction ------------------------------------------------------
        word = Signal(INSTRUCTION)
        pc = Signal(32)
        op = word.opcode
        args = word.args
        task_stride = Signal(32)
        task_offset = Signal(64)
        error_code = Signal(ErrorCode)
        m.d.comb += [self.ctrl.error_code.eq(error_code), self.ctrl.error_pc.eq(pc)]

        # ---- MoE: the EXPERTS loop and the context of its current iteration ----------------
        routed = Signal()                  # a ROUTE has completed in this run
        schedule = Signal(Schedule)        # SCHEDULE.ORDER, sampled at start
        loop_active = Signal()
        loop_first = Signal(32)            # pc of the body's first / last instruction
        loop_last = Signal(32)
        loop_tbt = Signal()                # token-by-token order
        loop_stride = Signal(32)           # EXPERTS.stride
        loop_index = Signal.like(dispatcher.list_index)   # expert-by-expert: list position
        loop_token = Signal(16)            # token-by-token: token t and choice j
        loop_choice = Signal(range(cfg.max_top_k))
        ctx_expert = Signal.like(dispatcher.list_expert)
        ctx_offset = Signal.like(dispatcher.list_start)
        ctx_count = Signal.like(dispatcher.list_count)
        expert_offset = Signal(48)         # ctx_expert · loop_stride
        gather_mode = Signal(GatherMode)
        gather_offset = Signal.like(ctx_offset)   # the context of the GEMM being walked
        m.d.comb += [gather.mode.eq(gather_mode), gather.offset.eq(gather_offset)]
        with m.If(gather_mode == GatherMode.SLOT):
            m.d.comb += [dispatcher.slot_addr.eq(gather.slot_addr),
                         dispatcher.slot_en.eq(gather.slot_en)]

        # ---- routing of the read DMA's data -----------------------------------------------
        class Sink(enum.Enum, shape=3):
            NONE = 0
            FETCH = 1
            GEMM = 2
            LN = 3
            TABLE8 = 4
            TABLE16 = 5
            LOAD = 6

        sink = Signal(Sink)
        fetch_valid = Signal()
        fetch_ready = Signal()
        rd = self.rd_data
        # GEMM stream split: per N-tile, parameter beats then weight beats (wsrc = DDR).
        gemm_weights_ddr = Signal()
        param_beats = GEMM_RECORD_BYTES * C // axi_bytes
        tile_beats = Signal(24)  # weight beats per N-tile (k_slices·R·C/axi)
        beat_in_tile = Signal(24)
        to_params = (beat_in_tile < param_beats) | ~gemm_weights_ddr
        with m.Switch(sink):
            with m.Case(Sink.FETCH):
                m.d.comb += [fetch_valid.eq(rd.valid), rd.ready.eq(fetch_ready)]
            with m.Case(Sink.GEMM):
                m.d.comb += [
                    rs_param.i.valid.eq(rd.valid & to_params),
                    rs_word.i.valid.eq(rd.valid & ~to_params),
                    rd.ready.eq(Mux(to_params, rs_param.i.ready, rs_word.i.ready)),
                ]
            with m.Case(Sink.LN):
                m.d.comb += [rs_ln.i.valid.eq(rd.valid), rd.ready.eq(rs_ln.i.ready)]
            with m.Case(Sink.TABLE8):
                m.d.comb += [rs_t8.i.valid.eq(rd.valid), rd.ready.eq(rs_t8.i.ready)]
            with m.Case(Sink.TABLE16):
                m.d.comb += [rs_t16.i.valid.eq(rd.valid), rd.ready.eq(rs_t16.i.ready)]
            with m.Case(Sink.LOAD):
                m.d.comb += [rs_word.i.valid.eq(rd.valid), rd.ready.eq(rs_word.i.ready)]
        for rs in (rs_word, rs_param, rs_ln, rs_t8, rs_t16):
            m.d.comb += rs.i.payload.data.eq(rd.payload.data)
        gemm_beats_left = Signal(32)   # beats of the GEMM's DDR stream still to arrive
        with m.If(rd.valid & rd.ready & (sink == Sink.GEMM)):
            m.d.sync += gemm_beats_left.eq(gemm_beats_left - 1)
        with m.If(rd.valid & rd.ready & (sink == Sink.GEMM) & gemm_weights_ddr):
            with m.If(beat_in_tile == param_beats + tile_beats - 1):
                m.d.sync += beat_in_tile.eq(0)
            with m.Else():
                m.d.sync += beat_in_tile.eq(beat_in_tile + 1)

        # GEMM parameters: 8-byte records → {bias, mult, shift}.
        record = rs_param.o.payload.data
        m.d.comb += [
            gemm.params.payload.bias.eq(record[0:32]),
            gemm.params.payload.mult.eq(record[32:48]),
            gemm.params.payload.shift.eq(record[48:54]),
            gemm.params.valid.eq(rs_param.o.valid),
            rs_param.o.ready.eq(gemm.params.ready),
        ]
        # LayerNorm parameters: one beat of C records → gains and biases.
        ln_beat = Signal(16)
        for lane in range(C):
            rec = rs_ln.o.payload.data[lane * 128:(lane + 1) * 128]
            m.d.comb += [ln.params.payload.bias[lane].eq(rec[0:64]),
                         ln.params.payload.gain[lane].eq(rec[64:80])]
        m.d.comb += [
            ln.params.payload.beat.eq(ln_beat),
            ln.params.valid.eq(rs_ln.o.valid),
            rs_ln.o.ready.eq(ln.params.ready),
        ]
        with m.If(ln.params.valid & ln.params.ready):
            m.d.sync += ln_beat.eq(ln_beat + 1)
        # Tables.
        table_index = Signal(8)
        m.d.comb += [
            gemm.table.payload.eq(rs_t8.o.payload.data),
            gemm.table.valid.eq(rs_t8.o.valid),
            rs_t8.o.ready.eq(gemm.table.ready),
            softmax.table.payload.index.eq(table_index),
            softmax.table.payload.value.eq(rs_t16.o.payload.data),
            softmax.table.valid.eq(rs_t16.o.valid),
            rs_t16.o.ready.eq(softmax.table.ready),
        ]
        table_left = Signal(range(257))  # exp-table entries still to come
        with m.If(softmax.table.valid & softmax.table.ready):
            m.d.sync += [table_index.eq(table_index + 1), table_left.eq(table_left - 1)]

        # ---- what port A, port B and the write port serve -----------------------------------
        class Unit(enum.Enum, shape=4):
            NONE = 0
            GEMM = 1
            LN = 2
            SOFTMAX = 3
            RESIDUAL = 4
            LOAD = 5
            STORE = 6
            ROUTE = 7
            COMBINE = 8

        unit = Signal(Unit)
        gemm_int32 = Signal()
        weights_from_buffer = Signal()
        # Port A.
        with m.Switch(unit):
            with m.Case(Unit.GEMM):
                m.d.comb += [gemm.activations.valid.eq(a_valid), a_ready.eq(gemm.activations.ready)]
            with m.Case(Unit.LN):
                m.d.comb += [ln.x.valid.eq(a_valid), a_ready.eq(ln.x.ready)]
            with m.Case(Unit.SOFTMAX, Unit.ROUTE):
                m.d.comb += [softmax.logits.valid.eq(a_valid), a_ready.eq(softmax.logits.ready)]
            with m.Case(Unit.COMBINE):
                m.d.comb += [combiner.y.valid.eq(a_valid), a_ready.eq(combiner.y.ready)]
            with m.Case(Unit.RESIDUAL):
                # The residual add joins a and b itself (a.ready = b.ready).
                m.d.comb += [residual.a.valid.eq(a_valid), a_ready.eq(residual.a.ready),
                             residual.b.valid.eq(b_valid), b_ready.eq(residual.b.ready)]
            with m.Case(Unit.STORE):
                m.d.comb += [rs_store.i.valid.eq(a_valid), a_ready.eq(rs_store.i.ready)]
        m.d.comb += [
            gemm.activations.payload.eq(a_data),
            ln.x.payload.eq(a_data),
            softmax.logits.payload.eq(a_data),
            residual.a.payload.eq(a_data),
            residual.b.payload.eq(b_data),
            combiner.y.payload.data.eq(a_data),
            combiner.y.payload.score.eq(a_tag),
            # ROUTE: the router scores go from the softmax unit to the dispatcher.
            dispatcher.scores.payload.eq(softmax.probs.payload),
        ]
        with m.If(unit == Unit.ROUTE):
            m.d.comb += [dispatcher.scores.valid.eq(softmax.probs.valid),
                         softmax.probs.ready.eq(dispatcher.scores.ready)]
        # STORE: words past the count (padding up to a whole AXI beat) are sent as zeros.
        store_pad = Signal()
        m.d.comb += rs_store.i.payload.data.eq(Mux(store_pad, 0, a_data))
        # GEMM weights: from DDR (rs_word) or from the buffer (port B).
        with m.If(weights_from_buffer):
            with m.If(unit == Unit.GEMM):
                m.d.comb += [gemm.weights.valid.eq(b_valid), b_ready.eq(gemm.weights.ready)]
            m.d.comb += gemm.weights.payload.eq(b_data)
        with m.Elif(unit == Unit.GEMM):
            m.d.comb += [gemm.weights.valid.eq(rs_word.o.valid),
                         rs_word.o.ready.eq(gemm.weights.ready),
                         gemm.weights.payload.eq(rs_word.o.payload.data)]

        # Write port: one word per cycle from the unit in charge, at gen_w's address.
        w_valid = Signal()
        w_data = Signal(word_bits)
        w_ready = Signal()
        # LOAD: words past the count (padding of the last AXI beat) are dropped.
        load_drop = Signal()
        m.d.comb += load_drop.eq((unit == Unit.LOAD) & ~gen_w.addr.valid)
        with m.Switch(unit):
            with m.Case(Unit.GEMM):
                with m.If(gemm_int32):
                    m.d.comb += [rs_i32.i.valid.eq(gemm.results.valid),
                                 gemm.results.ready.eq(rs_i32.i.ready)]
                with m.Else():
                    m.d.comb += [w_valid.eq(gemm.results.valid), gemm.results.ready.eq(w_ready),
                                 w_data.eq(gemm.results.payload.int8.as_value())]
            with m.Case(Unit.LN):
                m.d.comb += [w_valid.eq(ln.y.valid), ln.y.ready.eq(w_ready),
                             w_data.eq(ln.y.payload.data.as_value())]
            with m.Case(Unit.SOFTMAX):
                m.d.comb += [w_valid.eq(softmax.probs.valid), softmax.probs.ready.eq(w_ready)]
                # Attention probabilities are ≤ 127: the low byte of each lane is the INT8.
                m.d.comb += w_data.eq(Cat(*(softmax.probs.payload.data[lane][:8]
                                            for lane in range(C))))
            with m.Case(Unit.RESIDUAL):
                m.d.comb += [w_valid.eq(residual.y.valid), residual.y.ready.eq(w_ready),
                             w_data.eq(residual.y.payload.data.as_value())]
            with m.Case(Unit.COMBINE):
                m.d.comb += [w_valid.eq(combiner.out.valid), combiner.out.ready.eq(w_ready),
                             w_data.eq(combiner.out.payload.as_value())]
            with m.Case(Unit.LOAD):
                m.d.comb += [w_valid.eq(rs_word.o.valid), rs_word.o.ready.eq(w_ready),
                             w_data.eq(rs_word.o.payload.data)]
        m.d.comb += rs_i32.i.payload.data.eq(gemm.results.payload.int32.as_value())
        # Every unit's output is always accepted: the write port never stalls.
        writes_left = Signal(32)
        m.d.comb += [
            w_ready.eq(gen_w.addr.valid | load_drop),
            gen_w.addr.ready.eq(w_valid & ~load_drop),
            write.addr.eq(gen_w.addr.payload.addr),
            write.data.eq(w_data),
            write.en.eq(w_valid & gen_w.addr.valid & ~load_drop),
        ]
        with m.If(w_valid & w_ready):
            m.d.sync += writes_left.eq(writes_left - 1)

        # Write DMA data: STORE words or INT32 head results.
        with m.If(unit == Unit.STORE):
            m.d.comb += [self.wr_data.valid.eq(rs_store.o.valid),
                         self.wr_data.payload.data.eq(rs_store.o.payload.data),
                         rs_store.o.ready.eq(self.wr_data.ready)]
        with m.Else():
            m.d.comb += [self.wr_data.valid.eq(rs_i32.o.valid),
                         self.wr_data.payload.data.eq(rs_i32.o.payload.data),
                         rs_i32.o.ready.eq(self.wr_data.ready)]

        # Port A words handed to STORE (to zero the padding).
        store_words_left = Signal(32)
        with m.If((unit == Unit.STORE) & a_valid & a_ready & ~store_pad):
            m.d.sync += store_words_left.eq(store_words_left - 1)
        m.d.comb += store_pad.eq(store_words_left == 0)

        # ---- instruction checks -------------------------------------------------------------
        # Each instruction touches up to three buffer ranges and one DDR range; a range is
        # a base plus Σ (count − 1) · stride. The products are registered (CHECK1) and the
        # sums compared (CHECK2), so the checks cost two cycles, not timing.
        ranges = [data.StructLayout({"used": 1, "base": 32,
                                     "terms": data.ArrayLayout(data.StructLayout(
                                         {"n": 16, "s": 16}), 3)})
                  for _ in range(3)]
        rng = [Signal(layout, name=f"range{k}") for k, layout in enumerate(ranges)]
        ddr_used = Signal()
        ddr_offset = Signal(48)
        ddr_bytes = Signal(48)
        shape_ok = Signal()
        opcode_ok = Signal()
        # Products for CHECK2.
        rng_last = [Signal(40, name=f"range{k}_last") for k in range(3)]
        ddr_end = Signal(65)

        def buffer_range(k, base, *terms):
            m.d.comb += [rng[k].used.eq(1), rng[k].base.eq(base)]
            for t, (count, stride) in enumerate(terms):
                m.d.comb += [rng[k].terms[t].n.eq(count - 1), rng[k].terms[t].s.eq(stride)]

        def ddr_range(offset, nbytes, per_task=0):
            m.d.comb += [ddr_used.eq(1), ddr_offset.eq(offset + Mux(per_task, task_offset, 0)),
                         ddr_bytes.eq(nbytes)]

        gemm_args = args.gemm
        ln_args = args.layernorm
        sm_args = args.softmax
        res_args = args.residual
        load_args = args.load
        store_args = args.store
        table_args = args.load_table
        route_args = args.route
        experts_args = args.experts
        combine_args = args.combine
        route_beats = Signal(16)
        m.d.comb += route_beats.eq((route_args.experts + C - 1) >> exact_log2(C))
        # A GEMM in an EXPERTS body runs the iteration's tokens, its rows mapped per RowMode;
        # its ranges are checked with the rows it actually touches.
        eff_tokens = Signal(16)
        m.d.comb += eff_tokens.eq(Mux(gemm_args.expert, ctx_count, gemm_args.tokens))

        def touched_rows(mode):
            return Mux(mode == RowMode.GATHER, dispatcher.rows,
                       Mux(mode == RowMode.QUEUE, ctx_offset + eff_tokens, eff_tokens))

        sm_beats = Signal(16)
        m.d.comb += sm_beats.eq((sm_args.length + C - 1) >> exact_log2(C))
        max_k = max(cfg.max_hidden, 3 * cfg.max_dim, cfg.max_tokens + C)
        with m.Switch(op):
            for legal in Opcode:
                with m.Case(legal):
                    m.d.comb += opcode_ok.eq(1)
        m.d.comb += shape_ok.eq(1)
        with m.Switch(op):
            with m.Case(Opcode.GEMM):
                g = gemm_args
                body_only = (g.expert | (g.src_rows != RowMode.DIRECT)
                             | (g.dst_rows != RowMode.DIRECT))
                m.d.comb += [
                    opcode_ok.eq((g.mode != GemmOp.LOAD_TABLE) & (g.wsrc.as_value() != 3)
                                 & (g.src_rows.as_value() != 3) & (g.dst_rows.as_value() < 2)
                                 & (~body_only | loop_active)),
                    shape_ok.eq((eff_tokens >= 1) & (eff_tokens <= cfg.max_tokens)
                                & (g.k_slices >= 1) & (g.k_slices * R <= max_k)
                                & (g.n_tiles >= 1) & (g.n_tiles * C <= max_k)),
                ]
                buffer_range(0, g.src, (g.k_slices, g.src_stride), (touched_rows(g.src_rows), 1))
                with m.If(g.mode != GemmOp.INT32):
                    buffer_range(1, g.dst, (g.n_tiles, g.dst_stride),
                                 (touched_rows(g.dst_rows), 1))
                with m.If(g.wsrc == WeightSource.BUFFER_ROWS):
                    buffer_range(2, g.wbuf + R - 1, (g.n_tiles, g.wstride), (g.k_slices, R))
                with m.Elif(g.wsrc == WeightSource.BUFFER_COLUMNS):
                    buffer_range(2, g.wbuf + C - 1, (g.k_slices, g.wstride), (g.n_tiles, C))
                tile_bytes = Mux(g.wsrc == WeightSource.DDR, g.k_slices * (R * C), 0)
                ddr_range(g.ddr + Mux(g.expert, expert_offset, 0),
                          g.n_tiles * (GEMM_RECORD_BYTES * C + tile_bytes), g.per_task)
                # (INT32 results: checked as a second DDR range in the GEMM state.)
            with m.Case(Opcode.LAYERNORM):
                a = ln_args
                m.d.comb += shape_ok.eq((a.rows >= 1) & (a.rows <= cfg.max_tokens)
                                        & (a.beats >= 1) & (a.beats * C <= cfg.max_dim))
                buffer_range(0, a.src, (a.beats, a.stride), (a.rows, 1))
                buffer_range(1, a.dst, (a.beats, a.stride), (a.rows, 1))
                ddr_range(a.ddr, a.beats * (LN_RECORD_BYTES * C))
            with m.Case(Opcode.SOFTMAX):
                a = sm_args
                m.d.comb += shape_ok.eq((a.rows >= 1) & (a.rows <= cfg.max_tokens)
                                        & (a.length >= 1) & (a.length <= cfg.max_tokens))
                buffer_range(0, a.src, (sm_beats, a.stride), (a.rows, 1))
                buffer_range(1, a.dst, (sm_beats, a.stride), (a.rows, 1))
            with m.Case(Opcode.RESIDUAL):
                a = res_args
                # The residual unit counts a command's words in max_tokens · max_dim / C.
                m.d.comb += shape_ok.eq((a.words >= 1)
                                        & (a.words <= cfg.max_tokens * cfg.max_dim // C))
                buffer_range(0, a.src_a, (a.words, 1))
                buffer_range(1, a.src_b, (a.words, 1))
                buffer_range(2, a.dst, (a.words, 1))
            with m.Case(Opcode.LOAD):
                a = load_args
                m.d.comb += shape_ok.eq(a.words >= 1)
                buffer_range(0, a.dst, (a.words, a.dst_stride))
                ddr_range(a.ddr, ((a.words * C + axi_bytes - 1) >> log_axi) << log_axi)
            with m.Case(Opcode.STORE):
                a = store_args
                m.d.comb += shape_ok.eq(a.words >= 1)
                buffer_range(0, a.src, (a.words, a.src_stride))
                ddr_range(a.ddr, ((a.words * C + axi_bytes - 1) >> log_axi) << log_axi)
            with m.Case(Opcode.LOAD_TABLE):
                a = table_args
                m.d.comb += opcode_ok.eq(a.unit.as_value() <= TableUnit.SOFTMAX.value)
                ddr_range(a.ddr, Mux(a.unit == TableUnit.GEMM, 256, 512), a.per_task)
            with m.Case(Opcode.ROUTE):
                a = route_args
                m.d.comb += shape_ok.eq((a.rows >= 1) & (a.rows <= cfg.max_tokens)
                                        & (a.top_k >= 1) & (a.top_k <= cfg.max_top_k)
                                        & (a.experts >= a.top_k)
                                        & (a.experts <= cfg.max_experts))
                buffer_range(0, a.src, (route_beats, a.stride), (a.rows, 1))
            with m.Case(Opcode.EXPERTS):
                a = experts_args
                m.d.comb += [opcode_ok.eq(a.order.as_value() != 3), shape_ok.eq(a.body >= 1)]
            with m.Case(Opcode.COMBINE):
                a = combine_args
                m.d.comb += shape_ok.eq(routed & (a.rows >= 1) & (a.rows <= dispatcher.rows)
                                        & (a.beats >= 1) & (a.beats * C <= cfg.max_dim))
                buffer_range(0, a.src, (a.beats, a.src_stride), (dispatcher.entries, 1))
                buffer_range(1, a.dst, (a.beats, a.dst_stride), (a.rows, 1))
        # The loop body is straight-line work on the dispatch tables: no nesting, no
        # re-routing, no task change, no end of the program inside it.
        with m.If(loop_active & ((op == Opcode.EXPERTS) | (op == Opcode.ROUTE)
                                 | (op == Opcode.TASKS) | (op == Opcode.END))):
            m.d.comb += opcode_ok.eq(0)

        # INT32 results of a GEMM: a second DDR range (bytes = n_tiles · tokens · 4C).
        out_end = Signal(65)
        m.d.sync += out_end.eq(gemm_args.out_ddr + gemm_args.n_tiles * eff_tokens * (4 * C))

        # ---- the controller -------------------------------------------------------------------
        fetch_beats = INSTRUCTION_BYTES // axi_bytes if axi_bytes <= INSTRUCTION_BYTES else 1
        fetch_count = Signal(range(fetch_beats + 1))
        aborting = Signal()
        dma_base = Signal(64)  # data_base of the run (latched at start)
        m.d.comb += dma_base.eq(self.ctrl.data_base)
        sent = Signal(4)       # handshakes done in the current issue state (one bit each)
        instructions = Signal(32)

        def walk(gen, base, *loops):
            """Start ``gen`` at ``base`` over ``loops`` = (count, stride) pairs, outer first."""
            loops = [(1, 0)] * (3 - len(loops)) + list(loops)
            m.d.comb += [gen.start.eq(1), gen.base.eq(base)]
            for level, (count, stride) in enumerate(loops):
                m.d.comb += [gen.count[level].eq(count), gen.stride[level].eq(stride)]

        def command(port, bit, **fields):
            """Offer one command beat on ``port`` until taken (``sent[bit]`` records it)."""
            with m.If(~sent[bit]):
                m.d.comb += port.valid.eq(1)
                m.d.comb += [getattr(port.payload, name).eq(value)
                             for name, value in fields.items()]
                with m.If(port.ready):
                    m.d.sync += sent[bit].eq(1)

        def stop(code):
            m.d.sync += error_code.eq(code)
            m.next = "STOP_ERROR"

        ddr_addr = Signal(64)
        m.d.comb += ddr_addr.eq(dma_base + ddr_offset)

        # Weight prefetch across GEMMs: once a GEMM's DDR stream has fully arrived (INT8
        # results, weights from DDR), the controller moves on while the array finishes it
        # (`pending`). If the next instruction is such a GEMM too, its command and weight
        # stream are issued at once — the GEMM engine loads its first tiles into the free
        # half of its double buffer — and only its buffer walks wait for the previous
        # GEMM's last result. Anything else waits for that result first (GEMM_DRAIN).
        pending = Signal()
        drain_to_fetch = Signal()
        g = gemm_args
        streamed = (g.wsrc == WeightSource.DDR) & (g.mode != GemmOp.INT32)

        def gemm_setup():
            m.d.sync += [
                unit.eq(Unit.GEMM),
                sink.eq(Sink.GEMM),
                gemm_int32.eq(g.mode == GemmOp.INT32),
                weights_from_buffer.eq(g.wsrc != WeightSource.DDR),
                gemm_weights_ddr.eq(g.wsrc == WeightSource.DDR),
                beat_in_tile.eq(0),
                tile_beats.eq((g.k_slices * (R * C)) >> log_axi),
                gemm_beats_left.eq(ddr_bytes >> log_axi),
            ]

        def gemm_walks():
            m.d.sync += [writes_left.eq(g.n_tiles * eff_tokens), gather_offset.eq(ctx_offset)]
            with m.If(g.src_rows == RowMode.GATHER):
                m.d.sync += gather_mode.eq(GatherMode.QUEUE)
            with m.Else():
                m.d.sync += gather_mode.eq(GatherMode.NONE)
            src_base = g.src + Mux(g.src_rows == RowMode.QUEUE, ctx_offset, 0)
            dst_base = g.dst + Mux(g.dst_rows == RowMode.QUEUE, ctx_offset, 0)
            walk(gen_a, src_base, (g.n_tiles, 0), (g.k_slices, g.src_stride), (eff_tokens, 1))
            with m.If(g.mode != GemmOp.INT32):
                walk(gen_w, dst_base, (g.n_tiles, g.dst_stride), (eff_tokens, 1))
            with m.If(g.wsrc == WeightSource.BUFFER_ROWS):
                walk(gen_b, g.wbuf, (g.n_tiles, g.wstride), (g.k_slices, R), (C, 1))
            with m.Elif(g.wsrc == WeightSource.BUFFER_COLUMNS):
                walk(gen_b, g.wbuf, (g.n_tiles, C), (g.k_slices, g.wstride), (C, 1))

        def gemm_commands():
            """Issue the GEMM's commands; true once all are taken."""
            command(gemm.command, 0, op=g.mode, tokens=eff_tokens, k_slices=g.k_slices,
                    n_tiles=g.n_tiles, transposed=g.wsrc == WeightSource.BUFFER_COLUMNS)
            command(self.rd_cmd, 1, addr=ddr_addr, beats=ddr_bytes >> log_axi)
            with m.If(g.mode == GemmOp.INT32):
                command(self.wr_cmd, 2, addr=dma_base + g.out_ddr,
                        beats=(g.n_tiles * eff_tokens * (4 * C)) >> log_axi)
            with m.Else():
                m.d.sync += sent[2].eq(1)
            return sent[0] & sent[1] & sent[2]

        with m.FSM(name="controller"):
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    m.d.sync += [pc.eq(0), error_code.eq(ErrorCode.NONE), aborting.eq(0),
                                 task_offset.eq(0), task_stride.eq(0), sent.eq(0),
                                 routed.eq(0), loop_active.eq(0), schedule.eq(self.ctrl.schedule),
                                 pending.eq(0)]
                    m.d.comb += self.dma_error_clear.eq(1)
                    m.next = "FETCH"
            with m.State("FETCH"):
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(pending & (aborting | self.dma_error)):
                    m.d.sync += drain_to_fetch.eq(1)
                    m.next = "GEMM_DRAIN"
                with m.Elif(aborting):
                    stop(ErrorCode.ABORTED)
                with m.Elif(self.dma_error):
                    stop(ErrorCode.AXI_RESPONSE)
                with m.Else():
                    m.d.comb += [self.rd_cmd.valid.eq(1),
                                 self.rd_cmd.payload.addr.eq(self.ctrl.program_base
                                                             + pc * INSTRUCTION_BYTES),
                                 self.rd_cmd.payload.beats.eq(max(1, INSTRUCTION_BYTES
                                                                  // axi_bytes))]
                    with m.If(self.rd_cmd.ready):
                        m.d.sync += [sink.eq(Sink.FETCH), fetch_count.eq(0)]
                        m.next = "FETCH_DATA"
            with m.State("FETCH_DATA"):
                m.d.comb += [self.ctrl.busy.eq(1), fetch_ready.eq(1)]
                with m.If(fetch_valid):
                    # Little-endian: the first beat is the low bits; shift in from the top.
                    if axi_bytes >= INSTRUCTION_BYTES:
                        m.d.sync += word.eq(rd.payload.data[:INSTRUCTION_BYTES * 8])
                    else:
                        m.d.sync += word.eq(Cat(word.as_value()[cfg.axi_data_width:],
                                                rd.payload.data))
                    m.d.sync += fetch_count.eq(fetch_count + 1)
                    with m.If(fetch_count == fetch_beats - 1):
                        m.d.sync += sink.eq(Sink.NONE)
                        m.next = "CHECK1"
            with m.State("CHECK1"):
                m.d.comb += self.ctrl.busy.eq(1)
                for k in range(3):
                    terms = rng[k].terms
                    m.d.sync += rng_last[k].eq(Mux(rng[k].used,
                                                   rng[k].base + terms[0].n * terms[0].s
                                                   + terms[1].n * terms[1].s
                                                   + terms[2].n * terms[2].s, 0))
                m.d.sync += ddr_end.eq(Mux(ddr_used, ddr_offset + ddr_bytes, 0))
                m.next = "CHECK2"
            with m.State("CHECK2"):
                m.d.comb += self.ctrl.busy.eq(1)
                buffer_ok = Signal()
                m.d.comb += buffer_ok.eq(
                    (rng_last[0] < depth) & (rng_last[1] < depth) & (rng_last[2] < depth))
                ddr_ok = (ddr_end <= self.ctrl.data_size) & (
                    (op != Opcode.GEMM) | (gemm_args.mode != GemmOp.INT32)
                    | (out_end <= self.ctrl.data_size))
                with m.If(pending):
                    # A GEMM is still finishing: only a streamed GEMM may start beside it.
                    with m.If(opcode_ok & shape_ok & buffer_ok & ddr_ok & (op == Opcode.GEMM)
                              & streamed):
                        m.d.sync += sent.eq(0)
                        m.next = "GEMM_PREFETCH"
                    with m.Else():
                        m.d.sync += drain_to_fetch.eq(0)
                        m.next = "GEMM_DRAIN"
                with m.Elif(~opcode_ok):
                    stop(ErrorCode.ILLEGAL_OPCODE)
                with m.Elif(~shape_ok):
                    stop(ErrorCode.SHAPE_OVER_CAPACITY)
                with m.Elif(~buffer_ok | ~ddr_ok):
                    stop(ErrorCode.ADDRESS_OUT_OF_RANGE)
                with m.Else():
                    m.d.sync += sent.eq(0)
                    with m.Switch(op):
                        with m.Case(Opcode.END):
                            m.next = "STOP_DONE"
                        with m.Case(Opcode.NOP):
                            m.next = "NEXT"
                        with m.Case(Opcode.TASKS):
                            m.next = "TASKS"
                        with m.Case(Opcode.GEMM):
                            m.next = "GEMM_START"
                        with m.Case(Opcode.LAYERNORM):
                            m.next = "LN_PARAMS"
                        with m.Case(Opcode.SOFTMAX):
                            m.next = "SOFTMAX_START"
                        with m.Case(Opcode.RESIDUAL):
                            m.next = "RESIDUAL_START"
                        with m.Case(Opcode.LOAD):
                            m.next = "LOAD_START"
                        with m.Case(Opcode.STORE):
                            m.next = "STORE_START"
                        with m.Case(Opcode.LOAD_TABLE):
                            m.next = "TABLE_START"
                        with m.Case(Opcode.ROUTE):
                            m.next = "ROUTE_START"
                        with m.Case(Opcode.EXPERTS):
                            m.next = "EXPERTS"
                        with m.Case(Opcode.COMBINE):
                            m.next = "COMBINE_START"

            with m.State("TASKS"):
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(self.ctrl.task_select >= args.tasks.count):
                    stop(ErrorCode.BAD_TASK)
                with m.Else():
                    m.d.sync += [task_stride.eq(args.tasks.stride),
                                 task_offset.eq(self.ctrl.task_select * args.tasks.stride)]
                    m.next = "NEXT"

            # GEMM: command, DDR stream, address generators, then wait for the results.
            with m.State("GEMM_START"):
                m.d.comb += self.ctrl.busy.eq(1)
                gemm_setup()
                gemm_walks()
                m.next = "GEMM_ISSUE"
            with m.State("GEMM_ISSUE"):
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(gemm_commands()):
                    m.next = "GEMM_WAIT"
                    with m.If(streamed):
                        m.next = "GEMM_STREAM"
            # Beside a pending GEMM: stream setup, commands, then the walks once it is done.
            with m.State("GEMM_PREFETCH"):
                m.d.comb += self.ctrl.busy.eq(1)
                gemm_setup()
                m.next = "GEMM_PREFETCH_ISSUE"
            with m.State("GEMM_PREFETCH_ISSUE"):
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(gemm_commands()):
                    m.next = "GEMM_HOLD"
            with m.State("GEMM_HOLD"):
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(writes_left == 0):
                    m.d.sync += pending.eq(0)
                    gemm_walks()
                    m.next = "GEMM_STREAM"
            with m.State("GEMM_STREAM"):
                # The whole stream is in: the next instruction may be fetched.
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(gemm_beats_left == 0):
                    m.d.sync += pending.eq(1)
                    m.next = "NEXT"
            with m.State("GEMM_DRAIN"):
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(~gemm.busy & ~gemm.command.valid & (writes_left == 0)):
                    m.d.sync += [pending.eq(0), unit.eq(Unit.NONE),
                                 gather_mode.eq(GatherMode.NONE)]
                    m.next = "CHECK2"
                    with m.If(drain_to_fetch):
                        m.next = "FETCH"
            with m.State("GEMM_WAIT"):
                m.d.comb += self.ctrl.busy.eq(1)
                # INT8: every result word written; INT32: every write answered.
                with m.If(~gemm.busy & ~gemm.command.valid & (gemm_int32 | (writes_left == 0))
                          & self.wr_idle & ~rs_i32.o.valid & ~self.rd_data.valid):
                    m.next = "NEXT"

            with m.State("LN_PARAMS"):
                a = ln_args
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += [sink.eq(Sink.LN), ln_beat.eq(0)]
                command(self.rd_cmd, 0, addr=ddr_addr, beats=ddr_bytes >> log_axi)
                with m.If(sent[0]):
                    m.next = "LN_PARAMS_WAIT"
            with m.State("LN_PARAMS_WAIT"):
                a = ln_args
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(ln_beat == a.beats):
                    m.d.sync += [sink.eq(Sink.NONE), sent.eq(0), unit.eq(Unit.LN),
                                 writes_left.eq(a.rows * a.beats)]
                    walk(gen_a, a.src, (a.rows, 1), (a.beats, a.stride))
                    walk(gen_w, a.dst, (a.rows, 1), (a.beats, a.stride))
                    m.next = "LN_RUN"
            with m.State("LN_RUN"):
                a = ln_args
                m.d.comb += self.ctrl.busy.eq(1)
                command(ln.cmd, 0, beats=a.beats, rows=a.rows, shift=a.shift,
                        eps_term=a.eps_term)
                with m.If(sent[0] & (writes_left == 0)):
                    m.next = "NEXT"

            with m.State("SOFTMAX_START"):
                a = sm_args
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += [unit.eq(Unit.SOFTMAX), writes_left.eq(a.rows * sm_beats)]
                walk(gen_a, a.src, (a.rows, 1), (sm_beats, a.stride))
                walk(gen_w, a.dst, (a.rows, 1), (sm_beats, a.stride))
                m.next = "SOFTMAX_RUN"
            with m.State("SOFTMAX_RUN"):
                a = sm_args
                m.d.comb += self.ctrl.busy.eq(1)
                command(softmax.cmd, 0, length=a.length, rows=a.rows,
                        mode=SoftmaxMode.ATTENTION)
                with m.If(sent[0] & (writes_left == 0)):
                    m.next = "NEXT"

            with m.State("RESIDUAL_START"):
                a = res_args
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += [unit.eq(Unit.RESIDUAL), writes_left.eq(a.words)]
                for gen, base in ((gen_a, a.src_a), (gen_b, a.src_b), (gen_w, a.dst)):
                    walk(gen, base, (a.words, 1))
                m.next = "RESIDUAL_RUN"
            with m.State("RESIDUAL_RUN"):
                a = res_args
                m.d.comb += self.ctrl.busy.eq(1)
                command(residual.cmd, 0, beats=a.words, mult_a=a.mult_a, mult_b=a.mult_b,
                        shift=a.shift)
                with m.If(sent[0] & (writes_left == 0)):
                    m.next = "NEXT"

            with m.State("LOAD_START"):
                a = load_args
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += [unit.eq(Unit.LOAD), sink.eq(Sink.LOAD),
                             writes_left.eq(ddr_bytes >> exact_log2(C))]
                walk(gen_w, a.dst, (a.words, a.dst_stride))
                m.next = "LOAD_RUN"
            with m.State("LOAD_RUN"):
                m.d.comb += self.ctrl.busy.eq(1)
                command(self.rd_cmd, 0, addr=ddr_addr, beats=ddr_bytes >> log_axi)
                with m.If(sent[0] & (writes_left == 0)):
                    m.d.sync += sink.eq(Sink.NONE)
                    m.next = "NEXT"

            with m.State("STORE_START"):
                a = store_args
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += [unit.eq(Unit.STORE),
                             store_words_left.eq(a.words)]
                # Read whole AXI beats' worth of words; the ones past the count go out as 0.
                walk(gen_a, a.src, (ddr_bytes >> exact_log2(C), a.src_stride))
                m.next = "STORE_RUN"
            with m.State("STORE_RUN"):
                m.d.comb += self.ctrl.busy.eq(1)
                command(self.wr_cmd, 0, addr=ddr_addr, beats=ddr_bytes >> log_axi)
                with m.If(sent[0] & ~gen_a.addr.valid & ~a_valid & ~rs_store.o.valid
                          & self.wr_idle):
                    m.next = "NEXT"

            with m.State("TABLE_START"):
                a = table_args
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(a.unit == TableUnit.GEMM):
                    command(gemm.command, 1, op=GemmOp.LOAD_TABLE)
                    m.d.sync += sink.eq(Sink.TABLE8)
                with m.Else():
                    m.d.sync += [sent[1].eq(1), sink.eq(Sink.TABLE16), table_index.eq(0),
                                 table_left.eq(256)]
                command(self.rd_cmd, 0, addr=ddr_addr, beats=ddr_bytes >> log_axi)
                with m.If(sent[0] & sent[1]):
                    m.next = "TABLE_WAIT"
            with m.State("TABLE_WAIT"):
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(~gemm.busy & (table_args.unit == TableUnit.GEMM)
                          | (table_left == 0) & (table_args.unit == TableUnit.SOFTMAX)):
                    m.d.sync += sink.eq(Sink.NONE)
                    m.next = "TABLE_END"
            with m.State("TABLE_END"):
                # One cycle so the table sink's last beat is out of the converters.
                m.d.comb += self.ctrl.busy.eq(1)
                m.next = "NEXT"

            # ROUTE: logits → softmax (router mode) → dispatcher; the tables are built when the
            # dispatcher goes idle.
            with m.State("ROUTE_START"):
                a = route_args
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += unit.eq(Unit.ROUTE)
                walk(gen_a, a.src, (a.rows, 1), (route_beats, a.stride))
                m.next = "ROUTE_RUN"
            with m.State("ROUTE_RUN"):
                a = route_args
                m.d.comb += self.ctrl.busy.eq(1)
                command(softmax.cmd, 0, length=a.experts, rows=a.rows, mode=SoftmaxMode.ROUTER)
                command(dispatcher.cmd, 1, rows=a.rows, experts=a.experts, top_k=a.top_k)
                with m.If(sent[0] & sent[1]):
                    m.next = "ROUTE_WAIT"
            with m.State("ROUTE_WAIT"):
                m.d.comb += self.ctrl.busy.eq(1)
                with m.If(~dispatcher.busy & ~softmax.busy):
                    m.d.sync += routed.eq(1)
                    m.next = "NEXT"

            # EXPERTS: run the body once per iteration (NEXT loops back at the body's end).
            with m.State("EXPERTS"):
                a = experts_args
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += [
                    loop_tbt.eq(Mux(a.order == ExpertOrder.REGISTER,
                                    schedule == Schedule.TOKEN_BY_TOKEN,
                                    a.order == ExpertOrder.TOKEN_BY_TOKEN)),
                    loop_stride.eq(a.stride), loop_first.eq(pc + 1), loop_last.eq(pc + a.body),
                    loop_index.eq(0), loop_token.eq(0), loop_choice.eq(0),
                ]
                with m.If(~routed | (dispatcher.n_active == 0)):
                    m.d.sync += pc.eq(pc + a.body)     # NEXT steps past the body
                    m.next = "NEXT"
                with m.Else():
                    m.d.sync += [loop_active.eq(1), sent.eq(0),
                                 instructions.eq(instructions + 1)]
                    m.next = "LOOP_CTX"
            with m.State("LOOP_CTX"):
                m.d.comb += [self.ctrl.busy.eq(1), dispatcher.list_index.eq(loop_index),
                             dispatcher.slot_addr.eq(loop_token), dispatcher.slot_en.eq(1)]
                m.next = "LOOP_CTX2"
            with m.State("LOOP_CTX2"):
                m.d.comb += self.ctrl.busy.eq(1)
                slot = dispatcher.slot[loop_choice]
                with m.If(loop_tbt):
                    m.d.sync += [ctx_expert.eq(slot.expert), ctx_offset.eq(slot.pos),
                                 ctx_count.eq(1)]
                with m.Else():
                    m.d.sync += [ctx_expert.eq(dispatcher.list_expert),
                                 ctx_offset.eq(dispatcher.list_start),
                                 ctx_count.eq(dispatcher.list_count)]
                m.next = "LOOP_CTX3"
            with m.State("LOOP_CTX3"):
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += [expert_offset.eq(ctx_expert * loop_stride), pc.eq(loop_first)]
                m.next = "FETCH"

            # COMBINE: each token's top-k expert outputs through the slot table.
            with m.State("COMBINE_START"):
                a = combine_args
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += [unit.eq(Unit.COMBINE), gather_mode.eq(GatherMode.SLOT),
                             writes_left.eq(a.rows * a.beats)]
                walk(gen_a, a.src, (a.beats, a.src_stride), (a.rows, 0), (dispatcher.top_k, 0))
                walk(gen_w, a.dst, (a.beats, a.dst_stride), (a.rows, 1))
                m.next = "COMBINE_RUN"
            with m.State("COMBINE_RUN"):
                a = combine_args
                m.d.comb += self.ctrl.busy.eq(1)
                command(combiner.cmd, 0, words=a.rows * a.beats, top_k=dispatcher.top_k,
                        mult=a.mult, shift=a.shift)
                with m.If(sent[0] & (writes_left == 0)):
                    m.next = "NEXT"

            with m.State("NEXT"):
                m.d.comb += self.ctrl.busy.eq(1)
                m.d.sync += [pc.eq(pc + 1), sink.eq(Sink.NONE), sent.eq(0),
                             instructions.eq(instructions + 1)]
                with m.If(~pending):   # a pending GEMM still owns the unit and port A
                    m.d.sync += [unit.eq(Unit.NONE), weights_from_buffer.eq(0),
                                 gather_mode.eq(GatherMode.NONE)]
                m.next = "FETCH"
                with m.If(loop_active & (pc == loop_last)):
                    last_choice = loop_choice == dispatcher.top_k - 1
                    finished = Mux(loop_tbt, (loop_token == dispatcher.rows - 1) & last_choice,
                                   loop_index == dispatcher.n_active - 1)
                    with m.If(finished):
                        m.d.sync += loop_active.eq(0)
                    with m.Elif(loop_tbt & last_choice):
                        m.d.sync += [loop_choice.eq(0), loop_token.eq(loop_token + 1)]
                        m.next = "LOOP_CTX"
                    with m.Elif(loop_tbt):
                        m.d.sync += loop_choice.eq(loop_choice + 1)
                        m.next = "LOOP_CTX"
                    with m.Else():
                        m.d.sync += loop_index.eq(loop_index + 1)
                        m.next = "LOOP_CTX"
            with m.State("STOP_DONE"):
                m.d.comb += [self.ctrl.busy.eq(1), self.ctrl.done.eq(1)]
                with m.If(self.dma_error):
                    m.d.comb += [self.ctrl.done.eq(0), self.ctrl.error.eq(1)]
                    m.d.sync += error_code.eq(ErrorCode.AXI_RESPONSE)
                m.next = "IDLE"
            with m.State("STOP_ERROR"):
                m.d.comb += [self.ctrl.busy.eq(1), self.ctrl.error.eq(1)]
                m.next = "IDLE"

        with m.If(self.ctrl.abort_request & self.ctrl.busy):
            m.d.sync += aborting.eq(1)

        # ---- counters -----------------------------------------------------------------------
        vector_busy = ln.busy | softmax.busy | residual.busy | dispatcher.busy | combiner.busy
        gemm_busy = Signal(32)
        vector_busy_cycles = Signal(32)
        for counter, event in ((gemm_busy, gemm.busy),
                               (vector_busy_cycles, vector_busy)):
            with m.If(event):
                m.d.sync += counter.eq(counter + 1)
        m.d.comb += [self.ctrl.counters.gemm_busy.eq(gemm_busy),
                     self.ctrl.counters.vector_busy.eq(vector_busy_cycles),
                     self.ctrl.counters.instructions.eq(instructions),
                     self.ctrl.counters.weight_stall.eq(gemm.counters.weight_stall_cycles),
                     self.token_beats.eq(gemm.counters.token_beats)]
        return m



class AcceleratorTop(wiring.Component):
    """The generated accelerator: register file, engine and DMA on one AXI4 master port.

    Parameters
    ----------
    config : AccelConfig
        The configuration (checked by :func:`~m3vit.hw.isa.check_top_config`).

    Attributes
    ----------
    s_axil : In(AxiLiteSignature())
        Control and status (``docs/registers.md``), from the host.
    m_axi : Out(axi_master_signature)
        DDR: program, weights, parameters, tables and activations in; results out.
    irq : Out(1)
        High while ``STATUS.DONE`` or ``STATUS.ERROR`` would read 1 since the last start
        (a level the block design can route to the PS; the runtime polls).
    """

    def __init__(self, config: AccelConfig):
        self.config = check_top_config(config)
        self._dma = AxiDmaPort(config)
        super().__init__({
            "s_axil": In(AxiLiteSignature()),
            "m_axi": Out(self._dma.m_axi.signature),
            "irq": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        regs = m.submodules.registers = ControlRegisters(self.config)
        engine = m.submodules.engine = Engine(self.config)
        dma = m.submodules.dma = self._dma
        wiring.connect(m, wiring.flipped(self.s_axil), regs.s_axil)
        wiring.connect(m, wiring.flipped(self.m_axi), dma.m_axi)
        wiring.connect(m, engine.rd_cmd, dma.read.cmd)
        wiring.connect(m, dma.read.data, engine.rd_data)
        wiring.connect(m, engine.wr_cmd, dma.write.cmd)
        wiring.connect(m, engine.wr_data, dma.write.data)
        wiring.connect(m, engine.ctrl, regs.engine)
        m.d.comb += [
            engine.wr_idle.eq(~dma.write.busy),
            engine.dma_error.eq(dma.read.error | dma.write.error),
            dma.read.clear_error.eq(engine.dma_error_clear),
            dma.write.clear_error.eq(engine.dma_error_clear),
            regs.dma_counters.dma_read_bytes.eq(dma.read.bytes_read),
            regs.dma_counters.dma_write_bytes.eq(dma.write.bytes_written),
        ]
        done_or_error = Signal()
        with m.If(engine.ctrl.start):
            m.d.sync += done_or_error.eq(0)
        with m.Elif(engine.ctrl.done | engine.ctrl.error):
            m.d.sync += done_or_error.eq(1)
        m.d.comb += self.irq.eq(done_or_error)
        return m
