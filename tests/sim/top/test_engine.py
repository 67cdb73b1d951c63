"""cocotb bench for :class:`m3vit.hw.top.Engine`: programs in, DDR bytes out, bit-exact.

Run by ``tests/sim/test_top.py``; not a pytest module. The bench plays the two DMA engines
in Python on the engine's ``rd_*``/``wr_*`` streams (random gaps on read data, random
back-pressure on commands and write data, a random write-response delay), so the
controller, the address generators, the buffer and the units are checked on their own;
the AXI side is checked by the DMA bench. Expected DDR contents come from the instruction
model (``m3vit.sw.isa_model``) or, for the dense block, from the golden model.
"""

import collections
import os
import sys
from pathlib import Path

import cocotb
from cocotb.triggers import First, ReadOnly, RisingEdge

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from programs import (
    ROUTINGS,
    attention_case,
    bad_program_cases,
    dense_block_case,
    embedding_head_case,
    model_cases,
    moe_block_case,
    moe_layer_case,
    moe_routing_case,
    random_gemm_cases,
    strided_load_store_case,
    task_select_case,
    vector_case,
)
from stream_tb import Bench, bench_config

from m3vit.hw.isa import ExpertOrder, Opcode
from m3vit.hw.registers import ErrorCode, Schedule

PROGRAM_BASE = 0x40
DATA_BASE = 0x2000
MEMORY_BYTES = 1 << 20
FLOWS = ["free", "random"]
ADDR_BITS = 40  # rd_cmd / wr_cmd payload: addr (axi_addr_width) then beats


class DmaModel:
    """The read and write DMA engines as seen from the engine: whole-beat byte copies."""

    def __init__(self, bench: Bench, memory: bytearray, *, random_flow: bool,
                 read_latency: int = 0):
        self.bench, self.dut, self.memory = bench, bench.dut, memory
        self.cfg = bench_config()
        self.beat = self.cfg.axi_bytes
        self.rng = bench.rng()
        self.random_flow = random_flow
        self.read_latency = read_latency  # cycles from a read command to its first beat
        self.cycle = 0
        self.beat_hook = None     # callable(byte address) per read beat taken, if set
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
            if (read_beat is None and self.reads and self.reads[0][2] <= self.cycle
                    and self._chance(0.3)):
                addr, beats, due = self.reads[0]
                read_beat = (addr, beats == 1)
                self.reads[0] = (addr + self.beat, beats - 1, due)
                if beats == 1:
                    self.reads.popleft()
                data = int.from_bytes(self.memory[addr:addr + self.beat], "little")
                rd_payload.value = data | (int(beats == 1) << (8 * self.beat))
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
                self.read_bytes += beats * self.beat
            if read_beat is not None and rd_ready.value:
                if self.beat_hook is not None:
                    self.beat_hook(read_beat[0])
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
    """Clock, reset, the DMA model, and a ``run`` that executes one program."""

    def __init__(self, dut, flow: str, read_latency: int = 0, memory_bytes: int = MEMORY_BYTES):
        super().__init__(dut)
        self.cfg = bench_config()
        self.memory = bytearray(memory_bytes)
        self.dma = DmaModel(self, self.memory, random_flow=flow == "random",
                            read_latency=read_latency)
        for name in ("start", "abort_request", "program_base", "data_base", "data_size",
                     "task_select", "schedule"):
            dut[name].value = 0

    async def run(self, case, limit: int = 2_000_000) -> tuple[int, int, int]:
        """Load ``case`` into memory, start, wait for done/error; (code, pc, cycles)."""
        dut = self.dut
        self.memory[:] = bytes(len(self.memory))
        self.memory[PROGRAM_BASE:PROGRAM_BASE + len(case.program)] = case.program
        self.memory[DATA_BASE:DATA_BASE + len(case.ddr)] = case.ddr
        dut.program_base.value = PROGRAM_BASE
        dut.data_base.value = DATA_BASE
        dut.data_size.value = len(case.ddr)
        dut.task_select.value = case.task_select
        dut.schedule.value = case.schedule
        self.dma.read_log.clear()
        await self.edge
        dut.start.value = 1
        await self.edge
        dut.start.value = 0
        started = self.cycle()
        for _ in range(limit):
            await ReadOnly()
            if dut.done.value or dut.error.value:
                code = ErrorCode(dut.error_code.value.to_unsigned()) if dut.error.value \
                    else ErrorCode.NONE
                pc = dut.error_pc.value.to_unsigned()
                await self.edge
                return code, pc, self.cycle() - started
            await self.edge
        raise AssertionError(f"{case.name}: no done/error within {limit} cycles")

    def window(self, case) -> bytes:
        return bytes(self.memory[DATA_BASE:DATA_BASE + len(case.ddr)])

    async def check(self, case) -> int:
        code, pc, cycles = await self.run(case)
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


def _seed(bench: Bench) -> int:
    return bench.rng().getrandbits(32)


@cocotb.parametrize(flow=FLOWS)
async def test_gemm_programs(dut, flow):
    """Random GEMM shapes, modes and weight sources (DDR, buffer rows, buffer columns)."""
    tb = EngineBench(dut, flow)
    await tb.reset()
    for case in random_gemm_cases(tb.cfg, _seed(tb), 10):
        await tb.check(case)


@cocotb.parametrize(flow=FLOWS)
async def test_vector_programs(dut, flow):
    """LayerNorm, softmax (ragged rows) and residual add through the buffer."""
    tb = EngineBench(dut, flow)
    await tb.reset()
    C = tb.cfg.pe_cols
    seed = _seed(tb)
    for i, (op, rows, length) in enumerate([
        (Opcode.LAYERNORM, 5, tb.cfg.max_dim), (Opcode.LAYERNORM, 1, C),
        (Opcode.SOFTMAX, 7, tb.cfg.max_tokens), (Opcode.SOFTMAX, 3, C + 1),
        (Opcode.SOFTMAX, 2, 1), (Opcode.RESIDUAL, 9, 3 * C),
    ]):
        await tb.check(vector_case(tb.cfg, seed + i, op, rows, length))
    await tb.check(strided_load_store_case(tb.cfg, seed))


@cocotb.test()
async def test_bad_programs_stop_cleanly(dut):
    """Each bad program stops with its error code and pc; the next good run is correct."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    good = vector_case(tb.cfg, 7, Opcode.RESIDUAL, 3, tb.cfg.pe_cols)
    for case in bad_program_cases(tb.cfg):
        await tb.check(case)
        await tb.check(good)


@cocotb.test(skip=os.environ.get("M3VIT_SKIP_BLOCK") == "1")
async def test_dense_block(dut):
    """A whole dense ViT block of the ``tiny`` preset, bit-exact against the golden model."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    cycles = await tb.check(dense_block_case(tb.cfg))
    tb.log.info("dense tiny block: %d cycles (%.1f us at %.0f MHz)", cycles,
                cycles / tb.cfg.clock_mhz, tb.cfg.clock_mhz)


@cocotb.test()
async def test_task_select(dut):
    """TASK_SELECT picks a task's per-task weights in one program; different results."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    outputs = set()
    for task in (0, 2, 1, 0):
        case = task_select_case(tb.cfg, 11, task)
        await tb.check(case)
        outputs.add(case.expected)
    assert len(outputs) == 3, "tasks did not select different weights"


@cocotb.test()
async def test_attention(dut):
    """Multi-head attention of a ``tiny`` block, heads and projection against golden."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    await tb.check(attention_case(tb.cfg))


@cocotb.test()
async def test_embedding_and_head(dut):
    """Patch embedding, cls and position embedding; final LayerNorm and the INT32 task head."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    await tb.check(embedding_head_case(tb.cfg))


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


@cocotb.parametrize(experts=[4, 16, 64])
async def test_moe_routing(dut, experts):
    """A MoE layer under every routing pattern and both schedules, bit-exact; the read
    monitor sees each active expert's weights read once per layer (expert by expert) or
    once per choice (token by token), and unchosen experts never."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    seed = _seed(tb)
    for i, routing in enumerate(ROUTINGS):
        cycles = {}
        for schedule in Schedule:
            case = moe_routing_case(tb.cfg, seed + i, routing, experts, schedule=schedule.value)
            cycles[schedule] = await tb.check(case)
            counts = case.meta["counts"]
            sizes = [length for _, length in case.meta["blocks"]]
            times = [min(c, 1) if schedule == Schedule.EXPERT_BY_EXPERT else c for c in counts]
            want = [n * size for n, size in zip(times, sizes, strict=True)]
            assert expert_reads(tb, case) == want, (
                f"{case.name} {schedule.name}: expert reads {expert_reads(tb, case)}, "
                f"choices per expert {counts}")
        tb.log.info("E=%d %s: %d cycles expert by expert, %d token by token", experts, routing,
                    cycles[Schedule.EXPERT_BY_EXPERT], cycles[Schedule.TOKEN_BY_TOKEN])


@cocotb.test()
async def test_moe_order_field_overrides_register(dut):
    """EXPERTS.order = EXPERT_BY_EXPERT runs that order whatever SCHEDULE.ORDER says."""
    tb = EngineBench(dut, "free")
    await tb.reset()
    case = moe_routing_case(tb.cfg, 3, "random", 16, order=ExpertOrder.EXPERT_BY_EXPERT,
                            schedule=Schedule.TOKEN_BY_TOKEN.value)
    await tb.check(case)
    assert expert_reads(tb, case) == [min(c, 1) * size for c, (_, size)
                                      in zip(case.meta["counts"], case.meta["blocks"], strict=True)]


@cocotb.test()
async def test_moe_layer_and_block(dut):
    """The ``tiny`` MoE layer (router on chip, the task's router) under both schedules and
    the whole ``tiny`` MoE block, bit-exact against the golden model, with the read
    monitor: every active expert's block read once per layer, unchosen never."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    cycles = {}
    for schedule in Schedule:
        case = moe_layer_case(tb.cfg, "tiny", schedule=schedule.value)
        cycles[schedule] = await tb.check(case)
        counts = case.meta["counts"]
        times = [min(c, 1) if schedule == Schedule.EXPERT_BY_EXPERT else c for c in counts]
        want = [n * size for n, (_, size) in zip(times, case.meta["blocks"], strict=True)]
        assert expert_reads(tb, case) == want, f"{schedule.name}: {expert_reads(tb, case)}"
    tb.log.info("tiny MoE layer: %d cycles expert by expert, %d token by token",
                cycles[Schedule.EXPERT_BY_EXPERT], cycles[Schedule.TOKEN_BY_TOKEN])
    case = moe_block_case(tb.cfg, "tiny")
    await tb.check(case)
    assert expert_reads(tb, case) == [min(c, 1) * size for c, (_, size)
                                      in zip(case.meta["counts"], case.meta["blocks"],
                                             strict=True)]


def _read_map(tb: EngineBench, image) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Bytes read per per-task block, and the reads outside them (offset, bytes)."""
    per_task = {name: 0 for name in image.regions if name.startswith("tasks.")}
    shared = []
    for addr, size in tb.dma.read_log:
        offset = addr - DATA_BASE
        hit = False
        for name in per_task:
            base, length = image.regions[name]
            lo, hi = max(offset, base), min(offset + size, base + length)
            if hi > lo:
                per_task[name] += hi - lo
                hit = True
        if not hit and offset >= 0:
            shared.append((offset, size))
    return per_task, shared


@cocotb.test(skip=os.environ.get("M3VIT_SKIP_BLOCK") == "1")
async def test_tiny_model_with_task_switches(dut):
    """The whole ``tiny`` model from one program and one DDR image: two images, each task
    in turn (a task switch between every run), every head bit-exact against the golden
    model. The read monitor: a run reads only its own task's per-task block (routers,
    head); every other read that is not an expert's is the same in every run; no expert
    block is read more than once per run and layer."""
    tb = EngineBench(dut, "free")
    await tb.reset()
    shared_reads = None
    for case in model_cases(tb.cfg, "tiny"):
        cycles = await tb.check(case)
        image = case.meta["image"]
        per_task, shared = _read_map(tb, image)
        own = f"tasks.{case.meta['task']}"
        assert per_task[own] > 0 and all(v == 0 for k, v in per_task.items() if k != own), (
            f"{case.name}: per-task reads {per_task}")
        experts = [(base, length) for name, (base, length) in image.regions.items()
                   if ".experts." in name and name.split(".")[-1].isdigit()]

        def is_expert(offset, experts=experts):
            return any(base <= offset < base + length for base, length in experts)

        non_expert = sorted(r for r in shared if not is_expert(r[0]))
        if shared_reads is None:
            shared_reads = non_expert
        assert non_expert == shared_reads, f"{case.name}: shared reads changed with the task"
        for base, length in experts:
            read = sum(max(0, min(o + s, base + length) - max(o, base)) for o, s in shared)
            assert read in (0, length), f"{case.name}: an expert block read {read} of {length}"
        tb.log.info("%s: %d cycles", case.name, cycles)
