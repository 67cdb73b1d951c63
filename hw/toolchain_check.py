"""A deliberately tiny block that proves the Amaranth -> Verilog -> Verilator -> cocotb flow.

It carries no part of the accelerator; it exists so that a fresh machine can show, in one
short test, that every tool in the simulation chain is installed and agrees on conventions
(stream handshakes, structured payloads, port naming, reset).
"""

from amaranth.hdl import Module, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ACCUMULATOR_SHAPE", "MAC_BEAT", "MacAccumulator"]

#: One input beat: an int8 × int8 product term, and whether it closes the current group.
MAC_BEAT = data.StructLayout({"a": signed(8), "b": signed(8), "last": 1})

#: The accumulator and the emitted sum wrap exactly like a C ``int32_t``.
ACCUMULATOR_SHAPE = signed(32)


class MacAccumulator(wiring.Component):
    """Multiply-accumulate over groups of int8 pairs, one sum per group.

    Every accepted beat adds ``a * b`` to a signed 32-bit accumulator, which wraps modulo
    2**32 like ``int32_t``. The beat that has ``last`` set closes the group: the sum
    including that beat is emitted on ``o_stream`` and the accumulator restarts from 0.

    Attributes
    ----------
    i_stream : In(stream.Signature(MAC_BEAT))
        Product terms. ``ready`` is low while a sum is waiting on ``o_stream`` and is not
        being accepted in the same cycle, so the input stalls under output back-pressure.
    o_stream : Out(stream.Signature(signed(32)))
        One sum per group, held stable until accepted.

    Notes
    -----
    Uses the default ``sync`` clock domain (ports ``clk`` and ``rst``, reset active high).
    ``i_stream.ready`` depends combinationally on ``o_stream.ready``, which the stream
    rules allow (ready may depend on ready; valid never depends on ready), and gives one
    group per cycle of throughput with no bubble after each sum.
    """

    i_stream: In(stream.Signature(MAC_BEAT))
    o_stream: Out(stream.Signature(ACCUMULATOR_SHAPE))

    def elaborate(self, platform):
        m = Module()

        accumulator = Signal(ACCUMULATOR_SHAPE)
        # Truncating the 33-bit sum into 32 bits is the int32 wrap-around.
        running_sum = Signal(ACCUMULATOR_SHAPE)
        m.d.comb += running_sum.eq(accumulator + self.i_stream.p.a * self.i_stream.p.b)

        m.d.comb += self.i_stream.ready.eq(~self.o_stream.valid | self.o_stream.ready)

        with m.If(self.o_stream.ready):
            m.d.sync += self.o_stream.valid.eq(0)

        with m.If(self.i_stream.valid & self.i_stream.ready):
            with m.If(self.i_stream.p.last):
                m.d.sync += [
                    self.o_stream.p.eq(running_sum),
                    self.o_stream.valid.eq(1),
                    accumulator.eq(0),
                ]
            with m.Else():
                m.d.sync += accumulator.eq(running_sum)

        return m
