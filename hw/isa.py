"""The accelerator's instruction set, declared once for the hardware and the host packer.

A program is a sequence of 256-bit little-endian instruction words in DDR, fetched from
``PROGRAM_BASE`` and executed one at a time by :class:`m3vit.hw.top.Accelerator`'s
controller until ``END``. Every instruction is an 8-bit :class:`Opcode` followed by the
operand struct of that opcode (:data:`OPERANDS`); unused high bits are zero.

The hardware views a fetched word through :data:`INSTRUCTION` (an Amaranth
``data.StructLayout``); the host builds the same bits with :func:`encode` from the very same
layouts, so the two can never disagree on a field's position or width. ``docs/isa.md`` is
generated from these declarations by ``python -m m3vit.hw.isa``.

Addressing:

* **Buffer addresses** index the on-chip activation buffer in *words* of ``pe_cols`` INT8
  lanes. A tensor of M tokens × D channels is stored *slice-major*: word ``base + s·stride
  + m`` holds channels ``s·C … s·C+C−1`` of token ``m`` (``stride`` ≥ M, usually M).
* **DDR addresses** are byte offsets from the ``DATA_BASE`` register, checked against
  ``DATA_SIZE``; with ``per_task`` set, ``task_select · task_stride`` (from the last
  ``TASKS`` instruction) is added first, so one program serves every task.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from amaranth.hdl import Shape, unsigned
from amaranth.lib import data, enum

from .config import AccelConfig, AccelConfigError
from .errors import M3VitError
from .gemm import GemmOp

__all__ = [
    "BUF_ADDR_BITS",
    "DDR_OFFSET_BITS",
    "GEMM_RECORD_BYTES",
    "INSTRUCTION",
    "INSTRUCTION_BITS",
    "INSTRUCTION_BYTES",
    "LN_RECORD_BYTES",
    "OPERANDS",
    "IsaError",
    "Opcode",
    "TableUnit",
    "WeightSource",
    "check_top_config",
    "decode",
    "encode",
    "isa_markdown",
]

#: Width of one instruction word (two 128-bit AXI beats).
INSTRUCTION_BITS = 256
INSTRUCTION_BYTES = INSTRUCTION_BITS // 8
#: Word address into the activation buffer (65,536 words: 2 MiB at 32 lanes).
BUF_ADDR_BITS = 16
#: Byte offset from ``DATA_BASE`` (4 GiB, the whole PS DDR of a ZCU104 and then some).
DDR_OFFSET_BITS = 32
# Loop counts: tokens, words and K-slices / N-tiles (12 bits: K up to 4,095 · pe_rows).
_TOKENS_BITS = 16
_TILES_BITS = 12


#: Bytes of one LayerNorm parameter record in DDR (bias int64, gain int16, 6 zero bytes).
LN_RECORD_BYTES = 16
#: Bytes of one GEMM parameter record in DDR (bias int32, mult uint16, shift uint8, 0).
GEMM_RECORD_BYTES = 8


def check_top_config(config: AccelConfig) -> AccelConfig:
    """Check the constraints the top adds to :class:`AccelConfig`'s own.

    Raises
    ------
    AccelConfigError
        For a non-square PE array (attention loads K's columns into the array), a
        weight tile or parameter block smaller than one AXI beat (the DDR stream is split
        between them at beat granularity) or a buffer deeper than the ISA can address.
    """
    if config.pe_rows != config.pe_cols:
        raise AccelConfigError(f"the accelerator top needs a square PE array, got "
                               f"{config.pe_rows}x{config.pe_cols}")
    if config.pe_rows * config.pe_cols < config.axi_bytes:
        raise AccelConfigError("a weight tile must be at least one AXI beat: raise the PE "
                               "array or lower axi_data_width")
    if GEMM_RECORD_BYTES * config.pe_cols < config.axi_bytes:
        raise AccelConfigError("an N-tile's parameters must be at least one AXI beat")
    if config.act_buffer_words > 1 << BUF_ADDR_BITS:
        raise AccelConfigError(f"act_buffer_words is over the ISA's {1 << BUF_ADDR_BITS}")
    return config


class IsaError(M3VitError, ValueError):
    """An instruction that cannot be encoded or decoded (the message names the field)."""


class Opcode(enum.Enum, shape=8):
    """What one instruction does (operands in :data:`OPERANDS`)."""

    #: stop: STATUS.DONE is set, the accelerator goes idle
    END = 0x00
    #: do nothing
    NOP = 0x01
    #: select the per-task DDR stride and check ``TASK_SELECT`` < ``count``
    TASKS = 0x02
    #: DDR → activation buffer, ``words`` words to ``dst + i · dst_stride``
    LOAD = 0x10
    #: activation buffer → DDR, words ``src + i · src_stride``
    STORE = 0x11
    #: load a 256-entry table into a unit
    LOAD_TABLE = 0x12
    #: one pass of the PE array (:class:`~m3vit.hw.gemm.GemmEngine`)
    GEMM = 0x20
    #: integer LayerNorm over token rows
    LAYERNORM = 0x30
    #: row softmax (attention) over token rows
    SOFTMAX = 0x31
    #: residual add across scales over contiguous words
    RESIDUAL = 0x32


class WeightSource(enum.Enum, shape=2):
    """Where a ``GEMM`` takes its weight tiles from."""

    #: streamed from DDR at ``ddr``, each N-tile's parameters followed by its weight tiles
    DDR = 0
    #: rows of the buffer: tile (j, s) row r = word ``wbuf + j·wstride + s·R + r`` (P·V)
    BUFFER_ROWS = 1
    #: columns from the buffer: tile (j, s) column c = word ``wbuf + s·wstride + j·C + c``
    #: (Q·Kᵀ; the array loads the beat into column c)
    BUFFER_COLUMNS = 2


class TableUnit(enum.Enum, shape=2):
    """Which unit a ``LOAD_TABLE`` fills."""

    #: the GEMM engine's output table (GELU), 256 INT8 entries = 256 bytes
    GEMM = 0
    #: the softmax unit's exp table, 256 uint16 entries = 512 bytes
    SOFTMAX = 1


_BUF = unsigned(BUF_ADDR_BITS)
_DDR = unsigned(DDR_OFFSET_BITS)

#: Operand struct of every opcode (bit 0 of a struct = bit 8 of the instruction word).
OPERANDS: Mapping[Opcode, data.StructLayout] = {
    Opcode.END: data.StructLayout({}),
    Opcode.NOP: data.StructLayout({}),
    Opcode.TASKS: data.StructLayout({
        "count": unsigned(8),        # tasks in the image; TASK_SELECT ≥ count is BAD_TASK
        "stride": _DDR,              # bytes between consecutive tasks' per-task blocks
    }),
    Opcode.LOAD: data.StructLayout({
        "ddr": _DDR,                 # source: words · C bytes, whole AXI beats (padding dropped)
        "dst": _BUF,
        "dst_stride": _BUF,
        "words": unsigned(_TOKENS_BITS),
    }),
    Opcode.STORE: data.StructLayout({
        "ddr": _DDR,                 # destination: the last AXI beat is zero-padded
        "src": _BUF,
        "src_stride": _BUF,
        "words": unsigned(_TOKENS_BITS),
    }),
    Opcode.LOAD_TABLE: data.StructLayout({
        "ddr": _DDR,
        "unit": TableUnit,
        "per_task": unsigned(1),
    }),
    Opcode.GEMM: data.StructLayout({
        "mode": GemmOp,              # INT8, INT8_TABLE or INT32 (LOAD_TABLE is illegal here)
        "wsrc": WeightSource,
        "per_task": unsigned(1),
        "tokens": unsigned(_TOKENS_BITS),
        "k_slices": unsigned(_TILES_BITS),
        "n_tiles": unsigned(_TILES_BITS),
        "src": _BUF,                 # activations: word src + s·src_stride + m
        "src_stride": _BUF,
        "dst": _BUF,                 # INT8 results: word dst + j·dst_stride + m
        "dst_stride": _BUF,
        "wbuf": _BUF,                # on-chip weights (wsrc ≠ DDR)
        "wstride": _BUF,
        "ddr": _DDR,                 # parameters (+ weights when wsrc = DDR)
        "out_ddr": _DDR,             # INT32 results: (j·tokens + m) · 4C bytes from here
    }),
    Opcode.LAYERNORM: data.StructLayout({
        "src": _BUF,                 # row m, beat b: word src + b·stride + m
        "dst": _BUF,
        "stride": _BUF,
        "rows": unsigned(_TOKENS_BITS),
        "beats": unsigned(_TILES_BITS),
        "shift": unsigned(6),
        "eps_term": unsigned(52),
        "ddr": _DDR,                 # per channel 16 bytes: bias int64, gain int16, 6 zero
    }),
    Opcode.SOFTMAX: data.StructLayout({
        "src": _BUF,                 # row m, beat b: word src + b·stride + m
        "dst": _BUF,
        "stride": _BUF,
        "rows": unsigned(_TOKENS_BITS),
        "length": unsigned(_TOKENS_BITS),
    }),
    Opcode.RESIDUAL: data.StructLayout({
        "src_a": _BUF,               # three contiguous ranges of ``words`` words
        "src_b": _BUF,
        "dst": _BUF,
        "words": unsigned(_TOKENS_BITS + 4),
        "mult_a": unsigned(16),
        "mult_b": unsigned(16),
        "shift": unsigned(6),
    }),
}

_ARG_BITS = INSTRUCTION_BITS - 8
for _op, _layout in OPERANDS.items():
    assert _layout.size <= _ARG_BITS, (_op, _layout.size)

#: One instruction word: the opcode and a union of every operand struct.
INSTRUCTION = data.StructLayout({
    "opcode": Opcode,
    "args": data.UnionLayout({op.name.lower(): layout for op, layout in OPERANDS.items()
                              if layout.size}),
    "pad": unsigned(_ARG_BITS - max(layout.size for layout in OPERANDS.values())),
})
assert INSTRUCTION.size == INSTRUCTION_BITS


def _field_value(op: Opcode, name: str, shape, value) -> int:
    """``value`` as the unsigned bits of a field of ``shape``, range-checked."""
    if isinstance(value, enum.Enum) or (isinstance(shape, type) and issubclass(shape, enum.Enum)):
        try:
            value = shape(value).value
        except ValueError:
            raise IsaError(f"{op.name}.{name}: {value!r} is not a {shape.__name__}") from None
    width = Shape.cast(shape).width
    if not isinstance(value, int):
        raise IsaError(f"{op.name}.{name}: expected an integer, got {value!r}")
    if not 0 <= int(value) < 1 << width:
        raise IsaError(f"{op.name}.{name} = {value} does not fit in {width} unsigned bits")
    return int(value)


def encode(op: Opcode, **fields: int) -> bytes:
    """Pack one instruction into its 32-byte little-endian word.

    Parameters
    ----------
    op : Opcode
        The operation.
    **fields : int or enum member
        Operands by name (see :data:`OPERANDS`); omitted ones are 0.

    Returns
    -------
    bytes
        :data:`INSTRUCTION_BYTES` bytes.

    Raises
    ------
    IsaError
        For an unknown field or a value that does not fit its field.
    """
    op = Opcode(op)
    layout = OPERANDS[op]
    known = {name for name, _ in layout}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise IsaError(f"{op.name} has no field {unknown[0]!r} "
                       f"(fields: {', '.join(sorted(known))})")
    word = op.value
    for name, field in layout:
        if name in fields:
            word |= _field_value(op, name, field.shape, fields[name]) << (8 + field.offset)
    return word.to_bytes(INSTRUCTION_BYTES, "little")


def decode(word: bytes) -> tuple[Opcode, dict[str, int]]:
    """Unpack one instruction word: the inverse of :func:`encode`.

    Raises
    ------
    IsaError
        For a word of the wrong length or an unknown opcode.
    """
    if len(word) != INSTRUCTION_BYTES:
        raise IsaError(f"an instruction is {INSTRUCTION_BYTES} bytes, got {len(word)}")
    value = int.from_bytes(word, "little")
    try:
        op = Opcode(value & 0xFF)
    except ValueError:
        raise IsaError(f"illegal opcode 0x{value & 0xFF:02x}") from None
    fields = {}
    for name, field in OPERANDS[op]:
        fields[name] = (value >> (8 + field.offset)) & ((1 << field.width) - 1)
    return op, fields


def _shape_text(shape) -> str:
    if isinstance(shape, type) and issubclass(shape, enum.Enum):
        return f"{shape.__name__} ({Shape.cast(shape).width})"
    return str(Shape.cast(shape).width)


def isa_markdown() -> str:
    """The text of ``docs/isa.md``, generated from :data:`OPERANDS`."""
    lines = [
        "# Instruction set",
        "",
        "<!-- Generated by `python -m m3vit.hw.isa` from hw/isa.py; do not edit. -->",
        "",
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        "",
        "## Opcodes",
        "",
        "| opcode | value | meaning |",
        "|---|---:|---|",
    ]
    for op in Opcode:
        lines.append(f"| `{op.name}` | 0x{op.value:02x} | {_OPCODE_DOCS[op]} |")
    for enum_type in (WeightSource, TableUnit, GemmOp):
        lines += ["", f"## `{enum_type.__name__}`", "", "| name | value |", "|---|---:|"]
        lines += [f"| `{member.name}` | {member.value} |" for member in enum_type]
    lines += ["", "## Operands", "",
              "Bit positions are within the 256-bit word (the opcode is bits 0–7).", ""]
    for op, layout in OPERANDS.items():
        if not layout.size:
            continue
        lines += [f"### `{op.name}`", "", "| field | bits | width |", "|---|---|---|"]
        for name, field in layout:
            lo = 8 + field.offset
            lines.append(f"| `{name}` | {lo}–{lo + field.width - 1} | {_shape_text(field.shape)} |")
        lines.append("")
    checks = ["| check | error code |", "|---|---|"]
    checks += [f"| {check} | `{code}` |" for check, code in _CHECKS]
    return ("\n".join(lines).rstrip() + "\n"
            + _ISA_SEMANTICS.replace("{checks}", "\n".join(checks)))


_OPCODE_DOCS = {
    Opcode.END: "stop: STATUS.DONE is set and the accelerator goes idle",
    Opcode.NOP: "do nothing",
    Opcode.TASKS: "set the per-task DDR stride; `TASK_SELECT` ≥ `count` stops with BAD_TASK",
    Opcode.LOAD: "DDR → buffer: `words` words to `dst + i·dst_stride`",
    Opcode.STORE: "buffer → DDR: words `src + i·src_stride`",
    Opcode.LOAD_TABLE: "load a 256-entry table into the unit `unit`",
    Opcode.GEMM: "one pass of the PE array (bias, requantization, optional table)",
    Opcode.LAYERNORM: "integer LayerNorm of `rows` token rows of `beats` words",
    Opcode.SOFTMAX: "row softmax of `rows` rows of `length` INT8 logits (INT8 probabilities)",
    Opcode.RESIDUAL: "residual add of two ranges of `words` words",
}

_CHECKS = [
    ("opcode not in the table above; `GEMM` with mode `LOAD_TABLE`; `wsrc` 3; `unit` > 1",
     "ILLEGAL_OPCODE"),
    ("a count of 0 where ≥ 1 is needed, or over the configuration: `tokens` or `rows` or "
     "`length` > `max_tokens`, `beats · pe_cols` > `max_dim`, `k_slices · pe_rows` or "
     "`n_tiles · pe_cols` > max(`max_hidden`, 3 · `max_dim`, `max_tokens` + `pe_cols`), "
     "`words` > `act_buffer_words`", "SHAPE_OVER_CAPACITY"),
    ("a buffer range past the buffer's last word, or a DDR range past `DATA_SIZE`",
     "ADDRESS_OUT_OF_RANGE"),
    ("`TASK_SELECT` ≥ `TASKS.count`", "BAD_TASK"),
]

_ISA_SEMANTICS = """
## Semantics and checks

Instructions run one at a time, in order; an instruction starts when the previous one has
written its last result (to the buffer, or to DDR with every write response back).
Before an instruction starts, the controller checks it; a failing check stops the run
cleanly (nothing of that instruction has started) with STATUS.ERROR, `ERROR_CODE` and
`ERROR_PC` = the instruction's index:

{checks}

A DDR access answered with SLVERR or DECERR lets the instruction finish, then stops with
`AXI_RESPONSE`; `CONTROL.ABORT` stops after the current instruction with `ABORTED`.

DDR layouts read by the instructions (the compiler writes them, zero-padded to whole AXI
beats):

- `GEMM`, `wsrc = DDR`: for each N-tile j: `pe_cols` parameter records (8 bytes each:
  bias int32, multiplier uint16, shift uint8, one zero byte), then for each K-slice s the
  `pe_rows` rows of the weight tile, row r = `W[j·C + c, s·R + r]` for c = 0…C−1 (C bytes).
  With weights from the buffer, only the parameter records.
- `LAYERNORM`: per channel 16 bytes: bias int64, gain int16, six zero bytes.
- `LOAD_TABLE`: 256 entries (INT8 for `GEMM`, uint16 little-endian for `SOFTMAX`).
- `GEMM` in mode `INT32` writes, for each N-tile j and token m, C little-endian INT32.
"""


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/isa.md`` (or, with ``--check``, fail if it is stale)."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(__file__).resolve().parents[1] / "docs" / "isa.md"
    text = isa_markdown()
    if "--check" in argv:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is stale: run `python -m m3vit.hw.isa`", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
