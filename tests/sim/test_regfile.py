# amaranth: UnusedElaboratable=no
"""The control register file (:class:`m3vit.hw.regfile.ControlRegisters`): ports, the ZCU104
lint and the cocotb bench in ``tests/sim/regfile/``.

The bench runs on the CI configuration, one small Verilator build under
``build/sim/regfile/``; the register file's logic does not depend on the configuration beyond
its constants, so the ZCU104 one is elaborated and linted only.
"""

import json
import os
from pathlib import Path

import pytest

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.flow.generate import signature_ports, to_verilog, write_if_changed
from m3vit.hw.regfile import ControlRegisters
from m3vit.hw.registers import COUNTERS, RegisterError
from m3vit.sim.cocotb_runner import run_bench
from m3vit.sim.verilator import lint

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent / "regfile"
BUILD_DIR = REPO_ROOT / "build" / "sim" / "regfile"
TOP = "control_registers"
BENCH_MODULE = "test_control_registers"
CONFIG_ENV = "M3VIT_REGFILE_CONFIG"  # read by the bench
# Fixed so CI is reproducible; export COCOTB_RANDOM_SEED to explore other seeds.
SEED = int(os.environ.get("COCOTB_RANDOM_SEED", "20251128"))
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
        "engine__error_pc", "engine__counters", "dma_counters"}
    assert (len(ports["engine__counters"][0]) + len(ports["dma_counters"][0])
            == 32 * len(COUNTERS))
    assert (len(ports["engine__program_base"][0]) == 64
            and len(ports["s_axil__awaddr"][0]) == 12)


def test_refuses_a_non_config_and_a_config_it_cannot_describe():
    with pytest.raises(TypeError, match="AccelConfig"):
        ControlRegisters({"pe_rows": 4})
    with pytest.raises(RegisterError, match="N_MASTER_PORTS is 4 bits wide, got 16"):
        ControlRegisters(CI.replace(n_master_ports=16))


def test_zcu104_register_file_elaborates_and_lints_clean(tmp_path):
    path = tmp_path / f"{TOP}.v"
    path.write_text(to_verilog(ControlRegisters(ZCU104), TOP))

    assert lint(path, TOP) == []


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_register_file_bench_passes(monkeypatch):
    # -O1 instead of Verilator's -Os: this small model then compiles in about half the
    # time on the 2-core machine, and its short tests simulate as fast (see test_vector.py).
    flags = os.environ.get("MAKEFLAGS", "")
    monkeypatch.setenv("MAKEFLAGS", f"{flags} OPT_FAST=-O1 OPT_GLOBAL=-O1".strip())
    verilog = BUILD_DIR / f"{TOP}.v"
    write_if_changed(verilog, to_verilog(ControlRegisters(CI), TOP))

    result = run_bench(
        top=TOP,
        verilog_sources=[verilog],
        test_module=BENCH_MODULE,
        test_dir=BENCH_DIR,
        build_dir=BUILD_DIR / "verilator",
        seed=SEED,
        extra_env={
            CONFIG_ENV: json.dumps(CI.to_dict()),
            # cocotb's default ("*.py") rewrites the assertions of every module imported
            # after start-up, torch included: ~12 s per simulator start.
            "COCOTB_REWRITE_ASSERTION_FILES": "test_*.py *_tb.py",
        },
    )

    print(f"regfile: build {result.build_s:.1f} s, simulation {result.test_s:.1f} s, "
          f"seed {SEED}")
    assert len(result.passed) == EXPECTED_TESTS, result.passed
    assert not result.skipped
