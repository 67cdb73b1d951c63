"""The engine's datapath: the activation buffer and the unit its ports serve.

One memory of ``act_buffer_words`` words of ``pe_cols`` INT8 lanes, one write port and two
read ports, each port walked by an :class:`~m3vit.hw.engine.buffer.AddressGenerator`::

    read port A ──► GEMM activations │ LayerNorm x │ router logits │ residual a │ STORE
                    │ combiner (through the gather stage)
    read port B ──► GEMM weights from the buffer (Q·Kᵀ columns, P·V rows) │ residual b
    read port C ──► softmax logits (a softmax runs in the background)
    write port  ◄── GEMM INT8 results │ LayerNorm y │ residual │ combiner │ LOAD;
                    in the cycles they leave free: softmax probs
    fused residual: GEMM INT8 results │ combiner ──► residual a;  port B ──► residual b;
                    residual ──► write port
    write DMA   ◄── GEMM INT32 results (the task head) │ STORE words

The controller chooses the :class:`Unit` in charge; the switch is combinational, so a
unit's stream sees the buffer's ports directly. A ``SOFTMAX`` runs beside it, on its own
read port and walks (``walk_c``, ``walk_w2``), writing when the unit in charge does not.
"""

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from ..axi import StreamResize, byte_beat_layout
from ..config import AccelConfig
from ..gemm import output_layout
from ..moe import Combiner, slot_layout
from ..vector import INT8, SoftmaxUnit, lane_layout, row_beat_layout
from .buffer import (
    AddressGenerator,
    BufferReadPort,
    GatherMode,
    GatherStage,
    address_layout,
    gathered_layout,
    walk_signature,
)
from .router import intake_shape

__all__ = ["COUNT_BITS", "Datapath", "Unit", "datapath_control"]

#: Width of the address generators' loop counts.
COUNT_BITS = 16


class Unit(enum.Enum, shape=4):
    """The unit the buffer's ports (and the write DMA's data) serve."""

    NONE = 0
    GEMM = 1
    LN = 2
    SOFTMAX = 3
    RESIDUAL = 4
    LOAD = 5
    STORE = 6
    ROUTE = 7
    COMBINE = 8


def datapath_control(config: AccelConfig) -> wiring.Signature:
    """The controller's side of the datapath.

    Returns
    -------
    wiring.Signature
        Its members (flows seen from the controller):

        walk_a, walk_b, walk_w : Out(walk_signature(...))
            Start the walks of read port A, read port B and the write port.
        unit : Out(Unit)
            The unit in charge.
        gemm_int32 : Out(1)
            GEMM results go to the write DMA (INT32) instead of the write port.
        weights_from_buffer : Out(1)
            GEMM weights come from read port B instead of DDR.
        weights_columns : Out(1)
            ... and each word is a column of the tile (``BUFFER_COLUMNS``), not a
            ``1 / gemm_words`` part of a row.
        gather_mode, gather_offset : Out
            What port A's gather stage does; the queue position of row 0.
        expect_writes, writes : Out
            Load the count of words the write port is to take.
        writes_done : In(1)
            The write port has taken them.
        gemm_inputs_done : In(1)
            The GEMM engine has taken the last word of port A's walk (its last token, so
            every weight tile of its pass has loaded), and no walk of port A has started
            since: a GEMM without a data dependence on this one may start its reads.
        expect_store, store_words : Out
            Load the count of words a STORE sends (the rest of its last AXI beat is zeros).
        store_drained : In(1)
            Port A's walk, its read queue and the STORE converter are empty.
        int32_drained : In(1)
            The INT32 converter is empty.
        slot_lookup, slot_token : Out
            Read the dispatcher's slot table for a token (the ``EXPERTS`` loop's context),
            instead of the gather stage.
        walk_c, walk_w2 : Out(walk_signature(...))
            A background softmax's walks: its logits through read port C, its
            probabilities to the write port in the cycles the unit in charge leaves free.
        expect_bg_writes, bg_writes : Out
            Load the count of words the background softmax is to write.
        bg_writes_done : In(1)
            It has written them.
        residual_fused : Out(1)
            The ``GEMM``'s INT8 results or the combiner's output go through the residual
            add (its ``a``) with port B's words as its ``b``, and its sums to the write port.
        skip_keyless : Out(1)
            The ``GEMM``'s results are a ``BUFFER_COLUMNS`` pass's INT8 words: a word whose
            channels are all ≥ its tokens (keys past the last, which only pad its last
            N-tile) takes its address but is not written, and leaves the port free.
        read_gate, read_gate_last : Out
            Reads of ports A and B (after the gather stage) wait while their address lies
            from the write walk's current N-tile up to ``read_gate_last``: a GEMM whose
            reads started beside the GEMM before it, which writes what it reads, takes
            each of that GEMM's N-tiles once it is written (the write walk's N-tile
            regions are disjoint and ascending, which the controller checked).
    """
    buf_bits = ceil_log2(config.act_buffer_words)
    walk = walk_signature(buf_bits, COUNT_BITS)
    return wiring.Signature({
        "walk_a": Out(walk),
        "walk_b": Out(walk),
        "walk_w": Out(walk),
        "unit": Out(Unit),
        "gemm_int32": Out(1),
        "weights_from_buffer": Out(1),
        "weights_columns": Out(1),
        "gather_mode": Out(GatherMode),
        "gather_offset": Out(range(config.max_tokens * config.max_top_k + 1)),
        "expect_writes": Out(1),
        "writes": Out(32),
        "writes_done": In(1),
        "gemm_inputs_done": In(1),
        "expect_store": Out(1),
        "store_words": Out(32),
        "store_drained": In(1),
        "int32_drained": In(1),
        "slot_lookup": Out(1),
        "slot_token": Out(16),
        "residual_fused": Out(1),
        "skip_keyless": Out(1),
        "read_gate": Out(1),
        "read_gate_last": Out(buf_bits),
        "walk_c": Out(walk),
        "walk_w2": Out(walk),
        "expect_bg_writes": Out(1),
        "bg_writes": Out(32),
        "bg_writes_done": In(1),
    })


class Datapath(wiring.Component):
    """The activation buffer, its three walked ports and the switch to the unit in charge.

    Parameters
    ----------
    config : AccelConfig
        ``act_buffer_words`` and ``pe_cols`` (the buffer), the PE array, the AXI width.

    Attributes
    ----------
    control : In(datapath_control(config))
        The controller's walks and choices.
    gemm_activations, gemm_weights : Out(stream)
        To the GEMM engine (its ``activations`` and ``weights``).
    gemm_results : In(stream.Signature(output_layout(config)))
        From the GEMM engine: one word a beat.
    ln_x, ln_y, softmax_logits, softmax_probs, residual_a, residual_b, residual_y : stream
        To and from the vector units (their ``x``, ``y``, ``logits``, ``probs``, ``a``, ``b``,
        ``y``).
    route_scores : Out(stream.Signature(SoftmaxUnit.out_layout(config)))
        ``ROUTE``: the softmax unit's router scores, to the dispatcher.
    combiner_y, combiner_out : stream
        To and from the combiner (gathered expert outputs tagged with their score).
    ddr_words : In(stream.Signature(byte_beat_layout(pe_cols)))
        LOAD words from the read DMA.
    ddr_weights : In(stream.Signature(byte_beat_layout(rows_per_beat · gemm_cols)))
        GEMM weight rows from DDR, ``rows_per_beat`` (:func:`~.router.intake_shape`) a beat;
        rows from the buffer (``gemm_words`` words each) or columns (a word each, zero
        above its ``pe_rows`` lanes) are packed as many to a beat.
    wr_data : Out(stream.Signature(byte_beat_layout(axi_bytes)))
        To the write DMA: STORE words or INT32 GEMM results.
    queue_addr, queue_en, queue_token, slot_addr, slot_en, slot
        The dispatcher's queue and slot read ports (:class:`~m3vit.hw.moe.Dispatcher`).

    Notes
    -----
    The buffer is UltraRAM: 512 KiB in three read copies is 48 of the XCZU7EV's 96 URAM288
    blocks, where block RAM would take 342 of its 312 RAMB36 (Vivado and Yosys both
    honour ``ram_style``). The output of the unit in charge is always accepted: the write
    port never stalls it; the background softmax's probabilities wait for a free cycle.
    """

    def __init__(self, config: AccelConfig):
        self.config = config
        cfg = config
        #: GEMM weight rows a beat (from DDR and, packed, from the buffer).
        self.rows_per_beat = intake_shape(cfg).rows_per_beat
        entries = cfg.max_tokens * cfg.max_top_k
        lanes = stream.Signature(lane_layout(cfg))
        rows = stream.Signature(row_beat_layout(cfg))
        probs = stream.Signature(SoftmaxUnit.out_layout(cfg))
        super().__init__({
            "control": In(datapath_control(cfg)),
            "gemm_activations": Out(stream.Signature(data.ArrayLayout(signed(8), cfg.pe_rows))),
            "gemm_weights": Out(stream.Signature(data.ArrayLayout(
                data.ArrayLayout(signed(8), cfg.gemm_cols), self.rows_per_beat))),
            "gemm_results": In(stream.Signature(output_layout(cfg))),
            "ln_x": Out(lanes),
            "ln_y": In(rows),
            "softmax_logits": Out(lanes),
            "softmax_probs": In(probs),
            "route_scores": Out(probs),
            "residual_a": Out(lanes),
            "residual_b": Out(lanes),
            "residual_y": In(rows),
            "combiner_y": Out(stream.Signature(Combiner.in_layout(cfg))),
            "combiner_out": In(stream.Signature(lane_layout(cfg, INT8))),
            "ddr_words": In(stream.Signature(byte_beat_layout(cfg.pe_cols))),
            "ddr_weights": In(stream.Signature(byte_beat_layout(
                self.rows_per_beat * cfg.gemm_cols))),
            "wr_data": Out(stream.Signature(byte_beat_layout(cfg.axi_bytes))),
            "queue_addr": Out(range(entries)),
            "queue_en": Out(1),
            "queue_token": In(range(cfg.max_tokens)),
            "slot_addr": Out(range(cfg.max_tokens)),
            "slot_en": Out(1),
            "slot": In(data.ArrayLayout(slot_layout(cfg), cfg.max_top_k)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        ctl = self.control
        word_bits = 8 * cfg.pe_cols
        buffer = m.submodules.buffer = Memory(shape=unsigned(word_bits),
                                              depth=cfg.act_buffer_words, init=[],
                                              attrs={"ram_style": "ultra"})
        buf_bits = ceil_log2(cfg.act_buffer_words)
        gen_a = m.submodules.gen_a = AddressGenerator(buf_bits, COUNT_BITS)
        gen_b = m.submodules.gen_b = AddressGenerator(buf_bits, COUNT_BITS)
        gen_w = m.submodules.gen_w = AddressGenerator(buf_bits, COUNT_BITS)
        gen_c = m.submodules.gen_c = AddressGenerator(buf_bits, COUNT_BITS)
        gen_w2 = m.submodules.gen_w2 = AddressGenerator(buf_bits, COUNT_BITS)
        for walk, gen in ((ctl.walk_a, gen_a), (ctl.walk_b, gen_b), (ctl.walk_w, gen_w),
                          (ctl.walk_c, gen_c), (ctl.walk_w2, gen_w2)):
            wiring.connect(m, wiring.flipped(walk), gen.walk)
        # Port A's addresses may go through the dispatcher's tables (MoE gather / combine).
        gather = m.submodules.gather = GatherStage(
            buf_bits, COUNT_BITS, self.slot.shape(), len(self.queue_addr),
            len(self.queue_token))
        wiring.connect(m, gen_a.addr, gather.i)
        self._tables(m, gather)
        port_a = m.submodules.port_a = BufferReadPort(buffer.read_port(),
                                                      gathered_layout(buf_bits), tag_bits=15)
        port_b = m.submodules.port_b = BufferReadPort(
            buffer.read_port(), address_layout(buf_bits, COUNT_BITS))
        port_c = m.submodules.port_c = BufferReadPort(
            buffer.read_port(), address_layout(buf_bits, COUNT_BITS))
        self._gated(m, gather.o, port_a.addr, gen_w, "a")
        self._gated(m, gen_b.addr, port_b.addr, gen_w, "b")
        wiring.connect(m, gen_c.addr, port_c.addr)

        # Width converters towards the write DMA.
        rs_store = m.submodules.rs_store = StreamResize(cfg.pe_cols, cfg.axi_bytes)
        rs_i32 = m.submodules.rs_i32 = StreamResize(4 * cfg.pe_cols, cfg.axi_bytes)
        self._read_ports(m, port_a.data, port_b.data, port_c.data, rs_store)
        self._write_port(m, buffer.write_port(), gen_w, gen_w2, rs_i32, port_a.data)
        self._write_dma(m, port_a.data, rs_store, rs_i32)
        m.d.comb += ctl.store_drained.eq(~gen_a.addr.valid & ~port_a.data.valid
                                         & ~rs_store.o.valid)
        return m

    def _gated(self, m: Module, source, sink, gen_w: AddressGenerator, name: str) -> None:
        """``source`` → ``sink`` (address streams), held while ``read_gate`` says the
        address is not written yet.

        The write walk is the GEMM before's results walk (N-tile i0, token i1 a stride of
        one, word i2): its current N-tile starts at ``outer − i1``, and every word below
        that in its range is written. Valid only falls when a walk starts (the gate is set
        with a new read walk) and rises as the walk moves on."""
        ctl = self.control
        wa = gen_w.addr.payload
        frontier = Signal.like(wa.outer, name=f"gate_{name}_frontier")
        held = Signal(name=f"gate_{name}_held")
        addr = source.payload.addr
        m.d.comb += [frontier.eq(wa.outer - wa.i1),
                     held.eq(ctl.read_gate & (addr >= frontier)
                             & (addr <= ctl.read_gate_last))]
        m.d.comb += [sink.payload.eq(source.payload), sink.valid.eq(source.valid & ~held),
                     source.ready.eq(sink.ready & ~held)]

    def _tables(self, m: Module, gather: GatherStage) -> None:
        """The dispatcher's read ports: the queue to the gather stage; the slot table to the
        gather stage (``COMBINE``) or to the controller's ``EXPERTS`` loop."""
        ctl = self.control
        m.d.comb += [gather.mode.eq(ctl.gather_mode), gather.offset.eq(ctl.gather_offset),
                     self.queue_addr.eq(gather.queue_addr),
                     self.queue_en.eq(gather.queue_en),
                     gather.queue_token.eq(self.queue_token),
                     gather.slot.eq(self.slot)]
        with m.If(ctl.gather_mode == GatherMode.SLOT):
            m.d.comb += [self.slot_addr.eq(gather.slot_addr), self.slot_en.eq(gather.slot_en)]
        with m.If(ctl.slot_lookup):
            m.d.comb += [self.slot_addr.eq(ctl.slot_token), self.slot_en.eq(1)]

    def _read_ports(self, m: Module, a, b, c, rs_store: StreamResize) -> None:
        """Port A and port B to the unit in charge; GEMM weights from port B or DDR; port C
        to the softmax (outside ``ROUTE``, whose router logits come through port A)."""
        ctl = self.control
        unit = ctl.unit
        a_data, b_data = a.payload.word, b.payload.word
        with m.If(unit != Unit.ROUTE):
            m.d.comb += [self.softmax_logits.valid.eq(c.valid),
                         c.ready.eq(self.softmax_logits.ready)]
        with m.Switch(unit):
            with m.Case(Unit.GEMM):
                m.d.comb += [self.gemm_activations.valid.eq(a.valid),
                             a.ready.eq(self.gemm_activations.ready)]
            with m.Case(Unit.LN):
                m.d.comb += [self.ln_x.valid.eq(a.valid), a.ready.eq(self.ln_x.ready)]
            with m.Case(Unit.ROUTE):
                m.d.comb += [self.softmax_logits.valid.eq(a.valid),
                             a.ready.eq(self.softmax_logits.ready)]
            with m.Case(Unit.COMBINE):
                m.d.comb += [self.combiner_y.valid.eq(a.valid), a.ready.eq(self.combiner_y.ready)]
            with m.Case(Unit.RESIDUAL):
                # The residual add joins a and b itself (a.ready = b.ready).
                m.d.comb += [self.residual_a.valid.eq(a.valid), a.ready.eq(self.residual_a.ready),
                             self.residual_b.valid.eq(b.valid), b.ready.eq(self.residual_b.ready)]
            with m.Case(Unit.STORE):
                m.d.comb += [rs_store.i.valid.eq(a.valid), a.ready.eq(rs_store.i.ready)]
        # The GEMM's last token taken: its pass needs nothing more of ports A and B (its
        # weights all loaded before that token could enter the array).
        with m.If(ctl.walk_a.start):
            m.d.sync += ctl.gemm_inputs_done.eq(0)
        with m.Elif((unit == Unit.GEMM) & a.valid & a.ready & a.payload.last):
            m.d.sync += ctl.gemm_inputs_done.eq(1)
        with m.If(ctl.residual_fused):
            # A fused residual add's x (the GEMM's weights stream from DDR meanwhile).
            m.d.comb += [self.residual_b.valid.eq(b.valid), b.ready.eq(self.residual_b.ready)]
        m.d.comb += [
            self.gemm_activations.payload.eq(a_data),
            self.ln_x.payload.eq(a_data),
            self.softmax_logits.payload.eq(Mux(unit == Unit.ROUTE, a_data, c.payload.word)),
            self.residual_b.payload.eq(b_data),
            self.combiner_y.payload.data.eq(a_data),
            self.combiner_y.payload.score.eq(a.payload.tag),
            # ROUTE: the router scores go from the softmax unit to the dispatcher.
            self.route_scores.payload.eq(self.softmax_probs.payload),
        ]
        with m.If(unit == Unit.ROUTE):
            m.d.comb += [self.route_scores.valid.eq(self.softmax_probs.valid),
                         self.softmax_probs.ready.eq(self.route_scores.ready)]
        # GEMM weights: from DDR (the read DMA's rows) or from the buffer (port B's words,
        # packed as many to a beat: gemm_words words a row, or a word a column).
        cfg = self.config
        weights, rows = self.gemm_weights, self.ddr_weights
        beat_bytes = self.rows_per_beat * cfg.gemm_cols
        pack_rows = m.submodules.pack_rows = StreamResize(cfg.pe_cols, beat_bytes)
        m.d.comb += pack_rows.i.payload.data.eq(b_data)
        if cfg.gemm_words == 1:
            pack_cols = pack_rows  # a row and a column are both one word
        else:
            pack_cols = m.submodules.pack_cols = StreamResize(cfg.gemm_cols, beat_bytes)
            m.d.comb += pack_cols.i.payload.data.eq(b_data)  # zero-extended to a column

        def feed(pack: StreamResize) -> None:
            with m.If(unit == Unit.GEMM):
                m.d.comb += [pack.i.valid.eq(b.valid), b.ready.eq(pack.i.ready),
                             weights.valid.eq(pack.o.valid), pack.o.ready.eq(weights.ready)]
            m.d.comb += weights.payload.eq(pack.o.payload.data)

        with m.If(ctl.weights_from_buffer):
            with m.If(ctl.weights_columns):
                feed(pack_cols)
            with m.Else():
                feed(pack_rows)
        with m.Elif(unit == Unit.GEMM):
            m.d.comb += [weights.valid.eq(rows.valid), rows.ready.eq(weights.ready),
                         weights.payload.eq(rows.payload.data)]

    def _write_port(self, m: Module, write, gen_w: AddressGenerator,
                    gen_w2: AddressGenerator, rs_i32: StreamResize, a) -> None:
        """The write port: one word per cycle from the unit in charge, at ``gen_w``'s address,
        or, in a cycle it leaves free, the background softmax's at ``gen_w2``'s; the
        residual add's ``a`` (port A's words, or a fused unit's output)."""
        ctl = self.control
        unit = ctl.unit
        w_valid = Signal()
        w_data = Signal(8 * self.config.pe_cols)
        w_ready = Signal()
        # LOAD: words past the count (padding of the last AXI beat) are dropped.
        load_drop = Signal()
        m.d.comb += load_drop.eq((unit == Unit.LOAD) & ~gen_w.addr.valid)
        # Q·Kᵀ (BUFFER_COLUMNS): its N is its tokens' keys; a result word at N-tile i0,
        # word i2 holds channels from i0·G + i2·C, none of them a key once ≥ tokens (n1).
        # It takes its address (the walk stays in step) but is not written: the port is
        # free for the background softmax that cycle.
        keyless, keyless_drop = Signal(), Signal()
        wa = gen_w.addr.payload
        m.d.comb += keyless.eq(((wa.i0 << exact_log2(self.config.gemm_cols))
                                + (wa.i2 << exact_log2(self.config.pe_cols))) >= wa.n1)
        results, probs = self.gemm_results, self.softmax_probs
        residual_a, residual_y = self.residual_a, self.residual_y
        m.d.comb += residual_a.payload.eq(Mux(
            ctl.residual_fused,
            Mux(unit == Unit.COMBINE, self.combiner_out.payload.as_value(),
                results.payload.int8.as_value()),
            a.payload.word))

        def fused(source) -> None:
            """A unit's output through the residual add (``residual_fused``)."""
            m.d.comb += [residual_a.valid.eq(source.valid), source.ready.eq(residual_a.ready),
                         w_valid.eq(residual_y.valid), residual_y.ready.eq(w_ready),
                         w_data.eq(residual_y.payload.data.as_value())]

        with m.Switch(unit):
            with m.Case(Unit.GEMM):
                with m.If(ctl.gemm_int32):
                    m.d.comb += [rs_i32.i.valid.eq(results.valid),
                                 results.ready.eq(rs_i32.i.ready)]
                with m.Elif(ctl.residual_fused):
                    fused(results)
                with m.Else():
                    m.d.comb += [w_valid.eq(results.valid), results.ready.eq(w_ready),
                                 w_data.eq(results.payload.int8.as_value()),
                                 keyless_drop.eq(ctl.skip_keyless & keyless)]
            with m.Case(Unit.LN):
                m.d.comb += [w_valid.eq(self.ln_y.valid), self.ln_y.ready.eq(w_ready),
                             w_data.eq(self.ln_y.payload.data.as_value())]
            with m.Case(Unit.RESIDUAL):
                m.d.comb += [w_valid.eq(self.residual_y.valid), self.residual_y.ready.eq(w_ready),
                             w_data.eq(self.residual_y.payload.data.as_value())]
            with m.Case(Unit.COMBINE):
                with m.If(ctl.residual_fused):
                    fused(self.combiner_out)
                with m.Else():
                    m.d.comb += [w_valid.eq(self.combiner_out.valid),
                                 self.combiner_out.ready.eq(w_ready),
                                 w_data.eq(self.combiner_out.payload.as_value())]
            with m.Case(Unit.LOAD):
                m.d.comb += [w_valid.eq(self.ddr_words.valid), self.ddr_words.ready.eq(w_ready),
                             w_data.eq(self.ddr_words.payload.data)]
        m.d.comb += rs_i32.i.payload.data.eq(results.payload.int32.as_value())
        # The unit in charge's output is always accepted: the write port never stalls it.
        writes_left = Signal(32)
        fg_write = Signal()
        m.d.comb += [
            w_ready.eq(gen_w.addr.valid | load_drop),
            gen_w.addr.ready.eq(w_valid & ~load_drop),
            fg_write.eq(w_valid & gen_w.addr.valid & ~load_drop & ~keyless_drop),
            ctl.writes_done.eq(writes_left == 0),
        ]
        # A new count in the same cycle as a write wins: it is the next instruction's.
        with m.If(ctl.expect_writes):
            m.d.sync += writes_left.eq(ctl.writes)
        with m.Elif(w_valid & w_ready):
            m.d.sync += writes_left.eq(writes_left - 1)
        # The background softmax writes when the unit in charge does not (ROUTE's router
        # scores go to the dispatcher instead). Attention probabilities are ≤ 127 and the
        # row's scale lanes are bytes: the low byte of each lane is the buffer's.
        bg_write = Signal()
        bg_writes_left = Signal(32)
        probs_int8 = Cat(*(probs.payload.data[lane][:8] for lane in range(self.config.pe_cols)))
        with m.If(unit != Unit.ROUTE):
            m.d.comb += probs.ready.eq(gen_w2.addr.valid & ~fg_write)
        m.d.comb += [
            bg_write.eq((unit != Unit.ROUTE) & probs.valid & gen_w2.addr.valid & ~fg_write),
            gen_w2.addr.ready.eq(bg_write),
            write.addr.eq(Mux(fg_write, gen_w.addr.payload.addr, gen_w2.addr.payload.addr)),
            write.data.eq(Mux(fg_write, w_data, probs_int8)),
            write.en.eq(fg_write | bg_write),
            ctl.bg_writes_done.eq(bg_writes_left == 0),
        ]
        with m.If(ctl.expect_bg_writes):
            m.d.sync += bg_writes_left.eq(ctl.bg_writes)
        with m.Elif(bg_write):
            m.d.sync += bg_writes_left.eq(bg_writes_left - 1)

    def _write_dma(self, m: Module, a, rs_store: StreamResize, rs_i32: StreamResize) -> None:
        """The write DMA's data: STORE words (zero past the count) or INT32 GEMM results."""
        ctl = self.control
        wr_data = self.wr_data
        with m.If(ctl.unit == Unit.STORE):
            m.d.comb += [wr_data.valid.eq(rs_store.o.valid),
                         wr_data.payload.data.eq(rs_store.o.payload.data),
                         rs_store.o.ready.eq(wr_data.ready)]
        with m.Else():
            m.d.comb += [wr_data.valid.eq(rs_i32.o.valid),
                         wr_data.payload.data.eq(rs_i32.o.payload.data),
                         rs_i32.o.ready.eq(wr_data.ready)]
        m.d.comb += ctl.int32_drained.eq(~rs_i32.o.valid)
        # Port A words handed to STORE; words past the count (padding up to a whole AXI
        # beat) are sent as zeros.
        store_words_left = Signal(32)
        store_pad = Signal()
        m.d.comb += [store_pad.eq(store_words_left == 0),
                     rs_store.i.payload.data.eq(Mux(store_pad, 0, a.payload.word))]
        with m.If(ctl.expect_store):
            m.d.sync += store_words_left.eq(ctl.store_words)
        with m.Elif((ctl.unit == Unit.STORE) & a.valid & a.ready & ~store_pad):
            m.d.sync += store_words_left.eq(store_words_left - 1)
