# amaranth: UnusedElaboratable=no
"""The Vivado flow (:mod:`m3vit.hw.flow.vivado`), checked without Vivado.

The generated scripts are read back: the block design must instantiate what the runtime
(``m3vit.sw.runtime.pynq_board``) looks for, its address map must be the register window the
runtime maps, and the wrapper must carry every AXI signal of the generated top under
standard names. ``m3vit bitstream`` (what ``make bitstream`` runs) runs with no Vivado on
``PATH`` and with fake ``vivado`` executables (wrong version; a "build" that leaves a bitstream
and reports).

The small CI configuration is elaborated once per module (about 10 s); the ZCU104
configuration's wrapper is checked from its signature, which needs no conversion.
"""

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from amaranth.hdl import Fragment
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.errors import M3VitError
from m3vit.hw.flow import vivado
from m3vit.hw.flow.generate import signature_ports, to_verilog
from m3vit.hw.regfile import AxiLiteSignature
from m3vit.hw.registers import REGISTER_MAP
from m3vit.hw.target import SYNTHESIS
from m3vit.hw.top import AcceleratorTop
from m3vit.sim.soc import DdrTiming
from m3vit.sim.verilator import DSP48E2_MODEL, lint
from m3vit.sw import cli
from m3vit.sw.runtime.pynq_board import ACCEL_IP_PREFIX, REGISTER_WINDOW_BYTES, _find_accelerator

REPO = Path(__file__).resolve().parents[2]

# Signals Vivado's aximm interface needs to see for each protocol (AxPROT, IDs, QoS, ... are
# optional and take defaults).
AXI4LITE_REQUIRED = {"AWADDR", "AWVALID", "AWREADY", "WDATA", "WSTRB", "WVALID", "WREADY",
                     "BRESP", "BVALID", "BREADY", "ARADDR", "ARVALID", "ARREADY", "RDATA",
                     "RRESP", "RVALID", "RREADY"}
AXI4_REQUIRED = AXI4LITE_REQUIRED | {"AWLEN", "AWSIZE", "AWBURST", "WLAST", "ARLEN", "ARSIZE",
                                     "ARBURST", "RLAST"}


# ---- reading the generated text back --------------------------------------------------------


def tcl_commands(text: str) -> list[list[str]]:
    """Split Tcl into commands of words, keeping ``[...]``, ``{...}`` and ``"..."`` whole.

    Enough Tcl for generated scripts: continuation lines, comments, nesting; commands inside
    ``proc`` / ``foreach`` / ``if`` bodies are returned as well (the bodies are re-split).
    """
    # Whole-line comments go first: their text need not balance quotes or braces.
    text = "\n".join(line for line in text.replace("\\\n", " ").splitlines()
                     if not line.lstrip().startswith("#"))
    commands: list[list[str]] = []
    words: list[str] = []
    word = ""
    depth = 0
    quoted = False
    for ch in text + "\n":
        if depth == 0 and not quoted and ch in " \t\n;":
            if word:
                words.append(word)
                word = ""
            if ch in "\n;" and words:
                commands.append(words)
                words = []
            continue
        if ch == '"' and depth == 0:
            quoted = not quoted
        elif ch in "[{" and not quoted:
            depth += 1
        elif ch in "]}" and not quoted:
            depth -= 1
        word += ch
    nested = []
    for command in commands:
        for w in command[1:]:
            if w.startswith("{") and "\n" in w:
                nested += tcl_commands(w[1:-1])
    return commands + nested


def pin(word: str) -> str:
    """``[get_bd_intf_pins a/b]`` -> ``a/b``."""
    match = re.fullmatch(r"\[get_bd_(?:intf_)?pins ([^\]]+)\]", word)
    assert match, word
    return match.group(1)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def ps_properties(commands) -> dict[str, str]:
    """CONFIG.* values set on the PS cell, in order (later settings win)."""
    props = {}
    cell = f"[get_bd_cells {vivado.PS_CELL}]"
    for c in commands:
        if c[0] == "set_property" and c[1] == "-dict" and c[-1] == cell:
            items = c[2][len("[list "):-1].split()
            for key, value in zip(items[::2], items[1::2], strict=True):
                props[key.removeprefix("CONFIG.")] = value.strip("{}")
    return props


def reaches(commands, start: str, goal: str) -> list[str]:
    """Cells an AXI path from pin ``start`` to pin ``goal`` passes (through SmartConnects)."""
    edges: dict[str, set[str]] = {}
    for c in commands:
        if c[0] == "connect_bd_intf_net":
            a, b = pin(c[1]), pin(c[2])
            edges.setdefault(a, set()).add(b)
            edges.setdefault(b, set()).add(a)
    smartconnects = {c[-1] for c in commands if c[0] == "create_bd_cell"
                     and "xilinx.com:ip:smartconnect" in c}
    # A SmartConnect has the master ports its NUM_MI says: M00_AXI .. M<NUM_MI-1>_AXI.
    outputs = {}
    for c in commands:
        if c[0] == "set_property" and c[-1].startswith("[get_bd_cells "):
            cell = c[-1][len("[get_bd_cells "):-1]
            n_mi = re.search(r"CONFIG\.NUM_MI \{(\d+)\}", c[2])
            if cell in smartconnects and n_mi:
                outputs[cell] = {f"{cell}/M{i:02d}_AXI" for i in range(int(n_mi.group(1)))}
    seen, frontier = {start: [start]}, [start]
    while frontier:
        node = frontier.pop()
        nexts = set(edges.get(node, ()))
        cell, _, port = node.partition("/")
        if cell in smartconnects and port.startswith("S"):
            nexts |= outputs[cell]
        for n in nexts:
            if n not in seen:
                seen[n] = [*seen[node], n]
                frontier.append(n)
    assert goal in seen, f"no AXI path from {start} to {goal}"
    return seen[goal]


def nets(commands) -> list[set[str]]:
    return [{pin(w) for w in c[1:]} for c in commands if c[0] == "connect_bd_net"]


def wrapper_ports(text: str) -> dict[str, tuple[str, int, list[str]]]:
    """Wrapper port -> (direction, width, attribute strings before it)."""
    start = text.index(f"module {vivado.WRAPPER_MODULE} (")
    header = text[start:text.index(");", start)]
    ports = {}
    for chunk in header.split(",\n"):
        attrs = re.findall(r'\(\* (\w+ = "[^"]*") \*\)', chunk)
        m = re.search(r"(input|output)\s+wire\s+(?:\[(\d+):0\]\s+)?(\w+)\s*$", chunk)
        assert m, chunk
        ports[m.group(3)] = (m.group(1), int(m.group(2) or 0) + 1, attrs)
    return ports


def wrapper_connections(text: str) -> dict[str, str]:
    """AcceleratorTop port -> wrapper expression, from the instance."""
    body = text[text.index(f"{vivado.ACCEL_MODULE} accel ("):]
    return dict(re.findall(r"\.(\w+)\((\w+)\)", body))


# ---- fixtures --------------------------------------------------------------------------------


def elaborated(component):
    """``component``, elaborated once: tests that only read its signature would otherwise
    leave Amaranth warning about sub-components that were never used."""
    Fragment.get(component, None)
    return component


@pytest.fixture(scope="module")
def ci_top():
    return elaborated(AcceleratorTop(CI))


@pytest.fixture(scope="module")
def ci_verilog() -> str:
    return to_verilog(AcceleratorTop(CI), vivado.ACCEL_MODULE, SYNTHESIS)


@pytest.fixture(scope="module")
def ci_flow(tmp_path_factory, ci_verilog):
    build = tmp_path_factory.mktemp("vivado") / "ci"
    return vivado.write_project("ci", build,
                                accelerator_verilog=lambda c: elaborated(c) and ci_verilog)


@pytest.fixture(scope="module")
def bd(ci_flow):
    return tcl_commands(ci_flow.files["block_design"].read_text())


@pytest.fixture
def fast_verilog(monkeypatch, ci_verilog):
    """``m3vit bitstream`` without the 10 s conversion: the Verilog comes from the fixture.
    The flow must ask for the synthesis form (DSP48E2 instances in the packed array)."""
    def convert(component, name, platform=None):
        assert platform is SYNTHESIS
        elaborated(component)
        return ci_verilog

    monkeypatch.setattr(vivado.flow, "to_verilog", convert)


# ---- versions ---------------------------------------------------------------------------------


def test_the_expected_vivado_is_the_one_of_the_pinned_pynq():
    pin_line = re.search(r"^pynq==(\d+)\.(\d+)", (REPO / "requirements.txt").read_text(),
                         re.MULTILINE)
    assert pin_line, "requirements.txt pins no pynq"
    assert vivado.PYNQ_IMAGE == f"{pin_line.group(1)}.{pin_line.group(2)}"
    assert vivado.VIVADO_VERSION == vivado.PYNQ_VIVADO[vivado.PYNQ_IMAGE] == "2025.2"
    readme = (REPO / "bitstreams" / "README.md").read_text()
    assert f"Vivado {vivado.VIVADO_VERSION}" in readme and f"PYNQ {vivado.PYNQ_IMAGE}" in readme
    # The CLI spells them out for `m3vit bitstream --help` (it starts without Amaranth).
    assert (cli._VIVADO_VERSION, cli._PYNQ_IMAGE) == (vivado.VIVADO_VERSION, vivado.PYNQ_IMAGE)


@pytest.mark.parametrize(("text", "version"), [
    ("vivado v2025.2 (64-bit)\nSW Build 1234 on ...\n", "2025.2"),
    ("Vivado v2024.1.2 (64-bit)\n", "2024.1"),
    ("command not understood\n", None),
])
def test_parse_vivado_version(text, version):
    assert vivado.parse_vivado_version(text) == version


# ---- the wrapper ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [CI, ZCU104], ids=["ci", "zcu104"])
def test_wrapper_ports_cover_every_axi_signal_of_the_top(config):
    component = elaborated(AcceleratorTop(config))
    text = vivado.wrapper_verilog(component, config, "x")
    ports = wrapper_ports(text)
    connections = wrapper_connections(text)
    top_ports = signature_ports(component)
    # Every port of the generated top is connected, to a wrapper port of the same width and
    # direction with the standard name; clock and reset come from aclk / aresetn.
    assert set(connections) == {"clk", "rst", *top_ports}
    assert connections["clk"] == "aclk" and connections["rst"] == "rst"
    assert "wire rst = ~aresetn;" in text
    for inner, (signal, direction) in top_ports.items():
        bus, _, sig = inner.partition("__")
        # s_axil → s_axi_*; each master m_axi, m_axi1, … keeps its name: m_axi1_arid.
        expected = f"s_axi_{sig}" if bus == "s_axil" else \
            f"{bus}_{sig}" if bus.startswith("m_axi") else inner
        assert connections[inner] == expected
        io, width, attrs = ports[expected]
        assert (io, width) == ("input" if direction.name == "Input" else "output", len(signal))
        if sig:
            iface = "s_axi" if bus == "s_axil" else bus
            assert f'X_INTERFACE_INFO = "xilinx.com:interface:aximm:1.0 {iface} ' \
                   f'{sig.upper()}"' in attrs
    # Nothing extra but clock and reset, each with its interface attributes.
    assert set(ports) == {"aclk", "aresetn", *(connections[p] for p in top_ports)}
    assert any("xilinx.com:signal:clock:1.0 aclk CLK" in a for a in ports["aclk"][2])
    assert any("ASSOCIATED_BUSIF s_axi:m_axi" in a for a in ports["aclk"][2])
    assert any("POLARITY ACTIVE_LOW" in a for a in ports["aresetn"][2])
    assert any("xilinx.com:signal:interrupt:1.0 irq INTERRUPT" in a for a in ports["irq"][2])
    # What Vivado needs to infer each interface is there.
    logical = {name: {p.removeprefix(f"{name}_").upper() for p in ports if p.startswith(name)}
               for name in ("s_axi", "m_axi")}
    assert AXI4LITE_REQUIRED <= logical["s_axi"]
    assert AXI4_REQUIRED <= logical["m_axi"]
    params = " ".join(a for p in ports.values() for a in p[2] if "X_INTERFACE_PARAMETER" in a)
    assert "XIL_INTERFACENAME s_axi, PROTOCOL AXI4LITE, DATA_WIDTH 32, ADDR_WIDTH 12" in params
    assert (f"XIL_INTERFACENAME m_axi, PROTOCOL AXI4, DATA_WIDTH {config.axi_data_width}, "
            f"ADDR_WIDTH {config.axi_addr_width}, ID_WIDTH 1, MAX_BURST_LENGTH "
            f"{config.max_burst_beats}") in params


def test_the_wrapper_lints_with_the_accelerator(ci_flow, tmp_path):
    # One file: the lint helper takes one. Verilator also checks every named port exists,
    # the DSP48E2 instances' against the subset model the packed array's bench runs on.
    source = tmp_path / "wrapped.v"
    source.write_text(ci_flow.files["wrapper"].read_text()
                      + ci_flow.files["accelerator"].read_text()
                      + DSP48E2_MODEL.read_text())
    assert lint(source, vivado.WRAPPER_MODULE) == []


class _ToyTop(wiring.Component):
    """A top with the accelerator's control port, its interrupt and ``extra`` members."""

    def __init__(self, extra):
        super().__init__({"s_axil": In(AxiLiteSignature()), "irq": Out(1), **extra})


@pytest.mark.parametrize(("extra", "message"), [
    ({"debug": Out(8)}, "'debug'"),
    ({"ctl": In(AxiLiteSignature())}, "more than one AXI slave"),
    ({"dma": Out(AxiLiteSignature())}, "must be named m_axi"),
])
def test_a_port_the_wrapper_cannot_place_stops_generation(extra, message):
    with pytest.raises(M3VitError, match=re.escape(message)):
        vivado.bus_interfaces(_ToyTop(extra))


# ---- the block design -------------------------------------------------------------------------


def test_the_block_design_instantiates_the_ps_with_the_zcu104_preset(bd, ci_flow):
    creates = [c for c in bd if c[0] == "create_bd_cell"]
    ps = [c for c in creates if "xilinx.com:ip:zynq_ultra_ps_e" in c]
    assert len(ps) == 1 and ps[0][-1] == vivado.PS_CELL
    preset = [i for i, c in enumerate(bd) if c[0] == "apply_bd_automation"]
    assert len(preset) == 1
    command = bd[preset[0]]
    assert option(command, "-rule") == "xilinx.com:bd_rule:zynq_ultra_ps_e"
    assert option(command, "-config") == '{apply_board_preset "1"}'
    assert command[-1] == f"[get_bd_cells {vivado.PS_CELL}]"
    # The preset comes before this design's own PS settings (it would overwrite them).
    ps_settings = [i for i, c in enumerate(bd) if c[0] == "set_property"
                   and c[-1] == f"[get_bd_cells {vivado.PS_CELL}]"]
    assert ps_settings and min(ps_settings) > preset[0]
    # The project targets the ZCU104's part and board.
    build = tcl_commands(ci_flow.files["build"].read_text())
    sets = {c[1]: c[2] for c in build if c[0] == "set" and len(c) == 3}
    assert sets["part"] == f'"{vivado.PART}"' == '"xczu7ev-ffvc1156-2-e"'
    assert "*:zcu104:*" in sets["board_part"]
    assert ["set_property", "board_part", "$board_part", "[current_project]"] in build


def test_the_accelerator_cell_is_what_the_runtime_looks_for(bd, ci_flow):
    modules = [c for c in bd if c[0] == "create_bd_cell" and "-reference" in c]
    assert len(modules) == 1
    reference, cell = option(modules[0], "-reference"), modules[0][-1]
    assert cell.startswith(ACCEL_IP_PREFIX) and cell == vivado.ACCEL_CELL
    wrapper = ci_flow.files["wrapper"].read_text()
    assert re.search(rf"^module {reference} \(", wrapper, re.MULTILINE)


def test_control_and_data_paths(bd):
    props = ps_properties(bd)
    path = reaches(bd, f"{vivado.PS_CELL}/M_AXI_HPM0_FPD", f"{vivado.ACCEL_CELL}/s_axi")
    assert len(path) <= 4  # at most one interconnect in between
    reaches(bd, f"{vivado.ACCEL_CELL}/m_axi", f"{vivado.PS_CELL}/S_AXI_HP0_FPD")
    # The ports used are enabled, the ones not used are off (their clocks would dangle).
    assert props["PSU__USE__M_AXI_GP0"] == "1"  # HPM0_FPD
    assert props["PSU__USE__M_AXI_GP1"] == props["PSU__USE__M_AXI_GP2"] == "0"
    assert props["PSU__USE__S_AXI_GP2"] == "1"  # HP0
    assert [props[f"PSU__USE__S_AXI_GP{i}"] for i in (3, 4, 5)] == ["0", "0", "0"]
    assert props["PSU__SAXIGP2__DATA_WIDTH"] == str(CI.axi_data_width)
    # No interface pin of the PS is connected unless enabled above.
    used = {p.split("/")[1] for c in bd if c[0] == "connect_bd_intf_net"
            for p in map(pin, c[1:]) if p.startswith(vivado.PS_CELL)}
    assert used == {"M_AXI_HPM0_FPD", "S_AXI_HP0_FPD"}


@pytest.mark.parametrize("clock_mhz", [300.0, 187.5])
def test_one_clock_at_the_configured_target(ci_top, clock_mhz):
    config = CI.replace(clock_mhz=clock_mhz)
    buses, interrupts = vivado.bus_interfaces(ci_top)
    bd = tcl_commands(vivado.block_design_tcl(buses, interrupts, config, "ci"))
    props = ps_properties(bd)
    assert float(props["PSU__CRL_APB__PL0_REF_CTRL__FREQMHZ"]) == clock_mhz
    assert props["PSU__FPGA_PL0_ENABLE"] == "1"
    clock = next(n for n in nets(bd) if f"{vivado.PS_CELL}/pl_clk0" in n)
    ps = vivado.PS_CELL
    smartconnects = [c[-1] for c in bd if c[0] == "create_bd_cell"
                     and "xilinx.com:ip:smartconnect" in c]
    assert {f"{vivado.ACCEL_CELL}/aclk", f"{ps}/maxihpm0_fpd_aclk", f"{ps}/saxihp0_fpd_aclk",
            *(f"{s}/aclk" for s in smartconnects)} <= clock
    assert all(not n & clock for n in nets(bd) if n != clock)  # the only clock net


def test_reset_and_interrupt(bd):
    ps = vivado.PS_CELL
    reset_in = next(n for n in nets(bd) if f"{ps}/pl_resetn0" in n)
    assert reset_in == {f"{ps}/pl_resetn0", "rst_pl_clk0/ext_reset_in"}
    reset_out = next(n for n in nets(bd) if "rst_pl_clk0/peripheral_aresetn" in n)
    assert f"{vivado.ACCEL_CELL}/aresetn" in reset_out
    assert {f"{vivado.ACCEL_CELL}/irq", f"{ps}/pl_ps_irq0"} in nets(bd)
    assert ps_properties(bd)["PSU__USE__IRQ0"] == "1"


def test_the_address_map_is_the_register_window_the_runtime_maps(bd, ci_flow):
    assigns = [c for c in bd if c[0] == "assign_bd_address"]
    control = [c for c in assigns
               if option(c, "-target_address_space")
               == f"[get_bd_addr_spaces {vivado.PS_CELL}/Data]"]
    assert len(control) == 1
    assert control[0][-2] == f"[get_bd_addr_segs {vivado.ACCEL_CELL}/s_axi/reg0]"
    offset, size = int(option(control[0], "-offset"), 16), int(option(control[0], "-range"), 16)
    # The runtime maps REGISTER_WINDOW_BYTES from phys_addr; the segment must cover it and
    # every register, sit in M_AXI_HPM0_FPD's aperture and be aligned to its size.
    assert size == REGISTER_WINDOW_BYTES == 4096
    assert all(r.offset + 4 <= size for r in REGISTER_MAP)
    assert 0xA000_0000 <= offset and offset + size <= 0xB000_0000 and offset % size == 0
    # What pynq's ip_dict would hold for this design (name, phys_addr, addr_range from the
    # .hwh) is what PynqBoard picks.
    ip_dict = {"axi_gpio_0": {"phys_addr": 0xA001_0000, "addr_range": 0x1000},
               vivado.ACCEL_CELL: {"phys_addr": offset, "addr_range": size}}
    name, ip = _find_accelerator(ip_dict, None)
    assert name == vivado.ACCEL_CELL and ip["addr_range"] >= REGISTER_WINDOW_BYTES
    assert ci_flow.flow["address_map"]["control_offset"] == f"0x{offset:08x}"
    assert ci_flow.flow["address_map"]["control_range"] == size


def test_the_master_sees_all_of_the_ps_ddr(bd):
    segments = [c[-2] for c in bd if c[0] == "assign_bd_address"
                and option(c, "-target_address_space")
                == f"[get_bd_addr_spaces {vivado.ACCEL_CELL}/m_axi]"]
    # HP0 is SAXIGP2 in the PS's address map: the same port the master is wired to.
    assert sorted(segments) == [f"[get_bd_addr_segs {vivado.PS_CELL}/SAXIGP2/HP0_DDR_{s}]"
                                for s in ("HIGH", "LOW")]


def test_three_masters_go_to_hp0_hp1_hp3_and_each_sees_the_ddr():
    """The ZCU104 default: m_axi, m_axi1, m_axi2 on HP0, HP1 and HP3 (HP2 shares HP1's DDR
    controller port), each through its own SmartConnect, each with the whole PS DDR; the
    same choice as the DDR model's (m3vit.hw.hp_ports) and the flow record's."""
    config = CI.replace(n_master_ports=3)
    top = elaborated(AcceleratorTop(config))
    buses, interrupts = vivado.bus_interfaces(top)
    assert [b.name for b in buses if b.mode == "master"] == ["m_axi", "m_axi1", "m_axi2"]
    bd = tcl_commands(vivado.block_design_tcl(buses, interrupts, config, "ci"))
    props = ps_properties(bd)
    ps = vivado.PS_CELL
    wanted = {"m_axi": (0, "SAXIGP2"), "m_axi1": (1, "SAXIGP3"), "m_axi2": (3, "SAXIGP5")}
    for master, (hp, space) in wanted.items():
        reaches(bd, f"{vivado.ACCEL_CELL}/{master}", f"{ps}/S_AXI_HP{hp}_FPD")
        assert props[f"PSU__USE__S_AXI_GP{hp + 2}"] == "1"
        assert props[f"PSU__SAXIGP{hp + 2}__DATA_WIDTH"] == str(config.axi_data_width)
        segments = [c[-2] for c in bd if c[0] == "assign_bd_address"
                    and option(c, "-target_address_space")
                    == f"[get_bd_addr_spaces {vivado.ACCEL_CELL}/{master}]"]
        assert sorted(segments) == [f"[get_bd_addr_segs {ps}/{space}/HP{hp}_DDR_{s}]"
                                    for s in ("HIGH", "LOW")]
    assert props["PSU__USE__S_AXI_GP4"] == "0"  # HP2 stays off
    clock = next(n for n in nets(bd) if f"{ps}/pl_clk0" in n)
    assert {f"{ps}/saxihp0_fpd_aclk", f"{ps}/saxihp1_fpd_aclk", f"{ps}/saxihp3_fpd_aclk"} <= clock
    assert f"{ps}/saxihp2_fpd_aclk" not in clock
    assert DdrTiming.zcu104(config).hp_ports == (0, 1, 3)


def test_the_build_runs_to_the_bitstream_and_reports(ci_flow):
    build = tcl_commands(ci_flow.files["build"].read_text())
    heads = [c[0] for c in build]
    assert ["source", "[file join $here block_design.tcl]"] in build
    assert ["m3vit_create_block_design", "$bd_name"] in build
    assert ["launch_runs", "synth_1", "-jobs", "$jobs"] in build
    assert ["launch_runs", "impl_1", "-to_step", "write_bitstream", "-jobs", "$jobs"] in build
    assert "report_timing_summary" in heads and "report_utilization" in heads
    copies = [c[-1] for c in build if c[:3] == ["file", "copy", "-force"]]
    assert copies == ["[file join $out_dir $base_name.bit]", "[file join $out_dir $base_name.hwh]"]
    # The expected Vivado is checked by the script too (it may run on another machine).
    assert f'"{vivado.VIVADO_VERSION}"' in ci_flow.files["build"].read_text()
    assert os.access(ci_flow.files["run"], os.X_OK)


# ---- reports ----------------------------------------------------------------------------------


TIMING_REPORT = """\
------------------------------------------------------------------------------------------------
| Design Timing Summary
| ---------------------
------------------------------------------------------------------------------------------------

    WNS(ns)      TNS(ns)  TNS Failing Endpoints  TNS Total Endpoints      WHS(ns)      THS(ns)  THS Failing Endpoints  THS Total Endpoints     WPWS(ns)     TPWS(ns)  TPWS Failing Endpoints  TPWS Total Endpoints
    -------      -------  ---------------------  -------------------      -------      -------  ---------------------  -------------------     --------     --------  ----------------------  --------------------
      {wns}        0.000                      0               123456        0.010        0.000                      0               123456        0.500        0.000                       0                 54321


All user specified timing constraints are met.

------------------------------------------------------------------------------------------------
| Intra Clock Table
------------------------------------------------------------------------------------------------

Clock             WNS(ns)      TNS(ns)  TNS Failing Endpoints  TNS Total Endpoints
-----             -------      -------  ---------------------  -------------------
clk_pl_0           -9.000        0.000                      0                 1000
"""  # noqa: E501

UTILIZATION_REPORT = """\
+----------------------------+--------+-------+------------+-----------+-------+
|          Site Type         |  Used  | Fixed | Prohibited | Available | Util% |
+----------------------------+--------+-------+------------+-----------+-------+
| CLB LUTs*                  | 100000 |     0 |          0 |    230400 | 43.40 |
|   LUT as Logic             |  90000 |     0 |          0 |    230400 | 39.06 |
| CLB Registers              | 150000 |     0 |          0 |    460800 | 32.55 |
+----------------------------+--------+-------+------------+-----------+-------+
+-------------------+------+-------+------------+-----------+-------+
|     Site Type     | Used | Fixed | Prohibited | Available | Util% |
+-------------------+------+-------+------------+-----------+-------+
| Block RAM Tile    |  100 |     0 |          0 |       312 | 32.05 |
| URAM              |   32 |     0 |          0 |        96 | 33.33 |
| DSPs              | 1024 |     0 |          0 |      1728 | 59.26 |
+-------------------+------+-------+------------+-----------+-------+
"""


def test_parse_timing_summary():
    timing = vivado.parse_timing_summary(TIMING_REPORT.format(wns="0.123"))
    assert timing == {"wns_ns": 0.123, "tns_ns": 0.0, "whs_ns": 0.01, "ths_ns": 0.0,
                      "wpws_ns": 0.5, "tpws_ns": 0.0}
    assert vivado.parse_timing_summary(TIMING_REPORT.format(wns="   NA"))["wns_ns"] is None
    with pytest.raises(M3VitError, match="Design Timing Summary"):
        vivado.parse_timing_summary("nothing here\n")


def test_parse_utilization():
    assert vivado.parse_utilization(UTILIZATION_REPORT) == {
        "CLB LUTs": {"used": 100000, "available": 230400, "percent": 43.40},
        "CLB Registers": {"used": 150000, "available": 460800, "percent": 32.55},
        "Block RAM Tile": {"used": 100, "available": 312, "percent": 32.05},
        "URAM": {"used": 32, "available": 96, "percent": 33.33},
        "DSPs": {"used": 1024, "available": 1728, "percent": 59.26},
    }


# ---- m3vit bitstream: without Vivado, with a fake one ------------------------------------------


def test_without_vivado_the_scripts_are_written_and_one_line_says_so(tmp_path):
    # What `make bitstream` runs (`m3vit bitstream`), in a fresh process whose PATH has no
    # vivado.
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    build, out = tmp_path / "build", tmp_path / "bitstreams"
    result = subprocess.run(
        [sys.executable, "-m", "m3vit.sw.cli", "bitstream", "--config", "ci", "--out", str(out),
         "--build-dir", str(build)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("m3vit: error: Vivado not found on PATH")
    for name in ("m3vit_accel.v", "m3vit_accel_wrapper.v", "block_design.tcl", "build.tcl",
                 "run.sh", "flow.json"):
        assert (build / name).is_file(), name
    assert "cd build && vivado -mode batch -source build.tcl" in result.stdout
    assert f"Vivado {vivado.VIVADO_VERSION}" in result.stdout
    # What to run here afterwards: this very command with --collect.
    assert re.search(rf"m3vit bitstream --config ci --out {re.escape(str(out))} --build-dir "
                     rf"{re.escape(str(build))} --collect$", result.stdout, re.MULTILINE)
    assert not out.exists()


def fake_vivado(bin_dir: Path, *, version: str = vivado.VIVADO_VERSION, wns: str = "0.123",
                fail: bool = False) -> Path:
    """A ``vivado`` that answers ``-version`` and "builds" by writing what build.tcl leaves."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "vivado"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, pathlib, sys
        if sys.argv[1:] == ["-version"]:
            print("vivado v{version} (64-bit)")
            print("Tool Version Limit: 2026.01")
            sys.exit(0)
        pathlib.Path("fake_vivado_args.json").write_text(json.dumps(sys.argv[1:]))
        print("M3VIT: project m3vit_ci for {vivado.PART}")
        print("M3VIT: synthesis (2 jobs)")
        if {fail!r}:
            print("ERROR: [Synth 8-439] module 'm3vit_accel' not found")
            sys.exit(1)
        base = json.loads(pathlib.Path("flow.json").read_text())["base_name"]
        out = pathlib.Path("out")
        out.mkdir(exist_ok=True)
        (out / f"{{base}}.bit").write_bytes(b"BITSTREAM")
        (out / f"{{base}}.hwh").write_text("<MODULES/>")
        (out / "timing_summary.rpt").write_text({TIMING_REPORT.format(wns=wns)!r})
        (out / "utilization.rpt").write_text({UTILIZATION_REPORT!r})
        (out / "build_info.txt").write_text(
            "vivado_version {version}\\npart {vivado.PART}\\n"
            "board_part xilinx.com:zcu104:part0:1.1\\npl_clk0_hz 299997009\\n")
        print("M3VIT: done")
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def run_main(capsys, *argv):
    code = cli.main(["bitstream", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return tmp_path / "build", tmp_path / "bitstreams", tmp_path / "bin"


@pytest.mark.parametrize(("argv", "message"), [
    (["--config", "zcu102"],
     "m3vit: error: unknown accelerator config 'zcu102' (choose from zcu104, ci)"),
    (["--config", "ci", "--jobs", "0"], "m3vit: error: --jobs must be >= 1, got 0"),
    (["--scripts-only", "--collect"], "m3vit bitstream: error: argument --collect: not allowed "
                                      "with argument --scripts-only"),
])
def test_bad_input_is_one_line_before_anything_is_written(paths, capsys, argv, message):
    build, out, _ = paths
    code, _, err = run_main(capsys, *argv, "--out", str(out), "--build-dir", str(build))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(message)
    assert not build.exists() and not out.exists()


def test_a_vivado_of_another_version_is_refused(paths, capsys, fast_verilog):
    build, out, bin_dir = paths
    fake_vivado(bin_dir, version="2022.1")
    code, _, err = run_main(capsys, "--config", "ci", "--out", str(out),
                            "--build-dir", str(build))
    assert code == 2
    assert err.count("\n") == 1
    assert "is Vivado 2022.1" in err and f"need Vivado {vivado.VIVADO_VERSION}" in err
    assert not (build / "fake_vivado_args.json").exists()  # never ran the build


def test_a_build_lands_in_bitstreams_with_its_manifest(paths, capsys, fast_verilog):
    build, out, bin_dir = paths
    fake_vivado(bin_dir)
    code, stdout, err = run_main(capsys, "--config", "ci", "--out", str(out),
                                 "--build-dir", str(build), "--jobs", "3")
    assert (code, err) == (0, "")
    args = json.loads((build / "fake_vivado_args.json").read_text())
    assert args[:5] == ["-mode", "batch", "-notrace", "-source", "build.tcl"]
    assert args[-2:] == ["-tclargs", "3"]
    assert re.search(r"vivado \[0:00:\d\d\] synthesis \(2 jobs\)", stdout)
    # One base name for .bit and .hwh (pynq.Overlay looks for the .hwh beside the .bit).
    assert (out / "m3vit_ci.bit").read_bytes() == b"BITSTREAM"
    assert (out / "m3vit_ci.hwh").is_file()
    entry = json.loads((out / "manifest.json").read_text())["bitstreams"]["m3vit_ci"]
    assert entry["config_hash"] == f"0x{CI.config_hash():08x}"
    assert entry["clock_mhz"] == CI.clock_mhz and entry["pl_clk0_mhz"] == 299.997009
    assert entry["vivado_version"] == vivado.VIVADO_VERSION
    assert entry["timing"]["wns_ns"] == 0.123 and entry["timing"]["met"] is True
    assert entry["utilization"]["DSPs"]["used"] == 1024
    assert entry["address_map"]["cell"] == vivado.ACCEL_CELL
    for report in entry["reports"]:
        assert (out / report).is_file()


def test_a_bitstream_of_another_configuration_is_kept_without_force(paths, capsys,
                                                                     fast_verilog):
    build, out, bin_dir = paths
    fake_vivado(bin_dir)
    argv = ["--config", "ci", "--out", str(out), "--build-dir", str(build)]
    assert run_main(capsys, *argv)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bitstreams"]["m3vit_ci"]["config_hash"] = "0x00000000"
    (out / "manifest.json").write_text(json.dumps(manifest))
    (build / "fake_vivado_args.json").unlink()
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and "built for config hash 0x00000000" in err and "--force" in err
    assert not (build / "fake_vivado_args.json").exists()  # refused before building
    assert run_main(capsys, *argv, "--force")[0] == 0
    entry = json.loads((out / "manifest.json").read_text())["bitstreams"]["m3vit_ci"]
    assert entry["config_hash"] == f"0x{CI.config_hash():08x}"


def test_a_build_that_misses_timing_is_not_copied(paths, capsys, fast_verilog):
    build, out, bin_dir = paths
    fake_vivado(bin_dir, wns="-0.250")
    code, _, err = run_main(capsys, "--config", "ci", "--out", str(out),
                            "--build-dir", str(build))
    assert code == 2 and "timing not met" in err and "WNS -0.25 ns" in err
    assert not (out / "m3vit_ci.bit").exists()
    assert (build / "out" / "m3vit_ci.bit").exists()  # kept for inspection


def test_a_failed_vivado_run_is_one_line(paths, capsys, fast_verilog):
    build, out, bin_dir = paths
    fake_vivado(bin_dir, fail=True)
    code, _, err = run_main(capsys, "--config", "ci", "--out", str(out),
                            "--build-dir", str(build))
    assert code == 2 and err.count("\n") == 1
    assert "Vivado failed (exit status 1): ERROR: [Synth 8-439]" in err


def test_collect_a_build_run_elsewhere(paths, capsys, fast_verilog):
    build, out, bin_dir = paths
    argv = ["--config", "ci", "--out", str(out), "--build-dir", str(build)]
    assert run_main(capsys, *argv, "--scripts-only")[0] == 0
    code, _, err = run_main(capsys, *argv, "--collect")
    assert code == 2 and "vivado -mode batch -source build.tcl` first" in err
    # "Elsewhere": the fake runs build.tcl's part in the folder, then --collect imports it.
    script = fake_vivado(bin_dir)
    subprocess.run([str(script), "-mode", "batch", "-source", "build.tcl"], cwd=build,
                   check=True, capture_output=True)
    assert run_main(capsys, *argv, "--collect")[0] == 0
    assert (out / "m3vit_ci.bit").is_file() and (out / "manifest.json").is_file()
