"""The Vivado-ready top: standard AXI port names and IP-integrator attributes.

:func:`bus_interfaces` sorts the accelerator's Amaranth signature into one AXI slave, the
AXI masters and the interrupt lines; :func:`wrapper_verilog` writes the module
:data:`~m3vit.hw.flow.vivado.board.WRAPPER_MODULE` around the generated accelerator, which a
block design instantiates as a module reference (``docs/bitstream.md``, "The wrapper").
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.lib import wiring

from ...config import AccelConfig
from ...errors import M3VitError
from ..generate import signature_ports
from .board import ACCEL_MODULE, HP_PORTS, WRAPPER_MODULE

__all__ = ["BusInterface", "WrapperPort", "bus_interfaces", "wrapper_verilog"]

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
                                 "place in the Vivado wrapper (hw/flow/vivado/wrapper.py)")
            interrupts.append(WrapperPort(member, inner, io, width, "INTERRUPT"))
            continue
        unknown = [inner for rest, inner, _, _ in ports
                   if "__" in rest or rest.upper() not in _AXI_LOGICAL]
        if unknown:
            raise M3VitError(f"the accelerator's port(s) {', '.join(unknown)} are not AXI "
                             "signals Vivado recognises; the wrapper "
                             "(hw/flow/vivado/wrapper.py) cannot map them")
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

