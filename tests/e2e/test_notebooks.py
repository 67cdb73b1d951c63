"""The PYNQ notebooks run headless on the simulated CI board and save their plots.

Each notebook under ``notebooks/`` is executed by nbclient in an ipykernel of this venv, from
the repository root, with ``M3VIT_BACKEND=sim`` and ``M3VIT_NOTEBOOK_OUT`` pointing at a
temporary folder. The notebooks assert on their own results (bit-exact heads, zero bytes moved
by a task switch, identical outputs under both MoE schedules), so a failed check fails the
cell; here every cell must run without error and every figure must be a real picture.

The quickstart compiles a ``.m3q`` written here (the file path of the notebooks); the other
two get no package and make the stand-in themselves, so nothing depends on ``runs/``.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from m3vit.sw.errors import M3VitError
from m3vit.sw.runtime.notebook import BACKEND_ENV, OUT_ENV, choose_backend, output_dir

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
#: Notebook → the figures it must save.
FIGURES = {
    "01_quickstart.ipynb": ["quickstart_tasks.png", "quickstart_example.png"],
    "02_task_switching.ipynb": ["task_switch_runs.png", "task_switch_cost.png"],
    "03_scheduler.ipynb": ["scheduler_cycles_ddr.png", "scheduler_batches.png"],
}
#: Per cell; the first notebook to run may build the CI SoC model (a few minutes).
CELL_TIMEOUT_S = 1800


def test_every_notebook_is_listed_and_stored_without_outputs():
    """The repository holds the notebooks as source: no outputs, no execution counts."""
    import nbformat

    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)
    for name in FIGURES:
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(book)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert code, name
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{name}: clear its outputs before committing"
        assert any(f'os.environ.get("{BACKEND_ENV}"' in c.source for c in code), name


def test_backend_choice(monkeypatch, tmp_path):
    """``auto`` falls back to the simulator here; unknown names are refused in one line."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert choose_backend() == "sim"  # no FPGA device on a CI machine
    assert choose_backend(" SIM ") == "sim" and choose_backend("pynq") == "pynq"
    monkeypatch.setenv(BACKEND_ENV, "board")
    with pytest.raises(M3VitError, match="unknown backend 'board'") as e:
        choose_backend()
    assert "\n" not in str(e.value)
    monkeypatch.setenv(OUT_ENV, str(tmp_path / "figs"))
    assert output_dir() == tmp_path / "figs" and (tmp_path / "figs").is_dir()


def test_prepare_package_sources_and_refusals(tmp_path):
    """``M3X`` with its ``.m3q``; the ``.m3q`` alone, compiled for the answering hardware;
    a stand-in; and a one-line refusal for a missing ``.m3x``, a ``.m3q`` that is not the
    ``.m3x``'s source, and a bitstream of unknown configuration."""
    from types import SimpleNamespace

    from m3vit.hw.config import CI
    from m3vit.sw.compiler.executable import compile_executable
    from m3vit.sw.model.config import get_preset
    from m3vit.sw.model.m3vit import M3ViT
    from m3vit.sw.quant.package import save_package
    from m3vit.sw.quant.quantize import quantize
    from m3vit.sw.runtime.notebook import prepare_package

    ci_board = SimpleNamespace(config_hash=CI.config_hash(), board=SimpleNamespace(name="sim"))
    pkgs = [quantize(M3ViT(get_preset("tiny"), seed=s), n_calib=2) for s in (0, 1)]
    m3q = [save_package(tmp_path / f"m{s}.m3q", p) for s, p in enumerate(pkgs)]
    m3x = compile_executable(pkgs[0], CI).save(tmp_path / "m0.ci.m3x")

    given = prepare_package(ci_board, m3x=m3x, m3q=m3q[0])
    assert given.reference is not None and given.compiled.program == \
        compile_executable(pkgs[0], CI).program and str(m3x) in given.source
    assert prepare_package(ci_board, m3x=m3x, m3q="").reference is None
    from_m3q = prepare_package(ci_board, m3q=m3q[1])
    assert from_m3q.compiled.config_hash == CI.config_hash()
    assert from_m3q.compiled.image == compile_executable(pkgs[1], CI).image
    stand_in = prepare_package(ci_board, m3q=tmp_path / "missing.m3q")
    assert stand_in.source.startswith("stand-in") and stand_in.reference is not None

    errors = []
    for attempt in (lambda: prepare_package(ci_board, m3x=tmp_path / "none.m3x"),
                    lambda: prepare_package(ci_board, m3x=m3x, m3q=m3q[1]),
                    lambda: prepare_package(SimpleNamespace(
                        config_hash=0x1234, board=SimpleNamespace(name="pynq")), m3q=m3q[0])):
        with pytest.raises(M3VitError) as e:
            attempt()
        errors.append(str(e.value))
    assert "no such file" in errors[0]
    assert "is not the package" in errors[1] and "compiled from" in errors[1]
    assert "config 0x00001234" in errors[2] and "zcu104, ci" in errors[2]
    assert all("\n" not in message for message in errors)


def test_example_picture_is_what_its_documented_command_makes(tmp_path):
    """``notebooks/example.png`` comes from the one command in ``notebooks/README.md``: run
    it again and compare the pixels."""
    import shlex

    from PIL import Image

    from m3vit.sw.cli import main

    example = "notebooks/example.png"
    lines = [line for line in (NOTEBOOKS / "README.md").read_text().splitlines()
             if "m3vit scenes" in line and example in line]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])[1:]   # without the .venv/bin/m3vit
    argv[argv.index(example)] = str(tmp_path / "example.png")
    assert main(argv) == 0
    made, kept = Image.open(tmp_path / "example.png"), Image.open(ROOT / example)
    assert kept.mode == "RGB" and kept.size == (320, 240)
    assert np.array_equal(np.asarray(made), np.asarray(kept))


def _run_notebook(path: Path) -> None:
    import nbclient
    import nbformat

    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        book, kernel_name="python3", timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{e}")
    failed = [c for c in book.cells if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.outputs)]
    assert not failed, f"{path.name}: cells with errors: {[c.source[:60] for c in failed]}"


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_on_the_simulator_and_saves_its_plots(name, tmp_path, monkeypatch):
    from matplotlib.image import imread

    from m3vit.sw.model.config import get_preset
    from m3vit.sw.model.m3vit import M3ViT
    from m3vit.sw.quant.package import save_package
    from m3vit.sw.quant.quantize import quantize
    from m3vit.sw.runtime.notebook import STAND_IN_CALIBRATION_IMAGES

    out = tmp_path / "figures"
    m3q = ""
    if name.startswith("01_"):
        pkg = quantize(M3ViT(get_preset("tiny"), seed=1), n_calib=STAND_IN_CALIBRATION_IMAGES)
        m3q = str(save_package(tmp_path / "tiny.m3q", pkg))
    for var, value in {
        BACKEND_ENV: "sim", OUT_ENV: str(out), "M3VIT_M3Q": m3q, "M3VIT_M3X": "",
        # The venv's own kernelspec first, whatever a user's Jupyter folder holds; its
        # "python" is this interpreter (jupyter_client substitutes sys.executable).
        "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter"),
        # Two xdist workers on two cores: one OpenMP thread in the kernel too (conftest.py).
        "OMP_NUM_THREADS": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }.items():
        monkeypatch.setenv(var, value)
    _run_notebook(NOTEBOOKS / name)
    for figure in FIGURES[name]:
        path = out / figure
        assert path.is_file(), f"{name} did not save {figure}"
        assert path.stat().st_size > 10_000, f"{figure}: {path.stat().st_size} bytes"
        pixels = imread(os.fspath(path))
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400, pixels.shape
        # Not a blank canvas: many distinct colours (bars, maps, text).
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50, figure
