"""``PynqBoard`` through pynq's own classes: ``pynq.MMIO``, ``pynq.allocate``, ``PynqBuffer``.

Off the board the device under those classes is ``SimBoard.pynq_device()``. The quick tests put
a small stand-in for the SoC model under it (registers in a dict, DDR in a bytearray), which
is enough to check pynq's plumbing; the ``slow`` ones build the Verilated SoC model
(``m3vit.sim.soc.SocModel``, CI configuration) and run a program on it from ``PynqBuffer``s,
bit-exact.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from m3vit.hw.config import CI
from m3vit.hw.isa import Opcode
from m3vit.hw.registers import ID_MAGIC, REGISTER_MAP, ErrorCode
from m3vit.sw.bench.programs import Case, task_select_case, vector_case
from m3vit.sw.errors import M3VitError
from m3vit.sw.runtime.board import Buffer, SimBoard
from m3vit.sw.runtime.pynq_board import (
    PynqBoard,
    _find_accelerator,
    pynq,
)

OFFSET = {register.name: register.offset for register in REGISTER_MAP}
#: Where the tests place the register window in the device's address space: not 0, so an
#: absolute address handed to the model instead of an offset is noticed.
BASE = 0xA000_0000


class FakeSoc:
    """Just enough of ``SocModel`` for pynq's plumbing: no accelerator behind the registers.

    Every register reads what was last written to it (``ID`` and ``CLOCK_KHZ`` preset); DDR
    is a bytearray; time never brings an interrupt.
    """

    def __init__(self, ident: int = ID_MAGIC, clock_khz: int = 300_000,
                 ddr_bytes: int = 1 << 20):
        self.ddr_bytes = ddr_bytes
        self.ddr = bytearray(ddr_bytes)
        self.registers = {OFFSET["ID"]: ident, OFFSET["CLOCK_KHZ"]: clock_khz}
        self.accesses: list[tuple[str, int]] = []
        self.cycles_run = 0
        self.resets = 0

    def read_register(self, offset: int) -> int:
        self.accesses.append(("read", offset))
        return self.registers.get(offset, 0)

    def write_register(self, offset: int, value: int) -> None:
        self.accesses.append(("write", offset))
        self.registers[offset] = value

    def write_ddr(self, address: int, data: bytes) -> None:
        self.ddr[address:address + len(data)] = data

    def read_ddr(self, address: int, size: int) -> bytes:
        return bytes(self.ddr[address:address + size])

    def run(self, max_cycles: int) -> int:
        self.cycles_run += max_cycles
        return max_cycles

    @property
    def irq(self) -> bool:
        return False

    def reset(self, cycles: int = 8) -> None:
        self.resets += 1

    def close(self) -> None:
        pass


class RegistersOnlyDevice(pynq.Device):
    """A device like the board's: registers, no way to step time; the board's wait polls."""

    def __init__(self, soc: FakeSoc):
        super().__init__("registers_only")
        self.soc = soc
        self.capabilities = {"REGISTER_RW": True}

    def read_registers(self, address: int, length: int) -> bytes:
        return self.soc.read_register(address).to_bytes(4, "little")

    def write_registers(self, address: int, data: bytes) -> None:
        self.soc.write_register(address, int.from_bytes(data, "little"))


def fake_board(**soc_options) -> tuple[PynqBoard, FakeSoc]:
    soc = FakeSoc(**soc_options)
    device = SimBoard.over(soc).pynq_device(base_address=BASE)
    return PynqBoard.from_device(device, base_address=BASE), soc


def test_registers_go_through_pynq_mmio_as_offsets():
    board, soc = fake_board()
    assert board.name == "pynq"
    assert isinstance(board._mmio, pynq.MMIO)
    assert soc.accesses[0] == ("read", OFFSET["ID"])  # identity first, before anything else
    board.write_register(OFFSET["TASK_SELECT"], 0xFFFF_FFFF)
    assert soc.registers[OFFSET["TASK_SELECT"]] == 0xFFFF_FFFF
    soc.registers[OFFSET["CYCLES_LO"]] = 0x8000_0001
    assert board.read_register(OFFSET["CYCLES_LO"]) == 0x8000_0001
    with pytest.raises(ValueError, match="32-bit"):
        board.write_register(OFFSET["TASK_SELECT"], 1 << 32)
    with pytest.raises(ValueError, match="not whole words inside the window"):
        board.device.read_registers(BASE + (1 << 12), 4)


def test_buffers_are_pynq_buffers_synced_by_flush_and_invalidate():
    board, soc = fake_board()
    first, second = board.allocate(100), board.allocate(5000)
    assert isinstance(first._array, pynq.buffer.PynqBuffer)
    assert first.nbytes == 100 and second.nbytes == 5000
    assert first.device_address > 0 and first.device_address % 4096 == 0  # a page
    assert second.device_address >= first.device_address + first.nbytes
    assert first.read(0, 100) == bytes(100)

    payload = bytes(range(7, 107))
    first.write(0, payload)
    address = first.device_address
    assert soc.read_ddr(address, 100) == bytes(100)  # not visible before the flush
    first.sync_to_device()
    assert soc.read_ddr(address, 100) == payload

    soc.write_ddr(address + 10, b"\xAA\xBB")
    assert first.read(10, 2) == payload[10:12]  # the host view is stale until invalidated
    first.sync_from_device()
    assert first.read(8, 6) == payload[8:10] + b"\xAA\xBB" + payload[12:14]

    with pytest.raises(ValueError, match="outside"):
        first.write(99, b"\x00\x00")
    first.free()
    with pytest.raises(M3VitError, match="freed"):
        first.read(0, 1)


def test_a_slice_of_a_pynq_buffer_flushes_only_its_bytes():
    board, soc = fake_board()
    buffer = board.allocate(64)
    array = buffer._array
    array[:] = 0x55
    array[16:32].flush()
    assert soc.read_ddr(buffer.device_address, 64) == bytes(16) + b"\x55" * 16 + bytes(32)


def test_simulated_ddr_runs_out_with_a_clear_error():
    board, _ = fake_board(ddr_bytes=1 << 16)
    board.allocate(32 << 10)
    with pytest.raises(M3VitError, match="simulated DDR"):
        board.allocate(32 << 10)


def test_wrong_id_is_one_clear_line():
    with pytest.raises(M3VitError) as caught:
        fake_board(ident=0xDEAD_BEEF)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{BASE:#x}" in message and "ID reads 0xdeadbeef" in message
    assert "bitstream" in message


def test_wait_steps_a_simulated_device_and_checks_status():
    board, soc = fake_board()
    assert board.wait_for_interrupt(1234) is False
    assert soc.cycles_run == 1234
    soc.registers[OFFSET["STATUS"]] = REGISTER_MAP["STATUS"].encode(DONE=1)
    assert board.wait_for_interrupt(10) is True


def test_wait_on_a_device_without_time_polls_for_the_cycles_at_its_clock():
    soc = FakeSoc(clock_khz=1)  # 1 kHz: 50 cycles are 50 ms of wall time
    board = PynqBoard.from_device(RegistersOnlyDevice(soc))
    start = time.monotonic()
    assert board.wait_for_interrupt(50) is False
    assert time.monotonic() - start >= 0.05
    soc.registers[OFFSET["STATUS"]] = REGISTER_MAP["STATUS"].encode(ERROR=1)
    assert board.wait_for_interrupt(50) is True


def test_reset_goes_to_the_device_and_checks_the_id_again():
    board, soc = fake_board()
    board.reset()
    assert soc.resets == 1
    soc.registers[OFFSET["ID"]] = 0
    with pytest.raises(M3VitError, match="ID reads 0x00000000"):
        board.reset()
    with pytest.raises(M3VitError, match="no way to reset"):
        PynqBoard.from_device(RegistersOnlyDevice(FakeSoc())).reset()


def test_the_accelerator_ip_is_found_in_the_overlay():
    ip_dict = {"axi_gpio_0": {"phys_addr": 0xA001_0000},
               "zynq_ultra_ps_e_0": {},
               "accel/m3vit_accel_0": {"phys_addr": 0xA000_0000, "addr_range": 4096},
               "m3vit_accel_1": {"phys_addr": 0xA002_0000}}
    assert _find_accelerator(ip_dict, None)[0] == "accel/m3vit_accel_0"
    assert _find_accelerator(ip_dict, "m3vit_accel_1")[1]["phys_addr"] == 0xA002_0000
    with pytest.raises(M3VitError, match=r"no IP 'nope'.*axi_gpio_0, m3vit_accel_1"):
        _find_accelerator(ip_dict, "nope")
    with pytest.raises(M3VitError, match=r"no IP named m3vit_accel\*.*axi_gpio_0"):
        _find_accelerator({"axi_gpio_0": {}}, None)


def _on_a_board() -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return bool(pynq.Device.devices)


@pytest.mark.skipif(_on_a_board(), reason="a PYNQ device is present: this is a board")
@pytest.mark.parametrize("exists", [False, True], ids=["missing_bit", "dummy_bit"])
def test_off_the_board_pynq_board_says_use_the_simulator(tmp_path, exists):
    bitfile = tmp_path / "m3vit.bit"
    if exists:
        bitfile.write_bytes(b"not a bitstream")
    with pytest.raises(M3VitError) as caught:
        PynqBoard(bitfile)
    message = str(caught.value)
    assert "\n" not in message
    assert str(bitfile) in message and "--backend sim" in message


# -- on the Verilated SoC model -------------------------------------------------------------

SOC_DDR_BYTES = 8 << 20
#: What the model's DDR holds before each test: every test's device hands out the same
#: addresses, so without it a missing flush could go unnoticed behind the last test's bytes.
POISON = 0xA5


@pytest.fixture(scope="module")
def soc():
    from m3vit.sim.soc import SocModel

    model = SocModel(CI, ddr_bytes=SOC_DDR_BYTES)
    yield model
    model.close()


@pytest.fixture
def board(soc):
    soc.reset()
    soc.write_ddr(0, bytes([POISON]) * SOC_DDR_BYTES)
    return PynqBoard.from_device(SimBoard.over(soc).pynq_device())


def start_case(board: PynqBoard, case: Case) -> Buffer:
    """Place ``case`` in two PynqBuffers and start it with the registers' run protocol.

    Returns
    -------
    Buffer
        The data buffer (not yet synced back).
    """
    program, data = board.allocate(len(case.program)), board.allocate(len(case.ddr))
    program.write(0, case.program)
    data.write(0, case.ddr)
    program.sync_to_device()
    data.sync_to_device()
    for name, value in (("PROGRAM_BASE", program.device_address),
                        ("DATA_BASE", data.device_address), ("DATA_SIZE", len(case.ddr))):
        board.write_register(OFFSET[f"{name}_LO"], value & 0xFFFF_FFFF)
        board.write_register(OFFSET[f"{name}_HI"], value >> 32)
    board.write_register(OFFSET["TASK_SELECT"], case.task_select)
    board.write_register(OFFSET["SCHEDULE"], case.schedule)
    board.write_register(OFFSET["CONTROL"], REGISTER_MAP["CONTROL"].encode(START=1))
    return data


def run_case(board: PynqBoard, case: Case, limit: int = 2_000_000) -> bytes:
    """Run ``case`` to its interrupt; the data window afterwards, checked against the case."""
    data = start_case(board, case)
    assert board.wait_for_interrupt(limit), f"{case.name}: no interrupt in {limit} cycles"
    status = REGISTER_MAP["STATUS"].decode(board.read_register(OFFSET["STATUS"]))
    assert status["DONE"] and not status["ERROR"] and not status["BUSY"], (
        status, ErrorCode(board.read_register(OFFSET["ERROR_CODE"])))
    data.sync_from_device()
    after = data.read(0, len(case.ddr))
    if case.check is not None:
        case.check(after)
    else:
        assert after == case.expected, case.name
    assert after != case.ddr  # the run wrote its results
    return after


@pytest.mark.slow
def test_soc_registers_and_ddr_through_pynq(board, soc):
    assert board.read_register(OFFSET["ID"]) == ID_MAGIC
    assert board.clock_hz == round(CI.clock_mhz * 1000) * 1000
    task = REGISTER_MAP["TASK_SELECT"]
    board.write_register(task.offset, 0xFFFF_FFFF)
    assert board.read_register(task.offset) == task.mask  # bits outside TASK read 0
    assert soc.read_register(task.offset) == task.mask
    board.write_register(task.offset, 2)
    assert board.read_register(task.offset) == 2

    buffer = board.allocate(4096 + 7)
    # Zeroed and flushed at allocation: no dirty line of old contents is left to be written
    # back over the accelerator's results later.
    assert soc.read_ddr(buffer.device_address, buffer.nbytes) == bytes(buffer.nbytes)
    payload = np.random.default_rng(20251129).integers(0, 256, buffer.nbytes, np.uint8)
    buffer.write(0, payload.tobytes())
    buffer.sync_to_device()
    assert soc.read_ddr(buffer.device_address, buffer.nbytes) == payload.tobytes()
    soc.write_ddr(buffer.device_address + 4096, b"\x01\x02\x03")
    buffer.sync_from_device()
    assert buffer.read(4094, 5) == payload[4094:4096].tobytes() + b"\x01\x02\x03"


@pytest.mark.slow
@pytest.mark.parametrize("build", [
    lambda: task_select_case(CI, seed=3, task=1),
    lambda: vector_case(CI, seed=4, op=Opcode.RESIDUAL, rows=3, length=10),
], ids=["task_select_gemm", "residual"])
def test_program_runs_bit_exactly_from_pynq_buffers(board, build):
    run_case(board, build())


@pytest.mark.slow
def test_a_hung_run_times_out_and_reset_recovers_with_ddr_kept(board, soc):
    case = task_select_case(CI, seed=5, task=2)
    soc.hang_reads = True  # the first DDR read never returns: the run hangs
    data = start_case(board, case)
    assert board.wait_for_interrupt(20_000) is False
    assert REGISTER_MAP["STATUS"].decode(board.read_register(OFFSET["STATUS"]))["BUSY"]
    board.write_register(OFFSET["TASK_SELECT"], 0)  # frozen while BUSY
    assert board.read_register(OFFSET["TASK_SELECT"]) == case.task_select

    board.reset()
    soc.hang_reads = False
    assert REGISTER_MAP["STATUS"].decode(board.read_register(OFFSET["STATUS"]))["BUSY"] == 0
    assert board.read_register(OFFSET["TASK_SELECT"]) == REGISTER_MAP["TASK_SELECT"].reset
    data.sync_from_device()
    assert data.read(0, len(case.ddr)) == case.ddr  # DDR kept; nothing was stored
    run_case(board, case)


@pytest.mark.slow
def test_a_dma_that_never_returns_on_the_board_is_one_line_with_the_status(board, soc):
    """The board path of the driver: a read that never returns trips the watchdog, whose
    one-line error carries the status registers as it found them; the next run is fine."""
    from m3vit.hw.config import CI as CI_CONFIG
    from m3vit.sw.compiler.executable import compile_executable
    from m3vit.sw.model.config import get_preset
    from m3vit.sw.model.m3vit import M3ViT
    from m3vit.sw.model.train import scenes_for
    from m3vit.sw.quant.quantize import quantize
    from m3vit.sw.runtime.driver import Accelerator, WatchdogError

    model = M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0)
    exe = compile_executable(quantize(model, n_calib=2), CI_CONFIG)
    images = scenes_for(exe.model, 1, seed=5)["image"]
    acc = Accelerator(board, watchdog_cycles=400_000)
    acc.load(exe)
    expected = acc.infer(images, "semseg")
    soc.hang_reads = True
    try:
        with pytest.raises(WatchdogError) as e:
            acc.infer(images, "semseg")
    finally:
        soc.hang_reads = False
    message = str(e.value)
    assert "\n" not in message and "STATUS BUSY" in message and "INSTRUCTIONS" in message
    again = acc.infer(images, "semseg")
    assert torch.equal(again.heads, expected.heads)
