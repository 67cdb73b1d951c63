"""Lay a quantized model out in DDR and write the accelerator's program (``docs/isa.md``).

This module holds the pieces every program is made of: the DDR image (weights in the
order the hardware streams them, parameter records, tables), the per-task blocks
(:class:`TaskBlocks`: routers and heads, selected at run time by ``TASK_SELECT``), the
activation-buffer plan (slice-major tensors) and the instruction list.
:func:`compile_block` uses them for one ViT block (dense or MoE), the unit the block
benches run; :func:`compile_model` for the whole model, one program and one DDR image for
every task, with the input patches in a region the runtime overwrites per image.

DDR image of :func:`compile_model` (offsets from ``DATA_BASE``, each region padded to an
AXI beat)::

    tasks.<task 0> … tasks.<task T-1>   per-task blocks, equal size (TASKS.stride)
    patches                             input patch rows, slice-major (runtime writes)
    patch, cls, pos                     embedding
    blocks.<i>.*                        per block: LN1, QKV, exp table, attention
                                        requantization, projection, LN2, then the MLP
                                        (fc1, GELU table, fc2) or the MoE layer (GELU
                                        table, then expert e's FC1 + FC2 stream at
                                        blocks.<i>.experts.0 + e · EXPERTS.stride)
    norm, heads.out                     final LayerNorm, the head's INT32 output

Every per-task block holds, at the same offset in each, every MoE layer's router GEMM
stream and router exp table, then the task head's GEMM stream (zero-padded to the widest
task's N-tiles).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from m3vit.hw.config import AccelConfig
from m3vit.hw.isa import (
    GEMM_RECORD_BYTES,
    LN_RECORD_BYTES,
    ExpertOrder,
    GemmMode,
    Opcode,
    RowMode,
    TableUnit,
    WeightSource,
    check_top_config,
    encode,
    intake_beats,
    softmax_words,
)

from ..errors import M3VitError
from ..model.config import ModelConfig
from .layout import head_output, pad_columns, patch_words, slice_major

__all__ = [
    "PARTS",
    "BatchTooLarge",
    "BufferPlan",
    "CompiledModel",
    "DdrImage",
    "Program",
    "TaskBlocks",
    "activation_words",
    "attention_program",
    "block_program",
    "check_model_fits",
    "compile_block",
    "compile_dense_block",
    "compile_model",
    "embedding_program",
    "gemm_stream",
    "head_program",
    "largest_batch",
    "largest_input",
    "layernorm_records",
    "model_program",
    "model_task_blocks",
    "moe_program",
    "shared_blocks",
    "stream_bytes",
]


def _np(t) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def gemm_stream(weight, bias, mult, shift, config: AccelConfig, weights: bool = True) -> bytes:
    """A GEMM's DDR stream: per N-tile its parameter records, then its weight tiles.

    Parameters
    ----------
    weight : (N, K) INT8 or None
        Output-channel-major weights (ignored with ``weights=False``).
    bias, mult, shift : (N,) integer tensors
        INT32 bias, uint16 multiplier and shift of each output channel.
    config : AccelConfig
        The array shape (N and K are zero-padded to whole tiles, ``gemm_cols`` and
        ``pe_rows``).
    weights : bool
        False for a GEMM whose weights come from the activation buffer (parameters only).
    """
    R, C = config.pe_rows, config.gemm_cols
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


def stream_bytes(n: int, k: int, config: AccelConfig, weights: bool = True) -> int:
    """Length of :func:`gemm_stream` for an (n, k) weight: records and tiles per N-tile."""
    tile = config.pe_rows * config.gemm_cols * _ceil(k, config.pe_rows) if weights else 0
    return _ceil(n, config.gemm_cols) * (config.gemm_cols * GEMM_RECORD_BYTES + tile)


def layernorm_records(gain, bias) -> bytes:
    """LayerNorm parameters: per channel 16 bytes (bias int64, gain int16, zeros)."""
    gain, bias = _np(gain).astype(np.int64), _np(bias).astype(np.int64)
    rec = np.zeros((gain.shape[0], LN_RECORD_BYTES), dtype=np.uint8)
    rec[:, 0:8] = bias.astype("<i8").view(np.uint8).reshape(-1, 8)
    rec[:, 8:10] = gain.astype("<i2").view(np.uint8).reshape(-1, 2)
    return rec.tobytes()



def ddr_align(config: AccelConfig) -> int:
    """Alignment of every item of a DDR image: one read entry of the engine
    (:func:`~m3vit.hw.isa.intake_beats` AXI beats, 256 bytes on the ZCU104), so a stream
    starting there needs no realigning and reads no entry it does not use."""
    return intake_beats(config) * config.axi_bytes

@dataclass
class DdrImage:
    """The data window of DDR (offsets from ``DATA_BASE``), built up region by region."""

    align: int
    data: bytearray = field(default_factory=bytearray)
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def put(self, name: str, raw: bytes | Callable[[], bytes]) -> int:
        """Append ``raw`` (zero-padded to the alignment) as region ``name``; its offset.

        A name already placed is not placed again: its offset is returned, so the programs
        of every batch size share one copy of each weight stream. ``raw`` may be a function
        that makes the bytes, called only when the region is new (weight streams are
        costly to build).
        """
        if name in self.regions:
            offset, size = self.regions[name]
            if not callable(raw) and bytes(self.data[offset:offset + size]) != raw:
                raise M3VitError(f"DDR region {name!r} placed twice with other content")
            return offset
        raw = raw() if callable(raw) else raw
        offset = len(self.data)
        self.data += raw + bytes(-len(raw) % self.align)
        self.regions[name] = (offset, len(raw))
        return offset

    def reserve(self, name: str, size: int) -> int:
        """Zeroed room for ``size`` bytes that the accelerator writes; its offset.

        Reserving a name again returns its room (which must be as large)."""
        if name in self.regions:
            offset, have = self.regions[name]
            if have != size:
                raise M3VitError(f"DDR region {name!r} reserved again with {size} bytes, "
                                 f"not {have}")
            return offset
        return self.put(name, bytes(size))


@dataclass
class BufferPlan:
    """Bump allocation of activation-buffer words, one slice-major tensor at a time."""

    config: AccelConfig
    next_word: int = 0
    peak: int = 0
    tensors: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: Plan past the buffer's end (to measure what a model would need: ``peak``).
    unbounded: bool = False

    def alloc(self, name: str, tokens: int, dim: int) -> int:
        """Room for a (tokens, dim) tensor with stride ``tokens``; its first word."""
        words = _ceil(dim, self.config.pe_cols) * tokens
        base = self.next_word
        if base + words > self.config.act_buffer_words and not self.unbounded:
            raise M3VitError(f"activations need {base + words} buffer words, the hardware has "
                             f"{self.config.act_buffer_words} (act_buffer_words): the model "
                             "does not fit")
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
    #: Encode each instruction as it is added; off only for plans never run (a buffer
    #: address past the hardware's fields is then not an error).
    check: bool = True

    def add(self, op: Opcode, **fields) -> None:
        """Append one instruction (encoded now, so a bad field fails where it is written)."""
        if self.check:
            encode(op, **fields)
        self.instructions.append((op, fields))

    def encode(self) -> bytes:
        """The program as DDR bytes, :data:`~m3vit.hw.isa.INSTRUCTION_BYTES` each."""
        return b"".join(encode(op, **fields) for op, fields in self.instructions)

    def __len__(self) -> int:
        return len(self.instructions)


@dataclass
class TaskBlocks:
    """Per-task DDR data: one equal-size block per task, each item at one offset in all.

    A program selects the running task's copy with ``per_task`` instructions: their DDR
    address is the item's address in task 0's block, and the hardware adds
    ``TASK_SELECT · stride`` (``TASKS`` sets the stride). Items are added for every task at
    once (:meth:`add`), then the blocks are placed in the image (:meth:`place`), after
    which :meth:`ddr` gives the address an instruction holds.

    Parameters
    ----------
    tasks : sequence of str
        Task names in ``TASK_SELECT`` order.
    align : int
        Alignment of every item (an AXI beat).
    """

    tasks: tuple[str, ...]
    align: int
    items: dict[str, tuple[int, int]] = field(default_factory=dict)
    first: int | None = None
    _blocks: dict[str, bytearray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if not self.tasks:
            raise M3VitError("per-task blocks need at least one task")
        if len(self.tasks) >= 1 << 8:
            raise M3VitError(f"{len(self.tasks)} tasks: TASKS.count holds at most 255")
        self._blocks = {task: bytearray() for task in self.tasks}

    def add(self, name: str, per_task: Mapping[str, bytes]) -> int:
        """Add item ``name`` (one byte string per task); its offset within a block.

        Shorter copies are zero-padded to the longest, so the item has one size.
        """
        if self.first is not None:
            raise M3VitError(f"per-task item {name!r} added after the blocks were placed")
        if name in self.items:
            raise M3VitError(f"per-task item {name!r} added twice")
        if set(per_task) != set(self.tasks):
            raise M3VitError(f"per-task item {name!r} has tasks {sorted(per_task)}, the "
                             f"blocks {sorted(self.tasks)}")
        size = max(len(raw) for raw in per_task.values())
        offset = self.stride
        padded = size + -size % self.align
        for task in self.tasks:
            raw = per_task[task]
            self._blocks[task] += raw + bytes(padded - len(raw))
        self.items[name] = (offset, size)
        return offset

    @property
    def stride(self) -> int:
        """Bytes from one task's block to the next (``TASKS.stride``)."""
        return len(self._blocks[self.tasks[0]])

    def place(self, img: DdrImage) -> int:
        """Append the blocks to ``img`` as regions ``tasks.<task>``; task 0's offset."""
        if self.first is not None:
            raise M3VitError("the per-task blocks are already placed")
        offsets = [img.put(f"tasks.{task}", bytes(self._blocks[task])) for task in self.tasks]
        # Every block is a whole number of beats, so they sit at a constant stride.
        assert all(b - a == self.stride for a, b in itertools.pairwise(offsets))
        self.first = offsets[0]
        return self.first

    def ddr(self, name: str) -> int:
        """DDR offset of task 0's copy of item ``name``: what a ``per_task`` field holds."""
        if self.first is None:
            raise M3VitError("place the per-task blocks in the image before addressing them")
        if name not in self.items:
            raise M3VitError(f"no per-task item {name!r} (items: {', '.join(self.items)})")
        return self.first + self.items[name][0]

    def task_select(self, task: str) -> int:
        """``TASK_SELECT`` value of ``task``."""
        if task not in self.tasks:
            raise M3VitError(f"unknown task {task!r} (tasks: {', '.join(self.tasks)})")
        return self.tasks.index(task)

    def tasks_instruction(self, prog: Program) -> None:
        """Append the ``TASKS`` instruction that selects these blocks."""
        prog.add(Opcode.TASKS, count=len(self.tasks), stride=self.stride)


def head_tiles(model: ModelConfig, config: AccelConfig) -> int:
    """N-tiles of the head GEMM: the widest task's (the others are zero-padded to it)."""
    return max(_ceil(task.n_out, config.gemm_cols) for task in model.tasks)


def model_task_blocks(t: dict, model: ModelConfig, config: AccelConfig,
                      blocks: Iterable[int] | None = None, head: bool = True) -> TaskBlocks:
    """The per-task blocks of ``model``: each MoE layer's router, then the head.

    Parameters
    ----------
    t : dict
        The quantized package's tensors.
    model : ModelConfig
        Its configuration.
    config : AccelConfig
        The array shape (streams are tiled for it) and the AXI beat (alignment).
    blocks : iterable of int, optional
        Block indices whose routers to include (every MoE block by default; dense ones
        have none).
    head : bool
        Include the task heads.

    Returns
    -------
    TaskBlocks
        Items ``blocks.<i>.router`` (the router GEMM stream, E rows padded to whole
        N-tiles), ``blocks.<i>.router.exp`` (512-byte exp table) and ``heads`` (the head
        GEMM stream, :func:`head_tiles` N-tiles), not yet placed.
    """
    tb = TaskBlocks(model.task_names, config.axi_bytes)
    moe_blocks = [i for i in (model.moe_blocks if blocks is None else blocks)
                  if i in model.moe_blocks]
    for i in moe_blocks:
        p = f"blocks.{i}"
        streams, tables = {}, {}
        for task in model.task_names:
            r = f"{p}.router.{task}"
            streams[task] = gemm_stream(t[f"{r}.weight"], t[f"{r}.bias"], t[f"{r}.mult"],
                                        t[f"{r}.shift"], config)
            tables[task] = _np(t[f"{r}.exp"]).astype("<u2").tobytes()
        tb.add(f"{p}.router", streams)
        tb.add(f"{p}.router.exp", tables)
    if head:
        rows = head_tiles(model, config) * config.gemm_cols
        streams = {}
        for task in model.task_names:
            w = _np(t[f"heads.{task}.weight"]).astype(np.int8)
            n_out, d = w.shape
            weight = np.zeros((rows, d), np.int8)
            weight[:n_out] = w
            bias = np.zeros(rows, np.int64)
            bias[:n_out] = _np(t[f"heads.{task}.bias"])
            zeros = np.zeros(rows, np.int64)   # INT32 output: no requantization
            streams[task] = gemm_stream(weight, bias, zeros, zeros, config)
        tb.add("heads", streams)
    return tb


def check_model_fits(model: ModelConfig, config: AccelConfig, *, plan: bool = True) -> None:
    """Refuse a model the accelerator cannot run.

    With ``plan`` (the default) one image's buffer plan is made too, so that a model whose
    tokens or activations exceed the hardware is refused in one line that says what it
    would need and the largest input of it that fits.

    Raises
    ------
    M3VitError
        Naming the first capacity of ``config`` (or shape rule of the ISA) exceeded.
    """
    check_top_config(config)
    # Widths a GEMM writes to the buffer must be whole N-tiles (gemm_cols channels).
    R, C = config.pe_rows, config.gemm_cols
    name = model.name
    max_k = config.max_gemm_width
    too_many_tokens = f"{model.n_tokens} tokens exceed max_tokens={config.max_tokens}"
    checks = [
        (model.head == "linear", f"the {model.head!r} head is float-only: the accelerator "
                                 "runs the 'linear' head"),
        (model.n_tokens <= config.max_tokens, too_many_tokens),
        (model.embed_dim <= config.max_dim, f"embed_dim {model.embed_dim} exceeds max_dim="
                                            f"{config.max_dim}"),
        (model.embed_dim % R == 0 and model.embed_dim % C == 0,
         f"embed_dim {model.embed_dim} is not a multiple of the {R}x{C} PE array"),
        (model.num_heads <= config.max_heads, f"{model.num_heads} heads exceed max_heads="
                                              f"{config.max_heads}"),
        # A head may be narrower than an N-tile (P·V then writes into the next head's
        # words, which that head overwrites: attention_program), not than a word.
        (model.head_dim % config.pe_cols == 0 and model.head_dim % R == 0,
         f"head width {model.head_dim} is not a multiple of the {R}x{config.pe_cols} "
         "buffer word"),
        (_ceil(model.in_chans * model.patch_size ** 2, R) * R <= max_k,
         f"patch width {model.in_chans * model.patch_size ** 2} exceeds the GEMM's K "
         f"capacity {max_k}"),
        (head_tiles(model, config) * C <= max_k,
         f"head width {max(task.n_out for task in model.tasks)} exceeds the GEMM's N "
         f"capacity {max_k}"),
        (len(model.tasks) < 1 << 8, f"{len(model.tasks)} tasks exceed TASKS.count's 255"),
    ]
    hidden = []
    if len(model.moe_blocks) < model.depth:
        hidden.append(("mlp_hidden", model.mlp_hidden))
    if model.moe:
        hidden.append(("expert_hidden", model.expert_hidden))
        checks += [
            (model.n_experts <= config.max_experts, f"{model.n_experts} experts exceed "
                                                    f"max_experts={config.max_experts}"),
            (model.top_k <= config.max_top_k, f"top_k {model.top_k} exceeds max_top_k="
                                              f"{config.max_top_k}"),
        ]
    for label, width in hidden:
        checks += [
            (width <= config.max_hidden, f"{label} {width} exceeds max_hidden="
                                         f"{config.max_hidden}"),
            (width % R == 0 and width % C == 0,
             f"{label} {width} is not a multiple of the {R}x{C} PE array"),
        ]
    failed = [why for ok, why in checks if not ok]
    if plan and failed == [too_many_tokens]:
        # Every shape rule holds: say what the model would need and what of it fits.
        raise _too_large(model, config)
    if failed:
        raise M3VitError(f"model {name!r} does not fit the accelerator: {failed[0]}")
    if plan and activation_words(model, config) > config.act_buffer_words:
        raise _too_large(model, config)


def _linear(prog: Program, img: DdrImage, t: dict, name: str, cfg: AccelConfig, *,
            src: int, dst: int, tokens: int, mode: GemmMode = GemmMode.INT8,
            residual: tuple[int, str] | None = None, src_stride: int | None = None) -> None:
    """A GEMM from a quantized ``name.weight/bias/mult/shift`` (buffer → buffer).

    With ``residual = (x, params)``, the residual add ``params`` of x (at ``x``, laid out as
    the results) and the GEMM's output is done in the GEMM's output stage: ``dst`` gets the
    sum, and the GEMM's own output is never stored.
    """
    w = t[f"{name}.weight"]
    n, k = w.shape
    ddr = img.put(name, lambda: gemm_stream(w, t[f"{name}.bias"], t[f"{name}.mult"],
                                            t[f"{name}.shift"], cfg))
    fused = {} if residual is None else dict(wbuf=residual[0],
                                             **_residual_fields(t, residual[1]))
    prog.add(Opcode.GEMM, mode=mode, wsrc=WeightSource.DDR, tokens=tokens,
             k_slices=_ceil(k, cfg.pe_rows), n_tiles=_ceil(n, cfg.gemm_cols), src=src,
             src_stride=tokens if src_stride is None else src_stride, dst=dst,
             dst_stride=tokens, ddr=ddr, **fused)


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


def _residual_fields(t: dict, name: str) -> dict[str, int]:
    """The fields of a ``GEMM``'s or ``COMBINE``'s fused residual add ``name``, whose ``a``
    is x (from the buffer) and ``b`` the instruction's own output. A shift ≥ 25 gives 0 as
    any larger one (|a·mult_a + b·mult_b| < 2^24), so it is clamped to the field's range."""
    mult_a, mult_b, shift = (int(v) for v in t[name].tolist())
    return dict(residual=1, res_mult_buf=mult_a, res_mult_out=mult_b,
                res_shift=min(shift, 25))


def _requant_stream(t: dict, name: str, n: int, cfg: AccelConfig) -> bytes:
    """Parameter records of a weightless GEMM: one (mult, shift), bias 0, on n channels."""
    mult, shift = (int(v) for v in t[name].tolist())
    n_pad = _ceil(n, cfg.gemm_cols) * cfg.gemm_cols
    return gemm_stream(None, torch.zeros(n_pad, dtype=torch.int64),
                       torch.full((n_pad,), mult), torch.full((n_pad,), shift), cfg,
                       weights=False)


def attention_program(prog: Program, img: DdrImage, plan: BufferPlan, t: dict, p: str,
                      model: ModelConfig, cfg: AccelConfig, *, src: int, dst: int,
                      residual: tuple[int, str] | None = None, batch: int = 1,
                      src_scratch: bool = False) -> None:
    """QKV, per head Q·Kᵀ → softmax → P·V, then the projection: ``src`` (LN1 out) → ``dst``.

    With ``residual = (x, params)`` the projection adds x in its output stage (``_linear``).
    With ``src_scratch`` nothing reads ``src`` after QKV, so where QKV runs once for the
    batch the heads' outputs take its room (a batch of four ``edge-moe`` images then fits
    with one QKV pass).
    With ``batch = B`` the tensors hold B images' tokens (stride ``B · n_tokens``, image b's
    token i at row ``b · n_tokens + i``): QKV and the projection run once for all of them
    (each weight tile read once), Q·Kᵀ, softmax and P·V per image and head.
    """
    C, G = cfg.pe_cols, cfg.gemm_cols
    n, d, dh = model.n_tokens, model.embed_dim, model.head_dim
    m = batch * n
    if dh % C:
        raise M3VitError(f"head width {dh} is not a multiple of the buffer's {C} lanes")
    pv_tiles = _ceil(dh, G)

    def buffers(qkv_rows: int, heads_at: int | None = None
                ) -> tuple[int, list[int], list[int], int]:
        qkv = plan.alloc(f"{p}.qkv", qkv_rows, 3 * d)
        # Q·Kᵀ writes whole N-tiles of keys; softmax and P·V use the first ceil(n / C)
        # words. Two of each, alternating by head: a head's softmax runs in the background
        # beside the next head's Q·Kᵀ and the previous head's P·V, which use the other pair.
        scores = [plan.alloc(f"{p}.scores{i}", n, _ceil(n, G) * G) for i in range(2)]
        # A softmax output is each row's probabilities, its scale in the last word's top lanes.
        probs = [plan.alloc(f"{p}.probs{i}", n, softmax_words(n, C) * C) for i in range(2)]
        # P·V writes whole N-tiles: a head narrower than one writes the next head's first
        # words too (that head overwrites them later); the last head's spill needs the room.
        if heads_at is not None:
            return qkv, scores, probs, heads_at
        heads_out = plan.alloc(f"{p}.attn_out", m, d - dh + pv_tiles * G)
        return qkv, scores, probs, heads_out

    # QKV once for the batch (each weight tile read once) where its output fits, else
    # image by image into one image's room (the layout the compiler falls back to).
    mark = plan.next_word
    # The heads' outputs in LN1's room: (M, D) at stride M, as src, when no head's P·V
    # writes past D (whole N-tiles of a head as wide as a tile).
    reuse = src if src_scratch and pv_tiles * G == dh else None
    try:
        qkv, scores, probs, heads_out = buffers(m, reuse)
        qkv_stride, per_image = m, False
    except M3VitError:
        if batch == 1:
            raise
        plan.release(mark)
        qkv, scores, probs, heads_out = buffers(n)
        qkv_stride, per_image = n, True
    if not per_image:
        _linear(prog, img, t, f"{p}.qkv", cfg, src=src, dst=qkv, tokens=m)
    prog.add(Opcode.LOAD_TABLE, unit=TableUnit.SOFTMAX,
             ddr=img.put(f"{p}.attn.exp", _np(t[f"{p}.attn.exp"]).astype("<u2").tobytes()))
    logit_ddr = img.put(f"{p}.attn.logit", _requant_stream(t, f"{p}.attn.logit", n, cfg))
    # P·V's bias records (zero); its multiplier and shift reach it through the softmax,
    # which folds each row's 1/Σ into them (the records' own are not used).
    pv_ddr = img.put(f"{p}.attn.pv", _requant_stream(t, f"{p}.attn.pv", dh, cfg))
    pv_mult, pv_shift = (int(v) for v in t[f"{p}.attn.pv"].tolist())
    # P·V's K-slices are the softmax's words a row: the keys and the row's scale.
    d_slices, h_slices, key_slices = d // C, dh // C, softmax_words(n, C)

    # (image, head) pairs in order; pair i uses score and probability buffers i % 2.
    pairs = [(b, h) for b in range(batch) for h in range(model.num_heads)]

    def image_rows(b: int) -> int:
        """Row of image b's token 0 in the qkv tensor."""
        return 0 if per_image else b * n

    def scores_and_softmax(i: int) -> None:
        b, h = pairs[i]
        if per_image and h == 0:
            # Image b's Q, K, V: the previous image's last P·V has read its V (in order).
            _linear(prog, img, t, f"{p}.qkv", cfg, src=src + b * n, src_stride=m, dst=qkv,
                    tokens=n)
        q = qkv + h * h_slices * qkv_stride + image_rows(b)
        k = qkv + (d_slices + h * h_slices) * qkv_stride + image_rows(b)
        prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.BUFFER_COLUMNS, tokens=n,
                 k_slices=h_slices, n_tiles=_ceil(n, G), src=q, src_stride=qkv_stride,
                 dst=scores[i % 2], dst_stride=n, wbuf=k, wstride=qkv_stride, ddr=logit_ddr)
        prog.add(Opcode.SOFTMAX, src=scores[i % 2], dst=probs[i % 2], stride=n, rows=n,
                 length=n, mult=pv_mult, shift=pv_shift)

    def weighted_values(i: int) -> None:
        b, h = pairs[i]
        v = qkv + (2 * d_slices + h * h_slices) * qkv_stride + image_rows(b)
        prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.BUFFER_ROWS, tokens=n,
                 row_scale=1, k_slices=key_slices, n_tiles=pv_tiles, src=probs[i % 2],
                 src_stride=n,
                 dst=heads_out + h * h_slices * m + b * n, dst_stride=m, wbuf=v,
                 wstride=qkv_stride, ddr=pv_ddr)

    # Q·Kᵀ₀ S₀ Q·Kᵀ₁ S₁ P·V₀ Q·Kᵀ₂ S₂ P·V₁ … P·V_last over the (image, head) pairs: each
    # softmax (in the background) beside the next pair's Q·Kᵀ or the previous pair's P·V
    # (docs/accelerator.md). Keys a Q·Kᵀ tile pads with, and values P·V's last K-slice
    # pads with, are the next image's (or the next slice's): their scores are never read
    # and their probabilities are zero, as with one image.
    scores_and_softmax(0)
    for i in range(1, len(pairs)):
        if per_image and pairs[i][1] == 0:
            # The next image's QKV overwrites this image's V: its last P·V goes first.
            weighted_values(i - 1)
            scores_and_softmax(i)
            continue
        scores_and_softmax(i)
        if not (per_image and pairs[i - 1][1] == model.num_heads - 1):
            weighted_values(i - 1)
    weighted_values(len(pairs) - 1)
    _linear(prog, img, t, f"{p}.proj", cfg, src=heads_out, dst=dst, tokens=m,
            residual=residual)


def moe_program(prog: Program, img: DdrImage, plan: BufferPlan, t: dict, p: str,
                model: ModelConfig, cfg: AccelConfig, *, src: int, dst: int,
                tasks: TaskBlocks, order: ExpertOrder = ExpertOrder.REGISTER,
                residual: tuple[int, str] | None = None, batch: int = 1) -> None:
    """The MoE layer of block prefix ``p``: ``src`` (LN2 out) → ``dst``, (M, D) each.

    Router GEMM (the running task's stream, ``per_task``) into INT16 logits, the task's exp
    table, ``ROUTE``; the experts' GELU table; ``EXPERTS`` over FC1 (gathering the queued
    tokens from ``src``, GELU table, into an M-row scratch) and FC2 (into queue rows of an
    (M·k, D) output); ``COMBINE`` into ``dst``. Expert e's DDR block is its FC1 stream
    followed by its FC2 stream, at ``e · stride`` from expert 0's (regions
    ``<p>.experts.<e>``).

    Parameters
    ----------
    tasks : TaskBlocks
        Placed per-task blocks holding ``<p>.router`` and ``<p>.router.exp``
        (:func:`model_task_blocks`).
    order : ExpertOrder
        ``REGISTER`` (the host's ``SCHEDULE.ORDER`` decides) or a forced schedule.
    residual : (int, str), optional
        ``(x, params)``: ``COMBINE`` adds x (at ``x``, laid out as ``dst``) to its output
        before it writes it (the residual add ``params``).
    batch : int
        Images whose tokens ``src`` and ``dst`` hold (stride ``batch · n_tokens``): one
        ``ROUTE`` over all of them builds each expert's queue over the batch, so an active
        expert's weights are read once a batch.
    """
    R, G = cfg.pe_rows, cfg.gemm_cols
    n, d, hidden = batch * model.n_tokens, model.embed_dim, model.expert_hidden
    n_experts, k = model.n_experts, model.top_k
    router_tiles = _ceil(n_experts, G)
    # Expert e's rows are at most M (a token chooses an expert once), so the FC1 scratch
    # has M rows under either schedule; FC2 writes queue rows 0 … M·k − 1.
    # INT16 logits: two bytes a channel, 2V words a token and N-tile.
    logits = plan.alloc(f"{p}.router", n, 2 * router_tiles * G)
    if batch > 1:
        # The logits are dead once ROUTE has run (before the expert loop): FC1's scratch
        # takes their room (one image keeps its layout).
        plan.release(logits)
    scratch = plan.alloc(f"{p}.experts.gelu", n, hidden)
    y = plan.alloc(f"{p}.experts.out", n * k, d)
    prog.add(Opcode.GEMM, mode=GemmMode.INT16, wsrc=WeightSource.DDR, per_task=1, tokens=n,
             k_slices=d // R, n_tiles=router_tiles, src=src, src_stride=n, dst=logits,
             dst_stride=n, ddr=tasks.ddr(f"{p}.router"))
    prog.add(Opcode.LOAD_TABLE, unit=TableUnit.SOFTMAX, per_task=1,
             ddr=tasks.ddr(f"{p}.router.exp"))
    prog.add(Opcode.ROUTE, src=logits, stride=n, rows=n, experts=n_experts, top_k=k)
    prog.add(Opcode.LOAD_TABLE, unit=TableUnit.GEMM,
             ddr=img.put(f"{p}.experts.gelu", _np(t[f"{p}.experts.gelu"]).astype(np.int8)
                         .tobytes()))
    q = f"{p}.experts"
    fc1_bytes = stream_bytes(hidden, d, cfg)

    def expert_stream(e: int) -> bytes:
        fc1 = gemm_stream(t[f"{q}.fc1.weight"][e], t[f"{q}.fc1.bias"][e], t[f"{q}.fc1.mult"][e],
                          t[f"{q}.fc1.shift"][e], cfg)
        fc2 = gemm_stream(t[f"{q}.fc2.weight"][e], t[f"{q}.fc2.bias"][e], t[f"{q}.fc2.mult"][e],
                          t[f"{q}.fc2.shift"][e], cfg)
        assert len(fc1) == fc1_bytes
        return fc1 + fc2

    offsets = [img.put(f"{q}.{e}", lambda e=e: expert_stream(e)) for e in range(n_experts)]
    stride = offsets[1] - offsets[0] if n_experts > 1 else 0
    # Equal-size blocks, each a whole number of beats: one constant stride.
    assert all(b - a == stride for a, b in itertools.pairwise(offsets))
    prog.add(Opcode.EXPERTS, order=order, body=2, stride=stride)
    prog.add(Opcode.GEMM, mode=GemmMode.INT8_TABLE, wsrc=WeightSource.DDR, expert=1,
             src_rows=RowMode.GATHER, dst_rows=RowMode.DIRECT, tokens=n, k_slices=d // R,
             n_tiles=hidden // G, src=src, src_stride=n, dst=scratch, dst_stride=n,
             ddr=offsets[0])
    prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.DDR, expert=1,
             src_rows=RowMode.DIRECT, dst_rows=RowMode.QUEUE, tokens=n, k_slices=hidden // R,
             n_tiles=d // G, src=scratch, src_stride=n, dst=y, dst_stride=n * k,
             ddr=offsets[0] + fc1_bytes)
    mult, shift = (int(v) for v in t[f"{p}.combine"].tolist())
    fused = {} if residual is None else dict(res_src=residual[0],
                                             **_residual_fields(t, residual[1]))
    prog.add(Opcode.COMBINE, src=y, src_stride=n * k, dst=dst, dst_stride=n, rows=n,
             beats=d // cfg.pe_cols, mult=mult, shift=shift, **fused)


def embedding_program(prog: Program, img: DdrImage, plan: BufferPlan, t: dict,
                      model: ModelConfig, cfg: AccelConfig, patches=None, *,
                      dst: int | None = None, batch: int = 1, slots: int | None = None
                      ) -> int:
    """Patch GEMM into tokens 1…, cls into token 0, + position embedding: x0's first word.

    ``patches`` is the host's (N_patches, C·p·p) INT8 patch rows
    (:func:`m3vit.sw.quant.golden.patchify`); K is zero-padded to whole PE-array slices. They
    are region ``"patches"`` (:func:`patch_words`); with ``patches=None`` the region is
    reserved zeroed for the runtime to write. x0 goes to ``dst`` when given, else to a
    new tensor of the plan.

    With ``batch = B`` the region holds ``slots`` (≥ B, default B) images' patches one
    after the other, and x0 holds the first B images' tokens (stride ``B · n_tokens``):
    per image its patches are loaded and embedded, then the position embedding is added
    slice by slice.
    """
    C = cfg.pe_cols
    n, d = model.n_tokens, model.embed_dim
    m = batch * n
    slots = batch if slots is None else slots
    words = d // C * n
    k_slices = _ceil(model.in_chans * model.patch_size ** 2, cfg.pe_rows)
    patch_in = plan.alloc("patches", n - 1, k_slices * cfg.pe_rows)
    x_cat = plan.alloc("x_cat", m, d)
    pos = plan.alloc("pos", n, d)
    x0 = plan.alloc("x0", m, d) if dst is None else dst
    slot_bytes = k_slices * (n - 1) * C
    if patches is None:
        ddr = img.reserve("patches", slots * slot_bytes)
    else:
        ddr = img.put("patches", patch_words(patches, model, cfg)
                      + bytes((slots - 1) * slot_bytes))
    patch_ddr = img.put("patch", lambda: gemm_stream(
        pad_columns(t["patch.weight"], cfg.pe_rows), t["patch.bias"], t["patch.mult"],
        t["patch.shift"], cfg))
    cls_ddr = img.put("cls", _np(t["cls"]).astype(np.int8).tobytes())
    for b in range(batch):
        prog.add(Opcode.LOAD, ddr=ddr + b * slot_bytes, dst=patch_in, dst_stride=1,
                 words=k_slices * (n - 1))
        prog.add(Opcode.GEMM, mode=GemmMode.INT8, wsrc=WeightSource.DDR, tokens=n - 1,
                 k_slices=k_slices, n_tiles=_ceil(d, cfg.gemm_cols), src=patch_in,
                 src_stride=n - 1, dst=x_cat + b * n + 1, dst_stride=m, ddr=patch_ddr)
        # The cls token is row 0 of the image: its d/C words go to x_cat + s·m + b·n.
        prog.add(Opcode.LOAD, ddr=cls_ddr, dst=x_cat + b * n, dst_stride=m, words=d // C)
    prog.add(Opcode.LOAD, ddr=img.put("pos", slice_major(t["pos"], C)), dst=pos, dst_stride=1,
             words=words)
    if batch == 1:
        _residual(prog, t, "embed", a=x_cat, b=pos, dst=x0, words=words)
    else:
        # RESIDUAL adds contiguous ranges: one per image and slice (pos has stride n).
        for b in range(batch):
            for s_ in range(d // C):
                _residual(prog, t, "embed", a=x_cat + s_ * m + b * n, b=pos + s_ * n,
                          dst=x0 + s_ * m + b * n, words=n)
    return x0


def head_program(prog: Program, img: DdrImage, t: dict, model: ModelConfig,
                 cfg: AccelConfig, task: str | None, x_base: int, norm_base: int, *,
                 tasks: TaskBlocks | None = None, batch: int = 1,
                 slots: int | None = None) -> int:
    """Final LayerNorm of ``x_base`` into ``norm_base``, then the task head of the patch
    tokens as INT32 into DDR; the offset of its (n_tiles, N_patches, C) INT32 output.

    With ``tasks`` (placed, holding ``heads``: :func:`model_task_blocks`) the head is the
    running task's (``per_task``; ``task`` is ignored) with :func:`head_tiles` N-tiles and
    the output is region ``heads.out``; otherwise ``task``'s own, into ``heads.<task>.out``.
    With ``batch = B`` the LayerNorm runs over B images' tokens and the head once per
    image, image b's output ``b`` output sizes after the first (the region has ``slots``,
    default B, of them).
    """
    n, d = model.n_tokens, model.embed_dim
    m = batch * n
    slots = batch if slots is None else slots
    _layernorm(prog, img, t, "norm", cfg, src=x_base, dst=norm_base, tokens=m, dim=d)
    if tasks is not None:
        n_tiles, ddr, per_task = head_tiles(model, cfg), tasks.ddr("heads"), 1
        out_name = "heads.out"
    else:
        w = t[f"heads.{task}.weight"]
        n_tiles = _ceil(w.shape[0], cfg.gemm_cols)
        zeros = torch.zeros(w.shape[0], dtype=torch.int64)
        ddr = img.put(f"heads.{task}", lambda: gemm_stream(w, t[f"heads.{task}.bias"], zeros,
                                                           zeros, cfg))
        per_task, out_name = 0, f"heads.{task}.out"
    size = n_tiles * (n - 1) * 4 * cfg.gemm_cols
    out = img.reserve(out_name, slots * size)
    for b in range(batch):
        prog.add(Opcode.GEMM, mode=GemmMode.INT32, wsrc=WeightSource.DDR, per_task=per_task,
                 tokens=n - 1, k_slices=d // cfg.pe_rows, n_tiles=n_tiles,
                 src=norm_base + b * n + 1, src_stride=m, ddr=ddr, out_ddr=out + b * size)
    return out


def block_program(prog: Program, img: DdrImage, plan: BufferPlan, t: dict, index: int,
                  model: ModelConfig, cfg: AccelConfig, *, src: int, dst: int,
                  tasks: TaskBlocks | None = None,
                  order: ExpertOrder = ExpertOrder.REGISTER, batch: int = 1) -> None:
    """Block ``index``: x at ``src`` → x2 at ``dst`` (both (M, D), stride M, disjoint).

    M is ``batch · n_tokens``: the tokens of ``batch`` images (attention per image).

    LN1, attention, residual, LN2, then the dense MLP or (MoE block, which needs ``tasks``)
    :func:`moe_program`, residual. Both residual adds are fused into the instruction that
    produces their second operand: the projection ``GEMM``, and FC2's ``GEMM`` or
    ``COMBINE``. Its scratch is released when it returns.
    """
    n, d = batch * model.n_tokens, model.embed_dim
    p = f"blocks.{index}"
    mark = plan.next_word
    h = plan.alloc(f"{p}.ln1", n, d)
    x1 = plan.alloc(f"{p}.x1", n, d)
    h2 = h  # LN2 reuses LN1's room
    _layernorm(prog, img, t, f"{p}.ln1", cfg, src=src, dst=h, tokens=n, dim=d)
    scratch = plan.next_word
    attention_program(prog, img, plan, t, p, model, cfg, src=h, dst=x1,
                      residual=(src, f"{p}.res1"), batch=batch, src_scratch=True)
    plan.release(scratch)
    _layernorm(prog, img, t, f"{p}.ln2", cfg, src=x1, dst=h2, tokens=n, dim=d)
    if index in model.moe_blocks:
        if tasks is None:
            raise M3VitError(f"MoE block {index} needs the per-task blocks of its routers")
        moe_program(prog, img, plan, t, p, model, cfg, src=h2, dst=dst, tasks=tasks,
                    order=order, residual=(x1, f"{p}.res2"), batch=batch)
    else:
        f = plan.alloc(f"{p}.fc1", n, model.mlp_hidden)
        prog.add(Opcode.LOAD_TABLE, unit=TableUnit.GEMM,
                 ddr=img.put(f"{p}.gelu", _np(t[f"{p}.gelu"]).astype(np.int8).tobytes()))
        _linear(prog, img, t, f"{p}.fc1", cfg, src=h2, dst=f, tokens=n, mode=GemmMode.INT8_TABLE)
        _linear(prog, img, t, f"{p}.fc2", cfg, src=f, dst=dst, tokens=n,
                residual=(x1, f"{p}.res2"))
    plan.release(mark)


def compile_block(t: dict, model: ModelConfig, config: AccelConfig, index: int, x_in, *,
                  order: ExpertOrder = ExpertOrder.REGISTER
                  ) -> tuple[bytes, DdrImage, BufferPlan, int]:
    """Program + DDR image that loads ``x_in``, runs block ``index`` and stores x2.

    An MoE block's program starts with ``TASKS``: its routers sit in per-task blocks
    (regions ``tasks.<task>``), so ``TASK_SELECT`` picks the task.

    Parameters
    ----------
    x_in : (M, D) INT8
        The block's input (the previous block's x2, or x0).
    order : ExpertOrder
        Schedule of an MoE block's ``EXPERTS`` loop (``REGISTER``: the host's choice).

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
    check_model_fits(model, config)
    if not 0 <= index < model.depth:
        raise M3VitError(f"block {index} is not in {model.name!r} (blocks 0…{model.depth - 1})")
    C = config.pe_cols
    n, d = model.n_tokens, model.embed_dim
    words = d // C * n
    img = DdrImage(align=ddr_align(config))
    plan = BufferPlan(config)
    prog = Program()
    tasks = None
    if index in model.moe_blocks:
        tasks = model_task_blocks(t, model, config, blocks=[index], head=False)
        tasks.place(img)
        tasks.tasks_instruction(prog)
    x = plan.alloc("x", n, d)
    x2 = plan.alloc("x2", n, d)
    prog.add(Opcode.LOAD, ddr=img.put("x_in", slice_major(x_in, C)), dst=x, dst_stride=1,
             words=words)
    block_program(prog, img, plan, t, index, model, config, src=x, dst=x2, tasks=tasks,
                  order=order)
    out = img.reserve("x_out", words * C)
    prog.add(Opcode.STORE, ddr=out, src=x2, src_stride=1, words=words)
    prog.add(Opcode.END)
    return prog.encode(), img, plan, out


def compile_dense_block(t: dict, model: ModelConfig, config: AccelConfig, index: int,
                        x_in) -> tuple[bytes, DdrImage, BufferPlan, int]:
    """:func:`compile_block` for a dense block (refuses an MoE one): the block bench's unit."""
    if index in model.moe_blocks:
        raise M3VitError(f"block {index} is an MoE block; the dense-block program needs a "
                         "dense one")
    return compile_block(t, model, config, index, x_in)


@dataclass
class CompiledModel:
    """Programs and one DDR image that run ``model`` for any of its tasks.

    The host writes the image at ``DATA_BASE`` (``DATA_SIZE = len(image.data)``), the
    program of the batch size it runs at ``PROGRAM_BASE``, ``TASK_SELECT =
    task_select(task)``; per batch it writes each image's patches (:meth:`write_input`),
    runs, and reads each image's head (:meth:`head`).

    Attributes
    ----------
    program : bytes
        The one-image program (``programs[0]``).
    programs : tuple of bytes
        ``programs[b - 1]`` runs a batch of b images (``TASKS`` first, ``END`` last), for
        b = 1 … ``max_batch``; all use the one image.
    shared_programs, task_programs : tuple of bytes
        The same split in two (:data:`PARTS`): ``shared_programs[b - 1]`` computes what
        every task shares for b images and stores it (region ``shared.x``),
        ``task_programs[b - 1]`` the rest for the selected task: all tasks of a batch
        without computing the shared blocks again.
    image : DdrImage
        The data window; ``image.regions`` names every region.
    plan : BufferPlan
        Activation-buffer plan of the largest batch (``plan.peak`` words at most in use).
    tasks : TaskBlocks
        The per-task blocks (offsets of each task's routers and head).
    input_offset, input_size : int
        Image 0's slot of region ``patches`` (:func:`patch_words` of one image); image b's
        is ``b · input_size`` further.
    output_offset, output_size : int
        Image 0's slot of region ``heads.out``: (head_tiles, N_patches, gemm_cols)
        little-endian INT32; image b's is ``b · output_size`` further.
    head_tiles : int
        N-tiles of the head GEMM (the widest task's).
    """

    model: ModelConfig
    config: AccelConfig
    program: bytes
    image: DdrImage
    plan: BufferPlan
    tasks: TaskBlocks
    input_offset: int
    input_size: int
    output_offset: int
    output_size: int
    head_tiles: int
    programs: tuple[bytes, ...] = ()
    shared_programs: tuple[bytes, ...] = ()
    task_programs: tuple[bytes, ...] = ()

    @property
    def max_batch(self) -> int:
        """Largest batch a program runs."""
        return len(self.programs)

    def task_select(self, task: str) -> int:
        """``TASK_SELECT`` value of ``task``."""
        return self.tasks.task_select(task)

    def input_bytes(self, patches) -> bytes:
        """Bytes of the input region for one image's (N_patches, C·p·p) INT8 patches."""
        return patch_words(patches, self.model, self.config)

    def write_input(self, ddr: bytearray, patches, slot: int = 0) -> None:
        """Overwrite input slot ``slot`` of the data window ``ddr`` with ``patches``."""
        start = self.input_offset + slot * self.input_size
        ddr[start:start + self.input_size] = self.input_bytes(patches)

    def head(self, ddr: bytes, task: str, slot: int = 0) -> torch.Tensor:
        """``task``'s (N_patches, n_out) INT32 head output of image ``slot`` after a run."""
        start = self.output_offset + slot * self.output_size
        raw = bytes(ddr[start:start + self.output_size])
        return head_output(raw, self.model.n_patches, self.model.task(task).n_out,
                           self.config.gemm_cols)


class BatchTooLarge(M3VitError):
    """A batch the accelerator cannot hold (the message names the capacity and the
    largest batch that fits)."""


PARTS = ("full", "shared", "task")
"""What a program computes: the whole model; the blocks every task shares (the embedding
and the blocks before the first MoE block, whose x it stores in region ``shared.x``); the
rest for the selected task (from ``shared.x``)."""


def shared_blocks(model: ModelConfig) -> int:
    """Blocks every task computes alike: those before the first MoE block (a task's router
    is its first part of its own)."""
    return min(model.moe_blocks) if model.moe_blocks else model.depth


def model_program(img: DdrImage, t: dict, model: ModelConfig, config: AccelConfig,
                  tasks: TaskBlocks, *, batch: int, slots: int, patches=None,
                  order: ExpertOrder = ExpertOrder.REGISTER,
                  part: str = "full", bounded: bool = True) -> tuple[Program, BufferPlan]:
    """The program of one batch size over the shared image ``img`` (regions it needs that
    are not there yet are added; those that are, reused).

    ``part`` (:data:`PARTS`): ``"full"`` computes the model for the selected task;
    ``"shared"`` the embedding and the :func:`shared_blocks`, storing x into region
    ``shared.x`` (room for ``slots`` images); ``"task"`` loads that x and computes the
    other blocks and the head for the selected task — so all tasks of a batch cost one
    ``shared`` run and a ``task`` run each. ``bounded=False`` plans past the buffer's end
    and the token limit without encoding (only to measure ``plan.peak``).

    Raises
    ------
    BatchTooLarge
        When ``batch`` images' tokens exceed ``max_tokens`` or their activations the
        buffer.
    """
    n, d = model.n_tokens, model.embed_dim
    m = batch * n
    if m > config.max_tokens and bounded:
        raise BatchTooLarge(f"a batch of {batch} is {m} tokens, over max_tokens="
                            f"{config.max_tokens}")
    if part not in PARTS:
        raise M3VitError(f"part {part!r} is not one of {', '.join(PARTS)}")
    plan = BufferPlan(config, unbounded=not bounded)
    prog = Program(check=bounded)
    tasks.tasks_instruction(prog)
    split = shared_blocks(model)
    blocks = {"full": range(model.depth), "shared": range(split),
              "task": range(split, model.depth)}[part]
    words = d // config.pe_cols * m
    try:
        # x ping-pongs between two slots (a batch's blocks work in place: each block's
        # last instruction writes x once its input is dead); the rest is stage scratch.
        x_slots = ([plan.alloc("x.a", m, d), plan.alloc("x.b", m, d)] if batch == 1
                   else [plan.alloc("x", m, d)] * 2)
        if part == "task":
            prog.add(Opcode.LOAD, ddr=img.reserve("shared.x", slots * n * d),
                     dst=x_slots[split % 2], dst_stride=1, words=words)
        else:
            mark = plan.next_word
            embedding_program(prog, img, plan, t, model, config, patches, dst=x_slots[0],
                              batch=batch, slots=slots)
            plan.release(mark)
        for i in blocks:
            block_program(prog, img, plan, t, i, model, config, src=x_slots[i % 2],
                          dst=x_slots[(i + 1) % 2], tasks=tasks, order=order, batch=batch)
        if part == "shared":
            prog.add(Opcode.STORE, ddr=img.reserve("shared.x", slots * n * d),
                     src=x_slots[split % 2], src_stride=1, words=words)
            prog.add(Opcode.END)
            return prog, plan
        norm = plan.alloc("norm", m, d)
    except BatchTooLarge:
        raise
    except M3VitError as e:
        if batch == 1 or "buffer words" not in str(e):
            raise
        # "activations need N buffer words, the hardware has M (act_buffer_words)"
        why = str(e).split(": the model does not fit")[0]
        raise BatchTooLarge(f"a batch of {batch}: {why}") from None
    head_program(prog, img, t, model, config, None, x_slots[model.depth % 2], norm,
                 tasks=tasks, batch=batch, slots=slots)
    prog.add(Opcode.END)
    return prog, plan


def largest_batch(model: ModelConfig, config: AccelConfig, limit: int = 8) -> int:
    """The largest batch (≤ ``limit``) whose tokens and activations the accelerator holds;
    every smaller one fits too (the buffer plan grows with the batch)."""
    check_model_fits(model, config)
    best = 1
    for batch in range(2, limit + 1):
        try:
            _dry_run(model, config, batch)
        except BatchTooLarge:
            break
        best = batch
    return best


def _dry_run(model: ModelConfig, config: AccelConfig, batch: int, *,
             bounded: bool = True) -> BufferPlan:
    """The buffer plan of a batch's program, planned without weights (``bounded=False``:
    past the buffer's end, to measure its ``peak``)."""
    from ..quant.quantize import tensor_shapes

    # Zeros of the package's shapes: the plan depends on shapes only.
    t = {name: torch.zeros(shape, dtype=torch.int64)
         for name, shape in tensor_shapes(model).items()}
    img = DdrImage(align=ddr_align(config))
    tasks = model_task_blocks(t, model, config)
    tasks.place(img)
    return model_program(img, t, model, config, tasks, batch=batch, slots=batch,
                         bounded=bounded)[1]


def activation_words(model: ModelConfig, config: AccelConfig) -> int:
    """Activation-buffer words one image of ``model`` needs on ``config``'s array, however
    many the buffer has (the program's plan, made without the buffer's limits)."""
    return _dry_run(model, config, 1, bounded=False).peak


def _fits_one_image(model: ModelConfig, config: AccelConfig) -> bool:
    try:
        check_model_fits(model, config, plan=False)
    except M3VitError:
        return False
    return activation_words(model, config) <= config.act_buffer_words


def largest_input(model: ModelConfig, config: AccelConfig) -> tuple[int, int] | None:
    """The largest input of ``model``'s aspect ratio (whole patches) that one image of it
    fits ``config`` in, tokens and activations; ``None`` if not even one patch row does."""
    p = model.patch_size
    rows, cols = (s // p for s in model.img_size)

    def size(r: int) -> tuple[int, int]:
        return r * p, max(1, round(r * cols / rows)) * p

    def fits(r: int) -> bool:
        return _fits_one_image(model.replace(img_size=size(r)), config)

    # The need grows with the rows: bisect for the last that fits.
    lo, hi = 0, rows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return size(lo) if lo else None


def _too_large(model: ModelConfig, config: AccelConfig) -> M3VitError:
    """The one line for a model whose image needs more tokens or buffer than ``config``
    has: what it would need, and the largest input of it that fits."""
    relaxed = dataclasses.replace(config, max_tokens=max(config.max_tokens, model.n_tokens))
    need = activation_words(model, relaxed)
    kib = config.pe_cols / 1024
    h, w = model.img_size
    fit = largest_input(model, config)
    hint = (f"train it at --img-size {fit[0]}x{fit[1]} or smaller, which fits"
            if fit else "no input of it fits")
    too_many = (f"{model.n_tokens} tokens exceed max_tokens={config.max_tokens} and "
                if model.n_tokens > config.max_tokens else "")
    return M3VitError(
        f"model {model.name!r} does not fit the accelerator: {too_many}one {h}x{w} image's "
        f"activations need {need} buffer words, the hardware has {config.act_buffer_words} "
        f"(act_buffer_words; {need * kib:,.0f} KiB against "
        f"{config.act_buffer_words * kib:,.0f} KiB), and activations are not spilled to "
        f"DDR: {hint}")


def compile_model(t: dict, model: ModelConfig, config: AccelConfig, patches=None, *,
                  order: ExpertOrder = ExpertOrder.REGISTER,
                  max_batch: int = 1) -> CompiledModel:
    """Compile the whole model: embedding, every block, final LayerNorm and task head.

    One image serves every task and batch size: the routers and heads are ``per_task``
    (:func:`model_task_blocks`), chosen at run time by ``TASK_SELECT``; one program per
    batch size 1 … ``max_batch`` (every weight stream is in the image once).

    Parameters
    ----------
    t : dict
        The quantized package's tensors.
    model : ModelConfig
        Its configuration.
    config : AccelConfig
        The accelerator.
    patches : (N_patches, C·p·p) INT8, optional
        A first image's patch rows (:func:`m3vit.sw.quant.golden.patchify`) for the input
        region; zeros when omitted (the runtime writes each image there).
    order : ExpertOrder
        Schedule of every ``EXPERTS`` loop (``REGISTER``: the host's ``SCHEDULE.ORDER``).
    max_batch : int
        Largest batch of images one run computes: dense layers read each weight tile once
        a batch and every MoE layer each active expert once a batch.

    Raises
    ------
    M3VitError
        When the model does not fit ``config`` (the message names the capacity);
        :class:`BatchTooLarge` when ``max_batch`` images do not (with the largest that
        does).
    """
    check_model_fits(model, config)
    if not isinstance(max_batch, int) or max_batch < 1:
        raise M3VitError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
    img = DdrImage(align=ddr_align(config))
    tasks = model_task_blocks(t, model, config)
    tasks.place(img)
    programs: dict[str, list[bytes]] = {part: [] for part in PARTS}
    plan = None
    for part in PARTS:
        for batch in range(1, max_batch + 1):
            try:
                prog, part_plan = model_program(img, t, model, config, tasks, batch=batch,
                                                slots=max_batch, patches=patches,
                                                order=order, part=part)
            except BatchTooLarge as e:
                fits = batch - 1
                raise BatchTooLarge(f"{e}: {model.name!r} on this accelerator runs batches "
                                    f"of at most {fits}; use --max-batch {fits}") from None
            programs[part].append(prog.encode())
            if part == "full":
                plan = part_plan
    n_tiles = head_tiles(model, config)
    return CompiledModel(
        model=model, config=config, program=programs["full"][0], image=img, plan=plan,
        tasks=tasks,
        input_offset=img.regions["patches"][0],
        input_size=img.regions["patches"][1] // max_batch,
        output_offset=img.regions["heads.out"][0],
        output_size=n_tiles * model.n_patches * 4 * config.gemm_cols,
        head_tiles=n_tiles, programs=tuple(programs["full"]),
        shared_programs=tuple(programs["shared"]), task_programs=tuple(programs["task"]))
