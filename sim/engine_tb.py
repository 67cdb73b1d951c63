"""cocotb bench of :class:`m3vit.hw.top.Engine`: the DMA engines played in Python, programs
run from a byte-array DDR.

The bench drives the engine's ``rd_*``/``wr_*`` streams as the two DMA engines would (whole
128-bit beats; optionally random gaps on read data, random back-pressure on commands and
write data and a random write-response delay, or a fixed first-beat read latency), so the
controller, the address generators, the buffer and the units are checked on their own. A
*case* is any object with the fields of :class:`m3vit.sw.bench.programs.Case` (``program``,
``ddr``, ``expected`` or ``check``, ``error``, ``error_pc``, ``task_select``,
``schedule``); this module does not build any. Used by the engine benches in
``tests/sim/top/`` and by the benchmarks :mod:`m3vit.sw.bench.block_latency` and
:mod:`m3vit.sw.bench.moe_layer`.
"""

import collections

import cocotb
from cocotb.triggers import First, ReadOnly, RisingEdge

from m3vit.hw.isa import intake_beats
from m3vit.hw.registers import ErrorCode
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.stream_tb import Bench

PROGRAM_BASE = 0x40
DATA_BASE = 0x2000
MEMORY_BYTES = 1 << 20


class DmaModel:
    """The read and write DMA engines as seen from the engine: whole-beat byte copies.

    Parameters
    ----------
    bench : Bench
        The engine's bench (clock, random streams).
    memory : bytearray
        The DDR the commands read and write.
    random_flow : bool
        Random gaps on read data, random back-pressure on commands and write data and a
        random write-response delay; otherwise every stream is always ready.
    read_latency : int, optional
        Cycles from a read command to its first beat.
    read_rate : (float, int), optional
        ``(bytes a cycle, read-ahead bytes)``: the DDR delivers the commands' bytes at that
        rate (from a command's first beat on), at most that many bytes ahead of what the
        engine has taken (the read queues), as the SoC model's DDR does; default: an entry
        whenever the engine takes one.
    """

    def __init__(self, bench: Bench, memory: bytearray, *, random_flow: bool,
                 read_latency: int = 0, read_rate: tuple[float, int] | None = None):
        self.bench, self.dut, self.memory = bench, bench.dut, memory
        self.cfg = bench_config()
        self.beat = self.cfg.axi_bytes
        # Reads come as the engine's entries: up to this many beats (a command's last entry
        # may hold fewer, its count beside ``last``), as the striped DMA delivers them.
        self.entry_beats = intake_beats(self.cfg)
        self.rng = bench.rng()
        self.random_flow = random_flow
        self.read_latency = read_latency  # cycles from a read command to its first beat
        self.read_rate = read_rate
        # With read_rate: stream bytes requested, delivered by the DDR and taken, and the
        # cycle the delivery count was last brought up to date.
        self.requested = self.delivered = self.taken = 0.0
        self.rate_cycle = 0
        self.cycle = 0
        self.beat_hook = None     # callable(byte address, bytes) per read entry taken, if set
        self.reads = collections.deque()
        self.writes = collections.deque()
        self.write_responses = 0
        self.read_bytes = self.write_bytes = 0
        self.write_log: list[tuple[int, int]] = []
        self.read_log: list[tuple[int, int]] = []   # (byte address, bytes) per read command
        dut = self.dut
        for name in ("rd_cmd__ready", "rd_data__valid", "rd_data__payload", "wr_cmd__ready",
                     "wr_data__ready", "dma_error"):
            dut[name].value = 0
        dut.wr_idle.value = 1
        cocotb.start_soon(self._run())

    def _chance(self, p: float) -> bool:
        return not self.random_flow or self.rng.random() >= p

    def _deliver(self) -> None:
        """Bring the DDR's delivered bytes up to this cycle: the rate while a command's
        first beat is due and bytes are outstanding, never past the read-ahead."""
        rate, ahead = self.read_rate
        elapsed, self.rate_cycle = self.cycle - self.rate_cycle, self.cycle
        if self.reads and self.reads[0][2] <= self.cycle:
            self.delivered = min(self.delivered + rate * elapsed, self.requested,
                                 self.taken + ahead)

    def _delivered(self, beats: int) -> bool:
        """The DDR has delivered the head command's next ``beats`` beats."""
        return (self.read_rate is None
                or self.delivered >= self.taken + beats * self.beat - 1e-9)

    async def _run(self) -> None:
        dut, addr_mask = self.dut, (1 << self.cfg.axi_addr_width) - 1
        # Handles once, and every input driven only when its value changes: a simulator
        # access costs more than the rest of a cycle here (whole images run ~10^6 cycles).
        rd_cmd_ready, wr_cmd_ready = dut.rd_cmd__ready, dut.wr_cmd__ready
        wr_data_ready, wr_idle = dut.wr_data__ready, dut.wr_idle
        rd_valid, rd_payload = dut.rd_data__valid, dut.rd_data__payload
        rd_cmd_valid, rd_cmd_payload = dut.rd_cmd__valid, dut.rd_cmd__payload
        rd_ready = dut.rd_data__ready
        wr_cmd_valid, wr_cmd_payload = dut.wr_cmd__valid, dut.wr_cmd__payload
        wr_valid, wr_payload = dut.wr_data__valid, dut.wr_data__payload
        driven: dict = {}

        def drive(handle, value) -> None:
            value = int(value)
            if driven.get(id(handle)) != value:
                handle.value = value
                driven[id(handle)] = value

        read_beat = None          # (addr, last) being presented on rd_data
        write_cmd = None          # [addr, beats left]
        response_delay = 0
        edge = self.bench.edge
        woken = False             # resumed by a command's valid, already past this edge
        while True:
            if not woken:
                await edge
            woken = False
            self.cycle = self.bench.cycle()
            # Drive this cycle's outputs.
            cmd_ready = self._chance(0.3)
            wcmd_ready = self._chance(0.3)
            wdata_ready = write_cmd is not None and self._chance(0.3)
            drive(rd_cmd_ready, cmd_ready)
            drive(wr_cmd_ready, wcmd_ready)
            drive(wr_data_ready, wdata_ready)
            if self.read_rate is not None:
                self._deliver()
            if (read_beat is None and self.reads and self.reads[0][2] <= self.cycle
                    and self._delivered(min(self.reads[0][1], self.entry_beats))
                    and self._chance(0.3)):
                addr, beats, due = self.reads[0]
                n = min(beats, self.entry_beats)
                read_beat = (addr, beats == n, n * self.beat)
                self.reads[0] = (addr + n * self.beat, beats - n, due)
                if beats == n:
                    self.reads.popleft()
                data = int.from_bytes(self.memory[addr:addr + n * self.beat], "little")
                bits = 8 * self.beat * self.entry_beats
                count = n << (bits + 1) if self.entry_beats > 1 else 0
                rd_payload.value = data | (int(beats == n) << bits) | count
            drive(rd_valid, read_beat is not None)
            outstanding = write_cmd is not None or self.writes or response_delay > 0
            drive(wr_idle, not outstanding)
            if response_delay > 0:
                response_delay -= 1
            await ReadOnly()
            # Sample the handshakes that happen at the next edge.
            if cmd_ready and rd_cmd_valid.value:
                payload = rd_cmd_payload.value.to_unsigned()
                addr, beats = payload & addr_mask, payload >> self.cfg.axi_addr_width
                assert addr % self.beat == 0, f"unaligned read {addr:#x}"
                assert addr + beats * self.beat <= len(self.memory), "read past memory"
                if beats:
                    self.reads.append((addr, beats, self.cycle + self.read_latency))
                    self.read_log.append((addr, beats * self.beat))
                    self.requested += beats * self.beat
                self.read_bytes += beats * self.beat
            if read_beat is not None and rd_ready.value:
                if self.beat_hook is not None:
                    self.beat_hook(read_beat[0], read_beat[2])
                self.taken += read_beat[2]
                read_beat = None
            if wcmd_ready and wr_cmd_valid.value:
                payload = wr_cmd_payload.value.to_unsigned()
                addr, beats = payload & addr_mask, payload >> self.cfg.axi_addr_width
                assert addr % self.beat == 0 and addr + beats * self.beat <= len(self.memory)
                self.writes.append([addr, beats])
            if write_cmd is None and self.writes:
                write_cmd = self.writes.popleft()
            elif write_cmd is not None and wdata_ready and wr_valid.value:
                data = wr_payload.value.to_unsigned() & ((1 << 8 * self.beat) - 1)
                addr = write_cmd[0]
                self.memory[addr:addr + self.beat] = data.to_bytes(self.beat, "little")
                self.write_log.append((addr, data))
                self.write_bytes += self.beat
                write_cmd[0] += self.beat
                write_cmd[1] -= 1
                if write_cmd[1] == 0:
                    write_cmd = None
                    response_delay = self.rng.randint(1, 12) if self.random_flow else 2
            # Nothing in flight and no command offered: sleep until the engine offers one
            # (a compute-bound program leaves the DMA idle for most of its cycles).
            # What was driven this cycle stays driven while asleep: sleep only from a cycle
            # that drove no read beat, no write-data ready and an idle write side.
            quiet = (driven[id(rd_valid)] == 0 and driven[id(wr_data_ready)] == 0
                     and driven[id(wr_idle)] == 1)
            if (quiet and read_beat is None and not self.reads and write_cmd is None
                    and not self.writes and response_delay == 0
                    and not rd_cmd_valid.value and not wr_cmd_valid.value):
                await First(RisingEdge(rd_cmd_valid), RisingEdge(wr_cmd_valid))
                woken = True
            # A read beat offered and not taken, nothing else to do: sleep until the engine
            # is ready for it (the PE array computes many cycles per weight tile).
            elif (not self.random_flow and read_beat is not None and not rd_ready.value
                  and driven[id(wr_data_ready)] == 0 and driven[id(wr_idle)] == 1
                  and write_cmd is None and not self.writes and response_delay == 0
                  and not rd_cmd_valid.value and not wr_cmd_valid.value):
                await First(RisingEdge(rd_ready), RisingEdge(rd_cmd_valid),
                            RisingEdge(wr_cmd_valid))
                woken = True


class EngineBench(Bench):
    """Clock, reset, the DMA model, and a ``run`` that executes one program.

    Parameters
    ----------
    dut : cocotb handle
        The engine.
    flow : {"free", "random"}
        The DMA model's flow (see :class:`DmaModel`).
    read_latency : int, optional
        Cycles from a read command to its first beat.
    memory_bytes : int, optional
        Size of the DDR.
    read_rate : (float, int), optional
        The DDR's read rate and read-ahead (see :class:`DmaModel`).
    """

    def __init__(self, dut, flow: str, read_latency: int = 0, memory_bytes: int = MEMORY_BYTES,
                 read_rate: tuple[float, int] | None = None):
        super().__init__(dut)
        self.cfg = bench_config()
        self.memory = bytearray(memory_bytes)
        self.dma = DmaModel(self, self.memory, random_flow=flow == "random",
                            read_latency=read_latency, read_rate=read_rate)
        for name in ("start", "abort_request", "program_base", "data_base", "data_size",
                     "task_select", "schedule"):
            dut[f"ctrl__{name}"].value = 0

    async def run(self, case, limit: int = 2_000_000) -> tuple[int, int, int]:
        """Load ``case`` into memory, start, wait for done/error; (code, pc, cycles)."""
        dut = self.dut
        self.memory[:] = bytes(len(self.memory))
        self.memory[PROGRAM_BASE:PROGRAM_BASE + len(case.program)] = case.program
        self.memory[DATA_BASE:DATA_BASE + len(case.ddr)] = case.ddr
        dut.ctrl__program_base.value = PROGRAM_BASE
        dut.ctrl__data_base.value = DATA_BASE
        dut.ctrl__data_size.value = len(case.ddr)
        dut.ctrl__task_select.value = case.task_select
        dut.ctrl__schedule.value = case.schedule
        self.dma.read_log.clear()
        await self.edge
        dut.ctrl__start.value = 1
        await self.edge
        dut.ctrl__start.value = 0
        started = self.cycle()
        for _ in range(limit):
            await ReadOnly()
            if dut.ctrl__done.value or dut.ctrl__error.value:
                code = (ErrorCode(dut.ctrl__error_code.value.to_unsigned())
                        if dut.ctrl__error.value else ErrorCode.NONE)
                pc = dut.ctrl__error_pc.value.to_unsigned()
                await self.edge
                return code, pc, self.cycle() - started
            await self.edge
        raise AssertionError(f"{case.name}: no done/error within {limit} cycles")

    def window(self, case) -> bytes:
        """The case's DDR data window as it is now."""
        return bytes(self.memory[DATA_BASE:DATA_BASE + len(case.ddr)])

    async def check(self, case, limit: int = 2_000_000) -> int:
        """Run ``case`` and check its outcome.

        Parameters
        ----------
        case : Case
            The program, its DDR window and what must come of it: an error code and pc
            (the window unchanged), or the expected window, or a ``check`` of it.
        limit : int, optional
            Cycles to wait for done or error.

        Returns
        -------
        int
            Cycles from START to done or error.
        """
        code, pc, cycles = await self.run(case, limit)
        assert code == case.error, f"{case.name}: ended with {code.name}, not {case.error.name}"
        if case.error != ErrorCode.NONE:
            assert pc == case.error_pc, f"{case.name}: error at pc {pc}, not {case.error_pc}"
            assert self.window(case) == case.ddr, f"{case.name}: DDR changed by a failed run"
        elif case.check is not None:
            case.check(self.window(case))
        else:
            after = self.window(case)
            if after != case.expected:
                bad = [i for i in range(len(after)) if after[i] != case.expected[i]]
                shown = ", ".join(f"@{i}: {after[i]:#04x} not {case.expected[i]:#04x}"
                                  for i in bad[:6])
                log = ", ".join(f"{a:#x}:{d:#x}" for a, d in self.dma.write_log[-4:])
                raise AssertionError(f"{case.name}: {len(bad)} DDR bytes differ from the "
                                     f"instruction model ({shown}); last writes {log}")
        self.log.info("%s: %d cycles", case.name, cycles)
        return cycles


def expert_reads(tb: EngineBench, case) -> list[int]:
    """The read monitor: bytes the last run read from each expert's DDR block."""
    reads = [0] * len(case.meta["blocks"])
    for addr, size in tb.dma.read_log:
        offset = addr - DATA_BASE
        for e, (base, length) in enumerate(case.meta["blocks"]):
            lo, hi = max(offset, base), min(offset + size, base + length)
            if hi > lo:
                reads[e] += hi - lo
    return reads
