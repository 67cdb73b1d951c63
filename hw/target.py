"""What a design is elaborated for: simulation (plain Verilog) or synthesis (primitives).

Amaranth hands every ``elaborate(platform)`` the object given to the back end (``None`` by
default). The accelerator's blocks are plain, portable arithmetic that Verilator simulates
as written, with one exception: :class:`~m3vit.hw.packed.PackedArray` can build each packed
multiply-add as a ``DSP48E2`` instance. Yosys (0.23, and 0.70) maps a multiply to a
DSP48E2 on UltraScale+ but leaves the M and P registers, the post-adder and the PCIN
cascade in fabric, so the plain form of the array costs 35 LUTs and 89 FFs a DSP in its
estimate (the ZCU104 array: 44,928 LUTs against 9,088 with instances) where Vivado uses
none. Generated for synthesis (:data:`SYNTHESIS`: the
resource estimate, the Vivado flow), the array instantiates the primitive and the estimate
counts what the board will have; simulated, it stays plain. ``tests/sim/test_packed.py``
runs the same bench on both forms, the primitive one on the subset model of the DSP48E2 in
``sim/models/dsp48e2.v``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SYNTHESIS", "Target", "uses_dsp48e2"]


@dataclass(frozen=True)
class Target:
    """The ``platform`` a design is elaborated with.

    Parameters
    ----------
    dsp48e2 : bool
        Build packed multiply-add chains as ``DSP48E2`` instances (synthesis for an
        UltraScale+ device) instead of plain Verilog arithmetic (simulation, and what
        ``platform=None`` means).
    """

    dsp48e2: bool = False


#: Vendor primitives where the estimate and the board need them.
SYNTHESIS = Target(dsp48e2=True)


def uses_dsp48e2(platform) -> bool:
    """Whether ``platform`` (an ``elaborate`` argument) asks for ``DSP48E2`` instances."""
    return bool(getattr(platform, "dsp48e2", False))
