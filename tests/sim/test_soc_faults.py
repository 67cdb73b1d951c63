"""Faults on the AXI bus (issue #18): what the DDR model injects (``m3vit.sim.soc.DdrFaults``)
and what the accelerator and the runtime make of it, on the CI SoC model.

Raw programs (``m3vit.sw.bench.programs``) show the hardware's side cycle by cycle; the
``tiny`` model on 16 × 16 images under the runtime (``m3vit.sw.bench.bus_faults``, the
harness of ``bench faults``) shows the driver's. Every fault is seeded: a failure names the
seed or index that produced it, and rerunning gives the same run.
"""

import pytest
from test_soc import SMALL_DDR, offset, run_case, start  # the raw host of test_soc.py

from m3vit.hw.axi import AxiResp
from m3vit.hw.config import CI
from m3vit.hw.errors import M3VitError
from m3vit.hw.isa import GemmMode, WeightSource
from m3vit.hw.registers import REGISTER_MAP, ErrorCode, Schedule
from m3vit.sim.soc import DdrFaults, SocModel
from m3vit.sw.bench.bus_faults import (
    FaultBench,
    FaultPlan,
    instructions_at,
    markdown,
    summarise,
)
from m3vit.sw.bench.programs import Case, dense_block_case, gemm_case, moe_layer_case
from m3vit.sw.runtime.board import SimBoard
from m3vit.sw.runtime.driver import ABORT_GRACE_CYCLES, Accelerator

STATUS = REGISTER_MAP["STATUS"]
#: The counters every channel's injected slowdown shows up in.
CHANNELS = ("fault_ar_stalls", "fault_aw_stalls", "fault_w_stalls", "fault_r_gaps",
            "fault_b_gaps", "fault_delay_cycles")


def test_fault_arguments_are_one_line_errors():
    for bad, match in ((dict(ar_stall=1.0), "ar_stall"), (dict(r_gap=-0.1), "r_gap"),
                       (dict(read_jitter=-1), "read_jitter"), (dict(seed=-1), "seed"),
                       (dict(read_error_beat=-1), "read_error_beat"),
                       (dict(hang_read_burst=1.5), "hang_read_burst"),
                       (dict(error_resp=AxiResp.OKAY), "SLVERR or DECERR"),
                       (dict(error_resp=1), "SLVERR or DECERR")):
        with pytest.raises(M3VitError, match=match):
            DdrFaults(**bad)
    assert DdrFaults(error_resp=3).error_resp is AxiResp.DECERR
    assert not DdrFaults().active and not DdrFaults(seed=7).active
    assert DdrFaults(hang_read_burst=0).active and DdrFaults.jitter(7).active
    jitter = DdrFaults.jitter(7, latency=9, stall=0.5)
    assert (jitter.read_jitter, jitter.write_jitter, jitter.w_stall, jitter.b_gap) == \
        (9, 9, 0.5, 0.5)


@pytest.fixture(scope="module")
def soc():
    with SocModel(CI, ddr_bytes=SMALL_DDR) as model:
        yield model


@pytest.fixture(scope="module")
def cases():
    """The dense block and a MoE layer under both schedules: every kind of DDR stream."""
    return [dense_block_case(CI), moe_layer_case(CI, schedule=Schedule.EXPERT_BY_EXPERT.value),
            moe_layer_case(CI, schedule=Schedule.TOKEN_BY_TOKEN.value)]


def delta(soc: SocModel, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in soc.stats.items()}


@pytest.mark.parametrize("case_index", [0, 1, 2], ids=["dense", "moe_ebe", "moe_tbt"])
@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_jitter_on_every_channel_is_bit_exact_and_reproducible(soc, cases, case_index):
    """Random latency and back-pressure on all five channels: the same DDR contents, more
    cycles, every channel slowed; the same seed gives the same run to the cycle; faults off
    give the clean run's cycles again."""
    case = cases[case_index]
    soc.faults = DdrFaults()
    clean = run_case(soc, case)[1]
    runs, slowed = {}, dict.fromkeys(CHANNELS, 0)
    for seed, latency, stall in ((1, 16, 0.1), (2, 64, 0.3), (3, 256, 0.5), (1, 16, 0.1)):
        soc.faults = DdrFaults.jitter(seed, latency=latency, stall=stall)
        before = soc.stats
        code, cycles = run_case(soc, case)   # checks the DDR contents
        counts = delta(soc, before)
        assert code == ErrorCode.NONE and cycles > clean, (seed, code, cycles, clean)
        assert counts["read_errors"] == counts["write_errors"] == counts["protocol_errors"] \
            == 0, (seed, counts)
        run = (cycles, {k: counts[k] for k in CHANNELS})
        assert runs.setdefault(seed, run) == run, f"seed {seed} ran differently the second time"
        for k in CHANNELS:
            slowed[k] += counts[k]
    assert all(slowed.values()), slowed   # the stimulus proves its own back-pressure
    soc.faults = DdrFaults()
    assert run_case(soc, case)[1] == clean


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_jitter_across_three_ports_is_bit_exact():
    """Three AXI masters (HP0, HP1, HP3; the model of test_soc.py's three-port test): each
    port draws its own latencies and stalls, so the bursts striped across them complete in
    an order that changes with the seed — the reordering this accelerator can meet (it uses
    one AXI ID). The same DDR contents every time, every port slowed."""
    config = CI.replace(pe_rows=8, pe_cols=8, n_master_ports=3)
    cases = [gemm_case(config, 20260101, 64, 3, 3, GemmMode.INT8, WeightSource.DDR),
             dense_block_case(config)]
    with SocModel(config, ddr_bytes=SMALL_DDR) as soc:
        clean = [run_case(soc, case)[1] for case in cases]
        for seed in (5, 6):
            soc.faults = DdrFaults.jitter(seed, latency=64, stall=0.3)
            before = soc.port_stats()
            for case, cycles in zip(cases, clean, strict=True):
                code, jittered = run_case(soc, case)
                assert code == ErrorCode.NONE and jittered > cycles, (seed, case.name)
            for port, (now, then) in enumerate(zip(soc.port_stats(), before, strict=True)):
                for name in ("fault_ar_stalls", "fault_r_gaps", "fault_delay_cycles"):
                    assert now[name] > then[name], (seed, port, name)


def instruction_starts(soc: SocModel) -> list[tuple[int, int]]:
    """(start cycle, pc) of each instruction of the last run, from the hardware trace."""
    trace = Accelerator(SimBoard.over(soc)).read_trace()
    return [(e.start, e.pc) for e in trace if not e.drain]


def run_with_fault(soc: SocModel, case: Case, faults: DdrFaults, kind: str) -> dict:
    """Run ``case`` with ``faults``; when the fault reached the master and what stopped."""
    soc.faults = faults
    before = soc.stats
    start(soc, case)
    began = soc.cycle
    ran = soc.run(2_000_000)
    fired = soc.fault_cycles[kind]
    counts = delta(soc, before)
    soc.faults = DdrFaults()
    assert soc.irq, f"{faults}: no interrupt within {ran} cycles"
    return {"status": STATUS.decode(soc.read_register(offset("STATUS"))),
            "code": ErrorCode(soc.read_register(offset("ERROR_CODE"))),
            "pc": soc.read_register(offset("ERROR_PC")), "ran": ran,
            "at": None if fired is None else fired - began, "counts": counts}


@pytest.mark.parametrize("kind", ["read_error", "write_error"])
@pytest.mark.parametrize("resp", [AxiResp.SLVERR, AxiResp.DECERR], ids=lambda r: r.name)
@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_error_response_stops_the_run_with_axi_response(soc, cases, kind, resp):
    """SLVERR or DECERR on the middle read beat or write response of a MoE layer: the run
    ends in ERROR with AXI_RESPONSE, at one of the first instructions the clean run starts
    after the fault, no later than the clean run would have ended; the next run, and the
    one after a reset, are the clean run again."""
    case = cases[1]
    soc.faults = DdrFaults()
    before = soc.stats
    assert run_case(soc, case)[0] == ErrorCode.NONE
    clean = delta(soc, before)
    clean_cycles = soc.read_register(offset("CYCLES_LO"))
    starts = instruction_starts(soc)
    if kind == "read_error":
        faults = DdrFaults(read_error_beat=clean["r_beat_cycles"] // 2, error_resp=resp)
    else:
        faults = DdrFaults(write_error_response=clean["write_bursts"] // 2, error_resp=resp)
    got = run_with_fault(soc, case, faults, kind)
    assert got["status"] == {"BUSY": 0, "DONE": 0, "ERROR": 1}, got
    assert got["code"] == ErrorCode.AXI_RESPONSE, got
    assert got["counts"][f"fault_{kind}s"] == 1 and got["counts"][kind + "s"] == 1, got
    nearby = instructions_at(starts, got["at"])
    assert got["pc"] in nearby, (got, nearby)
    assert got["at"] < got["ran"] <= clean_cycles + 16, (got, clean_cycles)
    for reset in (False, True):
        if reset:
            soc.reset()
        assert run_case(soc, case) == (ErrorCode.NONE, clean_cycles)


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_error_fetching_the_last_line_is_reported_as_axi_response(soc, cases):
    """The dense block fetches the line holding END on its own, as its last read: an error
    there ends the run with ERROR_CODE AXI_RESPONSE (the controller once raised ERROR with
    the stop code still NONE there)."""
    case = cases[0]
    soc.faults = DdrFaults()
    before = soc.stats
    run_case(soc, case)
    last = delta(soc, before)["r_beat_cycles"] - 1
    got = run_with_fault(soc, case, DdrFaults(read_error_beat=last), "read_error")
    assert got["status"]["ERROR"] and got["counts"]["fault_read_errors"] == 1, got
    assert run_case(soc, case)[0] == ErrorCode.NONE   # the next run is unaffected
    assert got["code"] == ErrorCode.AXI_RESPONSE, got


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_a_read_that_never_returns_on_the_raw_model_holds_until_reset(soc, cases):
    """The hung burst blocks every read behind it (R stays in order) and the accelerator
    stays busy; a reset drops it and the next run is the clean one."""
    case = cases[1]
    soc.faults = DdrFaults()
    before = soc.stats
    assert run_case(soc, case)[0] == ErrorCode.NONE
    clean_cycles = soc.read_register(offset("CYCLES_LO"))
    bursts = delta(soc, before)["read_bursts"]
    soc.faults = DdrFaults(hang_read_burst=bursts // 2)
    start(soc, case)
    assert soc.run(3 * clean_cycles) == 3 * clean_cycles and not soc.irq
    assert STATUS.decode(soc.read_register(offset("STATUS")))["BUSY"]
    assert soc.stats["fault_hung_reads"] - before["fault_hung_reads"] == 1
    assert soc.fault_cycles["hung_read"] is not None
    soc.faults = DdrFaults()
    soc.reset()
    assert run_case(soc, case) == (ErrorCode.NONE, clean_cycles)


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_faults_need_a_ddr_faults_object(soc):
    with pytest.raises(M3VitError, match="DdrFaults"):
        soc.faults = {"read_jitter": 3}
    assert soc.faults == DdrFaults()


# ---- under the runtime -------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime():
    bench = FaultBench()
    yield bench
    bench.close()


@pytest.fixture(scope="module")
def outcomes(runtime):
    """One fault of each kind under each schedule, and a jittered call of each, through
    ``Accelerator.infer_all``; each followed by a clean run (``FaultBench.run``)."""
    plans = []
    for schedule in Schedule:
        ref = runtime.references[schedule]
        plans += [FaultPlan("read_error", schedule, ref.read_beats // 3, AxiResp.DECERR),
                  FaultPlan("write_error", schedule, 0, AxiResp.SLVERR),
                  FaultPlan("hung_read", schedule, ref.read_bursts // 2),
                  FaultPlan("jitter", schedule, 11 + schedule.value, latency=64, stall=0.3,
                            group="jitter")]
    return [runtime.run(plan) for plan in plans]


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_runtime_reports_each_error_as_axi_response(outcomes):
    errors = [o for o in outcomes if o.plan.kind in ("read_error", "write_error")]
    assert len(errors) == 4
    for o in errors:
        assert o.injected and o.ended == "error" and o.reported, o
        assert o.pc_at_fault and 0 < o.stop_after, o


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_runtime_watchdog_ends_a_read_that_never_returns(runtime, outcomes):
    hangs = [o for o in outcomes if o.plan.kind == "hung_read"]
    assert len(hangs) == 2
    for o in hangs:
        assert o.injected and o.ended == "watchdog" and not o.busy_after, o
        # Watchdog, then the abort's grace (it cannot finish: the read never returns), then
        # the reset: bounded, whatever the fault.
        assert o.stop_after <= runtime.watchdog(o.plan.schedule) + ABORT_GRACE_CYCLES + 1000, o


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_runtime_jitter_is_bit_exact_and_every_next_run_is_clean(outcomes):
    jitter = [o for o in outcomes if o.plan.kind == "jitter"]
    assert len(jitter) == 2
    for o in jitter:
        assert o.injected and o.ended == "finished" and o.exact, o
        assert o.cycles > o.clean_cycles, o
    assert all(o.next_exact and o.next_same_cycles for o in outcomes), outcomes


@pytest.mark.slow
@pytest.mark.xdist_group("soc_ci")
def test_bench_table_of_the_outcomes(outcomes):
    r = summarise(outcomes)
    assert [(row["kind"], row["resp"], row["faults"]) for row in r["rows"]] == [
        ("read_error", "DECERR", 2), ("write_error", "SLVERR", 2), ("hung_read", "", 2)]
    assert all(row["reported"] == row["injected"] == row["next_exact"] == 2 and
               row["hangs"] == 0 and not row["unreported"] for row in r["rows"]), r["rows"]
    text = markdown(r)
    assert text.count("2/2 (100 %)") >= 12 and "Not reported" not in text, text
