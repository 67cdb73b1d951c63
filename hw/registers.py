"""The register map: every control register declared once, for the hardware, the host and the docs.

The host reaches the accelerator through one AXI4-Lite slave of 32-bit registers (PYNQ's
``MMIO`` on the board, cocotbext-axi's ``AxiLiteMaster`` in simulation). :data:`REGISTER_MAP`
declares every register once (name, byte offset, access, fields, reset) as plain Python
data: :class:`ControlRegisters` decodes addresses and places fields from it, the host
runtime takes offsets from it and packs and unpacks fields with :meth:`Register.encode` and
:meth:`Register.decode`, and ``docs/registers.md`` is generated from it by
``python -m m3vit.hw.register_docs``.

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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from amaranth.hdl import Shape
from amaranth.lib import data, enum, wiring
from amaranth.lib.wiring import In, Out

from .config import AccelConfig
from .errors import M3VitError

__all__ = [
    "ACCESS_MEANINGS",
    "AXIL_ADDR_WIDTH",
    "AXIL_DATA_WIDTH",
    "COUNTERS",
    "COUNTER_OWNERS",
    "ENUM_MEANINGS",
    "ERROR_MESSAGES",
    "ID_MAGIC",
    "MAX_TRACE_PORTS",
    "REGISTER_GROUPS",
    "REGISTER_MAP",
    "SCHEDULE_MEANINGS",
    "TRACE_DEPTH",
    "TRACE_WORDS",
    "VERSION",
    "Access",
    "Counter",
    "EngineControlSignature",
    "ErrorCode",
    "Field",
    "Register",
    "RegisterError",
    "RegisterMap",
    "Schedule",
    "constant_values",
    "counter_layout",
]

#: Byte-address width of the AXI4-Lite slave: a 4 KiB window, the smallest segment Vivado's
#: address editor assigns on the Zynq MPSoC's HPM ports.
AXIL_ADDR_WIDTH = 12
AXIL_DATA_WIDTH = 32
_WORD_BYTES = AXIL_DATA_WIDTH // 8

#: ``ID`` register: "M3VT" in ASCII, so a misplaced base address is noticed at once.
ID_MAGIC = 0x4D335654
#: Register map version (major, minor): a new major breaks hosts, a new minor only adds.
VERSION = (1, 1)


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


#: One line per :class:`Access`, for the docs.
ACCESS_MEANINGS: Mapping[Access, str] = {
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

#: The enums the docs list, each with its one line per member.
ENUM_MEANINGS: Mapping[type, Mapping] = {ErrorCode: ERROR_MESSAGES, Schedule: SCHEDULE_MEANINGS}


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


#: The blocks that own a performance counter: the engine (its control port's ``counters``,
#: :class:`EngineControlSignature`) and the DMA engines (:func:`counter_layout`).
COUNTER_OWNERS = ("engine", "dma")


@dataclass(frozen=True)
class Counter:
    """A 32-bit performance counter owned by another block.

    Parameters
    ----------
    name : str
        Register name (upper case); the owner's counter member is its lower-case form.
    owner : str
        The block whose free-running counter it reads, one of :data:`COUNTER_OWNERS`.
    description : str
        What it counts (Markdown).
    """

    name: str
    owner: str
    description: str

    def __post_init__(self) -> None:
        if self.owner not in COUNTER_OWNERS:
            raise RegisterError(f"{self.name}: owner must be one of {COUNTER_OWNERS}, got "
                                f"{self.owner!r}")


#: The counters besides ``CYCLES``, in register order from ``0x88``. Adding a counter is one
#: line here: its register, its member of the owner's counters port and its docs follow.
COUNTERS: tuple[Counter, ...] = (
    Counter("GEMM_BUSY", "engine", "cycles the GEMM engine was busy"),
    Counter("VECTOR_BUSY", "engine", "cycles any vector-unit block was busy"),
    Counter("DMA_READ_BYTES", "dma", "bytes read from DDR (instructions, weights, activations)"),
    Counter("DMA_WRITE_BYTES", "dma", "bytes written to DDR"),
    Counter("WEIGHT_STALL", "engine", "cycles the GEMM engine waited for weights"),
    Counter("INSTRUCTIONS", "engine", "instructions retired"),
)

#: Entries of the instruction trace (:class:`~m3vit.hw.engine.trace.InstructionTrace`): the
#: first this many entries of a run (instructions and drains: a batch of four ``edge-moe``
#: images has 1,116).
TRACE_DEPTH = 2048
#: 32-bit words of a trace entry.
TRACE_WORDS = 8
#: Master ports a trace entry counts read bytes of.
MAX_TRACE_PORTS = 4
#: What each word of a trace entry holds (register ``TRACE_WORD<k>``).
_TRACE_WORD_TEXT = (
    "bits 15:0 the instruction's index, bits 23:16 its opcode, bit 24 a *drain*: the "
    "wait for a GEMM that handed over early (it retired when its stream was issued) or "
    "for a SOFTMAX running in the background ends here, and the span is its tail",
    "cycle (since `START`) its span starts: the previous entry's end, 0 for the first",
    "cycle its span ends (it retired, or the run stopped on it)",
    *(f"bytes read from DDR over master port {p} during the span"
      for p in range(MAX_TRACE_PORTS)),
    "bytes written to DDR during the span",
)

#: Sections of the map: (group key, title, first offset, text for the docs).
REGISTER_GROUPS = (
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
    ("trace", "Instruction trace", 0xC0,
     "One entry per instruction of the last run (the first `TRACE_DEPTH` = "
     f"{TRACE_DEPTH} of them): write `TRACE_INDEX`, then read `TRACE_WORD0` … "
     f"`TRACE_WORD{TRACE_WORDS - 1}`. The entries' spans partition the run; "
     "`m3vit profile` turns them into a table by phase and a timeline."),
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
    registers += [
        Register("TRACE_COUNT", 0xC0, ro, "trace", "Trace entries of the last run: one per "
                 "instruction retired, one for the instruction it stopped on, one per drain "
                 "(zeroed by `START`).", _word("count")),
        Register("TRACE_INDEX", 0xC4, rw, "trace", "The trace entry `TRACE_WORD*` read.",
                 (Field("INDEX", 0, (TRACE_DEPTH - 1).bit_length(), "entry, 0 = the run's "
                        "first instruction"),)),
    ]
    for index, text in enumerate(_TRACE_WORD_TEXT):
        registers.append(Register(f"TRACE_WORD{index}", 0xC8 + 4 * index, ro, "trace",
                                  f"Word {index} of the selected trace entry.", _word(text)))
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


def counter_layout(owner: str) -> data.StructLayout:
    """The counters ``owner`` reports to the register file, as one packed value.

    Parameters
    ----------
    owner : str
        One of :data:`COUNTER_OWNERS`.

    Returns
    -------
    data.StructLayout
        32 bits per :data:`COUNTERS` entry of ``owner``, named by its lower-case name
        (``counters.gemm_busy``), in register order: free-running, wrapping counters.

    Raises
    ------
    RegisterError
        If ``owner`` is not one of :data:`COUNTER_OWNERS`.
    """
    if owner not in COUNTER_OWNERS:
        raise RegisterError(f"owner must be one of {COUNTER_OWNERS}, got {owner!r}")
    return data.StructLayout({counter.name.lower(): 32 for counter in COUNTERS
                              if counter.owner == owner})


class EngineControlSignature(wiring.Signature):
    """The engine's control port, seen from the engine: the hardware side of the registers.

    The engine holds it as ``ctrl: Out(EngineControlSignature())`` and the register file
    (:class:`~m3vit.hw.regfile.ControlRegisters`) as ``engine: In(...)``, so the top
    connects the two with one ``wiring.connect``. Members (Verilog ``ctrl__start`` …):

    start, abort_request : In(1)
        One-cycle requests: an accepted ``CONTROL.START``, ``CONTROL.ABORT``.
        (``abort_request``, not ``abort``: Verilator warns about ports named like C library
        functions.)
    program_base, data_base, data_size : In(64)
        ``PROGRAM_BASE``, ``DATA_BASE``, ``DATA_SIZE`` (the ``*_LO``/``*_HI`` pairs).
    task_select : In
        ``TASK_SELECT.TASK``: the task whose ``per_task`` blocks the program reads.
    schedule : In(Schedule)
        ``SCHEDULE.ORDER``.
    busy : Out(1)
        A run is in progress (``STATUS.BUSY``; ``CYCLES`` counts while it is high).
    done, error : Out(1)
        One-cycle pulses when a run ends normally / with ``error_code`` at ``error_pc``
        (they set ``STATUS.DONE`` / ``STATUS.ERROR``).
    error_code : Out(ErrorCode)
        The run's error, latched into ``ERROR_CODE`` on ``error``.
    error_pc : Out(32)
        Index of the failing instruction, latched into ``ERROR_PC`` on ``error``.
    counters : Out(counter_layout("engine"))
        The free-running 32-bit counter of every :data:`COUNTERS` entry the engine owns
        (``counters.gemm_busy`` …); the registers read them relative to a baseline taken
        at ``START`` / ``CLEAR_COUNTERS``, so the engine never clears them.
    trace_index : In(range(TRACE_DEPTH))
        ``TRACE_INDEX.INDEX``.
    trace_entry : Out(ArrayLayout(32, TRACE_WORDS))
        That trace entry (``TRACE_WORD0`` …), one cycle later.
    trace_count : Out(32)
        ``TRACE_COUNT``.
    """

    def __init__(self):
        super().__init__({
            "start": In(1),
            "abort_request": In(1),
            "program_base": In(64),
            "data_base": In(64),
            "data_size": In(64),
            "task_select": In(REGISTER_MAP["TASK_SELECT"].field("TASK").width),
            "schedule": In(Schedule),
            "busy": Out(1),
            "done": Out(1),
            "error": Out(1),
            "error_code": Out(ErrorCode),
            "error_pc": Out(REGISTER_MAP["ERROR_PC"].field("VALUE").width),
            "counters": Out(counter_layout("engine")),
            "trace_index": In(range(TRACE_DEPTH)),
            "trace_entry": Out(data.ArrayLayout(32, TRACE_WORDS)),
            "trace_count": Out(32),
        })

    def __eq__(self, other):
        other = other.flip() if type(other) is wiring.FlippedSignature else other
        return type(other) is EngineControlSignature

    def __hash__(self):
        return hash(EngineControlSignature)

    def __repr__(self):
        return "EngineControlSignature()"
