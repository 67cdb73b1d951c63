"""cocotb side of :mod:`m3vit.sw.bench.block_latency`: one dense block, no stalls, cycles to
a JSON file."""

import json
import os
from pathlib import Path

import cocotb

from m3vit.sim.engine_tb import EngineBench

from .block_latency import PRESET_ENV, RESULT_ENV
from .programs import dense_block_case


@cocotb.test()
async def test_block_latency(dut):
    """Run the dense block with the DMA model at full rate; write its cycle count."""
    tb = EngineBench(dut, "free")
    await tb.reset()
    cycles = await tb.check(dense_block_case(tb.cfg, os.environ[PRESET_ENV]))
    Path(os.environ[RESULT_ENV]).write_text(json.dumps({"cycles": cycles}))
