# amaranth: UnusedElaboratable=no
"""The GEMM engine (:mod:`m3vit.hw.gemm`): cocotb + Verilator benches and the ZCU104 lint.

The bench in ``tests/sim/gemm/`` runs on six small engines, each one Verilator build under
``build/sim/gemm/``: 4 × 4 (``max_tokens`` 80), an 8 × 4 one with ``max_tokens`` 129 (the
``edge-moe`` token count), a 2 × 8 one (one multiplier per PE), the only shape whose
weight tiles load fast enough to reach the accumulator hazard and the parameter hand-over
between back-to-back N-tiles, a 4 × 8 one (wider than deep), each with results one word
per array row, and the CI configuration's 4 × 8 array whose rows leave as two 4-lane words
(``gemm_words=2``, as the ZCU104's 32 × 64 array's leave as two 32-byte words), built
twice: fed one weight row and one parameter record a beat, and with the CI top's intake
(:func:`~m3vit.hw.engine.router.intake_shape`: two rows, two records and 16 table entries
a beat: several rows a beat and several beats a tile, as the ZCU104 top takes four 64-byte
rows and 32 records from each 256-byte read entry, which
:mod:`m3vit.sw.bench.gemm_utilization` measures), the latter also in the form
synthesis gets (``4x8w2-top-dsp48e2``: the packed array's ``DSP48E2`` instances on the
subset model ``sim/models/dsp48e2.v``, :mod:`m3vit.hw.target`). The arrays
with ``pe_rows ≤ gemm_cols`` also run passes with transposed (column-order) weight tiles;
on the 8 × 4 such a command is checked to be illegal. Those with ``pe_rows ≥ 4`` run
``row_scale`` passes (per-token requantization, attention's P·V) among the other modes; on
the 2 × 8 every ``row_scale`` command is checked to be illegal. The ZCU104 configuration (32 × 64)
is only elaborated and linted here; its utilization is measured by
:mod:`m3vit.sw.bench.gemm_utilization` (``make bench``, not CI).
"""

import re
from pathlib import Path

import pytest

from m3vit.hw.config import CI, ZCU104, AccelConfig
from m3vit.hw.engine.router import intake_shape
from m3vit.hw.flow.generate import to_verilog, write_if_changed
from m3vit.hw.gemm import GemmEngine, Requantizer
from m3vit.hw.target import SYNTHESIS
from m3vit.sim.verilator import DSP48E2_MODEL, lint

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent / "gemm"
BUILD_DIR = REPO_ROOT / "build" / "sim" / "gemm"
TOP = "gemm_engine"
BENCH_MODULE = "test_gemm_engine"

BENCH_CONFIGS = {
    "4x4": CI.replace(gemm_words=1),
    "8x4": CI.replace(pe_rows=8, pe_cols=4, max_tokens=129, gemm_words=1),
    # Only with two rows does a weight tile load (pe_rows cycles) fast enough for the
    # accumulator hazard and the parameter hand-over between N-tiles to bind.
    "2x8": CI.replace(pe_rows=2, pe_cols=8, gemm_words=1),
    # Wider than deep, as the 2,048-MAC engine (32 x 64 on 1,024 DSPs): column order too.
    "4x8": CI.replace(pe_cols=8, gemm_words=1),
    # The CI top's engine: a 4 x 8 array whose rows leave as two 4-lane words, as the
    # ZCU104's 32 x 64 array's leave as two 32-byte words.
    "4x8w2": CI,
    # The same, fed as the CI top feeds it (BENCH_ENGINE_ARGS): several rows and records
    # a beat, the intake the utilization benchmark measures on the ZCU104's engine.
    "4x8w2-top": CI,
    # The same engine in the form synthesis gets: DSP48E2 instances, on their model.
    "4x8w2-top-dsp48e2": CI,
}

#: Constructor arguments other than the configuration, per bench: one bench loads the
#: output table several entries a beat; one keeps a multiplier per PE (the others pack two
#: products per DSP, the default); one takes the CI top's intake, two weight rows (or
#: columns), two parameter records and 16 table entries a beat, as the top's read router
#: hands an entry over (the ZCU104's: four 64-byte rows and 32 records from 256 bytes).
_CI_INTAKE = intake_shape(CI)
BENCH_ENGINE_ARGS = {
    "8x4": {"table_entries": 4},
    "2x8": {"dsp_products": 1},
    "4x8w2-top": {"rows_per_beat": _CI_INTAKE.rows_per_beat,
                  "params_per_beat": _CI_INTAKE.params_per_beat,
                  "table_entries": _CI_INTAKE.gemm_table_entries},
}
BENCH_ENGINE_ARGS["4x8w2-top-dsp48e2"] = BENCH_ENGINE_ARGS["4x8w2-top"]
#: Benches built in the synthesis form (:data:`m3vit.hw.target.SYNTHESIS`).
SYNTHESIS_BENCHES = {"4x8w2-top-dsp48e2"}


def expected_tests(config: AccelConfig) -> int:
    """Tests the bench runs on ``config``.

    8 shapes × 4 modes (INT8, INT8_TABLE, INT32, INT16) × 2 flows × the weight orders
    (column order too when pe_rows <= pe_cols), then 2 flows each of back-to-back passes,
    alternating weight orders, one interleaved parameter/weight source and row_scale
    passes among the other modes, and 3 single tests (illegal commands, illegal row_scale
    commands, one token per cycle).
    """
    orders = 2 if config.pe_rows <= config.pe_cols else 1
    return 8 * 4 * 2 * orders + 4 * 2 + 3


def write_verilog(config: AccelConfig, build_dir: Path, platform=None, **kwargs) -> Path:
    """The engine's Verilog under ``build_dir``, rewritten only when it changes; for
    ``platform=SYNTHESIS`` followed by the DSP48E2 model its instances run on."""
    path = build_dir / f"{TOP}.v"
    text = to_verilog(GemmEngine(config, **kwargs), TOP, platform)
    if platform is SYNTHESIS:
        text += DSP48E2_MODEL.read_text()
    write_if_changed(path, text)
    return path


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
@pytest.mark.parametrize("name", list(BENCH_CONFIGS))
def test_gemm_engine_bench_passes(name, cocotb_bench):
    config = BENCH_CONFIGS[name]
    build_dir = BUILD_DIR / name
    platform = SYNTHESIS if name in SYNTHESIS_BENCHES else None
    cocotb_bench(module=BENCH_MODULE, bench_dir=BENCH_DIR, top=TOP,
                 verilog=write_verilog(config, build_dir, platform,
                                       **BENCH_ENGINE_ARGS.get(name, {})),
                 build_dir=build_dir / "verilator",
                 config=config, passes=expected_tests(config))


@pytest.mark.slow
def test_zcu104_engine_elaborates_and_lints_clean():
    verilog_path = write_verilog(ZCU104, BUILD_DIR / "zcu104")
    text = verilog_path.read_text()

    # Lint raises on any %Error; warnings (none expected) are returned.
    assert lint(verilog_path, TOP) == []
    assert f"module {TOP}(" in text
    # The 32 × 64 array on 1,024 multiplies of 8 × 27 bits (a DSP48E2 each): two products
    # per DSP, the M register of each chain position.
    packed = re.findall(r"^\s*reg (?:signed )?\[34:0\] p\d+_chain\d+_m\d ", text, re.M)
    assert len(packed) == ZCU104.n_pe // 2


@pytest.mark.slow
def test_zcu104_engine_synthesis_form_has_a_dsp48e2_a_pair_and_lints_clean():
    """What the estimate and Vivado get: the 1,024 packed DSPs as instances, whose ports
    and widths Verilator checks against the model."""
    verilog_path = write_verilog(ZCU104, BUILD_DIR / "zcu104-dsp48e2", SYNTHESIS)
    text = verilog_path.read_text()
    assert lint(verilog_path, TOP) == []
    assert len(re.findall(r"^\s+DSP48E2 #\(", text, re.M)) == ZCU104.n_pe // 2
    assert not re.search(r"\[34:0\] p\d+_chain\d+_m\d ", text)


def test_the_top_intake_bench_feeds_several_rows_and_records_a_beat():
    # Otherwise the "4x8w2-top" bench tests nothing the "4x8w2" one does not.
    args = BENCH_ENGINE_ARGS["4x8w2-top"]
    assert args["rows_per_beat"] == 2 and args["params_per_beat"] > 1
    # As the ZCU104's engine in the top: several rows a beat, several beats a tile.
    top = intake_shape(ZCU104).rows_per_beat
    assert top > 1 and ZCU104.pe_rows // top > 1 and CI.pe_rows // args["rows_per_beat"] > 1


def test_engine_geometry_follows_the_config():
    engine = GemmEngine(ZCU104)

    # Two products per DSP: chains of 4 (M, 4 P registers), the separation, 3 tree levels.
    assert engine.dsp_products == 2 and engine.chain == 4
    assert engine.tree_latency == 5 + 1 + 3 - 1
    # One multiplier per PE: 5 adder levels, a register every two and at the root.
    assert GemmEngine(ZCU104, dsp_products=1).tree_latency == 3
    assert engine.hazard_cycles == 4
    # Enough credits to take one token per cycle with no back-pressure: rows (the row
    # queue also holds half a 129-token slice's rows, which leave as two words each) and
    # words (splitter to the word queue's output).
    assert engine.words == 2
    assert engine.row_queue_depth >= max(64, engine._acc_stage + 4)
    assert engine.queue_depth >= Requantizer.latency + 6
    assert GemmEngine(ZCU104.replace(gemm_words=1)).row_queue_depth >= engine._acc_stage + 4
    assert engine.weights.payload.shape().length == 1  # one row a beat by default
    # A row of the 32 x 64 array is 64 lanes; a result word 32.
    assert engine.weights.payload.shape().elem_shape.length == ZCU104.gemm_cols == 64
    assert engine.activations.payload.shape().length == ZCU104.pe_rows
    assert engine.results.payload.shape().size == 32 * ZCU104.pe_cols
    # Eight 8-byte parameter records of a 64-byte entry; two rows a beat allowed.
    wide = GemmEngine(ZCU104, rows_per_beat=2, params_per_beat=8)
    assert wide.weights.payload.shape().length == 2
    assert wide.params.payload.shape().length == 8
    # The output table a word of T entries at a time.
    assert GemmEngine(ZCU104, table_entries=16).table.payload.shape().length == 16


@pytest.mark.parametrize("kwargs", [{"rows_per_beat": 3}, {"rows_per_beat": 64},
                                    {"params_per_beat": 0}, {"params_per_beat": 128},
                                    {"table_entries": 3}, {"table_entries": 512},
                                    {"dsp_products": 3}])
def test_engine_rejects_beats_that_do_not_divide_the_array(kwargs):
    with pytest.raises(ValueError, match=r"per_beat|table_entries|dsp_products"):
        GemmEngine(ZCU104, **kwargs)


def test_engine_rejects_a_non_config():
    with pytest.raises(TypeError, match="AccelConfig"):
        GemmEngine({"pe_rows": 4})
