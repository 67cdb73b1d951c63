"""An instruction-level model of the accelerator: the ISA's meaning in a few lines each.

:func:`execute` runs a program (``docs/isa.md``) on a DDR image and an activation buffer
with the integer functions of :mod:`m3vit.sw.quant.numerics`, instruction by instruction. It is
the reference the compiler is tested against without hardware, and the oracle that tells
whether a mismatch in an RTL bench is the compiler's or the hardware's. It models what an
instruction computes and which DDR bytes it moves, not cycles.

Every instruction is checked before it runs, as the controller does (the checks table of
``docs/isa.md``): a failing check raises :class:`MachineStop` with the
:class:`~m3vit.hw.registers.ErrorCode` the hardware would report and the failing ``pc``.
Each run also records its DDR accesses (:class:`DdrAccess`) and the iterations of every
``EXPERTS`` loop (:class:`ExpertLoop`), so tests can count weight traffic per schedule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from m3vit.hw.config import AccelConfig
from m3vit.hw.isa import (
    GEMM_RECORD_BYTES,
    INSTRUCTION_BYTES,
    LN_RECORD_BYTES,
    ExpertOrder,
    GemmMode,
    IsaError,
    Opcode,
    RowMode,
    TableUnit,
    WeightSource,
    decode,
    softmax_words,
)
from m3vit.hw.isa_checks import (
    BODY_ONLY_FIELDS,
    FLAG_REQUIRES,
    NOT_IN_BODY,
    SHAPE_BOUNDS,
    allowed_values,
    enum_fields,
)
from m3vit.hw.registers import ErrorCode, Schedule

from ..errors import M3VitError
from ..quant import numerics as nx

__all__ = [
    "DdrAccess",
    "Dispatch",
    "ExpertLoop",
    "IsaMachine",
    "Iteration",
    "MachineStop",
    "dispatch_tables",
    "execute",
    "visit_order",
]

#: Bytes of one table of each unit in DDR.
_TABLE_BYTES = {TableUnit.GEMM: 256, TableUnit.SOFTMAX: 512}
#: The softmax unit's 17-bit reciprocal of a row sum of 0 (no exp table loaded): all ones.
RCP_OF_ZERO = (1 << 17) - 1


class MachineStop(M3VitError):
    """The hardware would stop the run here with STATUS.ERROR.

    Attributes
    ----------
    code : ErrorCode
        ``ERROR_CODE`` the controller reports.
    pc : int
        ``ERROR_PC``: index of the failing instruction.
    """

    def __init__(self, code: ErrorCode, pc: int, message: str):
        super().__init__(f"instruction {pc}: {message} ({code.name})")
        self.code = code
        self.pc = pc


@dataclass(frozen=True)
class DdrAccess:
    """One DDR transfer of one executed instruction (whole AXI beats where the ISA says so).

    ``expert`` is the ``EXPERTS`` iteration's expert for an instruction of a loop body
    (``None`` outside one).
    """

    pc: int
    op: Opcode
    offset: int
    size: int
    write: bool
    expert: int | None = None


@dataclass(frozen=True)
class Iteration:
    """Context of one ``EXPERTS`` iteration: expert, queue offset and token count."""

    expert: int
    offset: int
    count: int


@dataclass(frozen=True)
class ExpertLoop:
    """One executed ``EXPERTS`` instruction: its pc, the order it ran and its iterations."""

    pc: int
    order: ExpertOrder
    iterations: tuple[Iteration, ...]


@dataclass(frozen=True)
class Dispatch:
    """The dispatch tables a ``ROUTE`` builds (``docs/isa.md``, "The MoE layer").

    Attributes
    ----------
    rows, top_k : int
        Routed tokens M and choices per token k.
    experts, scores, pos : torch.Tensor
        (M, k) slots: token t's choice j (descending score), its score, its queue position.
    count, start : torch.Tensor
        (E,) tokens per expert and the first queue position of each expert's group.
    queue : torch.Tensor
        (M·k,) token of each queue position: grouped by expert, tokens ascending.
    active : torch.Tensor
        Experts with ``count > 0`` in ``EXPERT_BY_EXPERT``'s visit order
        (:func:`visit_order`).
    """

    rows: int
    top_k: int
    experts: torch.Tensor
    scores: torch.Tensor
    pos: torch.Tensor
    count: torch.Tensor
    start: torch.Tensor
    queue: torch.Tensor
    active: torch.Tensor

    def iterations(self, order: ExpertOrder) -> tuple[Iteration, ...]:
        """The ``EXPERTS`` iterations of ``order`` (``EXPERT_BY_EXPERT`` or ``TOKEN_BY_TOKEN``)."""
        if order == ExpertOrder.EXPERT_BY_EXPERT:
            return tuple(Iteration(e, int(self.start[e]), int(self.count[e]))
                         for e in self.active.tolist())
        return tuple(Iteration(e, q, 1) for e, q in zip(self.experts.reshape(-1).tolist(),
                                                        self.pos.reshape(-1).tolist(),
                                                        strict=True))


def visit_order(count) -> list[int]:
    """The active list: the experts with a token, in ``EXPERT_BY_EXPERT``'s visit order.

    Sorted by count (descending, ties to the lower expert index), the experts are taken
    from both ends in turn: the largest, the smallest, the second largest, the second
    smallest, … — so each visit over few tokens, whose weights the array would take faster
    than the DDR reads them, follows one over many, during which the DDR read ahead
    (``docs/isa.md``, "The MoE layer").

    Parameters
    ----------
    count : sequence of int
        Tokens per expert.
    """
    ranked = sorted((e for e, c in enumerate(count) if c), key=lambda e: (-count[e], e))
    n = len(ranked)
    return [ranked[v // 2] if v % 2 == 0 else ranked[n - 1 - v // 2] for v in range(n)]


def dispatch_tables(logits: torch.Tensor, scores: torch.Tensor, top_k: int) -> Dispatch:
    """Top-k of (M, E) router logits, their scores and the per-expert queues, vectorised."""
    m, n_experts = scores.shape
    experts, _ = nx.top_k(logits, top_k)
    chosen = torch.as_tensor(scores, dtype=torch.int64).gather(-1, experts)
    flat_e = experts.reshape(-1)
    flat_t = torch.arange(m).repeat_interleave(top_k)
    # Unique keys (a token chooses an expert at most once): expert-major, token-ascending.
    order = torch.argsort(flat_e * m + flat_t)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(m * top_k)
    count = torch.bincount(flat_e, minlength=n_experts)
    return Dispatch(rows=m, top_k=top_k, experts=experts, scores=chosen,
                    pos=pos.reshape(m, top_k), count=count, start=torch.cumsum(count, 0) - count,
                    queue=flat_t[order],
                    active=torch.tensor(visit_order(count.tolist()), dtype=torch.int64))


@dataclass
class IsaMachine:
    """State of the modelled accelerator: buffer, DDR data window, tables and run records.

    Attributes
    ----------
    accesses : list of DdrAccess
        Every DDR transfer of the run, in order (instruction fetches excluded).
    loops : list of ExpertLoop
        Every executed ``EXPERTS`` instruction.
    executed : int
        Instructions executed (each body instruction once per iteration).
    unspecified : list of (int, str)
        Instructions whose result the ISA leaves unspecified (``docs/isa.md``), with why.
    completed : Counter
        Instructions that completed, by opcode (``END`` and each ``EXPERTS`` once).
    """

    config: AccelConfig
    ddr: bytearray
    buffer: np.ndarray = None
    gemm_table: torch.Tensor = field(default_factory=lambda: torch.zeros(256, dtype=torch.int64))
    exp_table: torch.Tensor = field(default_factory=lambda: torch.zeros(256, dtype=torch.int64))
    task_select: int = 0
    task_offset: int = 0
    schedule: Schedule = Schedule.EXPERT_BY_EXPERT
    dispatch: Dispatch | None = None
    accesses: list[DdrAccess] = field(default_factory=list)
    loops: list[ExpertLoop] = field(default_factory=list)
    executed: int = 0
    unspecified: list[tuple[int, str]] = field(default_factory=list)
    completed: Counter = field(default_factory=Counter)
    pc: int = 0
    _footprint: tuple[list, list] | None = None

    def __post_init__(self):
        if self.buffer is None:
            self.buffer = np.zeros((self.config.act_buffer_words, self.config.pe_cols), np.int8)

    def _bytes(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.ddr):
            raise M3VitError(f"DDR access [{offset}, {offset + size}) is outside the image")
        return bytes(self.ddr[offset:offset + size])

    def words(self, addrs) -> torch.Tensor:
        """Buffer words at ``addrs`` (any shape) → (..., C) INT8 as int64."""
        addrs = np.asarray(addrs)
        if self._footprint is not None:
            self._footprint[0].append(addrs.reshape(-1))
        return torch.from_numpy(self.buffer[addrs].astype(np.int64))

    def put(self, addrs, values) -> None:
        """Write ``values`` ((..., C) INT8) to the buffer words at ``addrs``."""
        addrs = np.asarray(addrs)
        if self._footprint is not None:
            self._footprint[1].append(addrs.reshape(-1))
        self.buffer[addrs] = values

    def _watch(self) -> None:
        self._footprint = ([], [])

    def _overlapped(self) -> bool:
        """Whether the instruction just run wrote a buffer word twice, or a word one of its
        reads also read other than in place (a read that is the written words, element by
        element: each word is read before its result replaces it). Its result then depends
        on the order inside the unit, which the ISA leaves unspecified (``docs/isa.md``)."""
        reads, writes = self._footprint
        self._footprint = None
        if not writes:
            return False
        written = np.concatenate(writes)
        if np.unique(written).size != written.size:
            return True     # a word written twice: which result stays is the unit's order
        return any(not np.array_equal(r, written) and np.intersect1d(r, written).size
                   for r in reads)

    # ---- run statistics ------------------------------------------------------------------

    def read_counts(self, offset: int, size: int) -> np.ndarray:
        """How many times the run read each byte of DDR ``[offset, offset + size)``."""
        delta = np.zeros(size + 1, np.int64)
        for acc in self.accesses:
            lo, hi = max(acc.offset, offset), min(acc.offset + acc.size, offset + size)
            if not acc.write and lo < hi:
                delta[lo - offset] += 1
                delta[hi - offset] -= 1
        return np.cumsum(delta[:-1])

    @property
    def bytes_read(self) -> int:
        """DDR bytes read by the run's instructions (program fetches excluded)."""
        return sum(a.size for a in self.accesses if not a.write)

    @property
    def bytes_written(self) -> int:
        """DDR bytes written by the run."""
        return sum(a.size for a in self.accesses if a.write)


# ---- checks (docs/isa.md, "Semantics and checks") ---------------------------------------


def _rows_extent(mode: int, rows: int, it: Iteration | None, routed: int) -> int:
    """Rows of the buffer a body GEMM's operand reaches: ``count`` for DIRECT, ``offset +
    count`` for QUEUE, the routed rows for GATHER."""
    if mode == RowMode.QUEUE.value:
        return it.offset + rows
    if mode == RowMode.GATHER.value:
        return routed
    return rows


def _last_word(base: int, *loops: tuple[int, int]) -> int:
    """Last word of a range ``base + Σ i_l · stride_l`` over ``(count, stride)`` loops."""
    return base + sum((n - 1) * s for n, s in loops if n > 0)


def buffer_span(base: int, *loops: tuple[int, int]) -> tuple[int, int]:
    """First and last word of a range ``base + Σ i_l · stride_l`` over ``(count, stride)``
    loops."""
    return base, _last_word(base, *loops)


def gemm_buffer_ranges(a: dict, cfg: AccelConfig, src_rows: int, dst_rows: int
                       ) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """A GEMM's buffer ranges as the checks bound them: its reads (activations over
    ``src_rows`` rows, then the weights from the buffer or a fused residual's x over
    ``dst_rows``) and its results range (``None`` for INT32 results, which go to DDR)."""
    R, G, V = cfg.pe_rows, cfg.gemm_cols, cfg.gemm_words
    reads = [buffer_span(a["src"], (a["k_slices"], a["src_stride"]), (src_rows, 1))]
    if a["wsrc"] == WeightSource.BUFFER_ROWS.value:
        reads.append((a["wbuf"], _last_word(a["wbuf"] + R - 1, (a["n_tiles"] * V, a["wstride"]),
                                            (a["k_slices"], R))))
    elif a["wsrc"] == WeightSource.BUFFER_COLUMNS.value:
        reads.append((a["wbuf"], _last_word(a["wbuf"] + G - 1, (a["k_slices"], a["wstride"]),
                                            (a["n_tiles"], G))))
    elif a["residual"]:
        reads.append(buffer_span(a["wbuf"], (a["n_tiles"] * V, a["dst_stride"]),
                                 (dst_rows, 1)))
    if a["mode"] == GemmMode.INT32.value:
        return reads, None
    out_words = 2 * V if a["mode"] == GemmMode.INT16.value else V
    return reads, buffer_span(a["dst"], (a["n_tiles"] * out_words, a["dst_stride"]),
                              (dst_rows, 1))


def _gemm_rows(a: dict, it: Iteration | None) -> int:
    """Rows a GEMM runs: the iteration's count for an expert GEMM, else ``tokens``."""
    return it.count if a["expert"] and it is not None else a["tokens"]


def _gemm_stream_bytes(a: dict, cfg: AccelConfig) -> int:
    tiles = a["k_slices"] * cfg.pe_rows * cfg.gemm_cols \
        if a["wsrc"] == WeightSource.DDR.value else 0
    return a["n_tiles"] * (GEMM_RECORD_BYTES * cfg.gemm_cols + tiles)


def _gemm_ddr_offset(mc: IsaMachine, a: dict, it: Iteration | None, stride: int) -> int:
    offset = a["ddr"] + (mc.task_offset if a["per_task"] else 0)
    if a["expert"] and it is not None:
        offset += it.expert * stride
    return offset


def _beat_start(mc: IsaMachine, offset: int) -> int:
    """Where a DDR transfer at ``offset`` starts: the DMA addresses whole AXI beats, so the
    low log2(``axi_bytes``) bits of an address are dropped (``DATA_BASE`` is beat-aligned);
    the checks still use ``offset`` itself (``docs/isa.md``)."""
    return offset & ~(mc.config.axi_bytes - 1)


def _beats(nbytes: int, cfg: AccelConfig) -> int:
    """``nbytes`` rounded up to whole AXI beats."""
    return -(-nbytes // cfg.axi_bytes) * cfg.axi_bytes


def _check(mc: IsaMachine, pc: int, op: Opcode, a: dict, it: Iteration | None,
           in_body: bool, stride: int) -> None:
    """Raise :class:`MachineStop` if the controller would refuse to start this instruction."""
    cfg = mc.config
    C = cfg.pe_cols
    G, V = cfg.gemm_cols, cfg.gemm_words  # an N-tile: V words of C lanes

    def stop(code: ErrorCode, why: str):
        raise MachineStop(code, pc, f"{op.name}: {why}")

    # ILLEGAL_OPCODE (m3vit.hw.isa_checks: the rules the controller checks, declared once)
    if in_body and op in NOT_IN_BODY:
        stop(ErrorCode.ILLEGAL_OPCODE, "not allowed inside an EXPERTS body")
    for name, shape in enum_fields(op):
        if a[name] not in allowed_values(op, name):
            value = shape(a[name]).name if a[name] in {m.value for m in shape} else a[name]
            stop(ErrorCode.ILLEGAL_OPCODE, f"{name} {value}")
    if not in_body and any(a[name] for name in BODY_ONLY_FIELDS.get(op, ())):
        stop(ErrorCode.ILLEGAL_OPCODE, f"{' / '.join(BODY_ONLY_FIELDS[op])} set outside an "
                                       "EXPERTS body")
    for (flag_op, flag), needs in FLAG_REQUIRES.items():
        if flag_op == op and a[flag]:
            for name, values in needs.items():
                if a[name] not in {v.value for v in values}:
                    stop(ErrorCode.ILLEGAL_OPCODE, f"{flag} with {name} {a[name]}")

    # SHAPE_OVER_CAPACITY: the declared bounds, then the ones that depend on run-time state.
    routed = mc.dispatch.rows if mc.dispatch is not None else 0
    # An expert GEMM in a body runs the iteration's count; its ``tokens`` field is ignored.
    values = {**a, "tokens": _gemm_rows(a, it)} if op == Opcode.GEMM else a
    for bound in SHAPE_BOUNDS.get(op, ()):
        if not bound.holds(values[bound.field], cfg):
            stop(ErrorCode.SHAPE_OVER_CAPACITY, f"{bound.field} {values[bound.field]}")
    if op == Opcode.ROUTE and a["top_k"] > a["experts"]:
        stop(ErrorCode.SHAPE_OVER_CAPACITY, f"top_k {a['top_k']} > experts {a['experts']}")
    if op == Opcode.COMBINE and not 1 <= a["rows"] <= routed:
        stop(ErrorCode.SHAPE_OVER_CAPACITY, f"rows {a['rows']} (routed rows {routed})")
    if op == Opcode.GEMM and a["residual"] and \
            a["n_tiles"] * V * values["tokens"] > cfg.max_residual_words:
        stop(ErrorCode.SHAPE_OVER_CAPACITY,
             f"a fused residual of {a['n_tiles'] * V * values['tokens']} words")

    # ADDRESS_OUT_OF_RANGE
    words: list[int] = []            # last buffer word of each range
    ddr: list[tuple[int, int]] = []  # (offset, bytes)
    if op == Opcode.GEMM:
        m = _gemm_rows(a, it)
        reads, results = gemm_buffer_ranges(a, cfg, _rows_extent(a["src_rows"], m, it, routed),
                                            _rows_extent(a["dst_rows"], m, it, routed))
        # In the order activations, results, weights (the first past the buffer is named).
        words.append(reads[0][1])
        if results is None:
            ddr.append((a["out_ddr"], a["n_tiles"] * m * 4 * G))
        else:
            words.append(results[1])
        words += [last for _, last in reads[1:]]
        ddr.append((_gemm_ddr_offset(mc, a, it, stride), _gemm_stream_bytes(a, cfg)))
    elif op in (Opcode.LAYERNORM, Opcode.SOFTMAX):
        beats = a["beats"] if op == Opcode.LAYERNORM else -(-a["length"] // C)
        words.append(_last_word(a["src"], (beats, a["stride"]), (a["rows"], 1)))
        # A SOFTMAX's rows end with their scale, three lanes more.
        out = beats if op == Opcode.LAYERNORM else softmax_words(a["length"], C)
        words.append(_last_word(a["dst"], (out, a["stride"]), (a["rows"], 1)))
        if op == Opcode.LAYERNORM:
            ddr.append((a["ddr"], beats * LN_RECORD_BYTES * C))
    elif op == Opcode.RESIDUAL:
        words += [_last_word(a[k], (a["words"], 1)) for k in ("src_a", "src_b", "dst")]
    elif op in (Opcode.LOAD, Opcode.STORE):
        base, step = ("dst", "dst_stride") if op == Opcode.LOAD else ("src", "src_stride")
        words.append(_last_word(a[base], (a["words"], a[step])))
        ddr.append((a["ddr"], _beats(a["words"] * C, cfg)))
    elif op == Opcode.LOAD_TABLE:
        ddr.append((a["ddr"] + (mc.task_offset if a["per_task"] else 0),
                    _TABLE_BYTES[TableUnit(a["unit"])]))
    elif op == Opcode.ROUTE:
        # INT16 logits: C/2 experts a word.
        words.append(_last_word(a["src"], (-(-a["experts"] // (C // 2)), a["stride"]),
                                (a["rows"], 1)))
    elif op == Opcode.COMBINE:
        entries = routed * mc.dispatch.top_k
        words.append(_last_word(a["src"], (a["beats"], a["src_stride"]), (entries, 1)))
        words.append(_last_word(a["dst"], (a["beats"], a["dst_stride"]), (a["rows"], 1)))
        if a["residual"]:
            words.append(_last_word(a["res_src"], (a["beats"], a["dst_stride"]),
                                    (a["rows"], 1)))
    for last in words:
        if last >= cfg.act_buffer_words:
            stop(ErrorCode.ADDRESS_OUT_OF_RANGE,
                 f"buffer word {last} past the buffer's {cfg.act_buffer_words}")
    for offset, size in ddr:
        if offset + size > len(mc.ddr):
            stop(ErrorCode.ADDRESS_OUT_OF_RANGE,
                 f"DDR [{offset}, {offset + size}) past DATA_SIZE {len(mc.ddr)}")


# ---- instructions -----------------------------------------------------------------------


def _gemm_params(raw: bytes, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rec = np.frombuffer(raw, np.uint8).reshape(n, GEMM_RECORD_BYTES)
    bias = rec[:, 0:4].copy().view("<i4").reshape(n).astype(np.int64)
    mult = rec[:, 4:6].copy().view("<u2").reshape(n).astype(np.int64)
    # The requantizer's shift is 6 bits wide: the record byte's upper two bits are unused
    # (the compiler writes 0 … 62 there).
    shift = (rec[:, 6] & 63).astype(np.int64)
    return tuple(torch.from_numpy(v) for v in (bias, mult, shift))


def _wrap32(v: torch.Tensor) -> torch.Tensor:
    """``v`` modulo 2^32 as a signed INT32 (the hardware's 32-bit registers)."""
    return ((v + (1 << 31)) & 0xFFFF_FFFF) - (1 << 31)


def _row_map(mc: IsaMachine, mode: RowMode, m: int, it: Iteration | None) -> np.ndarray:
    """Buffer row of GEMM row m = 0…m−1 under ``mode`` (``docs/isa.md``, row modes)."""
    rows = np.arange(m)
    if mode == RowMode.QUEUE:
        return it.offset + rows
    if mode == RowMode.GATHER:
        queue = mc.dispatch.queue.numpy()
        at = it.offset + rows
        if at.size and at[-1] >= len(queue):
            # A body GEMM of more rows than the routed entries left from its iteration's
            # offset: the controller does not refuse it and the rows past them read
            # whatever the queue memory holds, which the ISA leaves unspecified.
            mc.unspecified.append((mc.pc, "a gather past the routed entries"))
            return np.where(at < len(queue), queue[np.minimum(at, len(queue) - 1)], 0)
        return queue[at]
    return rows


def _gemm(mc: IsaMachine, pc: int, a: dict, it: Iteration | None, stride: int) -> None:
    cfg = mc.config
    R, C, G = cfg.pe_rows, cfg.pe_cols, cfg.gemm_cols
    m, ks, nt = _gemm_rows(a, it), a["k_slices"], a["n_tiles"]
    k, n = ks * R, nt * G
    # The buffer sees an N-tile as V = G / C words: output channels q·C … q·C + C − 1 are
    # word-slice q = j·V + v, for nq = nt·V word-slices.
    nq = n // C
    src_rows = _row_map(mc, RowMode(a["src_rows"]), m, it)
    dst_rows = _row_map(mc, RowMode(a["dst_rows"]), m, it)
    # X[m, s·R + r] = word src + s·src_stride + row(m)
    x = mc.words(a["src"] + np.arange(ks)[:, None] * a["src_stride"] + src_rows[None, :])
    x = x.permute(1, 0, 2).reshape(m, k)
    if a["row_scale"]:
        # (M_m, sh_m): lanes R − 3, R − 2 (uint16) and the low six bits of lane R − 1 of
        # the last K-slice, which count as 0 in the sums.
        word = x[:, k - 3:] & 0xFF
        mult, shift = (word[:, 0] | word[:, 1] << 8)[:, None], (word[:, 2] & 63)[:, None]
        x = x.clone()
        x[:, k - 3:] = 0
    wsrc = WeightSource(a["wsrc"])
    offset = _beat_start(mc, _gemm_ddr_offset(mc, a, it, stride))
    tile = R * G
    per_tile = GEMM_RECORD_BYTES * G + (ks * tile if wsrc == WeightSource.DDR else 0)
    stream = mc._bytes(offset, nt * per_tile)
    mc.accesses.append(DdrAccess(pc, Opcode.GEMM, offset, len(stream), False,
                                 it.expert if it is not None else None))
    chunks = np.frombuffer(stream, np.uint8).reshape(nt, per_tile)
    bias, ch_mult, ch_shift = _gemm_params(chunks[:, :GEMM_RECORD_BYTES * G].tobytes(), n)
    if not a["row_scale"]:
        mult, shift = ch_mult, ch_shift
    if wsrc == WeightSource.DDR:
        # (j, s, r, c) → W[j·G + c, s·R + r]
        t = chunks[:, GEMM_RECORD_BYTES * G:].view(np.int8).reshape(nt, ks, R, G)
        w = torch.from_numpy(t.transpose(0, 3, 1, 2).reshape(n, k).astype(np.int64))
    elif wsrc == WeightSource.BUFFER_ROWS:
        # W[q·C + c, s·R + r] = word(wbuf + q·wstride + s·R + r)[c], q = j·V + v
        q, s, r = np.meshgrid(np.arange(nq), np.arange(ks), np.arange(R), indexing="ij")
        t = mc.words(a["wbuf"] + q * a["wstride"] + s * R + r)       # (nq, ks, R, C)
        w = t.permute(0, 3, 1, 2).reshape(n, k)
    else:
        # W[j·G + c, s·R + r] = word(wbuf + s·wstride + j·G + c)[r]: the word's R lanes
        # (R = C in the top)
        j, c, s = np.meshgrid(np.arange(nt), np.arange(G), np.arange(ks), indexing="ij")
        t = mc.words(a["wbuf"] + s * a["wstride"] + j * G + c)       # (nt, G, ks, C)
        w = t[..., :R].reshape(n, k)
    mode = GemmMode(a["mode"])
    if mode == GemmMode.INT32:
        acc = nx.gemm(x, w, bias)
        raw = acc.reshape(m, nt, G).permute(1, 0, 2).numpy().astype("<i4").tobytes()
        out = _beat_start(mc, a["out_ddr"])
        mc.ddr[out:out + len(raw)] = raw
        mc.accesses.append(DdrAccess(pc, Opcode.GEMM, out, len(raw), True,
                                     it.expert if it is not None else None))
        return
    # acc + bias is an INT32 register in the requantizer: it wraps, as the accumulators
    # do (the quantizer keeps real models far from the edge; a stray stream need not).
    if mode == GemmMode.INT16:
        # 2V words a token and N-tile; bytes 2c, 2c + 1 of word q hold channel q·C/2 + c.
        y16 = nx.requantize16(_wrap32(nx.gemm(x, w, bias)), mult, shift)
        y = torch.stack([y16 & 0xFF, y16 >> 8], dim=-1).reshape(m, 2 * nq, C)
        y = torch.where(y > 127, y - 256, y).permute(1, 0, 2)
        words = np.arange(2 * nq)[:, None] * a["dst_stride"] + dst_rows[None, :]
        mc.put(a["dst"] + words, y.numpy().astype(np.int8))
        return
    y = nx.requantize(_wrap32(nx.gemm(x, w, bias)), mult, shift)
    if mode == GemmMode.INT8_TABLE:
        y = nx.table_lookup(y, mc.gemm_table)
    y = y.reshape(m, nq, C).permute(1, 0, 2)
    words = np.arange(nq)[:, None] * a["dst_stride"] + dst_rows[None, :]
    if a["residual"]:
        y = _fused_residual(mc, a, a["wbuf"] + words, y)
    elif wsrc == WeightSource.BUFFER_COLUMNS:
        # Q·Kᵀ: word-slices whose first channel is past its m keys are not written.
        keyed = -(-m // C)
        words, y = words[:keyed], y[:keyed]
    mc.put(a["dst"] + words, y.numpy().astype(np.int8))


def _fused_residual(mc: IsaMachine, a: dict, x_words: np.ndarray,
                    y: torch.Tensor) -> torch.Tensor:
    """A ``GEMM``'s or ``COMBINE``'s ``residual``: x (the words at ``x_words``, read before
    any result is written) added to the results ``y`` (shaped as ``x_words`` × lanes)."""
    x = mc.words(x_words)
    return nx.residual_add(x, y, a["res_mult_buf"], a["res_mult_out"], a["res_shift"])


def _row_addrs(a: dict, beats: int, src: str) -> np.ndarray:
    """(rows, beats) word addresses of a row-wise op: row m, beat b = base + b·stride + m."""
    return a[src] + np.arange(beats)[None, :] * a["stride"] + np.arange(a["rows"])[:, None]


def _live_rows(mc: IsaMachine, total: torch.Tensor) -> torch.Tensor:
    """The rows whose exponentials do not all vanish (``total``: their sums, (rows, 1)); a
    row of zeros means no exp table was loaded. Notes a sum below 2^15 as unspecified."""
    if bool(((total > 0) & (total < 1 << 15)).any()):
        # The unit's reciprocal has 17 bits, enough for a row sum ≥ 2^15 (E[0] = 2^15, as
        # every numerics.exp_table has): a table that lets a sum fall below is unspecified.
        mc.unspecified.append((mc.pc, "an exp table whose row sums fall below 2^15"))
    return total.reshape(-1) > 0


def _zero_safe(mc: IsaMachine, fn, logits: torch.Tensor, table: torch.Tensor,
               exp=nx.softmax_exp) -> torch.Tensor:
    """``fn(logits, table)`` (router scores; ``exp`` their numerators and sums) with rows
    whose exponentials are all zero (no exp table loaded) giving 0, as the hardware does
    (its reciprocal of 0 is all ones, multiplied by zero numerators)."""
    _, total = exp(logits, table)
    live = _live_rows(mc, total)
    out = torch.zeros_like(logits)
    out[live] = fn(logits[live], table)
    return out


def _softmax(mc: IsaMachine, a: dict) -> None:
    """``SOFTMAX``: row m's probabilities in words ``dst + b·stride + m``, its scale in
    the last one's top three lanes (``docs/isa.md``)."""
    C = mc.config.pe_cols
    beats, out_beats = -(-a["length"] // C), softmax_words(a["length"], C)
    src, dst = _row_addrs(a, beats, "src"), _row_addrs(a, out_beats, "dst")
    # The unit takes a row at a time, reading all of it before writing it: when the
    # output overlaps the input, a row reads what earlier rows wrote (unspecified, as
    # every such overlap where a row writes more words than it reads), so the model goes
    # row by row too; else all rows at once.
    groups = ([np.arange(a["rows"])] if not np.intersect1d(src, dst).size
              else [np.array([r]) for r in range(a["rows"])])
    for rows in groups:
        x = mc.words(src[rows]).reshape(len(rows), beats * C)[:, :a["length"]]
        _, total = nx.softmax_exp(x, mc.exp_table)
        # A row whose exponentials are all zero (no table loaded): probabilities 0, and
        # the hardware's reciprocal of 0 is all ones.
        live = _live_rows(mc, total)
        p = torch.zeros_like(x)
        rcp = torch.full_like(total, RCP_OF_ZERO)
        p[live], rcp[live] = nx.softmax(x[live], mc.exp_table)
        scale, sh = nx.row_scale(rcp, a["mult"], a["shift"])
        out = torch.zeros(len(rows), out_beats * C, dtype=torch.int64)
        out[:, :a["length"]] = p
        out[:, -3], out[:, -2], out[:, -1] = scale[:, 0] & 0xFF, scale[:, 0] >> 8, sh[:, 0]
        out = out.reshape(len(rows), out_beats, C)
        # Bytes ≥ 128 of the scale are stored as their two's-complement INT8.
        out = torch.where(out > 127, out - 256, out)
        mc.put(dst[rows], out.numpy().astype(np.int8))


def _route(mc: IsaMachine, a: dict) -> None:
    H = mc.config.pe_cols // 2
    n_experts, rows = a["experts"], a["rows"]
    beats = -(-n_experts // H)
    # INT16 logit of token m, expert e at word src + (e ÷ H)·stride + m, lanes 2(e mod H)
    # (low byte) and 2(e mod H) + 1.
    words = mc.words(_row_addrs(a, beats, "src")).reshape(rows, beats * H, 2)
    logits = ((words[..., 1] << 8) | (words[..., 0] & 0xFF))[:, :n_experts]
    scores = _zero_safe(mc, nx.router_scores, logits, mc.exp_table, nx.router_exp)
    mc.dispatch = dispatch_tables(logits, scores, a["top_k"])


def _combine(mc: IsaMachine, a: dict) -> None:
    d = mc.dispatch
    rows, beats = a["rows"], a["beats"]
    s = np.arange(beats)
    # y[q] slice s at word src + s·src_stride + q: (rows, k, beats, C)
    q = d.pos[:rows].numpy()
    y = mc.words(a["src"] + s[None, None, :] * a["src_stride"] + q[:, :, None])
    y = y.reshape(rows, d.top_k, -1)
    out = nx.moe_combine(y, d.scores[:rows], a["mult"], a["shift"]).reshape(rows, beats, -1)
    words = s[None, :] * a["dst_stride"] + np.arange(rows)[:, None]
    if a["residual"]:
        out = _fused_residual(mc, a, a["res_src"] + words, out)
    mc.put(a["dst"] + words, out.numpy().astype(np.int8))


def _step(mc: IsaMachine, pc: int, op: Opcode, a: dict, it: Iteration | None,
          stride: int) -> None:
    """Execute one checked instruction other than ``END`` and ``EXPERTS``."""
    C = mc.config.pe_cols
    expert = it.expert if it is not None else None
    if op == Opcode.TASKS:
        if mc.task_select >= a["count"]:
            raise MachineStop(ErrorCode.BAD_TASK, pc,
                              f"task {mc.task_select} ≥ {a['count']} tasks")
        mc.task_offset = mc.task_select * a["stride"]
    elif op == Opcode.LOAD:
        start = _beat_start(mc, a["ddr"])
        raw = mc._bytes(start, a["words"] * C)
        idx = a["dst"] + np.arange(a["words"]) * a["dst_stride"]
        mc.put(idx, np.frombuffer(raw, np.int8).reshape(-1, C))
        mc.accesses.append(DdrAccess(pc, op, start, _beats(len(raw), mc.config), False,
                                     expert))
    elif op == Opcode.STORE:
        idx = a["src"] + np.arange(a["words"]) * a["src_stride"]
        raw = mc.words(idx).numpy().astype(np.int8).tobytes()
        size = _beats(len(raw), mc.config)     # the last AXI beat is zero-padded
        start = _beat_start(mc, a["ddr"])
        mc.ddr[start:start + size] = raw + bytes(size - len(raw))
        mc.accesses.append(DdrAccess(pc, op, start, size, True, expert))
    elif op == Opcode.LOAD_TABLE:
        offset = _beat_start(mc, a["ddr"] + (mc.task_offset if a["per_task"] else 0))
        unit = TableUnit(a["unit"])
        raw = mc._bytes(offset, _TABLE_BYTES[unit])
        mc.accesses.append(DdrAccess(pc, op, offset, len(raw), False, expert))
        if unit == TableUnit.GEMM:
            mc.gemm_table = torch.from_numpy(np.frombuffer(raw, np.int8).astype(np.int64))
        else:
            mc.exp_table = torch.from_numpy(np.frombuffer(raw, "<u2").astype(np.int64))
    elif op == Opcode.GEMM:
        _gemm(mc, pc, a, it, stride)
    elif op == Opcode.LAYERNORM:
        beats = a["beats"]
        start = _beat_start(mc, a["ddr"])
        raw = mc._bytes(start, beats * C * LN_RECORD_BYTES)
        mc.accesses.append(DdrAccess(pc, op, start, len(raw), False, expert))
        rec = np.frombuffer(raw, np.uint8).reshape(-1, LN_RECORD_BYTES)
        bias = torch.from_numpy(rec[:, 0:8].copy().view("<i8").reshape(-1))
        gain = torch.from_numpy(rec[:, 8:10].copy().view("<i2").reshape(-1).astype(np.int64))
        x = mc.words(_row_addrs(a, beats, "src")).reshape(a["rows"], beats * C)
        flat = (x == x[:, :1]).all(dim=1)
        if a["eps_term"] == 0 and bool(flat.any()):
            # V = 0: the reciprocal square root of zero (eps_term ≥ 1 is the contract).
            mc.unspecified.append((pc, "a LAYERNORM row of variance 0 with eps_term 0"))
            x = x.clone()
            x[flat, 0] += 1
        y = nx.layernorm(x, gain, bias, a["shift"], a["eps_term"])
        mc.put(_row_addrs(a, beats, "dst"), y.reshape(a["rows"], beats, C).numpy())
    elif op == Opcode.SOFTMAX:
        _softmax(mc, a)
    elif op == Opcode.RESIDUAL:
        n = a["words"]
        x = mc.words(a["src_a"] + np.arange(n))
        y = mc.words(a["src_b"] + np.arange(n))
        out = nx.residual_add(x, y, a["mult_a"], a["mult_b"], a["shift"])
        mc.put(a["dst"] + np.arange(n), out.numpy().astype(np.int8))
    elif op == Opcode.ROUTE:
        _route(mc, a)
    elif op == Opcode.COMBINE:
        _combine(mc, a)


def execute(config: AccelConfig, program: bytes, ddr: bytearray, task_select: int = 0,
            max_instructions: int = 100_000,
            schedule: Schedule = Schedule.EXPERT_BY_EXPERT,
            watch_overlaps: bool = False) -> IsaMachine:
    """Run ``program`` on the DDR data window ``ddr`` (modified in place) until ``END``.

    Parameters
    ----------
    config : AccelConfig
        The accelerator the program is for.
    program : bytes
        Encoded instructions.
    ddr : bytearray
        The data window (``DATA_BASE`` … ``DATA_BASE + DATA_SIZE``); written in place.
    task_select : int
        ``TASK_SELECT``.
    max_instructions : int
        Executed instructions (loop bodies counted per iteration) before giving up.
    schedule : Schedule
        ``SCHEDULE.ORDER``: the order of ``EXPERTS`` loops with ``order = REGISTER``.
    watch_overlaps : bool
        Also record in ``unspecified`` every instruction whose buffer writes meet its own
        reads other than in place (slower). ``unspecified`` always lists the instructions
        whose result the ISA leaves unspecified, with why.

    Returns
    -------
    IsaMachine
        The final state, with the run's DDR accesses and ``EXPERTS`` iterations.

    Raises
    ------
    MachineStop
        For an instruction the hardware would stop on (its error code, pc and why).
    M3VitError
        For a program that runs past its end or past ``max_instructions``.
    """
    mc = IsaMachine(config, ddr, task_select=task_select, schedule=Schedule(schedule))
    register_order = (ExpertOrder.EXPERT_BY_EXPERT if mc.schedule == Schedule.EXPERT_BY_EXPERT
                      else ExpertOrder.TOKEN_BY_TOKEN)

    def fetch(pc: int) -> tuple[Opcode, dict]:
        word = program[pc * INSTRUCTION_BYTES:(pc + 1) * INSTRUCTION_BYTES]
        if len(word) < INSTRUCTION_BYTES:
            raise M3VitError(f"the program ran past its last instruction ({pc}) without END")
        try:
            return decode(word)
        except IsaError:
            raise MachineStop(ErrorCode.ILLEGAL_OPCODE, pc,
                              f"opcode 0x{word[0]:02x} is not in the instruction set") from None

    def start(pc: int, op: Opcode, a: dict, it: Iteration | None, stride: int) -> None:
        """Count and check one instruction, as the controller does before it starts one."""
        if mc.executed >= max_instructions:
            raise M3VitError(f"the program did not reach END within {max_instructions} "
                             "instructions")
        mc.executed += 1
        _check(mc, pc, op, a, it, it is not None, stride)

    def step(pc: int, op: Opcode, a: dict, it: Iteration | None, stride: int) -> None:
        mc.pc = pc
        if watch_overlaps:
            mc._watch()
        _step(mc, pc, op, a, it, stride)
        mc.completed[op] += 1
        if watch_overlaps and mc._overlapped():
            mc.unspecified.append((pc, "buffer writes meet each other or the instruction's "
                                       "own reads"))

    pc = 0
    while True:
        op, a = fetch(pc)
        start(pc, op, a, None, 0)
        if op == Opcode.END:
            mc.completed[op] += 1
            return mc
        if op != Opcode.EXPERTS:
            step(pc, op, a, None, 0)
            pc += 1
            continue
        order = ExpertOrder(a["order"])
        if order == ExpertOrder.REGISTER:
            order = register_order
        # With no ROUTE since the start of the run there are no iterations.
        iterations = mc.dispatch.iterations(order) if mc.dispatch is not None else ()
        mc.loops.append(ExpertLoop(pc, order, iterations))
        mc.completed[Opcode.EXPERTS] += 1
        for it in iterations:
            for q in range(pc + 1, pc + 1 + a["body"]):
                body_op, body_a = fetch(q)
                start(q, body_op, body_a, it, a["stride"])
                step(q, body_op, body_a, it, a["stride"])
        pc += 1 + a["body"]
