"""Programs for the accelerator benches: single instructions on random data, a dense block.

Used by the cocotb benches of the engine and the accelerator (``tests/sim/top/``), the SoC
model's test (``tests/sim/test_soc.py``) and the benchmarks
:mod:`~m3vit.sw.bench.block_latency` and :mod:`~m3vit.sw.bench.moe_layer`. Each builder
returns a :class:`Case`: the program, the DDR data window, and the expected window after
the run, computed by the instruction-level model (:mod:`m3vit.sw.compiler.isa_model`,
itself checked against the golden model in ``tests/sw/test_lower.py``) — or, for the
dense block, the golden model's block output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from m3vit.hw.config import AccelConfig
from m3vit.hw.isa import (
    GEMM_RECORD_BYTES,
    INSTRUCTION_BYTES,
    OPERANDS,
    ExpertOrder,
    GemmMode,
    Opcode,
    RowMode,
    TableUnit,
    WeightSource,
    intake_beats,
    softmax_words,
)
from m3vit.hw.registers import ErrorCode, Schedule

from ..compiler.isa_model import MachineStop, execute
from ..compiler.layout import unslice
from ..compiler.lower import (
    DdrImage,
    Program,
    compile_dense_block,
    gemm_stream,
    layernorm_records,
)
from ..quant import numerics as nx


@dataclass
class Case:
    """One run: program, DDR window before and expected after (or an expected error)."""

    name: str
    program: bytes
    ddr: bytes
    expected: bytes | None = None
    error: ErrorCode = ErrorCode.NONE
    error_pc: int = 0
    task_select: int = 0
    check: object = None   # callable(ddr_after) -> None for cases with their own check
    schedule: int = 0      # SCHEDULE.ORDER for the run
    meta: dict | None = None


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _i8(rng: np.random.Generator, *shape) -> np.ndarray:
    """Random INT8 with the edges well represented."""
    x = rng.integers(-128, 128, size=shape, dtype=np.int64)
    edges = rng.random(size=shape) < 0.05
    x[edges] = rng.choice([-128, 127, 0, -1], size=int(edges.sum()))
    return x.astype(np.int8)


def _finish(name: str, cfg: AccelConfig, prog: Program, img: DdrImage, task: int = 0) -> Case:
    before = bytes(img.data)
    after = bytearray(before)
    execute(cfg, prog.encode(), after, task_select=task)
    return Case(name, prog.encode(), before, bytes(after), task_select=task)


def gemm_case(cfg: AccelConfig, seed: int, tokens: int, k_slices: int, n_tiles: int,
              mode: GemmMode, wsrc: WeightSource, residual: bool = False,
              row_scale: bool = False) -> Case:
    """LOAD X (and on-chip weights), one GEMM, STORE (or INT32 straight to DDR).

    A ``BUFFER_COLUMNS`` pass with INT8 results finds random words where it writes: the
    words past its keys keep them.

    With ``residual`` (weights from DDR, INT8 results) the GEMM adds random x words in its
    output stage, read from the words it writes (in place, as the compiler's blocks do
    not, to show each x word is read before its sum is written). With ``row_scale``
    (mode INT8) each token's multiplier and shift are the top three lanes of its last
    K-slice, as P·V's from a softmax (X's values there are not used).
    """
    rng = np.random.default_rng(seed)
    R, C, G, V = cfg.pe_rows, cfg.pe_cols, cfg.gemm_cols, cfg.gemm_words
    K, N = k_slices * R, n_tiles * G
    img, prog = DdrImage(align=cfg.axi_bytes), Program()
    x = _i8(rng, tokens, K)
    # X slice-major with stride = tokens + 3 (a gap, to exercise the strides).
    stride = tokens + 3
    src = 5
    xs = np.zeros((k_slices, stride, C), np.int8)
    xs[:, :tokens] = x.reshape(tokens, k_slices, C).transpose(1, 0, 2)
    if row_scale:
        # The last slice's top lanes: each token's (M, sh), from its own generator so the
        # other draws (and the cases without row_scale) stay as they were.
        rs = np.random.default_rng([seed, 1])
        scale = np.zeros((stride, 3), np.int64)
        scale[:tokens, 0:2] = rs.integers(0, 256, size=(tokens, 2))
        scale[:tokens, 2] = rs.integers(12, 40, size=tokens)
        scale[rs.random(stride) < 0.1, 2] = rs.choice([0, 63, 62 + 128])
        xs[-1, :, C - 3:] = np.where(scale > 127, scale - 256, scale).astype(np.int8)
    prog.add(Opcode.LOAD, ddr=img.put("x", xs.tobytes()), dst=src, dst_stride=1,
             words=k_slices * stride)
    bias = rng.integers(-2**20, 2**20, size=N)
    mult = rng.integers(0, 2**16, size=N)
    shift = rng.integers(8, 30, size=N)
    wbuf, wstride = src + k_slices * stride + 7, 0
    if wsrc == WeightSource.DDR:
        w = _i8(rng, N, K)
        ddr = img.put("w", gemm_stream(w, bias, mult, shift, cfg))
    else:
        # Weights as buffer words: ROWS tile (j, s) row r = words wbuf + (j·V + v)·wstride +
        # s·R + r side by side; COLUMNS tile (j, s) column c = word wbuf + s·wstride + j·G + c.
        wstride = (k_slices * R if wsrc == WeightSource.BUFFER_ROWS else n_tiles * G) + 2
        outer = n_tiles * V if wsrc == WeightSource.BUFFER_ROWS else k_slices
        words = _i8(rng, outer * wstride, C)
        prog.add(Opcode.LOAD, ddr=img.put("wbuf", words.tobytes()), dst=wbuf, dst_stride=1,
                 words=outer * wstride)
        ddr = img.put("params", gemm_stream(None, bias, mult, shift, cfg, weights=False))
    if mode == GemmMode.INT8_TABLE:
        table = _i8(rng, 256)
        prog.add(Opcode.LOAD_TABLE, unit=TableUnit.GEMM, ddr=img.put("table", table.tobytes()))
    dst = wbuf + (n_tiles * G + 2) * (k_slices * R + 2) + 11 if wsrc != WeightSource.DDR \
        else wbuf
    out_ddr = img.reserve("out", n_tiles * tokens * 4 * G) if mode == GemmMode.INT32 else 0
    fused = {}
    if residual:
        words = n_tiles * V * tokens
        prog.add(Opcode.LOAD, ddr=img.put("x_res", _i8(rng, words, C).tobytes()), dst=dst,
                 dst_stride=1, words=words)
        wbuf = dst
        fused = dict(residual=1, res_mult_buf=int(rng.integers(0, 2**16)),
                     res_mult_out=int(rng.integers(0, 2**16)),
                     res_shift=int(rng.integers(12, 32)))
    if wsrc == WeightSource.BUFFER_COLUMNS and mode in (GemmMode.INT8, GemmMode.INT8_TABLE):
        # Q·Kᵀ does not write the words past its keys: they keep defined words, drawn
        # from their own generator (the other draws stay as they were).
        words = n_tiles * V * tokens
        kept = np.random.default_rng([seed, 2]).integers(-128, 128, size=(words, C))
        prog.add(Opcode.LOAD, ddr=img.put("y_before", kept.astype(np.int8).tobytes()),
                 dst=dst, dst_stride=1, words=words)
    prog.add(Opcode.GEMM, mode=mode, wsrc=wsrc, tokens=tokens, k_slices=k_slices,
             n_tiles=n_tiles, src=src, src_stride=stride, dst=dst, dst_stride=tokens,
             wbuf=wbuf, wstride=wstride, ddr=ddr, out_ddr=out_ddr, row_scale=int(row_scale),
             **fused)
    if mode != GemmMode.INT32:
        # Contiguous (dst_stride = tokens): no word the GEMM did not write or the case
        # did not load is stored, so what earlier cases left in the buffer cannot leak
        # into the comparison. INT16 results are 2V words a token and N-tile.
        words = n_tiles * V * tokens * (2 if mode == GemmMode.INT16 else 1)
        prog.add(Opcode.STORE, ddr=img.reserve("y", words * C), src=dst, src_stride=1,
                 words=words)
    prog.add(Opcode.END)
    name = (f"gemm_{mode.name}_{wsrc.name}{'_residual' if residual else ''}"
            f"{'_row_scale' if row_scale else ''}")
    return _finish(f"{name}_m{tokens}_k{k_slices}_n{n_tiles}", cfg, prog, img)


def vector_case(cfg: AccelConfig, seed: int, op: Opcode, rows: int, length: int) -> Case:
    """LOAD, one LAYERNORM / SOFTMAX / RESIDUAL, STORE the result."""
    rng = np.random.default_rng(seed)
    C = cfg.pe_cols
    img, prog = DdrImage(align=cfg.axi_bytes), Program()
    beats = _ceil(length, C)
    words = beats * rows
    prog.add(Opcode.LOAD, ddr=img.put("a", _i8(rng, words, C).tobytes()), dst=0, dst_stride=1,
             words=words)
    out = 2 * words + 3
    if op == Opcode.LAYERNORM:
        d = beats * C
        gain = rng.integers(-2**15, 2**15, size=d)
        bias = rng.integers(-2**40, 2**40, size=d)
        prog.add(Opcode.LAYERNORM, src=0, dst=out, stride=rows, rows=rows, beats=beats,
                 shift=int(rng.integers(20, 40)), eps_term=int(rng.integers(0, 2**20)),
                 ddr=img.put("ln", layernorm_records(gain, bias)))
    elif op == Opcode.SOFTMAX:
        table = nx.exp_table(float(rng.uniform(0.02, 0.2))).numpy().astype("<u2")
        prog.add(Opcode.LOAD_TABLE, unit=TableUnit.SOFTMAX, ddr=img.put("exp", table.tobytes()))
        prog.add(Opcode.SOFTMAX, src=0, dst=out, stride=rows, rows=rows, length=length,
                 mult=int(rng.integers(0, 2**16)), shift=int(rng.integers(0, 63)))
        words = softmax_words(length, C) * rows  # a row's scale ends its probabilities
    else:
        prog.add(Opcode.LOAD, ddr=img.put("b", _i8(rng, words, C).tobytes()), dst=words + 1,
                 dst_stride=1, words=words)
        prog.add(Opcode.RESIDUAL, src_a=0, src_b=words + 1, dst=out, words=words,
                 mult_a=int(rng.integers(0, 2**16)), mult_b=int(rng.integers(0, 2**16)),
                 shift=int(rng.integers(10, 26)))
    prog.add(Opcode.STORE, ddr=img.reserve("y", words * C), src=out, src_stride=1, words=words)
    prog.add(Opcode.END)
    return _finish(f"{op.name.lower()}_r{rows}_l{length}", cfg, prog, img)


#: What the GEMM after a background softmax touches (:func:`softmax_overlap_case`).
SOFTMAX_HAZARDS = ("none", "reads_probs", "writes_logits", "writes_probs")


def softmax_overlap_case(cfg: AccelConfig, seed: int, hazard: str) -> Case:
    """A ``SOFTMAX`` (which runs in the background), then a GEMM of weights from the buffer
    that reads the softmax's probabilities, writes over its logits or its probabilities, or
    touches neither (:data:`SOFTMAX_HAZARDS`); every region stored. The hardware must give
    the in-order result of the ISA model: it holds the GEMM back on a hazard."""
    rng = np.random.default_rng(seed)
    C, R, G, V = cfg.pe_cols, cfg.pe_rows, cfg.gemm_cols, cfg.gemm_words
    rows, length = cfg.max_tokens, 2 * C + 1
    beats = _ceil(length, C)
    img, prog = DdrImage(align=cfg.axi_bytes), Program()
    words = rows * beats
    out_words = rows * softmax_words(length, C)  # the probabilities, each ending in a scale
    logits, probs = 0, words + 1
    x = probs + out_words + 1
    wbuf = x + words + 1
    dst = {"none": wbuf + words + 1, "reads_probs": wbuf + words + 1,
           "writes_logits": logits, "writes_probs": probs}[hazard]
    src = probs if hazard == "reads_probs" else x
    y_words = rows * V        # one N-tile: V words a token
    for name, base in (("logits", logits), ("x", x), ("w", wbuf)):
        prog.add(Opcode.LOAD, ddr=img.put(name, _i8(rng, words, C).tobytes()), dst=base,
                 dst_stride=1, words=words)
    table = nx.exp_table(float(rng.uniform(0.02, 0.2))).numpy().astype("<u2")
    prog.add(Opcode.LOAD_TABLE, unit=TableUnit.SOFTMAX, ddr=img.put("exp", table.tobytes()))
    prog.add(Opcode.SOFTMAX, src=logits, dst=probs, stride=rows, rows=rows, length=length,
             mult=int(rng.integers(2**15, 2**16)), shift=int(rng.integers(20, 30)))
    params = gemm_stream(None, rng.integers(-2**12, 2**12, size=G),
                         rng.integers(0, 2**16, size=G), rng.integers(8, 20, size=G), cfg,
                         weights=False)
    # Reading the probabilities, the GEMM is P·V: every word of each row, its scale last.
    k_slices = softmax_words(length, C) if hazard == "reads_probs" else 1
    prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.BUFFER_ROWS, tokens=rows,
             k_slices=k_slices, n_tiles=1, src=src, src_stride=rows, dst=dst,
             dst_stride=rows, wbuf=wbuf, wstride=k_slices * R, ddr=img.put("params", params),
             row_scale=int(hazard == "reads_probs"))
    for name, base, n in (("logits_out", logits, words), ("probs_out", probs, out_words),
                          ("y", dst, y_words)):
        prog.add(Opcode.STORE, ddr=img.reserve(name, n * C), src=base, src_stride=1, words=n)
    prog.add(Opcode.END)
    return _finish(f"softmax_then_gemm_{hazard}", cfg, prog, img)


#: How the second of two GEMMs meets the first (:func:`gemm_chain_case`).
GEMM_CHAIN_HAZARDS = ("none", "reads_results", "weights_are_results", "writes_inputs",
                      "touches_last_result")


def gemm_chain_case(cfg: AccelConfig, seed: int, hazard: str, tokens: int | None = None,
                    k_slices: int = 2, n_tiles: int = 2) -> Case:
    """Three GEMMs in a row, each with INT8 results in the buffer (so each hands over to
    the next), the second and third with weights from the buffer; every region stored.

    The second meets the first as ``hazard`` says (:data:`GEMM_CHAIN_HAZARDS`): not at
    all (its reads start as soon as the first has taken its last token), its activations
    or its buffer weights are the first's results, it writes over the first's activations
    (a write after a read), or its activations begin on the first's last result word. The
    third reads nothing of the second. All three are ``tokens`` (default ``3 · pe_rows +
    5``) × ``k_slices`` × ``n_tiles``. The hardware must give the in-order result of the
    ISA model.
    """
    rng = np.random.default_rng(seed)
    R, C, G, V = cfg.pe_rows, cfg.pe_cols, cfg.gemm_cols, cfg.gemm_words
    tokens = min(cfg.max_tokens, 3 * R + 5) if tokens is None else tokens
    ks, nt = k_slices, n_tiles
    img, prog = DdrImage(align=cfg.axi_bytes), Program()
    x_words = ks * tokens                 # a GEMM's activations: ks slices of tokens words
    y_words = nt * V * tokens             # its results
    w_rows = (nt * V) * (ks * R)          # BUFFER_ROWS weights, wstride = ks · R
    w_cols = ks * (nt * G)                # BUFFER_COLUMNS weights, wstride = nt · G
    layout, at = {}, 3
    for name, n in (("x1", x_words), ("y1", y_words), ("x2", max(x_words, y_words)),
                    ("w2", max(w_rows, y_words)), ("y2", y_words), ("x3", x_words),
                    ("w3", w_cols), ("y3", y_words)):
        layout[name], at = at, at + n + 2
    # Every word of the span, gaps included, from DDR: an operand that reaches past its
    # region (small shapes) reads defined words, not what an earlier program left.
    prog.add(Opcode.LOAD, ddr=img.put("span", _i8(rng, at, C).tobytes()), dst=0, dst_stride=1,
             words=at)

    def stream(name: str, w: np.ndarray | None = None) -> int:
        """A GEMM's DDR stream: random parameters, and the weights ``w`` if given."""
        return img.put(name, gemm_stream(w, rng.integers(-2**12, 2**12, size=nt * G),
                                         rng.integers(0, 2**16, size=nt * G),
                                         rng.integers(8, 20, size=nt * G), cfg,
                                         weights=w is not None))

    prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.DDR, tokens=tokens,
             k_slices=ks, n_tiles=nt, src=layout["x1"], src_stride=tokens, dst=layout["y1"],
             dst_stride=tokens, ddr=stream("g1", _i8(rng, nt * G, ks * R)))
    src2, wbuf2, dst2 = layout["x2"], layout["w2"], layout["y2"]
    if hazard == "reads_results":
        src2 = layout["y1"]
    elif hazard == "weights_are_results":
        wbuf2 = layout["y1"]
    elif hazard == "writes_inputs":
        dst2 = layout["x1"]
    elif hazard == "touches_last_result":
        src2 = layout["y1"] + y_words - 1           # its first word is y1's last
    elif hazard != "none":
        raise ValueError(f"hazard {hazard!r}: one of {GEMM_CHAIN_HAZARDS}")
    prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.BUFFER_ROWS, tokens=tokens,
             k_slices=ks, n_tiles=nt, src=src2, src_stride=tokens, dst=dst2,
             dst_stride=tokens, wbuf=wbuf2, wstride=ks * R, ddr=stream("p2"))
    prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.BUFFER_COLUMNS, tokens=tokens,
             k_slices=ks, n_tiles=nt, src=layout["x3"], src_stride=tokens, dst=layout["y3"],
             dst_stride=tokens, wbuf=layout["w3"], wstride=nt * G, ddr=stream("p3"))
    for name in ("x1", "y1", "y2", "y3"):
        base = dst2 if name == "y2" else layout[name]
        n = x_words if name == "x1" else y_words
        prog.add(Opcode.STORE, ddr=img.reserve(f"{name}_out", n * C), src=base, src_stride=1,
                 words=n)
    prog.add(Opcode.END)
    return _finish(f"gemm_chain_{hazard}", cfg, prog, img)


def task_select_case(cfg: AccelConfig, seed: int, task: int, n_tasks: int = 3) -> Case:
    """One program, a per-task GEMM (as the task heads are): ``TASKS`` sets the stride
    between the tasks' weight blocks and ``TASK_SELECT`` picks one."""
    rng = np.random.default_rng(seed)
    R, C, G = cfg.pe_rows, cfg.pe_cols, cfg.gemm_cols
    tokens, k_slices, n_tiles = 9, 2, 2
    img, prog = DdrImage(align=cfg.axi_bytes), Program()
    x = _i8(rng, tokens, k_slices * R)
    xs = x.reshape(tokens, k_slices, C).transpose(1, 0, 2)
    prog.add(Opcode.LOAD, ddr=img.put("x", np.ascontiguousarray(xs).tobytes()), dst=0,
             dst_stride=1, words=k_slices * tokens)
    streams = [gemm_stream(_i8(rng, n_tiles * G, k_slices * R),
                           rng.integers(-2**12, 2**12, size=n_tiles * G),
                           rng.integers(2**10, 2**16, size=n_tiles * G),
                           rng.integers(12, 20, size=n_tiles * G), cfg) for _ in range(n_tasks)]
    first = img.put("task0", streams[0])
    for i, raw in enumerate(streams[1:], start=1):
        img.put(f"task{i}", raw)
    stride = img.regions["task1"][0] - first
    prog.add(Opcode.TASKS, count=n_tasks, stride=stride)
    dst = k_slices * tokens
    prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.DDR, per_task=1, tokens=tokens,
             k_slices=k_slices, n_tiles=n_tiles, src=0, src_stride=tokens, dst=dst,
             dst_stride=tokens, ddr=first)
    words = n_tiles * cfg.gemm_words * tokens
    prog.add(Opcode.STORE, ddr=img.reserve("y", words * C), src=dst, src_stride=1,
             words=words)
    prog.add(Opcode.END)
    return _finish(f"task_select_{task}", cfg, prog, img, task=task)


def strided_load_store_case(cfg: AccelConfig, seed: int) -> Case:
    """LOAD with a stride (odd word counts: a partial last AXI beat), STORE with another."""
    rng = np.random.default_rng(seed)
    C = cfg.pe_cols
    img, prog = DdrImage(align=cfg.axi_bytes), Program()
    n = 37
    # Zero the region first: the buffer keeps what earlier runs left in it.
    prog.add(Opcode.LOAD, ddr=img.put("zeros", bytes(5 * n * C)), dst=1, dst_stride=1,
             words=5 * n)
    prog.add(Opcode.LOAD, ddr=img.put("a", _i8(rng, n, C).tobytes()), dst=3, dst_stride=5,
             words=n)
    prog.add(Opcode.STORE, ddr=img.reserve("y", 5 * n * C), src=1, src_stride=1, words=5 * n)
    prog.add(Opcode.STORE, ddr=img.reserve("z", n * C), src=3, src_stride=5, words=n)
    prog.add(Opcode.END)
    return _finish("load_store_strided", cfg, prog, img)


def long_load_case(cfg: AccelConfig, seed: int, words: int) -> Case:
    """One LOAD of ``words`` words from an entry-aligned DDR address, then a STORE of its
    last 16: a run whose cycles are mostly the LOAD's."""
    rng = np.random.default_rng(seed)
    C = cfg.pe_cols
    img, prog = DdrImage(align=intake_beats(cfg) * cfg.axi_bytes), Program()
    prog.add(Opcode.LOAD, ddr=img.put("a", _i8(rng, words, C).tobytes()), dst=0, dst_stride=1,
             words=words)
    shown = min(16, words)
    prog.add(Opcode.STORE, ddr=img.reserve("y", shown * C), src=words - shown, src_stride=1,
             words=shown)
    prog.add(Opcode.END)
    return _finish("long_load", cfg, prog, img)


def _set_field(raw: bytearray, index: int, op: Opcode, name: str, value: int) -> None:
    """Write ``value`` into field ``name`` of instruction ``index`` of an encoded program,
    bypassing :func:`~m3vit.hw.isa.encode`'s checks (for encodings no enum member has)."""
    field = OPERANDS[op][name]
    word = int.from_bytes(raw[index * INSTRUCTION_BYTES:(index + 1) * INSTRUCTION_BYTES],
                          "little")
    lo = 8 + field.offset
    word &= ~(((1 << field.width) - 1) << lo)
    word |= value << lo
    raw[index * INSTRUCTION_BYTES:(index + 1) * INSTRUCTION_BYTES] = word.to_bytes(
        INSTRUCTION_BYTES, "little")


def model_stop(cfg: AccelConfig, case: Case) -> tuple[ErrorCode, int]:
    """(error code, pc) where the ISA model stops ``case`` (``(NONE, 0)`` if it ends)."""
    try:
        execute(cfg, case.program, bytearray(case.ddr), task_select=case.task_select,
                schedule=case.schedule)
    except MachineStop as stop:
        return stop.code, stop.pc
    return ErrorCode.NONE, 0


def bad_program_cases(cfg: AccelConfig) -> list[Case]:
    """Programs the controller must stop on, each with its error code and failing pc.

    One list for the hardware (``tests/sim/top/test_engine.py``) and the ISA model
    (``tests/sw/test_bad_programs.py``): both must stop on every case with its code at its
    pc, which is what keeps the checks declared in :mod:`m3vit.hw.isa_checks` and the two
    implementations of the address ranges in step. Every check of the ``docs/isa.md``
    table has a case, including the ones where the hardware and the model once disagreed
    (the ``RESIDUAL`` bound, ``LOAD``/``STORE`` past the buffer).
    """
    cases = []
    small = DdrImage(align=cfg.axi_bytes)
    small.put("a", bytes(64))
    # A 4 KiB window whose first 512 bytes are an all-zero exp table: with it every router
    # score is 0 and top-k picks experts 0 … k−1 (ties to the lower index), whatever the
    # buffer holds, so the routed cases route the same on the hardware and the model.
    window = DdrImage(align=cfg.axi_bytes)
    window.put("window", bytes(4096))

    def case(name, code, pc, *instructions, task=0, img=small):
        prog = Program()
        prog.add(Opcode.NOP)
        for op, fields in instructions:
            prog.add(op, **fields)
        prog.add(Opcode.END)
        raw = bytearray(prog.encode())
        cases.append(Case(name, bytes(raw), bytes(img.data), bytes(img.data), code, pc,
                          task_select=task))
        return raw

    def patched(name, code, pc, index, op, field, value, *instructions, img=small):
        raw = case(name, code, pc, *instructions, img=img)
        _set_field(raw, index, op, field, value)
        cases[-1].program = bytes(raw)

    raw = case("illegal_opcode", ErrorCode.ILLEGAL_OPCODE, 1, (Opcode.NOP, {}))
    raw[32] = 0x7F                        # the second instruction becomes opcode 0x7f
    cases[-1].program = bytes(raw)
    gemm = dict(tokens=1, k_slices=1, n_tiles=1)
    case("gemm_residual_int16", ErrorCode.ILLEGAL_OPCODE, 1,
         (Opcode.GEMM, dict(mode=GemmMode.INT16, residual=1, **gemm)))
    patched("gemm_wsrc_3", ErrorCode.ILLEGAL_OPCODE, 1, 1, Opcode.GEMM, "wsrc", 3,
            (Opcode.GEMM, gemm))
    patched("load_table_unit_2", ErrorCode.ILLEGAL_OPCODE, 1, 1, Opcode.LOAD_TABLE, "unit", 2,
            (Opcode.LOAD_TABLE, dict(ddr=0)))
    patched("experts_order_3", ErrorCode.ILLEGAL_OPCODE, 1, 1, Opcode.EXPERTS, "order", 3,
            (Opcode.EXPERTS, dict(body=1)), (Opcode.NOP, {}))
    case("tokens_over_capacity", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.GEMM, dict(tokens=cfg.max_tokens + 1, k_slices=1, n_tiles=1)))
    case("k_over_capacity", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.GEMM, dict(tokens=1, k_slices=cfg.max_gemm_width // cfg.pe_rows + 1,
                            n_tiles=1)))
    case("layernorm_wider_than_max_dim", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.LAYERNORM, dict(rows=1, beats=cfg.max_dim // cfg.pe_cols + 1, stride=1)))
    case("softmax_row_over_max_tokens", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.SOFTMAX, dict(rows=1, length=cfg.max_tokens + 1, stride=1)))
    # Within the buffer but over what the residual unit counts: the hardware's bound.
    case("residual_over_capacity", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.RESIDUAL, dict(words=cfg.max_residual_words + 1)))
    case("load_empty", ErrorCode.SHAPE_OVER_CAPACITY, 1, (Opcode.LOAD, dict(words=0)))
    case("buffer_out_of_range", ErrorCode.ADDRESS_OUT_OF_RANGE, 1,
         (Opcode.LOAD, dict(ddr=0, dst=cfg.act_buffer_words - 2, dst_stride=1, words=4)))
    # More words than the buffer holds: a range past its end, not a capacity.
    case("load_past_the_buffer", ErrorCode.ADDRESS_OUT_OF_RANGE, 1,
         (Opcode.LOAD, dict(ddr=0, dst=0, dst_stride=1, words=cfg.act_buffer_words + 1)))
    case("store_past_the_buffer", ErrorCode.ADDRESS_OUT_OF_RANGE, 1,
         (Opcode.STORE, dict(ddr=0, src=0, src_stride=1, words=cfg.act_buffer_words + 1)))
    case("ddr_out_of_range", ErrorCode.ADDRESS_OUT_OF_RANGE, 1,
         (Opcode.LOAD, dict(ddr=48, dst=0, dst_stride=1, words=64 // cfg.pe_cols)))
    case("bad_task", ErrorCode.BAD_TASK, 1, (Opcode.TASKS, dict(count=2, stride=16)), task=2)
    # The MoE instructions.
    case("expert_gemm_outside_a_loop", ErrorCode.ILLEGAL_OPCODE, 1,
         (Opcode.GEMM, dict(expert=1, **gemm)))
    case("gather_outside_a_loop", ErrorCode.ILLEGAL_OPCODE, 1,
         (Opcode.GEMM, dict(src_rows=RowMode.GATHER, **gemm)))
    case("queue_outside_a_loop", ErrorCode.ILLEGAL_OPCODE, 1,
         (Opcode.GEMM, dict(dst_rows=RowMode.QUEUE, **gemm)))
    # A fused residual add: only with weights from DDR and INT8 results, within the
    # residual unit's count, its x inside the buffer.
    fused = dict(residual=1, res_mult_buf=1, res_mult_out=1, **gemm)
    case("gemm_residual_with_buffer_weights", ErrorCode.ILLEGAL_OPCODE, 1,
         (Opcode.GEMM, dict(wsrc=WeightSource.BUFFER_ROWS, **fused)))
    case("gemm_residual_int32", ErrorCode.ILLEGAL_OPCODE, 1,
         (Opcode.GEMM, dict(mode=GemmMode.INT32, **fused)))
    case("gemm_residual_over_capacity", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.GEMM, {**fused, "tokens": cfg.max_tokens,
                        "n_tiles": cfg.max_dim // cfg.gemm_cols + 1}))
    case("gemm_residual_x_past_buffer", ErrorCode.ADDRESS_OUT_OF_RANGE, 1,
         (Opcode.GEMM, {**fused, "tokens": 2, "wbuf": cfg.act_buffer_words - 1}))
    case("combine_before_route", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.COMBINE, dict(rows=1, beats=1)))
    case("route_over_max_experts", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.ROUTE, dict(rows=1, experts=cfg.max_experts + 1, top_k=1, stride=1)))
    case("route_top_k_over_max", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.ROUTE, dict(rows=1, experts=8, top_k=cfg.max_top_k + 1, stride=1)))
    case("route_top_k_over_experts", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.ROUTE, dict(rows=1, experts=1, top_k=2, stride=1)))
    case("experts_empty_body", ErrorCode.SHAPE_OVER_CAPACITY, 1,
         (Opcode.EXPERTS, dict(order=ExpertOrder.EXPERT_BY_EXPERT, body=0)))
    route = (Opcode.ROUTE, dict(rows=3, experts=4, top_k=1, stride=3))
    case("nested_experts", ErrorCode.ILLEGAL_OPCODE, 3, route,
         (Opcode.EXPERTS, dict(order=ExpertOrder.EXPERT_BY_EXPERT, body=1)),
         (Opcode.EXPERTS, dict(order=ExpertOrder.EXPERT_BY_EXPERT, body=1)))
    case("combine_over_routed_rows", ErrorCode.SHAPE_OVER_CAPACITY, 2, route,
         (Opcode.COMBINE, dict(rows=4, beats=1, src_stride=1, dst_stride=1)))
    case("combine_residual_past_buffer", ErrorCode.ADDRESS_OUT_OF_RANGE, 2, route,
         (Opcode.COMBINE, dict(rows=3, beats=1, src_stride=1, dst_stride=3, residual=1,
                               res_src=cfg.act_buffer_words - 2)))
    # Bodies of a loop over two experts (3 tokens each, top-2 with the zero exp table).
    zero_table = (Opcode.LOAD_TABLE, dict(ddr=0, unit=TableUnit.SOFTMAX))
    route2 = (Opcode.ROUTE, dict(src=0, stride=3, rows=3, experts=4, top_k=2))
    stream = GEMM_RECORD_BYTES * cfg.gemm_cols + cfg.pe_rows * cfg.gemm_cols
    expert_gemm = dict(mode=GemmMode.INT8, wsrc=WeightSource.DDR, expert=1, src_stride=3,
                       dst=64, dst_stride=6, **gemm)

    def loop(stride=64):
        return (Opcode.EXPERTS, dict(order=ExpertOrder.EXPERT_BY_EXPERT, body=1,
                                     stride=stride))

    for name, op in (("route_in_a_loop", route2), ("end_in_a_loop", (Opcode.END, {})),
                     ("tasks_in_a_loop", (Opcode.TASKS, dict(count=1)))):
        case(name, ErrorCode.ILLEGAL_OPCODE, 4, zero_table, route2, loop(), op, img=window)
    case("dst_rows_gather", ErrorCode.ILLEGAL_OPCODE, 4, zero_table, route2, loop(),
         (Opcode.GEMM, {**expert_gemm, "dst_rows": RowMode.GATHER}), img=window)
    # Expert 1's stream ends one AXI beat past the window: its iteration stops.
    case("expert_stream_past_ddr", ErrorCode.ADDRESS_OUT_OF_RANGE, 4, zero_table, route2,
         loop(stride=4096 - stream + cfg.axi_bytes), (Opcode.GEMM, expert_gemm), img=window)
    # QUEUE rows are checked at offset + count: expert 1's rows 3…5 pass the last word.
    case("queue_rows_past_buffer", ErrorCode.ADDRESS_OUT_OF_RANGE, 4, zero_table, route2,
         loop(), (Opcode.GEMM, {**expert_gemm, "dst": cfg.act_buffer_words - 5,
                                "dst_rows": RowMode.QUEUE}), img=window)
    return cases


def _golden_capture(preset: str):
    """A randomly initialised ``preset``, quantized, and its golden forward's captures."""
    from ..model.config import get_preset
    from ..model.data import make_scenes
    from ..model.m3vit import M3ViT
    from ..quant import golden
    from ..quant.quantize import quantize

    model_cfg = get_preset(preset)
    pkg = quantize(M3ViT(model_cfg, seed=0), n_calib=4)
    image = make_scenes(1, model_cfg.img_size, n_classes=4, seed=5)["image"]
    x_q = golden.quantize_image(image, pkg.params["scales"]["input"])
    task = model_cfg.task_names[-1]
    _, cap = golden.forward(pkg.tensors, model_cfg, x_q, task, capture=True)
    return model_cfg, pkg.tensors, cap


def dense_block_case(cfg: AccelConfig, preset: str = "tiny") -> Case:
    """Dense block 0 of a randomly initialised, quantized ``preset``, against the golden."""
    model_cfg, t, cap = _golden_capture(preset)
    program, img, _, out = compile_dense_block(t, model_cfg, cfg, 0, cap["x0"][0])
    x2 = cap["blocks.0.x2"][0].to(torch.int8)

    def check(ddr_after: bytes) -> None:
        got = unslice(bytes(ddr_after[out:out + x2.numel()]), model_cfg.n_tokens,
                      model_cfg.embed_dim, cfg.pe_cols)
        diff = (got != x2).sum().item()
        assert diff == 0, f"dense block: {diff} of {x2.numel()} outputs differ from golden"

    return Case(f"dense_block_{preset}", program, bytes(img.data), check=check)


def attention_case(cfg: AccelConfig, preset: str = "tiny") -> Case:
    """Multi-head attention of block 0 on its LN1 output: QKV, per head Q·Kᵀ (K's columns
    from the buffer), softmax, P·V (V's rows from the buffer), projection; the heads'
    concatenated output and the projection are both compared with the golden model."""
    from ..compiler.layout import slice_major
    from ..compiler.lower import BufferPlan, attention_program
    from ..quant import golden

    model_cfg, t, cap = _golden_capture(preset)
    C = cfg.pe_cols
    n, d = model_cfg.n_tokens, model_cfg.embed_dim
    words = d // C * n
    img, plan, prog = DdrImage(align=cfg.axi_bytes), BufferPlan(cfg), Program()
    h = plan.alloc("h", n, d)
    out = plan.alloc("proj", n, d)
    prog.add(Opcode.LOAD, ddr=img.put("h", slice_major(cap["blocks.0.ln1"][0], C)), dst=h,
             dst_stride=1, words=words)
    attention_program(prog, img, plan, t, "blocks.0", model_cfg, cfg, src=h, dst=out)
    heads = plan.tensors["blocks.0.attn_out"][0]
    heads_ddr = img.reserve("heads", words * C)
    proj_ddr = img.reserve("proj", words * C)
    prog.add(Opcode.STORE, ddr=heads_ddr, src=heads, src_stride=1, words=words)
    prog.add(Opcode.STORE, ddr=proj_ddr, src=out, src_stride=1, words=words)
    prog.add(Opcode.END)
    heads_want = cap["blocks.0.attn_out"][0].to(torch.int8)
    proj_want = golden._linear(t, "blocks.0.proj", cap["blocks.0.attn_out"]).to(torch.int8)[0]

    def check(ddr_after: bytes) -> None:
        got = unslice(bytes(ddr_after[heads_ddr:heads_ddr + words * C]), n, d, C)
        assert torch.equal(got, heads_want), "attention heads differ from golden"
        got = unslice(bytes(ddr_after[proj_ddr:proj_ddr + words * C]), n, d, C)
        assert torch.equal(got, proj_want), "attention projection differs from golden"

    return Case(f"attention_{preset}", prog.encode(), bytes(img.data), check=check)


def embedding_head_case(cfg: AccelConfig, preset: str = "tiny") -> Case:
    """Patch embedding + cls + position embedding (→ x0), and the final LayerNorm + task
    head of the golden model's last block output (→ INT32 in DDR), against the golden."""
    from ..compiler.layout import head_output, slice_major
    from ..compiler.lower import BufferPlan, embedding_program, head_program
    from ..quant import golden

    model_cfg, t, cap = _golden_capture(preset)
    task = model_cfg.task_names[-1]
    C = cfg.pe_cols
    img, plan, prog = DdrImage(align=cfg.axi_bytes), BufferPlan(cfg), Program()
    patches = golden.patchify(cap["input"], model_cfg.patch_size)[0]
    x0 = embedding_program(prog, img, plan, t, model_cfg, cfg, patches)
    words = model_cfg.embed_dim // C * model_cfg.n_tokens
    x0_out = img.reserve("x0_out", words * C)
    prog.add(Opcode.STORE, ddr=x0_out, src=x0, src_stride=1, words=words)
    last = plan.alloc("last", model_cfg.n_tokens, model_cfg.embed_dim)
    x_last = cap[f"blocks.{model_cfg.depth - 1}.x2"][0]
    prog.add(Opcode.LOAD, ddr=img.put("last", slice_major(x_last, C)), dst=last, dst_stride=1,
             words=words)
    norm = plan.alloc("norm", model_cfg.n_tokens, model_cfg.embed_dim)
    out = head_program(prog, img, t, model_cfg, cfg, task, last, norm)
    prog.add(Opcode.END)
    x0_want = cap["x0"][0].to(torch.int8)
    head_want = cap[f"heads.{task}"][0].to(torch.int64)

    def check(ddr_after: bytes) -> None:
        got = unslice(bytes(ddr_after[x0_out:x0_out + words * C]), model_cfg.n_tokens,
                      model_cfg.embed_dim, C)
        assert torch.equal(got, x0_want), "x0 (embedding) differs from golden"
        head = head_output(bytes(ddr_after[out:]), model_cfg.n_patches, head_want.shape[-1],
                           cfg.gemm_cols)
        assert torch.equal(head, head_want), "task head differs from golden"

    return Case(f"embedding_head_{preset}", prog.encode(), bytes(img.data), check=check)


def random_gemm_cases(cfg: AccelConfig, seed: int, count: int) -> list[Case]:
    """``count`` GEMMs of random shape, mode (INT16 results too) and weight source (ragged
    token counts); the ones that may (weights from DDR, INT8 results) fuse a residual add
    half the time, and INT8 ones take per-row scales (P·V's) a third of the time."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        tokens = rng.choice([1, 2, 3, 5, 17, 33, cfg.max_tokens])
        mode = rng.choice([GemmMode.INT8, GemmMode.INT8_TABLE, GemmMode.INT32, GemmMode.INT16])
        wsrc = rng.choice(list(WeightSource))
        residual = (wsrc == WeightSource.DDR and mode in (GemmMode.INT8, GemmMode.INT8_TABLE)
                    and rng.random() < 0.5)
        row_scale = mode == GemmMode.INT8 and rng.random() < 0.3
        cases.append(gemm_case(cfg, seed + i, tokens, rng.randint(1, 3), rng.randint(1, 3),
                               mode, wsrc, residual=residual, row_scale=row_scale))
    return cases


# ---- the MoE layer -------------------------------------------------------------------------

#: Routing patterns of :func:`moe_routing_case`.
ROUTINGS = ("random", "near_ties", "all_same", "one_per_expert", "some_never", "ties")


def _routing_logits(rng: np.random.Generator, routing: str, tokens: int, experts: int,
                    top_k: int) -> np.ndarray:
    """(tokens, experts) INT16 router logits that produce ``routing``."""
    def fine(x: np.ndarray) -> np.ndarray:
        # INT8-like logits in the upper byte, a random lower byte (ranks within a step).
        return (x.astype(np.int64) * 256 + rng.integers(0, 256, size=x.shape)).astype(np.int16)

    if routing == "random":
        return rng.integers(-2**15, 2**15, size=(tokens, experts)).astype(np.int16)
    if routing == "near_ties":
        # Logits within a few exp-table steps: scores tie, the INT16 logits decide.
        return (rng.integers(-600, 600, size=(tokens, experts)) + 1000).astype(np.int16)
    if routing == "all_same":
        # Every token the same logits: the same k experts for all (the top ones distinct).
        row = fine(rng.permutation(np.arange(experts) * (200 // experts) - 100))
        return np.tile(row, (tokens, 1))
    if routing == "one_per_expert":
        # Token t prefers experts t·k … t·k + k − 1: each expert gets exactly one token.
        x = rng.integers(-128, -40, size=(tokens, experts))
        for t in range(tokens):
            x[t, t * top_k:(t + 1) * top_k] = rng.integers(40, 128, size=top_k)
        return fine(x)
    if routing == "some_never":
        # The upper half of the experts always scores lowest: never chosen.
        x = fine(rng.integers(-60, 128, size=(tokens, experts)))
        x[:, experts // 2:] = -2**15
        return x
    if routing == "ties":
        # Equal logits everywhere: lower indices win every tie (experts 0 … k−1).
        return np.full((tokens, experts), 5 * 256, np.int16)
    raise ValueError(routing)


def moe_routing_case(cfg: AccelConfig, seed: int, routing: str, experts: int, *,
                     tokens: int = 9, dim: int | None = None, hidden: int | None = None,
                     order=None, schedule: int = 0, queue_over_inputs: bool = False) -> Case:
    """One MoE layer from given router logits: ROUTE, EXPERTS {FC1 → GELU, FC2}, COMBINE.

    The logits are loaded (not computed) so that every routing pattern of :data:`ROUTINGS`
    can be forced; the expected output is ``numerics`` step by step (router scores, top-k,
    each expert on its tokens, combine). ``meta`` holds the DDR blocks of the experts and
    the choices, for the read monitor.

    With ``queue_over_inputs`` FC2's queue rows lie over the tokens FC1 gathers: each
    visit's FC1 reads what the FC2s before it wrote (the hazard that keeps the next FC1's
    reads from starting beside an FC2); the expected window is then the ISA model's
    under ``schedule`` (``SCHEDULE.ORDER``).
    """
    from ..compiler.layout import slice_major

    rng = np.random.default_rng(seed)
    C = cfg.pe_cols
    top_k = min(cfg.max_top_k, experts)
    dim = dim or 2 * C
    hidden = hidden or 4 * C
    if routing == "one_per_expert":
        tokens = experts // top_k
    order = ExpertOrder.REGISTER if order is None else order
    img, prog = DdrImage(align=cfg.axi_bytes), Program()
    h = _i8(rng, tokens, dim)
    logits = _routing_logits(rng, routing, tokens, experts, top_k)
    # INT16 logits, C/2 a word (two bytes each, little-endian).
    e_pad = _ceil(experts, C // 2) * (C // 2)
    padded16 = np.zeros((tokens, e_pad), "<i2")
    padded16[:, :experts] = logits
    # Padded logit lanes hold junk: ROUTE must ignore them.
    padded16[:, experts:] = 2**15 - 1
    padded = padded16.view(np.int8)
    exp = nx.exp_table(0.07)
    gelu = _i8(rng, 256)
    fc1 = [(_i8(rng, hidden, dim), rng.integers(-2**10, 2**10, size=hidden),
            rng.integers(2**12, 2**16, size=hidden), rng.integers(12, 16, size=hidden))
           for _ in range(experts)]
    fc2 = [(_i8(rng, dim, hidden), rng.integers(-2**10, 2**10, size=dim),
            rng.integers(2**12, 2**16, size=dim), rng.integers(14, 18, size=dim))
           for _ in range(experts)]
    mult, shift = int(rng.integers(2**14, 2**16)), 30

    # Buffer plan (words): h, logits, FC1 scratch (tokens rows), y (tokens·k rows), out.
    d_w, h_w, e_w = dim // C, hidden // C, 2 * e_pad // C
    entries = tokens * top_k
    h_base = 3
    lg_base = h_base + d_w * tokens
    f_base = lg_base + e_w * tokens
    y_base = h_base if queue_over_inputs else f_base + h_w * tokens
    out_base = f_base + h_w * tokens + d_w * entries
    prog.add(Opcode.LOAD, ddr=img.put("h", slice_major(h, C)), dst=h_base, dst_stride=1,
             words=d_w * tokens)
    prog.add(Opcode.LOAD, ddr=img.put("logits", slice_major(padded, C)), dst=lg_base,
             dst_stride=1, words=e_w * tokens)
    prog.add(Opcode.LOAD_TABLE, unit=TableUnit.SOFTMAX,
             ddr=img.put("exp", exp.numpy().astype("<u2").tobytes()))
    prog.add(Opcode.ROUTE, src=lg_base, stride=tokens, rows=tokens, experts=experts,
             top_k=top_k)
    prog.add(Opcode.LOAD_TABLE, unit=TableUnit.GEMM, ddr=img.put("gelu", gelu.tobytes()))
    blocks = []
    for e in range(experts):
        s1 = gemm_stream(*fc1[e], cfg)
        s2 = gemm_stream(*fc2[e], cfg)
        base = img.put(f"expert{e}", s1 + s2)
        blocks.append((base, len(s1) + len(s2)))
    stride = blocks[1][0] - blocks[0][0] if experts > 1 else 0
    fc1_len = len(s1)   # every expert's FC1 stream has the same length
    prog.add(Opcode.EXPERTS, order=order, body=2, stride=stride)
    prog.add(Opcode.GEMM, mode=GemmMode.INT8_TABLE, wsrc=WeightSource.DDR, expert=1,
             src_rows=RowMode.GATHER, tokens=tokens, k_slices=dim // cfg.pe_rows,
             n_tiles=hidden // cfg.gemm_cols, src=h_base, src_stride=tokens, dst=f_base,
             dst_stride=tokens,
             ddr=blocks[0][0])
    prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.DDR, expert=1,
             dst_rows=RowMode.QUEUE, tokens=tokens, k_slices=hidden // cfg.pe_rows,
             n_tiles=dim // cfg.gemm_cols, src=f_base, src_stride=tokens, dst=y_base,
             dst_stride=entries,
             ddr=blocks[0][0] + fc1_len)
    prog.add(Opcode.COMBINE, src=y_base, src_stride=entries, dst=out_base, dst_stride=tokens,
             rows=tokens, beats=d_w, mult=mult, shift=shift)
    out = img.reserve("out", d_w * tokens * C)
    prog.add(Opcode.STORE, ddr=out, src=out_base, src_stride=1, words=d_w * tokens)
    if queue_over_inputs:
        # The overwritten tokens too: what each FC1 gathered shows in them.
        prog.add(Opcode.STORE, ddr=img.reserve("h_out", d_w * entries * C), src=h_base,
                 src_stride=1, words=d_w * entries)
        prog.add(Opcode.END)
        before = bytes(img.data)
        after = bytearray(before)
        execute(cfg, prog.encode(), after, schedule=Schedule(schedule))
        return Case(f"moe_{routing}_E{experts}_queue_over_inputs", prog.encode(), before,
                    bytes(after), schedule=schedule)
    prog.add(Opcode.END)

    # Expected: numerics step by step.
    _, chosen_e, chosen_s = nx.route(torch.from_numpy(logits.astype(np.int64)), exp, top_k)
    ht = torch.from_numpy(h.astype(np.int64))
    expert_out = torch.zeros(tokens, top_k, dim, dtype=torch.int64)
    for e in range(experts):
        tok, slot = (chosen_e == e).nonzero(as_tuple=True)
        if tok.numel():
            w1, b1, m1, s1_ = (torch.from_numpy(np.asarray(v, np.int64)) for v in fc1[e])
            w2, b2, m2, s2_ = (torch.from_numpy(np.asarray(v, np.int64)) for v in fc2[e])
            a = nx.table_lookup(nx.linear(ht[tok], w1, b1, m1, s1_),
                                torch.from_numpy(gelu.astype(np.int64)))
            expert_out[tok, slot] = nx.linear(a, w2, b2, m2, s2_)
    want = nx.moe_combine(expert_out, chosen_s, mult, shift).to(torch.int8)

    def check(ddr_after: bytes) -> None:
        got = unslice(bytes(ddr_after[out:out + d_w * tokens * C]), tokens, dim, C)
        diff = (got != want).sum().item()
        assert diff == 0, f"{routing} E={experts}: {diff} of {want.numel()} outputs differ"

    counts = torch.bincount(chosen_e.flatten(), minlength=experts).tolist()
    case = Case(f"moe_{routing}_E{experts}", prog.encode(), bytes(img.data), check=check,
                schedule=schedule)
    case.meta = {"blocks": blocks, "counts": counts, "entries": entries}
    return case


def _expert_blocks(img: DdrImage, p: str, n_experts: int) -> list[tuple[int, int]]:
    return [img.regions[f"{p}.experts.{e}"] for e in range(n_experts)]


def _moe_layer_start(cfg: AccelConfig, model_cfg, t: dict, index: int, h):
    """An MoE layer harness's start: the image with block ``index``'s per-task routers, the
    program's ``TASKS``, and ``h`` ((M, D) INT8, the LN2 output) loaded into the buffer
    ahead of an (M, D) output; (img, prog, plan, tasks, h's word, the output's word)."""
    from ..compiler.layout import slice_major
    from ..compiler.lower import BufferPlan, model_task_blocks

    C = cfg.pe_cols
    m, d = h.shape
    img, plan, prog = DdrImage(align=cfg.axi_bytes), BufferPlan(cfg), Program()
    tasks = model_task_blocks(t, model_cfg, cfg, blocks=[index], head=False)
    tasks.place(img)
    tasks.tasks_instruction(prog)
    src = plan.alloc("h", m, d)
    y = plan.alloc("y", m, d)
    prog.add(Opcode.LOAD, ddr=img.put("h", slice_major(h, C)), dst=src, dst_stride=1,
             words=d // C * m)
    return img, prog, plan, tasks, src, y


def moe_layer_case(cfg: AccelConfig, preset: str = "tiny", index: int | None = None,
                   schedule: int = 0) -> Case:
    """The MoE layer of a randomly initialised, quantized ``preset`` (its first MoE block
    unless ``index``) on the golden LN2 output, compiled by ``moe_program``: router GEMM
    (the task's per-task block), ROUTE, EXPERTS, COMBINE; against the golden MoE output."""
    from ..compiler.lower import moe_program

    model_cfg, t, cap = _golden_capture(preset)
    index = model_cfg.moe_blocks[0] if index is None else index
    p = f"blocks.{index}"
    C = cfg.pe_cols
    n, d = model_cfg.n_tokens, model_cfg.embed_dim
    words = d // C * n
    img, prog, plan, tasks, h, y = _moe_layer_start(cfg, model_cfg, t, index,
                                                    cap[f"{p}.ln2"][0])
    moe_program(prog, img, plan, t, p, model_cfg, cfg, src=h, dst=y, tasks=tasks)
    out = img.reserve("out", words * C)
    prog.add(Opcode.STORE, ddr=out, src=y, src_stride=1, words=words)
    prog.add(Opcode.END)
    want = cap[f"{p}.mlp_out"][0].to(torch.int8)

    def check(ddr_after: bytes) -> None:
        got = unslice(bytes(ddr_after[out:out + words * C]), n, d, C)
        diff = (got != want).sum().item()
        assert diff == 0, f"MoE layer {p}: {diff} of {want.numel()} outputs differ from golden"

    counts = torch.bincount(cap[f"{p}.experts"].flatten(),
                            minlength=model_cfg.n_experts).tolist()
    case = Case(f"moe_layer_{preset}", prog.encode(), bytes(img.data), check=check,
                task_select=len(model_cfg.task_names) - 1, schedule=schedule)
    case.meta = {"blocks": _expert_blocks(img, f"{p}", model_cfg.n_experts),
                 "counts": counts, "entries": n * model_cfg.top_k, "model": model_cfg}
    return case


BATCH_ROUTINGS = ("disjoint", "same-two")
"""Routings of :func:`moe_batch_case`: each image's tokens on its own two experts, or every
token of every image on experts 0 and 1."""


def moe_batch_case(cfg: AccelConfig, routing: str, batch: int = 2, preset: str = "tiny",
                   seed: int = 0, schedule: int = 0) -> Case:
    """The MoE layer of ``preset`` over a batch of ``batch`` images' tokens (one ``ROUTE``,
    each active expert's weights read once for the batch), against the golden MoE layer of
    each image on its own.

    The router is rewritten so the routing is known: ``"disjoint"``: image b's tokens all
    choose experts 2b and 2b + 1 (channel b of its LN2 output is +100, of the others −100;
    router row e reads channel e // 2); ``"same-two"``: router weights zero, biases
    choosing experts 0 and 1 for every token.
    """
    from ..compiler.lower import moe_program
    from ..quant import golden

    if routing not in BATCH_ROUTINGS:
        raise ValueError(f"routing {routing!r} is not one of {BATCH_ROUTINGS}")
    model_cfg, t, _ = _golden_capture(preset)
    # A 16 × 16 input: few tokens an image, so a batch fits the CI configuration's
    # max_tokens (the MoE layer's weights do not depend on the token count).
    model_cfg = model_cfg.replace(img_size=(16, 16))
    if routing == "disjoint" and 2 * batch > model_cfg.n_experts:
        raise ValueError(f"{batch} images need {2 * batch} experts for disjoint routing")
    t = dict(t)
    index = model_cfg.moe_blocks[0]
    p = f"blocks.{index}"
    C = cfg.pe_cols
    n, d, n_exp = model_cfg.n_tokens, model_cfg.embed_dim, model_cfg.n_experts
    m = batch * n
    gen = torch.Generator().manual_seed(seed)
    h = torch.randint(-20, 21, (batch, n, d), generator=gen)
    weight = torch.zeros(n_exp, d, dtype=torch.int64)
    bias = torch.zeros(n_exp, dtype=torch.int64)
    if routing == "disjoint":
        h[:, :, :batch] = -100
        for b in range(batch):
            h[b, :, b] = 100
        for e in range(2 * batch):
            weight[e, e // 2] = 100
        bias[1::2] = -50   # breaks the tie within a pair: 2b before 2b + 1
    else:
        bias[0], bias[1] = 1 << 20, 1 << 19
    for task in model_cfg.task_names:
        r = f"{p}.router.{task}"
        t[f"{r}.weight"], t[f"{r}.bias"] = weight, bias
    task = model_cfg.task_names[-1]
    # Slice-major over the batch: image b's token i is row b·n + i of every slice.
    img, prog, plan, tasks, src, y = _moe_layer_start(cfg, model_cfg, t, index,
                                                      h.reshape(m, d))
    moe_program(prog, img, plan, t, p, model_cfg, cfg, src=src, dst=y, tasks=tasks,
                batch=batch)
    out = img.reserve("out", d // C * m * C)
    prog.add(Opcode.STORE, ddr=out, src=y, src_stride=1, words=d // C * m)
    prog.add(Opcode.END)
    want = torch.stack([golden.moe(t, p, h[b], task, model_cfg, None) for b in range(batch)])
    experts = torch.stack([golden.route(t, p, h[b], task, model_cfg.top_k)[2]
                           for b in range(batch)])
    chosen = [sorted(set(experts[b].flatten().tolist())) for b in range(batch)]
    expect = ([[2 * b, 2 * b + 1] for b in range(batch)] if routing == "disjoint"
              else [[0, 1]] * batch)
    assert chosen == expect, f"{routing}: the router chose {chosen}, not {expect}"

    def check(ddr_after: bytes) -> None:
        got = unslice(bytes(ddr_after[out:out + d // C * m * C]), m, d, C).reshape(batch, n, d)
        for b in range(batch):
            diff = (got[b] != want[b].to(torch.int8)).sum().item()
            assert diff == 0, (f"{routing} batch of {batch}, image {b}: {diff} of "
                               f"{want[b].numel()} outputs differ from its own golden MoE")

    counts = torch.bincount(experts.flatten(), minlength=n_exp).tolist()
    case = Case(f"moe_batch{batch}_{routing}", prog.encode(), bytes(img.data), check=check,
                task_select=len(model_cfg.task_names) - 1, schedule=schedule)
    case.meta = {"blocks": _expert_blocks(img, p, n_exp), "counts": counts, "chosen": chosen}
    return case


def moe_block_case(cfg: AccelConfig, preset: str = "tiny", schedule: int = 0) -> Case:
    """The first MoE block of ``preset`` (attention, LN2, the MoE layer, both residuals),
    compiled by ``compile_block``, against the golden block output."""
    from ..compiler.lower import compile_block

    model_cfg, t, cap = _golden_capture(preset)
    index = model_cfg.moe_blocks[0]
    p = f"blocks.{index}"
    program, img, _, out = compile_block(t, model_cfg, cfg, index, cap[f"blocks.{index - 1}.x2"][0]
                                         if index else cap["x0"][0])
    want = cap[f"{p}.x2"][0].to(torch.int8)

    def check(ddr_after: bytes) -> None:
        got = unslice(bytes(ddr_after[out:out + want.numel()]), model_cfg.n_tokens,
                      model_cfg.embed_dim, cfg.pe_cols)
        diff = (got != want).sum().item()
        assert diff == 0, f"MoE block {p}: {diff} of {want.numel()} outputs differ from golden"

    counts = torch.bincount(cap[f"{p}.experts"].flatten(),
                            minlength=model_cfg.n_experts).tolist()
    case = Case(f"moe_block_{preset}", program, bytes(img.data), check=check,
                task_select=len(model_cfg.task_names) - 1, schedule=schedule)
    case.meta = {"blocks": _expert_blocks(img, p, model_cfg.n_experts), "counts": counts}
    return case


def model_cases(cfg: AccelConfig, preset: str = "tiny", n_images: int = 2):
    """The whole model (``compile_model``): one program and image, every task; yields a
    Case per (image, task), alternating tasks, each against ``golden.forward``'s head."""
    from ..compiler.lower import compile_model
    from ..model.config import get_preset
    from ..model.data import make_scenes
    from ..model.m3vit import M3ViT
    from ..quant import golden
    from ..quant.quantize import quantize

    model_cfg = get_preset(preset)
    pkg = quantize(M3ViT(model_cfg, seed=0), n_calib=4)
    compiled = compile_model(pkg.tensors, model_cfg, cfg)
    images = make_scenes(n_images, model_cfg.img_size, n_classes=4, seed=9)["image"]
    cases = []
    for i in range(n_images):
        x_q = golden.quantize_image(images[i:i + 1], pkg.params["scales"]["input"])
        patches = golden.patchify(x_q, model_cfg.patch_size)[0]
        ddr = bytearray(compiled.image.data)
        compiled.write_input(ddr, patches)
        for task in (model_cfg.task_names if i % 2 == 0 else model_cfg.task_names[::-1]):
            want, _ = golden.forward(pkg.tensors, model_cfg, x_q, task)

            def check(ddr_after: bytes, task=task, want=want[0]) -> None:
                got = compiled.head(ddr_after, task)
                diff = (got != want).sum().item()
                assert diff == 0, f"{task}: {diff} of {want.numel()} head outputs differ"

            case = Case(f"model_{preset}_image{i}_{task}", compiled.program, bytes(ddr),
                        check=check, task_select=compiled.task_select(task))
            case.meta = {"tasks": compiled.tasks, "task": task, "image": compiled.image}
            cases.append(case)
    return cases
