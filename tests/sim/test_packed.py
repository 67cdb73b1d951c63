# amaranth: UnusedElaboratable=no
"""Two INT8 products per DSP48E2 (:mod:`m3vit.hw.packed`): the separation's limits checked
exhaustively at the value level, and the cocotb bench in ``tests/sim/packed/``.

The bench top holds three :class:`~m3vit.hw.packed.PackedArray` side by side: the ZCU104
array's K-slice (32 rows in chains of 4) with two DSP columns, the longest chain the
separation allows (7) and chains of one DSP. It is built twice under ``build/sim/packed/``:
in the plain form that every other bench simulates, and in the form synthesis gets
(:data:`m3vit.hw.target.SYNTHESIS`: ``DSP48E2`` instances) on the subset model
``sim/models/dsp48e2.v``; the same cocotb tests check both, to the cycle.
"""

from pathlib import Path

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from m3vit.hw.flow.generate import to_verilog, write_if_changed
from m3vit.hw.packed import MAX_CHAIN, PackedArray, packed_value, split_value
from m3vit.hw.target import SYNTHESIS
from m3vit.sim.verilator import DSP48E2_MODEL

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent / "packed"
BUILD_DIR = REPO_ROOT / "build" / "sim" / "packed"
TOP = "packed_bench"
BENCH_MODULE = "test_packed_dot"
#: (rows, pairs, chain, group) of each instance; ports prefixed ``p<rows>x<pairs>x<chain>``.
SHAPES = [(32, 2, 4, 2), (14, 1, 7, 1), (3, 2, 1, 3)]
#: Test bodies: random vectors, extremes and reloads, each under two flows, per shape.
EXPECTED_TESTS = 3 * 2 * len(SHAPES)


class PackedBenchTop(wiring.Component):
    """The :data:`SHAPES` instances side by side, nothing shared."""

    def __init__(self):
        self._units = {f"p{r}x{p}x{c}": PackedArray(r, p, c, g) for r, p, c, g in SHAPES}
        super().__init__({name: Out(unit.signature) for name, unit in self._units.items()})

    def elaborate(self, platform):
        m = Module()
        for name, unit in self._units.items():
            m.submodules[name] = unit
            wiring.connect(m, wiring.flipped(getattr(self, name)), unit)
        return m


def _packed_sum(pairs: list[tuple[int, int, int]]) -> int:
    """Σ x · pack(w_hi, w_lo) over ``pairs`` of (x, w_hi, w_lo), as the chain computes it."""
    return sum(x * packed_value(hi, lo) for x, hi, lo in pairs)


def _split(total: int) -> tuple[int, int]:
    return split_value(total)


def test_packing_is_the_two_weights_at_bit_18_for_every_pair():
    for hi in range(-128, 128):
        for lo in range(-128, 128):
            assert packed_value(hi, lo) == hi * 2 ** 18 + lo


@pytest.mark.parametrize("chain", range(1, MAX_CHAIN + 1))
def test_every_chain_length_separates_at_the_extremes(chain):
    extremes = [-128, -127, -1, 0, 1, 127]
    for x in extremes:
        for hi in extremes:
            for lo in extremes:
                got = _split(_packed_sum([(x, hi, lo)] * chain))
                assert got == (chain * x * hi, chain * x * lo), (chain, x, hi, lo)


def test_a_chain_of_eight_spills_exactly_at_minus_128_squared():
    """Why MAX_CHAIN is 7: eight −128 × −128 low products reach 2^17."""
    assert _split(_packed_sum([(-128, 0, -128)] * 8)) != (0, 8 * 128 * 128)
    assert _split(_packed_sum([(-128, 0, -128)] * 7 + [(-128, 0, 127)])) == \
        (0, 7 * 128 * 128 - 128 * 127)


@pytest.mark.parametrize("kwargs", [{"rows": 8, "chain": 8}, {"rows": 8, "chain": 0},
                                    {"rows": 10, "chain": 4}, {"rows": 0, "chain": 1},
                                    {"rows": 8, "chain": 4, "pairs": 0},
                                    {"rows": 8, "chain": 4, "group": 4}])
def test_refuses_a_chain_that_could_spill_or_does_not_divide(kwargs):
    with pytest.raises(ValueError, match=r"chain|pairs|group"):
        PackedArray(**{"pairs": 1, **kwargs})


def test_chains_interleave_their_rows_by_group():
    unit = PackedArray(32, 1, 4, group=2)
    assert unit.chain_rows(0) == [0, 2, 4, 6] and unit.chain_rows(1) == [1, 3, 5, 7]
    assert unit.chain_rows(2) == [8, 10, 12, 14]
    assert sorted(r for c in range(unit.n_chains) for r in unit.chain_rows(c)) == list(range(32))
    assert all(unit.position(r) == k for c in range(unit.n_chains)
               for k, r in enumerate(unit.chain_rows(c)))


def test_latency_counts_the_chain_and_the_tree():
    assert PackedArray(32, 1, 4).latency == 1 + 5 + 1 + 3   # x, chain, split, 8 → 1
    assert PackedArray(3, 1, 1).latency == 1 + 2 + 1 + 2


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_packed_bench_passes(cocotb_bench, quick_model_compile):
    verilog = BUILD_DIR / f"{TOP}.v"
    write_if_changed(verilog, to_verilog(PackedBenchTop(), TOP))
    cocotb_bench(module=BENCH_MODULE, bench_dir=BENCH_DIR, top=TOP, verilog=verilog,
                 build_dir=BUILD_DIR / "verilator", passes=EXPECTED_TESTS)


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_packed_bench_passes_on_dsp48e2_instances(cocotb_bench, quick_model_compile):
    """The synthesis form: one DSP48E2 per position, the chains through PCOUT → PCIN."""
    verilog = BUILD_DIR / f"{TOP}_dsp48e2.v"
    text = to_verilog(PackedBenchTop(), TOP, SYNTHESIS)
    assert text.count("DSP48E2 #(") == sum(r * p for r, p, _, _ in SHAPES)
    write_if_changed(verilog, text + DSP48E2_MODEL.read_text())
    cocotb_bench(module=BENCH_MODULE, bench_dir=BENCH_DIR, top=TOP, verilog=verilog,
                 build_dir=BUILD_DIR / "verilator_dsp48e2", passes=EXPECTED_TESTS)


def test_the_synthesis_form_cascades_each_chain_and_packs_in_the_pre_adder():
    text = to_verilog(PackedArray(8, 1, 4), "pk", SYNTHESIS)
    instances = text.split("DSP48E2 #(")[1:]
    assert len(instances) == 8
    # Position 0 of each chain adds nothing (Z = 0), the others add PCIN (Z = 001).
    assert sum("OPMODE(9'h005)" in i for i in instances) == 2
    assert sum("OPMODE(9'h015)" in i for i in instances) == 6
    assert all('AMULTSEL("AD")' in i and "INMODE(5'h04)" in i for i in instances)
    assert text.count(".PCIN(48'h000000000000)") == 2


def test_signal_widths_hold_the_longest_sum():
    unit = PackedArray(32, 32, 4)
    # 32 products of 128 · 128 = 2^19: 21 bits signed; 64 columns on 32 × 32 DSPs.
    assert unit.sum_bits >= 21
    assert unit.y.shape().length == 64
