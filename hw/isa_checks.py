"""What the controller checks before an instruction starts, declared once.

Three things are declared here and nowhere else:

* which field values make an instruction illegal (``ILLEGAL_OPCODE``):
  :data:`NOT_IN_BODY`, :data:`BODY_ONLY_FIELDS`, :data:`FLAG_REQUIRES` and
  :func:`allowed_values`;
* which counts are bounded by which capacity of the configuration
  (``SHAPE_OVER_CAPACITY``): :data:`SHAPE_BOUNDS`, whose capacities are
  :class:`~m3vit.hw.config.AccelConfig` attributes (``max_gemm_width`` and
  ``max_residual_words`` among them);
* the text of the checks table in ``docs/isa.md`` (:func:`checks_table`).

The controller's check unit builds its comparators from these declarations, the ISA model
(:mod:`m3vit.sw.compiler.isa_model`) evaluates the same declarations on integers, and the
compiler refuses a model by the same capacities, so the three cannot drift apart. A few
rules depend on run-time state rather than on one field, and both implementations state
them next to a reference to this module:

* an expert ``GEMM`` in an ``EXPERTS`` body runs the iteration's token count, which takes
  the place of ``tokens`` in its bound;
* ``ROUTE`` needs ``top_k ≤ experts``;
* ``COMBINE`` needs a ``ROUTE`` earlier in the run and ``rows ≤`` the routed rows.
* a ``GEMM`` with ``residual`` set writes at most ``max_residual_words`` words
  (``n_tiles · gemm_words`` × its token count).

The buffer and DDR ranges an instruction touches (``ADDRESS_OUT_OF_RANGE``) are computed by
the hardware and by the model each in its own terms; a differential test runs every
bad-program case through both and compares error code and ``pc``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from amaranth.hdl import Shape
from amaranth.lib import enum

from .config import AccelConfig
from .isa import OPERANDS, ExpertOrder, GemmMode, Opcode, RowMode, TableUnit, WeightSource

__all__ = [
    "BODY_ONLY_FIELDS",
    "FLAG_REQUIRES",
    "NOT_IN_BODY",
    "SHAPE_BOUNDS",
    "CountBound",
    "allowed_values",
    "checks_table",
    "enum_fields",
]


#: Opcodes that end or restructure control flow, so may not sit in an ``EXPERTS`` body.
NOT_IN_BODY: frozenset[Opcode] = frozenset(
    {Opcode.EXPERTS, Opcode.ROUTE, Opcode.TASKS, Opcode.END})

#: Fields that only mean something inside an ``EXPERTS`` body: non-zero outside one is
#: ``ILLEGAL_OPCODE`` (an expert block or a queue row needs an iteration's context).
BODY_ONLY_FIELDS: Mapping[Opcode, tuple[str, ...]] = {
    Opcode.GEMM: ("expert", "src_rows", "dst_rows"),
}

#: Enum fields that admit fewer than all their members; every other enum field admits
#: exactly its members (the unassigned encodings, e.g. ``wsrc = 3``, are illegal).
_RESTRICTED: Mapping[tuple[Opcode, str], tuple[enum.Enum, ...]] = {
    # A gather is a read: results go to the iteration's own rows (DIRECT or QUEUE).
    (Opcode.GEMM, "dst_rows"): (RowMode.DIRECT, RowMode.QUEUE),
}


#: One-bit fields that only combine with some values of other enum fields: with the flag
#: set, each listed field must hold one of its listed values, else ``ILLEGAL_OPCODE``.
FLAG_REQUIRES: Mapping[tuple[Opcode, str], Mapping[str, tuple[enum.Enum, ...]]] = {
    # The residual's x comes through read port B, which is free only while the weights
    # stream from DDR, and is added to INT8 results (not INT32 ones headed for DDR).
    (Opcode.GEMM, "residual"): {"wsrc": (WeightSource.DDR,),
                                "mode": (GemmMode.INT8, GemmMode.INT8_TABLE)},
    # A row's multiplier and shift replace the requantizer's per-channel ones: INT8 only.
    (Opcode.GEMM, "row_scale"): {"mode": (GemmMode.INT8,)},
}


def enum_fields(op: Opcode) -> tuple[tuple[str, type[enum.Enum]], ...]:
    """The enum-valued operand fields of ``op``, in layout order."""
    return tuple((name, field.shape) for name, field in OPERANDS[op]
                 if isinstance(field.shape, type) and issubclass(field.shape, enum.Enum))


def allowed_values(op: Opcode, name: str) -> tuple[int, ...]:
    """Encodings a legal instruction may hold in enum field ``name`` of ``op``."""
    shape = dict(enum_fields(op))[name]
    members = _RESTRICTED.get((op, name), tuple(shape))
    return tuple(member.value for member in members)


@dataclass(frozen=True)
class CountBound:
    """``1 ≤ field`` and, with a capacity, ``field · unit ≤ capacity``.

    Attributes
    ----------
    field : str
        The operand field (a count of tokens, words, beats, slices, tiles …).
    capacity : str or None
        The :class:`AccelConfig` attribute that bounds it; ``None``: only ``≥ 1``.
    unit : str or None
        The :class:`AccelConfig` attribute the field counts in (``pe_rows`` for K-slices,
        ``gemm_cols`` for N-tiles, ``pe_cols`` for beats); ``None``: the field itself is compared.
    """

    field: str
    capacity: str | None = None
    unit: str | None = None

    def scale(self, config: AccelConfig) -> int:
        """What one unit of the field is worth against the capacity."""
        return 1 if self.unit is None else getattr(config, self.unit)

    def limit(self, config: AccelConfig) -> int | None:
        """The largest ``field · unit`` allowed (``None``: no upper bound)."""
        return None if self.capacity is None else getattr(config, self.capacity)

    def holds(self, value: int, config: AccelConfig) -> bool:
        """Whether ``value`` of the field passes (integer evaluation, the ISA model's)."""
        limit = self.limit(config)
        return value >= 1 and (limit is None or value * self.scale(config) <= limit)

    def text(self) -> str:
        """The bound as ``docs/isa.md`` writes it (the ``≥ 1`` is said once for all)."""
        if self.capacity is None:
            return f"`{self.field}`"
        lhs = f"`{self.field}`" + ("" if self.unit is None else f" · `{self.unit}`")
        return f"{lhs} ≤ `{self.capacity}`"


#: Per opcode, the counts checked against the configuration before the instruction starts.
SHAPE_BOUNDS: Mapping[Opcode, tuple[CountBound, ...]] = {
    Opcode.LOAD: (CountBound("words"),),
    Opcode.STORE: (CountBound("words"),),
    Opcode.GEMM: (CountBound("tokens", "max_tokens"),
                  CountBound("k_slices", "max_gemm_width", "pe_rows"),
                  CountBound("n_tiles", "max_gemm_width", "gemm_cols")),
    Opcode.LAYERNORM: (CountBound("rows", "max_tokens"),
                       CountBound("beats", "max_dim", "pe_cols")),
    Opcode.SOFTMAX: (CountBound("rows", "max_tokens"),
                     CountBound("length", "max_tokens")),
    Opcode.RESIDUAL: (CountBound("words", "max_residual_words"),),
    Opcode.ROUTE: (CountBound("rows", "max_tokens"),
                   CountBound("top_k", "max_top_k"),
                   CountBound("experts", "max_experts")),
    Opcode.EXPERTS: (CountBound("body"),),
    Opcode.COMBINE: (CountBound("rows"), CountBound("beats", "max_dim", "pe_cols")),
}


def _illegal_text() -> str:
    unassigned = []
    for op in Opcode:
        for name, shape in enum_fields(op):
            bad = sorted(set(range(1 << Shape.cast(shape).width))
                         - set(allowed_values(op, name)))
            if bad:
                names = [shape(v).name if v in {m.value for m in shape} else str(v)
                         for v in bad]
                unassigned.append(f"`{op.name}.{name}` {' or '.join(names)}")
    body_only = "; ".join(f"`{op.name}` with {' / '.join(f'`{f}`' for f in fields)} "
                          f"non-zero outside an `EXPERTS` body"
                          for op, fields in BODY_ONLY_FIELDS.items())
    inside = ", ".join(f"`{op.name}`" for op in Opcode if op in NOT_IN_BODY)
    flags = "; ".join(
        f"`{op.name}` with `{flag}` set and " + " or ".join(
            f"`{name}` not {' / '.join(v.name for v in values)}"
            for name, values in needs.items())
        for (op, flag), needs in FLAG_REQUIRES.items())
    return (f"opcode not in the table above; {'; '.join(unassigned)}; {body_only}; "
            f"{flags}; {inside} inside a body")


def _shape_text() -> str:
    parts = [f"`{op.name}` {', '.join(b.text() for b in bounds)}"
             for op, bounds in SHAPE_BOUNDS.items()]
    return ("a count below 1 or over its capacity: " + "; ".join(parts)
            + "; `ROUTE` with `top_k` > `experts`; `COMBINE` with no `ROUTE` before it or "
            "`rows` > the routed rows; a `GEMM` with `residual` whose results (`n_tiles` · "
            "`gemm_words` · tokens words) exceed `max_residual_words`; in a body, an expert "
            "`GEMM`'s iteration count takes the place of `tokens`. Capacities: "
            "`max_gemm_width` = max(`max_hidden`, 3 · `max_dim`, `max_tokens` + `gemm_cols`), "
            "`max_residual_words` = `max_tokens` · `max_dim` / `pe_cols`")


def checks_table() -> list[tuple[str, str]]:
    """(check, error code) rows of ``docs/isa.md``'s checks table, in priority order."""
    return [
        (_illegal_text(), "ILLEGAL_OPCODE"),
        (_shape_text(), "SHAPE_OVER_CAPACITY"),
        ("a buffer range past the buffer's last word, or a DDR range past `DATA_SIZE`",
         "ADDRESS_OUT_OF_RANGE"),
        ("`TASK_SELECT` ≥ `TASKS.count`", "BAD_TASK"),
    ]


# Each enum named here must be one the operand layouts use (a renamed enum fails loudly).
assert {WeightSource, TableUnit, RowMode, ExpertOrder, GemmMode} <= {
    shape for op in Opcode for _, shape in enum_fields(op)}
