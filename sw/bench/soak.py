"""Soak (issue #18): many images with random task switches, both schedules, random DDR
timing and an abort every so often — bit-exact throughout, the counters consistent.

One Verilated CI SoC model and one loaded package (``tiny`` at 16 × 16, compiled for
batches of up to two) serve the whole run, as a board would. Before each run the soak
draws, from its seed:

- the task (a switch whenever it differs from the last run's) and ``SCHEDULE``;
- the DDR model's timing: extra latency up to 0, 8, 64 or 200 cycles a burst and a
  withheld ready or idle beat in 0, 10, 30 or 50 % of cycles on every AXI channel
  (:meth:`m3vit.sim.soc.DdrFaults.jitter`);
- one or two of eight images (a batch of two in one run).

Every ``abort_every``-th run is cut short instead: the driver's watchdog is set to a few
thousand cycles, so it fires mid-run, aborts (or resets) the accelerator and raises; the
next run must be exact again. Every other run's heads must equal ``golden.forward`` of each
image, and its instruction count and DDR bytes read and written must equal those of the
first run of the same task, batch and schedule (timing moves cycles, never work). A
run that trips the normal watchdog is a hang.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["SoakStats", "soak"]

#: Extra DDR latency (cycles a burst) and stall probability a run draws from.
LATENCIES = (0, 8, 64, 200)
STALLS = (0.0, 0.1, 0.3, 0.5)


@dataclass
class SoakStats:
    """What a soak did and found (every count of trouble is expected to be 0)."""

    runs: int = 0
    images: int = 0
    exact_images: int = 0
    task_switches: int = 0
    aborts: int = 0
    aborts_completed: int = 0     # a cut-short run that finished before its watchdog
    hangs: int = 0
    counter_mismatches: list[str] = field(default_factory=list)
    mismatched_images: list[str] = field(default_factory=list)
    by_schedule: Counter = field(default_factory=Counter)
    by_timing: Counter = field(default_factory=Counter)
    cycles: int = 0
    seconds: float = 0.0


def soak(runs: int, *, seed: int = 0, abort_every: int = 9,
         say: Callable[[str], None] = lambda _m: None) -> SoakStats:
    """Run ``runs`` accelerator runs as the module docstring says; their figures.

    Parameters
    ----------
    runs : int
        Accelerator runs (a batch of two images is one run; cut-short runs count).
    seed : int
        Draws every choice: the same seed makes the same soak.
    abort_every : int
        Every this-many-th run is aborted by a short watchdog.
    say : callable
        Told about progress and every problem.
    """
    from m3vit.hw.flow.generate import get_config
    from m3vit.hw.registers import Schedule
    from m3vit.sim.soc import DdrFaults

    from ..compiler.executable import compile_executable
    from ..model.config import get_preset
    from ..model.m3vit import M3ViT
    from ..model.train import scenes_for
    from ..quant import golden
    from ..quant.quantize import quantize
    from ..runtime.driver import Accelerator, WatchdogError

    cfg = get_config("ci")
    pkg = quantize(M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0), n_calib=4)
    exe = compile_executable(pkg, cfg, max_batch=2)
    images = scenes_for(exe.model, 8, seed=seed + 11)["image"]
    tasks = list(exe.tasks)
    expected = {}
    for task in tasks:
        for i in range(len(images)):
            x_q = golden.quantize_image(images[i:i + 1], exe.input_scale)
            expected[(i, task)] = golden.forward(pkg.tensors, pkg.config, x_q, task)[0][0]
    rng = random.Random(seed)
    stats = SoakStats()
    baseline: dict[tuple, tuple[int, int, int]] = {}
    start = time.monotonic()
    last_task = None
    with Accelerator.open("sim", config=cfg, ddr_bytes=16 << 20) as acc:
        acc.load(exe)
        soc = acc.board.soc
        normal_watchdog = acc.watchdog_cycles
        for n in range(runs):
            task = rng.choice(tasks)
            schedule = rng.choice(list(Schedule))
            latency, stall = rng.choice(LATENCIES), rng.choice(STALLS)
            batch = rng.choice((1, 2))
            picked = rng.sample(range(len(images)), batch)
            soc.faults = DdrFaults.jitter(rng.randrange(1 << 32), latency=latency, stall=stall)
            acc.set_schedule(schedule)
            stats.runs += 1
            if last_task is not None and task != last_task:
                stats.task_switches += 1
            last_task = task
            if n % abort_every == abort_every - 1:
                acc.watchdog_cycles = rng.randint(500, 20_000)
                try:
                    acc.infer(images[picked], task, batch=batch)
                    stats.aborts_completed += 1
                except WatchdogError:
                    stats.aborts += 1
                finally:
                    acc.watchdog_cycles = normal_watchdog
                continue
            try:
                out = acc.infer(images[picked], task, batch=batch)
            except WatchdogError as e:
                stats.hangs += 1
                say(f"run {n}: hang: {e}")
                continue
            stats.by_schedule[schedule.name] += 1
            stats.by_timing[(latency, stall)] += 1
            stats.images += batch
            for j, i in enumerate(picked):
                if torch.equal(out.heads[j], expected[(i, task)]):
                    stats.exact_images += 1
                else:
                    stats.mismatched_images.append(f"run {n}: image {i} {task}")
                    say(f"run {n}: image {i} ({task}, {schedule.name}, latency {latency}, "
                        f"stall {stall}) differs from the golden model")
            run = out.runs[0]
            stats.cycles += run.cycles
            work = (run.instructions, run.ddr_read_bytes, run.ddr_write_bytes)
            key = (task, batch, schedule.name)
            if baseline.setdefault(key, work) != work:
                stats.counter_mismatches.append(f"run {n} {key}: {work} != {baseline[key]}")
                say(stats.counter_mismatches[-1])
            if (n + 1) % 25 == 0:
                say(f"{n + 1}/{runs} runs, {stats.exact_images}/{stats.images} images exact, "
                    f"{stats.aborts} aborts, {stats.hangs} hangs")
        soc.faults = DdrFaults()
    stats.seconds = time.monotonic() - start
    return stats
