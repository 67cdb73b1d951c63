"""cocotb bench for :class:`m3vit.hw.striped_read.StripedReadDma` against cocotbext-axi RAMs.

Run by ``tests/sim/test_striped_read.py``; not a pytest module. Every port has its own
:class:`~cocotbext.axi.AxiRamRead` over the same random contents (reads only, so one memory
seen through N ports), with a read latency of :data:`READ_LATENCY` cycles. The entries must
be the commands' bytes in address order, the bursts round-robin over the ports, and with
nothing stalling the ports must together deliver close to one beat each per cycle.
"""

import cocotb
from cocotb.triggers import ReadOnly
from cocotbext.axi import AxiRamRead, AxiReadBus

from m3vit.hw.axi import dma_cmd_layout
from m3vit.hw.striped_read import default_entry_beats
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.ddr_tb import DelayedChannel, random_pauses
from m3vit.sim.stream_tb import Bench, StreamSink, StreamSource, pack

RAM_BYTES = 1 << 18
READ_LATENCY = 32
STALL_PROBABILITY = 0.3


class TB(Bench):
    """The DMA, one RAM per port over one memory, and an AR monitor per port."""

    def __init__(self, dut) -> None:
        super().__init__(dut)
        self.config = cfg = bench_config()
        self.n_ports = cfg.n_master_ports
        self.entry_beats = default_entry_beats(self.n_ports)
        self.entry_bytes = self.entry_beats * cfg.axi_bytes
        self.memory = bytearray(self.rng().randbytes(RAM_BYTES))
        self.rams, self.ar_log = [], []
        for port in range(self.n_ports):
            ram = AxiRamRead(AxiReadBus.from_prefix(dut, f"axi__port{port}",
                                                    bus_separator="__"),
                             dut.clk, dut.rst, mem=self.memory)
            ram.ar_sink = ram.ar_channel
            ram.ar_channel = DelayedChannel(ram.ar_sink, self, READ_LATENCY)
            ram.log.setLevel("ERROR")
            self.rams.append(ram)

    async def reset(self) -> None:
        for name in ("cmd__valid", "data__ready", "clear_error"):
            self.dut[name].value = 0
        await super().reset()
        cocotb.start_soon(self._monitor())

    def stall(self) -> None:
        for ram in self.rams:
            for channel in (ram.ar_sink, ram.r_channel):
                channel.set_pause_generator(random_pauses(self.rng(), STALL_PROBABILITY))

    async def _monitor(self) -> None:
        dut = self.dut
        while True:
            await self.edge
            await ReadOnly()
            for port in range(self.n_ports):
                if dut[f"axi__port{port}__arvalid"].value and \
                        dut[f"axi__port{port}__arready"].value:
                    self.ar_log.append((port, dut[f"axi__port{port}__araddr"].value.to_unsigned(),
                                        dut[f"axi__port{port}__arlen"].value.to_unsigned() + 1))
                if dut[f"axi__port{port}__rvalid"].value:
                    assert dut[f"axi__port{port}__rready"].value, "rready low on a port"

    def commands(self, rng, count: int) -> list[tuple[int, int]]:
        """Commands at any beat of any length (a 4 KiB crossing, a zero, entry-aligned ones
        and one-beat ones among them)."""
        beat = self.config.axi_bytes
        commands = []
        for _ in range(count):
            beats = rng.randint(1, 200 * self.entry_beats)
            last = (RAM_BYTES - (beats + self.entry_beats) * beat) // beat
            commands.append((rng.randint(0, last) * beat, beats))
        commands.insert(1, (4096 - self.entry_bytes, 3 * self.entry_beats))
        commands.insert(2, (0x2000, 0))
        commands.insert(3, (0x3000 + beat, 1))
        commands.insert(4, (0x5000 - beat, 2))
        commands.insert(5, (0x6000 + 2 * beat, 3 * self.entry_beats - 1))
        return commands

    def entries_read(self, commands) -> int:
        """Entries the DMA reads for ``commands``: each rounded out to whole entries."""
        beat, e = self.config.axi_bytes, self.entry_beats
        return sum((addr // beat % e + beats + e - 1) // e for addr, beats in commands if beats)

    async def read(self, commands, *, random_flow: bool) -> list[tuple[int, int, int]]:
        """(data of the valid beats, last, beats) of every entry the DMA delivers."""
        layout = dma_cmd_layout(self.config)
        source = StreamSource(self, "cmd", gaps=random_flow)
        sink = StreamSink(self, "data", backpressure=random_flow)
        sending = cocotb.start_soon(source.send(
            [pack(layout, {"addr": a, "beats": b}) for a, b in commands]))
        e = self.entry_beats
        entries = sum((b + e - 1) // e for _, b in commands)
        payloads = await sink.receive(entries)
        await sending
        bits = 8 * self.entry_bytes
        beat_bits = 8 * self.config.axi_bytes
        out = []
        for p in payloads:
            beats = p >> (bits + 1) if e > 1 else 1
            out.append((p & ((1 << beats * beat_bits) - 1), (p >> bits) & 1, beats))
        return out

    def expected(self, commands) -> list[tuple[int, int, int]]:
        beat, e = self.config.axi_bytes, self.entry_beats
        out = []
        for addr, beats in commands:
            count = (beats + e - 1) // e
            for k in range(count):
                n = min(e, beats - k * e)
                start = addr + k * self.entry_bytes
                word = int.from_bytes(self.memory[start:start + n * beat], "little")
                out.append((word, int(k == count - 1), n))
        return out


async def _bytes_in_order(dut, random_flow: bool) -> None:
    tb = TB(dut)
    if random_flow:
        tb.stall()
    await tb.reset()
    commands = tb.commands(tb.rng(), 6)
    got = await tb.read(commands, random_flow=random_flow)
    assert got == tb.expected(commands)
    # Bursts go round-robin over the ports, burst k to port k mod N, none crossing 4 KiB.
    ports = [port for port, _, _ in tb.ar_log]
    assert ports == [k % tb.n_ports for k in range(len(ports))], ports
    for _, addr, beats in tb.ar_log:
        end = addr + beats * tb.config.axi_bytes - 1
        assert addr // 4096 == end // 4096 and beats % tb.entry_beats == 0
    await tb.cycles(4)
    assert not dut.busy.value and not dut.error.value
    total = tb.entries_read(commands) * tb.entry_bytes
    assert dut.bytes_read.value.to_unsigned() == total


@cocotb.test()
async def bytes_in_order_free(dut):
    """Nothing stalls: every command's beats in order from its first, whatever its
    alignment; ``last`` and the beat count on each command's final entry."""
    await _bytes_in_order(dut, random_flow=False)


@cocotb.test()
async def bytes_in_order_random(dut):
    """Random stalls on AR and R of every port, gaps and back-pressure on the streams."""
    await _bytes_in_order(dut, random_flow=True)


@cocotb.test()
async def ports_stream_together(dut):
    """One long aligned command: the ports together deliver ≥ 0.9 beat per port a cycle."""
    tb = TB(dut)
    await tb.reset()
    beats = 64 * tb.config.max_burst_beats * tb.n_ports
    start = tb.cycle()
    got = await tb.read([(0, beats)], random_flow=False)
    cycles = tb.cycle() - start
    assert got == tb.expected([(0, beats)])
    per_port = beats / tb.n_ports / (cycles - READ_LATENCY)
    tb.log.info("%d beats over %d ports in %d cycles: %.3f beats per port and cycle",
                beats, tb.n_ports, cycles, per_port)
    assert per_port >= 0.9, per_port
