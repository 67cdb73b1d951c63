# amaranth: UnusedElaboratable=no
"""The control register file (:class:`m3vit.hw.regfile.ControlRegisters`): ports, the ZCU104
lint and the cocotb bench in ``tests/sim/regfile/``.

The bench runs on the CI configuration, one small Verilator build under
``build/sim/regfile/``; the register file's logic does not depend on the configuration beyond
its constants, so the ZCU104 one is elaborated and linted only.
"""

from pathlib import Path

import pytest

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.flow.generate import signature_ports, to_verilog, write_if_changed
from m3vit.hw.regfile import ControlRegisters
from m3vit.hw.registers import COUNTERS, RegisterError
from m3vit.sim.verilator import lint

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent / "regfile"
BUILD_DIR = REPO_ROOT / "build" / "sim" / "regfile"
TOP = "control_registers"
BENCH_MODULE = "test_control_registers"
# Nine test bodies: seven under both flows (free, random stalls), two once.
EXPECTED_TESTS = 7 * 2 + 2

AXIL_PORTS = ["awaddr", "awvalid", "awready", "wdata", "wstrb", "wvalid", "wready", "bresp",
              "bvalid", "bready", "araddr", "arvalid", "arready", "rdata", "rresp", "rvalid",
              "rready"]


def test_ports_are_named_from_the_signature():
    ports = signature_ports(ControlRegisters(CI))

    assert {name for name in ports if name.startswith("s_axil__")} == {
        f"s_axil__{member}" for member in AXIL_PORTS}
    assert {name for name in ports if not name.startswith("s_axil__")} == {
        "engine__start", "engine__abort_request", "clear_counters", "engine__program_base",
        "engine__data_base", "engine__data_size", "engine__task_select", "engine__schedule",
        "engine__busy", "engine__done", "engine__error", "engine__error_code",
        "engine__error_pc", "engine__counters", "dma_counters", "engine__trace_index",
        "engine__trace_entry", "engine__trace_count"}
    assert (len(ports["engine__counters"][0]) + len(ports["dma_counters"][0])
            == 32 * len(COUNTERS))
    assert (len(ports["engine__program_base"][0]) == 64
            and len(ports["s_axil__awaddr"][0]) == 12)


def test_refuses_a_non_config_and_a_config_it_cannot_describe():
    with pytest.raises(TypeError, match="AccelConfig"):
        ControlRegisters({"pe_rows": 4})
    with pytest.raises(RegisterError, match="MAX_EXPERTS = 4294967296 does not fit"):
        ControlRegisters(CI.replace(max_experts=1 << 32))


def test_zcu104_register_file_elaborates_and_lints_clean(tmp_path):
    path = tmp_path / f"{TOP}.v"
    path.write_text(to_verilog(ControlRegisters(ZCU104), TOP))

    assert lint(path, TOP) == []


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_register_file_bench_passes(quick_model_compile, cocotb_bench):
    verilog = BUILD_DIR / f"{TOP}.v"
    write_if_changed(verilog, to_verilog(ControlRegisters(CI), TOP))

    cocotb_bench(module=BENCH_MODULE, bench_dir=BENCH_DIR, top=TOP, verilog=verilog,
                 build_dir=BUILD_DIR / "verilator", config=CI, passes=EXPECTED_TESTS)
