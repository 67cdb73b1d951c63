"""The accelerator engine (``m3vit.hw.engine``, ``m3vit.hw.top``): ZCU104 lint and the cocotb
program benches.

The benches run programs on the CI configuration (4 × 4 array), each bit-exact:
``tests/sim/top/test_engine.py`` random GEMMs of every mode and weight source, the vector
instructions, strided LOAD/STORE, every bad-program error code, attention, embedding and
head, and a whole dense ``tiny`` ViT block; ``tests/sim/top/test_moe_engine.py`` the MoE
expert scheduler (routing patterns for 4, 16 and 64 experts under both schedules, the
``tiny`` MoE layer and block, the whole ``tiny`` model with task switches, with a read
monitor); ``tests/sim/top/test_accelerator.py`` the top through real AXI. Each module has
its own Verilator build (~2-3 min at -O1 on the 2-core machine), so they run side by side.
"""

import functools
from pathlib import Path

import pytest

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.engine import Engine
from m3vit.hw.flow.generate import to_verilog, write_if_changed
from m3vit.hw.top import AcceleratorTop
from m3vit.sim.verilator import lint

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent / "top"
BUILD_DIR = REPO_ROOT / "build" / "sim" / "top"
#: cocotb module → tests it must report passed.
BENCHES = {"test_engine": 9, "test_moe_engine": 9, "test_accelerator": 5}
#: cocotb module → (top, component, build folder)
TOPS = {"test_engine": ("engine", Engine, "engine"),
        "test_moe_engine": ("engine", Engine, "engine_moe"),
        "test_accelerator": ("m3vit_accel", AcceleratorTop, "m3vit_accel")}


@functools.cache
def bench_verilog(module: str) -> tuple[str, Path]:
    """The top of ``module``'s bench and its Verilog (CI configuration)."""
    top, component, folder = TOPS[module]
    path = BUILD_DIR / folder / f"{top}.v"
    write_if_changed(path, to_verilog(component(CI), top))
    return top, path


@pytest.mark.slow
@pytest.mark.parametrize("module", BENCHES)
def test_programs_run_bit_exactly(module, quick_model_compile, cocotb_bench):
    top, verilog = bench_verilog(module)
    cocotb_bench(module=module, bench_dir=BENCH_DIR, top=top, verilog=verilog,
                 build_dir=verilog.parent / "verilator", config=CI, passes=BENCHES[module])


def test_zcu104_accelerator_elaborates_and_lints_clean(tmp_path):
    path = tmp_path / "m3vit_accel.v"
    path.write_text(to_verilog(AcceleratorTop(ZCU104), "m3vit_accel"))
    assert lint(path, "m3vit_accel") == []
