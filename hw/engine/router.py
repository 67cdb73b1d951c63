"""The read-DMA router: one read port shared by instruction fetch and the operand streams.

Commands come from the instruction fetch and from the controller (never both in one
cycle). Data arrives in *entries* of :func:`~m3vit.hw.isa.intake_beats` AXI beats (256 bytes
a cycle on the ZCU104's three ports) and goes to the sink the controller selects
(:class:`ReadSink`): a GEMM's stream whole entries at a time, split per N-tile into
parameter records (all of an entry's in one cycle) and weight rows (an entry's worth in one
cycle); LOAD's a word a cycle where a word spans several beats (:class:`EntryWords`); everything
else beat by beat, through width converters to each consumer's words: instruction beats to
the fetch, LayerNorm parameter records, the two tables, LOAD words.
"""

from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from ..axi import StreamResize, byte_beat_layout, dma_cmd_layout, entry_layout
from ..config import AccelConfig
from ..gemm import GEMM_PARAM
from ..isa import GEMM_RECORD_BYTES, LN_RECORD_BYTES, intake_beats
from ..vector import LayerNormUnit, SoftmaxUnit

__all__ = ["GEMM_STREAMS_QUEUED", "EntryWords", "ReadRouter", "ReadSink", "intake_shape",
           "read_router_control"]

#: GEMM streams that may wait behind the active one: the controller issues a GEMM's stream
#: while the GEMMs before it still compute or wait (one pending, GEMMS_HELD = 4 held), so
#: the DDR reads up to five GEMMs ahead, as far as the read queues hold.
GEMM_STREAMS_QUEUED = 5


def intake_shape(config: AccelConfig) -> SimpleNamespace:
    """How the engine takes read data: ``entry_beats`` and ``entry_bytes`` (one entry a
    cycle), and what a GEMM makes of an entry: ``rows_per_beat`` weight rows (an entry, or
    one row packed from several when an entry is narrower than a row) and
    ``params_per_beat`` parameter records; the tables' entries per AXI beat
    (``gemm_table_entries`` INT8, ``exp_table_entries`` uint16: a table loads at one
    port's rate) and whether LayerNorm parameters come a whole entry a cycle
    (``ln_entries``: when a LayerNorm beat's records are whole entries)."""
    beats = intake_beats(config)
    entry_bytes = beats * config.axi_bytes
    return SimpleNamespace(
        entry_beats=beats,
        entry_bytes=entry_bytes,
        rows_per_beat=max(1, entry_bytes // config.gemm_cols),
        params_per_beat=max(1, entry_bytes // GEMM_RECORD_BYTES),
        gemm_table_entries=min(256, config.axi_bytes),
        exp_table_entries=min(256, config.axi_bytes // 2),
        ln_entries=(LN_RECORD_BYTES * config.pe_cols) % entry_bytes == 0,
        load_words=EntryWords.applies(config.axi_bytes, beats, config.pe_cols),
    )


class EntryWords(wiring.Component):
    """An entry's words, one a cycle: LOAD's path where a buffer word spans several AXI
    beats (the ZCU104's 32-byte word, two 16-byte beats), so a LOAD writes the buffer at
    its write port's rate instead of a beat a cycle.

    Parameters
    ----------
    axi_bytes, entry_beats : int
        The entry (:func:`~m3vit.hw.axi.entry_layout`).
    word_bytes : int
        A word: a power of two, more than a beat and at most an entry
        (:meth:`applies`).

    Attributes
    ----------
    i : In(stream of entry_layout(axi_bytes, entry_beats))
        Taken with its last valid word.
    o : Out(stream of byte_beat_layout(word_bytes))
        Words low bytes first, ``last`` on the stream's last. Beats past an entry's
        ``beats`` read as zeros (only a ragged stream's last word has any), as
        :class:`~m3vit.hw.axi.StreamResize` closes a ragged beat. The output is a register.
    """

    @staticmethod
    def applies(axi_bytes: int, entry_beats: int, word_bytes: int) -> bool:
        """Whether words span several beats and an entry holds whole words."""
        return axi_bytes < word_bytes <= axi_bytes * entry_beats

    def __init__(self, axi_bytes: int, entry_beats: int, word_bytes: int):
        if not self.applies(axi_bytes, entry_beats, word_bytes) or word_bytes & (word_bytes - 1):
            raise ValueError(f"a word of {word_bytes} bytes must be a power of two, more than "
                             f"a {axi_bytes}-byte beat and at most a {entry_beats}-beat entry")
        self.axi_bytes, self.entry_beats, self.word_bytes = axi_bytes, entry_beats, word_bytes
        super().__init__({
            "i": In(stream.Signature(entry_layout(axi_bytes, entry_beats))),
            "o": Out(stream.Signature(byte_beat_layout(word_bytes))),
        })

    def elaborate(self, platform):
        m = Module()
        ratio = self.word_bytes // self.axi_bytes          # beats a word
        n_words = self.entry_beats // ratio
        beat_bits = 8 * self.axi_bytes
        i, o = self.i, self.o
        piece = Signal(range(n_words))
        # The entry's last valid word holds beat beats − 1.
        final = piece == ((i.p.beats - 1) >> exact_log2(ratio))
        beats = [i.p.data[k * beat_bits:(k + 1) * beat_bits] for k in range(self.entry_beats)]
        # A beat past the entry's valid ones (a ragged last word) reads as zeros.
        word = Array(Cat(Mux(w * ratio + j < i.p.beats, beats[w * ratio + j],
                             Const(0, beat_bits)) for j in range(ratio))
                     for w in range(n_words))[piece]
        take = i.valid & (~o.valid | o.ready)
        m.d.comb += i.ready.eq(take & final)
        with m.If(o.valid & o.ready):
            m.d.sync += o.valid.eq(0)
        with m.If(take):
            m.d.sync += [o.valid.eq(1), o.p.data.eq(word), o.p.last.eq(i.p.last & final),
                         piece.eq(Mux(final, 0, piece + 1))]
        return m


class ReadSink(enum.Enum, shape=3):
    """Where the read DMA's data beats go."""

    #: nowhere: beats wait
    NONE = 0
    #: the instruction fetch
    FETCH = 1
    #: a GEMM's DDR stream: per N-tile, parameter records then (weights from DDR) weight rows
    GEMM = 2
    #: LayerNorm parameter records
    LN = 3
    #: the GEMM engine's output table (INT8 entries)
    TABLE8 = 4
    #: the softmax unit's exp table (uint16 entries)
    TABLE16 = 5
    #: LOAD words, to the buffer's write port
    LOAD = 6


def read_router_control() -> wiring.Signature:
    """The controller's side of the router.

    Returns
    -------
    wiring.Signature
        Its members (flows seen from the controller):

        sink : Out(ReadSink)
            Where data beats go.
        gemm_setup : Out(1)
            Start a GEMM stream this cycle: ``gemm_entries`` entries, of which, with
            ``gemm_weights_ddr``, each N-tile's parameter entries are followed by
            ``gemm_tile_entries`` weight entries.
        gemm_stream_room : In(1)
            A GEMM stream may be set up now (:data:`GEMM_STREAMS_QUEUED` may wait behind
            the active one).
        ln_restart : Out(1)
            The next LayerNorm parameter beat is beat 0.
        ln_beats : In(16)
            LayerNorm parameter beats delivered since ``ln_restart``.
        table_restart : Out(1)
            The next exp-table entry is entry 0 (of 256).
        table_done : In(1)
            All 256 exp-table entries have been delivered.
        data_waiting : In(1)
            A data entry is on offer from the read DMA.
    """
    return wiring.Signature({
        "sink": Out(ReadSink),
        "gemm_setup": Out(1),
        "gemm_weights_ddr": Out(1),
        "gemm_tile_entries": Out(24),
        "gemm_entries": Out(32),
        "gemm_stream_room": In(1),
        "ln_restart": Out(1),
        "ln_beats": In(16),
        "table_restart": Out(1),
        "table_done": In(1),
        "data_waiting": In(1),
    })


class ReadRouter(wiring.Component):
    """Read-DMA commands in, data beats out to the fetch, the units and the buffer.

    Parameters
    ----------
    config : AccelConfig
        ``axi_bytes`` (the beat), :func:`intake_shape` (the entry), ``pe_cols`` (words and
        parameter blocks).

    Attributes
    ----------
    control : In(read_router_control())
        The controller's choice of sink and the stream bookkeeping.
    fetch_cmd, operand_cmd : In(stream.Signature(dma_cmd_layout(config)))
        Read commands of the instruction fetch and of the controller (GEMM streams,
        LayerNorm parameters, tables, LOAD); merged onto ``rd_cmd``.
    rd_cmd : Out(stream.Signature(dma_cmd_layout(config)))
        To the read DMA.
    rd_data : In(stream.Signature(entry_layout(axi_bytes, entry_beats)))
        From the read DMA: each command's beats, an entry at a time.
    fetch : Out(stream.Signature(byte_beat_layout(axi_bytes)))
        Instruction beats.
    words : Out(stream.Signature(byte_beat_layout(pe_cols)))
        LOAD words, to the buffer.
    gemm_weights : Out(stream.Signature(byte_beat_layout(rows_per_beat · gemm_cols)))
        GEMM weight rows (``gemm_cols`` bytes each) from DDR, ``rows_per_beat`` a beat.
    gemm_params : Out(stream.Signature(ArrayLayout(GEMM_PARAM, params_per_beat)))
        A GEMM's per-channel parameters, from its 8-byte records.
    gemm_table : Out(stream.Signature(ArrayLayout(signed(8), gemm_table_entries)))
        The GEMM engine's output table, an AXI beat's entries at once.
    ln_params : Out(stream.Signature(LayerNormUnit.param_layout(config)))
        LayerNorm gains and biases, one beat of ``pe_cols`` 16-byte records each.
    softmax_table : Out(stream.Signature(SoftmaxUnit.table_layout(exp_table_entries)))
        The softmax unit's exp table, an AXI beat's entries at once.

    Notes
    -----
    A GEMM's stream is split at entry granularity (:func:`~m3vit.hw.isa.intake_beats`
    makes a weight tile and a parameter block whole entries): per N-tile,
    ``GEMM_RECORD_BYTES · gemm_cols / entry_bytes`` entries to the parameters, then the tile
    entries to the weights; with weights from the buffer every entry is a parameter entry.
    Its entries are whole (a GEMM stream is whole entries long, and the read DMA starts
    each command's first entry at its first beat). So are LayerNorm parameters' where a
    LayerNorm beat is whole entries (``intake_shape(config).ln_entries``). The other sinks
    take an entry's valid beats one a cycle.
    """

    def __init__(self, config: AccelConfig):
        self.config = config
        self.intake = shape = intake_shape(config)
        dma_cmd = stream.Signature(dma_cmd_layout(config))
        beat = stream.Signature(byte_beat_layout(config.axi_bytes))
        super().__init__({
            "control": In(read_router_control()),
            "fetch_cmd": In(dma_cmd),
            "operand_cmd": In(dma_cmd),
            "rd_cmd": Out(dma_cmd),
            "rd_data": In(stream.Signature(entry_layout(config.axi_bytes, shape.entry_beats))),
            "fetch": Out(beat),
            "words": Out(stream.Signature(byte_beat_layout(config.pe_cols))),
            "gemm_weights": Out(stream.Signature(byte_beat_layout(
                shape.rows_per_beat * config.gemm_cols))),
            "gemm_params": Out(stream.Signature(data.ArrayLayout(GEMM_PARAM,
                                                                 shape.params_per_beat))),
            "gemm_table": Out(stream.Signature(data.ArrayLayout(
                signed(8), shape.gemm_table_entries))),
            "ln_params": Out(stream.Signature(LayerNormUnit.param_layout(config))),
            "softmax_table": Out(stream.Signature(SoftmaxUnit.table_layout(
                shape.exp_table_entries))),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        C = cfg.pe_cols
        axi_bytes = cfg.axi_bytes
        shape = self.intake

        # Commands: the fetch's and the controller's are never offered in the same cycle.
        fetch_cmd, operand_cmd = self.fetch_cmd, self.operand_cmd
        m.d.comb += [
            self.rd_cmd.valid.eq(fetch_cmd.valid | operand_cmd.valid),
            self.rd_cmd.payload.eq(Mux(fetch_cmd.valid, fetch_cmd.payload, operand_cmd.payload)),
            fetch_cmd.ready.eq(self.rd_cmd.ready),
            operand_cmd.ready.eq(self.rd_cmd.ready),
        ]

        # Width converters between entries or AXI beats and the consumers' words.
        entry_bytes = shape.entry_bytes
        G = cfg.gemm_cols  # a GEMM N-tile: a weight row, a parameter block
        rs_rows = m.submodules.rs_rows = StreamResize(entry_bytes, shape.rows_per_beat * G)
        rs_param = m.submodules.rs_param = StreamResize(
            entry_bytes, shape.params_per_beat * GEMM_RECORD_BYTES)
        if shape.load_words:                                                # LOAD
            rs_word = m.submodules.load_words = EntryWords(axi_bytes, shape.entry_beats, C)
        else:
            rs_word = m.submodules.rs_word = StreamResize(axi_bytes, C)
        rs_ln = m.submodules.rs_ln = StreamResize(
            entry_bytes if shape.ln_entries else axi_bytes, LN_RECORD_BYTES * C)
        rs_t8 = m.submodules.rs_t8 = StreamResize(axi_bytes, shape.gemm_table_entries)
        rs_t16 = m.submodules.rs_t16 = StreamResize(axi_bytes, 2 * shape.exp_table_entries)
        wiring.connect(m, rs_rows.o, wiring.flipped(self.gemm_weights))
        wiring.connect(m, rs_word.o, wiring.flipped(self.words))
        # GEMM stream split: per N-tile, parameter entries then weight entries (wsrc = DDR).
        gemm_weights_ddr = Signal()
        entry_in_tile = Signal(24)
        param_entries = GEMM_RECORD_BYTES * G // entry_bytes
        to_params = (entry_in_tile < param_entries) | ~gemm_weights_ddr
        narrow = self._narrow(m)
        gemm_now = self._gemm_stream(m, gemm_weights_ddr, entry_in_tile, param_entries)
        self._route(m, narrow, (rs_rows, rs_param), (rs_word, rs_ln, rs_t8, rs_t16), to_params,
                    gemm_now)
        self._unit_streams(m, rs_param, rs_ln, rs_t8, rs_t16)
        return m

    def _narrow(self, m: Module) -> SimpleNamespace:
        """An entry's valid beats, one a cycle: ``valid``, ``data``, ``last`` and ``final``
        (the entry's last beat: taking it takes the entry)."""
        rd = self.rd_data
        E = self.intake.entry_beats
        if E == 1:
            return SimpleNamespace(data=rd.payload.data, last=rd.payload.last, final=1,
                                   taken=Signal(name="narrow_taken"))
        width = 8 * self.config.axi_bytes
        piece = Signal(range(E), name="narrow_piece")
        taken = Signal(name="narrow_taken")  # the sink takes the beat on offer
        final = piece == rd.payload.beats - 1
        with m.If(taken):
            m.d.sync += piece.eq(Mux(final, 0, piece + 1))
        beats = Array(rd.payload.data[k * width:(k + 1) * width] for k in range(E))
        return SimpleNamespace(data=beats[piece], last=rd.payload.last & final, final=final,
                               taken=taken)

    def _route(self, m: Module, narrow, gemm_converters, converters, to_params,
               gemm_now) -> None:
        """Entries to the sink: a GEMM's whole to ``rs_param`` (while ``to_params``) or
        ``rs_rows``; the other sinks' beat by beat through ``narrow``. While a GEMM stream
        is in flight its entries come first (the DMA delivers in command order): the
        controller may meanwhile fetch the next instruction."""
        rs_rows, rs_param = gemm_converters
        rs_word, rs_ln, rs_t8, rs_t16 = converters
        ln_entries, load_words = self.intake.ln_entries, self.intake.load_words
        ctl, rd = self.control, self.rd_data
        sink = Signal(ReadSink)
        m.d.comb += sink.eq(Mux(gemm_now, ReadSink.GEMM, ctl.sink))
        beat_ready = Signal()  # the narrow sink takes a beat
        with m.Switch(sink):
            with m.Case(ReadSink.FETCH):
                m.d.comb += [self.fetch.valid.eq(rd.valid), beat_ready.eq(self.fetch.ready)]
            with m.Case(ReadSink.GEMM):
                m.d.comb += [
                    rs_param.i.valid.eq(rd.valid & to_params),
                    rs_rows.i.valid.eq(rd.valid & ~to_params),
                    rd.ready.eq(Mux(to_params, rs_param.i.ready, rs_rows.i.ready)),
                ]
            with m.Case(ReadSink.LN):
                # Whole entries, or beat by beat through the narrow path.
                taken = rd.ready if ln_entries else beat_ready
                m.d.comb += [rs_ln.i.valid.eq(rd.valid), taken.eq(rs_ln.i.ready)]
            with m.Case(ReadSink.TABLE8):
                m.d.comb += [rs_t8.i.valid.eq(rd.valid), beat_ready.eq(rs_t8.i.ready)]
            with m.Case(ReadSink.TABLE16):
                m.d.comb += [rs_t16.i.valid.eq(rd.valid), beat_ready.eq(rs_t16.i.ready)]
            with m.Case(ReadSink.LOAD):
                # Whole entries a word a cycle, or beat by beat through the narrow path.
                taken = rd.ready if load_words else beat_ready
                m.d.comb += [rs_word.i.valid.eq(rd.valid), taken.eq(rs_word.i.ready)]
        whole = ([ReadSink.GEMM, ReadSink.NONE] + ([ReadSink.LN] if ln_entries else [])
                 + ([ReadSink.LOAD] if load_words else []))
        narrow_sink = Cat(sink != w for w in whole).all()
        m.d.comb += narrow.taken.eq(narrow_sink & rd.valid & beat_ready)
        with m.If(narrow_sink):
            m.d.comb += rd.ready.eq(beat_ready & narrow.final)
        for rs in (rs_rows, rs_param) + ((rs_ln,) if ln_entries else ()):
            m.d.comb += rs.i.payload.data.eq(rd.payload.data)
        if load_words:
            m.d.comb += rs_word.i.payload.eq(rd.payload)
        for rs in (rs_t8, rs_t16) + (() if ln_entries else (rs_ln,)) + (
                () if load_words else (rs_word,)):
            m.d.comb += rs.i.payload.data.eq(narrow.data)
        m.d.comb += [self.fetch.payload.data.eq(narrow.data),
                     self.fetch.payload.last.eq(narrow.last),
                     ctl.data_waiting.eq(rd.valid)]

    def _gemm_stream(self, m: Module, weights_ddr: Signal, entry_in_tile: Signal,
                     param_entries: int) -> Signal:
        """The GEMM streams' bookkeeping: the active stream's entries still to come and the
        entry within its N-tile; streams set up meanwhile wait in a queue of
        :data:`GEMM_STREAMS_QUEUED` and become active, in order, as the one before ends.
        Returns "an entry now is a GEMM's"."""
        ctl, rd = self.control, self.rd_data
        tile_entries = Signal(24)  # weight entries per N-tile (k_slices·R·G/entry_bytes)
        entries_left = Signal(32)  # entries of the active stream still to arrive
        stream_layout = data.StructLayout({"entries": 32, "tile_entries": 24,
                                           "weights_ddr": 1})
        queue = m.submodules.gemm_streams = SyncFIFO(width=stream_layout.size,
                                                     depth=GEMM_STREAMS_QUEUED)
        head = stream_layout(queue.r_data)
        gemm_now = Signal()        # entries in flight belong to a GEMM
        m.d.comb += gemm_now.eq(entries_left != 0)
        gemm_entry = rd.valid & rd.ready & gemm_now
        ends = gemm_entry & (entries_left == 1)

        def activate(entries, tiles, ddr):
            m.d.sync += [entries_left.eq(entries), tile_entries.eq(tiles),
                         weights_ddr.eq(ddr), entry_in_tile.eq(0)]

        with m.If(gemm_entry):
            m.d.sync += entries_left.eq(entries_left - 1)
            with m.If(weights_ddr):
                with m.If(entry_in_tile == param_entries + tile_entries - 1):
                    m.d.sync += entry_in_tile.eq(0)
                with m.Else():
                    m.d.sync += entry_in_tile.eq(entry_in_tile + 1)
        # A queued stream follows the active one without a gap (the DMA delivers in order).
        with m.If(((entries_left == 0) | ends) & queue.r_rdy):
            activate(head.entries, head.tile_entries, head.weights_ddr)
            m.d.comb += queue.r_en.eq(1)
        # A stream set up with none ahead of it is active at once; else it queues.
        direct = ((entries_left == 0) | ends) & ~queue.r_rdy
        with m.If(ctl.gemm_setup & direct):
            activate(ctl.gemm_entries, ctl.gemm_tile_entries, ctl.gemm_weights_ddr)
        m.d.comb += queue.w_en.eq(ctl.gemm_setup & ~direct)
        written = stream_layout(queue.w_data)
        m.d.comb += [written.entries.eq(ctl.gemm_entries),
                     written.tile_entries.eq(ctl.gemm_tile_entries),
                     written.weights_ddr.eq(ctl.gemm_weights_ddr)]
        m.d.comb += ctl.gemm_stream_room.eq(queue.w_rdy)
        return gemm_now

    def _unit_streams(self, m: Module, rs_param, rs_ln, rs_t8, rs_t16) -> None:
        """Records and table entries to the units' parameter and table streams."""
        C = self.config.pe_cols
        ctl = self.control
        # GEMM parameters: 8-byte records → {bias, mult, shift}, all of a beat's at once.
        bits = 8 * GEMM_RECORD_BYTES
        for k in range(self.intake.params_per_beat):
            record = rs_param.o.payload.data[k * bits:(k + 1) * bits]
            m.d.comb += [
                self.gemm_params.payload[k].bias.eq(record[0:32]),
                self.gemm_params.payload[k].mult.eq(record[32:48]),
                self.gemm_params.payload[k].shift.eq(record[48:54]),
            ]
        m.d.comb += [
            self.gemm_params.valid.eq(rs_param.o.valid),
            rs_param.o.ready.eq(self.gemm_params.ready),
        ]
        # LayerNorm parameters: one beat of C records → gains and biases.
        ln_beat = Signal(16)
        params = self.ln_params
        for lane in range(C):
            rec = rs_ln.o.payload.data[lane * 128:(lane + 1) * 128]
            m.d.comb += [params.payload.bias[lane].eq(rec[0:64]),
                         params.payload.gain[lane].eq(rec[64:80])]
        m.d.comb += [
            params.payload.beat.eq(ln_beat),
            params.valid.eq(rs_ln.o.valid),
            rs_ln.o.ready.eq(params.ready),
            ctl.ln_beats.eq(ln_beat),
        ]
        with m.If(ctl.ln_restart):
            m.d.sync += ln_beat.eq(0)
        with m.Elif(params.valid & params.ready):
            m.d.sync += ln_beat.eq(ln_beat + 1)
        # Tables, an AXI beat's entries at once.
        exp_words = 256 // self.intake.exp_table_entries
        table_index = Signal(range(exp_words))
        table_left = Signal(range(exp_words + 1))  # exp-table words still to come
        table = self.softmax_table
        m.d.comb += [
            self.gemm_table.payload.eq(rs_t8.o.payload.data),
            self.gemm_table.valid.eq(rs_t8.o.valid),
            rs_t8.o.ready.eq(self.gemm_table.ready),
            table.payload.index.eq(table_index),
            table.payload.value.eq(rs_t16.o.payload.data),
            table.valid.eq(rs_t16.o.valid),
            rs_t16.o.ready.eq(table.ready),
            ctl.table_done.eq(table_left == 0),
        ]
        with m.If(ctl.table_restart):
            m.d.sync += [table_index.eq(0), table_left.eq(exp_words)]
        with m.Elif(table.valid & table.ready):
            m.d.sync += [table_index.eq(table_index + 1), table_left.eq(table_left - 1)]
