"""cocotb module behind :func:`m3vit.sw.bench.gemm_utilization.bench_gemm_utilization`.

Runs one INT8 pass per shape in :data:`SHAPES_ENV` with activations and parameters always
available, the weight stream limited to the bandwidth in the same JSON (bytes per cycle,
and never more than one ``weights`` beat a cycle: the engine is built with the top's
intake, several rows a beat, which :class:`~m3vit.sw.bench.gemm_tb.TB` reads off the DUT
and this module checks against the request) and the output always ready; checks the
results against the golden model and writes, per shape, the cycles from reset release to
the last result and the engine's counters to the JSON file named by :data:`OUT_ENV`.
"""

import json
import os

import cocotb

from m3vit.hw.isa import GemmOp

from .gemm_tb import TB, make_pass
from .gemm_utilization import OUT_ENV, SHAPES_ENV


@cocotb.test()
async def measure_utilization(dut) -> None:
    """One pass per shape, exact, timed."""
    request = json.loads(os.environ[SHAPES_ENV])
    figures = []
    for tokens, k, n in request["shapes"]:
        tb = TB(dut, gaps=False, backpressure=False,
                weight_bytes_per_cycle=request["weight_bytes_per_cycle"])
        # The Verilog under test must be the engine the figures are reported for.
        intake = (tb.rows_per_beat, tb.params_per_beat)
        assert intake == (request["rows_per_beat"], request["params_per_beat"]), intake
        gemm = make_pass(tb.rng, GemmOp.INT8, tokens, k, n)
        await tb.reset()
        await tb.run_passes([gemm])
        cycles = tb.result_cycles[-1]  # cycle 1 is the first after reset: streams start there
        figures.append({"tokens": tokens, "k": k, "n": n, "cycles": cycles,
                        "counters": tb.counters(), "rows_per_beat": tb.rows_per_beat,
                        "params_per_beat": tb.params_per_beat})
        tb.log.info("M=%d K=%d N=%d: %d cycles, %s", tokens, k, n, cycles, tb.counters())
    with open(os.environ[OUT_ENV], "w") as out:
        json.dump(figures, out)
