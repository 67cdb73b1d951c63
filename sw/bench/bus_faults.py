"""Faults on the AXI bus: what the accelerator and the runtime do when the DDR misbehaves.

``python -m m3vit.sw.bench.bus_faults`` (and ``python -m m3vit.sw.bench faults``) runs the
``tiny`` model on 16 × 16 images under the runtime (:class:`~m3vit.sw.runtime.driver.
Accelerator`, ``infer_all``: the shared program, then each task's) on the CI SoC model, and
has the DDR model (:class:`~m3vit.sim.soc.DdrFaults`) inject, one call at a time:

- an error response, SLVERR or DECERR, on a random read beat or write response of the call:
  the call must end in :class:`~m3vit.sw.runtime.driver.AcceleratorError` with
  ``AXI_RESPONSE`` and an ``ERROR_PC`` at the instruction the error hit or one of the next
  three (:func:`instructions_at`);
- a read burst that is never answered: the call must end in
  :class:`~m3vit.sw.runtime.driver.WatchdogError`, the accelerator idle again;
- random latency and back-pressure on every channel: the call must be bit-exact.

After every fault the next run, faults off, must be bit-exact (and take the cycles of a
clean run). Every random choice comes from one seed; the faults are shared out over worker
processes, each with its own SoC model, and the figures do not depend on how many.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from m3vit.hw.axi import AxiResp
from m3vit.hw.config import CI
from m3vit.hw.registers import REGISTER_MAP, ErrorCode, Schedule
from m3vit.sim.soc import DdrFaults, SocModel

from ..runtime.board import SimBoard
from ..runtime.driver import Accelerator, AcceleratorError, WatchdogError

__all__ = ["FaultBench", "FaultPlan", "Outcome", "bench_bus_faults", "instructions_at", "main",
           "markdown", "summarise"]

#: Kinds of once-only fault, in the order of the figures.
KINDS = ("read_error", "write_error", "hung_read")
#: Slack between the cycle the driver's START write returns and the run's cycle 0.
_START_SLACK = 8
#: The watchdog a call runs under: this much longer than the schedule's longest clean run.
WATCHDOG_MARGIN = 1.25
#: Jittered calls run under this many times the faulted calls' watchdog.
JITTER_WATCHDOG_FACTOR = 10
#: Read beats at the end of a run swept one by one: they cover its last instruction fetch.
TAIL_BEATS = 32


@dataclass(frozen=True)
class FaultPlan:
    """One fault and the call it is injected into.

    Attributes
    ----------
    kind : str
        ``read_error``, ``write_error`` or ``hung_read`` (:data:`KINDS`), or ``jitter``.
    schedule : Schedule
        The MoE schedule of the call.
    index : int
        The read beat, write response or read burst of the call that fails (0 = first);
        for ``jitter`` the seed.
    resp : AxiResp
        The error response (``read_error``, ``write_error``).
    latency, stall : int, float
        ``jitter`` only: :meth:`DdrFaults.jitter <m3vit.sim.soc.DdrFaults.jitter>`'s
        arguments.
    group : str
        ``random`` (a random position), ``tail`` (the sweep of a call's last read beats)
        or ``jitter``.
    """

    kind: str
    schedule: Schedule
    index: int
    resp: AxiResp = AxiResp.SLVERR
    latency: int = 0
    stall: float = 0.0
    group: str = "random"

    def faults(self) -> DdrFaults:
        """What the DDR model is told to inject."""
        if self.kind == "jitter":
            return DdrFaults.jitter(self.index, latency=self.latency, stall=self.stall)
        field = {"read_error": "read_error_beat", "write_error": "write_error_response",
                 "hung_read": "hang_read_burst"}[self.kind]
        return DdrFaults(**{field: self.index}, error_resp=self.resp)


@dataclass
class Outcome:
    """What one faulted call did, and the run after it.

    Attributes
    ----------
    plan : FaultPlan
    injected : bool
        The DDR model's counter of that fault went up (jitter: every channel was slowed).
    ended : str
        ``error`` (:class:`AcceleratorError`), ``watchdog`` (:class:`WatchdogError`) or
        ``finished`` (no exception).
    error_code, error_pc : int or None
        From the :class:`AcceleratorError`.
    pc_at_fault : bool
        ``ERROR_PC`` is the instruction the clean run was in at the fault's cycle or one
        of the next three (:func:`instructions_at`).
    stop_after : int or None
        Cycles from the fault reaching the master to the interrupt (errors) or to the
        driver's return (a hung read: watchdog, abort and reset included).
    busy_after : bool
        ``STATUS.BUSY`` read 1 once the driver had returned: a hang past the watchdog.
    exact : bool
        ``jitter``: the call's heads equal the golden model's.
    cycles, clean_cycles : int
        ``jitter``: the call's cycles and a clean call's.
    next_exact, next_same_cycles : bool
        The next run, faults off, equals the golden heads; and takes a clean run's cycles.
    """

    plan: FaultPlan
    injected: bool = False
    ended: str = "finished"
    error_code: int | None = None
    error_pc: int | None = None
    pc_at_fault: bool = False
    stop_after: int | None = None
    busy_after: bool = False
    exact: bool = False
    cycles: int = 0
    clean_cycles: int = 0
    next_exact: bool = False
    next_same_cycles: bool = False

    @property
    def reported(self) -> bool:
        """The fault was reported as it should be: ``AXI_RESPONSE``, or the watchdog."""
        if self.plan.kind == "hung_read":
            return self.ended == "watchdog" and not self.busy_after
        return self.ended == "error" and self.error_code == ErrorCode.AXI_RESPONSE.value


def instructions_at(starts: Sequence[tuple[int, int]], cycle: int) -> list[int]:
    """The pcs where a run hit by a DDR error at ``cycle`` may stop: the instruction running
    then and the next three.

    The hit instruction finishes before the run stops (so ERROR_PC is usually the next), a
    streamed ``GEMM`` or a background softmax may already have started the one after, and an
    error on the fetch of ``END`` stops at ``END`` itself.

    Parameters
    ----------
    starts : sequence of (int, int)
        (start cycle since ``START``, pc) of each instruction of the clean run, in order
        (the hardware trace, drains left out).
    cycle : int
        The fault's cycle since ``START``, as the host sees it: up to a few cycles late.
    """
    running = max((i for i, (start, _) in enumerate(starts) if start <= cycle + _START_SLACK),
                  default=0)
    return [pc for _, pc in starts[running:running + 4]]


class _TimedBoard(SimBoard):
    """The simulated board, noting the model cycle of each ``START`` and interrupt."""

    _START = REGISTER_MAP["CONTROL"].encode(START=1)
    _CONTROL = REGISTER_MAP["CONTROL"].offset

    def write_register(self, offset: int, value: int) -> None:
        super().write_register(offset, value)
        if offset == self._CONTROL and value == self._START:
            self.starts.append(self.soc.cycle)

    def wait_for_interrupt(self, timeout_cycles: int) -> bool:
        irq = super().wait_for_interrupt(timeout_cycles)
        self.ends.append(self.soc.cycle)
        return irq

    def clear_marks(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []


@dataclass(frozen=True)
class _CallReference:
    """A clean ``infer_all`` call under one schedule: its runs' instruction starts and what
    its faults are drawn from."""

    cycles: int
    longest_run: int
    runs: tuple[tuple[tuple[int, int], ...], ...]   # per run: (start cycle, pc) of each
    read_beats: int
    write_responses: int
    read_bursts: int


class FaultBench:
    """The CI SoC model under the runtime, the ``tiny`` model on 16 × 16 images loaded.

    Builds the package (``tiny`` at 16 × 16, seed 0, compiled for CI), the golden heads of
    one image for every task, and under each schedule a clean ``infer_all`` call's counts
    (read beats, write responses, read bursts: what the faults' indices are drawn from) and
    its runs' instruction traces.

    Parameters
    ----------
    image_seed : int, optional
        Seed of the synthetic image.
    """

    def __init__(self, image_seed: int = 1):
        from ..compiler.executable import compile_executable
        from ..model.config import get_preset
        from ..model.m3vit import M3ViT
        from ..model.train import scenes_for
        from ..quant import golden
        from ..quant.quantize import quantize

        pkg = quantize(M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0), n_calib=4)
        self.package = compile_executable(pkg, CI)
        self.tasks = self.package.tasks
        self.images = scenes_for(pkg.config, 1, seed=image_seed)["image"]
        x_q = golden.quantize_image(self.images, pkg.params["scales"]["input"])
        self.golden = {task: golden.forward(pkg.tensors, pkg.config, x_q, task)[0]
                       for task in self.tasks}
        self.board = _TimedBoard.over(SocModel(CI))
        self.board.clear_marks()
        self.acc = Accelerator(self.board)
        self.acc.load(self.package)
        self.soc = self.board.soc
        self.references = {schedule: self._reference(schedule) for schedule in Schedule}
        self.next_cycles = {}
        for schedule in Schedule:
            self.acc.set_schedule(schedule)
            self.next_cycles[schedule] = self.acc.infer(self.images, self.tasks[0]).runs[0].cycles

    def close(self) -> None:
        """Release the SoC model."""
        self.acc.close()

    def _reference(self, schedule: Schedule) -> _CallReference:
        """A clean call, run by hand as ``infer_all`` runs it (checked to be the same)."""
        from ..quant import golden

        self.acc.set_schedule(schedule)
        before = self.soc.stats
        patches = golden.patchify(self.acc.quantize(self.images), self.package.model.patch_size)
        runs, cycles = [], []
        _, stats = self.acc.run_batch(patches, "shared")
        runs.append(self._starts())
        cycles.append(stats.cycles)
        for task in self.tasks:
            if task != self.acc.task:
                self.acc.set_task(task)
            heads, stats = self.acc.run_batch(patches, "task")
            if not torch.equal(heads[0], self.golden[task][0]):
                raise AssertionError(f"{schedule.name} {task}: the clean run is not bit-exact")
            runs.append(self._starts())
            cycles.append(stats.cycles)
        after = self.soc.stats
        whole = self.acc.infer_all(self.images)
        if whole.cycles != sum(cycles):
            raise AssertionError(f"infer_all took {whole.cycles} cycles, its runs one by one "
                                 f"{sum(cycles)}: the reference is not the call")
        return _CallReference(
            cycles=sum(cycles), longest_run=max(cycles), runs=tuple(runs),
            read_beats=after["r_beat_cycles"] - before["r_beat_cycles"],
            write_responses=after["write_bursts"] - before["write_bursts"],
            read_bursts=after["read_bursts"] - before["read_bursts"])

    def _starts(self) -> tuple[tuple[int, int], ...]:
        return tuple((e.start, e.pc) for e in self.acc.read_trace() if not e.drain)

    def watchdog(self, schedule: Schedule) -> int:
        """The watchdog a call under ``schedule`` runs with: above its longest clean run,
        the ``infer_all`` call's and the whole program's that follows each fault."""
        longest = max(self.references[schedule].longest_run, self.next_cycles[schedule])
        return int(WATCHDOG_MARGIN * longest)

    def plan(self, n_per_kind: int, n_jitter: int, seed: int) -> list[FaultPlan]:
        """The faults of a bench run: each kind ``n_per_kind`` times (errors half SLVERR,
        half DECERR), random call positions, schedules alternating; the last
        :data:`TAIL_BEATS` read beats of a call one by one; ``n_jitter`` jittered calls."""
        rng = random.Random(seed)
        plans = []
        for kind in KINDS:
            for i in range(n_per_kind):
                schedule = list(Schedule)[i % 2]
                ref = self.references[schedule]
                count = {"read_error": ref.read_beats, "write_error": ref.write_responses,
                         "hung_read": ref.read_bursts}[kind]
                resp = (AxiResp.SLVERR, AxiResp.DECERR)[i // 2 % 2]
                plans.append(FaultPlan(kind, schedule, rng.randrange(count), resp))
        ref = self.references[Schedule.EXPERT_BY_EXPERT]
        plans += [FaultPlan("read_error", Schedule.EXPERT_BY_EXPERT, ref.read_beats - 1 - i,
                            AxiResp.SLVERR, group="tail") for i in range(TAIL_BEATS)]
        plans += [FaultPlan("jitter", list(Schedule)[i % 2], rng.randrange(1 << 32),
                            latency=rng.choice((16, 64, 256)), stall=rng.choice((0.1, 0.3, 0.5)),
                            group="jitter")
                  for i in range(n_jitter)]
        return plans

    def run(self, plan: FaultPlan) -> Outcome:
        """Inject ``plan`` into one ``infer_all`` call, then run once with faults off."""
        acc, soc = self.acc, self.soc
        acc.set_schedule(plan.schedule)
        # A jittered call may take several times a clean one's cycles (token by token waits
        # on the latency of every small read): only a run that stops moving should trip it.
        acc.watchdog_cycles = self.watchdog(plan.schedule) * (
            JITTER_WATCHDOG_FACTOR if plan.kind == "jitter" else 1)
        outcome = Outcome(plan)
        before = soc.stats
        soc.faults = plan.faults()
        self.board.clear_marks()
        try:
            out = acc.infer_all(self.images)
            outcome.exact = all(torch.equal(out.tasks[t].heads, self.golden[t])
                                for t in self.tasks)
            outcome.cycles = out.cycles
        except AcceleratorError as error:
            outcome.ended, outcome.error_code, outcome.error_pc = "error", error.code.value, \
                error.pc
        except WatchdogError:
            outcome.ended = "watchdog"
        end = soc.cycle
        fired = soc.fault_cycles  # before the faults are cleared, which forgets them
        soc.faults = DdrFaults()
        counts = {k: v - before[k] for k, v in soc.stats.items() if k.startswith("fault_")}
        outcome.busy_after = bool(REGISTER_MAP["STATUS"].decode(
            acc.board.read_register(REGISTER_MAP["STATUS"].offset))["BUSY"])
        if plan.kind == "jitter":
            outcome.clean_cycles = self.references[plan.schedule].cycles
            outcome.injected = all(counts[f"fault_{c}"] > 0 for c in
                                   ("ar_stalls", "w_stalls", "r_gaps", "delay_cycles"))
        else:
            self._place(plan, outcome, counts, fired[plan.kind], end)
        after = acc.infer(self.images, self.tasks[0])
        outcome.next_exact = torch.equal(after.heads, self.golden[self.tasks[0]])
        outcome.next_same_cycles = after.runs[0].cycles == self.next_cycles[plan.schedule]
        return outcome

    def _place(self, plan: FaultPlan, outcome: Outcome, counts: dict[str, int],
               at: int | None, end: int) -> None:
        """Whether the fault fired, when, how soon the call stopped, and where."""
        name = {"read_error": "fault_read_errors", "write_error": "fault_write_errors",
                "hung_read": "fault_hung_reads"}[plan.kind]
        outcome.injected = counts[name] == 1
        if at is None:
            return
        starts = self.board.starts
        run = max((i for i, s in enumerate(starts) if s <= at), default=None)
        if run is None:
            return
        if plan.kind == "hung_read":
            outcome.stop_after = end - at
            return
        if run < len(self.board.ends):
            outcome.stop_after = self.board.ends[run] - at
        if outcome.error_pc is not None:
            nearby = instructions_at(self.references[plan.schedule].runs[run], at - starts[run])
            outcome.pc_at_fault = outcome.error_pc in nearby


def _work(n_per_kind: int, n_jitter: int, seed: int, part: int, parts: int) -> dict[str, Any]:
    """One worker process: its share (every ``parts``-th) of the plan, on its own model."""
    torch.set_num_threads(1)
    bench = FaultBench()
    try:
        plans = bench.plan(n_per_kind, n_jitter, seed)
        mine = range(part, len(plans), parts)
        return {"outcomes": [(i, bench.run(plans[i])) for i in mine],
                "watchdog": {s.name: bench.watchdog(s) for s in Schedule},
                "references": {s.name: asdict(bench.references[s]) for s in Schedule},
                "next_cycles": {s.name: c for s, c in bench.next_cycles.items()}}
    finally:
        bench.close()


def bench_bus_faults(n_per_kind: int = 200, n_jitter: int = 40, seed: int = 0,
                     workers: int = 2) -> dict[str, Any]:
    """Inject the faults of :meth:`FaultBench.plan` and summarise what happened.

    Parameters
    ----------
    n_per_kind : int, optional
        Faults of each kind at random positions (read error, write error, hung read).
    n_jitter : int, optional
        Calls under random latency and back-pressure.
    seed : int, optional
        Seed of the plan (positions, responses, jitter seeds).
    workers : int, optional
        Processes sharing the plan, each with its own SoC model (1: in this process).

    Returns
    -------
    dict
        ``rows`` (one per kind and response, and the tail sweep: faults, injected,
        reported, ``ERROR_PC`` at the fault, cycles from the fault to the end, hangs past
        the watchdog, next run bit-exact and same cycles, how unreported ones ended),
        ``jitter`` (calls, bit-exact, every channel slowed, cycles against a clean call),
        ``outcomes`` (every fault) and what was run.
    """
    started = time.perf_counter()
    args = [(n_per_kind, n_jitter, seed, part, workers) for part in range(workers)]
    if workers == 1:
        results = [_work(*args[0])]
    else:
        # spawn, not fork: each worker starts its own torch and SoC model from clean.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_work, *zip(*args, strict=True)))
    outcomes = [o for _, o in sorted((pair for r in results for pair in r["outcomes"]),
                                     key=lambda pair: pair[0])]
    r = {k: results[0][k] for k in ("watchdog", "references", "next_cycles")}
    r.update(seed=seed, n_per_kind=n_per_kind, workers=workers, calls=2 * len(outcomes),
             seconds=time.perf_counter() - started, outcomes=outcomes, **summarise(outcomes))
    return r


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    """``rows`` and ``jitter`` of :func:`bench_bus_faults` for any list of outcomes."""
    return {"rows": _rows(outcomes), "jitter": _jitter(outcomes)}


def _rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[Outcome]] = {}
    for o in outcomes:
        if o.plan.kind != "jitter":
            resp = "" if o.plan.kind == "hung_read" else o.plan.resp.name
            groups.setdefault((o.plan.group, o.plan.kind, resp), []).append(o)
    rows = []
    for (group, kind, resp), members in groups.items():
        stops = [o.stop_after for o in members if o.stop_after is not None]
        others: dict[str, int] = {}
        for o in members:
            if not o.reported:
                how = o.ended if o.error_code is None else \
                    f"ERROR, ERROR_CODE {ErrorCode(o.error_code).name}"
                others[how] = others.get(how, 0) + 1
        rows.append({
            "group": group, "kind": kind, "resp": resp, "faults": len(members),
            "injected": sum(o.injected for o in members),
            "reported": sum(o.reported for o in members),
            "pc_at_fault": None if kind == "hung_read" else sum(o.pc_at_fault for o in members),
            "stop_max": max(stops, default=None),
            "stop_median": statistics.median(stops) if stops else None,
            "hangs": sum(o.busy_after or (kind != "hung_read" and o.ended == "watchdog")
                         for o in members),
            "next_exact": sum(o.next_exact for o in members),
            "next_same_cycles": sum(o.next_same_cycles for o in members),
            "unreported": others})
    return rows


def _jitter(outcomes: list[Outcome]) -> dict[str, Any]:
    runs = [o for o in outcomes if o.plan.kind == "jitter"]
    ratios = [o.cycles / o.clean_cycles for o in runs if o.cycles]
    return {"calls": len(runs), "exact": sum(o.exact for o in runs),
            "injected": sum(o.injected for o in runs),
            "finished": sum(o.ended == "finished" for o in runs),
            "slower": sum(o.cycles > o.clean_cycles for o in runs),
            "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
            "ratio_median": statistics.median(ratios) if ratios else None,
            "next_exact": sum(o.next_exact for o in runs)}


def _pct(part: int, whole: int) -> str:
    return f"{part:,}/{whole:,} ({100 * part / whole:.0f} %)" if whole else "–"


_KIND_NAMES = {"read_error": "error on a read beat", "write_error": "error on a write response",
               "hung_read": "read never answered"}


def markdown(r: dict[str, Any]) -> str:
    """The figures as the Markdown of ``docs/benchmarks.md``'s ``faults`` section."""
    lines = [
        "| fault | faults | injected | reported | `ERROR_PC` at the fault | cycles fault → "
        "end (median / max) | hangs past the watchdog | next run bit-exact | next run same "
        "cycles |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        name = _KIND_NAMES[row["kind"]] + (f", {row['resp']}" if row["resp"] else "")
        if row["group"] == "tail":
            name = f"error on each of a call's last {row['faults']} read beats, {row['resp']}"
        n = row["faults"]
        stops = "–" if row["stop_max"] is None else \
            f"{row['stop_median']:,.0f} / {row['stop_max']:,}"
        lines.append(
            f"| {name} | {n:,} | {_pct(row['injected'], n)} | {_pct(row['reported'], n)} | "
            f"{'–' if row['pc_at_fault'] is None else _pct(row['pc_at_fault'], n)} | {stops} | "
            f"{row['hangs']} | {_pct(row['next_exact'], n)} | "
            f"{_pct(row['next_same_cycles'], n)} |")
    misses = [(row, how, count) for row in r["rows"] for how, count in row["unreported"].items()]
    for row, how, count in misses:
        lines.append("")
        lines.append(f"Not reported as expected ({_KIND_NAMES[row['kind']]}, {row['group']}): "
                     f"{count} ended with {how}.")
    j = r["jitter"]
    if not j["calls"]:
        return "\n".join(lines)
    lines += [
        "",
        "| jittered calls | bit-exact | every channel slowed | slower than clean | cycles / "
        "clean (min / median / max) | next run bit-exact |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {j['calls']} | {_pct(j['exact'], j['calls'])} | {_pct(j['injected'], j['calls'])} "
        f"| {_pct(j['slower'], j['calls'])} | {j['ratio_min']:.3f} / {j['ratio_median']:.3f} / "
        f"{j['ratio_max']:.3f} | {_pct(j['next_exact'], j['calls'])} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the bench, print the table, optionally write the figures."""
    parser = argparse.ArgumentParser(prog="python -m m3vit.sw.bench.bus_faults",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=200, metavar="N",
                        help="faults of each kind at random positions (default 200)")
    parser.add_argument("--jitter", type=int, default=40, metavar="N",
                        help="calls under random latency and back-pressure (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plan (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    r = bench_bus_faults(args.faults, args.jitter, args.seed, args.workers)
    print(markdown(r))
    print(f"{r['calls']:,} calls in {r['seconds']:.0f} s")
    if args.json:
        saved = {k: v for k, v in r.items() if k != "outcomes"}
        args.json.write_text(json.dumps(saved, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
