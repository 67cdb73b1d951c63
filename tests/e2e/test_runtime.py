"""The runtime end to end on the simulated board: the ``tiny`` model, every task, switches.

One Verilated SoC model of the CI configuration (4 × 4 array) is built (or reused from
``build/soc``) and shared by the module; each ``tiny`` image is ~1 M simulated cycles.
"""

import functools
import itertools
import re

import pytest
import torch

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.isa import Opcode
from m3vit.hw.registers import REGISTER_MAP, ErrorCode
from m3vit.sw.cli import main
from m3vit.sw.compiler.executable import compile_executable
from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import get_preset
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.model.train import scenes_for
from m3vit.sw.quant import golden
from m3vit.sw.quant.package import save_package
from m3vit.sw.quant.quantize import quantize
from m3vit.sw.runtime.board import SimBoard
from m3vit.sw.runtime.driver import Accelerator, AcceleratorError, WatchdogError
from m3vit.sw.runtime.session import format_report, load_report, run_session

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("soc_ci")]

SEED = 11


@functools.cache
def tiny_package():
    return quantize(M3ViT(get_preset("tiny"), seed=0), n_calib=4)


@pytest.fixture(scope="module")
def acc():
    with Accelerator.open("sim", config=CI, watchdog_cycles=1_500_000) as driver:
        driver.load(compile_executable(tiny_package(), CI))
        yield driver


def golden_head(images, task):
    pkg = tiny_package()
    x_q = golden.quantize_image(images, pkg.params["scales"]["input"])
    return golden.forward(pkg.tensors, pkg.config, x_q, task)[0]


def test_every_task_bit_exact_with_switches_between_images(acc):
    """Two images × two tasks, the task order alternating, so every run but the first
    follows a switch; each head equals the golden model; a switch moves no weights."""
    scenes = scenes_for(get_preset("tiny"), 2, seed=SEED)
    loaded = acc.loaded_bytes
    report = run_session(acc, scenes, reference=tiny_package())
    assert acc.loaded_bytes == loaded
    assert set(report["tasks"]) == {"semseg", "depth"}
    for task, result in report["tasks"].items():
        assert result["bit_exact"] is True, task
        assert result["bit_exact_images"] == 2
        for run in result["runs"]:
            assert run["cycles"] > 100_000 and run["ddr_read_bytes"] > 0
            assert run["gemm_busy"] > 0 and run["instructions"] > 0
    assert [r["after_switch"] for r in report["sequence"]] == [False, True, False, True]
    switch = report["task_switch"]
    assert switch["register_writes"] == 1 and switch["bytes_reloaded"] == 0
    assert switch["same_output"] and switch["extra_cycles"] == 0
    text = format_report(report)
    assert "semseg" in text and "2/2" in text


def test_infer_returns_heads_and_predictions(acc):
    images = scenes_for(get_preset("tiny"), 1, seed=SEED + 1)["image"]
    out = acc.infer(images, "depth")
    assert torch.equal(out.heads, golden_head(images, "depth"))
    assert out.predictions.shape == (1, 1, 32, 32)
    assert out.runs[0].latency_us == out.runs[0].cycles / acc.clock_mhz


def test_package_for_other_hardware_is_refused(acc):
    other = compile_executable(tiny_package(), ZCU104)
    with pytest.raises(M3VitError) as e:
        acc.load(other)
    assert "compiled for hardware config" in str(e.value) and "\n" not in str(e.value)
    assert f"{ZCU104.config_hash():#010x}" in str(e.value)


def test_corrupt_package_unknown_task_and_wrong_shape_are_one_line_each(acc, tmp_path):
    path = tmp_path / "tiny.ci.m3x"
    compile_executable(tiny_package(), CI).save(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    errors = []
    for attempt in (lambda: acc.load(path), lambda: acc.set_task("edge"),
                    lambda: acc.infer(torch.zeros(1, 3, 16, 16)),
                    lambda: acc.infer(torch.zeros(2, 1, 32, 32))):
        with pytest.raises(M3VitError) as e:
            attempt()
        errors.append(str(e.value))
    assert "corrupted" in errors[0]
    assert "unknown task 'edge'" in errors[1] and "semseg, depth" in errors[1]
    assert "wrong input shape (1, 3, 16, 16)" in errors[2] and "(B, 3, 32, 32)" in errors[2]
    assert "wrong input shape (2, 1, 32, 32)" in errors[3]
    assert all("\n" not in message for message in errors)


def test_hung_run_trips_the_watchdog_and_the_next_run_is_correct(acc):
    images = scenes_for(get_preset("tiny"), 1, seed=SEED + 2)["image"]
    soc = acc.board.soc
    soc.hang_reads = True
    start = soc.cycle
    try:
        with pytest.raises(WatchdogError, match="reset") as e:
            acc.infer(images, "semseg")
    finally:
        soc.hang_reads = False
    # The hint names the last 20,000 cycles before the watchdog fired, as a trace window.
    window = re.search(r"--trace-window (\d+):(\d+)", str(e.value))
    assert window and "\n" not in str(e.value)
    # The status registers as the watchdog found them: busy, stuck on a read.
    state = re.search(r"STATUS ([A-Z, ]+); CYCLES ([\d,]+); INSTRUCTIONS ([\d,]+)", str(e.value))
    assert state and "BUSY" in state.group(1)
    assert int(state.group(2).replace(",", "")) >= acc.watchdog_cycles
    begin, end = map(int, window.groups())
    assert end - begin == 20_000 and start + acc.watchdog_cycles <= end < soc.cycle
    out = acc.infer(images, "semseg")
    assert torch.equal(out.heads, golden_head(images, "semseg"))


def test_instruction_trace_partitions_the_run(acc):
    """The hardware trace: one entry per instruction retired plus END (and the drains of
    GEMMs that handed over early and of background softmaxes), spans that join up from
    cycle 0 to the end of the run, and per-port read bytes that add up to the DMA
    counter."""
    images = scenes_for(get_preset("tiny"), 1, seed=SEED + 5)["image"]
    run = acc.infer(images, "depth").runs[0]
    trace = acc.read_trace()
    drains = [e for e in trace if e.drain]
    assert len(trace) - len(drains) == run.instructions + 1
    # Drains are a handed-over GEMM's or the background softmax's, GEMMs' among them.
    assert all(e.opcode in (Opcode.GEMM.value, Opcode.SOFTMAX.value) for e in drains)
    assert any(e.opcode == Opcode.GEMM.value for e in drains)
    assert trace[0].start == 0 and trace[0].pc == 0
    assert all(b.start == a.end and b.end > b.start for a, b in itertools.pairwise(trace))
    assert run.cycles - 4 <= trace[-1].end <= run.cycles
    assert sum(e.read_bytes[0] for e in trace) == run.ddr_read_bytes
    assert sum(e.write_bytes for e in trace) == run.ddr_write_bytes
    program = acc.package.program
    assert trace[-1].opcode == Opcode.END.value and trace[-1].pc == len(program) // 32 - 1
    assert {e.opcode for e in trace} >= {Opcode.GEMM.value, Opcode.EXPERTS.value}


def test_run_error_is_reported_with_code(acc):
    """A data window larger than DDR allows (DATA_SIZE too small) stops with an error code,
    and the driver puts its registers back for the next run."""
    acc._write64("DATA_SIZE", 64)
    images = scenes_for(get_preset("tiny"), 1, seed=SEED + 3)["image"]
    with pytest.raises(AcceleratorError) as e:
        acc.infer(images, "semseg")
    assert e.value.code is ErrorCode.ADDRESS_OUT_OF_RANGE
    acc._program_registers()
    assert acc.board.read_register(REGISTER_MAP["DATA_SIZE_LO"].offset) == \
        len(acc.package.image)


def test_run_and_report_cli(tmp_path, capsys):
    m3q = save_package(tmp_path / "tiny.m3q", tiny_package())
    assert main(["compile", str(m3q), "--config", "ci"]) == 0
    m3x, report = tmp_path / "tiny.ci.m3x", tmp_path / "run.json"
    capsys.readouterr()
    assert main(["run", str(m3x), "--images", "1", "--check", str(m3q), "--json", str(report),
                 "--figure", str(tmp_path / "run.png"), "--profile"]) == 0
    out = capsys.readouterr().out
    assert "1/1" in out and "task switch" in out
    assert "profile of depth" in out and "experts" in out
    assert (tmp_path / "run.png").stat().st_size > 1000
    saved = load_report(report)
    assert saved["tasks"]["depth"]["bit_exact"] is True
    assert saved["profiles"]["depth"]["cycles"] == saved["tasks"]["depth"]["runs"][0]["cycles"]
    assert main(["report", str(report), "--sequence"]) == 0
    assert "after a switch" in capsys.readouterr().out
    # m3vit profile: the table again, and a timeline per task.
    timeline = tmp_path / "timeline.png"
    assert main(["profile", str(report), "--figure", str(timeline)]) == 0
    out = capsys.readouterr().out
    assert out.count("run ") == 2 and "HP0 GB/s" in out
    assert (tmp_path / "timeline-depth.png").stat().st_size > 1000
    assert main(["profile", str(report), "--task", "edge"]) == 2
    assert "profiles" in capsys.readouterr().err
    # The simulator of another config refuses the package in one line.
    assert main(["run", str(m3x), "--config", "zcu104", "--images", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("m3vit: error:") and "compiled for hardware config" in err[-1]


def test_driver_through_pynq_classes_on_the_simulator():
    """The same driver over ``PynqBoard``: pynq's ``MMIO`` and ``PynqBuffer`` (flush and
    invalidate) against the SoC model; one image per task bit-exact, then a hung run."""
    from m3vit.sw.runtime.pynq_board import PynqBoard

    images = scenes_for(get_preset("tiny"), 1, seed=SEED + 4)["image"]
    with SimBoard(CI) as sim:
        soc = sim.soc
        board = PynqBoard.from_device(sim.pynq_device())
        acc = Accelerator(board, watchdog_cycles=1_500_000)
        acc.load(compile_executable(tiny_package(), CI))
        for task in ("depth", "semseg"):
            assert torch.equal(acc.infer(images, task).heads, golden_head(images, task))
        soc.hang_reads = True
        with pytest.raises(WatchdogError):
            acc.infer(images)
        soc.hang_reads = False
        assert torch.equal(acc.infer(images).heads, golden_head(images, "semseg"))
        acc.close()


def test_run_cli_traces_only_the_window(tmp_path, capsys):
    m3q = save_package(tmp_path / "tiny.m3q", tiny_package())
    assert main(["compile", str(m3q), "--config", "ci"]) == 0
    trace = tmp_path / "run.vcd"
    assert main(["run", str(tmp_path / "tiny.ci.m3x"), "--images", "1", "--task", "depth",
                 "--trace", str(trace), "--trace-window", "1000:1500"]) == 0
    times = [int(line[1:]) for line in trace.read_text().splitlines() if line.startswith("#")]
    assert (times[0], times[-1], len(times)) == (2000, 2999, 1000)
    assert main(["run", str(tmp_path / "tiny.ci.m3x"), "--trace", str(trace),
                 "--trace-window", "5:5"]) == 2
    assert "START < STOP" in capsys.readouterr().err


def test_run_cli_ddr_knobs(tmp_path, capsys):
    """--ddr changes the simulated DDR: a slower memory takes more cycles, same results;
    a bad knob is one line."""
    m3q = save_package(tmp_path / "tiny.m3q", tiny_package())
    assert main(["compile", str(m3q), "--config", "ci"]) == 0
    m3x = tmp_path / "tiny.ci.m3x"
    cycles = {}
    for name, knobs in (("default", []), ("slow", ["--ddr", "read_latency=200", "--ddr",
                                                    "aggregate_bytes_per_cycle=4"])):
        report = tmp_path / f"{name}.json"
        assert main(["run", str(m3x), "--images", "1", "--task", "depth", "--check",
                     str(m3q), "--json", str(report), *knobs]) == 0
        result = load_report(report)["tasks"]["depth"]
        assert result["bit_exact"] is True
        cycles[name] = result["runs"][0]["cycles"]
    assert "read_latency=200" in capsys.readouterr().err
    assert cycles["slow"] > cycles["default"], cycles
    assert main(["run", str(m3x), "--ddr", "max_outstanding=0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("m3vit: error:")
    assert main(["run", str(m3x), "--backend", "pynq", "--ddr", "read_latency=9"]) == 2
    assert "needs --backend sim" in capsys.readouterr().err


@functools.cache
def tiny16_package():
    """``tiny`` on 16 × 16 inputs: 17 tokens an image, batches of up to 4 on the CI config."""
    return quantize(M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0), n_calib=4)


def test_batches_on_the_soc_are_bit_exact_per_image(acc):
    """Five images in batches of 1, 2, 3 and 4 (the last batch takes what is left): every
    head equals golden's for that image alone; a batch's run reads the weights once, so
    DDR bytes an image fall with the batch; PROGRAM_BASE follows the batch size."""
    pkg = tiny16_package()
    images = scenes_for(pkg.config, 5, seed=SEED)["image"]
    try:
        acc.load(compile_executable(pkg, CI, max_batch=4))
        for task in pkg.config.task_names:
            x_q = golden.quantize_image(images, pkg.params["scales"]["input"])
            want = torch.stack([golden.forward(pkg.tensors, pkg.config, x_q[b:b + 1], task)[0][0]
                                for b in range(5)])
            read = {}
            for batch in (1, 2, 3, 4):
                out = acc.infer(images, task, batch=batch)
                assert torch.equal(out.heads, want), (task, batch)
                sizes = [r.images for r in out.runs]
                assert sizes == [batch] * (5 // batch) + ([5 % batch] if 5 % batch else [])
                full = [r for r in out.runs if r.images == batch]
                read[batch] = full[0].ddr_read_bytes / batch
                assert full[0].cycles_per_image == full[0].cycles / batch
            assert read[4] < read[2] < read[1] / 1.5, read
        assert acc.infer(images[:2]).runs[0].images == 2   # default: the package's maximum
        # Every task at once: the shared blocks run once a batch, the heads are the same.
        every = acc.infer_all(images, batch=2)
        assert [r.images for r in every.shared_runs] == [2, 2, 1]
        whole = 0
        for task in pkg.config.task_names:
            alone = acc.infer(images, task, batch=2)
            assert torch.equal(every.tasks[task].heads, alone.heads), task
            whole += sum(r.cycles for r in alone.runs)
        assert every.cycles < whole
        with pytest.raises(M3VitError, match="batch 5 is not in 1…4"):
            acc.infer(images, batch=5)
    finally:
        acc.load(compile_executable(tiny_package(), CI))


def test_run_cli_batches(tmp_path, capsys):
    m3q = save_package(tmp_path / "t16.m3q", tiny16_package())
    assert main(["compile", str(m3q), "--config", "ci", "--max-batch", "2"]) == 0
    m3x, report = tmp_path / "t16.ci.m3x", tmp_path / "run.json"
    capsys.readouterr()
    assert main(["run", str(m3x), "--images", "3", "--check", str(m3q), "--json",
                 str(report), "--profile"]) == 0
    out = capsys.readouterr().out
    assert "3 image(s) in batches of 2" in out and "3/3" in out and "images/s" in out
    saved = load_report(report)
    runs = saved["tasks"]["depth"]["runs"]
    assert [r["images"] for r in runs] == [2, 1]
    assert saved["tasks"]["depth"]["mean"]["cycles"] == sum(r["cycles"] for r in runs) / 3
    assert saved["profiles"]["depth"]["cycles"] == runs[0]["cycles"]
    assert main(["run", str(m3x), "--images", "3", "--task", "all", "--check", str(m3q)]) == 0
    out = capsys.readouterr().out
    assert "3/3" in out and "all tasks of an image:" in out and "computed once" in out
    assert main(["run", str(m3x), "--task", "all", "--task", "depth"]) == 2
    assert "give it alone" in capsys.readouterr().err
    assert main(["run", str(m3x), "--batch", "3", "--images", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("m3vit: error:") and "--max-batch 2" in err[-1]


def test_the_estimate_is_within_five_per_cent_of_the_soc(acc):
    """The analytic cycle model against the simulated board: ``tiny`` (65 tokens) under
    both schedules and ``tiny`` on 16 × 16 inputs in batches of 1…4, every run within 5 %."""
    from m3vit.hw.registers import Schedule
    from m3vit.sw.compiler.estimate import estimate_package

    cases = [(tiny_package(), compile_executable(tiny_package(), CI), (1,)),
             (tiny16_package(), compile_executable(tiny16_package(), CI, max_batch=4),
              (1, 2, 3, 4))]
    errors = []
    try:
        for pkg, exe, batches in cases:
            acc.load(exe)
            images = scenes_for(pkg.config, max(batches), seed=SEED)["image"]
            for schedule in Schedule:
                acc.set_schedule(schedule)
                for batch in batches:
                    run = acc.infer(images[:batch], "semseg", batch=batch).runs[0]
                    est = estimate_package(pkg, exe, task="semseg", batch=batch,
                                           images=images, schedule=schedule)
                    errors.append((pkg.config.n_tokens, schedule.name, batch,
                                   est["cycles"] / run.cycles - 1))
    finally:
        acc.set_schedule(Schedule.EXPERT_BY_EXPERT)
        acc.load(compile_executable(tiny_package(), CI))
    assert all(abs(e) <= 0.05 for *_, e in errors), errors


def test_a_router_centred_by_a_bias_is_bit_exact_on_the_soc():
    """``router_range="top"`` moves the router logits with a constant bias (its top-k range
    centred on 0) — a bias the router GEMM adds like any other: still bit-exact."""
    pkg = quantize(M3ViT(get_preset("tiny"), seed=0), n_calib=4, router_range="top")
    assert pkg.params["calibration"]["router_range"] == "top"
    assert any(int(pkg.tensors[f"blocks.1.router.{t}.bias"].abs().max()) > 0
               for t in ("semseg", "depth"))
    images = scenes_for(get_preset("tiny"), 1, seed=SEED + 6)["image"]
    x_q = golden.quantize_image(images, pkg.params["scales"]["input"])
    with Accelerator.open("sim", config=CI, watchdog_cycles=1_500_000) as acc:
        acc.load(compile_executable(pkg, CI))
        for task in ("semseg", "depth"):
            want = golden.forward(pkg.tensors, pkg.config, x_q, task)[0]
            assert torch.equal(acc.infer(images, task).heads, want)
