"""cocotb test bench for the DDR access blocks of :mod:`m3vit.hw.axi`: DDR model, monitors.

Not a test module itself: ``test_dma_engines.py`` imports it. The DUT is the bench top of
``tests/sim/test_dma.py``: an :class:`~m3vit.hw.axi.AxiDmaPort` (ports ``m_axi__*``,
``read__*``, ``write__*``) and the :class:`~m3vit.hw.axi.StreamResize` instances of
:data:`RESIZERS` (ports ``<name>__i__*``, ``<name>__o__*``). The configuration it was
generated from comes from :func:`m3vit.sim.cocotb_runner.bench_config`.

DDR is cocotbext-axi's :class:`~cocotbext.axi.AxiRam` with the additions of
:mod:`m3vit.sim.ddr_tb`: a read latency of :data:`READ_LATENCY` cycles
(:class:`~m3vit.sim.ddr_tb.DelayedChannel`) and a poisoned page that answers SLVERR
(:data:`~m3vit.sim.ddr_tb.POISONED`).

Random back-pressure and gaps on AR, R, AW, W and B use cocotbext-axi's pause generators.
"""

from __future__ import annotations

from dataclasses import dataclass

import cocotb
from cocotb.triggers import ReadOnly
from cocotbext.axi import AxiBus, AxiRam

from m3vit.hw.axi import BOUNDARY_BYTES, AxiBurst
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.ddr_tb import POISONED, DelayedChannel, PoisonedMemory, random_pauses
from m3vit.sim.stream_tb import Bench

#: The StreamResize instances of the bench top: name → (in_bytes, out_bytes).
RESIZERS = {"up4": (4, 16), "up2": (16, 32), "down2": (16, 8), "down4": (16, 4)}
RAM_BYTES = 1 << 18
#: Where random transfers go (clear of the poisoned page).
SAFE = range(0, POISONED.start)
#: Cycles from an AR handshake to the earliest R beat of its burst (the model adds ~2).
READ_LATENCY = 32
COUNTER_MOD = 1 << 32


@dataclass
class Burst:
    """One address handshake seen on AR or AW."""

    cycle: int
    addr: int
    beats: int


def split_bursts(addr: int, beats: int, beat_bytes: int, max_beats: int) -> list[tuple[int, int]]:
    """The (byte address, beats) bursts a command must become: reference of the engines.

    Bursts never cross a ``max_beats``-beat boundary (hence no 4 KiB boundary), so only the
    first one is short when ``addr`` is not aligned to it.
    """
    bursts = []
    beat = addr // beat_bytes
    while beats:
        length = min(beats, max_beats - beat % max_beats)
        bursts.append((beat * beat_bytes, length))
        beat += length
        beats -= length
    return bursts


class TB(Bench):
    """The bench top with its DDR model, AXI monitors and the configuration.

    Parameters
    ----------
    dut : cocotb handle
        The bench top.
    """

    def __init__(self, dut) -> None:
        super().__init__(dut)
        self.config = bench_config()
        self.beat_bytes = self.config.axi_bytes
        self.beat_bits = self.config.axi_data_width
        self.memory = PoisonedMemory(RAM_BYTES)
        self.ram = AxiRam(AxiBus.from_prefix(dut, "m_axi", bus_separator="__"), dut.clk,
                          dut.rst, mem=self.memory)
        read_if = self.ram.read_if
        self.ar_sink = read_if.ar_channel
        read_if.ar_channel = DelayedChannel(self.ar_sink, self, READ_LATENCY)
        # cocotbext-axi logs every burst at INFO (thousands of lines per test) and every
        # poisoned beat at WARNING; the error tests check those responses themselves.
        for interface in (read_if, self.ram.write_if):
            interface.log.setLevel("ERROR")
        self.ar_log: list[Burst] = []
        self.aw_log: list[Burst] = []
        self.r_first_beats: list[int] = []  # cycle of each burst's first R beat
        self.outstanding_reads = 0
        self.max_outstanding_reads = 0
        self.done_pulses = 0

    async def reset(self) -> None:
        """Idle every stream input, reset the DUT (and with it the RAM model's channels), then
        start the monitor.

        A failed test leaves its pins as they were (a command source may still hold
        ``valid``), which the next test would otherwise inherit.
        """
        dut = self.dut
        idle = [dut.read__cmd__valid, dut.read__data__ready, dut.read__clear_error,
                dut.write__cmd__valid, dut.write__data__valid, dut.write__clear_error]
        for name in RESIZERS:
            idle += [dut[f"{name}__i__valid"], dut[f"{name}__o__ready"]]
        for signal in idle:
            signal.value = 0
        await super().reset()
        cocotb.start_soon(self._monitor())

    def pause_axi(self, probability: float) -> None:
        """Random stalls on every AXI channel: ``arready``, ``rvalid``, ``awready``,
        ``wready`` and ``bvalid`` low with ``probability`` each cycle."""
        read_if, write_if = self.ram.read_if, self.ram.write_if
        for channel in (self.ar_sink, read_if.r_channel, write_if.aw_channel,
                        write_if.w_channel, write_if.b_channel):
            channel.set_pause_generator(random_pauses(self.rng(), probability))

    def ram_bytes(self, addr: int, length: int) -> bytes:
        """Contents of the RAM model (clear of the poisoned page)."""
        return bytes(self.memory[addr:addr + length])

    def fill_ram(self) -> None:
        """Random bytes everywhere but the poisoned page."""
        rng = self.rng()
        self.memory[SAFE.start:SAFE.stop] = rng.randbytes(len(SAFE))
        self.memory[POISONED.stop:] = rng.randbytes(RAM_BYTES - POISONED.stop)

    def random_command(self, rng, max_beats: int = 600, region: range = SAFE
                       ) -> tuple[int, int]:
        """(addr, beats): 1…``max_beats`` beats at a random beat-aligned address."""
        beats = rng.randint(1, max_beats)
        last_beat = (region.stop - beats * self.beat_bytes) // self.beat_bytes
        addr = rng.randint(region.start // self.beat_bytes, last_beat) * self.beat_bytes
        return addr, beats

    def crossing_command(self, rng, region: range = SAFE) -> tuple[int, int]:
        """(addr, beats) starting a few beats below a 4 KiB boundary and crossing it."""
        pages = range(region.start // BOUNDARY_BYTES + 1, region.stop // BOUNDARY_BYTES - 3)
        below = rng.randint(1, 5)
        addr = rng.choice(pages) * BOUNDARY_BYTES - below * self.beat_bytes
        return addr, below + rng.randint(1, 300)

    def expected_bursts(self, commands: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Every (addr, beats) burst ``commands`` must produce, in order."""
        return [burst for addr, beats in commands
                for burst in split_bursts(addr, beats, self.beat_bytes,
                                          self.config.max_burst_beats)]

    def check_bursts(self, log: list[Burst], commands: list[tuple[int, int]]) -> None:
        """``log`` obeys AXI4's rules and is exactly the reference split of ``commands``."""
        for burst in log:
            assert 1 <= burst.beats <= self.config.max_burst_beats, burst
            assert burst.addr % self.beat_bytes == 0, burst
            end = burst.addr + burst.beats * self.beat_bytes - 1
            assert burst.addr // BOUNDARY_BYTES == end // BOUNDARY_BYTES, (
                f"burst crosses a 4 KiB boundary: {burst}")
        assert [(b.addr, b.beats) for b in log] == self.expected_bursts(commands)

    def unpack_beat(self, payload: int, bits: int | None = None) -> tuple[int, int]:
        """(data, last) of a {data, last} payload of ``bits`` data bits (AXI width default)."""
        bits = self.beat_bits if bits is None else bits
        return payload & ((1 << bits) - 1), payload >> bits

    def beats_of(self, content: bytes, bits: int | None = None) -> list[int]:
        """``content`` as beats of ``bits`` (AXI width default), little-endian."""
        n_bytes = (self.beat_bits if bits is None else bits) // 8
        return [int.from_bytes(content[k:k + n_bytes], "little")
                for k in range(0, len(content), n_bytes)]

    async def _monitor(self) -> None:
        axi = self.dut
        size = (self.beat_bytes - 1).bit_length()
        in_burst = False
        while True:
            await self.edge
            await ReadOnly()
            cycle = self.cycle()
            if axi.m_axi__arvalid.value and axi.m_axi__arready.value:
                assert axi.m_axi__arsize.value == size
                assert axi.m_axi__arburst.value == AxiBurst.INCR.value
                self.ar_log.append(Burst(cycle, axi.m_axi__araddr.value.to_unsigned(),
                                         axi.m_axi__arlen.value.to_unsigned() + 1))
                self.outstanding_reads += 1
                self.max_outstanding_reads = max(self.max_outstanding_reads,
                                                 self.outstanding_reads)
            if axi.m_axi__rvalid.value:
                # Credits reserve queue room for every burst issued: R never waits.
                assert axi.m_axi__rready.value, "rready low while R data is offered"
            if axi.m_axi__rvalid.value and axi.m_axi__rready.value:
                if not in_burst:
                    self.r_first_beats.append(cycle)
                in_burst = not axi.m_axi__rlast.value
                self.outstanding_reads -= not in_burst
            if axi.m_axi__awvalid.value and axi.m_axi__awready.value:
                assert axi.m_axi__awsize.value == size
                assert axi.m_axi__awburst.value == AxiBurst.INCR.value
                self.aw_log.append(Burst(cycle, axi.m_axi__awaddr.value.to_unsigned(),
                                         axi.m_axi__awlen.value.to_unsigned() + 1))
            if axi.m_axi__wvalid.value and axi.m_axi__wready.value:
                assert axi.m_axi__wstrb.value == (1 << self.beat_bytes) - 1
            self.done_pulses += int(axi.write__done.value)

    async def wait_for(self, condition, what: str, within: int = 2000) -> None:
        """Wait until ``condition()`` holds in a settled cycle (at most ``within`` cycles);
        returns at the rising edge that ends that cycle, so inputs may be driven again and the
        monitor has seen the cycle."""
        for _ in range(within):
            await ReadOnly()
            held = condition()
            await self.edge
            if held:
                return
        raise AssertionError(f"{what}: not within {within} cycles")
