"""Lay a quantized model out in DDR and write the accelerator's program (``docs/isa.md``).

This module holds the pieces every program is made of: the DDR image (weights in the
order the hardware streams them, parameter records, tables), the activation-buffer plan
(slice-major tensors) and the instruction list. :func:`compile_dense_block` uses them for
one dense ViT block, the unit the block bench runs; the whole-model compiler builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from m3vit.hw.config import AccelConfig
from m3vit.hw.gemm import GemmOp
from m3vit.hw.isa import (
    GEMM_RECORD_BYTES,
    LN_RECORD_BYTES,
    Opcode,
    TableUnit,
    WeightSource,
    check_top_config,
    encode,
)

from .config import ModelConfig
from .errors import M3VitError

__all__ = [
    "BufferPlan",
    "DdrImage",
    "Program",
    "compile_dense_block",
    "embedding_program",
    "gemm_stream",
    "head_output",
    "head_program",
    "layernorm_records",
    "slice_major",
    "unslice",
]


def _np(t) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def slice_major(x, lanes: int) -> bytes:
    """(M, D) INT8 → the buffer words of a slice-major tensor: for s, for m, D/lanes·M words."""
    x = _np(x).astype(np.int8)
    m, d = x.shape
    if d % lanes:
        raise M3VitError(f"width {d} is not a multiple of the PE array's {lanes} lanes")
    return np.ascontiguousarray(x.reshape(m, d // lanes, lanes).transpose(1, 0, 2)).tobytes()


def unslice(raw: bytes, tokens: int, dim: int, lanes: int) -> torch.Tensor:
    """Inverse of :func:`slice_major`: words → (tokens, dim) INT8 tensor."""
    words = np.frombuffer(raw, dtype=np.int8)[: tokens * dim]
    return torch.from_numpy(words.reshape(dim // lanes, tokens, lanes).transpose(1, 0, 2)
                            .reshape(tokens, dim).copy())


def gemm_stream(weight, bias, mult, shift, config: AccelConfig, weights: bool = True) -> bytes:
    """A GEMM's DDR stream: per N-tile its parameter records, then its weight tiles.

    Parameters
    ----------
    weight : (N, K) INT8 or None
        Output-channel-major weights (ignored with ``weights=False``).
    bias, mult, shift : (N,) integer tensors
        INT32 bias, uint16 multiplier and shift of each output channel.
    config : AccelConfig
        The array shape (N and K are zero-padded to whole tiles).
    weights : bool
        False for a GEMM whose weights come from the activation buffer (parameters only).
    """
    R, C = config.pe_rows, config.pe_cols
    bias, mult, shift = (_np(v).astype(np.int64).reshape(-1) for v in (bias, mult, shift))
    n = bias.shape[0]
    n_tiles = _ceil(n, C)
    records = np.zeros((n_tiles * C, GEMM_RECORD_BYTES), dtype=np.uint8)
    records[:n, 0:4] = bias.astype("<i4").view(np.uint8).reshape(n, 4)
    records[:n, 4:6] = mult.astype("<u2").view(np.uint8).reshape(n, 2)
    records[:n, 6] = shift.astype(np.uint8)
    out = bytearray()
    if weights:
        w = _np(weight).astype(np.int8)
        k = w.shape[1]
        k_slices = _ceil(k, R)
        padded = np.zeros((n_tiles * C, k_slices * R), dtype=np.int8)
        padded[:n, :k] = w
        # tile (j, s) row r = W[j·C + c, s·R + r] over c: (j, s, r, c) order.
        tiles = padded.reshape(n_tiles, C, k_slices, R).transpose(0, 2, 3, 1)
    for j in range(n_tiles):
        out += records[j * C:(j + 1) * C].tobytes()
        if weights:
            out += np.ascontiguousarray(tiles[j]).tobytes()
    return bytes(out)


def layernorm_records(gain, bias) -> bytes:
    """LayerNorm parameters: per channel 16 bytes (bias int64, gain int16, zeros)."""
    gain, bias = _np(gain).astype(np.int64), _np(bias).astype(np.int64)
    rec = np.zeros((gain.shape[0], LN_RECORD_BYTES), dtype=np.uint8)
    rec[:, 0:8] = bias.astype("<i8").view(np.uint8).reshape(-1, 8)
    rec[:, 8:10] = gain.astype("<i2").view(np.uint8).reshape(-1, 2)
    return rec.tobytes()


@dataclass
class DdrImage:
    """The data window of DDR (offsets from ``DATA_BASE``), built up region by region."""

    align: int
    data: bytearray = field(default_factory=bytearray)
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def put(self, name: str, raw: bytes) -> int:
        """Append ``raw`` (zero-padded to the alignment) as region ``name``; its offset."""
        offset = len(self.data)
        self.data += raw + bytes(-len(raw) % self.align)
        self.regions[name] = (offset, len(raw))
        return offset

    def reserve(self, name: str, size: int) -> int:
        """Zeroed room for ``size`` bytes that the accelerator writes; its offset."""
        return self.put(name, bytes(size))


@dataclass
class BufferPlan:
    """Bump allocation of activation-buffer words, one slice-major tensor at a time."""

    config: AccelConfig
    next_word: int = 0
    peak: int = 0
    tensors: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def alloc(self, name: str, tokens: int, dim: int) -> int:
        """Room for a (tokens, dim) tensor with stride ``tokens``; its first word."""
        words = _ceil(dim, self.config.pe_cols) * tokens
        base = self.next_word
        if base + words > self.config.act_buffer_words:
            raise M3VitError(f"activations need {base + words} buffer words, the hardware has "
                             f"{self.config.act_buffer_words}: the model does not fit")
        self.next_word += words
        self.peak = max(self.peak, self.next_word)
        self.tensors[name] = (base, tokens, dim)
        return base

    def release(self, mark: int) -> None:
        """Free every word allocated since ``next_word`` was ``mark`` (scratch reuse)."""
        self.next_word = mark


@dataclass
class Program:
    """An instruction list and its encoding."""

    instructions: list[tuple[Opcode, dict]] = field(default_factory=list)

    def add(self, op: Opcode, **fields) -> None:
        """Append one instruction (encoded now, so a bad field fails where it is written)."""
        encode(op, **fields)
        self.instructions.append((op, fields))

    def encode(self) -> bytes:
        """The program as DDR bytes, :data:`~m3vit.hw.isa.INSTRUCTION_BYTES` each."""
        return b"".join(encode(op, **fields) for op, fields in self.instructions)

    def __len__(self) -> int:
        return len(self.instructions)


def _linear(prog: Program, img: DdrImage, t: dict, name: str, cfg: AccelConfig, *,
            src: int, dst: int, tokens: int, mode: GemmOp = GemmOp.INT8) -> None:
    """A GEMM from a quantized ``name.weight/bias/mult/shift`` (buffer → buffer)."""
    w = t[f"{name}.weight"]
    n, k = w.shape
    ddr = img.put(name, gemm_stream(w, t[f"{name}.bias"], t[f"{name}.mult"],
                                    t[f"{name}.shift"], cfg))
    prog.add(Opcode.GEMM, mode=mode, wsrc=WeightSource.DDR, tokens=tokens,
             k_slices=_ceil(k, cfg.pe_rows), n_tiles=_ceil(n, cfg.pe_cols), src=src,
             src_stride=tokens, dst=dst, dst_stride=tokens, ddr=ddr)


def _layernorm(prog: Program, img: DdrImage, t: dict, name: str, cfg: AccelConfig, *,
               src: int, dst: int, tokens: int, dim: int) -> None:
    shift, eps_term = (int(v) for v in t[f"{name}.cfg"].tolist())
    ddr = img.put(name, layernorm_records(t[f"{name}.gain"], t[f"{name}.bias"]))
    prog.add(Opcode.LAYERNORM, src=src, dst=dst, stride=tokens, rows=tokens,
             beats=dim // cfg.pe_cols, shift=shift, eps_term=eps_term, ddr=ddr)


def _residual(prog: Program, t: dict, name: str, *, a: int, b: int, dst: int,
              words: int) -> None:
    mult_a, mult_b, shift = (int(v) for v in t[name].tolist())
    prog.add(Opcode.RESIDUAL, src_a=a, src_b=b, dst=dst, words=words, mult_a=mult_a,
             mult_b=mult_b, shift=shift)


def _requant_stream(t: dict, name: str, n: int, cfg: AccelConfig) -> bytes:
    """Parameter records of a weightless GEMM: one (mult, shift), bias 0, on n channels."""
    mult, shift = (int(v) for v in t[name].tolist())
    n_pad = _ceil(n, cfg.pe_cols) * cfg.pe_cols
    return gemm_stream(None, torch.zeros(n_pad, dtype=torch.int64),
                       torch.full((n_pad,), mult), torch.full((n_pad,), shift), cfg,
                       weights=False)


def attention_program(prog: Program, img: DdrImage, plan: BufferPlan, t: dict, p: str,
                      model: ModelConfig, cfg: AccelConfig, *, src: int, dst: int) -> None:
    """QKV, per head Q·Kᵀ → softmax → P·V, then the projection: ``src`` (LN1 out) → ``dst``."""
    C = cfg.pe_cols
    n, d, dh = model.n_tokens, model.embed_dim, model.head_dim
    if dh % C:
        raise M3VitError(f"head width {dh} is not a multiple of the PE array's {C} lanes")
    qkv = plan.alloc(f"{p}.qkv", n, 3 * d)
    scores = plan.alloc(f"{p}.scores", n, _ceil(n, C) * C)
    probs = plan.alloc(f"{p}.probs", n, _ceil(n, C) * C)
    heads_out = plan.alloc(f"{p}.attn_out", n, d)
    _linear(prog, img, t, f"{p}.qkv", cfg, src=src, dst=qkv, tokens=n)
    prog.add(Opcode.LOAD_TABLE, unit=TableUnit.SOFTMAX,
             ddr=img.put(f"{p}.attn.exp", _np(t[f"{p}.attn.exp"]).astype("<u2").tobytes()))
    logit_ddr = img.put(f"{p}.attn.logit", _requant_stream(t, f"{p}.attn.logit", n, cfg))
    pv_ddr = img.put(f"{p}.attn.pv", _requant_stream(t, f"{p}.attn.pv", dh, cfg))
    d_slices, h_slices, n_tiles = d // C, dh // C, _ceil(n, C)
    for h in range(model.num_heads):
        q = qkv + h * h_slices * n
        k = qkv + (d_slices + h * h_slices) * n
        v = qkv + (2 * d_slices + h * h_slices) * n
        prog.add(Opcode.GEMM, mode=GemmOp.INT8, wsrc=WeightSource.BUFFER_COLUMNS, tokens=n,
                 k_slices=h_slices, n_tiles=n_tiles, src=q, src_stride=n, dst=scores,
                 dst_stride=n, wbuf=k, wstride=n, ddr=logit_ddr)
        prog.add(Opcode.SOFTMAX, src=scores, dst=probs, stride=n, rows=n, length=n)
        prog.add(Opcode.GEMM, mode=GemmOp.INT8, wsrc=WeightSource.BUFFER_ROWS, tokens=n,
                 k_slices=n_tiles, n_tiles=h_slices, src=probs, src_stride=n,
                 dst=heads_out + h * h_slices * n, dst_stride=n, wbuf=v, wstride=n, ddr=pv_ddr)
    _linear(prog, img, t, f"{p}.proj", cfg, src=heads_out, dst=dst, tokens=n)


def _pad_columns(x, multiple: int) -> np.ndarray:
    """(M, K) → (M, K rounded up to ``multiple``), zero columns appended."""
    x = _np(x).astype(np.int8)
    k = x.shape[1]
    out = np.zeros((x.shape[0], _ceil(k, multiple) * multiple), np.int8)
    out[:, :k] = x
    return out


def embedding_program(prog: Program, img: DdrImage, plan: BufferPlan, t: dict,
                      model: ModelConfig, cfg: AccelConfig, patches) -> int:
    """Patch GEMM into tokens 1…, cls into token 0, + position embedding: x0's first word.

    ``patches`` is the host's (N_patches, C·p·p) INT8 patch rows
    (:func:`m3vit.sw.golden.patchify`); K is zero-padded to whole PE-array slices.
    """
    C = cfg.pe_cols
    n, d = model.n_tokens, model.embed_dim
    words = d // C * n
    rows = _pad_columns(patches, cfg.pe_rows)
    k_slices = rows.shape[1] // cfg.pe_rows
    patch_in = plan.alloc("patches", n - 1, rows.shape[1])
    x_cat = plan.alloc("x_cat", n, d)
    pos = plan.alloc("pos", n, d)
    x0 = plan.alloc("x0", n, d)
    prog.add(Opcode.LOAD, ddr=img.put("patches", slice_major(rows, C)), dst=patch_in,
             dst_stride=1, words=k_slices * (n - 1))
    w = _pad_columns(t["patch.weight"], cfg.pe_rows)
    ddr = img.put("patch", gemm_stream(w, t["patch.bias"], t["patch.mult"], t["patch.shift"],
                                       cfg))
    prog.add(Opcode.GEMM, mode=GemmOp.INT8, wsrc=WeightSource.DDR, tokens=n - 1,
             k_slices=k_slices, n_tiles=_ceil(d, C), src=patch_in, src_stride=n - 1,
             dst=x_cat + 1, dst_stride=n, ddr=ddr)
    # The cls token is row 0: its d/C words go to x_cat + s·n.
    prog.add(Opcode.LOAD, ddr=img.put("cls", _np(t["cls"]).astype(np.int8).tobytes()),
             dst=x_cat, dst_stride=n, words=d // C)
    prog.add(Opcode.LOAD, ddr=img.put("pos", slice_major(t["pos"], C)), dst=pos, dst_stride=1,
             words=words)
    _residual(prog, t, "embed", a=x_cat, b=pos, dst=x0, words=words)
    return x0


def head_program(prog: Program, img: DdrImage, t: dict, model: ModelConfig,
                 cfg: AccelConfig, task: str, x_base: int, norm_base: int) -> int:
    """Final LayerNorm of ``x_base`` into ``norm_base``, then the task head of the patch
    tokens as INT32 into DDR; the offset of its (n_tiles, N_patches, C) INT32 output."""
    C = cfg.pe_cols
    n, d = model.n_tokens, model.embed_dim
    _layernorm(prog, img, t, "norm", cfg, src=x_base, dst=norm_base, tokens=n, dim=d)
    w = t[f"heads.{task}.weight"]
    n_out = w.shape[0]
    n_tiles = _ceil(n_out, C)
    zeros = torch.zeros(n_out, dtype=torch.int64)
    ddr = img.put(f"heads.{task}", gemm_stream(w, t[f"heads.{task}.bias"], zeros, zeros, cfg))
    out = img.reserve(f"heads.{task}.out", n_tiles * (n - 1) * 4 * C)
    prog.add(Opcode.GEMM, mode=GemmOp.INT32, wsrc=WeightSource.DDR, tokens=n - 1,
             k_slices=d // cfg.pe_rows, n_tiles=n_tiles, src=norm_base + 1, src_stride=n,
             ddr=ddr, out_ddr=out)
    return out


def head_output(raw: bytes, tokens: int, n_out: int, lanes: int) -> torch.Tensor:
    """The head's DDR output (n_tiles, tokens, lanes) INT32 → (tokens, n_out) int64."""
    n_tiles = _ceil(n_out, lanes)
    acc = np.frombuffer(raw[:n_tiles * tokens * lanes * 4], "<i4").reshape(n_tiles, tokens,
                                                                          lanes)
    return torch.from_numpy(acc.transpose(1, 0, 2).reshape(tokens, -1)[:, :n_out]
                            .astype(np.int64))


def compile_dense_block(t: dict, model: ModelConfig, config: AccelConfig, index: int,
                        x_in) -> tuple[bytes, DdrImage, BufferPlan, int]:
    """Program + DDR image that loads ``x_in``, runs dense block ``index`` and stores x2.

    Returns
    -------
    program : bytes
        Encoded instructions (ending with ``END``).
    image : DdrImage
        Its data window; region ``"x_out"`` receives the block output (slice-major).
    plan : BufferPlan
        Where each activation lives on chip.
    out_offset : int
        Offset of ``x_out`` in ``image``.
    """
    check_top_config(config)
    if index in model.moe_blocks:
        raise M3VitError(f"block {index} is an MoE block; the dense-block program needs a "
                         "dense one")
    C = config.pe_cols
    n, d = model.n_tokens, model.embed_dim
    words = d // C * n
    img = DdrImage(align=config.axi_bytes)
    plan = BufferPlan(config)
    prog = Program()
    p = f"blocks.{index}"
    x = plan.alloc("x", n, d)
    h = plan.alloc("h", n, d)
    a = plan.alloc("attn", n, d)
    x1 = plan.alloc("x1", n, d)
    x2 = plan.alloc("x2", n, d)
    h2, y = h, a  # LN2 reuses LN1's room, the MLP output the attention output's
    prog.add(Opcode.LOAD, ddr=img.put("x_in", slice_major(x_in, C)), dst=x, dst_stride=1,
             words=words)
    _layernorm(prog, img, t, f"{p}.ln1", config, src=x, dst=h, tokens=n, dim=d)
    scratch = plan.next_word
    attention_program(prog, img, plan, t, p, model, config, src=h, dst=a)
    plan.release(scratch)
    f = plan.alloc("fc1", n, model.mlp_hidden)
    _residual(prog, t, f"{p}.res1", a=x, b=a, dst=x1, words=words)
    _layernorm(prog, img, t, f"{p}.ln2", config, src=x1, dst=h2, tokens=n, dim=d)
    prog.add(Opcode.LOAD_TABLE, unit=TableUnit.GEMM,
             ddr=img.put(f"{p}.gelu", _np(t[f"{p}.gelu"]).astype(np.int8).tobytes()))
    _linear(prog, img, t, f"{p}.fc1", config, src=h2, dst=f, tokens=n, mode=GemmOp.INT8_TABLE)
    _linear(prog, img, t, f"{p}.fc2", config, src=f, dst=y, tokens=n)
    _residual(prog, t, f"{p}.res2", a=x1, b=y, dst=x2, words=words)
    out = img.reserve("x_out", words * C)
    prog.add(Opcode.STORE, ddr=out, src=x2, src_stride=1, words=words)
    prog.add(Opcode.END)
    return prog.encode(), img, plan, out

