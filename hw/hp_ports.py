"""The ZCU104's high-performance PS ports: which one each AXI4 master uses, and what they deliver.

One declaration for the block design (``hw/flow/vivado``) and the DDR model
(``m3vit.sim.soc.DdrTiming.zcu104``), so the simulator models exactly the ports the
bitstream wires.

The bandwidth figures are measurements, not data-sheet peaks: Manev et al., "Unexpected
Diversity: Quantitative Memory Analysis for Zynq UltraScale+ Systems", FPT 2019 (public
data: the ZynqUSp-AXI-Speedtest repository), PL masters at 300 MHz reading the PS DDR4
(2400 MT/s, 64 bits, 19.2 GB/s in theory) through 128-bit HP ports:

========================================  ============
HP ports reading at once                  read GB/s
========================================  ============
one                                       ≈ 4.75
two                                       ≈ 9.46
three (HP0 + HP1 + HP3 or HP0 + HP2 + HP3)  ≈ 14.15
all four                                  ≈ 12.2–12.9
HP1 + HP2                                 ≈ 7.7–8.2
========================================  ============

Writes behave alike (one port ≈ 4.8 GB/s, three ≈ 14.4). Why HP1 + HP2 fall short: the two
share one port of the DDR controller (XPI 4, Zynq UltraScale+ TRM UG1085, "PL-PS Interface
Specifics"); HP0 shares its XPI with the DisplayPort master and HP3 with the FPD DMA, both
idle in our design. Four ports read less than three: the controller's arbitration between
all of its ports costs more than the fourth port adds.
"""

from __future__ import annotations

from .errors import M3VitError

__all__ = [
    "HP_ORDER",
    "MEASURED_CLOCK_MHZ",
    "PORT_READ_GBPS",
    "SHARED_PAIR",
    "SHARED_PAIR_READ_GBPS",
    "TOGETHER_READ_GBPS",
    "bytes_per_cycle",
    "hp_ports",
]

#: The order in which masters take HP ports: HP2 last, because it shares a DDR-controller
#: port with HP1 (three masters on HP0, HP1, HP3 read ≈ 14.2 GB/s; on HP0..HP2 they would
#: read less, HP1 and HP2 together being capped at ≈ 8 GB/s).
HP_ORDER: tuple[int, ...] = (0, 1, 3, 2)

#: The clock of the measurements (MHz).
MEASURED_CLOCK_MHZ = 300.0

#: One HP port reading alone (GB/s).
PORT_READ_GBPS = 4.75

#: All masters together, by the number of HP ports in use (GB/s); four: the middle of the
#: measured 12.2–12.9.
TOGETHER_READ_GBPS: dict[int, float] = {1: 4.75, 2: 9.46, 3: 14.15, 4: 12.55}

#: The two HP ports that share a DDR-controller port.
SHARED_PAIR: tuple[int, int] = (1, 2)

#: HP1 and HP2 reading together (GB/s): the middle of the measured 7.7–8.2.
SHARED_PAIR_READ_GBPS = 7.95


def hp_ports(n_masters: int) -> tuple[int, ...]:
    """The HP port (0…3) of each of ``n_masters`` AXI4 masters, master 0 first.

    Parameters
    ----------
    n_masters : int
        1…4 (the ZCU104's PS has four HP ports).

    Returns
    -------
    tuple of int
        The first ``n_masters`` of :data:`HP_ORDER`.

    Raises
    ------
    M3VitError
        For fewer than one or more than four masters.
    """
    if not isinstance(n_masters, int) or not 1 <= n_masters <= len(HP_ORDER):
        raise M3VitError(f"the ZCU104 has {len(HP_ORDER)} HP ports: n_master_ports must be "
                         f"1..{len(HP_ORDER)}, got {n_masters!r}")
    return HP_ORDER[:n_masters]


def bytes_per_cycle(gbps: float, clock_mhz: float) -> float:
    """A bandwidth in GB/s as bytes per cycle of a ``clock_mhz`` clock."""
    return gbps * 1e3 / clock_mhz
