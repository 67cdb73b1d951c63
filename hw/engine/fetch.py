"""Instruction fetch: one 256-bit instruction word through the read DMA."""

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..axi import byte_beat_layout, dma_cmd_layout
from ..config import AccelConfig
from ..isa import INSTRUCTION, INSTRUCTION_BYTES

__all__ = ["InstructionFetch", "fetch_control"]


def fetch_control() -> wiring.Signature:
    """The controller's side of the fetch.

    Returns
    -------
    wiring.Signature
        Its members (flows seen from the controller):

        pc : Out(32)
            Index of the instruction to fetch.
        request : Out(1)
            Offer the read command for instruction ``pc`` (state ``FETCH``).
        issued : In(1)
            The read DMA takes the command this cycle.
        collect : Out(1)
            Take the instruction's beats (state ``FETCH_DATA``).
        done : In(1)
            The instruction's last beat is taken this cycle; :attr:`InstructionFetch.instruction`
            holds it from the next cycle on.
    """
    return wiring.Signature({
        "pc": Out(32),
        "request": Out(1),
        "issued": In(1),
        "collect": Out(1),
        "done": In(1),
    })


class InstructionFetch(wiring.Component):
    """Reads instruction ``pc`` of the program and holds it for the checks and the controller.

    Parameters
    ----------
    config : AccelConfig
        ``axi_bytes``: an instruction is ``INSTRUCTION_BYTES / axi_bytes`` beats (at least 1).

    Attributes
    ----------
    control : In(fetch_control())
        The controller's requests.
    program_base : In(64)
        DDR byte address of instruction 0 (``PROGRAM_BASE``).
    cmd : Out(stream.Signature(dma_cmd_layout(config)))
        The read command: ``program_base + pc · INSTRUCTION_BYTES``, one instruction.
    beats : In(stream.Signature(byte_beat_layout(axi_bytes)))
        The instruction's beats, first beat = low bits (little-endian, as in DDR).
    instruction : Out(INSTRUCTION)
        The last instruction fetched.
    """

    def __init__(self, config: AccelConfig):
        self.config = config
        super().__init__({
            "control": In(fetch_control()),
            "program_base": In(64),
            "cmd": Out(stream.Signature(dma_cmd_layout(config))),
            "beats": In(stream.Signature(byte_beat_layout(config.axi_bytes))),
            "instruction": Out(INSTRUCTION),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        ctl = self.control
        axi_bytes = cfg.axi_bytes
        fetch_beats = INSTRUCTION_BYTES // axi_bytes if axi_bytes <= INSTRUCTION_BYTES else 1
        fetch_count = Signal(range(fetch_beats + 1))
        word = Signal(INSTRUCTION)
        m.d.comb += [
            self.cmd.valid.eq(ctl.request),
            self.cmd.payload.addr.eq(self.program_base + ctl.pc * INSTRUCTION_BYTES),
            self.cmd.payload.beats.eq(max(1, INSTRUCTION_BYTES // axi_bytes)),
            ctl.issued.eq(self.cmd.valid & self.cmd.ready),
            self.beats.ready.eq(ctl.collect),
            self.instruction.eq(word),
        ]
        with m.If(ctl.issued):
            m.d.sync += fetch_count.eq(0)
        with m.If(self.beats.valid & self.beats.ready):
            # Little-endian: the first beat is the low bits; shift in from the top.
            if axi_bytes >= INSTRUCTION_BYTES:
                m.d.sync += word.eq(self.beats.payload.data[:INSTRUCTION_BYTES * 8])
            else:
                m.d.sync += word.eq(Cat(word.as_value()[cfg.axi_data_width:],
                                        self.beats.payload.data))
            m.d.sync += fetch_count.eq(fetch_count + 1)
            m.d.comb += ctl.done.eq(fetch_count == fetch_beats - 1)
        return m
