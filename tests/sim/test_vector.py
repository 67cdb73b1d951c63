"""The vector unit (``m3vit.hw.vector``): elaboration, ZCU104 lint and the cocotb benches.

The four blocks are verified by four cocotb benches (``tests/sim/{layernorm,softmax,residual,
table}/``) against one Verilated top, :class:`VectorBenchTop`, which places the blocks side
by side with their ports prefixed: one Verilator build per configuration serves all four
benches (a build costs ~40 s on the 2-core CI machine, the simulations a few seconds each).
The benches run on the CI configuration (4 lanes) and on an 8-lane one whose ``max_tokens``
admits the ``edge-moe`` softmax row of 129; the ZCU104 configuration (32 lanes) is elaborated
and linted only.
"""

import functools
import gc
import warnings
from pathlib import Path

import pytest
from amaranth.hdl import Fragment, Module, UnusedElaboratable
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from m3vit.hw.config import CI, ZCU104, AccelConfig
from m3vit.hw.flow.generate import signature_ports, to_verilog, write_if_changed
from m3vit.hw.vector import LayerNormUnit, ResidualAdd, SoftmaxUnit, TableLookup
from m3vit.sim.verilator import lint

REPO_ROOT = Path(__file__).resolve().parents[2]
SIM_DIR = Path(__file__).resolve().parent
BUILD_DIR = REPO_ROOT / "build" / "sim" / "vector"
TOP = "vector_bench"

#: 8 lanes, and room for a 129-token softmax row (17 beats, one real lane in the last).
LANES8 = CI.replace(pe_rows=8, pe_cols=8, max_tokens=136)
CONFIGS = {"lanes4": CI, "lanes8": LANES8}
UNITS = {"ln": LayerNormUnit, "sm": SoftmaxUnit, "res": ResidualAdd, "tab": TableLookup}
#: bench folder → (cocotb module, test count it must report passed on every configuration)
BENCHES = {
    "layernorm": ("test_layernorm", 13),
    "softmax": ("test_softmax", 21),
    "residual": ("test_residual", 9),
    "table": ("test_table", 13),
}


#: Exp-table entries per beat of the bench's softmax unit: the engine's writes several.
SOFTMAX_TABLE_ENTRIES = 4


class VectorBenchTop(wiring.Component):
    """The four vector blocks side by side, ports prefixed ``ln``, ``sm``, ``res``, ``tab``.

    Exists only so that one Verilator build serves every vector bench; the blocks share
    nothing (each has its own clock-domain logic, ``busy`` and counters).

    Parameters
    ----------
    cfg : AccelConfig
        The configuration every block is built for.
    """

    def __init__(self, cfg: AccelConfig):
        self._layernorm = LayerNormUnit(cfg)
        self._softmax = SoftmaxUnit(cfg, table_entries=SOFTMAX_TABLE_ENTRIES)
        self._residual = ResidualAdd(cfg)
        self._table = TableLookup(cfg)
        super().__init__({
            "ln": Out(self._layernorm.signature),
            "sm": Out(self._softmax.signature),
            "res": Out(self._residual.signature),
            "tab": Out(self._table.signature),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.layernorm = self._layernorm
        m.submodules.softmax = self._softmax
        m.submodules.residual = self._residual
        m.submodules.table = self._table
        wiring.connect(m, wiring.flipped(self.ln), self._layernorm)
        wiring.connect(m, wiring.flipped(self.sm), self._softmax)
        wiring.connect(m, wiring.flipped(self.res), self._residual)
        wiring.connect(m, wiring.flipped(self.tab), self._table)
        return m


@functools.cache
def bench_verilog(name: str) -> Path:
    """The bench top's Verilog for configuration ``name``, rewritten only when it changes
    (converted once per pytest process: ~3 s each)."""
    path = BUILD_DIR / name / f"{TOP}.v"
    write_if_changed(path, to_verilog(VectorBenchTop(CONFIGS[name]), TOP))
    return path


def test_ports_are_named_from_the_signatures():
    expected = {
        "ln": {"cmd", "x", "params", "y"},
        "sm": {"cmd", "logits", "table", "probs"},
        "res": {"cmd", "a", "b", "y"},
        "tab": {"i", "o", "table"},
    }
    top = VectorBenchTop(CI)
    ports = set(signature_ports(top))
    Fragment.get(top, None)  # elaborated, so Amaranth does not warn about unused blocks

    for prefix, streams in expected.items():
        names = {f"{prefix}__{s}__{m}" for s in streams for m in ("valid", "ready", "payload")}
        names |= {f"{prefix}__busy", f"{prefix}__busy_cycles"}
        assert {p for p in ports if p.startswith(f"{prefix}__")} == names


def assert_refused(build, error, match):
    """``pytest.raises`` around a constructor, with the half-built component it leaves
    behind collected here, so Amaranth's "created but never used" warning does not surface
    in a later test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(error, match=match):
            build()
        gc.collect()


@pytest.mark.parametrize("unit", UNITS.values(), ids=UNITS.keys())
def test_units_refuse_a_non_config(unit):
    assert_refused(lambda: unit({"pe_cols": 4}), TypeError, "AccelConfig")


def test_layernorm_refuses_a_dimension_beyond_the_variance_width():
    big = ZCU104.replace(max_dim=8192, max_hidden=8192)
    assert_refused(lambda: LayerNormUnit(big), ValueError, r"max_dim.*8192")


def test_softmax_refuses_fewer_than_four_lanes():
    # An attention row's scale is three lanes (M's two bytes and sh).
    assert_refused(lambda: SoftmaxUnit(CI.replace(pe_rows=2, pe_cols=2)), ValueError,
                   "pe_cols >= 4")


def test_payload_widths_follow_the_config():
    ln = LayerNormUnit.param_layout(ZCU104)
    assert ln["gain"].shape.length == 32 and ln["bias"].shape.elem_shape.width == 64
    assert LayerNormUnit.cmd_layout(ZCU104)["beats"].shape.width == 4  # 384 / 32 = 12
    assert SoftmaxUnit.cmd_layout(ZCU104)["length"].shape.width == 11  # 1024 tokens
    assert SoftmaxUnit.cmd_layout(ZCU104)["mult"].shape.width == 16
    assert SoftmaxUnit.cmd_layout(ZCU104)["shift"].shape.width == 6
    assert ResidualAdd.cmd_layout(CI)["beats"].shape.width == 11  # 80 · 64 / 4 = 1280


@pytest.mark.parametrize("unit", UNITS.values(), ids=UNITS.keys())
def test_zcu104_unit_elaborates_and_lints_clean(unit, tmp_path):
    top = unit.__name__.lower()
    path = tmp_path / f"{top}.v"
    path.write_text(to_verilog(unit(ZCU104), top))

    assert lint(path, top) == []


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bench", BENCHES)
def test_vector_bench_passes(bench, config, quick_model_compile, cocotb_bench):
    module, count = BENCHES[bench]
    cocotb_bench(module=module, bench_dir=SIM_DIR / bench, top=TOP,
                 verilog=bench_verilog(config), build_dir=BUILD_DIR / config / "verilator",
                 config=CONFIGS[config], passes=count)
