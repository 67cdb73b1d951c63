"""The engine's performance counters: free-running, wrapping, never cleared.

The register file reads each relative to its value at ``START`` / ``CLEAR_COUNTERS``
(``docs/registers.md``), so a counter here only ever counts up.
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..registers import counter_layout

__all__ = ["PerformanceCounters"]


class PerformanceCounters(wiring.Component):
    """The engine's counters of :data:`~m3vit.hw.registers.COUNTERS`, and ``token_beats``.

    Raises
    ------
    ValueError
        If the register map's engine counters are not the ones counted here (a counter
        declared in :data:`~m3vit.hw.registers.COUNTERS` must be counted somewhere).

    Attributes
    ----------
    retired : In(1)
        An instruction retires this cycle.
    gemm_busy : In(1)
        The GEMM engine is busy.
    layernorm_busy, softmax_busy, residual_busy, dispatcher_busy, combiner_busy : In(1)
        The vector-unit blocks are busy.
    gemm_weight_stall, gemm_token_beats : In(32)
        The GEMM engine's own counters of cycles waiting for weights and of tokens through
        the array.
    counters : Out(counter_layout("engine"))
        ``instructions``, ``gemm_busy`` (cycles), ``vector_busy`` (cycles any vector-unit
        block was busy), ``weight_stall``: the engine's side of the register file's
        counters.
    token_beats : Out(32)
        Tokens through the PE array (each is ``pe_rows · pe_cols`` MACs, one cycle of the
        array computing), for the benches' utilisation figures; no register.
    """

    #: The engine-owned counters this block counts (``counter_layout("engine")``'s members).
    COUNTED = frozenset({"instructions", "gemm_busy", "vector_busy", "weight_stall"})

    def __init__(self):
        declared = set(counter_layout("engine").members)
        if declared != self.COUNTED:
            raise ValueError(f"the register map gives the engine the counters "
                             f"{sorted(declared)}, the engine counts {sorted(self.COUNTED)}")
        super().__init__({
            "retired": In(1),
            "gemm_busy": In(1),
            "layernorm_busy": In(1),
            "softmax_busy": In(1),
            "residual_busy": In(1),
            "dispatcher_busy": In(1),
            "combiner_busy": In(1),
            "gemm_weight_stall": In(32),
            "gemm_token_beats": In(32),
            "counters": Out(counter_layout("engine")),
            "token_beats": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        instructions = Signal(32)
        gemm_busy_cycles = Signal(32)
        vector_busy_cycles = Signal(32)
        vector_busy = (self.layernorm_busy | self.softmax_busy | self.residual_busy
                       | self.dispatcher_busy | self.combiner_busy)
        for counter, event in ((instructions, self.retired),
                               (gemm_busy_cycles, self.gemm_busy),
                               (vector_busy_cycles, vector_busy)):
            with m.If(event):
                m.d.sync += counter.eq(counter + 1)
        m.d.comb += [
            self.counters.instructions.eq(instructions),
            self.counters.gemm_busy.eq(gemm_busy_cycles),
            self.counters.vector_busy.eq(vector_busy_cycles),
            self.counters.weight_stall.eq(self.gemm_weight_stall),
            self.token_beats.eq(self.gemm_token_beats),
        ]
        return m
