"""The ZCU104 and its PYNQ image as the Vivado flow sees them.

The device and board, the Vivado version the board's PYNQ image was built with, and the
names and addresses that the wrapper, the block design, the build and the runtime
(``m3vit.sw.runtime.pynq_board``) must agree on. Nothing here elaborates or writes anything.
"""

from __future__ import annotations

from ...hp_ports import hp_ports
from ...registers import AXIL_ADDR_WIDTH

__all__ = [
    "ACCEL_CELL",
    "ACCEL_MODULE",
    "BD_NAME",
    "BOARD",
    "CONTROL_BASE",
    "HPM0_FPD_APERTURE_END",
    "HP_PORTS",
    "PART",
    "PS_CELL",
    "PYNQ_IMAGE",
    "PYNQ_VIVADO",
    "VIVADO_VERSION",
    "WRAPPER_MODULE",
    "base_name",
    "master_hp_port",
    "register_window_bytes",
]

#: The ZCU104's device.
PART = "xczu7ev-ffvc1156-2-e"

#: Board name matched against Vivado's installed board parts (``xilinx.com:zcu104:part0:1.1``
#: today); the newest installed revision is used, so the flow does not pin a board-file
#: revision that a later Vivado no longer ships.
BOARD = "zcu104"

#: Vivado version of each PYNQ image (``major.minor``), from PYNQ's release notes: v3.0
#: (Belfast) overlays were built with 2022.1, v3.1 (Carlisle) with 2024.1, v4.0 (Verona)
#: with 2025.2. A bitstream's ``.hwh`` is read by the image's own ``pynq``, so the build
#: uses the Vivado the image was built with.
PYNQ_VIVADO: dict[str, str] = {"3.0": "2022.1", "3.1": "2024.1", "4.0": "2025.2"}

#: The PYNQ image the board runs: the ``pynq`` pinned in ``requirements.txt`` (the test suite
#: keeps the two equal).
PYNQ_IMAGE = "4.0"

#: The Vivado version this flow expects (``vivado -version`` and ``version -short``).
VIVADO_VERSION = PYNQ_VIVADO[PYNQ_IMAGE]

#: Module name of the generated accelerator inside the Vivado project.
ACCEL_MODULE = "m3vit_accel"

#: Module name of the Vivado-ready wrapper (the block design's module reference).
WRAPPER_MODULE = f"{ACCEL_MODULE}_wrapper"

#: Block-design cell of the accelerator. The runtime (``m3vit.sw.runtime.pynq_board``) finds the
#: accelerator in the overlay's ``ip_dict`` by the prefix ``m3vit_accel``.
ACCEL_CELL = f"{ACCEL_MODULE}_0"

#: Block-design cell of the Zynq UltraScale+ processing system.
PS_CELL = "zynq_ultra_ps_e_0"

#: Name of the block design (and so of the ``.hwh`` Vivado writes, before it is renamed).
BD_NAME = "m3vit"

#: Base address of the register window: the start of ``M_AXI_HPM0_FPD``'s lower aperture
#: (0xA000_0000-0xAFFF_FFFF). The runtime reads the address from the ``.hwh``; this only has
#: to be inside the aperture and aligned to the window.
CONTROL_BASE = 0xA000_0000

#: Upper end (exclusive) of ``M_AXI_HPM0_FPD``'s lower aperture.
HPM0_FPD_APERTURE_END = 0xB000_0000

#: The high-performance PS slave ports, HP0 … HP3 (:func:`master_hp_port` says which one
#: each of the accelerator's masters goes to):
#: (block-design port, the PS option that enables it, the option that sets its width, the
#: address-segment prefix, the PS clock pin). HP0..HP3 are ``S_AXI_GP2``..``S_AXI_GP5`` in the
#: PS configuration. Non-coherent HP ports match the runtime, which flushes and invalidates
#: its ``pynq.allocate`` buffers around every run.
HP_PORTS: tuple[tuple[str, str, str, str, str], ...] = tuple(
    (f"S_AXI_HP{i}_FPD", f"PSU__USE__S_AXI_GP{i + 2}", f"PSU__SAXIGP{i + 2}__DATA_WIDTH",
     f"SAXIGP{i + 2}/HP{i}", f"saxihp{i}_fpd_aclk")
    for i in range(4)
)


def register_window_bytes() -> int:
    """Size of the accelerator's AXI4-Lite register window (what its address decoder sees).

    Returns
    -------
    int
        ``2 ** AXIL_ADDR_WIDTH`` bytes; Vivado's smallest segment is 4 KiB, so at least that.
    """
    return max(1 << AXIL_ADDR_WIDTH, 4096)


def base_name(config_name: str) -> str:
    """Base name of the ``.bit`` / ``.hwh`` pair built for ``config_name`` (``m3vit_zcu104``)."""
    return f"m3vit_{config_name}"



def master_hp_port(index: int, n_masters: int) -> tuple[str, str, str, str, str]:
    """The :data:`HP_PORTS` entry of master ``index`` of ``n_masters``.

    Masters take HP0, HP1, HP3 and only then HP2, which shares a DDR-controller port with
    HP1 (:func:`m3vit.hw.hp_ports.hp_ports`, the same choice the DDR model makes).
    """
    return HP_PORTS[hp_ports(n_masters)[index]]
