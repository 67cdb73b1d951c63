"""The Verilated SoC model (``m3vit.sim.soc``): the accelerator top with the C++ DDR model and
AXI4-Lite host, driven from Python through ctypes.

Everything runs on the CI configuration. The model is built once (a few minutes, cached
under ``build/soc``); the VCD test needs a second, tracing build.
"""

import time

import pytest

from m3vit.hw.config import CI
from m3vit.hw.engine.router import intake_shape
from m3vit.hw.errors import M3VitError
from m3vit.hw.isa import GemmMode, Opcode, WeightSource
from m3vit.hw.registers import ID_MAGIC, REGISTER_MAP, VERSION, ErrorCode
from m3vit.sim import soc as soc_module
from m3vit.sim.soc import DdrTiming, SocModel, build_soc
from m3vit.sw.bench.program_fuzz import start_on_soc
from m3vit.sw.bench.programs import (
    Case,
    dense_block_case,
    gemm_case,
    long_load_case,
    strided_load_store_case,
    vector_case,
)

PROGRAM_BASE = 0x1000
DATA_BASE = 0x4000
SMALL_DDR = 1 << 20
STATUS = REGISTER_MAP["STATUS"]


def offset(name: str) -> int:
    return REGISTER_MAP[name].offset


def start(soc: SocModel, case: Case, data_base: int = DATA_BASE) -> None:
    """Place ``case`` in DDR, program the registers as the host does, and write START."""
    start_on_soc(soc, case.program, case.ddr, program_base=PROGRAM_BASE, data_base=data_base,
                 task_select=case.task_select, schedule=case.schedule)


def run_case(soc: SocModel, case: Case, data_base: int = DATA_BASE,
             limit: int = 2_000_000) -> tuple[ErrorCode, int]:
    """Run ``case`` to its interrupt; (error code, CYCLES). Checks the result when it ran."""
    start(soc, case, data_base)
    soc.run(limit)
    assert soc.irq, f"{case.name}: no interrupt within {limit} cycles"
    fields = STATUS.decode(soc.read_register(offset("STATUS")))
    assert not fields["BUSY"] and fields["DONE"] != fields["ERROR"], fields
    code = ErrorCode(soc.read_register(offset("ERROR_CODE"))) if fields["ERROR"] \
        else ErrorCode.NONE
    cycles = soc.read_register(offset("CYCLES_LO"))
    if code == ErrorCode.NONE:
        after = soc.read_ddr(data_base, len(case.ddr))
        if case.check is not None:
            case.check(after)
        else:
            assert after == case.expected, f"{case.name}: DDR differs from the model"
    return code, cycles


@pytest.fixture(scope="module")
def soc():
    with SocModel(CI) as model:
        yield model


@pytest.fixture(scope="module")
def gemms():
    """Two GEMMs streaming their weights from DDR: enough traffic for the timing to show."""
    return [gemm_case(CI, 20260101 + i, tokens, 3, 3, mode, WeightSource.DDR)
            for i, (tokens, mode) in enumerate([(64, GemmMode.INT8), (33, GemmMode.INT32)])]


@pytest.mark.slow
def test_identity_registers(soc):
    assert soc.read_register(offset("ID")) == ID_MAGIC
    assert soc.read_register(offset("VERSION")) == REGISTER_MAP["VERSION"].encode(
        MAJOR=VERSION[0], MINOR=VERSION[1])
    assert soc.read_register(offset("CONFIG_HASH")) == CI.config_hash()
    # A read-write register round-trips through the C++ AXI4-Lite host.
    soc.write_register(offset("TASK_SELECT"), 2)
    assert soc.read_register(offset("TASK_SELECT")) == 2
    soc.write_register(offset("TASK_SELECT"), 0)


@pytest.mark.slow
def test_ddr_backdoor(soc):
    before = soc.cycle
    data = bytes(range(256)) * 3
    soc.write_ddr(soc.ddr_bytes - len(data), data)
    assert soc.read_ddr(soc.ddr_bytes - len(data), len(data)) == data
    assert soc.read_ddr(soc.ddr_bytes - 1, 1) == data[-1:]
    assert soc.cycle == before  # the backdoor takes no simulated time
    with pytest.raises(M3VitError, match="outside"):
        soc.write_ddr(soc.ddr_bytes - 2, b"abc")
    with pytest.raises(M3VitError, match="outside"):
        soc.read_ddr(soc.ddr_bytes, 1)
    with pytest.raises(M3VitError, match="outside"):
        soc.read_ddr(-1, 1)


@pytest.mark.slow
def test_dense_block_bit_exact_with_counters(soc):
    case = dense_block_case(CI)
    start(soc, case)
    stats_before, started = soc.stats, time.perf_counter()
    cycles_run = soc.run(5_000_000)
    seconds = time.perf_counter() - started
    stats = {k: v - stats_before[k] for k, v in soc.stats.items()}
    assert soc.irq and STATUS.decode(soc.read_register(offset("STATUS")))["DONE"]
    case.check(soc.read_ddr(DATA_BASE, len(case.ddr)))
    # The DDR model saw exactly the traffic the accelerator's own DMA counters report.
    assert stats["ddr_read_bytes"] == soc.read_register(offset("DMA_READ_BYTES")) > 0
    assert stats["ddr_write_bytes"] == soc.read_register(offset("DMA_WRITE_BYTES")) > 0
    assert stats["protocol_errors"] == stats["read_errors"] == stats["write_errors"] == 0
    assert stats["max_reads_in_flight"] > 1  # the DMA keeps bursts in flight
    print(f"dense tiny block (CI): {cycles_run} cycles in {seconds:.2f} s = "
          f"{cycles_run / seconds / 1e3:.0f} kcycles/s; {stats}")


@pytest.mark.slow
def test_ddr_timing_knobs(gemms):
    """Longer latency or less bandwidth: the same programs take more cycles, same results."""
    timings = {"default": DdrTiming.zcu104(CI), "slow_latency": DdrTiming(read_latency=200),
               "narrow": DdrTiming(bytes_per_cycle=1.5),
               "one_outstanding": DdrTiming(max_outstanding=1)}
    cycles = {}
    for name, timing in timings.items():
        with SocModel(CI, ddr_bytes=SMALL_DDR, timing=timing) as soc:
            cycles[name] = 0
            for case in gemms:
                code, run_cycles = run_case(soc, case)
                assert code == ErrorCode.NONE, (name, case.name, code)
                cycles[name] += run_cycles
            stats = soc.stats
            assert stats["max_reads_in_flight"] <= timing.max_outstanding
            assert stats["ddr_read_bytes"] > 0 and stats["protocol_errors"] == 0
    print(f"cycles by DDR timing: {cycles}")
    for name in ("slow_latency", "narrow", "one_outstanding"):
        assert cycles[name] > cycles["default"], cycles


@pytest.mark.slow
def test_ddr_error_ends_the_run(gemms):
    """A data window that runs past the DDR: the reads come back SLVERR, the run ends in
    ERROR with AXI_RESPONSE, and the next run in range is right."""
    case = gemms[0]
    with SocModel(CI, ddr_bytes=SMALL_DDR) as soc:
        # DATA_SIZE is the case's, so the accelerator's own range check passes; only the
        # first beat of the window is inside the DDR.
        beyond = SMALL_DDR - CI.axi_bytes
        code, _ = run_case(soc, case, data_base=beyond)
        assert code == ErrorCode.AXI_RESPONSE, code
        assert soc.stats["read_errors"] > 0
        code, _ = run_case(soc, case)
        assert code == ErrorCode.NONE


@pytest.mark.slow
def test_hung_reads_then_reset(gemms):
    case = gemms[0]
    with SocModel(CI, ddr_bytes=SMALL_DDR) as soc:
        soc.hang_reads = True
        assert soc.hang_reads
        start(soc, case)
        assert soc.run(20_000) == 20_000
        assert not soc.irq
        assert STATUS.decode(soc.read_register(offset("STATUS")))["BUSY"]
        assert soc.stats["r_beat_cycles"] == 0 and soc.stats["read_bursts"] > 0
        soc.hang_reads = False
        soc.reset()
        assert not STATUS.decode(soc.read_register(offset("STATUS")))["BUSY"]
        code, _ = run_case(soc, case)
        assert code == ErrorCode.NONE
        assert soc.run(100) == 0  # irq is still high: nothing to wait for


@pytest.mark.slow
def test_vcd_trace(tmp_path):
    trace = tmp_path / "soc.vcd"
    case = vector_case(CI, 3, Opcode.RESIDUAL, 2, CI.pe_cols)
    with SocModel(CI, ddr_bytes=SMALL_DDR, trace_path=trace) as soc:
        code, _ = run_case(soc, case)
        assert code == ErrorCode.NONE
    text = trace.read_text()
    assert text.startswith("$") and "m_axi__arvalid" in text and "irq" in text
    assert text.count("\n#") > 100  # time steps were dumped
    full_steps = text.count("\n#")
    windowed = tmp_path / "window.vcd"
    with SocModel(CI, ddr_bytes=SMALL_DDR, trace_path=windowed, trace_window=(50, 80)) as soc:
        assert run_case(soc, case)[0] == ErrorCode.NONE
    times = [int(line[1:]) for line in windowed.read_text().splitlines()
             if line.startswith("#")]
    # Two dumps per cycle (clock low, clock high) at times 2·cycle and 2·cycle + 1.
    assert times[0] == 100 and times[-1] == 159 and len(times) == 60 < full_steps
    with pytest.raises(M3VitError, match="START < STOP"):
        SocModel(CI, trace_path=windowed, trace_window=(80, 50))


def test_fst_needs_lz4_headers(tmp_path, monkeypatch):
    """Without the lz4 headers an FST trace is one clear error naming the package."""
    monkeypatch.setattr(soc_module.subprocess, "run", _failing_preprocessor)
    with pytest.raises(M3VitError, match="liblz4-dev"):
        build_soc(CI, trace="fst", build_root=tmp_path)


def _failing_preprocessor(*args, **kwargs):
    import subprocess
    return subprocess.CompletedProcess(args, 1, "", "fatal error: lz4.h: No such file")


@pytest.mark.slow
def test_fst_trace(tmp_path):
    try:
        soc_module._check_tools("fst", soc_module.verilator_env())
    except M3VitError as error:
        pytest.skip(f"no lz4 headers: {error}")
    trace = tmp_path / "soc.fst"
    with SocModel(CI, ddr_bytes=SMALL_DDR, trace_path=trace) as soc:
        soc.read_register(offset("ID"))
    assert trace.read_bytes()[:1] == b"\x00" and trace.stat().st_size > 100  # FST header


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(M3VitError, match="read_latency"):
        DdrTiming(read_latency=0)
    with pytest.raises(M3VitError, match="bytes_per_cycle"):
        DdrTiming(bytes_per_cycle=0.0)
    with pytest.raises(M3VitError, match=r"\.vcd or \.fst"):
        SocModel(CI, trace_path="waves.txt")
    with pytest.raises(M3VitError, match="trace must be"):
        build_soc(CI, trace="ghw")
    with pytest.raises(M3VitError, match="hp_ports"):
        DdrTiming(hp_ports=(1, 1))
    with pytest.raises(M3VitError, match="aggregate_bytes_per_cycle"):
        DdrTiming(aggregate_bytes_per_cycle=-1.0)
    with pytest.raises(M3VitError, match="one HP port per master"):
        SocModel(CI, timing=DdrTiming(hp_ports=(0, 1)))
    # 4.75 GB/s measured per HP port at 300 MHz; a 64-bit master moves at most 8 B a cycle.
    assert DdrTiming.zcu104(CI).bytes_per_cycle == pytest.approx(4750 / 300)
    assert DdrTiming.zcu104(CI.replace(axi_data_width=64)).bytes_per_cycle == 8.0


@pytest.mark.slow
def test_build_is_cached(soc):
    messages = []
    started = time.perf_counter()
    library = build_soc(CI, progress=messages.append)
    assert library == soc.library and messages == []
    mtime = library.stat().st_mtime_ns
    with SocModel(CI, ddr_bytes=SMALL_DDR, progress=messages.append) as again:
        assert again.read_register(offset("ID")) == ID_MAGIC
    assert messages == [] and library.stat().st_mtime_ns == mtime
    assert time.perf_counter() - started < 5


def test_sources_edited_after_import_are_not_trusted_to_name_a_build(soc, monkeypatch):
    """A ``hw`` source newer than this process's import of the gateware may not be what it
    elaborates: the build is found by its Verilog instead, and filed under no sources."""
    import m3vit.hw
    from m3vit.sim import soc as soc_module

    index = soc.library.parents[1] / "index"
    before = sorted(index.iterdir())
    monkeypatch.setattr(m3vit.hw, "IMPORTED_AT", 0.0)  # every source "edited since"
    assert soc_module._hw_fingerprint(CI) is None
    messages = []
    assert build_soc(CI, progress=messages.append) == soc.library
    assert any("elaborating" in message for message in messages)
    assert sorted(index.iterdir()) == before


@pytest.mark.slow
def test_three_ports_stripe_reads_with_the_same_results():
    """Three AXI masters (HP0, HP1, HP3) and, on an 8 × 8 array, 128-byte read entries as
    on the ZCU104 (a whole weight tile an entry; GEMM streams at beat but not entry
    boundaries: the realigner's work): the same programs give the same DDR contents;
    every port carries a share of the reads, writes use the first; the DMA counter is
    their sum."""
    config = CI.replace(pe_rows=8, pe_cols=8, n_master_ports=3)
    assert intake_shape(config).entry_bytes == 128
    cases = [gemm_case(config, 20260101 + i, tokens, 3, 3, mode, WeightSource.DDR)
             for i, (tokens, mode) in enumerate([(64, GemmMode.INT8), (33, GemmMode.INT32)])]
    cases.append(dense_block_case(config))
    with SocModel(config, ddr_bytes=SMALL_DDR) as soc:
        assert soc.n_ports == 3 and soc.timing.hp_ports == (0, 1, 3)
        for case in cases:
            before = soc.stats["ddr_read_bytes"]
            code, _ = run_case(soc, case)
            assert code == ErrorCode.NONE, case.name
            # The DMA's counter (per run) is the sum over ports of what the DDR served.
            assert soc.read_register(offset("DMA_READ_BYTES")) == \
                soc.stats["ddr_read_bytes"] - before
        ports = soc.port_stats()
        reads = [p["ddr_read_bytes"] for p in ports]
        assert min(reads) > 0 and max(reads) < 2 * min(reads), reads
        assert ports[0]["ddr_write_bytes"] > 0
        assert ports[1]["ddr_write_bytes"] == ports[2]["ddr_write_bytes"] == 0
        assert sum(reads) == soc.stats["ddr_read_bytes"]
        assert soc.stats["protocol_errors"] == 0


@pytest.mark.slow
def test_loads_take_a_word_a_cycle_where_a_word_spans_beats():
    """32-bit AXI under 8-byte words (a word two beats, as the ZCU104's 32-byte word on
    16-byte beats): LOAD takes the read entries a word a cycle (``EntryWords``) instead of
    a beat a cycle, with the same buffer contents (strided, odd counts, a dense block)."""
    config = CI.replace(pe_rows=8, pe_cols=8, n_master_ports=3, axi_data_width=32)
    assert intake_shape(config).load_words
    words = 1024
    with SocModel(config, ddr_bytes=SMALL_DDR) as soc:
        for case in (strided_load_store_case(config, 11), dense_block_case(config)):
            code, _ = run_case(soc, case)
            assert code == ErrorCode.NONE, case.name
        code, cycles = run_case(soc, long_load_case(config, 12, words))
        assert code == ErrorCode.NONE
        # A beat a cycle takes 2 · words and more; the three ports deliver 12 bytes a
        # cycle, a word a cycle about words + the run's ~260 cycles of start and STORE.
        assert cycles < 1.5 * words, cycles
