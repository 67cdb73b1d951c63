"""The control register file: one declaration of the register map, its AXI4-Lite slave, its docs.

The host reaches the accelerator through one AXI4-Lite slave of 32-bit registers (PYNQ's
``MMIO`` on the board, cocotbext-axi's ``AxiLiteMaster`` in simulation). :data:`REGISTER_MAP`
declares every register once (name, byte offset, access, fields, reset) as plain Python
data: :class:`ControlRegisters` decodes addresses and places fields from it, the host
runtime takes offsets from it and packs and unpacks fields with :meth:`Register.encode` and
:meth:`Register.decode`, and ``docs/registers.md`` is generated from it by
``python -m m3vit.hw.registers``.

Bus rules:

* 32-bit data, 12-bit byte address (a 4 KiB window); address bits 1:0 are ignored, so a
  byte or half-word access reaches the word that holds it. ``wstrb`` selects the bytes a
  write changes.
* Every access is answered ``OKAY``. A read of an unmapped offset returns 0; a write to an
  unmapped offset or to a read-only register changes nothing. (``SLVERR`` would turn a stray
  access from the Zynq MPSoC's HPM port into a CPU external abort, i.e. a crashed process,
  for no gain: the host checks the map against ``ID``/``VERSION`` before it writes.)
* Write address and write data may arrive in either order or together. Reads and writes
  proceed independently, one of each at a time: the next write's address and data may be
  taken while a write response waits, but that write happens only after the response.
* Bits not covered by a field read 0 and ignore writes.

Run protocol: the host writes ``PROGRAM_BASE``, ``DATA_BASE``, ``DATA_SIZE``, ``TASK_SELECT``
and ``SCHEDULE``, then ``CONTROL.START``, and polls ``STATUS`` until ``DONE`` or ``ERROR``.
While ``STATUS.BUSY`` is high the read-write registers are frozen (writes are ignored, so a
run always sees the values it started with) and ``START`` is ignored. An accepted ``START``
clears ``DONE``, ``ERROR``, ``ERROR_CODE`` and ``ERROR_PC`` and zeroes the performance
counters, which then describe that run (a run that ends in the same cycle as a ``START`` is
accepted keeps its ``DONE``/``ERROR``: events are never lost). ``CONTROL.ABORT`` asks the
controller to stop after the current instruction; the run then ends with ``ABORTED``.

Performance counters are 32-bit and wrap (``CYCLES`` is 64-bit: read ``CYCLES_LO`` first,
which latches the upper half that ``CYCLES_HI`` then returns). ``CYCLES`` counts the cycles
``STATUS.BUSY`` was high; every other counter is a free-running 32-bit counter owned by the
block it describes, reported relative to its value at the last ``START`` or
``CONTROL.CLEAR_COUNTERS``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from amaranth.hdl import Cat, Const, Module, Shape, Signal, Value
from amaranth.lib import data, enum, wiring
from amaranth.lib.wiring import In, Out

from .config import ZCU104, AccelConfig
from .errors import M3VitError

__all__ = [
    "AXIL_ADDR_WIDTH",
    "AXIL_DATA_WIDTH",
    "COUNTERS",
    "ERROR_MESSAGES",
    "ID_MAGIC",
    "REGISTER_MAP",
    "SCHEDULE_MEANINGS",
    "VERSION",
    "Access",
    "AxiLiteSignature",
    "AxiResp",
    "ControlRegisters",
    "Counter",
    "ErrorCode",
    "Field",
    "Register",
    "RegisterError",
    "RegisterMap",
    "Schedule",
    "constant_values",
    "counter_layout",
    "registers_markdown",
]

#: Byte-address width of the AXI4-Lite slave: a 4 KiB window, the smallest segment Vivado's
#: address editor assigns on the Zynq MPSoC's HPM ports.
AXIL_ADDR_WIDTH = 12
AXIL_DATA_WIDTH = 32
_WORD_BYTES = AXIL_DATA_WIDTH // 8

#: ``ID`` register: "M3VT" in ASCII, so a misplaced base address is noticed at once.
ID_MAGIC = 0x4D335654
#: Register map version (major, minor): a new major breaks hosts, a new minor only adds.
VERSION = (1, 0)


class RegisterError(M3VitError, ValueError):
    """A register map that is inconsistent, or a field value that does not fit."""


class Access(enum.Enum):
    """How the host may use a register."""

    #: read-only: constants and status; writes are ignored
    RO = "RO"
    #: read-write storage
    RW = "RW"
    #: write 1 to a field to pulse it for one cycle; reads 0
    W1P = "W1P"


_ACCESS_MEANINGS = {
    Access.RO: "read-only; writes are ignored",
    Access.RW: "read-write; writes are ignored while `STATUS.BUSY`",
    Access.W1P: "write 1 to a bit to pulse it for one cycle; reads 0",
}


class ErrorCode(enum.Enum, shape=8):
    """Why a run ended with ``STATUS.ERROR`` (``ERROR_CODE.CODE``)."""

    NONE = 0
    ILLEGAL_OPCODE = 1
    SHAPE_OVER_CAPACITY = 2
    ADDRESS_OUT_OF_RANGE = 3
    AXI_RESPONSE = 4
    ABORTED = 5
    BAD_TASK = 6


#: One line per :class:`ErrorCode`, for the docs and for the runtime's error messages.
ERROR_MESSAGES: Mapping[ErrorCode, str] = {
    ErrorCode.NONE: "no error (the last run, if any, ended normally)",
    ErrorCode.ILLEGAL_OPCODE: "an instruction's opcode or mode is not in the instruction set",
    ErrorCode.SHAPE_OVER_CAPACITY: "an instruction's geometry is zero or exceeds the "
                                   "configuration's capacities",
    ErrorCode.ADDRESS_OUT_OF_RANGE: "a DDR offset + length beyond `DATA_SIZE`, or a buffer "
                                    "range beyond the activation buffer",
    ErrorCode.AXI_RESPONSE: "a DDR access was answered SLVERR or DECERR",
    ErrorCode.ABORTED: "the host wrote `CONTROL.ABORT`",
    ErrorCode.BAD_TASK: "`TASK_SELECT` ≥ the number of tasks in the program",
}


class Schedule(enum.Enum, shape=1):
    """Order in which the controller runs a MoE layer's expert work (``SCHEDULE.ORDER``)."""

    EXPERT_BY_EXPERT = 0
    TOKEN_BY_TOKEN = 1


SCHEDULE_MEANINGS: Mapping[Schedule, str] = {
    Schedule.EXPERT_BY_EXPERT: "tokens regrouped per expert: each expert's weights are "
                               "loaded once per layer",
    Schedule.TOKEN_BY_TOKEN: "the baseline: each token runs through its top-k experts in turn",
}

_ENUM_MEANINGS: Mapping[type, Mapping] = {ErrorCode: ERROR_MESSAGES, Schedule: SCHEDULE_MEANINGS}


class AxiResp(enum.Enum, shape=2):
    """AXI ``BRESP``/``RRESP`` encoding."""

    OKAY = 0
    EXOKAY = 1
    SLVERR = 2
    DECERR = 3


@dataclass(frozen=True)
class Field:
    """A run of bits within a register.

    Parameters
    ----------
    name : str
        Upper-case identifier, unique within its register.
    lsb : int
        Position of the least significant bit.
    width : int
        Number of bits.
    description : str
        One line for the docs (Markdown).
    enum : type, optional
        An :class:`amaranth.lib.enum.Enum` whose members the field holds; :meth:`decode`
        then returns members (or the raw integer for a value no member has).
    """

    name: str
    lsb: int
    width: int
    description: str
    enum: type | None = None

    def __post_init__(self) -> None:
        if not (self.name.isidentifier() and self.name.isupper()):
            raise RegisterError(f"field name must be an upper-case identifier, got {self.name!r}")
        if self.width < 1 or self.lsb < 0 or self.lsb + self.width > AXIL_DATA_WIDTH:
            raise RegisterError(f"field {self.name} must lie within bits 0..31, got lsb="
                                f"{self.lsb!r} width={self.width!r}")
        if self.enum is not None and Shape.cast(self.enum).width > self.width:
            raise RegisterError(f"field {self.name} ({self.width} bits) is narrower than "
                                f"{self.enum.__name__}")

    @property
    def msb(self) -> int:
        """Position of the most significant bit."""
        return self.lsb + self.width - 1

    @property
    def mask(self) -> int:
        """The field's bits within the 32-bit word."""
        return ((1 << self.width) - 1) << self.lsb

    def encode(self, value: int | enum.Enum) -> int:
        """``value`` placed at the field's position.

        Raises
        ------
        RegisterError
            If ``value`` is negative or does not fit in ``width`` bits.
        """
        raw = value.value if isinstance(value, enum.Enum) else int(value)
        if not 0 <= raw < 1 << self.width:
            raise RegisterError(f"{self.name} is {self.width} bits wide, got {value!r}")
        return raw << self.lsb

    def decode(self, word: int) -> int | enum.Enum:
        """The field's value in the 32-bit ``word`` (an enum member where one matches)."""
        raw = (word >> self.lsb) & ((1 << self.width) - 1)
        if self.enum is not None:
            try:
                return self.enum(raw)
            except ValueError:
                return raw
        return raw


@dataclass(frozen=True)
class Register:
    """One 32-bit register of the map.

    Parameters
    ----------
    name : str
        Upper-case identifier, unique within the map.
    offset : int
        Byte offset from the slave's base address; a multiple of 4.
    access : Access
        How the host may use it.
    group : str
        Section of the map it belongs to (a key of the docs' group list).
    description : str
        What it holds (Markdown, one paragraph).
    fields : tuple of Field
        Non-overlapping fields; bits outside them read 0.
    reset : int, optional
        Value after reset (``RW`` registers; status registers reset to 0).
    """

    name: str
    offset: int
    access: Access
    group: str
    description: str
    fields: tuple[Field, ...]
    reset: int = 0

    def __post_init__(self) -> None:
        if not (self.name.isidentifier() and self.name.isupper()):
            raise RegisterError(f"register name must be an upper-case identifier, got "
                                f"{self.name!r}")
        if self.offset % _WORD_BYTES or not 0 <= self.offset < 1 << AXIL_ADDR_WIDTH:
            raise RegisterError(f"{self.name}: offset must be a multiple of 4 below "
                                f"{1 << AXIL_ADDR_WIDTH:#x}, got {self.offset:#x}")
        if not self.fields:
            raise RegisterError(f"{self.name}: a register needs at least one field")
        seen_bits, seen_names = 0, set()
        for field in self.fields:
            if field.name in seen_names:
                raise RegisterError(f"{self.name}: field {field.name} declared twice")
            if field.mask & seen_bits:
                raise RegisterError(f"{self.name}: field {field.name} overlaps another field")
            seen_names.add(field.name)
            seen_bits |= field.mask
        if self.reset & ~seen_bits:
            raise RegisterError(f"{self.name}: reset {self.reset:#x} sets bits outside the "
                                f"fields ({seen_bits:#010x})")

    @property
    def mask(self) -> int:
        """The implemented bits (the union of the fields)."""
        mask = 0
        for field in self.fields:
            mask |= field.mask
        return mask

    def field(self, name: str) -> Field:
        """The field called ``name``.

        Raises
        ------
        RegisterError
            If the register has no such field.
        """
        for field in self.fields:
            if field.name == name:
                return field
        raise RegisterError(f"{self.name} has no field {name!r}; fields: "
                            f"{', '.join(f.name for f in self.fields)}")

    def encode(self, **values: int | enum.Enum) -> int:
        """The 32-bit word holding the given field values (fields not named are 0).

        >>> REGISTER_MAP["CONTROL"].encode(START=1)
        1
        """
        word = 0
        for name, value in values.items():
            word |= self.field(name).encode(value)
        return word

    def decode(self, word: int) -> dict[str, int | enum.Enum]:
        """Every field's value in the 32-bit ``word``, by field name.

        Raises
        ------
        RegisterError
            If ``word`` is not a 32-bit unsigned value.
        """
        if not 0 <= word < 1 << AXIL_DATA_WIDTH:
            raise RegisterError(f"{self.name}: a register word is 32-bit unsigned, got {word!r}")
        return {field.name: field.decode(word) for field in self.fields}


class RegisterMap:
    """The registers of the slave, looked up by name or offset.

    Parameters
    ----------
    registers : iterable of Register
        In offset order; names and offsets must be unique.

    Raises
    ------
    RegisterError
        If a name or offset is used twice or the registers are not in offset order.
    """

    def __init__(self, registers) -> None:
        self._registers = tuple(registers)
        self._by_name: dict[str, Register] = {}
        self._by_offset: dict[int, Register] = {}
        for register in self._registers:
            if register.name in self._by_name:
                raise RegisterError(f"register name {register.name} used twice")
            if register.offset in self._by_offset:
                raise RegisterError(f"{register.name} and {self._by_offset[register.offset].name}"
                                    f" share offset {register.offset:#x}")
            self._by_name[register.name] = register
            self._by_offset[register.offset] = register
        offsets = [register.offset for register in self._registers]
        if offsets != sorted(offsets):
            raise RegisterError("registers must be declared in offset order")

    def __getitem__(self, name: str) -> Register:
        try:
            return self._by_name[name]
        except KeyError:
            raise RegisterError(f"no register named {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Register]:
        return iter(self._registers)

    def __len__(self) -> int:
        return len(self._registers)

    @property
    def offsets(self) -> dict[str, int]:
        """Byte offset of every register, by name (what a host driver needs)."""
        return {register.name: register.offset for register in self._registers}

    def at(self, offset: int) -> Register | None:
        """The register at byte ``offset`` (address bits 1:0 ignored), or ``None``."""
        return self._by_offset.get(offset & ~(_WORD_BYTES - 1))


@dataclass(frozen=True)
class Counter:
    """A 32-bit performance counter owned by another block.

    Parameters
    ----------
    name : str
        Register name (upper case); the ``counters`` input member is its lower-case form.
    description : str
        What it counts (Markdown).
    """

    name: str
    description: str


#: The counters besides ``CYCLES``, in register order from ``0x88``. Adding a counter is one
#: line here: its register, its ``counters`` input and its docs follow.
COUNTERS: tuple[Counter, ...] = (
    Counter("GEMM_BUSY", "cycles the GEMM engine was busy"),
    Counter("VECTOR_BUSY", "cycles any vector-unit block was busy"),
    Counter("DMA_READ_BYTES", "bytes read from DDR (instructions, weights, activations)"),
    Counter("DMA_WRITE_BYTES", "bytes written to DDR"),
    Counter("WEIGHT_STALL", "cycles the GEMM engine waited for weights"),
    Counter("INSTRUCTIONS", "instructions retired"),
)

#: Docs sections: (group key, title, first offset, text).
_GROUPS = (
    ("ident", "Identification", 0x00,
     "Constants of the bitstream. The runtime checks `ID` and `VERSION` before anything else, "
     "and refuses a package compiled for another `CONFIG_HASH`."),
    ("control", "Control and status", 0x20, "Starting, stopping and observing a run."),
    ("capacity", "Capacities", 0x40,
     "Constants: the largest model dimensions the configuration holds, so the host can "
     "check a package against the hardware with a readable message."),
    ("address", "DDR addresses", 0x60,
     "64-bit byte addresses, low word first. A register pair is two independent registers: "
     "write both before `START`."),
    ("counter", "Performance counters", 0x80,
     "Read-only, zeroed by an accepted `START` and by `CONTROL.CLEAR_COUNTERS`."),
)
_COUNTER_BASE = 0x88


def _word(description: str) -> tuple[Field, ...]:
    return (Field("VALUE", 0, 32, description),)


def _declare() -> tuple[Register, ...]:
    ro, rw, w1p = Access.RO, Access.RW, Access.W1P
    registers = [
        Register("ID", 0x00, ro, "ident", "Identifies the accelerator.",
                 _word(f"`{ID_MAGIC:#010x}` (\"M3VT\")")),
        Register("VERSION", 0x04, ro, "ident", "Version of this register map.", (
            Field("MINOR", 0, 16, "minor version: additions only"),
            Field("MAJOR", 16, 16, "major version: incompatible changes"),
        )),
        Register("CONFIG_HASH", 0x08, ro, "ident",
                 "Identifies the configuration the bitstream was generated from.",
                 _word("`AccelConfig.config_hash()`")),
        Register("CAPS", 0x0C, ro, "ident", "Shape of the PE array and of the AXI masters.", (
            Field("PE_ROWS_LOG2", 0, 4, "log2 `pe_rows` (reduction width of the PE array)"),
            Field("PE_COLS_LOG2", 4, 4, "log2 `pe_cols` (output width; vector lanes)"),
            Field("AXI_BYTES_LOG2", 8, 4, "log2 of the AXI master data width in bytes"),
            Field("N_MASTER_PORTS", 12, 4, "AXI4 master ports"),
            Field("MAX_BURST_BEATS_LOG2", 16, 4, "log2 of the longest burst issued"),
            Field("AXI_ADDR_WIDTH", 20, 7, "address width of the AXI masters in bits"),
        )),
        Register("CLOCK_KHZ", 0x10, ro, "ident",
                 "Clock the bitstream was built for, to turn cycle counts into time.",
                 _word("`clock_mhz` × 1000, rounded")),
        Register("CONTROL", 0x20, w1p, "control", "Commands.", (
            Field("START", 0, 1, "start a run (ignored while `STATUS.BUSY`)"),
            Field("ABORT", 1, 1, "ask the controller to stop after the current instruction; "
                                 "the run ends with `ERROR_CODE` = `ABORTED`"),
            Field("CLEAR_COUNTERS", 2, 1, "zero the performance counters"),
        )),
        Register("STATUS", 0x24, ro, "control", "State of the last run.", (
            Field("BUSY", 0, 1, "a run is in progress"),
            Field("DONE", 1, 1, "the last run ended normally (cleared by `START`)"),
            Field("ERROR", 2, 1, "the last run ended with an error (cleared by `START`)"),
        )),
        Register("ERROR_CODE", 0x28, ro, "control", "Why the last run stopped with `ERROR`.",
                 (Field("CODE", 0, 8, "`ErrorCode` (below); `NONE` after `START`",
                        enum=ErrorCode),)),
        Register("ERROR_PC", 0x2C, ro, "control", "Where the last run stopped with `ERROR`.",
                 _word("index of the failing instruction (0 = the first)")),
        Register("TASK_SELECT", 0x30, rw, "control", "Which task's head (and per-task data) "
                 "the program runs.", (Field("TASK", 0, 8, "task index; ≥ the program's "
                                                           "task count stops with `BAD_TASK`"),)),
        Register("SCHEDULE", 0x34, rw, "control", "How MoE layers are scheduled.",
                 (Field("ORDER", 0, 1, "`Schedule` (below)", enum=Schedule),)),
    ]
    capacities = (("MAX_TOKENS", "tokens per image held on chip"),
                  ("MAX_DIM", "largest embedding width D"),
                  ("MAX_HIDDEN", "largest MLP / expert hidden width"),
                  ("MAX_HEADS", "largest number of attention heads"),
                  ("MAX_EXPERTS", "largest number of experts per MoE layer"),
                  ("MAX_TOP_K", "largest top-k"))
    for index, (name, text) in enumerate(capacities):
        registers.append(Register(name, 0x40 + 4 * index, ro, "capacity",
                                  f"`{name.lower()}`: {text}.", _word(name.lower())))
    addresses = (("PROGRAM_BASE", "DDR byte address of the program's first instruction"),
                 ("DATA_BASE", "DDR byte address every DDR offset in the program is added to"),
                 ("DATA_SIZE", "Bytes from `DATA_BASE` the program may touch: an access "
                               "reaching beyond stops the run with `ADDRESS_OUT_OF_RANGE`"))
    for index, (name, text) in enumerate(addresses):
        for half, (suffix, bits) in enumerate((("LO", "31:0"), ("HI", "63:32"))):
            registers.append(Register(f"{name}_{suffix}", 0x60 + 8 * index + 4 * half, rw,
                                      "address", f"{text} (bits {bits}).",
                                      _word(f"{name} bits {bits}")))
    registers += [
        Register("CYCLES_LO", 0x80, ro, "counter", "Cycles with `STATUS.BUSY` high, bits 31:0. "
                 "Reading it latches bits 63:32 for `CYCLES_HI`.", _word("CYCLES bits 31:0")),
        Register("CYCLES_HI", 0x84, ro, "counter", "Bits 63:32 of `CYCLES` as latched by the "
                 "last read of `CYCLES_LO`.", _word("CYCLES bits 63:32")),
    ]
    for index, counter in enumerate(COUNTERS):
        registers.append(Register(counter.name, _COUNTER_BASE + 4 * index, ro, "counter",
                                  f"{counter.description[0].upper()}{counter.description[1:]}.",
                                  _word("32-bit, wrapping")))
    return tuple(registers)


#: The register map: the one declaration the hardware, the host and the docs read.
REGISTER_MAP = RegisterMap(_declare())


def _log2(value: int) -> int:
    return value.bit_length() - 1


def constant_values(config: AccelConfig) -> dict[str, int]:
    """The value of every constant register for ``config``, by register name.

    What :class:`ControlRegisters` returns for them, and what the host expects to read from
    a bitstream built for ``config``.

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AccelConfig`.
    RegisterError
        If a value does not fit its field (the message names the field).
    """
    if not isinstance(config, AccelConfig):
        raise TypeError(f"expected an AccelConfig, got {config!r}")
    major, minor = VERSION
    values = {
        "ID": ID_MAGIC,
        "VERSION": REGISTER_MAP["VERSION"].encode(MAJOR=major, MINOR=minor),
        "CONFIG_HASH": config.config_hash(),
        "CAPS": REGISTER_MAP["CAPS"].encode(
            PE_ROWS_LOG2=_log2(config.pe_rows),
            PE_COLS_LOG2=_log2(config.pe_cols),
            AXI_BYTES_LOG2=_log2(config.axi_bytes),
            N_MASTER_PORTS=config.n_master_ports,
            MAX_BURST_BEATS_LOG2=_log2(config.max_burst_beats),
            AXI_ADDR_WIDTH=config.axi_addr_width,
        ),
        "CLOCK_KHZ": round(config.clock_mhz * 1000),
    }
    for register in REGISTER_MAP:
        if register.group == "capacity":
            values[register.name] = getattr(config, register.name.lower())
    for name, value in values.items():
        if not 0 <= value <= REGISTER_MAP[name].mask:
            raise RegisterError(f"{name} = {value!r} does not fit its 32-bit register")
    return values


def counter_layout() -> data.StructLayout:
    """Layout of :class:`ControlRegisters`' ``counters`` input: 32 bits per :data:`COUNTERS`
    entry, named by its lower-case name (``counters.gemm_busy``)."""
    return data.StructLayout({counter.name.lower(): 32 for counter in COUNTERS})


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
    """The AXI4-Lite register file of :data:`REGISTER_MAP`, and its wires to the controller.

    Parameters
    ----------
    config : AccelConfig
        The configuration whose constants (``CONFIG_HASH``, ``CAPS``, capacities) it reports.

    Attributes
    ----------
    s_axil : In(AxiLiteSignature())
        The host's port (Verilog ``s_axil__awaddr`` …); behaviour in the module docstring.
    start, abort_request, clear_counters : Out(1)
        One-cycle pulses (``CONTROL.START``, ``ABORT``, ``CLEAR_COUNTERS``), the cycle after
        the write that asks for them; ``start`` only when the write finds ``busy`` low.
        (``abort_request``, not ``abort``: Verilator warns about ports named like C
        library functions.)
    program_base, data_base, data_size : Out(64)
        The ``*_LO``/``*_HI`` register pairs.
    task_select : Out(8)
        ``TASK_SELECT.TASK``.
    schedule : Out(Schedule)
        ``SCHEDULE.ORDER``.
    busy : In(1)
        A run is in progress (``STATUS.BUSY``; ``CYCLES`` counts while it is high).
    done_set, error_set : In(1)
        One-cycle pulses: the run ended normally / with ``error_code`` at ``error_pc``.
    error_code : In(ErrorCode)
        Latched into ``ERROR_CODE`` on ``error_set``.
    error_pc : In(32)
        Latched into ``ERROR_PC`` on ``error_set``.
    counters : In(counter_layout())
        The free-running 32-bit counter of every :data:`COUNTERS` entry; the registers read
        them relative to a baseline taken at ``START`` / ``CLEAR_COUNTERS``, so their owners
        never need to clear them (and must not, or the difference is wrong).

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
        task = REGISTER_MAP["TASK_SELECT"].field("TASK")
        super().__init__({
            "s_axil": In(AxiLiteSignature()),
            "start": Out(1),
            "abort_request": Out(1),
            "clear_counters": Out(1),
            "program_base": Out(64),
            "data_base": Out(64),
            "data_size": Out(64),
            "task_select": Out(task.width),
            "schedule": Out(Schedule),
            "busy": In(1),
            "done_set": In(1),
            "error_set": In(1),
            "error_code": In(ErrorCode),
            "error_pc": In(32),
            "counters": In(counter_layout()),
        })

    def elaborate(self, platform):
        m = Module()
        bus = self.s_axil
        word_bits = AXIL_ADDR_WIDTH - 2

        # Write: address and data are each held until both are there, so they may come in
        # either order; the next pair is taken while the response waits, not written.
        aw_full, w_full = Signal(name="aw_full"), Signal(name="w_full")
        aw_word = Signal(word_bits, name="aw_word")
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
        written = w_data & strobe

        def writes(register: Register) -> Value:
            return write & (aw_word == register.offset // _WORD_BYTES)

        read_words: dict[str, Value] = {}
        storage: dict[str, Signal] = {}
        for register in REGISTER_MAP:
            if register.access is Access.RW:
                reg = Signal(AXIL_DATA_WIDTH, init=register.reset, name=register.name.lower())
                with m.If(writes(register) & ~self.busy):
                    m.d.sync += reg.eq(((reg & ~strobe) | written) & register.mask)
                storage[register.name] = read_words[register.name] = reg
            elif register.access is Access.W1P:
                read_words[register.name] = Const(0, AXIL_DATA_WIDTH)
            elif register.name in self._constants:
                read_words[register.name] = Const(self._constants[register.name],
                                                  AXIL_DATA_WIDTH)

        control = REGISTER_MAP["CONTROL"]

        def pulse(name: str) -> Value:
            return writes(control) & written[control.field(name).lsb]

        start_now = Signal(name="start_now")
        zero_counters = Signal(name="zero_counters")
        m.d.comb += [
            start_now.eq(pulse("START") & ~self.busy),
            zero_counters.eq(start_now | pulse("CLEAR_COUNTERS")),
        ]
        m.d.sync += [
            self.start.eq(start_now),
            self.abort_request.eq(pulse("ABORT")),
            self.clear_counters.eq(pulse("CLEAR_COUNTERS")),
        ]

        # Status. The set pulses come after the clear so that an event in the cycle of an
        # accepted START is kept.
        done, error = Signal(name="done"), Signal(name="error")
        error_code = Signal(ErrorCode, name="error_code_held")
        error_pc = Signal(32, name="error_pc_held")
        with m.If(start_now):
            m.d.sync += [done.eq(0), error.eq(0), error_code.eq(ErrorCode.NONE), error_pc.eq(0)]
        with m.If(self.done_set):
            m.d.sync += done.eq(1)
        with m.If(self.error_set):
            m.d.sync += [error.eq(1), error_code.eq(self.error_code), error_pc.eq(self.error_pc)]

        def compose(name: str, **values: Value) -> Value:
            register = REGISTER_MAP[name]
            if set(values) != {field.name for field in register.fields}:
                raise RegisterError(f"{name}: the hardware drives {sorted(values)}, the map "
                                    f"declares {[f.name for f in register.fields]}")
            word = Signal(AXIL_DATA_WIDTH, name=f"{name.lower()}_word")
            for field in register.fields:
                m.d.comb += word[field.lsb:field.msb + 1].eq(values[field.name])
            return word

        read_words["STATUS"] = compose("STATUS", BUSY=self.busy, DONE=done, ERROR=error)
        read_words["ERROR_CODE"] = compose("ERROR_CODE", CODE=error_code)
        read_words["ERROR_PC"] = compose("ERROR_PC", VALUE=error_pc)

        # Counters. CYCLES is 64-bit here; the others are differences from a baseline, which
        # wrap correctly modulo 2^32 however often the owner's counter has wrapped.
        cycles = Signal(64, name="cycles")
        # Latched by a read of CYCLES_LO, so the two halves read are one 64-bit value.
        cycles_hi = Signal(32, name="cycles_hi")
        with m.If(zero_counters):
            m.d.sync += cycles.eq(0)
        with m.Elif(self.busy):
            m.d.sync += cycles.eq(cycles + 1)
        read_words["CYCLES_LO"] = cycles[:32]
        read_words["CYCLES_HI"] = cycles_hi
        for counter in COUNTERS:
            live = self.counters[counter.name.lower()]
            baseline = Signal(32, name=f"{counter.name.lower()}_baseline")
            value = Signal(32, name=f"{counter.name.lower()}_value")
            with m.If(zero_counters):
                m.d.sync += baseline.eq(live)
            m.d.sync += value.eq(live - baseline)
            read_words[counter.name] = value

        unimplemented = {register.name for register in REGISTER_MAP} - set(read_words)
        if unimplemented:
            raise RegisterError(f"registers declared but not implemented: {sorted(unimplemented)}")

        # Read: the address is taken, then the data registered a cycle later.
        ar_full, rvalid = Signal(name="ar_full"), Signal(name="rvalid")
        ar_word = Signal(word_bits, name="ar_word")
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

        def pair(name: str) -> Value:
            return Cat(storage[f"{name}_LO"], storage[f"{name}_HI"])

        task = REGISTER_MAP["TASK_SELECT"].field("TASK")
        order = REGISTER_MAP["SCHEDULE"].field("ORDER")
        m.d.comb += [
            self.program_base.eq(pair("PROGRAM_BASE")),
            self.data_base.eq(pair("DATA_BASE")),
            self.data_size.eq(pair("DATA_SIZE")),
            self.task_select.eq(storage["TASK_SELECT"][task.lsb:task.msb + 1]),
            self.schedule.eq(storage["SCHEDULE"][order.lsb:order.msb + 1]),
        ]
        return m


def _bits(field: Field) -> str:
    return str(field.lsb) if field.width == 1 else f"{field.msb}:{field.lsb}"


def _markdown(text: str) -> str:
    """reStructuredText roles and literals of a docstring as Markdown code spans."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def _has_field_table(register: Register) -> bool:
    return len(register.fields) > 1 or register.fields[0].width < AXIL_DATA_WIDTH


def _value_text(register: Register, value: int) -> str:
    # Identifiers and packed fields read best in hex, counts and sizes in decimal.
    if register.name in ("ID", "CONFIG_HASH") or _has_field_table(register):
        return f"`{value:#010x}`"
    return f"{value:,}"


def registers_markdown(config: AccelConfig = ZCU104, config_name: str = "ZCU104") -> str:
    """The text of ``docs/registers.md``, generated from :data:`REGISTER_MAP`.

    Parameters
    ----------
    config : AccelConfig, optional
        The configuration whose constant registers' values are listed.
    config_name : str, optional
        How the text names ``config``.

    Returns
    -------
    str
        Markdown, ending in one newline.
    """
    constants = constant_values(config)
    lines = [
        "# Control registers",
        "",
        "<!-- Generated by `python -m m3vit.hw.registers` from hw/registers.py; do not edit. -->",
        "",
        _markdown((__doc__ or "").split("\n\n", 1)[1].strip()),
        "",
        "Access types:",
        "",
    ]
    lines += [f"* **{access.value}**: {text}" for access, text in _ACCESS_MEANINGS.items()]
    lines += ["", f"The *reset* column gives constants' values for the {config_name} "
                  "configuration."]
    for key, title, base, text in _GROUPS:
        lines += ["", f"## {title} (`{base:#05x}`…)", "", text, "",
                  "| offset | register | access | reset | description |",
                  "|---:|---|---|---:|---|"]
        registers = [register for register in REGISTER_MAP if register.group == key]
        for register in registers:
            value = constants.get(register.name, register.reset)
            lines.append(f"| `{register.offset:#05x}` | `{register.name}` | "
                         f"{register.access.value} | {_value_text(register, value)} | "
                         f"{register.description} |")
        for register in filter(_has_field_table, registers):
            lines += ["", f"`{register.name}` fields:", "",
                      "| bits | field | description |", "|---|---|---|"]
            lines += [f"| {_bits(field)} | `{field.name}` | {field.description} |"
                      for field in register.fields]
    for enum_type, meanings in _ENUM_MEANINGS.items():
        lines += ["", f"## `{enum_type.__name__}`", "",
                  _markdown((enum_type.__doc__ or "").strip()), "",
                  "| value | name | meaning |", "|---:|---|---|"]
        lines += [f"| {member.value} | `{member.name}` | {meanings[member]} |"
                  for member in enum_type]
    return "\n".join(lines) + "\n"


#: Where ``python -m m3vit.hw.registers`` writes the docs (the repository's ``docs/``).
DOCS_PATH = Path(__file__).resolve().parents[1] / "docs" / "registers.md"


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/registers.md`` (or, with ``--check``, exit 1 if it is stale).

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (``sys.argv[1:]`` when omitted).

    Returns
    -------
    int
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m m3vit.hw.registers",
                                     description="Generate docs/registers.md from the "
                                                 "register map.")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file differs from the generated text")
    args = parser.parse_args(argv)
    text = registers_markdown()
    if args.check:
        if not DOCS_PATH.is_file() or DOCS_PATH.read_text() != text:
            print(f"{DOCS_PATH} is stale: run `python -m m3vit.hw.registers`", file=sys.stderr)
            return 1
        return 0
    DOCS_PATH.write_text(text)
    print(f"wrote {DOCS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
