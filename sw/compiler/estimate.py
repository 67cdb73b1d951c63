"""Predict a compiled program's cycles without simulating it: an analytic cycle model.

:func:`estimate_program` walks a program instruction by instruction on a small model of the
accelerator — the controller, the PE array, the read DMA over the HP ports, the write port
and the background softmax — and charges each instruction the cycles its work takes at
that part's rate, with the overlaps the hardware has (``docs/accelerator.md``): a ``GEMM``
that streams its weights from DDR hands over as soon as its stream is issued, and the next
such ``GEMM``'s stream queues behind it while its buffer walks wait for the first's last
result; a ``LAYERNORM`` reads its parameters behind a pending ``GEMM``; a ``SOFTMAX`` runs in
the background, sharing the write port; an ``EXPERTS`` loop runs its body once per active
expert (expert by expert) or once per (token, choice) (token by token), each visit's
``GEMM``s sized by the routing. The routing comes from the caller (the golden model's for
given images: :func:`routing_counts`).

The result has the shape of :func:`m3vit.sw.runtime.profile.build_profile`'s (cycles and
DDR bytes by phase) so an estimate and a measurement sit side by side. The constants of
:class:`CostModel` are the per-instruction overheads measured on the Verilated SoC model's
traces (fill and drain of a GEMM pass, a fetch miss, ...); `docs/benchmarks.md` holds the
estimate-against-measurement table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from m3vit.hw.config import AccelConfig
from m3vit.hw.engine.controller import GEMMS_HELD
from m3vit.hw.engine.router import intake_shape
from m3vit.hw.isa import (
    GEMM_RECORD_BYTES,
    INSTRUCTION_BYTES,
    LN_RECORD_BYTES,
    GemmMode,
    Opcode,
    RowMode,
    WeightSource,
    decode,
    intake_beats,
    softmax_words,
)
from m3vit.hw.moe import Dispatcher
from m3vit.hw.registers import Schedule

from ..errors import M3VitError
from .isa_model import buffer_span, gemm_buffer_ranges, visit_order

__all__ = ["CostModel", "DdrRates", "estimate_package", "estimate_program", "format_estimate",
           "routing_counts", "uniform_routing"]


@dataclass(frozen=True)
class CostModel:
    """Per-instruction overheads in cycles, measured on the SoC model's traces.

    Attributes
    ----------
    control : int
        Fetch (a line-cache hit) and checks of an instruction.
    fetch_miss : int
        A line of eight instructions read through the DMA, on top of ``control``.
    gemm_fill : int
        A GEMM pass started alone: its first weight tile, the array's fill and its last
        results' drain.
    gemm_fill_chained : int
        The same for a GEMM whose walks started when the one before it had written its last
        result (its stream already in).
    tile_gap : float
        Cycles a (K-slice, N-tile) pair costs beyond its weight tile's load at the intake's
        rate when it has fewer tokens than that (the double-buffered tile's swap).
    row_queue : int
        Rows the GEMM's result queue absorbs: a tile's last K-slice yields a row a cycle
        while rows leave at ``gemm_words`` words a cycle, so each N-tile of a pass over
        more tokens stalls the array ``(gemm_words − 1) · tokens − row_queue`` cycles.
    buffer_gemm_fill : int
        A GEMM with weights from the buffer (Q·Kᵀ, P·V).
    early_tail : int
        A GEMM whose reads started beside the one before it: cycles past its results' words
        after that one's end; and the last token's lead on a GEMM's end beyond its last
        N-tile's surplus words.
    ln_tail, ln_tail_prefetched : int
        A LayerNorm past its word-a-cycle output, its parameters read first or behind the
        GEMM before it.
    residual_tail, combine_tail, route_base, route_per_row, load_base : int
        The other instructions' overheads.
    softmax_alone : int
        Cycles a softmax of one 129-token head needs besides its writes (its reads and the
        pipeline) — scaled by rows × words.
    """

    control: int = 9
    fetch_miss: int = 62
    gemm_fill: float = 205
    gemm_fill_chained: float = 54
    fill_per_token: float = 0.39
    row_queue: int = 112
    tile_gap: float = 2.0
    buffer_gemm_fill: float = 155
    ln_tail: int = 231
    ln_tail_prefetched: int = 100
    residual_tail: int = 17
    combine_tail: int = 27
    route_base: int = 77
    route_per_row: int = 2
    load_base: int = 55
    softmax_tail: int = 60
    early_tail: int = 20

    @classmethod
    def for_config(cls, config: AccelConfig) -> CostModel:
        """The overheads for ``config``, fitted on the traces of the two configurations
        simulated (the ZCU104's 32 × 64 array and CI's 4 × 8): a GEMM pass's fill grows with
        the depth of the array's adder trees (log2 ``pe_rows``), between and beyond them
        linearly — an extrapolation for other arrays, to be checked on the SoC model."""
        depth = math.log2(config.pe_rows)
        at = (depth - 2) / 3            # 0 at CI's 4 rows, 1 at the ZCU104's 32

        def between(ci: float, zcu: float) -> float:
            return ci + (zcu - ci) * at

        # The row queue holds a last slice's surplus rows for up to max_tokens tokens
        # (m3vit.hw.gemm.GemmEngine.row_queue_depth); beyond its memory the pipeline's
        # ~48 rows in flight.
        V = config.gemm_words
        surplus = -(-config.max_tokens * (V - 1) // V)
        row_queue = surplus + 48 if V > 1 and surplus > 64 else cls.row_queue
        return cls(gemm_fill=between(132, 205), gemm_fill_chained=between(88, 54),
                   fill_per_token=between(0.1, 0.39), buffer_gemm_fill=between(94, 155),
                   row_queue=row_queue)


@dataclass(frozen=True)
class DdrRates:
    """What the model takes of the DDR: read bytes a cycle (all ports), first-beat latency,
    write bytes a cycle (the first port)."""

    read_bytes_per_cycle: float
    read_latency: int
    write_bytes_per_cycle: float

    @classmethod
    def for_config(cls, config: AccelConfig) -> DdrRates:
        """The DDR model's ZCU104 defaults for ``config`` (``m3vit.sim.soc.DdrTiming``)."""
        from m3vit.sim.soc import DdrTiming

        timing = DdrTiming.zcu104(config)
        ports = config.n_master_ports
        read = timing.bytes_per_cycle * ports
        if timing.aggregate_bytes_per_cycle is not None:
            read = min(read, timing.aggregate_bytes_per_cycle)
        # Writes go through the first port only; measured on the head's INT32 output.
        return cls(read_bytes_per_cycle=read, read_latency=timing.read_latency,
                   write_bytes_per_cycle=0.73 * timing.bytes_per_cycle)


@dataclass
class _Machine:
    """The model's state: times (cycles) at which each part is next free."""

    t: float = 0.0                 # the controller
    gemm_end: float = 0.0          # the last GEMM's last result written
    walks_starts: list = field(default_factory=list)   # streamed GEMMs' walks started
    pending: bool = False          # a GEMM handed over and is still computing
    inputs_done: float = 0.0       # the last GEMM has taken its last token
    prev_write: tuple | None = None   # the last GEMM's results range, if it was plain
    prev_ordered: bool = False        # ... and it leaves N-tile by N-tile (tokens ≤ stride)
    prev_last_tile: tuple | None = None  # the range of its last N-tile's results
    tiles_loaded: float = 0.0         # ... and its last weight tile loaded
    bg_read: tuple | None = None   # the background softmax's logits and probabilities
    bg_write: tuple | None = None
    ddr_free: float = 0.0          # the read DMA's queued streams all in
    bg_end: float = 0.0            # the background softmax done
    bg_writes_left: float = 0.0    # its writes still to do when the foreground moved on
    lines: dict[int, int] = field(default_factory=dict)
    read_bytes: float = 0.0
    expert_read_bytes: float = 0.0   # of which the streams of EXPERTS bodies' GEMMs
    pending_pc: int = 0            # the pending GEMM, to which a wait for it is charged
    bg_pc: int = 0                 # the background softmax, likewise
    drains: list = field(default_factory=list)   # (pc, cycles) waits charged so far

    def wait_gemm(self) -> None:
        """Wait for the pending GEMM's last result (a drain, charged to that GEMM)."""
        if self.pending:
            if self.gemm_end > self.t:
                self.drains.append((self.pending_pc, self.gemm_end - self.t))
                self.t = self.gemm_end
            self.pending = False

    def wait_bg(self) -> None:
        """Wait for the background softmax (charged to it)."""
        if self.bg_end > self.t:
            self.drains.append((self.bg_pc, self.bg_end - self.t))
            self.t = self.bg_end


def routing_counts(captures: Sequence[dict], moe_blocks: Sequence[int],
                   n_experts: int) -> list[list[list[int]]]:
    """Per MoE layer (program order), per image, the tokens each expert serves.

    ``captures`` are :func:`m3vit.sw.quant.golden.forward` captures of the images of one
    batch (one per image); the expert ids of block ``i`` are ``captures[b]["blocks.i.experts"]``.
    """
    import torch

    layers = []
    for i in moe_blocks:
        per_image = []
        for cap in captures:
            chosen = cap[f"blocks.{i}.experts"].flatten()
            per_image.append(torch.bincount(chosen, minlength=n_experts).tolist())
        layers.append(per_image)
    return layers


def _stream_bytes(f: dict, config: AccelConfig) -> int:
    """Bytes of a GEMM's DDR stream: per N-tile its parameter records and its weight tile."""
    R, G = config.pe_rows, config.gemm_cols
    tile = R * G * f["k_slices"] if f["wsrc"] == WeightSource.DDR.value else 0
    return f["n_tiles"] * (G * GEMM_RECORD_BYTES + tile)


def estimate_program(program: bytes, config: AccelConfig, *,
                     routing: Sequence[Sequence[Sequence[int]]] | None = None,
                     schedule: Schedule = Schedule.EXPERT_BY_EXPERT,
                     ddr: DdrRates | None = None, model: CostModel | None = None
                     ) -> dict[str, Any]:
    """Estimate a program's cycles, instruction by instruction, and sum them by phase.

    Parameters
    ----------
    program : bytes
        A compiled program (:attr:`~m3vit.sw.compiler.executable.Executable.programs`).
    config : AccelConfig
        The accelerator it runs on.
    routing : list, optional
        Per ``EXPERTS`` loop in program order, per image of the batch, the tokens each
        expert serves (:func:`routing_counts`); needed when the program has an MoE layer.
    schedule : Schedule
        ``SCHEDULE.ORDER`` for loops compiled with ``REGISTER``.
    ddr : DdrRates, optional
        The DDR's rates (default: the DDR model's ZCU104 defaults for ``config``).
    model : CostModel, optional
        The overheads (default: the measured ones).

    Returns
    -------
    dict
        ``cycles`` (the run), ``phases`` (per phase: ``cycles``, ``share``,
        ``instructions``, ``read_bytes``), ``instructions``, ``read_bytes`` and
        ``expert_read_bytes`` (all DDR reads, and those of the ``EXPERTS`` bodies' streams:
        exact for the routing given) and ``per_instruction`` (the
        span charged to each instruction, in program order of execution).

    Raises
    ------
    M3VitError
        For a program with an MoE layer and no (or too little) routing.
    """
    from .phases import PHASES, instruction_phases

    ddr = ddr or DdrRates.for_config(config)
    cm = model or CostModel.for_config(config)
    ops = [decode(program[i:i + INSTRUCTION_BYTES])
           for i in range(0, len(program) - INSTRUCTION_BYTES + 1, INSTRUCTION_BYTES)]
    names = instruction_phases(program)
    mc = _Machine()
    spans: list[tuple[int, float]] = []
    loops = list(routing or [])
    loop_index = 0
    pc = 0
    while pc < len(ops):
        op, f = ops[pc]
        if op == Opcode.EXPERTS:
            if loop_index >= len(loops):
                raise M3VitError(f"instruction {pc} is an EXPERTS loop and the routing has "
                                 f"{len(loops)} layer(s): give one per MoE layer")
            counts = [sum(c) for c in zip(*loops[loop_index], strict=True)]
            loop_index += 1
            order = schedule if f["order"] == 0 else Schedule(f["order"] - 1)
            start = mc.t
            _step(mc, cm, config, ddr, pc, op, f)
            spans.extend(mc.drains)
            start += sum(d for _, d in mc.drains)
            mc.drains.clear()
            body = [(pc + 1 + j, ops[pc + 1 + j]) for j in range(f["body"])]
            if order == Schedule.EXPERT_BY_EXPERT:
                visits = [counts[e] for e in visit_order(counts)]
            else:
                visits = [1] * sum(counts)
            for tokens in visits:
                for bpc, (bop, bf) in body:
                    _step(mc, cm, config, ddr, bpc, bop, dict(bf, tokens=tokens,
                                                              routed=bf["tokens"]))
            waited = sum(d for _, d in mc.drains)
            spans.extend(mc.drains)
            mc.drains.clear()
            spans.append((pc, mc.t - start - waited))
            pc += 1 + f["body"]
            continue
        before = mc.t
        _step(mc, cm, config, ddr, pc, op, f)
        waited = sum(d for _, d in mc.drains)
        spans.extend(mc.drains)
        mc.drains.clear()
        spans.append((pc, mc.t - before - waited))
        pc += 1
    total = mc.t
    phases: dict[str, dict[str, float]] = {}
    for pc_, span in spans:
        row = phases.setdefault(names[pc_], {"cycles": 0.0, "instructions": 0})
        row["cycles"] += span
        row["instructions"] += 1
    ordered = {p: phases[p] for p in PHASES if p in phases}
    for row in ordered.values():
        row["share"] = row["cycles"] / total if total else 0.0
    return {"cycles": total, "phases": ordered, "instructions": len(spans),
            "read_bytes": mc.read_bytes, "expert_read_bytes": mc.expert_read_bytes,
            "per_instruction": spans}


def _fetch(mc: _Machine, cm: CostModel, pc: int) -> float:
    """Control cycles to fetch and check instruction ``pc`` (a line miss costs a read)."""
    line = pc // 8
    slot = line % 4
    if mc.lines.get(slot) == line:
        return cm.control
    mc.lines[slot] = line
    return cm.control + cm.fetch_miss


def _step(mc: _Machine, cm: CostModel, config: AccelConfig, ddr: DdrRates, pc: int,
          op: Opcode, f: dict) -> None:
    """Advance the machine over one instruction."""
    C = config.pe_cols
    entry = intake_beats(config) * config.axi_bytes
    ctl = _fetch(mc, cm, pc)
    if op == Opcode.GEMM:
        _gemm(mc, cm, config, ddr, pc, f, ctl, entry)
        return
    # Anything but a streamed GEMM or a LayerNorm waits for a pending GEMM to drain, and
    # anything but a GEMM for the background softmax.
    if op != Opcode.LAYERNORM:
        mc.wait_gemm()
    if op not in (Opcode.LAYERNORM, Opcode.SOFTMAX):
        mc.wait_bg()
    mc.t += ctl
    if op == Opcode.LAYERNORM:
        words = f["rows"] * f["beats"]
        params = f["beats"] * C * LN_RECORD_BYTES
        mc.read_bytes += params
        if mc.pending:
            mc.wait_gemm()
            mc.wait_bg()
            mc.t += words + cm.ln_tail_prefetched
        else:
            mc.wait_bg()
            mc.t += words + cm.ln_tail
    elif op == Opcode.SOFTMAX:
        # Each row: its probabilities, the last word's top lanes (or a word more) its scale.
        words = f["rows"] * softmax_words(f["length"], C)
        mc.wait_bg()
        mc.bg_end = mc.t + words + cm.softmax_tail
        mc.bg_writes_left = words
        mc.bg_pc = pc
        beats = math.ceil(f["length"] / C)
        mc.bg_read = buffer_span(f["src"], (beats, f["stride"]), (f["rows"], 1))
        mc.bg_write = buffer_span(f["dst"], (softmax_words(f["length"], C), f["stride"]),
                                  (f["rows"], 1))
    elif op == Opcode.RESIDUAL:
        mc.t += f["words"] + cm.residual_tail
    elif op == Opcode.ROUTE:
        # The top-k's steps a token (SCORES_PER_CYCLE experts a step), then the queue
        # pass's (token, choice) a cycle and the tree's levels.
        mc.t += (f["rows"] * (Dispatcher.steps_per_token(config, f["experts"])
                              + cm.route_per_row)
                 + cm.route_base + Dispatcher.select_levels(config))
    elif op == Opcode.COMBINE:
        mc.t += f["rows"] * f["beats"] * _top_k(f) + cm.combine_tail
    elif op == Opcode.LOAD:
        nbytes = f["words"] * C
        mc.read_bytes += nbytes
        # A word a cycle where the router takes LOAD's words from whole entries; else a
        # word spanning several beats takes a beat a cycle.
        if intake_shape(config).load_words or entry <= config.axi_bytes:
            per_word = 1.0
        else:
            per_word = max(1.0, C / config.axi_bytes)
        mc.t += max(f["words"] * per_word, nbytes / ddr.read_bytes_per_cycle) + cm.load_base
    elif op == Opcode.STORE:
        nbytes = f["words"] * C
        mc.t += nbytes / ddr.write_bytes_per_cycle + ddr.read_latency
    elif op == Opcode.LOAD_TABLE:
        nbytes = 512 if f["unit"] == 1 else 256
        mc.read_bytes += nbytes
        mc.t += ddr.read_latency + nbytes / config.axi_bytes
    elif op == Opcode.TASKS:
        mc.t += ddr.read_latency


def _top_k(f: dict) -> int:
    """COMBINE's choices a token: its ``src_stride`` is M · k words for M rows."""
    return max(1, f["src_stride"] // max(1, f["rows"]))


def _plain(f: dict) -> bool:
    """A GEMM that adds no residual, with results in the buffer: its reads may start
    beside the GEMM before it (gathered rows and ``EXPERTS`` bodies included)."""
    return not (f["residual"] or f["mode"] == GemmMode.INT32.value)


def _meets(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def _gemm(mc: _Machine, cm: CostModel, config: AccelConfig, ddr: DdrRates, pc: int, f: dict,
          ctl: float, entry: int) -> None:
    """A GEMM: with its results in the buffer it hands over once issued (its reads start
    early beside the GEMM before it when it adds no residual and reads nothing that one
    writes, or reads it where that one's N-tiles leave in order: gated reads, which wait
    only where a GEMM reads its last N-tile's results within a few cycles of its start);
    with INT32 results it runs to its end."""
    R, G = config.pe_rows, config.gemm_cols
    tokens = f["tokens"]
    n, k = f["n_tiles"], f["k_slices"]
    from_ddr = f["wsrc"] == WeightSource.DDR.value
    tile_load = R * G / entry + cm.tile_gap if from_ddr else G
    # Result words a token and N-tile: V, or 2V for INT16 results (the router's logits).
    words = config.gemm_words * (2 if f["mode"] == GemmMode.INT16.value else 1)
    stall = max(0, (words - 1) * tokens - cm.row_queue)
    # The last N-tile's surplus rows leave after the array's last token; the fitted fills
    # cover the first 112 of them (the queue the overheads were measured with).
    surplus = (words - 1) * tokens
    drain = max(0, min(surplus, cm.row_queue) - min(surplus, CostModel.row_queue))
    compute = n * k * max(tokens, tile_load) + stall * n + drain
    stream = _stream_bytes(f, config)
    mc.read_bytes += stream
    if f["expert"]:
        mc.expert_read_bytes += stream
    # A body GEMM's ranges as the checks bound them: GATHER reaches the routed rows, QUEUE
    # its context's rows (here all M · k of them: the offset is not modelled).
    src_rows = f.get("routed", tokens) if f["src_rows"] == RowMode.GATHER.value else tokens
    dst_rows = f["dst_stride"] if f["dst_rows"] == RowMode.QUEUE.value else tokens
    reads, write = gemm_buffer_ranges(f, config, src_rows, dst_rows)
    if mc.bg_end > mc.t and (any(_meets(r, mc.bg_write) for r in reads)
                             or _meets(write, mc.bg_read) or _meets(write, mc.bg_write)):
        mc.wait_bg()    # a GEMM that touches the background softmax's ranges waits for it
    plain = _plain(f)
    gemm_writes = n * tokens * words     # results through the write port, a word a cycle
    if f["mode"] != GemmMode.INT32.value:
        # The launcher holds GEMMS_HELD GEMMs: one more waits until the first of them
        # has its walks started.
        issue = mc.t + ctl
        if mc.pending and len(mc.walks_starts) >= GEMMS_HELD:
            issue = max(issue, mc.walks_starts[-GEMMS_HELD])
        # Streams queued behind one another follow it without a new first-beat latency.
        latency = ddr.read_latency if issue >= mc.ddr_free else 0
        s_start = max(issue, mc.ddr_free)
        s_end = s_start + latency + stream / ddr.read_bytes_per_cycle
        mc.ddr_free = s_end
        own = cm.fill_per_token * tokens
        early = (mc.pending and plain and mc.prev_write is not None
                 and (mc.prev_ordered or not any(_meets(r, mc.prev_write) for r in reads)))
        # Gated reads of the last N-tile wait for the GEMM before's end: the first K-slice
        # of activations meeting it, or the first weights from the buffer.
        gated_slice = _first_gated_slice(mc, f, tokens, reads) if early else None
        if early:
            # Its reads start once the GEMM before has taken its last token; its results
            # leave after that one's, a word a cycle. Weights from DDR have their first
            # tile in the array already (as chained); from the buffer it loads first.
            walks = max(issue, mc.inputs_done)
            if gated_slice is not None:
                walks = max(walks, mc.gemm_end - gated_slice * tokens)
            fill = cm.gemm_fill_chained if from_ddr else cm.buffer_gemm_fill
            if not from_ddr and not _meets(reads[1], mc.prev_write):
                # Weights from the buffer the GEMM before does not write: their walk starts
                # once that GEMM has its last tile, and the first tile's load hides behind
                # the passes after that.
                b_start = max(issue, mc.tiles_loaded)
                fill = max(cm.gemm_fill_chained, fill - (walks - b_start))
            end = max(walks + fill + own + compute, mc.gemm_end + gemm_writes + cm.early_tail)
        else:
            if mc.pending:
                walks = max(issue, mc.gemm_end)
                fill = cm.gemm_fill_chained if from_ddr else cm.buffer_gemm_fill
            else:
                walks = issue
                fill = cm.gemm_fill if from_ddr else cm.buffer_gemm_fill
            end = walks + fill + own + compute
        if from_ddr:
            end = max(end, s_end + cm.gemm_fill_chained + own)
        _share_write_port(mc, max(walks, mc.gemm_end if mc.pending else walks), end,
                          _port_writes(f, config, gemm_writes))
        mc.walks_starts = [*mc.walks_starts[-GEMMS_HELD:], walks]
        # The last token enters about as many cycles before the end as the last N-tile's
        # surplus words take to leave.
        mc.inputs_done = end - (words - 1) * tokens - cm.early_tail
        mc.prev_write = write if plain else None
        mc.prev_ordered = tokens <= f["dst_stride"]
        # Its last tile loads while its last pass but one computes (its only tile, before
        # its only pass).
        passes = max(tokens, tile_load)
        mc.tiles_loaded = mc.inputs_done - (2 * passes - tile_load if n * k > 1 else passes)
        if write is not None:
            tile = words * f["dst_stride"]
            mc.prev_last_tile = (write[0] + (n - 1) * tile, write[1])
        mc.gemm_end, mc.pending = end, True
        mc.pending_pc = pc
        mc.t = issue
        return
    # INT32 results: after any pending GEMM, to the end.
    mc.wait_gemm()
    mc.prev_write = None
    start = mc.t + ctl
    work = compute + cm.buffer_gemm_fill + cm.fill_per_token * tokens
    out = n * tokens * 4 * G
    work = max(work, out / ddr.write_bytes_per_cycle) + ddr.read_latency
    if from_ddr:
        work = max(work, ddr.read_latency + stream / ddr.read_bytes_per_cycle)
    end = start + work
    _share_write_port(mc, start, end, 0)     # INT32 results go to DDR, not the write port
    mc.gemm_end = end
    mc.t = end


def _first_gated_slice(mc: _Machine, f: dict, tokens: int, reads: list) -> int | None:
    """The K-slice at which a GEMM starting beside the one before first reads that one's
    last N-tile (``None``: never; 0 for weights from the buffer, loaded first)."""
    last = mc.prev_last_tile
    if last is None or not any(_meets(r, last) for r in reads):
        return None
    if len(reads) > 1 and _meets(reads[1], last):
        return 0
    for kk in range(f["k_slices"]):
        start = f["src"] + kk * f["src_stride"]
        if _meets((start, start + tokens - 1), last):
            return kk
    return 0


def _port_writes(f: dict, config: AccelConfig, gemm_writes: int) -> int:
    """The result words a GEMM writes through the port: Q·Kᵀ's INT8 results skip the words
    past its keys (``tokens`` of them), which leave the port to the background softmax."""
    plain8 = f["mode"] in (GemmMode.INT8.value, GemmMode.INT8_TABLE.value) and not f["residual"]
    if f["wsrc"] != WeightSource.BUFFER_COLUMNS.value or not plain8:
        return gemm_writes
    words = f["n_tiles"] * config.gemm_words
    return f["tokens"] * min(words, -(-f["tokens"] // config.pe_cols))


def _share_write_port(mc: _Machine, start: float, end: float, gemm_writes: float) -> None:
    """The background softmax shares the write port: what it could not write while a GEMM
    wrote its results (a word a cycle) between ``start`` and ``end`` it writes after."""
    if mc.bg_end > start:
        free = max(0.0, end - start - gemm_writes)
        left = max(0.0, mc.bg_writes_left - free)
        mc.bg_end = max(mc.bg_end, end + left)
        mc.bg_writes_left = left


def uniform_routing(n_tokens: int, n_experts: int, top_k: int, batch: int,
                    layers: int) -> list[list[list[int]]]:
    """An assumed routing: every expert serves the same share of the tokens' choices
    (``n_tokens · top_k / n_experts``, the remainder to the first experts), each image."""
    choices = n_tokens * top_k
    base, extra = divmod(choices, n_experts)
    counts = [base + (e < extra) for e in range(n_experts)]
    return [[list(counts) for _ in range(batch)] for _ in range(layers)]


def estimate_package(pkg, exe, *, task: str | None = None, batch: int = 1,
                     images=None, schedule: Schedule = Schedule.EXPERT_BY_EXPERT,
                     part: str = "full") -> dict[str, Any]:
    """Estimate one batch of a compiled package, routed as the hardware would route it.

    Parameters
    ----------
    pkg : QuantizedModel or None
        The quantized package the ``.m3x`` came from: the golden model routes ``images``
        with it. ``None``: the uniform routing (:func:`uniform_routing`).
    exe : Executable
        The compiled package (its program for ``batch`` and its configuration).
    task : str, optional
        The task whose routers route (default: the package's first).
    batch : int
        Images a run computes (``images`` holds at least that many with ``pkg``).
    images : torch.Tensor, optional
        (N, C, H, W) float images (with ``pkg``).
    schedule : Schedule
        The MoE schedule.
    part : {"full", "shared", "task"}
        Which program: the whole model, or ``--task all``'s two parts.

    Returns
    -------
    dict
        :func:`estimate_program`'s result plus ``batch``, ``task``, ``routing`` (``golden``
        or ``uniform``), ``clock_mhz`` and ``per_image`` cycles.
    """
    from ..quant import golden

    model = exe.model
    task = task or exe.tasks[0]
    exe.task_select(task)
    exe.program_for(batch)   # one line for a batch the package has no program for
    program = {"full": exe.programs, "shared": exe.shared_programs,
               "task": exe.task_programs}[part][batch - 1]
    if pkg is None:
        routing = uniform_routing(model.n_tokens, model.n_experts, model.top_k, batch,
                                  len(model.moe_blocks))
        how = "uniform"
    else:
        if images is None or len(images) < batch:
            raise M3VitError(f"the golden routing of a batch of {batch} needs {batch} images")
        x_q = golden.quantize_image(images[:batch], exe.input_scale)
        captures = [golden.forward(pkg.tensors, pkg.config, x_q[b:b + 1], task,
                                   capture=True)[1] for b in range(batch)]
        routing = routing_counts(captures, model.moe_blocks, model.n_experts)
        how = "golden"
    if part == "shared":
        routing = []
    result = estimate_program(program, exe.config, routing=routing, schedule=schedule)
    result.update(batch=batch, task=task, routing=how, clock_mhz=exe.config.clock_mhz,
                  per_image=result["cycles"] / batch, part=part)
    return result


def format_estimate(result: dict[str, Any], title: str = "") -> str:
    """The estimate as a table by phase (as ``m3vit profile`` prints a measurement)."""
    clock = result["clock_mhz"]
    lines = [title] if title else []
    lines.append(f"{'phase':<16} {'cycles':>12} {'share':>6} {'instr':>6}")
    for name, row in result["phases"].items():
        lines.append(f"{name:<16} {row['cycles']:>12,.0f} {row['share']:>6.1%} "
                     f"{row['instructions']:>6}")
    b = result["batch"]
    lines.append(f"{'run':<16} {result['cycles']:>12,.0f} {1:>6.0%} {result['instructions']:>6}"
                 f"   {result['cycles'] / clock / 1000:.3f} ms at {clock:g} MHz")
    if b > 1:
        lines.append(f"{'an image':<16} {result['per_image']:>12,.0f}   (batch of {b}: "
                     f"{b * clock * 1e6 / result['cycles']:,.0f} images/s)")
    lines.append(f"DDR read: {result['read_bytes'] / 1e6:.2f} MB; routing: {result['routing']}")
    return "\n".join(lines)
