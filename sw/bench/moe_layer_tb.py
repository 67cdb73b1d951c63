"""cocotb side of :mod:`m3vit.sw.bench.moe_layer`: one MoE layer under both schedules,
figures to JSON."""

import json
import os
from pathlib import Path

import cocotb
from cocotb.triggers import ReadOnly

from m3vit.hw.registers import Schedule
from m3vit.hw.top import READ_QUEUE_BYTES
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.engine_tb import DATA_BASE, EngineBench, expert_reads

from ..compiler.estimate import DdrRates
from .moe_layer import PRESET_ENV, RESULT_ENV
from .programs import moe_layer_case


class PhaseMonitor:
    """Per cycle: did an expert-weight beat arrive, did the PE array take a token."""

    def __init__(self, tb: EngineBench, lo: int, hi: int):
        self.tb, self.lo, self.hi = tb, lo, hi
        self.beats: list[int] = []          # cycles with an expert-weight beat
        self.active: set[int] = set()       # cycles with a token through the array
        self.bytes = 0                      # expert-weight bytes in those beats
        self.running = True
        tb.dma.beat_hook = self._beat
        cocotb.start_soon(self._watch())

    def _beat(self, addr: int, nbytes: int) -> None:
        if self.lo <= addr - DATA_BASE < self.hi:
            self.beats.append(self.tb.dma.cycle)
            self.bytes += nbytes

    async def _watch(self) -> None:
        dut, last = self.tb.dut, None
        while self.running:
            await ReadOnly()
            value = dut.token_beats.value.to_unsigned()
            if last is not None and value != last:
                self.active.add(self.tb.dma.cycle)
            last = value
            await self.tb.edge

    def figures(self) -> dict:
        first, last = self.beats[0], self.beats[-1]
        span = last - first + 1
        active = {c for c in self.active if first <= c <= last}
        both = sum(1 for c in self.beats if c in active)
        return {"expert_phase_cycles": span, "weight_beats": len(self.beats),
                "array_cycles": len(active), "overlap_cycles": both,
                "ddr_utilization": self.bytes / (span * self.tb.dma.read_rate[0]),
                "weight_load_hidden": both / len(self.beats),
                "compute_hidden": both / max(1, len(active))}


@cocotb.test()
async def test_moe_layer_schedules(dut):
    """Expert by expert, then token by token, on the same program; bit-exact both times."""
    # The DDR model's ZCU104 rates: the three ports' aggregate, read ahead as far as the
    # top's read queues hold (docs/simulation.md), so the cycles are the DDR's, not the
    # intake's (an entry a cycle would be 128 of the DDR's 47 bytes a cycle).
    ddr = DdrRates.for_config(bench_config())
    ahead = READ_QUEUE_BYTES * bench_config().n_master_ports
    tb = EngineBench(dut, "free", read_latency=ddr.read_latency, memory_bytes=16 << 20,
                     read_rate=(ddr.read_bytes_per_cycle, ahead))
    await tb.reset()
    preset = os.environ[PRESET_ENV]
    results = {"read_latency": ddr.read_latency, "read_bytes_per_cycle": ddr.read_bytes_per_cycle,
               "read_ahead_bytes": ahead}
    for schedule in Schedule:
        case = moe_layer_case(tb.cfg, preset, schedule=schedule.value)
        lo = min(base for base, _ in case.meta["blocks"])
        hi = max(base + length for base, length in case.meta["blocks"])
        monitor = PhaseMonitor(tb, lo, hi) if schedule == Schedule.EXPERT_BY_EXPERT else None
        # Token by token re-reads an expert per choice: ~2.5 M cycles for edge-moe.
        cycles = await tb.check(case, limit=20_000_000)
        entry = {"cycles": cycles, "ddr_read_bytes": sum(n for _, n in tb.dma.read_log),
                 "expert_read_bytes": sum(expert_reads(tb, case)),
                 "active_experts": sum(1 for c in case.meta["counts"] if c),
                 "experts": len(case.meta["counts"]), "entries": case.meta["entries"],
                 "expert_block_bytes": case.meta["blocks"][0][1]}
        if monitor is not None:
            monitor.running = False
            tb.dma.beat_hook = None
            entry.update(monitor.figures())
        results[schedule.name] = entry
        tb.log.info("%s: %s", schedule.name, entry)
    Path(os.environ[RESULT_ENV]).write_text(json.dumps(results, indent=1))
