"""cocotb side of ``block_latency.py``: one dense block, no stalls, cycles to a JSON file."""

import json
import os
import sys
from pathlib import Path

import cocotb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from programs import dense_block_case
from test_engine import EngineBench


@cocotb.test()
async def test_block_latency(dut):
    """Run the dense block with the DMA model at full rate; write its cycle count."""
    tb = EngineBench(dut, "free")
    await tb.reset()
    cycles = await tb.check(dense_block_case(tb.cfg, os.environ["M3VIT_BLOCK_PRESET"]))
    Path(os.environ["M3VIT_BLOCK_RESULT"]).write_text(json.dumps({"cycles": cycles}))
