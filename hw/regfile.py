"""The AXI4-Lite register file: :data:`~m3vit.hw.registers.REGISTER_MAP` as hardware.

:class:`ControlRegisters` is the slave the host reaches (PYNQ's ``MMIO``, cocotbext-axi's
``AxiLiteMaster``); its bus rules and the run protocol are those of the register map
(:mod:`m3vit.hw.registers`, ``docs/registers.md``). It decodes addresses and places fields
from the map's declaration only, and meets the engine through one port of
:class:`~m3vit.hw.registers.EngineControlSignature`.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .axi import AxiResp
from .config import AccelConfig
from .registers import (
    AXIL_ADDR_WIDTH,
    AXIL_DATA_WIDTH,
    COUNTERS,
    REGISTER_MAP,
    TRACE_WORDS,
    Access,
    EngineControlSignature,
    ErrorCode,
    Register,
    RegisterError,
    constant_values,
    counter_layout,
)

__all__ = ["AxiLiteSignature", "ControlRegisters"]

_WORD_BYTES = AXIL_DATA_WIDTH // 8


class AxiLiteSignature(wiring.Signature):
    """An AXI4-Lite port, seen from the master (``In(AxiLiteSignature())`` is a slave).

    Without ``awprot``/``arprot``: the register file gives every access the same rights.

    Parameters
    ----------
    addr_width : int
        Byte-address width.
    data_width : int
        32 or 64 (AXI4-Lite's two data widths).
    """

    def __init__(self, addr_width: int = AXIL_ADDR_WIDTH, data_width: int = AXIL_DATA_WIDTH):
        if data_width not in (32, 64):
            raise ValueError(f"AXI4-Lite data width must be 32 or 64, got {data_width!r}")
        if not 1 <= addr_width <= 64:
            raise ValueError(f"addr_width must be in [1, 64], got {addr_width!r}")
        self.addr_width = addr_width
        self.data_width = data_width
        super().__init__({
            "awaddr": Out(addr_width), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wvalid": Out(1),
            "wready": In(1),
            "bresp": In(AxiResp), "bvalid": In(1), "bready": Out(1),
            "araddr": Out(addr_width), "arvalid": Out(1), "arready": In(1),
            "rdata": In(data_width), "rresp": In(AxiResp), "rvalid": In(1), "rready": Out(1),
        })

    def __eq__(self, other):
        return (isinstance(other, AxiLiteSignature) and other.addr_width == self.addr_width
                and other.data_width == self.data_width)

    def __hash__(self):
        return hash((AxiLiteSignature, self.addr_width, self.data_width))

    def __repr__(self):
        return f"AxiLiteSignature({self.addr_width}, {self.data_width})"


class ControlRegisters(wiring.Component):
    """The AXI4-Lite register file of :data:`REGISTER_MAP`, and its port to the engine.

    Parameters
    ----------
    config : AccelConfig
        The configuration whose constants (``CONFIG_HASH``, ``CAPS``, capacities) it reports.

    Attributes
    ----------
    s_axil : In(AxiLiteSignature())
        The host's port (Verilog ``s_axil__awaddr`` …); behaviour in
        :mod:`m3vit.hw.registers`.
    engine : In(EngineControlSignature())
        The engine's control port, flipped (Verilog ``engine__start`` …). Driven here:
        ``start`` and ``abort_request``, one-cycle pulses the cycle after the ``CONTROL``
        write that asks for them (``start`` only when the write finds ``busy`` low);
        ``program_base``, ``data_base``, ``data_size`` (the ``*_LO``/``*_HI`` pairs),
        ``task_select`` and ``schedule``. Read here: ``busy`` (``STATUS.BUSY``; ``CYCLES``
        counts while it is high), the ``done`` / ``error`` pulses, ``error_code`` and
        ``error_pc`` (latched on ``error``) and the engine's ``counters``.
    clear_counters : Out(1)
        One-cycle pulse on ``CONTROL.CLEAR_COUNTERS``, like ``start``.
    dma_counters : In(counter_layout("dma"))
        The DMA engines' free-running byte counters.

    The registers read every counter (the engine's and the DMA's) relative to a baseline
    taken at ``START`` / ``CLEAR_COUNTERS``, so their owners never need to clear them (and
    must not, or the difference is wrong).

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AccelConfig`.
    RegisterError
        If a constant of ``config`` does not fit its field.

    Notes
    -----
    A write takes effect on the cycle after both its address and data are held, together
    with ``bvalid``; a read answers the cycle after its address is taken. Every read is
    registered out of a multiplexer of registered values (the counters' differences are
    registered too), so the register file adds no long path to the 300 MHz target.
    """

    def __init__(self, config: AccelConfig):
        if not isinstance(config, AccelConfig):
            raise TypeError(f"expected an AccelConfig, got {config!r}")
        self.config = config
        self._constants = constant_values(config)
        super().__init__({
            "s_axil": In(AxiLiteSignature()),
            "engine": In(EngineControlSignature()),
            "clear_counters": Out(1),
            "dma_counters": In(counter_layout("dma")),
        })

    def elaborate(self, platform):
        m = Module()
        write, aw_word, strobe, written = self._write_channel(m)

        def writes(register: Register) -> Value:
            return write & (aw_word == register.offset // _WORD_BYTES)

        read_words, storage = self._storage(m, writes, strobe, written)
        start_now, zero_counters = self._commands(m, writes, written)
        self._status(m, start_now, read_words)
        cycles, cycles_hi = self._counters(m, zero_counters, read_words)
        read_words["TRACE_COUNT"] = self.engine.trace_count
        for index in range(TRACE_WORDS):
            read_words[f"TRACE_WORD{index}"] = self.engine.trace_entry[index]
        unimplemented = {register.name for register in REGISTER_MAP} - set(read_words)
        if unimplemented:
            raise RegisterError(f"registers declared but not implemented: {sorted(unimplemented)}")
        self._read_channel(m, read_words, cycles, cycles_hi)
        self._settings(m, storage)
        return m

    def _write_channel(self, m: Module) -> tuple[Signal, Signal, Value, Value]:
        """AW, W and B: ``(write, aw_word, strobe, written)`` of the write in progress."""
        bus = self.s_axil
        # Write: address and data are each held until both are there, so they may come in
        # either order; the next pair is taken while the response waits, not written.
        aw_full, w_full = Signal(name="aw_full"), Signal(name="w_full")
        aw_word = Signal(AXIL_ADDR_WIDTH - 2, name="aw_word")
        w_data = Signal(AXIL_DATA_WIDTH, name="w_data")
        w_strb = Signal(_WORD_BYTES, name="w_strb")
        bvalid = Signal(name="bvalid")
        write = Signal(name="write")
        m.d.comb += [
            bus.awready.eq(~aw_full),
            bus.wready.eq(~w_full),
            bus.bvalid.eq(bvalid),
            bus.bresp.eq(AxiResp.OKAY),
            write.eq(aw_full & w_full & ~bvalid),
        ]
        with m.If(bus.awvalid & ~aw_full):
            m.d.sync += [aw_full.eq(1), aw_word.eq(bus.awaddr[2:])]
        with m.If(bus.wvalid & ~w_full):
            m.d.sync += [w_full.eq(1), w_data.eq(bus.wdata), w_strb.eq(bus.wstrb)]
        with m.If(write):
            m.d.sync += [aw_full.eq(0), w_full.eq(0), bvalid.eq(1)]
        with m.Elif(bvalid & bus.bready):
            m.d.sync += bvalid.eq(0)
        strobe = Cat(*(w_strb[byte].replicate(8) for byte in range(_WORD_BYTES)))
        return write, aw_word, strobe, w_data & strobe

    def _storage(self, m: Module, writes, strobe: Value, written: Value):
        """The ``RW`` registers (frozen while busy) and the constants: ``(read_words,
        storage)``, each by register name."""
        read_words: dict[str, Value] = {}
        storage: dict[str, Signal] = {}
        for register in REGISTER_MAP:
            if register.access is Access.RW:
                reg = Signal(AXIL_DATA_WIDTH, init=register.reset, name=register.name.lower())
                with m.If(writes(register) & ~self.engine.busy):
                    m.d.sync += reg.eq(((reg & ~strobe) | written) & register.mask)
                storage[register.name] = read_words[register.name] = reg
            elif register.access is Access.W1P:
                read_words[register.name] = Const(0, AXIL_DATA_WIDTH)
            elif register.name in self._constants:
                read_words[register.name] = Const(self._constants[register.name],
                                                  AXIL_DATA_WIDTH)
        return read_words, storage

    def _commands(self, m: Module, writes, written: Value) -> tuple[Signal, Signal]:
        """The ``CONTROL`` pulses: ``(start_now, zero_counters)``, combinational."""
        control = REGISTER_MAP["CONTROL"]

        def pulse(name: str) -> Value:
            return writes(control) & written[control.field(name).lsb]

        start_now = Signal(name="start_now")
        zero_counters = Signal(name="zero_counters")
        m.d.comb += [
            start_now.eq(pulse("START") & ~self.engine.busy),
            zero_counters.eq(start_now | pulse("CLEAR_COUNTERS")),
        ]
        m.d.sync += [
            self.engine.start.eq(start_now),
            self.engine.abort_request.eq(pulse("ABORT")),
            self.clear_counters.eq(pulse("CLEAR_COUNTERS")),
        ]
        return start_now, zero_counters

    def _status(self, m: Module, start_now: Value, read_words: dict[str, Value]) -> None:
        """``STATUS``, ``ERROR_CODE`` and ``ERROR_PC``, set by the engine, cleared by START."""
        engine = self.engine
        # The set pulses come after the clear so that an event in the cycle of an accepted
        # START is kept.
        done, error = Signal(name="done"), Signal(name="error")
        error_code = Signal(ErrorCode, name="error_code_held")
        error_pc = Signal(32, name="error_pc_held")
        with m.If(start_now):
            m.d.sync += [done.eq(0), error.eq(0), error_code.eq(ErrorCode.NONE), error_pc.eq(0)]
        with m.If(engine.done):
            m.d.sync += done.eq(1)
        with m.If(engine.error):
            m.d.sync += [error.eq(1), error_code.eq(engine.error_code),
                         error_pc.eq(engine.error_pc)]

        def compose(name: str, **values: Value) -> Value:
            register = REGISTER_MAP[name]
            if set(values) != {field.name for field in register.fields}:
                raise RegisterError(f"{name}: the hardware drives {sorted(values)}, the map "
                                    f"declares {[f.name for f in register.fields]}")
            word = Signal(AXIL_DATA_WIDTH, name=f"{name.lower()}_word")
            for field in register.fields:
                m.d.comb += word[field.lsb:field.msb + 1].eq(values[field.name])
            return word

        read_words["STATUS"] = compose("STATUS", BUSY=engine.busy, DONE=done, ERROR=error)
        read_words["ERROR_CODE"] = compose("ERROR_CODE", CODE=error_code)
        read_words["ERROR_PC"] = compose("ERROR_PC", VALUE=error_pc)

    def _counters(self, m: Module, zero_counters: Value,
                  read_words: dict[str, Value]) -> tuple[Signal, Signal]:
        """``CYCLES`` and the owners' counters read from a baseline: ``(cycles, cycles_hi)``."""
        # CYCLES is 64-bit here; the others are differences from a baseline, which wrap
        # correctly modulo 2^32 however often the owner's counter has wrapped.
        cycles = Signal(64, name="cycles")
        # Latched by a read of CYCLES_LO, so the two halves read are one 64-bit value.
        cycles_hi = Signal(32, name="cycles_hi")
        with m.If(zero_counters):
            m.d.sync += cycles.eq(0)
        with m.Elif(self.engine.busy):
            m.d.sync += cycles.eq(cycles + 1)
        read_words["CYCLES_LO"] = cycles[:32]
        read_words["CYCLES_HI"] = cycles_hi
        owners = {"engine": self.engine.counters, "dma": self.dma_counters}
        for counter in COUNTERS:
            live = owners[counter.owner][counter.name.lower()]
            baseline = Signal(32, name=f"{counter.name.lower()}_baseline")
            value = Signal(32, name=f"{counter.name.lower()}_value")
            with m.If(zero_counters):
                m.d.sync += baseline.eq(live)
            m.d.sync += value.eq(live - baseline)
            read_words[counter.name] = value
        return cycles, cycles_hi

    def _read_channel(self, m: Module, read_words: dict[str, Value], cycles: Signal,
                      cycles_hi: Signal) -> None:
        """AR and R: the address is taken, then the data registered a cycle later."""
        bus = self.s_axil
        ar_full, rvalid = Signal(name="ar_full"), Signal(name="rvalid")
        ar_word = Signal(AXIL_ADDR_WIDTH - 2, name="ar_word")
        rdata = Signal(AXIL_DATA_WIDTH, name="rdata")
        m.d.comb += [
            bus.arready.eq(~ar_full & ~rvalid),
            bus.rvalid.eq(rvalid),
            bus.rdata.eq(rdata),
            bus.rresp.eq(AxiResp.OKAY),
        ]
        with m.If(bus.arvalid & bus.arready):
            m.d.sync += [ar_full.eq(1), ar_word.eq(bus.araddr[2:])]
        with m.If(ar_full):
            m.d.sync += [ar_full.eq(0), rvalid.eq(1)]
            with m.Switch(ar_word):
                for register in REGISTER_MAP:
                    with m.Case(register.offset // _WORD_BYTES):
                        m.d.sync += rdata.eq(read_words[register.name])
                with m.Default():
                    m.d.sync += rdata.eq(0)
            with m.If(ar_word == REGISTER_MAP["CYCLES_LO"].offset // _WORD_BYTES):
                m.d.sync += cycles_hi.eq(cycles[32:])
        with m.Elif(rvalid & bus.rready):
            m.d.sync += rvalid.eq(0)

    def _settings(self, m: Module, storage: dict[str, Signal]) -> None:
        """The run's settings to the engine, from the ``RW`` registers."""
        def pair(name: str) -> Value:
            return Cat(storage[f"{name}_LO"], storage[f"{name}_HI"])

        task = REGISTER_MAP["TASK_SELECT"].field("TASK")
        order = REGISTER_MAP["SCHEDULE"].field("ORDER")
        m.d.comb += [
            self.engine.program_base.eq(pair("PROGRAM_BASE")),
            self.engine.data_base.eq(pair("DATA_BASE")),
            self.engine.data_size.eq(pair("DATA_SIZE")),
            self.engine.task_select.eq(storage["TASK_SELECT"][task.lsb:task.msb + 1]),
            self.engine.schedule.eq(storage["SCHEDULE"][order.lsb:order.msb + 1]),
            self.engine.trace_index.eq(storage["TRACE_INDEX"]),
        ]
