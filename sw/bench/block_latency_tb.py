"""cocotb side of :mod:`m3vit.sw.bench.block_latency`: one dense block, no stalls, cycles to
a JSON file."""

import json
import os
from pathlib import Path

import cocotb

from m3vit.hw.top import READ_QUEUE_BYTES
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.engine_tb import EngineBench

from ..compiler.estimate import DdrRates
from .block_latency import PRESET_ENV, RESULT_ENV
from .programs import dense_block_case


@cocotb.test()
async def test_block_latency(dut):
    """Run the dense block with the DMA model at the DDR model's ZCU104 rates (the three
    ports' aggregate, its first-beat latency, read ahead as far as the top's queues hold);
    write its cycle count."""
    ddr = DdrRates.for_config(bench_config())
    tb = EngineBench(dut, "free", read_latency=ddr.read_latency,
                     read_rate=(ddr.read_bytes_per_cycle,
                                READ_QUEUE_BYTES * bench_config().n_master_ports))
    await tb.reset()
    cycles = await tb.check(dense_block_case(tb.cfg, os.environ[PRESET_ENV]))
    Path(os.environ[RESULT_ENV]).write_text(json.dumps({"cycles": cycles}))
