"""The instruction trace: when each instruction ran and what it read, for ``m3vit profile``.

Every instruction the controller retires (and the one a run ends on) writes one entry of
:data:`TRACE_WORDS` 32-bit words into a :data:`TRACE_DEPTH`-entry memory that the host
reads through the register file (``TRACE_INDEX``, ``TRACE_WORD0`` …), so the same trace
comes from the board and from the simulator. An entry's span runs from the previous
entry's end to its own: the spans partition the run. A ``GEMM`` that hands over as soon
as its stream is issued (``pending``) retires early; when a later instruction has to wait
for it (``GEMM_DRAIN``), the wait ends in a *drain* entry of that GEMM (bit 24), so its
tail counts as its own and not as the waiting instruction's. A ``SOFTMAX`` runs in the
background the same way: an instruction that has to wait for it (``BG_WAIT``) ends its
span in a drain entry of the ``SOFTMAX``.

=====  =============================================================================
word   contents
=====  =============================================================================
0      bits 15:0 the instruction's index (``pc``), bits 23:16 its opcode, bit 24 a drain
1      the cycle its span starts (cycles since ``START``)
2      the cycle its span ends
3…6    bytes read from DDR over master port 0 … 3 during the span
7      bytes written to DDR during the span
=====  =============================================================================
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from ..registers import MAX_TRACE_PORTS, TRACE_DEPTH, TRACE_WORDS

__all__ = ["InstructionTrace"]


class InstructionTrace(wiring.Component):
    """Records one entry per retired instruction; the register file reads them back.

    Attributes
    ----------
    start : In(1)
        A run starts: the trace empties and the cycle count restarts.
    busy : In(1)
        A run is in progress (the cycle count runs).
    fetched : In(1)
        An instruction's fetch begins this cycle, at index ``pc``.
    pc : In(16)
    retired : In(1)
        The instruction ends this cycle (retired, or the run stops on it).
    drained : In(1)
        A GEMM that handed over early, or a background softmax, finishes this cycle, at
        index ``pending_pc``, while an instruction waits for it.
    pending_pc : In(16)
    drained_opcode : In(8)
        Its opcode.
    opcode : In(8)
        The instruction's opcode (valid while it runs).
    port_read_bytes : In(ArrayLayout(32, MAX_TRACE_PORTS))
        Free-running byte counters of the master ports' reads.
    write_bytes : In(32)
        Free-running byte counter of the writes.
    index : In(range(TRACE_DEPTH))
        The entry the host reads (``TRACE_INDEX``).
    entry : Out(ArrayLayout(32, TRACE_WORDS))
        That entry, one cycle after ``index``.
    count : Out(32)
        Entries since ``start`` (held: the lesser of it and :data:`TRACE_DEPTH`).
    """

    def __init__(self):
        words = data.ArrayLayout(32, MAX_TRACE_PORTS)
        super().__init__({
            "start": In(1),
            "busy": In(1),
            "fetched": In(1),
            "pc": In(16),
            "retired": In(1),
            "drained": In(1),
            "pending_pc": In(16),
            "drained_opcode": In(8),
            "opcode": In(8),
            "port_read_bytes": In(words),
            "write_bytes": In(32),
            "index": In(range(TRACE_DEPTH)),
            "entry": Out(data.ArrayLayout(32, TRACE_WORDS)),
            "count": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        memory = m.submodules.memory = Memory(shape=32 * TRACE_WORDS, depth=TRACE_DEPTH,
                                              init=[])
        write, read = memory.write_port(), memory.read_port()
        m.d.comb += [read.addr.eq(self.index), self.entry.eq(read.data)]

        cycle = Signal(32)        # cycles since start
        span_start = Signal(32)
        pc = Signal(16)
        read_mark = Signal.like(self.port_read_bytes)   # the counters at the span's start
        write_mark = Signal(32)
        with m.If(self.start):
            m.d.sync += [cycle.eq(0), span_start.eq(0), self.count.eq(0),
                         read_mark.eq(self.port_read_bytes), write_mark.eq(self.write_bytes)]
        with m.Elif(self.busy):
            m.d.sync += cycle.eq(cycle + 1)
        with m.If(self.fetched):
            m.d.sync += pc.eq(self.pc)

        # Differences modulo 2^32, like the counters themselves.
        deltas = [(self.port_read_bytes[p] - read_mark[p])[:32]
                  for p in range(MAX_TRACE_PORTS)]
        # A drain and a retirement never coincide: the drain ends GEMM_DRAIN or BG_WAIT,
        # which retire nothing.
        event = self.retired | self.drained
        m.d.comb += [
            write.addr.eq(self.count[:ceil_log2(TRACE_DEPTH)]),
            write.data.eq(Cat(Mux(self.drained, self.pending_pc, pc),
                              Mux(self.drained, self.drained_opcode, self.opcode),
                              self.drained, Const(0, 7), span_start, cycle, *deltas,
                              (self.write_bytes - write_mark)[:32])),
            write.en.eq(event & ~self.start & (self.count < TRACE_DEPTH)),
        ]
        with m.If(event & ~self.start):
            m.d.sync += [self.count.eq(self.count + 1), span_start.eq(cycle),
                         read_mark.eq(self.port_read_bytes), write_mark.eq(self.write_bytes)]
        return m
