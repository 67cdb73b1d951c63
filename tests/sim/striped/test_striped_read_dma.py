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
        """Entry-aligned commands of whole entries, a 4 KiB crossing and a zero among them."""
        commands = []
        for _ in range(count):
            entries = rng.randint(1, 200)
            last = (RAM_BYTES - entries * self.entry_bytes) // self.entry_bytes
            commands.append((rng.randint(0, last) * self.entry_bytes,
                             entries * self.entry_beats))
        commands.insert(1, (4096 - self.entry_bytes, 3 * self.entry_beats))
        commands.insert(2, (0x2000, 0))
        return commands

    async def read(self, commands, *, random_flow: bool) -> list[tuple[int, int]]:
        layout = dma_cmd_layout(self.config)
        source = StreamSource(self, "cmd", gaps=random_flow)
        sink = StreamSink(self, "data", backpressure=random_flow)
        sending = cocotb.start_soon(source.send(
            [pack(layout, {"addr": a, "beats": b}) for a, b in commands]))
        entries = sum(b for _, b in commands) // self.entry_beats
        payloads = await sink.receive(entries)
        await sending
        bits = 8 * self.entry_bytes
        return [(p & ((1 << bits) - 1), p >> bits) for p in payloads]

    def expected(self, commands) -> list[tuple[int, int]]:
        out = []
        for addr, beats in commands:
            count = beats // self.entry_beats
            for k in range(count):
                start = addr + k * self.entry_bytes
                word = int.from_bytes(self.memory[start:start + self.entry_bytes], "little")
                out.append((word, int(k == count - 1)))
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
    total = sum(b for _, b in commands) * tb.config.axi_bytes
    assert dut.bytes_read.value.to_unsigned() == total


@cocotb.test()
async def bytes_in_order_free(dut):
    """Nothing stalls: every entry right, in order, ``last`` on each command's end."""
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
