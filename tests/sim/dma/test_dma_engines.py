"""cocotb bench for :mod:`m3vit.hw.axi`: read/write DMA against cocotbext-axi's AxiRam, and
the stream width converters.

Run by ``tests/sim/test_dma.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; not a
pytest module. Every transfer is compared byte for byte with the RAM model, and every AR/AW
burst with :func:`dma_tb.split_bursts` (which also means: none crosses 4 KiB, none is longer
than ``max_burst_beats``). Two flows: ``free`` (nothing stalls) and ``random`` (random
stalls on AR, R, AW, W and B, gaps on the command and data inputs, back-pressure on the
outputs). DDR answers reads :data:`dma_tb.READ_LATENCY` cycles after the AR handshake.
"""

import cocotb
from dma_tb import COUNTER_MOD, POISONED, RESIZERS, SAFE, TB

from m3vit.hw.axi import byte_beat_layout, dma_cmd_layout
from m3vit.sim.stream_tb import StreamSink, StreamSource, pack

FLOWS = ["free", "random"]
AXI_STALL_PROBABILITY = 0.3


async def start(dut, flow: str) -> TB:
    """A bench with random RAM contents, stalls per ``flow``, after reset."""
    tb = TB(dut)
    if flow == "random":
        tb.pause_axi(AXI_STALL_PROBABILITY)
    tb.fill_ram()
    await tb.reset()
    return tb


def mixed_commands(tb: TB, rng, region=SAFE) -> list[tuple[int, int]]:
    """Random lengths and addresses, a 4 KiB crossing, one beat, zero beats, one whole
    aligned burst: sent back to back."""
    max_beats = tb.config.max_burst_beats
    aligned = tb.beat_bytes * max_beats
    commands = [tb.random_command(rng, region=region) for _ in range(3)]
    commands.insert(1, tb.crossing_command(rng, region=region))
    commands += [
        tb.random_command(rng, max_beats=1, region=region),
        (tb.random_command(rng, region=region)[0], 0),
        (region.start + aligned * rng.randint(1, 16), max_beats),
        tb.crossing_command(rng, region=region),
    ]
    return commands


def cmd_payloads(tb: TB, commands: list[tuple[int, int]]) -> list[int]:
    layout = dma_cmd_layout(tb.config)
    return [pack(layout, {"addr": addr, "beats": beats}) for addr, beats in commands]


def expected_read(tb: TB, commands: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(data, last) of every beat ``commands`` must yield, from the RAM model."""
    beats = []
    for addr, count in commands:
        words = tb.beats_of(tb.ram_bytes(addr, count * tb.beat_bytes))
        beats += [(word, int(k == count - 1)) for k, word in enumerate(words)]
    return beats


async def read(tb: TB, commands: list[tuple[int, int]], flow: str) -> list[tuple[int, int]]:
    """Send ``commands`` to the read engine and collect their (data, last) beats."""
    random_flow = flow == "random"
    source = StreamSource(tb, "read__cmd", gaps=random_flow)
    sink = StreamSink(tb, "read__data", backpressure=random_flow)
    sending = cocotb.start_soon(source.send(cmd_payloads(tb, commands)))
    payloads = await sink.receive(sum(beats for _, beats in commands))
    await sending
    tb.read_source, tb.read_sink = source, sink
    return [tb.unpack_beat(p) for p in payloads]


async def write(tb: TB, commands: list[tuple[int, int]], flow: str, rng) -> bytearray:
    """Write random data with ``commands``; return the RAM contents expected afterwards."""
    random_flow = flow == "random"
    expected = bytearray(tb.memory)
    layout = byte_beat_layout(tb.beat_bytes)
    payloads = []
    for addr, beats in commands:
        content = rng.randbytes(beats * tb.beat_bytes)
        expected[addr:addr + len(content)] = content
        payloads += [pack(layout, {"data": word, "last": k == beats - 1})
                     for k, word in enumerate(tb.beats_of(content))]
    cmd_source = StreamSource(tb, "write__cmd", gaps=random_flow)
    data_source = StreamSource(tb, "write__data", gaps=random_flow)
    tb.write_source = data_source
    sending = cocotb.start_soon(cmd_source.send(cmd_payloads(tb, commands)))
    await data_source.send(payloads)
    await sending
    await tb.wait_for(lambda: tb.dut.write__pending.value == 0, "every B response back")
    assert not tb.dut.write__busy.value
    return expected


@cocotb.test(timeout_time=2, timeout_unit="ms")
@cocotb.parametrize(flow=FLOWS)
async def test_reads(dut, flow: str) -> None:
    """Commands back to back: data bit-exact, bursts as split, several bursts in flight."""
    tb = await start(dut, flow)
    commands = mixed_commands(tb, tb.rng())
    before = dut.read__bytes_read.value.to_unsigned()

    beats = await read(tb, commands, flow)

    assert beats == expected_read(tb, commands)
    tb.check_bursts(tb.ar_log, commands)
    assert tb.max_outstanding_reads > 1, tb.max_outstanding_reads
    assert tb.max_outstanding_reads <= tb.config.max_outstanding
    await tb.wait_for(lambda: not dut.read__busy.value, "read engine idle", within=8)
    n_bytes = sum(beats for _, beats in commands) * tb.beat_bytes
    assert dut.read__bytes_read.value.to_unsigned() == (before + n_bytes) % COUNTER_MOD
    assert not dut.read__error.value
    assert not tb.aw_log


@cocotb.test(timeout_time=2, timeout_unit="ms")
@cocotb.parametrize(flow=FLOWS)
async def test_writes(dut, flow: str) -> None:
    """Commands back to back: RAM bit-exact (nothing else touched), bursts as split, one
    ``done`` per non-empty command."""
    tb = await start(dut, flow)
    rng = tb.rng()
    commands = mixed_commands(tb, rng)
    before = dut.write__bytes_written.value.to_unsigned()

    expected = await write(tb, commands, flow, rng)

    assert tb.memory == expected
    tb.check_bursts(tb.aw_log, commands)
    assert tb.done_pulses == sum(beats != 0 for _, beats in commands)
    n_bytes = sum(beats for _, beats in commands) * tb.beat_bytes
    assert dut.write__bytes_written.value.to_unsigned() == (before + n_bytes) % COUNTER_MOD
    assert not dut.write__error.value
    assert not tb.ar_log


@cocotb.test(timeout_time=2, timeout_unit="ms")
@cocotb.parametrize(flow=FLOWS)
async def test_reads_and_writes_at_once(dut, flow: str) -> None:
    """Both engines share the port: reading one half of the RAM while writing the other."""
    tb = await start(dut, flow)
    rng = tb.rng()
    middle = (SAFE.start + SAFE.stop) // 2
    read_commands = mixed_commands(tb, rng, range(SAFE.start, middle))
    write_commands = mixed_commands(tb, rng, range(middle, SAFE.stop))
    expected_beats = expected_read(tb, read_commands)

    reading = cocotb.start_soon(read(tb, read_commands, flow))
    expected_ram = await write(tb, write_commands, flow, rng)
    beats = await reading

    assert beats == expected_beats
    assert tb.memory == expected_ram
    tb.check_bursts(tb.ar_log, read_commands)
    tb.check_bursts(tb.aw_log, write_commands)
    # Both directions were busy in the same cycles, not one after the other.
    assert tb.aw_log[0].cycle < tb.ar_log[-1].cycle and tb.ar_log[0].cycle < tb.aw_log[-1].cycle


@cocotb.test(timeout_time=1, timeout_unit="ms")
async def test_read_throughput(dut) -> None:
    """1,024 beats with nothing stalling: ≥ 0.9 beats per cycle after the first beat."""
    tb = await start(dut, "free")
    commands = [(0x2000, 1024)]

    beats = await read(tb, commands, "free")

    assert beats == expected_read(tb, commands)
    accepted = tb.read_sink.accepted
    rate = (len(accepted) - 1) / (accepted[-1] - accepted[0])
    latency = tb.r_first_beats[0] - tb.ar_log[0].cycle
    first_beat = accepted[0] - tb.read_source.accepted[0]
    tb.log.info("read: %.3f beats/cycle after the first beat; DDR model latency %d cycles "
                "(AR handshake to first R beat), command to first data beat %d cycles; at "
                "most %d bursts outstanding", rate, latency, first_beat,
                tb.max_outstanding_reads)
    assert rate >= 0.9, rate


@cocotb.test(timeout_time=1, timeout_unit="ms")
async def test_write_throughput(dut) -> None:
    """1,024 beats with nothing stalling: ≥ 0.9 beats per cycle taken after the first."""
    tb = await start(dut, "free")
    commands = [(0x2000, 1024)]

    expected = await write(tb, commands, "free", tb.rng())

    assert tb.memory == expected
    accepted = tb.write_source.accepted
    rate = (len(accepted) - 1) / (accepted[-1] - accepted[0])
    tb.log.info("write: %.3f beats/cycle after the first beat", rate)
    assert rate >= 0.9, rate


@cocotb.test(timeout_time=1, timeout_unit="ms")
async def test_read_error_is_sticky(dut) -> None:
    """SLVERR sets ``error``; the data still flows; only ``clear_error`` clears it."""
    tb = await start(dut, "free")
    clean = [(0x1000, 40)]
    into_poison = [(POISONED.start - 8 * tb.beat_bytes, 24)]

    assert await read(tb, clean, "free") == expected_read(tb, clean)
    assert not dut.read__error.value
    beats = await read(tb, into_poison, "free")
    good = expected_read(tb, [(into_poison[0][0], 8)])
    assert [word for word, _ in beats[:8]] == [word for word, _ in good]
    assert [last for _, last in beats] == [0] * 23 + [1]
    await tb.cycles(2)
    assert dut.read__error.value
    assert await read(tb, clean, "free") == expected_read(tb, clean)
    assert dut.read__error.value, "error must stay set until cleared"
    dut.read__clear_error.value = 1
    await tb.edge
    dut.read__clear_error.value = 0
    await tb.cycles(2)
    assert not dut.read__error.value


@cocotb.test(timeout_time=1, timeout_unit="ms")
async def test_write_error_is_sticky(dut) -> None:
    """SLVERR on B sets ``error``; ``done`` still comes for the command."""
    tb = await start(dut, "free")
    rng = tb.rng()
    into_poison = [(POISONED.start - 8 * tb.beat_bytes, 24)]

    expected = await write(tb, [(0x1000, 40)], "free", rng)
    assert tb.memory == expected
    assert not dut.write__error.value
    expected = await write(tb, into_poison, "free", rng)
    await tb.cycles(2)
    assert dut.write__error.value
    assert tb.done_pulses == 2
    good = range(into_poison[0][0], POISONED.start)
    assert tb.memory[good.start:good.stop] == expected[good.start:good.stop]
    dut.write__clear_error.value = 1
    await tb.edge
    dut.write__clear_error.value = 0
    await tb.cycles(2)
    assert not dut.write__error.value
    tb.check_bursts(tb.aw_log, [(0x1000, 40), *into_poison])


def resize_reference(beats: list[tuple[int, int]], in_bytes: int, out_bytes: int
                     ) -> list[tuple[int, int]]:
    """What :class:`~m3vit.hw.axi.StreamResize` must output for (data, last) ``beats``."""
    out = []
    if in_bytes > out_bytes:
        ratio, mask = in_bytes // out_bytes, (1 << 8 * out_bytes) - 1
        for word, last in beats:
            out += [((word >> 8 * out_bytes * k) & mask, int(last and k == ratio - 1))
                    for k in range(ratio)]
        return out
    ratio = out_bytes // in_bytes
    pieces: list[int] = []
    for word, last in beats:
        pieces.append(word)
        if len(pieces) == ratio or last:
            out.append((sum(p << 8 * in_bytes * k for k, p in enumerate(pieces)), int(last)))
            pieces = []
    return out


@cocotb.test(timeout_time=1, timeout_unit="ms")
@cocotb.parametrize(name=list(RESIZERS), flow=FLOWS)
async def test_stream_resize(dut, name: str, flow: str) -> None:
    """Random bytes in packets; up-sizing also sees ``last`` mid-beat (closed early, zero
    padded). With nothing stalling, the narrow side moves a beat every cycle."""
    tb = await start(dut, "free")
    rng = tb.rng()
    in_bytes, out_bytes = RESIZERS[name]
    ratio = max(in_bytes, out_bytes) // min(in_bytes, out_bytes)
    beats = []
    while len(beats) < 300:
        if in_bytes < out_bytes:
            # Whole output beats mostly, a ragged packet now and then.
            length = rng.randint(1, 6) * ratio
            if rng.random() < 0.25:
                length -= rng.randint(1, ratio - 1)
        else:
            length = rng.randint(1, 6)
        beats += [(rng.getrandbits(8 * in_bytes), int(k == length - 1)) for k in range(length)]
    expected = resize_reference(beats, in_bytes, out_bytes)
    random_flow = flow == "random"
    source = StreamSource(tb, f"{name}__i", gaps=random_flow)
    sink = StreamSink(tb, f"{name}__o", backpressure=random_flow)
    in_layout = byte_beat_layout(in_bytes)

    sending = cocotb.start_soon(source.send(
        [pack(in_layout, {"data": word, "last": last}) for word, last in beats]))
    received = await sink.receive(len(expected))
    await sending

    assert [tb.unpack_beat(p, 8 * out_bytes) for p in received] == expected
    if not random_flow:
        narrow = sink.accepted if in_bytes > out_bytes else source.accepted
        assert narrow[-1] - narrow[0] == len(narrow) - 1, "a narrow-side beat every cycle"
