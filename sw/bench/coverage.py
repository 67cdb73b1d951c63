"""Gateware coverage (issue #18): Verilator line, branch and toggle coverage of the SoC top.

One coverage build of the CI SoC model (:class:`m3vit.sim.soc.SocModel` with
``coverage=True``) runs the workload the test suite gives the SoC:

1. ``programs`` damaged programs of the differential fuzzer
   (:mod:`m3vit.sw.bench.program_fuzz`: every opcode, every check, both schedules), the model
   reset between them;
2. the runtime (:class:`~m3vit.sw.runtime.driver.Accelerator` over the model): ``tiny``
   (16 × 16) images of every task, alone and in a batch of two, under both schedules, all
   tasks of an image at once (``infer_all``), the trace read back;
3. the bus faults of :mod:`m3vit.sim.soc` (``DdrFaults``): jittered timing and
   back-pressure, SLVERR and DECERR on a read beat and on a write response, a read that
   never returns (the watchdog's abort and reset), and a host ``ABORT``;
4. every register of the map read (the writable ones written back) and a few unmapped
   offsets read and written.

The counts are written to one ``coverage.dat`` and summarised by :mod:`m3vit.sim.coverage`.
The unit benches of single blocks (cocotb) run other Verilog tops and are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["run_coverage"]


def run_coverage(out: str | Path, *, programs: int = 1500, seed: int = 0,
                 say: Callable[[str], None] = lambda _m: None) -> dict:
    """Run the workload on a coverage build; write ``out`` (``coverage.dat``); figures.

    Returns
    -------
    dict
        ``coverage`` (:class:`~m3vit.sim.coverage.Coverage`), ``programs``, ``images``,
        ``faults``, ``seconds``.
    """
    from m3vit.hw.axi import AxiResp
    from m3vit.hw.flow.generate import get_config
    from m3vit.hw.registers import REGISTER_MAP, Access, Schedule
    from m3vit.sim.coverage import read_coverage
    from m3vit.sim.soc import DdrFaults, SocModel

    from ..compiler.executable import compile_executable
    from ..model.config import get_preset
    from ..model.m3vit import M3ViT
    from ..model.train import scenes_for
    from ..quant.quantize import quantize
    from ..runtime.board import SimBoard
    from ..runtime.driver import Accelerator, AcceleratorError, WatchdogError
    from .program_fuzz import make_case, rtl_outcome

    cfg = get_config("ci")
    start = time.monotonic()
    soc = SocModel(cfg, ddr_bytes=16 << 20, coverage=True, progress=say)
    say(f"{programs} damaged programs")
    for i in range(programs):
        case, _, _ = make_case(cfg, seed, i)
        rtl_outcome(cfg, case, soc)
    soc.reset()
    soc.write_ddr(0, bytes(1 << 20))
    say("the runtime: tiny images, both schedules, batches, all tasks, the trace")
    pkg = quantize(M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0), n_calib=4)
    exe = compile_executable(pkg, cfg, max_batch=2)
    images = scenes_for(exe.model, 4, seed=seed + 5)["image"]
    acc = Accelerator(SimBoard.over(soc))
    acc.load(exe)
    n_images = 0
    for schedule in Schedule:
        acc.set_schedule(schedule)
        for task in exe.tasks:
            acc.infer(images[:1], task)
            acc.infer(images[:2], task, batch=2)
            n_images += 3
            acc.read_trace()
        acc.infer_all(images[:2], batch=2)
        n_images += 2
    say("faults on the bus")
    faults = [DdrFaults.jitter(seed + 1), DdrFaults.jitter(seed + 2, latency=200, stall=0.5)]
    for resp in (AxiResp.SLVERR, AxiResp.DECERR):
        faults += [DdrFaults(read_error_beat=200, error_resp=resp),
                   DdrFaults(write_error_response=0, error_resp=resp)]
    faults.append(DdrFaults(hang_read_burst=30))
    injected = 0
    watchdog = acc.watchdog_cycles
    for f in faults:
        soc.faults = f
        if f.hang_read_burst is not None:
            acc.watchdog_cycles = 100_000
        try:
            acc.infer(images[:1], exe.tasks[0])
        except (AcceleratorError, WatchdogError):
            injected += 1
        finally:
            acc.watchdog_cycles = watchdog
            soc.faults = DdrFaults()
    # A host abort part-way (the watchdog's first resort) with the bus healthy.
    acc.watchdog_cycles = 20_000
    try:
        acc.infer(images[:1], exe.tasks[0])
    except WatchdogError:
        injected += 1
    acc.watchdog_cycles = watchdog
    acc.infer(images[:1], exe.tasks[0])
    say("every register read, the writable ones written back, unmapped offsets")
    for reg in REGISTER_MAP:
        value = soc.read_register(reg.offset)
        if reg.access == Access.RW:
            soc.write_register(reg.offset, value)
    for offset in (0x3C, 0x7C, 0x1FC):     # holes of the map: read as 0, writes ignored
        soc.write_register(offset, 0xFFFF_FFFF)
        soc.read_register(offset)
    path = soc.write_coverage(out)
    soc.close()
    say(f"reading {path}")
    cov = read_coverage(path)
    return {"coverage": cov, "programs": programs, "images": n_images + 1,
            "faults": injected, "seconds": time.monotonic() - start}
