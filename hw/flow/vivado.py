"""The Vivado flow for the ZCU104: a Vivado-ready top, the block design, the build, the manifest.

``python -m m3vit.hw.flow.vivado --config zcu104 --out bitstreams`` (``make bitstream``):

1. elaborates the accelerator (:class:`m3vit.hw.top.AcceleratorTop`) and writes, to
   ``build/vivado/<config>/``, everything Vivado needs: the accelerator's Verilog
   (``m3vit_accel.v``), a wrapper with standard AXI port names and the interface attributes
   Vivado's IP integrator recognises (``m3vit_accel_wrapper.v``), the block design
   (``block_design.tcl``: Zynq UltraScale+ PS with the ZCU104 board preset, AXI4-Lite control
   from ``M_AXI_HPM0_FPD``, the accelerator's AXI4 masters onto the HP ports, the PL clock at
   the configured target, the address map), the batch build (``build.tcl``: project,
   synthesis, implementation, bitstream, timing and utilisation reports), ``run.sh`` and
   ``flow.json`` (what the folder was generated from);
2. without Vivado on ``PATH`` it prints what to run on a machine that has it and exits with
   status 2 and one line ``m3vit: error: Vivado not found on PATH ...``;
3. with Vivado, checks that its version is the one the PYNQ image was built with
   (:data:`VIVADO_VERSION`), runs the build with a progress line per step, and copies
   ``<base>.bit`` and ``<base>.hwh`` (one base name, as ``pynq.Overlay`` requires) and the
   reports into ``--out`` next to ``manifest.json`` (config hash, clock, Vivado version,
   timing slack, utilisation). A bitstream built for another configuration hash is never
   replaced without ``--force``; a build that misses timing is reported and not copied.

``--collect`` does step 3's copy alone, for a build run elsewhere (``build/vivado/<config>/out``
copied back). Nothing here imports PyTorch or PYNQ; the runtime's side of the contract (the
IP name prefix it looks up in the overlay's ``ip_dict`` and the register window it maps) is
checked against :data:`ACCEL_CELL` and :func:`register_window_bytes` by
``tests/hw/test_vivado.py``. ``docs/bitstream.md`` describes the design.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from amaranth.lib import wiring

from ..config import AccelConfig
from ..errors import M3VitError
from ..registers import AXIL_ADDR_WIDTH
from .generate import CONFIGS, get_config, signature_ports, to_verilog, write_if_changed

__all__ = [
    "ACCEL_CELL",
    "ACCEL_MODULE",
    "BD_NAME",
    "BOARD",
    "CONTROL_BASE",
    "HP_PORTS",
    "PART",
    "PS_CELL",
    "PYNQ_IMAGE",
    "PYNQ_VIVADO",
    "VIVADO_VERSION",
    "WRAPPER_MODULE",
    "BusInterface",
    "FlowFiles",
    "WrapperPort",
    "base_name",
    "block_design_tcl",
    "build_tcl",
    "bus_interfaces",
    "collect",
    "main",
    "parse_timing_summary",
    "parse_utilization",
    "parse_vivado_version",
    "register_window_bytes",
    "run_sh",
    "wrapper_verilog",
    "write_project",
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

#: The high-performance PS slave ports the accelerator's masters go to, in order:
#: (block-design port, the PS option that enables it, the option that sets its width, the
#: address-segment prefix, the PS clock pin). HP0..HP3 are ``S_AXI_GP2``..``S_AXI_GP5`` in the
#: PS configuration. Non-coherent HP ports match the runtime, which flushes and invalidates
#: its ``pynq.allocate`` buffers around every run.
HP_PORTS: tuple[tuple[str, str, str, str, str], ...] = tuple(
    (f"S_AXI_HP{i}_FPD", f"PSU__USE__S_AXI_GP{i + 2}", f"PSU__SAXIGP{i + 2}__DATA_WIDTH",
     f"SAXIGP{i + 2}/HP{i}", f"saxihp{i}_fpd_aclk")
    for i in range(4)
)

#: Folder (under the build folder) where ``build.tcl`` leaves its results.
OUT_SUBDIR = "out"

#: Reports ``build.tcl`` writes into ``out/`` and :func:`collect` copies next to the bitstream.
REPORTS = ("timing_summary.rpt", "utilization.rpt", "utilization_hierarchical.rpt")

#: Prefix of the progress lines ``build.tcl`` prints (shown by :func:`main` with the time).
PROGRESS_MARK = "M3VIT:"

#: Manifest of the built bitstreams, in ``--out``.
MANIFEST_NAME = "manifest.json"

# AXI4 signals Vivado's ``aximm`` interface knows (logical names); a port outside this set
# would not be recognised, so the wrapper refuses it instead of leaving it unconnected.
_AXI_LOGICAL = frozenset(
    [f"AW{s}" for s in ("ID", "ADDR", "LEN", "SIZE", "BURST", "LOCK", "CACHE", "PROT", "QOS",
                        "REGION", "USER", "VALID", "READY")]
    + [f"AR{s}" for s in ("ID", "ADDR", "LEN", "SIZE", "BURST", "LOCK", "CACHE", "PROT", "QOS",
                          "REGION", "USER", "VALID", "READY")]
    + ["WID", "WDATA", "WSTRB", "WLAST", "WUSER", "WVALID", "WREADY",
       "BID", "BRESP", "BUSER", "BVALID", "BREADY",
       "RID", "RDATA", "RRESP", "RLAST", "RUSER", "RVALID", "RREADY"]
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


# ---- the wrapper ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrapperPort:
    """One port of the wrapper and the accelerator port it connects to.

    Attributes
    ----------
    name : str
        Wrapper port (``s_axi_awaddr``).
    inner : str
        Port of the generated accelerator (``s_axil__awaddr``).
    direction : str
        ``"input"`` or ``"output"``.
    width : int
        Bits.
    logical : str
        Vivado's logical signal name in its interface (``AWADDR``, ``INTERRUPT``).
    """

    name: str
    inner: str
    direction: str
    width: int
    logical: str


@dataclass(frozen=True)
class BusInterface:
    """One AXI interface of the wrapper.

    Attributes
    ----------
    name : str
        Interface name in the block design and prefix of its ports (``s_axi``, ``m_axi``).
    member : str
        The accelerator's signature member it comes from (``s_axil``, ``m_axi``).
    mode : str
        ``"slave"`` or ``"master"``.
    protocol : str
        ``"AXI4LITE"`` or ``"AXI4"``.
    ports : tuple of WrapperPort
        Its ports, in signature order.
    """

    name: str
    member: str
    mode: str
    protocol: str
    ports: tuple[WrapperPort, ...]

    def width(self, logical: str) -> int:
        """Width of the port with Vivado logical name ``logical`` (0 if absent)."""
        return next((p.width for p in self.ports if p.logical == logical), 0)


def bus_interfaces(component: wiring.Component) -> tuple[list[BusInterface], list[WrapperPort]]:
    """Sort the accelerator's signature into AXI interfaces and interrupt lines.

    The rules follow the signature, not a list of names, so a port added to the top either
    lands in the wrapper or stops generation with its name:

    * the one ``In`` member made of AXI signals is the AXI4-Lite (or AXI4) slave ``s_axi``;
    * each ``Out`` member made of AXI signals is a master, named after the member, which must
      start with ``m_axi``; it is AXI4 when it has burst lengths (``arlen``/``awlen``);
    * a one-bit ``Out`` member named ``irq`` is a level-high interrupt.

    Parameters
    ----------
    component : wiring.Component
        The accelerator (:class:`m3vit.hw.top.AcceleratorTop`).

    Returns
    -------
    (list of BusInterface, list of WrapperPort)
        The slave first, then the masters in signature order; the interrupt lines.

    Raises
    ------
    M3VitError
        A member that fits none of the rules, a signal Vivado's AXI interface does not know,
        more than one slave, or more masters than the PS has HP ports.
    """
    groups: dict[str, list[tuple[str, str, int, str]]] = {}
    for name, (signal, direction) in signature_ports(component).items():
        member, _, rest = name.partition("__")
        io = "input" if direction.name == "Input" else "output"
        groups.setdefault(member, []).append((rest, name, len(signal), io))
    members = component.signature.members
    buses: list[BusInterface] = []
    interrupts: list[WrapperPort] = []
    for member, ports in groups.items():
        flow = members[member].flow
        if len(ports) == 1 and ports[0][0] == "":
            _, inner, width, io = ports[0]
            if member != "irq" or width != 1 or io != "output":
                raise M3VitError(f"the accelerator's port {inner!r} ({io}, {width} bits) has no "
                                 "place in the Vivado wrapper (hw/flow/vivado.py)")
            interrupts.append(WrapperPort(member, inner, io, width, "INTERRUPT"))
            continue
        unknown = [inner for rest, inner, _, _ in ports
                   if "__" in rest or rest.upper() not in _AXI_LOGICAL]
        if unknown:
            raise M3VitError(f"the accelerator's port(s) {', '.join(unknown)} are not AXI "
                             "signals Vivado recognises; the wrapper (hw/flow/vivado.py) cannot "
                             "map them")
        if flow == wiring.In:
            mode, bus_name = "slave", "s_axi"
            if any(b.mode == "slave" for b in buses):
                raise M3VitError(f"the accelerator has more than one AXI slave ({member!r}); "
                                 "the block design has one control port")
        else:
            mode, bus_name = "master", member
            if not member.startswith("m_axi"):
                raise M3VitError(f"AXI master {member!r} must be named m_axi* so that its "
                                 "wrapper ports get standard names")
        protocol = "AXI4" if any(rest in ("arlen", "awlen") for rest, *_ in ports) \
            else "AXI4LITE"
        buses.append(BusInterface(
            name=bus_name, member=member, mode=mode, protocol=protocol,
            ports=tuple(WrapperPort(f"{bus_name}_{rest}", inner, io, width, rest.upper())
                        for rest, inner, width, io in ports)))
    buses.sort(key=lambda b: b.mode != "slave")
    if not any(b.mode == "slave" for b in buses):
        raise M3VitError("the accelerator has no AXI slave for its registers")
    masters = [b for b in buses if b.mode == "master"]
    if len(masters) > len(HP_PORTS):
        raise M3VitError(f"the accelerator has {len(masters)} AXI masters; the PS has "
                         f"{len(HP_PORTS)} HP ports")
    return buses, interrupts


def _bus_parameters(bus: BusInterface, config: AccelConfig) -> str:
    params = [f"XIL_INTERFACENAME {bus.name}", f"PROTOCOL {bus.protocol}",
              f"DATA_WIDTH {bus.width('WDATA') or bus.width('RDATA')}",
              f"ADDR_WIDTH {bus.width('AWADDR') or bus.width('ARADDR')}"]
    if bus.mode == "master":
        # Tell SmartConnect what the DMA issues (bursts of at most max_burst_beats, up to
        # max_outstanding in flight each way), so it sizes its buffers for it.
        params += [f"ID_WIDTH {bus.width('ARID') or bus.width('AWID')}",
                   f"MAX_BURST_LENGTH {config.max_burst_beats}",
                   f"NUM_READ_OUTSTANDING {config.max_outstanding}",
                   f"NUM_WRITE_OUTSTANDING {config.max_outstanding}"]
    return ", ".join(params)


def _port_decl(port: WrapperPort) -> str:
    width = f"[{port.width - 1}:0] " if port.width > 1 else ""
    return f"  {port.direction:6} wire {width}{port.name}"


def wrapper_verilog(component: wiring.Component, config: AccelConfig, config_name: str) -> str:
    """Verilog of the Vivado-ready top around the generated accelerator.

    Ports get the names Vivado expects (``s_axi_awaddr``, ``m_axi_arlen``, ``aclk``,
    ``aresetn``, ``irq``) and ``X_INTERFACE_INFO`` / ``X_INTERFACE_PARAMETER`` attributes, so a
    module reference in the block design shows one AXI4-Lite slave, the AXI4 masters, a
    clock, an active-low reset and an interrupt. The PS's reset is active-low; the
    accelerator's ``rst`` is synchronous and active-high, so the wrapper inverts
    ``aresetn`` (which the block design takes from a ``proc_sys_reset``, already synchronous
    to ``aclk``).

    Parameters
    ----------
    component : wiring.Component
        The accelerator; its signature decides the ports (:func:`bus_interfaces`).
    config : AccelConfig
        Its configuration (burst length and outstanding bursts for SmartConnect).
    config_name : str
        Name recorded in the header comment.

    Returns
    -------
    str
        Verilog text of module :data:`WRAPPER_MODULE`, instantiating :data:`ACCEL_MODULE`.
    """
    buses, interrupts = bus_interfaces(component)
    names = ":".join(b.name for b in buses)
    lines = [
        f"// {WRAPPER_MODULE}: the Vivado-ready top of the m3vit accelerator ({ACCEL_MODULE}).",
        f"// Generated by m3vit.hw.flow.vivado for config {config_name} (config hash "
        f"0x{config.config_hash():08x}); regenerate rather than edit.",
        "`timescale 1ns / 1ps",
        "`default_nettype none",
        "",
        f"module {WRAPPER_MODULE} (",
    ]
    decls: list[str] = [
        '  (* X_INTERFACE_INFO = "xilinx.com:signal:clock:1.0 aclk CLK" *)\n'
        f'  (* X_INTERFACE_PARAMETER = "XIL_INTERFACENAME aclk, ASSOCIATED_BUSIF {names}, '
        'ASSOCIATED_RESET aresetn" *)\n'
        "  input  wire aclk",
        '  (* X_INTERFACE_INFO = "xilinx.com:signal:reset:1.0 aresetn RST" *)\n'
        '  (* X_INTERFACE_PARAMETER = "XIL_INTERFACENAME aresetn, POLARITY ACTIVE_LOW" *)\n'
        "  input  wire aresetn",
    ]
    for bus in buses:
        for i, port in enumerate(bus.ports):
            attrs = f'  (* X_INTERFACE_INFO = "xilinx.com:interface:aximm:1.0 {bus.name} ' \
                    f'{port.logical}" *)\n'
            if i == 0:
                attrs += f'  (* X_INTERFACE_PARAMETER = "{_bus_parameters(bus, config)}" *)\n'
            decls.append(attrs + _port_decl(port))
    for port in interrupts:
        decls.append(
            f'  (* X_INTERFACE_INFO = "xilinx.com:signal:interrupt:1.0 {port.name} INTERRUPT" *)'
            f'\n  (* X_INTERFACE_PARAMETER = "XIL_INTERFACENAME {port.name}, SENSITIVITY '
            'LEVEL_HIGH" *)\n' + _port_decl(port))
    lines.append(",\n".join(decls))
    lines += [
        ");",
        "",
        "  // The accelerator's reset is synchronous and active-high; aresetn comes from a",
        "  // proc_sys_reset clocked by aclk, so inverting it keeps it synchronous.",
        "  wire rst = ~aresetn;",
        "",
        f"  {ACCEL_MODULE} accel (",
    ]
    connections = ["    .clk(aclk)", "    .rst(rst)"]
    connections += [f"    .{p.inner}({p.name})"
                    for bus in buses for p in bus.ports]
    connections += [f"    .{p.inner}({p.name})" for p in interrupts]
    lines.append(",\n".join(connections))
    lines += ["  );", "", "endmodule", "", "`default_nettype wire", ""]
    return "\n".join(lines)


# ---- the block design and the build -----------------------------------------------------------


def _mhz(value: float) -> str:
    return f"{value:g}"


def block_design_tcl(buses: Sequence[BusInterface], interrupts: Sequence[WrapperPort],
                     config: AccelConfig, config_name: str) -> str:
    """The block design as a Tcl procedure ``m3vit_create_block_design bd_name``.

    The Zynq UltraScale+ PS gets the ZCU104 board preset (DDR, MIO, clocks of the board), then
    ``M_AXI_HPM0_FPD`` (32-bit: the registers are 32-bit), one HP port per accelerator master
    at the master's data width, ``pl_clk0`` at ``config.clock_mhz`` and ``pl_ps_irq0``.
    Every other PS-PL AXI port is disabled, so no PS clock input is left unconnected. One
    SmartConnect per path converts protocol (AXI4 to AXI4-Lite), width and ID width; one
    ``proc_sys_reset`` turns ``pl_resetn0`` into a reset synchronous to ``pl_clk0``.

    Address map: the register window at :data:`CONTROL_BASE` with the size of the
    accelerator's decoder (:func:`register_window_bytes`) in the PS's ``Data`` space; each
    master sees its HP port's ``DDR_LOW`` and ``DDR_HIGH`` segments, i.e. all of the PS DDR,
    because ``pynq.allocate`` hands the runtime physical addresses anywhere in it.

    Names are literal (no Tcl variables for cells or pins) so that the tests can read the
    connections back from the text.

    Parameters
    ----------
    buses, interrupts
        From :func:`bus_interfaces`.
    config : AccelConfig
        Clock target and AXI data width.
    config_name : str
        Recorded in the header comment.

    Returns
    -------
    str
        Tcl source.
    """
    slave = next(b for b in buses if b.mode == "slave")
    masters = [b for b in buses if b.mode == "master"]
    ps = PS_CELL
    props = [
        ("PSU__USE__M_AXI_GP0", "1"),          # M_AXI_HPM0_FPD: register access
        ("PSU__MAXIGP0__DATA_WIDTH", "32"),
        ("PSU__USE__M_AXI_GP1", "0"),          # M_AXI_HPM1_FPD: unused
        ("PSU__USE__M_AXI_GP2", "0"),          # M_AXI_HPM0_LPD: unused
    ]
    for i, (_, use, width, _, _) in enumerate(HP_PORTS):
        used = i < len(masters)
        props.append((use, "1" if used else "0"))
        if used:
            props.append((width, str(masters[i].width("WDATA") or masters[i].width("RDATA"))))
    props += [
        ("PSU__USE__IRQ0", "1" if interrupts else "0"),
        ("PSU__FPGA_PL0_ENABLE", "1"),
        ("PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ", _mhz(config.clock_mhz)),
    ]
    window = register_window_bytes()
    if CONTROL_BASE % window or CONTROL_BASE + window > HPM0_FPD_APERTURE_END:
        raise M3VitError(f"a {window}-byte register window does not fit aligned at "
                         f"0x{CONTROL_BASE:08x} in M_AXI_HPM0_FPD's aperture")
    t = [
        f"# Block design of the m3vit accelerator on the ZCU104 (config {config_name}, config "
        f"hash 0x{config.config_hash():08x}).",
        "# Generated by m3vit.hw.flow.vivado; regenerate rather than edit. Sourced by build.tcl.",
        "",
        "proc m3vit_create_block_design {bd_name} {",
        "  create_bd_design $bd_name",
        "",
        "  # Processing system: the board preset first (DDR, MIO, PS clocks of the ZCU104),",
        "  # then the PS-PL ports this design uses; every unused AXI port is off so that none",
        "  # of their clock inputs is left unconnected.",
        f"  create_bd_cell -type ip -vlnv xilinx.com:ip:zynq_ultra_ps_e {ps}",
        "  apply_bd_automation -rule xilinx.com:bd_rule:zynq_ultra_ps_e "
        f'-config {{apply_board_preset "1"}} [get_bd_cells {ps}]',
        "  set_property -dict [list \\",
        *[f"    CONFIG.{k} {{{v}}} \\" for k, v in props],
        f"  ] [get_bd_cells {ps}]",
        "",
        "  # The accelerator (module reference to the wrapper), its reset and interconnects.",
        f"  create_bd_cell -type module -reference {WRAPPER_MODULE} {ACCEL_CELL}",
        "  create_bd_cell -type ip -vlnv xilinx.com:ip:proc_sys_reset rst_pl_clk0",
        "  create_bd_cell -type ip -vlnv xilinx.com:ip:smartconnect ctrl_smc",
        "  set_property -dict [list CONFIG.NUM_SI {1} CONFIG.NUM_MI {1}] "
        "[get_bd_cells ctrl_smc]",
    ]
    for i in range(len(masters)):
        t += [f"  create_bd_cell -type ip -vlnv xilinx.com:ip:smartconnect mem_smc{i}",
              f"  set_property -dict [list CONFIG.NUM_SI {{1}} CONFIG.NUM_MI {{1}}] "
              f"[get_bd_cells mem_smc{i}]"]
    clock_pins = [f"{ps}/maxihpm0_fpd_aclk", "rst_pl_clk0/slowest_sync_clk",
                  f"{ACCEL_CELL}/aclk", "ctrl_smc/aclk"]
    reset_pins = [f"{ACCEL_CELL}/aresetn", "ctrl_smc/aresetn"]
    for i in range(len(masters)):
        clock_pins += [f"mem_smc{i}/aclk", f"{ps}/{HP_PORTS[i][4]}"]
        reset_pins.append(f"mem_smc{i}/aresetn")
    t += [
        "",
        "  # One clock: pl_clk0 at the accelerator's target. Its reset, synchronous to it.",
        f"  connect_bd_net [get_bd_pins {ps}/pl_clk0] "
        + " ".join(f"[get_bd_pins {p}]" for p in clock_pins),
        f"  connect_bd_net [get_bd_pins {ps}/pl_resetn0] [get_bd_pins rst_pl_clk0/ext_reset_in]",
        "  connect_bd_net [get_bd_pins rst_pl_clk0/peripheral_aresetn] "
        + " ".join(f"[get_bd_pins {p}]" for p in reset_pins),
        "",
        "  # Control: M_AXI_HPM0_FPD -> SmartConnect (AXI4 to AXI4-Lite) -> the registers.",
        f"  connect_bd_intf_net [get_bd_intf_pins {ps}/M_AXI_HPM0_FPD] "
        "[get_bd_intf_pins ctrl_smc/S00_AXI]",
        f"  connect_bd_intf_net [get_bd_intf_pins ctrl_smc/M00_AXI] "
        f"[get_bd_intf_pins {ACCEL_CELL}/{slave.name}]",
    ]
    for i, master in enumerate(masters):
        t += [
            f"  # Data: {master.name} -> SmartConnect -> {HP_PORTS[i][0]} (non-coherent DDR).",
            f"  connect_bd_intf_net [get_bd_intf_pins {ACCEL_CELL}/{master.name}] "
            f"[get_bd_intf_pins mem_smc{i}/S00_AXI]",
            f"  connect_bd_intf_net [get_bd_intf_pins mem_smc{i}/M00_AXI] "
            f"[get_bd_intf_pins {ps}/{HP_PORTS[i][0]}]",
        ]
    for port in interrupts:
        t.append(f"  connect_bd_net [get_bd_pins {ACCEL_CELL}/{port.name}] "
                 f"[get_bd_pins {ps}/pl_ps_irq0]")
    # A module reference starts with a default 100 MHz on its clock and bus interfaces; the
    # PS reports pl_clk0's actual frequency (what its dividers reach), and validation wants
    # both sides of every connection to agree.
    intf_pins = " ".join(f"[get_bd_intf_pins {ACCEL_CELL}/{b.name}]" for b in buses)
    t += [
        "",
        "  # The module reference's clock and interfaces at pl_clk0's actual frequency.",
        f"  set pl_clk0_hz [get_property CONFIG.FREQ_HZ [get_bd_pins {ps}/pl_clk0]]",
        f"  foreach object [list [get_bd_pins {ACCEL_CELL}/aclk] {intf_pins}] {{",
        "    if {[get_property CONFIG.FREQ_HZ $object] ne $pl_clk0_hz} {",
        "      set_property CONFIG.FREQ_HZ $pl_clk0_hz $object",
        "    }",
        "  }",
        "",
        "  # Address map. The register window: what the runtime maps (phys_addr and",
        "  # addr_range of the IP in the overlay's ip_dict come from here through the .hwh).",
        f"  assign_bd_address -offset 0x{CONTROL_BASE:08X} -range 0x{window:08X} "
        f"-target_address_space [get_bd_addr_spaces {ps}/Data] "
        f"[get_bd_addr_segs {ACCEL_CELL}/{slave.name}/reg0] -force",
    ]
    for i, master in enumerate(masters):
        t.append(f"  # {master.name} sees all of the PS DDR (pynq.allocate gives physical "
                 "addresses).")
        for segment in ("DDR_LOW", "DDR_HIGH"):
            t.append(f"  assign_bd_address -target_address_space "
                     f"[get_bd_addr_spaces {ACCEL_CELL}/{master.name}] "
                     f"[get_bd_addr_segs {ps}/{HP_PORTS[i][3]}_{segment}] -force")
    t += [
        "",
        "  validate_bd_design",
        "  save_bd_design",
        "}",
        "",
    ]
    return "\n".join(t)


def build_tcl(config: AccelConfig, config_name: str, jobs: int, vivado_version: str) -> str:
    """The batch build: ``vivado -mode batch -source build.tcl [-tclargs JOBS]``.

    Creates the project for :data:`PART` with the newest installed ZCU104 board part, adds
    the accelerator and the wrapper, builds the block design (``block_design.tcl``), makes its
    HDL wrapper the top, runs synthesis and implementation to the bitstream, and leaves in
    ``out/``: ``<base>.bit``, ``<base>.hwh``, the timing summary and the utilisation reports
    and ``build_info.txt`` (Vivado version, board part, ``pl_clk0``'s actual frequency, the
    register window's address, WNS). Paths are relative to the script, so the folder can be
    copied to another machine. Lines starting with :data:`PROGRESS_MARK` mark the steps.

    Parameters
    ----------
    config : AccelConfig
        The accelerator's configuration (recorded).
    config_name : str
        Its name; gives the base name and the project name.
    jobs : int
        Default parallel jobs for ``launch_runs`` (``-tclargs N`` overrides).
    vivado_version : str
        The Vivado version the script insists on (``major.minor``).

    Returns
    -------
    str
        Tcl source.
    """
    base = base_name(config_name)
    return "\n".join([
        f"# Vivado batch build of the m3vit accelerator for the ZCU104 (config {config_name},",
        f"# config hash 0x{config.config_hash():08x}, pl_clk0 {_mhz(config.clock_mhz)} MHz).",
        "# Generated by m3vit.hw.flow.vivado; regenerate rather than edit.",
        "#   vivado -mode batch -source build.tcl [-tclargs JOBS]",
        "",
        "set here [file dirname [file normalize [info script]]]",
        f'set expected_vivado "{vivado_version}"',
        f'set part "{PART}"',
        f'set project_name "{base}"',
        f'set bd_name "{BD_NAME}"',
        f'set base_name "{base}"',
        f"set jobs {jobs}",
        "if {$argc > 0} { set jobs [lindex $argv 0] }",
        "set out_dir [file join $here out]",
        "",
        "proc m3vit_step {text} {",
        f'  puts "{PROGRESS_MARK} $text"',
        "  flush stdout",
        "}",
        "",
        "# The .hwh is read by the pynq of the board's image, built with this Vivado.",
        "if {![string match \"${expected_vivado}*\" [version -short]]} {",
        f'  error "m3vit: this flow needs Vivado $expected_vivado (PYNQ {PYNQ_IMAGE} images), '
        'this is Vivado [version -short]"',
        "}",
        "file delete -force $out_dir",
        "file mkdir $out_dir",
        "",
        'm3vit_step "project $project_name for $part"',
        "create_project $project_name [file join $here project] -part $part -force",
        f"set board_part [lindex [lsort [get_board_parts -quiet -latest_file_version "
        f"{{*:{BOARD}:*}}]] end]",
        'if {$board_part eq ""} {',
        f'  error "m3vit: no {BOARD} board part is installed in this Vivado (Tools > Vivado '
        'Store > Boards, or xhub::install)"',
        "}",
        "set_property board_part $board_part [current_project]",
        "set_property target_language Verilog [current_project]",
        f"add_files -norecurse [list [file join $here {ACCEL_MODULE}.v] "
        f"[file join $here {WRAPPER_MODULE}.v]]",
        "update_compile_order -fileset sources_1",
        "",
        'm3vit_step "block design $bd_name"',
        "source [file join $here block_design.tcl]",
        "m3vit_create_block_design $bd_name",
        "set info [open [file join $out_dir build_info.txt] w]",
        'puts $info "vivado_version [version -short]"',
        'puts $info "part $part"',
        'puts $info "board_part $board_part"',
        f'puts $info "pl_clk0_hz [get_property CONFIG.FREQ_HZ [get_bd_pins {PS_CELL}/pl_clk0]]"',
        "# Recorded for the manifest only: a Vivado that names segments differently must not",
        "# stop the build here.",
        f"set control_seg [get_bd_addr_segs -quiet -of_objects [get_bd_addr_spaces "
        f"{PS_CELL}/Data] -filter {{NAME =~ *{ACCEL_CELL}*}}]",
        'if {$control_seg ne ""} {',
        '  puts $info "control_offset [get_property OFFSET [lindex $control_seg 0]]"',
        '  puts $info "control_range [get_property RANGE [lindex $control_seg 0]]"',
        "}",
        "set bd_file [get_files $bd_name.bd]",
        "generate_target all $bd_file",
        "add_files -norecurse [make_wrapper -files $bd_file -top]",
        "set_property top ${bd_name}_wrapper [current_fileset]",
        "update_compile_order -fileset sources_1",
        "",
        'm3vit_step "synthesis ($jobs jobs)"',
        "launch_runs synth_1 -jobs $jobs",
        "wait_on_run synth_1",
        'if {[get_property PROGRESS [get_runs synth_1]] ne "100%"} {',
        '  error "m3vit: synthesis failed: see [get_property DIRECTORY [get_runs synth_1]]/'
        'runme.log"',
        "}",
        'm3vit_step "implementation and bitstream ($jobs jobs)"',
        "launch_runs impl_1 -to_step write_bitstream -jobs $jobs",
        "wait_on_run impl_1",
        'if {[get_property PROGRESS [get_runs impl_1]] ne "100%"} {',
        '  error "m3vit: implementation failed: see [get_property DIRECTORY [get_runs impl_1]]/'
        'runme.log"',
        "}",
        "",
        'm3vit_step "reports"',
        "open_run impl_1",
        f"report_timing_summary -max_paths 10 -file [file join $out_dir {REPORTS[0]}]",
        f"report_utilization -file [file join $out_dir {REPORTS[1]}]",
        f"report_utilization -hierarchical -file [file join $out_dir {REPORTS[2]}]",
        'puts $info "wns_ns [get_property STATS.WNS [get_runs impl_1]]"',
        "close $info",
        "",
        "# PYNQ loads <base>.bit with <base>.hwh beside it: one base name for both.",
        "set bit [lindex [glob -nocomplain [file join [get_property DIRECTORY [get_runs impl_1]]"
        " *.bit]] 0]",
        "set hwh [lindex [glob -nocomplain \\",
        "  [file join $here project $project_name.gen sources_1 bd $bd_name hw_handoff "
        "$bd_name.hwh] \\",
        "  [file join $here project $project_name.srcs sources_1 bd $bd_name hw_handoff "
        "$bd_name.hwh]] 0]",
        'if {$bit eq "" || $hwh eq ""} {',
        '  error "m3vit: the build finished without a .bit or .hwh"',
        "}",
        "file copy -force $bit [file join $out_dir $base_name.bit]",
        "file copy -force $hwh [file join $out_dir $base_name.hwh]",
        'm3vit_step "done: [file join $out_dir $base_name.bit]"',
        "",
    ])


def run_sh(jobs: int, vivado_version: str) -> str:
    """``run.sh``: run the build of its folder with the Vivado on ``PATH``.

    Parameters
    ----------
    jobs : int
        Default parallel jobs (the first argument overrides).
    vivado_version : str
        The version named in the message when Vivado is missing.

    Returns
    -------
    str
        POSIX shell script.
    """
    return "\n".join([
        "#!/bin/sh",
        "# Runs this folder's Vivado build (generated by m3vit.hw.flow.vivado).",
        "# Usage: ./run.sh [JOBS]",
        "set -eu",
        'cd "$(dirname "$0")"',
        "if ! command -v vivado >/dev/null 2>&1; then",
        f'  echo "run.sh: vivado is not on PATH: source <Vivado {vivado_version}>/settings64.sh '
        'first" >&2',
        "  exit 2",
        "fi",
        f'exec vivado -mode batch -notrace -source build.tcl -log vivado.log -journal vivado.jou '
        f'-tclargs "${{1:-{jobs}}}"',
        "",
    ])


@dataclass(frozen=True)
class FlowFiles:
    """The generated Vivado project folder.

    Attributes
    ----------
    build_dir : Path
        The folder.
    files : dict of str to Path
        ``accelerator``, ``wrapper``, ``block_design``, ``build``, ``run``, ``flow``.
    flow : dict
        Content of ``flow.json``: what the folder was generated from.
    """

    build_dir: Path
    files: dict[str, Path]
    flow: dict


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _accelerator(config: AccelConfig) -> wiring.Component:
    from ..top import AcceleratorTop  # slow to import only once a flow is written

    return AcceleratorTop(config)


def write_project(
    config_name: str,
    build_dir: Path,
    *,
    config: AccelConfig | None = None,
    jobs: int = 4,
    vivado_version: str = VIVADO_VERSION,
    accelerator_verilog: Callable[[wiring.Component], str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> FlowFiles:
    """Elaborate the accelerator and write the Vivado project scripts to ``build_dir``.

    Files whose content is unchanged are left alone (see
    :func:`m3vit.hw.flow.generate.write_if_changed`); nothing in them depends on where the
    folder is, so it can be copied to a machine with Vivado.

    Parameters
    ----------
    config_name : str
        A key of :data:`m3vit.hw.flow.generate.CONFIGS` (``zcu104``, ``ci``).
    build_dir : Path
        Destination folder (created).
    config : AccelConfig, optional
        Use this configuration under ``config_name`` instead of the named one.
    jobs : int
        Default parallel jobs written into ``build.tcl`` and ``run.sh``.
    vivado_version : str
        The Vivado version the build insists on.
    accelerator_verilog : callable, optional
        ``f(component) -> str``; by default :func:`m3vit.hw.flow.generate.to_verilog` with module
        name :data:`ACCEL_MODULE` (about a minute for the ZCU104 configuration).
    progress : callable, optional
        Called with a line before the elaboration.

    Returns
    -------
    FlowFiles

    Raises
    ------
    M3VitError
        Unknown configuration, or an accelerator whose ports the wrapper cannot map.
    """
    if jobs < 1:
        raise M3VitError(f"--jobs must be >= 1, got {jobs!r}")
    config = config if config is not None else get_config(config_name)
    build_dir = Path(build_dir)
    component = _accelerator(config)
    buses, interrupts = bus_interfaces(component)
    if progress is not None:
        progress(f"elaborating the accelerator for {config_name} (the ZCU104 configuration "
                 "takes about a minute)")
    convert = accelerator_verilog or (lambda c: to_verilog(c, ACCEL_MODULE))
    accel_text = convert(component)
    texts = {
        "accelerator": (f"{ACCEL_MODULE}.v", accel_text),
        "wrapper": (f"{WRAPPER_MODULE}.v", wrapper_verilog(component, config, config_name)),
        "block_design": ("block_design.tcl",
                         block_design_tcl(buses, interrupts, config, config_name)),
        "build": ("build.tcl", build_tcl(config, config_name, jobs, vivado_version)),
        "run": ("run.sh", run_sh(jobs, vivado_version)),
    }
    flow = {
        "config_name": config_name,
        "config": config.to_dict(),
        "config_hash": f"0x{config.config_hash():08x}",
        "clock_mhz": config.clock_mhz,
        "base_name": base_name(config_name),
        "part": PART,
        "board": BOARD,
        "pynq_image": PYNQ_IMAGE,
        "vivado_version": vivado_version,
        "accelerator_sha256": _sha256(accel_text.encode()),
        "address_map": {
            "cell": ACCEL_CELL,
            "control_offset": f"0x{CONTROL_BASE:08x}",
            "control_range": register_window_bytes(),
            "masters": {b.name: HP_PORTS[i][0]
                        for i, b in enumerate(b for b in buses if b.mode == "master")},
        },
    }
    texts["flow"] = ("flow.json", json.dumps(flow, indent=2) + "\n")
    files = {}
    for key, (name, text) in texts.items():
        path = build_dir / name
        write_if_changed(path, text)
        files[key] = path
    files["run"].chmod(0o755)
    return FlowFiles(build_dir=build_dir, files=files, flow=flow)


# ---- Vivado and its reports -------------------------------------------------------------------


def parse_vivado_version(text: str) -> str | None:
    """The ``major.minor`` version in ``vivado -version`` output (``vivado v2025.2 (64-bit)``).

    Returns
    -------
    str or None
        ``"2025.2"``, or ``None`` if the text names no version.
    """
    match = re.search(r"\bvivado\s+v(\d{4}\.\d+)", text, re.IGNORECASE)
    return match.group(1) if match else None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "NA", "inf": no constrained path of that kind


def parse_timing_summary(text: str) -> dict[str, float | None]:
    """WNS, TNS, WHS, THS, WPWS, TPWS (ns) from ``report_timing_summary``'s design summary.

    Parameters
    ----------
    text : str
        The report.

    Returns
    -------
    dict of str to float or None
        Keys ``wns_ns``, ``tns_ns``, ``whs_ns``, ``ths_ns``, ``wpws_ns``, ``tpws_ns``; ``None``
        where the report has no number (no constrained path of that kind).

    Raises
    ------
    M3VitError
        If the report has no "Design Timing Summary" table.
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "WNS(ns)" not in line or "TNS(ns)" not in line:
            continue
        headers = re.split(r"\s{2,}", line.strip())
        rows = [r for r in lines[i + 1:i + 4] if r.strip() and not set(r.strip()) <= {"-", " "}]
        if not rows:
            break
        values = rows[0].split()
        if len(values) != len(headers):
            break
        table = dict(zip(headers, values, strict=True))
        return {f"{key.lower()}_ns": _number(table[f"{key}(ns)"])
                for key in ("WNS", "TNS", "WHS", "THS", "WPWS", "TPWS") if f"{key}(ns)" in table}
    raise M3VitError("the timing report has no Design Timing Summary (WNS/TNS table)")


#: Rows of ``report_utilization`` recorded in the manifest, by site type.
UTILIZATION_ROWS = ("CLB LUTs", "CLB Registers", "Block RAM Tile", "URAM", "DSPs")


def parse_utilization(text: str) -> dict[str, dict[str, float]]:
    """Used, available and percentage of the main resources from ``report_utilization``.

    Parameters
    ----------
    text : str
        The (flat) utilisation report.

    Returns
    -------
    dict of str to dict
        For each of :data:`UTILIZATION_ROWS` found: ``{"used", "available", "percent"}``.
    """
    result: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == "Site Type":
            columns = cells
            continue
        name = cells[0].rstrip("*").strip()
        if not columns or name not in UTILIZATION_ROWS or name in result:
            continue
        row = dict(zip(columns, cells, strict=False))
        try:
            result[name] = {"used": float(row["Used"]), "available": float(row["Available"]),
                            "percent": float(row["Util%"])}
        except (KeyError, ValueError):
            continue
    return result


def _read_build_info(path: Path) -> dict[str, str]:
    info = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key:
                info[key] = value.strip()
    return info


def _load_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return {"bitstreams": {}}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise M3VitError(f"{path} is not valid JSON ({e}); move it away or pass --force") \
            from None
    manifest.setdefault("bitstreams", {})
    return manifest


def _check_replaceable(out_dir: Path, name: str, config_hash: str, force: bool) -> None:
    """Refuse to replace ``<name>.bit`` built for another configuration hash."""
    if force or not (out_dir / f"{name}.bit").exists():
        return
    try:
        recorded = _load_manifest(out_dir)["bitstreams"].get(name, {}).get("config_hash")
    except M3VitError:
        recorded = None
    if recorded != config_hash:
        what = f"config hash {recorded}" if recorded else "an unrecorded configuration"
        raise M3VitError(f"{out_dir / (name + '.bit')} was built for {what}, this build is "
                         f"{config_hash}: pass --force to replace it or choose another --out")


def collect(build_dir: Path, out_dir: Path, *, force: bool = False,
            vivado_version: str | None = None) -> dict:
    """Copy a finished build's ``.bit``, ``.hwh`` and reports into ``out_dir``; record it.

    Parameters
    ----------
    build_dir : Path
        The folder :func:`write_project` wrote and Vivado ran in (results in ``out/``).
    out_dir : Path
        Where the bitstreams live (``bitstreams/``); ``manifest.json`` there gains or
        updates the entry of this base name.
    force : bool
        Replace a bitstream of the same base name built for another configuration hash.
    vivado_version : str, optional
        Version reported by ``vivado -version``, if ``build_info.txt`` lacks it.

    Returns
    -------
    dict
        The manifest entry written.

    Raises
    ------
    M3VitError
        Missing build results, a timing report without a summary, timing not met (nothing is
        copied then), or a bitstream of another configuration in the way.
    """
    build_dir, out_dir = Path(build_dir), Path(out_dir)
    flow_path = build_dir / "flow.json"
    if not flow_path.is_file():
        raise M3VitError(f"{build_dir} holds no generated Vivado flow (flow.json)")
    flow = json.loads(flow_path.read_text())
    name = flow["base_name"]
    results = build_dir / OUT_SUBDIR
    needed = [results / f"{name}.bit", results / f"{name}.hwh", results / REPORTS[0]]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise M3VitError(f"the Vivado build left no {', '.join(missing)}: run "
                         f"`cd {build_dir} && vivado -mode batch -source build.tcl` first")
    timing = parse_timing_summary((results / REPORTS[0]).read_text())
    info = _read_build_info(results / "build_info.txt")
    wns = timing.get("wns_ns")
    if wns is None:
        wns = _number(info.get("wns_ns", "NA"))
    met = all((timing.get(k) is None or timing[k] >= 0) for k in ("wns_ns", "whs_ns", "wpws_ns"))
    if wns is None or not met:
        raise M3VitError(f"timing not met at {_mhz(flow['clock_mhz'])} MHz (WNS {wns} ns, WHS "
                         f"{timing.get('whs_ns')} ns): the bitstream stays in {results} and is "
                         f"not copied to {out_dir}; see {results / REPORTS[0]}")
    _check_replaceable(out_dir, name, flow["config_hash"], force)
    utilization = {}
    if (results / REPORTS[1]).is_file():
        utilization = parse_utilization((results / REPORTS[1]).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    report_dir = out_dir / "reports" / name
    report_dir.mkdir(parents=True, exist_ok=True)
    for suffix in (".bit", ".hwh"):
        shutil.copyfile(results / f"{name}{suffix}", out_dir / f"{name}{suffix}")
    copied_reports = []
    for report in (*REPORTS, "build_info.txt"):
        if (results / report).is_file():
            shutil.copyfile(results / report, report_dir / report)
            copied_reports.append(str(Path("reports") / name / report))
    pl_clk0_hz = _number(info.get("pl_clk0_hz", "NA"))
    entry = {
        "bit": f"{name}.bit",
        "hwh": f"{name}.hwh",
        "bit_sha256": _sha256((out_dir / f"{name}.bit").read_bytes()),
        "config_name": flow["config_name"],
        "config_hash": flow["config_hash"],
        "config": flow["config"],
        "clock_mhz": flow["clock_mhz"],
        "pl_clk0_mhz": round(pl_clk0_hz / 1e6, 6) if pl_clk0_hz else None,
        "vivado_version": info.get("vivado_version") or vivado_version,
        "part": info.get("part", flow["part"]),
        "board_part": info.get("board_part"),
        "pynq_image": flow["pynq_image"],
        "timing": {**timing, "wns_ns": wns, "met": True},
        "utilization": utilization,
        "address_map": flow["address_map"],
        "accelerator_sha256": flow["accelerator_sha256"],
        "reports": copied_reports,
        "collected_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest = _load_manifest(out_dir) if not force else _load_manifest_quiet(out_dir)
    manifest["bitstreams"][name] = entry
    manifest["bitstreams"] = dict(sorted(manifest["bitstreams"].items()))
    write_if_changed(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return entry


def _load_manifest_quiet(out_dir: Path) -> dict:
    # With --force an unreadable manifest is replaced rather than reported.
    try:
        return _load_manifest(out_dir)
    except M3VitError:
        return {"bitstreams": {}}


def _vivado_version(vivado: str) -> str:
    try:
        result = subprocess.run([vivado, "-version"], capture_output=True, text=True,
                                timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise M3VitError(f"cannot run {vivado} -version ({e})") from None
    version = parse_vivado_version(result.stdout + result.stderr)
    if version is None:
        first = (result.stdout + result.stderr).strip().splitlines()[:1]
        raise M3VitError(f"{vivado} -version names no Vivado version "
                         f"(it printed {first[0]!r})" if first else
                         f"{vivado} -version printed nothing")
    return version


def _run_vivado(vivado: str, build_dir: Path, jobs: int,
                say: Callable[[str], None]) -> None:
    """Run ``build.tcl`` in ``build_dir``, echoing its step markers with the elapsed time."""
    shutil.rmtree(build_dir / OUT_SUBDIR, ignore_errors=True)  # never collect a stale result
    command = [vivado, "-mode", "batch", "-notrace", "-source", "build.tcl",
               "-log", "vivado.log", "-journal", "vivado.jou", "-tclargs", str(jobs)]
    start = time.monotonic()
    first_error = None
    with subprocess.Popen(command, cwd=build_dir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line.startswith(PROGRESS_MARK):
                elapsed = int(time.monotonic() - start)
                say(f"vivado [{elapsed // 3600:d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}] "
                    f"{line[len(PROGRESS_MARK):].strip()}")
            elif first_error is None and line.startswith("ERROR:"):
                first_error = line
        code = process.wait()
    if code != 0:
        raise M3VitError(f"Vivado failed (exit status {code}): "
                         f"{first_error or 'no ERROR line'}; see {build_dir / 'vivado.log'}")


# ---- command line -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a usage error is one line, like every other error
        self.exit(2, f"m3vit: error: {message} (see {self.prog} --help)\n")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _this_python() -> str:
    # The interpreter running this (the project's .venv under make), as the user would type
    # it from the same folder; not resolved, since a venv's python is a symlink.
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m m3vit.hw.flow.vivado",
                description="Vivado build of the accelerator for the ZCU104 (make bitstream): "
                            "writes the project scripts, runs Vivado when it is on PATH, and "
                            "puts <base>.bit, <base>.hwh and manifest.json into --out.")
    p.add_argument("--config", default="zcu104",
                   help=f"accelerator configuration: {', '.join(CONFIGS)} (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bitstreams"),
                   help="where the .bit, .hwh, reports and manifest.json go "
                        "(default: %(default)s)")
    p.add_argument("--build-dir", type=Path,
                   help="where the Vivado project is written and built "
                        "(default: build/vivado/CONFIG)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel Vivado jobs (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace a bitstream of the same name built for another configuration")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--scripts-only", action="store_true",
                      help="write the project scripts and stop, even when Vivado is on PATH")
    mode.add_argument("--collect", action="store_true",
                      help="only copy a finished build (BUILD_DIR/out, e.g. run on another "
                           "machine) into --out and update the manifest")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    config = get_config(args.config)
    build_dir = args.build_dir if args.build_dir is not None \
        else Path("build") / "vivado" / args.config
    config_hash = f"0x{config.config_hash():08x}"
    name = base_name(args.config)

    def say(line: str) -> None:
        print(f"m3vit: {line}", flush=True)

    if args.collect:
        entry = collect(build_dir, args.out, force=args.force)
        say(f"{_relative(args.out / entry['bit'])} and {entry['hwh']} collected "
            f"(WNS {entry['timing']['wns_ns']} ns); manifest {_relative(args.out)}/"
            f"{MANIFEST_NAME}")
        return 0
    # Before a minute of elaboration and hours of Vivado: will the result be allowed in?
    _check_replaceable(args.out, name, config_hash, args.force)
    flow = write_project(args.config, build_dir, config=config, jobs=args.jobs, progress=say)
    where = _relative(build_dir)
    say(f"Vivado project for {args.config} (config hash {config_hash}, pl_clk0 "
        f"{_mhz(config.clock_mhz)} MHz) written to {where}/: "
        f"{', '.join(p.name for p in flow.files.values())}")
    elsewhere = (f"on a machine with Vivado {VIVADO_VERSION} (PYNQ {PYNQ_IMAGE} images):\n"
                 f"    cd {where} && vivado -mode batch -source build.tcl\n"
                 f"  then copy {where}/{OUT_SUBDIR}/ back here and run:\n"
                 f"    {_this_python()} -m m3vit.hw.flow.vivado --config {args.config} --out "
                 f"{_relative(args.out)} --collect")
    if args.scripts_only:
        say(elsewhere)
        return 0
    vivado = shutil.which("vivado")
    if vivado is None:
        say(elsewhere)
        raise M3VitError(f"Vivado not found on PATH: the project scripts are in {where}/; run "
                         f"them where Vivado {VIVADO_VERSION} is installed (commands above)")
    found = _vivado_version(vivado)
    if found != VIVADO_VERSION:
        raise M3VitError(f"{vivado} is Vivado {found}, but PYNQ {PYNQ_IMAGE} images need "
                         f"Vivado {VIVADO_VERSION} (their pynq reads the .hwh): put Vivado "
                         f"{VIVADO_VERSION} first on PATH")
    say(f"running Vivado {found} in {where} ({args.jobs} jobs; full log "
        f"{where}/vivado.log; this takes hours for the ZCU104 configuration)")
    _run_vivado(vivado, build_dir, args.jobs, say)
    entry = collect(build_dir, args.out, force=args.force, vivado_version=found)
    say(f"{_relative(args.out / entry['bit'])} and {entry['hwh']} built: WNS "
        f"{entry['timing']['wns_ns']} ns at {_mhz(entry['clock_mhz'])} MHz; manifest "
        f"{_relative(args.out)}/{MANIFEST_NAME}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m m3vit.hw.flow.vivado`` (``make bitstream``).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success; 2 after one line ``m3vit: error: ...`` on stderr (Vivado missing or of
        another version, a failed build, timing not met, a bitstream in the way, bad input).
    """
    try:
        return _main(argv)
    except M3VitError as e:
        print(f"m3vit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
