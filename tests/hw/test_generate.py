"""Generation (:mod:`m3vit.hw.flow.generate`): the design registry and ``m3vit generate``.

The small CI configuration is used throughout (the whole registry elaborates in seconds);
the ZCU104 blocks are elaborated and linted by their own tests in ``tests/sim``.
"""

import hashlib
import json
import sys
import types

import amaranth
import pytest
from amaranth.hdl import Fragment

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.errors import M3VitError
from m3vit.hw.flow.generate import CONFIGS, DESIGNS, generate, get_config, get_design
from m3vit.sw import cli
from m3vit.sw.cli import main

BLOCKS = ["gemm", "layernorm", "softmax", "residual", "table", "packed"]


@pytest.fixture
def small_top(monkeypatch):
    """A stand-in ``m3vit.hw.top`` whose ``AcceleratorTop`` is the small table block, so that
    ``--all`` covers the whole registry without the CI top's conversion (the slow test
    below converts the real one)."""
    from m3vit.hw.vector import TableLookup

    fake = types.ModuleType("m3vit.hw.top")
    fake.AcceleratorTop = TableLookup
    monkeypatch.setitem(sys.modules, "m3vit.hw.top", fake)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- registry ------------------------------------------------------------------------------


def test_registry_names():
    assert list(DESIGNS) == ["top", *BLOCKS]
    assert CONFIGS == {"zcu104": ZCU104, "ci": CI}
    assert all(d.module == f"m3vit_{name}" for name, d in DESIGNS.items())


def test_the_cli_help_lists_the_registry():
    # The CLI spells the names out to start without importing Amaranth.
    assert cli._HW_DESIGNS.split(", ") == list(DESIGNS)
    assert cli._HW_CONFIGS.split(", ") == list(CONFIGS)


@pytest.mark.parametrize("name", BLOCKS)
def test_every_block_elaborates_with_its_class(name):
    component = get_design(name).elaborate(CI)
    expected = {"gemm": "GemmEngine", "layernorm": "LayerNormUnit", "softmax": "SoftmaxUnit",
                "residual": "ResidualAdd", "table": "TableLookup",
                "packed": "PackedArray"}[name]
    assert type(component).__name__ == expected
    Fragment.get(component, None)   # elaborates (and marks it used for Amaranth's warning)


def test_unknown_names_are_refused():
    with pytest.raises(M3VitError, match=r"unknown accelerator config 'zcu102' \(choose from "
                       r"zcu104, ci\)"):
        get_config("zcu102")
    with pytest.raises(M3VitError, match=r"unknown design 'mac' \(choose from top, gemm, "):
        get_design("mac")


def test_the_top_is_built_from_the_accelerator_class(monkeypatch):
    made = []
    fake = types.ModuleType("m3vit.hw.top")
    fake.AcceleratorTop = lambda config: made.append(config) or "component"
    monkeypatch.setitem(sys.modules, "m3vit.hw.top", fake)
    assert get_design("top").elaborate(CI) == "component" and made == [CI]


# ---- generate() ----------------------------------------------------------------------------


def test_generate_writes_verilog_and_manifest(tmp_path):
    report = generate("ci", ["table", "residual"], tmp_path)
    assert [f.path.name for f in report.verilog] == ["table.v", "residual.v"]
    assert all(f.written for f in report.verilog) and report.manifest.written
    for f in report.verilog:
        text = f.path.read_text()
        assert f"module m3vit_{f.design}(" in text
        assert "src =" not in text          # no checkout paths: reproducible anywhere
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config_name"] == "ci"
    assert manifest["config"] == CI.to_dict()
    assert manifest["config_hash"] == f"0x{CI.config_hash():08x}"
    assert manifest["amaranth"] == amaranth.__version__
    assert manifest["designs"]["table"] == {
        "file": "table.v", "module": "m3vit_table",
        "sha256": hashlib.sha256((tmp_path / "table.v").read_bytes()).hexdigest(),
    }


def test_generate_is_reproducible_and_leaves_identical_files_alone(tmp_path):
    generate("ci", ["table"], tmp_path)
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    again = generate("ci", ["table"], tmp_path)
    assert not again.verilog[0].written and not again.manifest.written
    assert {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before


def test_a_differing_file_is_not_overwritten_without_force(tmp_path):
    generate("ci", ["table", "residual"], tmp_path)
    (tmp_path / "residual.v").write_text("// edited by hand\n")
    with pytest.raises(M3VitError, match=r"residual.v exists with different content: pass "
                       "--force"):
        generate("ci", ["table", "residual"], tmp_path)
    assert (tmp_path / "residual.v").read_text() == "// edited by hand\n"
    report = generate("ci", ["residual"], tmp_path, force=True)
    assert report.verilog[0].written
    assert "module m3vit_residual(" in (tmp_path / "residual.v").read_text()


def test_nothing_is_written_when_one_target_is_refused(tmp_path):
    (tmp_path / "residual.v").write_text("// keep\n")
    with pytest.raises(M3VitError, match="exists with different content"):
        generate("ci", ["table", "residual"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["residual.v"]


def test_the_manifest_accumulates_designs_of_one_config(tmp_path):
    generate("ci", ["table"], tmp_path)
    generate("ci", ["residual"], tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest["designs"]) == ["residual", "table"]


def test_a_folder_of_another_config_is_refused(tmp_path):
    generate("ci", ["table"], tmp_path)
    other = {**json.loads((tmp_path / "manifest.json").read_text()),
             "config_name": "zcu104", "config": ZCU104.to_dict()}
    (tmp_path / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(M3VitError, match=r"generated for another configuration \(zcu104\)"):
        generate("ci", ["table"], tmp_path)
    generate("ci", ["table"], tmp_path, force=True)
    assert json.loads((tmp_path / "manifest.json").read_text())["config_name"] == "ci"


# ---- m3vit generate ------------------------------------------------------------------------


def test_cli_generates_and_lints(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--config", "ci", "--design", "table", "residual",
                         "--out", str(tmp_path), "--lint")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:3] == [f"{tmp_path / 'table.v'}  (written)",
                         f"{tmp_path / 'residual.v'}  (written)",
                         f"{tmp_path / 'manifest.json'}  (written)"]
    assert "lint table.v: 0 errors, 0 warnings" in lines
    assert "lint residual.v: 0 errors, 0 warnings" in lines
    code, out, _ = run(capsys, "generate", "--config", "ci", "--design", "table", "--out",
                       str(tmp_path))
    assert code == 0 and out.splitlines()[0].endswith("table.v  (unchanged)")


def test_cli_all_generates_every_design(capsys, tmp_path, small_top):
    code, _, err = run(capsys, "generate", "--config", "ci", "--all", "--out", str(tmp_path))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.v")) == sorted(f"{d}.v" for d in DESIGNS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["designs"]) == sorted(DESIGNS)


def test_cli_lint_failure_is_reported(capsys, tmp_path, monkeypatch):
    def failing_lint(path, top, extra=()):
        raise M3VitError(f"Verilator lint of {path.name} failed: %Error: boom")

    monkeypatch.setattr("m3vit.sim.verilator.lint", failing_lint)
    code, out, err = run(capsys, "generate", "--config", "ci", "--design", "table", "--out",
                         str(tmp_path), "--lint")
    assert code == 2
    assert "lint table.v: 1+ errors: Verilator lint of table.v failed: %Error: boom" in out
    assert err.splitlines()[-1] == "m3vit: error: Verilator lint failed for table"


@pytest.mark.parametrize(("argv", "message"), [
    (["--config", "zcu102"], "unknown accelerator config 'zcu102' (choose from zcu104, ci)"),
    (["--design", "mac"], "unknown design 'mac' (choose from top, gemm, layernorm, softmax, "
                          "residual, table, packed)"),
    (["--design", "table", "--all"], "argument --all: not allowed with argument --design"),
])
def test_cli_bad_input_is_one_line(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "generate", "--out", str(tmp_path), *argv)
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("m3vit: error: ") or last.startswith("m3vit generate: error: ")
    assert message in last


def test_cli_refuses_to_overwrite(capsys, tmp_path):
    (tmp_path / "table.v").write_text("// mine\n")
    code, _, err = run(capsys, "generate", "--config", "ci", "--design", "table", "--out",
                       str(tmp_path))
    assert code == 2
    assert err.splitlines()[-1] == (f"m3vit: error: {tmp_path / 'table.v'} exists with "
                                    "different content: pass --force to overwrite it or "
                                    "choose another --out")
    assert run(capsys, "generate", "--config", "ci", "--design", "table", "--out",
               str(tmp_path), "--force")[0] == 0


def test_the_synthesis_target_instantiates_dsp48e2s_and_lints_with_the_model(capsys, tmp_path,
                                                                           monkeypatch):
    # The default folder is per target, so the two forms never replace each other.
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "generate", "--config", "ci", "--design", "packed", "table",
                         "--target", "synthesis", "--lint")
    assert code == 0, err
    folder = tmp_path / "build" / "verilog" / "ci-synthesis"
    packed = (folder / "packed.v").read_text()
    # The CI array: 4 × 8 PEs, two products a DSP.
    assert packed.count("DSP48E2 #(") == CI.n_pe // 2
    assert "lint packed.v: 0 errors, 0 warnings" in out
    assert json.loads((folder / "manifest.json").read_text())["target"] == "synthesis"

    code, _, err = run(capsys, "generate", "--config", "ci", "--design", "packed", "table")
    assert code == 0, err
    plain = tmp_path / "build" / "verilog" / "ci"
    assert "DSP48E2" not in (plain / "packed.v").read_text()
    # Only the designs with a packed array differ between the two forms.
    assert (plain / "table.v").read_text() == (folder / "table.v").read_text()
    assert json.loads((plain / "manifest.json").read_text())["target"] == "simulation"


def test_a_folder_of_the_other_target_is_refused_unless_forced(capsys, tmp_path):
    assert run(capsys, "generate", "--config", "ci", "--design", "table", "--out",
               str(tmp_path))[0] == 0
    code, _, err = run(capsys, "generate", "--config", "ci", "--design", "table", "--out",
                       str(tmp_path), "--target", "synthesis")
    assert code == 2
    assert err.splitlines()[-1] == (f"m3vit: error: {tmp_path} holds Verilog generated for "
                                    "simulation, not synthesis: pass --force to replace it or "
                                    "choose another --out")
    assert run(capsys, "generate", "--config", "ci", "--design", "table", "--out",
               str(tmp_path), "--target", "synthesis", "--force")[0] == 0
    with pytest.raises(M3VitError, match=r"unknown target 'board' \(choose from simulation, "
                                         r"synthesis\)"):
        generate("ci", ["table"], tmp_path, target="board")


@pytest.mark.slow
def test_the_ci_top_generates_and_lints_clean(tmp_path):
    from m3vit.sim.verilator import lint

    report = generate("ci", ["top"], tmp_path)
    assert lint(report.verilog[0].path, "m3vit_top") == []
