"""Every bad program stops the ISA model where it stops the hardware.

``m3vit.sw.bench.programs.bad_program_cases`` is the one list: the engine bench
(``tests/sim/top/test_engine.py``) runs each case on the RTL and asserts its error code and
pc, and compares them with the ISA model's; here the model runs each case on its own, on
both configurations, so a change to a check shows up without a simulator.
"""

import pytest

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.isa import Opcode
from m3vit.hw.isa_checks import SHAPE_BOUNDS
from m3vit.hw.registers import ErrorCode
from m3vit.sw.bench.programs import bad_program_cases, model_stop

CONFIGS = {"ci": CI, "zcu104": ZCU104}


@pytest.mark.parametrize("config", CONFIGS)
def test_every_bad_program_stops_the_model_with_its_code_at_its_pc(config):
    cfg = CONFIGS[config]
    wrong = []
    for case in bad_program_cases(cfg):
        got = model_stop(cfg, case)
        if got != (case.error, case.error_pc):
            wrong.append(f"{case.name}: model {got}, hardware {(case.error, case.error_pc)}")
    assert not wrong, "\n".join(wrong)


def test_the_list_covers_every_error_code_and_every_bounded_opcode():
    cases = bad_program_cases(CI)
    codes = {case.error for case in cases}
    assert codes == set(ErrorCode) - {ErrorCode.NONE, ErrorCode.ABORTED,
                                      ErrorCode.AXI_RESPONSE}
    assert len({case.name for case in cases}) == len(cases)
    names = " ".join(case.name for case in cases)
    for op in SHAPE_BOUNDS:
        assert op.name.lower() in names or op in (Opcode.LOAD, Opcode.STORE), op


def test_model_stop_reports_a_run_that_ends():
    good = bad_program_cases(CI)[0]
    good.program = good.program[:32] + good.program[64:]   # drop the illegal word
    assert model_stop(CI, good) == (ErrorCode.NONE, 0)
