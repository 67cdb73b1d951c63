"""The accelerator's instruction set, declared once for the hardware and the host packer.

A program is a sequence of 256-bit little-endian instruction words in DDR, fetched from
``PROGRAM_BASE`` and executed one at a time by :class:`m3vit.hw.top.AcceleratorTop`'s
controller until ``END``. Every instruction is an 8-bit :class:`Opcode` followed by the
operand struct of that opcode (:data:`OPERANDS`); unused high bits are zero.

The hardware views a fetched word through :data:`INSTRUCTION` (an Amaranth
``data.StructLayout``); the host builds the same bits with :func:`encode` from the very same
layouts, so the two can never disagree on a field's position or width. ``docs/isa.md`` is
generated from these declarations by ``python -m m3vit.hw.isa``.

Addressing:

* **Buffer addresses** index the on-chip activation buffer in *words* of ``pe_cols`` INT8
  lanes. A tensor of M tokens × D channels is stored *slice-major*: word ``base + s·stride
  + m`` holds channels ``s·C … s·C+C−1`` of token ``m`` (``stride`` ≥ M, usually M). A
  ``GEMM`` N-tile is ``gemm_cols`` = V·C channels, V = ``gemm_words`` (1, 2 or 4) such slices.
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
from .docgen import generated_doc_main
from .errors import M3VitError

__all__ = [
    "BUF_ADDR_BITS",
    "DDR_OFFSET_BITS",
    "GEMM_RECORD_BYTES",
    "INSTRUCTION",
    "INSTRUCTION_BITS",
    "INSTRUCTION_BYTES",
    "LN_RECORD_BYTES",
    "OPERANDS",
    "ExpertOrder",
    "GemmMode",
    "GemmOp",
    "IsaError",
    "Opcode",
    "RowMode",
    "TableUnit",
    "WeightSource",
    "check_top_config",
    "decode",
    "encode",
    "intake_beats",
    "isa_markdown",
    "softmax_words",
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
_GEMM_TOKENS_BITS = 15           # one bit of the full GEMM word went to ``row_scale``
_TILES_BITS = 12
# A fused residual add's shift: 0 … 31 (any shift ≥ 25 gives 0, numerics.residual_add).
_RES_SHIFT_BITS = 5


#: Bytes of one LayerNorm parameter record in DDR (bias int64, gain int16, 6 zero bytes).
LN_RECORD_BYTES = 16
#: Bytes of one GEMM parameter record in DDR (bias int32, mult uint16, shift uint8, 0).
GEMM_RECORD_BYTES = 8


def intake_beats(config: AccelConfig) -> int:
    """AXI beats the engine takes from the read DMA in one cycle: one *entry*.

    Four times as many as the master ports deliver together (four times the least power of
    two ≥ ``n_master_ports``) where there are several, so the array takes a weight tile
    faster than the DDR streams it: from what the read queues hold, read ahead while the
    array was busy (an expert visit over fewer tokens than a tile has rows is then bound by
    neither the DDR nor a row a cycle; at 16 tokens or fewer, a tile's load bounds each
    pass: 16 beats take a 32-row tile in 8 cycles). Halved until an entry divides both an
    N-tile's parameter block (``GEMM_RECORD_BYTES · gemm_cols`` bytes) and a weight tile
    (``pe_rows · gemm_cols``), so a GEMM's stream splits between them at entry boundaries.
    ZCU104 (3 ports, 32 × 64): 16 beats, 256 bytes (four weight rows) a cycle; one port: 1.
    """
    beats = 1 << (config.n_master_ports - 1).bit_length()
    if config.n_master_ports > 1:
        beats *= 4
    while beats > 1 and ((GEMM_RECORD_BYTES * config.gemm_cols) % (beats * config.axi_bytes)
                         or (config.pe_rows * config.gemm_cols) % (beats * config.axi_bytes)):
        beats //= 2
    return beats


def softmax_words(length: int, lanes: int) -> int:
    """Words a ``SOFTMAX`` writes for one attention row of ``length`` keys, ``lanes`` to a
    word: its probabilities and, in the last word's top three lanes, the row's scale —
    ⌈(length + 3) / lanes⌉, which is also the ``k_slices`` of the P·V that reads them.

    Examples
    --------
    >>> softmax_words(129, 32), softmax_words(128, 32), softmax_words(29, 32)
    (5, 5, 1)
    """
    return -(-(length + 3) // lanes)


def check_top_config(config: AccelConfig) -> AccelConfig:
    """Check the constraints the top adds to :class:`AccelConfig`'s own.

    Raises
    ------
    AccelConfigError
        For a K-slice other than a buffer word (``pe_rows ≠ pe_cols``: attention loads a
        stored word of K as a column of the array; the array widens with ``gemm_words``) or
        narrower than 4 (P·V's row scale, three bytes, rides in a K-slice),
        a weight tile or parameter block smaller than one AXI beat (the DDR stream is split
        between them at beat granularity) or a buffer deeper than the ISA can address.
    """
    if config.pe_rows != config.pe_cols:
        raise AccelConfigError(f"the accelerator top needs pe_rows == pe_cols (a K-slice is "
                               f"one buffer word; widen the PE array with gemm_words), got "
                               f"{config.pe_rows}x{config.pe_cols}")
    if config.pe_rows < 4:
        raise AccelConfigError(f"the accelerator top needs pe_rows >= 4 (a P·V row's scale, "
                               f"three bytes, rides in its last K-slice), got "
                               f"{config.pe_rows}")
    if config.pe_rows * config.gemm_cols < config.axi_bytes:
        raise AccelConfigError("a weight tile must be at least one AXI beat: raise the PE "
                               "array or lower axi_data_width")
    if GEMM_RECORD_BYTES * config.gemm_cols < config.axi_bytes:
        raise AccelConfigError("an N-tile's parameters must be at least one AXI beat")
    if config.axi_bytes > INSTRUCTION_BYTES:
        raise AccelConfigError(f"axi_data_width must be at most {INSTRUCTION_BITS} (the "
                               "instruction fetch takes at most one instruction a beat)")
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
    #: MoE gate: router scores, top-k and the per-expert token queues
    ROUTE = 0x40
    #: run the next ``body`` instructions once per active expert (or per token slot)
    EXPERTS = 0x41
    #: score-weighted sum of each token's expert outputs, requantized
    COMBINE = 0x42


class WeightSource(enum.Enum, shape=2):
    """Where a ``GEMM`` takes its weight tiles from."""

    #: streamed from DDR at ``ddr``, each N-tile's parameters followed by its weight tiles
    DDR = 0
    #: rows of the buffer: tile (j, s) row r = the V = ``gemm_words`` words ``wbuf + (j·V +
    #: v)·wstride + s·R + r``, v = 0…V−1 side by side (P·V)
    BUFFER_ROWS = 1
    #: columns from the buffer: tile (j, s) column c = word ``wbuf + s·wstride + j·G + c``,
    #: G = ``gemm_cols`` (Q·Kᵀ; the array loads the word into column c)
    BUFFER_COLUMNS = 2


class GemmOp(enum.Enum, shape=2):
    """What a ``GEMM`` instruction's ``mode`` (and a command to the GEMM engine,
    :class:`~m3vit.hw.gemm.GemmEngine`) asks for.

    The first three run a pass and name its output mode; ``LOAD_TABLE`` loads the table
    (the engine's own command: programs load tables with the ``LOAD_TABLE`` instruction).
    """

    #: requantized INT8 outputs
    INT8 = 0
    #: requantized INT8 then ``table[q & 0xFF]`` (GELU after FC1)
    INT8_TABLE = 1
    #: the INT32 accumulators plus bias, unrequantized (the task head)
    INT32 = 2
    #: take the table's 256 entries from the engine's ``table`` stream (entry 0 first)
    LOAD_TABLE = 3


class GemmMode(enum.Enum, shape=2):
    """A ``GEMM`` instruction's ``mode``: what its results are.

    The controller maps it to the GEMM engine's command (:class:`GemmOp`, and the
    command's ``wide`` bit for ``INT16``).
    """

    #: requantized INT8 outputs
    INT8 = 0
    #: requantized INT8 then ``table[q & 0xFF]`` (GELU after FC1)
    INT8_TABLE = 1
    #: the INT32 accumulators plus bias, unrequantized, to DDR (the task head)
    INT32 = 2
    #: requantized and saturated to INT16, two buffer words per ``pe_cols`` channels (the
    #: router's logits)
    INT16 = 3


class RowMode(enum.Enum, shape=2):
    """How a ``GEMM`` inside an ``EXPERTS`` body maps its row m to a buffer row."""

    #: row m (the only mode outside an ``EXPERTS`` body)
    DIRECT = 0
    #: row ``offset + m``: the iteration's place in the queue order (expert outputs)
    QUEUE = 1
    #: row ``queue[offset + m]``: the token the queue holds there (the expert's inputs)
    GATHER = 2


class ExpertOrder(enum.Enum, shape=2):
    """Which schedule an ``EXPERTS`` loop runs."""

    #: the ``SCHEDULE.ORDER`` register decides (the host compares both on one program)
    REGISTER = 0
    #: one iteration per active expert, largest and smallest count in turn (the active
    #: list's order): each expert's weights once per layer
    EXPERT_BY_EXPERT = 1
    #: the baseline: one iteration per (token, slot), token order, one token each
    TOKEN_BY_TOKEN = 2


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
        "mode": GemmMode,            # INT8, INT8_TABLE, INT32 or INT16
        "wsrc": WeightSource,
        "per_task": unsigned(1),
        # P·V after a SOFTMAX: the last K-slice's top three bytes are each row's
        # multiplier and shift (the SOFTMAX's row scale), taken as 0 keys (mode INT8).
        "row_scale": unsigned(1),
        "tokens": unsigned(_GEMM_TOKENS_BITS),
        "k_slices": unsigned(_TILES_BITS),
        "n_tiles": unsigned(_TILES_BITS),
        "src": _BUF,                 # activations: word src + s·src_stride + m
        "src_stride": _BUF,
        "dst": _BUF,                 # INT8 results: word dst + (j·V + v)·dst_stride + m
        #                              (INT16: j·2V + v, v < 2V; lanes are pairs of bytes)
        "dst_stride": _BUF,
        "wbuf": _BUF,                # on-chip weights (wsrc ≠ DDR); residual = 1: x's words
        "wstride": _BUF,
        "ddr": _DDR,                 # parameters (+ weights when wsrc = DDR)
        "out_ddr": _DDR,             # INT32 results: (j·tokens + m) · 4G bytes from here
        "expert": unsigned(1),       # in an EXPERTS body: the iteration's count, expert block
        "src_rows": RowMode,         # row m of the activations (DIRECT, QUEUE or GATHER)
        "dst_rows": RowMode,         # row m of the INT8 results (DIRECT or QUEUE)
        # A residual add in the output stage (wsrc = DDR, INT8 results): each result word
        # is added to the word of x at the same place from wbuf instead of dst.
        "residual": unsigned(1),
        "res_mult_buf": unsigned(16),  # x's multiplier
        "res_mult_out": unsigned(16),  # the result's multiplier
        "res_shift": unsigned(_RES_SHIFT_BITS),
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
        "dst": _BUF,                 # row m, beat b: word dst + b·stride + m (scale: last)
        "stride": _BUF,
        "rows": unsigned(_TOKENS_BITS),
        "length": unsigned(_TOKENS_BITS),
        "mult": unsigned(16),        # P·V's requantization, applied per row with 2^31 / Σe
        "shift": unsigned(6),
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
    Opcode.ROUTE: data.StructLayout({
        "src": _BUF,                 # INT16 logits: token m, expert e at word
        #                              src + (e÷(C/2))·stride + m, bytes 2(e mod C/2), +1
        "stride": _BUF,
        "rows": unsigned(_TOKENS_BITS),  # tokens M
        "experts": unsigned(8),      # E
        "top_k": unsigned(4),        # k
    }),
    Opcode.EXPERTS: data.StructLayout({
        "order": ExpertOrder,
        "body": unsigned(8),         # instructions in the loop body (the ones that follow)
        "stride": _DDR,              # bytes between consecutive experts' DDR blocks
    }),
    Opcode.COMBINE: data.StructLayout({
        "src": _BUF,                 # expert outputs in queue order: word src + s·src_stride + q
        "src_stride": _BUF,
        "dst": _BUF,                 # token t, slice s: word dst + s·dst_stride + t
        "dst_stride": _BUF,
        "rows": unsigned(_TOKENS_BITS),  # tokens M (≤ the last ROUTE's rows)
        "beats": unsigned(_TILES_BITS),  # D / C
        "mult": unsigned(16),
        "shift": unsigned(6),
        # A residual add of x (token t, slice s at word res_src + s·dst_stride + t) to each
        # output word before it is written.
        "residual": unsigned(1),
        "res_src": _BUF,
        "res_mult_buf": unsigned(16),
        "res_mult_out": unsigned(16),
        "res_shift": unsigned(_RES_SHIFT_BITS),
    }),
}

_ARG_BITS = INSTRUCTION_BITS - 8
for _op, _layout in OPERANDS.items():
    assert _layout.size <= _ARG_BITS, (_op, _layout.size)

#: One instruction word: the opcode and a union of every operand struct.
_PAD_BITS = _ARG_BITS - max(layout.size for layout in OPERANDS.values())
INSTRUCTION = data.StructLayout({
    "opcode": Opcode,
    "args": data.UnionLayout({op.name.lower(): layout for op, layout in OPERANDS.items()
                              if layout.size}),
    # No zero-width field when the widest operands fill the word (Verilator ASCRANGE).
    **({"pad": unsigned(_PAD_BITS)} if _PAD_BITS else {}),
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
    for enum_type in (WeightSource, TableUnit, GemmMode, RowMode, ExpertOrder):
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
    from .isa_checks import checks_table  # it builds on this module's declarations

    checks = ["| check | error code |", "|---|---|"]
    checks += [f"| {check} | `{code}` |" for check, code in checks_table()]
    return ("\n".join(lines).rstrip() + "\n"
            + _ISA_SEMANTICS.replace("{checks}", "\n".join(checks)))


_OPCODE_DOCS = {
    Opcode.END: "stop: STATUS.DONE is set and the accelerator goes idle",
    Opcode.NOP: "do nothing",
    Opcode.TASKS: "set the per-task DDR stride; `TASK_SELECT` ≥ `count` stops with BAD_TASK",
    Opcode.LOAD: "DDR → buffer: `words` words to `dst + i·dst_stride`",
    Opcode.STORE: "buffer → DDR: words `src + i·src_stride`",
    Opcode.LOAD_TABLE: "load a 256-entry table into the unit `unit`",
    Opcode.GEMM: "one pass of the PE array (bias, requantization, optional table, optional "
                 "residual add)",
    Opcode.LAYERNORM: "integer LayerNorm of `rows` token rows of `beats` words",
    Opcode.SOFTMAX: "row softmax of `rows` rows of `length` INT8 logits (7-bit probabilities "
                    "relative to the row's largest, and each row's scale for P·V)",
    Opcode.RESIDUAL: "residual add of two ranges of `words` words",
    Opcode.ROUTE: "MoE gate over `rows` tokens: router scores, top-`top_k` of `experts`, "
                  "per-expert token queues",
    Opcode.EXPERTS: "run the next `body` instructions once per active expert (or per token "
                    "slot)",
    Opcode.COMBINE: "score-weighted sum of each token's `top_k` expert outputs, requantized "
                    "(optional residual add)",
}

_ISA_SEMANTICS = """
## Semantics and checks

Instructions run one at a time, in order; an instruction starts when the previous one has
written its last result (to the buffer, or to DDR with every write response back). One
overlap, invisible to results: once a `GEMM` with its results in the buffer (not INT32) has
issued its DDR stream (weights and parameters, or parameters only), the next instruction
is fetched and checked; if it is such a `GEMM` too, its stream is issued at once, behind
the first's (the PE array's double buffer takes its first tile while the previous `GEMM`
computes), and its buffer reads and writes start after the previous `GEMM`'s last result.
This is how the next expert's weights are prefetched. Where neither `GEMM` adds a fused
residual and none of the second's read ranges (activations, buffer weights) meets the
first's results, the second's reads start as soon as the first has taken its last token,
and its writes after the first's last result (attention's P·V and the next head's Q·Kᵀ;
an expert's FC2 and the next expert's FC1). A `LAYERNORM` after such a
`GEMM` reads its parameters behind the `GEMM`'s stream too; its buffer walks start after
the `GEMM`'s last result.
A `SOFTMAX` runs in the background: once it has started, the next instruction is fetched
and checked, and if it is a `GEMM` none of whose buffer ranges (activations, results,
weights or residual x) meets the softmax's (a `GEMM` read of its probabilities, a `GEMM`
write of its logits or probabilities), it runs beside the softmax; any other instruction,
`END` included, waits for the softmax's last probability. The results are those of running
the program in order.
Instructions are fetched a 256-byte line (eight instructions) at a
time into a small cache that every `START` empties: a program must not change itself
while it runs (no `STORE` into the program), and a line may read up to 224 bytes past the
program's end (the runtime puts the data image there). DDR streams may start at any
16-byte boundary; the compiler aligns them to one read entry (256 bytes on the three-port
ZCU104), where the DMA reads them without realigning. The DMA moves whole AXI beats: the
bits of `DATA_BASE + offset` below a beat are dropped (a transfer at offset 753 starts at
752), while the checks use the offset as written.
Before an instruction starts, the controller checks it; a failing check stops the run
cleanly (nothing of that instruction has started) with STATUS.ERROR, `ERROR_CODE` and
`ERROR_PC` = the instruction's index:

{checks}

A DDR access answered with SLVERR or DECERR lets the instruction finish, then stops with
`AXI_RESPONSE`; `CONTROL.ABORT` stops after the current instruction with `ABORTED`.

`GEMM` buffer walks, with R = `pe_rows`, C = `pe_cols`, G = `gemm_cols` (the PE array's
N width) and V = G / C = `gemm_words`, for N-tile j, K-slice s, word v of a tile and row m
(mapped by the row modes below inside an `EXPERTS` body):

- activations: lane r of word `src + s·src_stride + m` is `X[m, s·R + r]`;
- INT8 results: lane c of word `dst + (j·V + v)·dst_stride + m` is `Y[m, j·G + v·C + c]`;
- `wsrc = BUFFER_ROWS` (P·V): lane c of word `wbuf + (j·V + v)·wstride + s·R + r` is
  `W[j·G + v·C + c, s·R + r]`;
- `wsrc = BUFFER_COLUMNS` (Q·Kᵀ): lane r of word `wbuf + s·wstride + j·G + c` is
  `W[j·G + c, s·R + r]`. Its N channels are keys, as many as its M `tokens` (queries):
  with INT8 or INT8_TABLE results and no `residual`, a result word whose first channel
  `j·G + v·C` is ≥ `tokens` holds no key and is not written (the buffer keeps what was
  there; the checks still bound the whole range). It would only pad the last N-tile, and
  skipping it leaves the write port to the background softmax.

A `GEMM` (weights from DDR, INT8 results) or a `COMBINE` with `residual` set does a
residual add in its output stage: each output word y, before it is written, becomes

    sat8(round_half_up((x · res_mult_buf + y · res_mult_out) / 2^res_shift))

lane by lane (`numerics.residual_add`), x being the word at the same place of the range
that starts at `wbuf` (`GEMM`: the walk of its results, from `wbuf` instead of `dst`) or at
`res_src` (`COMBINE`: token t, slice s at `res_src + s·dst_stride + t`). x is read through
read port B, each word before the sum of its place is written, so the sum may overwrite x
(`wbuf = dst`). It is the `RESIDUAL` that would follow, without writing y and reading it
back: one instruction and a pass over the buffer less per residual add.

DDR layouts read by the instructions (the compiler writes them, zero-padded to whole AXI
beats):

- `GEMM`, `wsrc = DDR`: for each N-tile j: G = `gemm_cols` parameter records (8 bytes
  each: bias int32, multiplier uint16, shift uint8, one zero byte), then for each K-slice s
  the R = `pe_rows` rows of the weight tile, row r = `W[j·G + c, s·R + r]` for c = 0…G−1
  (G bytes).
  With weights from the buffer, only the parameter records.
- `LAYERNORM`: per channel 16 bytes: bias int64, gain int16, six zero bytes.
- `LOAD_TABLE`: 256 entries (INT8 for `GEMM`, uint16 little-endian for `SOFTMAX`).
- `GEMM` in mode `INT32` writes, for each N-tile j and token m, G little-endian INT32.
- `EXPERTS`: expert e's DDR block is at `e · stride` from expert 0's; a body `GEMM` with
  `expert` set reads its stream at `ddr + e · stride` (FC1 and FC2 of one expert are
  usually one block, FC2's stream right after FC1's).

A `SOFTMAX` writes, for row m (`numerics.softmax`, `numerics.row_scale`), B =
⌈(`length` + 3) / C⌉ words: its probabilities `p = round_half_up(127 · e / 2^15)`,
relative to the row's largest — lane c of word `dst + b·stride + m` is `p[m, b·C + c]`,
lanes past `length` 0 — and its **scale** in the top three lanes of the last, word `dst +
(B − 1)·stride + m`: lane C − 3 and C − 2 the multiplier `M_m` (uint16, little-endian),
lane C − 1 the shift `sh_m`, where `(M_m, sh_m) = row_scale(floor(2^31 / Σe), mult,
shift)`. Those lanes lie past the row's last key (B·C − 3 ≥ `length`): a row whose last
word has no three lanes to spare gets a word more. A `GEMM` with `row_scale` set (mode
`INT8`; `pe_rows` ≥ 4) reads that layout as its activations (`k_slices` = B): row m's
scale is lanes R − 3 … R − 1 of its last K-slice (word `src + (k_slices − 1)·src_stride +
m`), which count as 0 in the sums, and its results are `sat8(round_half_up((acc + bias) ·
M_m / 2^sh_m))`: the multiplier and shift of its parameter records are not used.

A `GEMM` in mode `INT16` (the router's logits) requantizes as `INT8` but saturates to
INT16 (`numerics.requantize16`) and writes 2V words per token and N-tile: bytes 2c and
2c + 1 of word `dst + (j·2V + v)·dst_stride + m` are channel `j·G + v·C/2 + c`
(little-endian), v = 0 … 2V − 1.

A `GEMM`'s `acc + bias` is an INT32 register (it wraps) and only the low six bits of a
record's shift byte are used (0 … 63; the compiler writes 0 … 62). Results the ISA leaves
**unspecified** — they depend on the order of work inside a unit, or on memory no
instruction defines; the ISA model (`m3vit.sw.compiler.isa_model`) lists such instructions
in `IsaMachine.unspecified`, and the differential fuzzer
(`m3vit.sw.bench.program_fuzz`) compares only where such a run stops:

- an instruction that writes a buffer word twice, or writes a word one of its own reads
  also reads other than in place (in place: the read is the written words, element by
  element, as `RESIDUAL` with `dst = src_a`, a row-wise op with `dst = src`, or a residual
  add with `wbuf = dst`);
- a body `GEMM` with `src_rows = GATHER` over more rows than the routed entries left from
  its iteration's offset (the rows past them read whatever the queue memory holds);
- a `SOFTMAX` or `ROUTE` with an exp table whose row sums fall below 2^15 (every
  `numerics.exp_table` has E[0] = 2^15; the unit's reciprocal has 17 bits);
- a `LAYERNORM` with `eps_term` 0 over a row whose values are all equal (the reciprocal
  square root of a zero variance; the quantizer writes `eps_term` ≥ 1).

(The model runs a `SOFTMAX` whose output overlaps its input other than in place row by
row, each row read whole before it is written, as the unit does; the result stays
unspecified.)

## The MoE layer: `ROUTE`, `EXPERTS`, `COMBINE`

`ROUTE` computes, for each of `rows` tokens, the router scores of `numerics.router_scores`
over its `experts` INT16 logits (a `GEMM` in mode `INT16` writes them: logit e of token m
is bytes 2c, 2c + 1 of word `src + (e ÷ (C/2))·stride + m`, c = e mod C/2) with the
softmax unit's exp table (load the task's table first), indexed with `(max − l) >> 8`,
and picks the `top_k` largest **logits** (ties to the lower expert index; `numerics.route`).
It then builds the dispatch tables, which stay until the next `ROUTE`:

- `count[e]`: tokens that chose expert e; `start[e] = Σ_{e' < e} count[e']`;
- the **queue**: positions `start[e] … start[e] + count[e] − 1` hold, in ascending order,
  the tokens that chose e (`rows · top_k` positions in all, grouped by expert);
- the **active list**: the experts with `count[e] > 0`, in visit order: sorted by count
  (descending, ties to the lower expert index), then taken from both ends in turn — the
  largest, the smallest, the second largest, the second smallest, … (`visit_order` of
  `m3vit.sw.compiler.isa_model`);
- **slots**: for token t and choice j (descending score), the expert, its score and the
  queue position `pos(t, j)` of that choice.

`EXPERTS` runs the `body` instructions after it once per iteration, then continues after
them. Each iteration has a context (expert e, queue offset, count):

- `EXPERT_BY_EXPERT`: one iteration per active expert e, in the active list's order: (e,
  `start[e]`, `count[e]`). Each active expert's weights are read once per layer; experts
  no token chose are never read. The order puts each visit over few tokens, whose weights
  the array would take faster than the DDR reads them, behind one over many, during which
  the DDR read ahead.
- `TOKEN_BY_TOKEN` (the baseline): one iteration per token t and choice j, in token order:
  (expert of slot (t, j), `pos(t, j)`, 1). Every choice reads its expert's weights again.
- `REGISTER`: the order `SCHEDULE.ORDER` holds when the run starts.

With no `ROUTE` since the start of the run there are no iterations and the body is skipped
(unchecked). Body instructions are checked at every iteration, with that iteration's
context; a failing one stops with its own index as `ERROR_PC`. `ROUTE` uses whatever exp
table the softmax unit holds (the attention's table must be loaded again after it); an
all-zero table gives every score 0 (the top-k still ranks the logits).
Inside a body, a `GEMM` with `expert` set runs the iteration's `count` tokens (its `tokens`
field is ignored) with its DDR stream offset by `e · stride`, and maps its row m through
`src_rows` / `dst_rows`: `DIRECT` row m, `QUEUE` row `offset + m`, `GATHER` (activations
only) row `queue[offset + m]`. Both schedules write each (token, choice) result at the same
queue row, so `COMBINE` then computes the same output from either:

    out[t] = sat8(round_half_up((Σ_j score(t, j) · y[pos(t, j)]) · mult / 2^shift))

reading `y[q]` slice s at word `src + s·src_stride + q` and writing word
`dst + s·dst_stride + t` (`numerics.moe_combine`). Buffer and DDR ranges of a body `GEMM`
are checked per iteration with the rows it actually touches: `count` for `DIRECT`,
`offset + count` for `QUEUE`, the routed `rows` for `GATHER`.
"""


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/isa.md``, or with ``--check`` exit 1 if it is stale; ``argv`` defaults
    to ``sys.argv[1:]`` (:func:`~m3vit.hw.docgen.generated_doc_main`)."""
    return generated_doc_main(argv, module="m3vit.hw.isa",
                              description="Generate docs/isa.md from the instruction set's "
                                          "tables.",
                              path=Path(__file__).resolve().parents[1] / "docs" / "isa.md",
                              text=isa_markdown)


if __name__ == "__main__":
    sys.exit(main())
