"""Differential program fuzzing (issue #18): damaged programs give the same outcome on the
ISA model and on the RTL (the Verilated CI SoC model) — the same error code at the same pc,
or the same DDR window byte for byte — and the model's semantics the fuzzer pinned down."""

import numpy as np
import pytest
import torch

from m3vit.hw.config import CI
from m3vit.hw.isa import GemmMode, Opcode, WeightSource
from m3vit.sw.bench import programs as P
from m3vit.sw.bench.program_fuzz import fuzz_programs, make_case, model_outcome
from m3vit.sw.compiler.isa_model import _gemm_params, _wrap32


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_damaged_programs_agree_on_the_model_and_the_rtl():
    stats = fuzz_programs(CI, 300, seed=7)
    assert stats.mismatches == []
    assert stats.total == 300 and set(stats.cases) == {"legal", "field", "opcode", "no_end",
                                                      "long_loop", "flip"}
    # Both kinds of ending are exercised: runs to END and every controller error.
    assert stats.outcomes["NONE"] > 100
    assert {"ILLEGAL_OPCODE", "SHAPE_OVER_CAPACITY", "ADDRESS_OUT_OF_RANGE"} <= set(
        stats.outcomes)
    assert stats.unspecified < 15


def test_cases_are_reproducible_from_the_seed():
    a, b = make_case(CI, 3, 11), make_case(CI, 3, 11)
    assert a[0].program == b[0].program and a[1:] == b[1:]
    assert make_case(CI, 4, 11)[0].program != a[0].program


def test_the_shift_byte_has_six_bits_and_bias_wraps_at_32_bits():
    rec = np.zeros((1, 8), np.uint8)
    rec[0, 6] = 64 + 5
    assert int(_gemm_params(rec.tobytes(), 1)[2][0]) == 5
    assert _wrap32(torch.tensor([2**31, -(2**31) - 1, 7])).tolist() == [-(2**31), 2**31 - 1, 7]


def test_a_ddr_offset_inside_a_beat_reads_the_whole_beat():
    case = P.strided_load_store_case(CI, 1)
    raw = bytearray(case.program)
    P._set_field(raw, 0, Opcode.LOAD, "ddr", 1)   # the case's first LOAD reads from 0
    shifted = P.Case("x", bytes(raw), case.ddr)
    assert model_outcome(CI, shifted)[2] == model_outcome(CI, case)[2]


def test_results_written_twice_in_one_gemm_are_unspecified():
    case = P.gemm_case(CI, 5, 30, 1, 1, GemmMode.INT8, WeightSource.DDR)
    raw = bytearray(case.program)
    gemm = next(i for i in range(len(raw) // 32) if raw[32 * i] == Opcode.GEMM.value)
    P._set_field(raw, gemm, Opcode.GEMM, "dst_stride", 1)   # tiles' rows fall on each other
    assert model_outcome(CI, P.Case("x", bytes(raw), case.ddr))[3] is True
    assert model_outcome(CI, case)[3] is False
