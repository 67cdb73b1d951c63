"""Differential program fuzzing (issue #18): the ISA model and the RTL agree on every program.

Each case starts from a legal program of :mod:`m3vit.sw.bench.programs` (a GEMM of random
shape, mode and weight source, a LayerNorm / softmax / residual pass, a task-selected
GEMM, strided loads and stores, a softmax beside a GEMM, a whole MoE layer under a routing
pattern, or one of the bad programs) and, most of the time, damages it:

- ``field``: one operand of one instruction set to 0, 1, its largest value, its value ± 1
  or a random value of its width — shapes over capacity, addresses out of range, modes and
  flags the instruction set has no meaning for;
- ``opcode``: one instruction's opcode byte replaced by a random byte;
- ``no_end``: the ``END`` dropped, so the controller fetches on past the program;
- ``long_loop``: an ``EXPERTS`` loop whose body runs past the program's end;
- ``flip``: up to four bits of the program flipped.

The program is followed in DDR by a fill of ``0xFF`` bytes (an illegal opcode), so a program
that runs past its end stops there on both sides. It then runs on the ISA model
(:func:`m3vit.sw.compiler.isa_model.execute`) and on the Verilated SoC model (a fresh one
per case: no state from an earlier case), with the same DDR window, ``TASK_SELECT`` and
``SCHEDULE``. The two must agree: the same error code at the same pc, or both reach
``END`` with the same DDR window, byte for byte — and the RTL must raise its interrupt
within :data:`CYCLE_LIMIT` cycles.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3vit.hw.config import AccelConfig
from m3vit.hw.isa import INSTRUCTION_BYTES, OPERANDS, GemmMode, Opcode, WeightSource
from m3vit.hw.registers import REGISTER_MAP, ErrorCode

from ..compiler.isa_model import MachineStop, execute
from ..errors import M3VitError
from . import programs as P

__all__ = ["CYCLE_LIMIT", "ProgramFuzzStats", "fuzz_programs", "make_case", "start_on_soc"]

#: Cycles the RTL gets to raise its interrupt on one case (the largest legal case here
#: takes ~30 k).
CYCLE_LIMIT = 2_000_000
PROGRAM_BASE = 0x1000
#: Bytes of 0xFF after the program: an illegal opcode wherever a run goes past its end.
FILL_BYTES = 8 * INSTRUCTION_BYTES
MUTATIONS = ("legal", "field", "opcode", "no_end", "long_loop", "flip")


@dataclass
class ProgramFuzzStats:
    """Cases run, by mutation and by outcome; disagreements (expected none)."""

    cases: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    unspecified: int = 0
    #: Functional coverage: (opcode name, how it ended, SCHEDULE) → programs, where both
    #: sides agreed: "NONE" for an opcode completed in a run that reached END, an error
    #: code for the instruction a run stopped on ("unknown" for an opcode byte the ISA
    #: does not have).
    coverage: Counter = field(default_factory=Counter)
    max_cycles: int = 0
    rtl_cycles: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        """Cases run."""
        return sum(self.cases.values())


def _base_case(cfg: AccelConfig, rng: np.random.Generator) -> P.Case:
    """A legal (or known-bad) program with its DDR window."""
    seed = int(rng.integers(1 << 31))
    kind = int(rng.integers(8))
    if kind <= 1:
        tokens = int(rng.integers(1, cfg.max_tokens + 1))
        draw = rng.random()
        mode = (GemmMode.INT8 if draw < 0.55 else GemmMode.INT16 if draw < 0.7
                else GemmMode.INT32)
        wsrc = WeightSource.DDR if rng.random() < 0.6 else WeightSource.BUFFER_ROWS
        residual = bool(mode == GemmMode.INT8 and wsrc == WeightSource.DDR
                        and rng.random() < 0.5)
        return P.gemm_case(cfg, seed, tokens, int(rng.integers(1, 4)),
                           int(rng.integers(1, 3)), mode, wsrc, residual=residual,
                           row_scale=bool(mode == GemmMode.INT8 and rng.random() < 0.3))
    if kind == 2:
        op = [Opcode.LAYERNORM, Opcode.SOFTMAX, Opcode.RESIDUAL][int(rng.integers(3))]
        return P.vector_case(cfg, seed, op, int(rng.integers(1, 6)),
                             int(rng.integers(1, 3 * cfg.pe_cols + 1)))
    if kind == 3:
        return P.task_select_case(cfg, seed, int(rng.integers(3)))
    if kind == 4:
        return P.strided_load_store_case(cfg, seed)
    if kind == 5 and rng.random() < 0.5:
        return P.softmax_overlap_case(cfg, seed, P.SOFTMAX_HAZARDS[int(rng.integers(4))])
    if kind == 5:
        hazards = P.GEMM_CHAIN_HAZARDS
        return P.gemm_chain_case(cfg, seed, hazards[int(rng.integers(len(hazards)))],
                                 int(rng.integers(1, cfg.max_tokens + 1)),
                                 int(rng.integers(1, 4)), int(rng.integers(1, 3)))
    if kind == 6:
        routing = P.ROUTINGS[int(rng.integers(len(P.ROUTINGS)))]
        return P.moe_routing_case(cfg, seed, routing, int(rng.integers(2, 9)),
                                  schedule=int(rng.integers(2)),
                                  queue_over_inputs=bool(rng.random() < 0.25))
    bad = P.bad_program_cases(cfg)
    return bad[int(rng.integers(len(bad)))]


#: Operands that are buffer word addresses or DDR offsets.
_ADDRESS_FIELDS = frozenset({"src", "dst", "src_a", "src_b", "wbuf", "res_src", "ddr",
                             "out_ddr"})


def _instructions(program: bytes) -> list[tuple[int, Opcode | None]]:
    out = []
    for i in range(len(program) // INSTRUCTION_BYTES):
        try:
            op = Opcode(program[i * INSTRUCTION_BYTES])
        except ValueError:
            op = None
        out.append((i, op))
    return out


def _mutate(cfg: AccelConfig, program: bytes, kind: str, rng: np.random.Generator
            ) -> tuple[bytes, str]:
    raw = bytearray(program)
    instrs = _instructions(program)
    if kind == "field":
        choices = [(i, op) for i, op in instrs if op is not None and OPERANDS.get(op)
                   and list(OPERANDS[op].members)]
        if not choices:
            return bytes(raw), "no field to change"
        i, op = choices[int(rng.integers(len(choices)))]
        names = list(OPERANDS[op].members)
        # A third of the time an address, pushed to where the buffer or the window ends.
        addresses = [n for n in names if n in _ADDRESS_FIELDS]
        aim = addresses and rng.random() < 1 / 3
        name = (addresses if aim else names)[int(rng.integers(len(addresses if aim
                                                                 else names)))]
        f = OPERANDS[op][name]
        word = int.from_bytes(raw[i * INSTRUCTION_BYTES:(i + 1) * INSTRUCTION_BYTES], "little")
        old = (word >> (8 + f.offset)) & ((1 << f.width) - 1)
        top = (1 << f.width) - 1
        if aim:
            end = cfg.act_buffer_words if name != "ddr" and name != "out_ddr" else 1 << 12
            value = min(top, max(0, end - int(rng.integers(-2, 64))))
        else:
            value = [0, 1, top, min(old + 1, top), max(old - 1, 0),
                     int(rng.integers(top + 1))][int(rng.integers(6))]
        P._set_field(raw, i, op, name, value)
        return bytes(raw), f"instruction {i} ({op.name}) {name} {old} -> {value}"
    if kind == "opcode":
        i = int(rng.integers(len(instrs)))
        byte = int(rng.integers(256))
        raw[i * INSTRUCTION_BYTES] = byte
        return bytes(raw), f"instruction {i} opcode -> 0x{byte:02x}"
    if kind == "no_end":
        ends = [i for i, op in instrs if op == Opcode.END]
        for i in ends:
            raw[i * INSTRUCTION_BYTES] = Opcode.NOP.value
        return bytes(raw), f"END at {ends} made NOP"
    if kind == "long_loop":
        loops = [i for i, op in instrs if op == Opcode.EXPERTS]
        if not loops:
            return bytes(raw), "no loop"
        i = loops[0]
        body = len(instrs) - i + int(rng.integers(1, 8))
        P._set_field(raw, i, Opcode.EXPERTS, "body", min(body, (1 << OPERANDS[
            Opcode.EXPERTS]["body"].width) - 1))
        return bytes(raw), f"EXPERTS at {i} body -> {body}"
    if kind == "flip":
        spots = []
        for _ in range(int(rng.integers(1, 5))):
            pos, bit = int(rng.integers(len(raw))), int(rng.integers(8))
            raw[pos] ^= 1 << bit
            spots.append(pos)
        return bytes(raw), f"bits flipped at bytes {sorted(spots)}"
    return bytes(raw), "unchanged"


def make_case(cfg: AccelConfig, seed: int, index: int) -> tuple[P.Case, str, str]:
    """Case ``index`` of a fuzz run: (the case with its program damaged, mutation, what)."""
    rng = np.random.default_rng([seed, index])
    case = _base_case(cfg, rng)
    kind = MUTATIONS[int(rng.choice(len(MUTATIONS), p=[0.2, 0.35, 0.1, 0.1, 0.05, 0.2]))]
    program, what = _mutate(cfg, case.program, kind, rng)
    # SCHEDULE only steers EXPERTS loops of order REGISTER, but every opcode should be seen
    # to run and to stop under both values.
    schedule = case.schedule if rng.random() < 0.5 else 1 - case.schedule
    case = P.Case(case.name, program, case.ddr, task_select=case.task_select,
                  schedule=schedule)
    return case, kind, what


def _layout(case: P.Case) -> tuple[bytes, int, int]:
    """(program + fill, DATA_BASE, DDR size) of ``case`` in the SoC's DDR."""
    program = case.program + b"\xff" * FILL_BYTES
    data_base = -(-(PROGRAM_BASE + len(program)) // 4096) * 4096
    size = max(1 << 20, -(-(data_base + len(case.ddr)) // (1 << 20)) * (1 << 20))
    return program, data_base, size


def model_outcome(cfg: AccelConfig, case: P.Case
                  ) -> tuple[ErrorCode, int, bytes | None, bool, frozenset]:
    """(error code, pc, DDR window after or None, whether an instruction's result is
    unspecified, the opcodes that completed) of ``case`` on the ISA model.

    The model fetches from what the controller would: the program, its fill, the zeros up
    to ``DATA_BASE`` and the data window (a loop skipped past the fill lands there).
    """
    program, data_base, size = _layout(case)
    fetched = (program + bytes(data_base - PROGRAM_BASE - len(program)) + case.ddr
               + bytes(size - data_base - len(case.ddr)))
    ddr = bytearray(case.ddr)
    mc = None
    try:
        mc = execute(cfg, fetched, ddr, task_select=case.task_select,
                     schedule=case.schedule, watch_overlaps=True)
    except MachineStop as stop:
        return stop.code, stop.pc, None, False, frozenset()
    except M3VitError as e:     # past the end of DDR, or past the instruction limit
        return ErrorCode.NONE, -1, str(e).encode(), False, frozenset()
    return ErrorCode.NONE, 0, bytes(ddr), bool(mc.unspecified), frozenset(mc.completed)


def rtl_outcome(cfg: AccelConfig, case: P.Case, soc=None
                ) -> tuple[ErrorCode, int, bytes | None, int]:
    """(error code, pc, DDR window after or None, cycles) on a fresh Verilated SoC model,
    or on ``soc`` after a reset (its DDR must hold the case's layout).

    Raises
    ------
    M3VitError
        The RTL raised no interrupt within :data:`CYCLE_LIMIT` cycles.
    """
    from m3vit.sim.soc import SocModel

    program, data_base, size = _layout(case)
    if soc is not None:
        soc.reset()
        soc.write_ddr(PROGRAM_BASE, bytes(data_base - PROGRAM_BASE))
        return _run_on(soc, case, program, data_base)
    with SocModel(cfg, ddr_bytes=size) as fresh:
        return _run_on(fresh, case, program, data_base)


def _reg(name: str) -> int:
    return REGISTER_MAP[name].offset


def start_on_soc(soc, program: bytes, ddr: bytes, *, program_base: int, data_base: int,
                 task_select: int = 0, schedule: int = 0) -> None:
    """Place a program and its data window in a SoC model's DDR, program the registers as
    the host does and write ``START`` (the data window is skipped if it does not fit)."""
    soc.write_ddr(program_base, program)
    if data_base + len(ddr) <= soc.ddr_bytes:
        soc.write_ddr(data_base, ddr)
    for name, value in (("PROGRAM_BASE", program_base), ("DATA_BASE", data_base),
                        ("DATA_SIZE", len(ddr))):
        soc.write_register(_reg(f"{name}_LO"), value & 0xFFFF_FFFF)
        soc.write_register(_reg(f"{name}_HI"), value >> 32)
    soc.write_register(_reg("TASK_SELECT"), task_select)
    soc.write_register(_reg("SCHEDULE"), schedule)
    soc.write_register(_reg("CONTROL"), REGISTER_MAP["CONTROL"].encode(START=1))


def _run_on(soc, case: P.Case, program: bytes, data_base: int
            ) -> tuple[ErrorCode, int, bytes | None, int]:
    start_on_soc(soc, program, case.ddr, program_base=PROGRAM_BASE, data_base=data_base,
                 task_select=case.task_select, schedule=case.schedule)
    soc.run(CYCLE_LIMIT)
    if not soc.irq:
        raise M3VitError(f"no interrupt within {CYCLE_LIMIT:,} cycles")
    status = REGISTER_MAP["STATUS"].decode(soc.read_register(_reg("STATUS")))
    cycles = soc.read_register(_reg("CYCLES_LO"))
    if status["ERROR"]:
        return (ErrorCode(soc.read_register(_reg("ERROR_CODE"))),
                soc.read_register(_reg("ERROR_PC")), None, cycles)
    return ErrorCode.NONE, 0, soc.read_ddr(data_base, len(case.ddr)), cycles


#: The (opcode, error code) pairs the controller's checks can produce (``docs/isa.md``,
#: *Semantics and checks*; ``AXI_RESPONSE`` and ``ABORTED`` come from the bus and the host,
#: not from a program: the fault bench and the soak cover them), plus every opcode run to
#: completion; each under both values of ``SCHEDULE``.
REACHABLE: frozenset[tuple[str, str]] = frozenset(
    [(op.name, "NONE") for op in Opcode]
    + [(name, "ILLEGAL_OPCODE") for name in ("unknown", "GEMM", "LOAD_TABLE", "EXPERTS",
                                              "ROUTE", "TASKS", "END")]
    + [(name, "SHAPE_OVER_CAPACITY") for name in ("LOAD", "STORE", "GEMM", "LAYERNORM",
                                                   "SOFTMAX", "RESIDUAL", "ROUTE",
                                                   "EXPERTS", "COMBINE")]
    + [(name, "ADDRESS_OUT_OF_RANGE") for name in ("LOAD", "STORE", "LOAD_TABLE", "GEMM",
                                                    "LAYERNORM", "SOFTMAX", "RESIDUAL",
                                                    "ROUTE", "COMBINE")]
    + [("TASKS", "BAD_TASK")])


def _cover(coverage: Counter, case: P.Case, code: ErrorCode, pc: int,
           completed: frozenset) -> None:
    if code == ErrorCode.NONE:
        for op in completed:
            coverage[(op.name, "NONE", case.schedule)] += 1
        return
    program, _, _ = _layout(case)
    byte = program[pc * INSTRUCTION_BYTES] if pc * INSTRUCTION_BYTES < len(program) else 0
    try:
        name = Opcode(byte).name
    except ValueError:
        name = "unknown"
    coverage[(name, code.name, case.schedule)] += 1


def coverage_table(coverage: Counter) -> tuple[list[str], float]:
    """Markdown rows (opcode × how it ended, both schedules) and the share of the
    reachable cells (:data:`REACHABLE` × 2 schedules) hit."""
    codes = ["NONE", "ILLEGAL_OPCODE", "SHAPE_OVER_CAPACITY", "ADDRESS_OUT_OF_RANGE",
             "BAD_TASK"]
    rows = ["| opcode | " + " | ".join(codes) + " |", "|---|" + "---:|" * len(codes)]
    hit = 0
    for name in ["unknown", *(op.name for op in Opcode)]:
        cells = []
        for code in codes:
            if (name, code) not in REACHABLE:
                cells.append("·")
                continue
            counts = [coverage[(name, code, s)] for s in (0, 1)]
            hit += sum(1 for c in counts if c)
            cells.append(" / ".join(f"{c:,}" if c else "**0**" for c in counts))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows, hit / (2 * len(REACHABLE))


def fuzz_programs(cfg: AccelConfig, cases: int, *, seed: int = 0,
                  say: Callable[[str], None] = lambda _m: None) -> ProgramFuzzStats:
    """Run ``cases`` damaged programs on the ISA model and the RTL; count and compare.

    Parameters
    ----------
    cfg : AccelConfig
        The configuration (its SoC model is built or taken from the cache).
    cases : int
        How many.
    seed : int
        The run's seed: case ``i`` depends only on ``(seed, i)``.
    say : callable
        Told about progress and every disagreement.

    Returns
    -------
    ProgramFuzzStats
    """
    stats = ProgramFuzzStats()
    start = time.monotonic()
    for i in range(cases):
        case, kind, what = make_case(cfg, seed, i)
        stats.cases[kind] += 1
        try:
            model = model_outcome(cfg, case)
        except Exception as e:   # a crash of the model is a finding, not the end of the run
            stats.mismatches.append(f"case {i} ({case.name}, {what}): the model raised "
                                    f"{type(e).__name__}: {e}")
            say(stats.mismatches[-1])
            continue
        try:
            code, pc, ddr, cycles = rtl_outcome(cfg, case)
        except M3VitError as e:
            stats.mismatches.append(f"case {i} ({case.name}, {what}): RTL: {e}")
            say(stats.mismatches[-1])
            continue
        stats.max_cycles = max(stats.max_cycles, cycles)
        stats.rtl_cycles += cycles
        unspecified = model[3]
        if unspecified:
            # An instruction overlapped its own reads: only where the run ends is defined.
            stats.unspecified += 1
            ddr = model[2]
        if (code, pc) != model[:2] or ddr != model[2]:
            detail = ("DDR windows differ" if (code, pc) == model[:2]
                      else f"RTL {code.name} at {pc}, model {model[0].name} at {model[1]}")
            stats.mismatches.append(f"case {i} ({case.name}, {what}): {detail}")
            say(stats.mismatches[-1])
        stats.outcomes[code.name] += 1
        if (code, pc) == model[:2] and ddr == model[2]:
            _cover(stats.coverage, case, code, pc, model[4])
        if (i + 1) % 50 == 0:
            say(f"{i + 1}/{cases} cases, {len(stats.mismatches)} disagreements")
    stats.seconds = time.monotonic() - start
    return stats


def main(argv: list[str] | None = None) -> int:
    """``python -m m3vit.sw.bench.program_fuzz``: run, print, optionally save figures."""
    import argparse

    from m3vit.hw.flow.generate import get_config

    parser = argparse.ArgumentParser(prog="python -m m3vit.sw.bench.program_fuzz",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="ci")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    stats = fuzz_programs(get_config(args.config), args.cases, seed=args.seed, say=print)
    figures = {"cases": stats.total, "by_mutation": dict(stats.cases),
               "outcomes": dict(stats.outcomes), "mismatches": stats.mismatches,
               "unspecified": stats.unspecified,
               "max_cycles": stats.max_cycles, "rtl_cycles": stats.rtl_cycles,
               "seconds": round(stats.seconds, 1), "seed": args.seed, "config": args.config}
    print(json.dumps({k: v for k, v in figures.items() if k != "mismatches"}))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if stats.mismatches else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
