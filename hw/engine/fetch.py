"""Instruction fetch: 256-bit instruction words through a small line cache.

A miss reads a whole *line* of :data:`LINE_INSTRUCTIONS` instructions through the read DMA
(one command, one DDR latency for eight instructions) into one of :data:`CACHE_LINES`
direct-mapped lines; a hit takes one cycle and no DDR access. Straight-line code so misses
once per line, and an ``EXPERTS`` loop body, run once per active expert, is read from DDR
once per layer. The cache is emptied at every start: the host may have loaded another
program.
"""

from amaranth.hdl import Array, Cat, Const, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from ..axi import byte_beat_layout, dma_cmd_layout
from ..config import AccelConfig
from ..isa import INSTRUCTION, INSTRUCTION_BITS, INSTRUCTION_BYTES

__all__ = ["CACHE_LINES", "LINE_INSTRUCTIONS", "InstructionFetch", "fetch_control"]

#: Instructions a cache line holds (256 bytes: sixteen 128-bit beats).
LINE_INSTRUCTIONS = 8
#: Lines of the direct-mapped instruction cache (32 instructions, 1 KiB).
CACHE_LINES = 4


def fetch_control() -> wiring.Signature:
    """The controller's side of the fetch.

    Returns
    -------
    wiring.Signature
        Its members (flows seen from the controller):

        pc : Out(32)
            Index of the instruction to fetch.
        request : Out(1)
            Fetch instruction ``pc`` (state ``FETCH``).
        issued : In(1)
            The fetch has begun this cycle: a hit, or the read DMA takes a line's command.
        collect : Out(1)
            Take the line's beats (state ``FETCH_DATA``).
        done : In(1)
            The instruction is fetched this cycle (a miss: the line's last beat is taken);
            :attr:`InstructionFetch.instruction` holds it from the next cycle on.
        flush : Out(1)
            Empty the cache (a run starts).
    """
    return wiring.Signature({
        "pc": Out(32),
        "request": Out(1),
        "issued": In(1),
        "collect": Out(1),
        "done": In(1),
        "flush": Out(1),
    })


class InstructionFetch(wiring.Component):
    """Reads instruction ``pc`` of the program and holds it for the checks and the controller.

    Parameters
    ----------
    config : AccelConfig
        ``axi_bytes``: an instruction is ``INSTRUCTION_BYTES / axi_bytes`` beats (the top
        checks that a beat is at most one instruction).

    Attributes
    ----------
    control : In(fetch_control())
        The controller's requests.
    program_base : In(64)
        DDR byte address of instruction 0 (``PROGRAM_BASE``).
    cmd : Out(stream.Signature(dma_cmd_layout(config)))
        A line's read command: ``program_base + line · LINE_INSTRUCTIONS ·
        INSTRUCTION_BYTES``, a whole line.
    beats : In(stream.Signature(byte_beat_layout(axi_bytes)))
        The line's beats, first beat = low bits (little-endian, as in DDR).
    instruction : Out(INSTRUCTION)
        The last instruction fetched.

    Notes
    -----
    A line may reach past the program's end (the runtime places the data image right
    after the program, so those bytes exist); they are cached and never executed unless
    the program runs off its end, which ``END`` prevents.
    """

    def __init__(self, config: AccelConfig):
        if config.axi_bytes > INSTRUCTION_BYTES:
            raise ValueError(f"an AXI beat of {config.axi_bytes} bytes holds more than one "
                             f"instruction ({INSTRUCTION_BYTES} bytes)")
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
        L, N = LINE_INSTRUCTIONS, CACHE_LINES
        per_instruction = INSTRUCTION_BYTES // cfg.axi_bytes  # beats an instruction
        line_beats = L * per_instruction
        word_shift, line_shift = exact_log2(L), exact_log2(N)

        cache = m.submodules.cache = Memory(shape=INSTRUCTION_BITS, depth=L * N, init=[])
        read, write = cache.read_port(), cache.write_port()
        slot_of = ctl.pc[word_shift:word_shift + line_shift]   # the line's place
        tag_of = ctl.pc[word_shift + line_shift:]
        tags = Array(Signal(len(tag_of), name=f"tag{k}") for k in range(N))
        valid = Signal(N)
        hit = Signal()
        m.d.comb += hit.eq(valid.bit_select(slot_of, 1) & (tags[slot_of] == tag_of))

        word = Signal(INSTRUCTION)
        reading = Signal()     # a hit's word comes out of the cache this cycle
        filling = Signal()     # a miss's line is coming in
        m.d.comb += [
            read.addr.eq(Cat(ctl.pc[:word_shift], slot_of)),
            self.instruction.eq(word),
            self.cmd.payload.addr.eq(self.program_base
                                     + Cat(Const(0, exact_log2(L * INSTRUCTION_BYTES)),
                                           ctl.pc[word_shift:])),
            self.cmd.payload.beats.eq(line_beats),
        ]
        with m.If(ctl.flush):
            m.d.sync += valid.eq(0)

        with m.If(ctl.request & hit):
            m.d.comb += ctl.issued.eq(1)
            m.d.sync += reading.eq(1)
        with m.Elif(ctl.request):
            m.d.comb += [self.cmd.valid.eq(1), ctl.issued.eq(self.cmd.ready)]
            with m.If(self.cmd.ready):
                m.d.sync += filling.eq(1)
        with m.If(reading):
            m.d.comb += ctl.done.eq(1)
            m.d.sync += [word.eq(read.data), reading.eq(0)]

        # A miss: the line's beats into the cache, the wanted instruction into `word`.
        beat_index = Signal(range(line_beats))
        assembled = Signal(INSTRUCTION_BYTES * 8)
        if per_instruction == 1:
            complete = Const(1)
            m.d.comb += assembled.eq(self.beats.payload.data)
        else:
            width = cfg.axi_data_width
            pieces = Signal(width * (per_instruction - 1))
            complete = beat_index[:exact_log2(per_instruction)] == per_instruction - 1
            m.d.comb += assembled.eq(Cat(pieces, self.beats.payload.data))
        m.d.comb += self.beats.ready.eq(ctl.collect & filling)
        taken = self.beats.valid & self.beats.ready
        index = beat_index[exact_log2(per_instruction):]   # the instruction within the line
        m.d.comb += [write.addr.eq(Cat(index, slot_of)), write.data.eq(assembled),
                     write.en.eq(taken & complete)]
        with m.If(taken):
            m.d.sync += beat_index.eq(beat_index + 1)
            if per_instruction > 1:
                m.d.sync += pieces.eq(Cat(pieces[cfg.axi_data_width:],
                                          self.beats.payload.data))
            with m.If(complete & (index == ctl.pc[:word_shift])):
                m.d.sync += word.eq(assembled)
            with m.If(beat_index == line_beats - 1):
                m.d.comb += ctl.done.eq(1)
                m.d.sync += [filling.eq(0), tags[slot_of].eq(tag_of),
                             valid.bit_select(slot_of, 1).eq(1)]
        return m
