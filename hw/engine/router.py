"""The read-DMA router: one read port shared by instruction fetch and the operand streams.

Commands come from the instruction fetch and from the controller (never both in one
cycle). Data beats go to the sink the controller selects (:class:`ReadSink`), through
width converters from AXI beats to each consumer's words: instruction beats to the fetch,
a GEMM's stream split per N-tile into parameter records and weight rows, LayerNorm
parameter records, the two tables, and LOAD words.
"""

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import enum, stream, wiring
from amaranth.lib.wiring import In, Out

from ..axi import StreamResize, byte_beat_layout, dma_cmd_layout
from ..config import AccelConfig
from ..gemm import GEMM_PARAM
from ..isa import GEMM_RECORD_BYTES, LN_RECORD_BYTES
from ..vector import LayerNormUnit, SoftmaxUnit

__all__ = ["ReadRouter", "ReadSink", "read_router_control"]


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
            Start a GEMM stream this cycle: ``gemm_beats`` beats, of which, with
            ``gemm_weights_ddr``, each N-tile's parameter beats are followed by
            ``gemm_tile_beats`` weight beats.
        gemm_stream_done : In(1)
            Every beat of the GEMM's stream has arrived.
        ln_restart : Out(1)
            The next LayerNorm parameter beat is beat 0.
        ln_beats : In(16)
            LayerNorm parameter beats delivered since ``ln_restart``.
        table_restart : Out(1)
            The next exp-table entry is entry 0 (of 256).
        table_done : In(1)
            All 256 exp-table entries have been delivered.
        data_waiting : In(1)
            A data beat is on offer from the read DMA.
    """
    return wiring.Signature({
        "sink": Out(ReadSink),
        "gemm_setup": Out(1),
        "gemm_weights_ddr": Out(1),
        "gemm_tile_beats": Out(24),
        "gemm_beats": Out(32),
        "gemm_stream_done": In(1),
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
        ``axi_bytes`` (the beat), ``pe_cols`` (words and parameter blocks).

    Attributes
    ----------
    control : In(read_router_control())
        The controller's choice of sink and the stream bookkeeping.
    fetch_cmd, operand_cmd : In(stream.Signature(dma_cmd_layout(config)))
        Read commands of the instruction fetch and of the controller (GEMM streams,
        LayerNorm parameters, tables, LOAD); merged onto ``rd_cmd``.
    rd_cmd : Out(stream.Signature(dma_cmd_layout(config)))
        To the read DMA.
    rd_data : In(stream.Signature(byte_beat_layout(axi_bytes)))
        From the read DMA.
    fetch : Out(stream.Signature(byte_beat_layout(axi_bytes)))
        Instruction beats.
    words : Out(stream.Signature(byte_beat_layout(pe_cols)))
        Buffer words: LOAD data, or GEMM weight rows from DDR.
    gemm_params : Out(stream.Signature(GEMM_PARAM))
        A GEMM's per-channel parameters, from its 8-byte records.
    gemm_table : Out(stream.Signature(signed(8)))
        The GEMM engine's output table.
    ln_params : Out(stream.Signature(LayerNormUnit.param_layout(config)))
        LayerNorm gains and biases, one beat of ``pe_cols`` 16-byte records each.
    softmax_table : Out(stream.Signature(SoftmaxUnit.table_layout()))
        The softmax unit's exp table, entry by entry.

    Notes
    -----
    A GEMM's stream is split at AXI-beat granularity (``check_top_config`` makes a tile and
    a parameter block at least one beat): per N-tile, ``GEMM_RECORD_BYTES · pe_cols /
    axi_bytes`` beats to the parameter converter, then the tile beats to the word
    converter; with weights from the buffer every beat is a parameter beat.
    """

    def __init__(self, config: AccelConfig):
        self.config = config
        dma_cmd = stream.Signature(dma_cmd_layout(config))
        beat = stream.Signature(byte_beat_layout(config.axi_bytes))
        super().__init__({
            "control": In(read_router_control()),
            "fetch_cmd": In(dma_cmd),
            "operand_cmd": In(dma_cmd),
            "rd_cmd": Out(dma_cmd),
            "rd_data": In(beat),
            "fetch": Out(beat),
            "words": Out(stream.Signature(byte_beat_layout(config.pe_cols))),
            "gemm_params": Out(stream.Signature(GEMM_PARAM)),
            "gemm_table": Out(stream.Signature(signed(8))),
            "ln_params": Out(stream.Signature(LayerNormUnit.param_layout(config))),
            "softmax_table": Out(stream.Signature(SoftmaxUnit.table_layout())),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        C = cfg.pe_cols
        axi_bytes = cfg.axi_bytes

        # Commands: the fetch's and the controller's are never offered in the same cycle.
        fetch_cmd, operand_cmd = self.fetch_cmd, self.operand_cmd
        m.d.comb += [
            self.rd_cmd.valid.eq(fetch_cmd.valid | operand_cmd.valid),
            self.rd_cmd.payload.eq(Mux(fetch_cmd.valid, fetch_cmd.payload, operand_cmd.payload)),
            fetch_cmd.ready.eq(self.rd_cmd.ready),
            operand_cmd.ready.eq(self.rd_cmd.ready),
        ]

        # Width converters between AXI beats and the consumers' words.
        rs_word = m.submodules.rs_word = StreamResize(axi_bytes, C)         # LOAD, weights
        rs_param = m.submodules.rs_param = StreamResize(axi_bytes, GEMM_RECORD_BYTES)
        rs_ln = m.submodules.rs_ln = StreamResize(axi_bytes, LN_RECORD_BYTES * C)
        rs_t8 = m.submodules.rs_t8 = StreamResize(axi_bytes, 1)
        rs_t16 = m.submodules.rs_t16 = StreamResize(axi_bytes, 2)
        wiring.connect(m, rs_word.o, wiring.flipped(self.words))
        # GEMM stream split: per N-tile, parameter beats then weight beats (wsrc = DDR).
        gemm_weights_ddr = Signal()
        beat_in_tile = Signal(24)
        param_beats = GEMM_RECORD_BYTES * C // axi_bytes
        to_params = (beat_in_tile < param_beats) | ~gemm_weights_ddr
        self._route(m, (rs_word, rs_param, rs_ln, rs_t8, rs_t16), to_params)
        self._gemm_stream(m, gemm_weights_ddr, beat_in_tile, param_beats)
        self._unit_streams(m, rs_param, rs_ln, rs_t8, rs_t16)
        return m

    def _route(self, m: Module, converters, to_params) -> None:
        """Data beats to the sink's converter (a GEMM's to ``rs_param`` while ``to_params``)."""
        rs_word, rs_param, rs_ln, rs_t8, rs_t16 = converters
        ctl, rd = self.control, self.rd_data
        with m.Switch(ctl.sink):
            with m.Case(ReadSink.FETCH):
                m.d.comb += [self.fetch.valid.eq(rd.valid), rd.ready.eq(self.fetch.ready)]
            with m.Case(ReadSink.GEMM):
                m.d.comb += [
                    rs_param.i.valid.eq(rd.valid & to_params),
                    rs_word.i.valid.eq(rd.valid & ~to_params),
                    rd.ready.eq(Mux(to_params, rs_param.i.ready, rs_word.i.ready)),
                ]
            with m.Case(ReadSink.LN):
                m.d.comb += [rs_ln.i.valid.eq(rd.valid), rd.ready.eq(rs_ln.i.ready)]
            with m.Case(ReadSink.TABLE8):
                m.d.comb += [rs_t8.i.valid.eq(rd.valid), rd.ready.eq(rs_t8.i.ready)]
            with m.Case(ReadSink.TABLE16):
                m.d.comb += [rs_t16.i.valid.eq(rd.valid), rd.ready.eq(rs_t16.i.ready)]
            with m.Case(ReadSink.LOAD):
                m.d.comb += [rs_word.i.valid.eq(rd.valid), rd.ready.eq(rs_word.i.ready)]
        for rs in converters:
            m.d.comb += rs.i.payload.data.eq(rd.payload.data)
        m.d.comb += [self.fetch.payload.eq(rd.payload), ctl.data_waiting.eq(rd.valid)]

    def _gemm_stream(self, m: Module, weights_ddr: Signal, beat_in_tile: Signal,
                     param_beats: int) -> None:
        """The GEMM stream's bookkeeping: beats still to come, the beat within an N-tile."""
        ctl, rd = self.control, self.rd_data
        tile_beats = Signal(24)  # weight beats per N-tile (k_slices·R·C/axi)
        gemm_beats_left = Signal(32)   # beats of the GEMM's DDR stream still to arrive
        gemm_beat = rd.valid & rd.ready & (ctl.sink == ReadSink.GEMM)
        # A setup in the same cycle as a beat wins: it belongs to the next stream.
        with m.If(ctl.gemm_setup):
            m.d.sync += gemm_beats_left.eq(ctl.gemm_beats)
        with m.Elif(gemm_beat):
            m.d.sync += gemm_beats_left.eq(gemm_beats_left - 1)
        with m.If(ctl.gemm_setup):
            m.d.sync += [beat_in_tile.eq(0), tile_beats.eq(ctl.gemm_tile_beats),
                         weights_ddr.eq(ctl.gemm_weights_ddr)]
        with m.Elif(gemm_beat & weights_ddr):
            with m.If(beat_in_tile == param_beats + tile_beats - 1):
                m.d.sync += beat_in_tile.eq(0)
            with m.Else():
                m.d.sync += beat_in_tile.eq(beat_in_tile + 1)
        m.d.comb += ctl.gemm_stream_done.eq(gemm_beats_left == 0)

    def _unit_streams(self, m: Module, rs_param, rs_ln, rs_t8, rs_t16) -> None:
        """Records and table entries to the units' parameter and table streams."""
        C = self.config.pe_cols
        ctl = self.control
        # GEMM parameters: 8-byte records → {bias, mult, shift}.
        record = rs_param.o.payload.data
        m.d.comb += [
            self.gemm_params.payload.bias.eq(record[0:32]),
            self.gemm_params.payload.mult.eq(record[32:48]),
            self.gemm_params.payload.shift.eq(record[48:54]),
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
        # Tables.
        table_index = Signal(8)
        table_left = Signal(range(257))  # exp-table entries still to come
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
            m.d.sync += [table_index.eq(0), table_left.eq(256)]
        with m.Elif(table.valid & table.ready):
            m.d.sync += [table_index.eq(table_index + 1), table_left.eq(table_left - 1)]
