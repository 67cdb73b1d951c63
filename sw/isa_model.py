"""An instruction-level model of the accelerator: the ISA's meaning in a few lines each.

:func:`execute` runs a program (``docs/isa.md``) on a DDR image and an activation buffer
with the integer functions of :mod:`m3vit.sw.numerics`, instruction by instruction. It is
the reference the compiler is tested against without hardware, and the oracle that tells
whether a mismatch in an RTL bench is the compiler's or the hardware's. It models what an
instruction computes, not cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from m3vit.hw.config import AccelConfig
from m3vit.hw.gemm import GemmOp
from m3vit.hw.isa import (
    GEMM_RECORD_BYTES,
    INSTRUCTION_BYTES,
    LN_RECORD_BYTES,
    Opcode,
    TableUnit,
    WeightSource,
    decode,
)

from . import numerics as nx
from .errors import M3VitError

__all__ = ["IsaMachine", "execute"]


@dataclass
class IsaMachine:
    """State of the modelled accelerator: buffer, DDR data window and tables."""

    config: AccelConfig
    ddr: bytearray
    buffer: np.ndarray = None
    gemm_table: torch.Tensor = field(default_factory=lambda: torch.zeros(256, dtype=torch.int64))
    exp_table: torch.Tensor = field(default_factory=lambda: torch.zeros(256, dtype=torch.int64))
    task_select: int = 0
    task_offset: int = 0

    def __post_init__(self):
        if self.buffer is None:
            self.buffer = np.zeros((self.config.act_buffer_words, self.config.pe_cols), np.int8)

    def _bytes(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.ddr):
            raise M3VitError(f"DDR access [{offset}, {offset + size}) is outside the image")
        return bytes(self.ddr[offset:offset + size])

    def words(self, addrs) -> torch.Tensor:
        """Buffer words at ``addrs`` (any shape) → (..., C) INT8 as int64."""
        return torch.from_numpy(self.buffer[np.asarray(addrs)].astype(np.int64))


def _gemm_params(raw: bytes, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rec = np.frombuffer(raw, np.uint8).reshape(n, GEMM_RECORD_BYTES)
    bias = rec[:, 0:4].copy().view("<i4").reshape(n).astype(np.int64)
    mult = rec[:, 4:6].copy().view("<u2").reshape(n).astype(np.int64)
    shift = rec[:, 6].astype(np.int64)
    return tuple(torch.from_numpy(v) for v in (bias, mult, shift))


def _gemm(mc: IsaMachine, a: dict) -> None:
    cfg = mc.config
    R, C = cfg.pe_rows, cfg.pe_cols
    m, ks, nt = a["tokens"], a["k_slices"], a["n_tiles"]
    k, n = ks * R, nt * C
    toks = np.arange(m)
    # X[m, s·R + r] = word src + s·src_stride + m
    x = mc.words(a["src"] + np.arange(ks)[:, None] * a["src_stride"] + toks[None, :])
    x = x.permute(1, 0, 2).reshape(m, k)
    wsrc = WeightSource(a["wsrc"])
    offset = a["ddr"] + (mc.task_offset if a["per_task"] else 0)
    tile = R * C
    per_tile = GEMM_RECORD_BYTES * C + (ks * tile if wsrc == WeightSource.DDR else 0)
    stream = mc._bytes(offset, nt * per_tile)
    params, weights = [], []
    for j in range(nt):
        chunk = stream[j * per_tile:(j + 1) * per_tile]
        params.append(chunk[:GEMM_RECORD_BYTES * C])
        if wsrc == WeightSource.DDR:
            # (s, r, c) → W[j·C + c, s·R + r]
            t = np.frombuffer(chunk[GEMM_RECORD_BYTES * C:], np.int8).reshape(ks, R, C)
            weights.append(t.transpose(2, 0, 1).reshape(C, k))
    bias, mult, shift = _gemm_params(b"".join(params), n)
    if wsrc == WeightSource.DDR:
        w = torch.from_numpy(np.concatenate(weights).astype(np.int64))
    elif wsrc == WeightSource.BUFFER_ROWS:
        # W[j·C + c, s·R + r] = word(wbuf + j·wstride + s·R + r)[c]
        j, s, r = np.meshgrid(np.arange(nt), np.arange(ks), np.arange(R), indexing="ij")
        t = mc.words(a["wbuf"] + j * a["wstride"] + s * R + r)       # (nt, ks, R, C)
        w = t.permute(0, 3, 1, 2).reshape(n, k)
    else:
        # W[j·C + c, s·R + r] = word(wbuf + s·wstride + j·C + c)[r]
        j, c, s = np.meshgrid(np.arange(nt), np.arange(C), np.arange(ks), indexing="ij")
        t = mc.words(a["wbuf"] + s * a["wstride"] + j * C + c)       # (nt, C, ks, R)
        w = t.reshape(n, k)
    mode = GemmOp(a["mode"])
    if mode == GemmOp.INT32:
        acc = nx.gemm(x, w, bias)
        raw = acc.reshape(m, nt, C).permute(1, 0, 2).numpy().astype("<i4").tobytes()
        out = a["out_ddr"]
        mc.ddr[out:out + len(raw)] = raw
        return
    y = nx.linear(x, w, bias, mult, shift)
    if mode == GemmOp.INT8_TABLE:
        y = nx.table_lookup(y, mc.gemm_table)
    dst = a["dst"] + np.arange(nt)[:, None] * a["dst_stride"] + toks[None, :]
    mc.buffer[dst] = y.reshape(m, nt, C).permute(1, 0, 2).numpy().astype(np.int8)


def _row_addrs(a: dict, beats: int, src: str) -> np.ndarray:
    """(rows, beats) word addresses of a row-wise op: row m, beat b = base + b·stride + m."""
    return a[src] + np.arange(beats)[None, :] * a["stride"] + np.arange(a["rows"])[:, None]


def execute(config: AccelConfig, program: bytes, ddr: bytearray, task_select: int = 0,
            max_instructions: int = 100_000) -> IsaMachine:
    """Run ``program`` on the DDR data window ``ddr`` (modified in place) until ``END``.

    Raises
    ------
    M3VitError
        For an instruction the hardware would stop on (the message names it).
    """
    mc = IsaMachine(config, ddr, task_select=task_select)
    C = config.pe_cols
    for pc in range(max_instructions):
        word = program[pc * INSTRUCTION_BYTES:(pc + 1) * INSTRUCTION_BYTES]
        op, a = decode(word)
        if op == Opcode.END:
            return mc
        if op == Opcode.TASKS:
            if task_select >= a["count"]:
                raise M3VitError(f"instruction {pc}: task {task_select} ≥ {a['count']} tasks")
            mc.task_offset = task_select * a["stride"]
        elif op == Opcode.LOAD:
            raw = mc._bytes(a["ddr"], a["words"] * C)
            idx = a["dst"] + np.arange(a["words"]) * a["dst_stride"]
            mc.buffer[idx] = np.frombuffer(raw, np.int8).reshape(-1, C)
        elif op == Opcode.STORE:
            idx = a["src"] + np.arange(a["words"]) * a["src_stride"]
            raw = mc.buffer[idx].tobytes()
            mc.ddr[a["ddr"]:a["ddr"] + len(raw)] = raw
        elif op == Opcode.LOAD_TABLE:
            offset = a["ddr"] + (mc.task_offset if a["per_task"] else 0)
            if TableUnit(a["unit"]) == TableUnit.GEMM:
                mc.gemm_table = torch.from_numpy(
                    np.frombuffer(mc._bytes(offset, 256), np.int8).astype(np.int64))
            else:
                mc.exp_table = torch.from_numpy(
                    np.frombuffer(mc._bytes(offset, 512), "<u2").astype(np.int64))
        elif op == Opcode.GEMM:
            _gemm(mc, a)
        elif op == Opcode.LAYERNORM:
            beats = a["beats"]
            rec = np.frombuffer(mc._bytes(a["ddr"], beats * C * LN_RECORD_BYTES), np.uint8)
            rec = rec.reshape(-1, LN_RECORD_BYTES)
            bias = torch.from_numpy(rec[:, 0:8].copy().view("<i8").reshape(-1))
            gain = torch.from_numpy(rec[:, 8:10].copy().view("<i2").reshape(-1).astype(np.int64))
            src = _row_addrs(a, beats, "src")
            x = mc.words(src).reshape(a["rows"], beats * C)
            y = nx.layernorm(x, gain, bias, a["shift"], a["eps_term"])
            mc.buffer[_row_addrs(a, beats, "dst")] = y.reshape(a["rows"], beats, C).numpy()
        elif op == Opcode.SOFTMAX:
            beats = -(-a["length"] // C)
            x = mc.words(_row_addrs(a, beats, "src")).reshape(a["rows"], beats * C)
            p = torch.zeros_like(x)
            p[:, :a["length"]] = nx.softmax(x[:, :a["length"]], mc.exp_table)
            mc.buffer[_row_addrs(a, beats, "dst")] = p.reshape(a["rows"], beats, C).numpy()
        elif op == Opcode.RESIDUAL:
            n = a["words"]
            x = mc.words(a["src_a"] + np.arange(n))
            y = mc.words(a["src_b"] + np.arange(n))
            out = nx.residual_add(x, y, a["mult_a"], a["mult_b"], a["shift"])
            mc.buffer[a["dst"] + np.arange(n)] = out.numpy().astype(np.int8)
    raise M3VitError(f"the program did not reach END within {max_instructions} instructions")
