"""cocotb bench for :class:`m3vit.hw.top.AcceleratorTop`: the host's view, through real AXI.

Run by ``tests/sim/test_top.py``; not a pytest module. The host is cocotbext-axi's
``AxiLiteMaster`` on ``s_axil`` using only the register map (``m3vit.hw.registers``);
DDR is cocotbext-axi's ``AxiRam`` on ``m_axi`` with a read latency and random stalls on
all five channels, and a poisoned page that answers SLVERR (:mod:`m3vit.sim.ddr_tb`, as in
the DMA bench).
"""

import cocotb
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam

from m3vit.hw.isa import Opcode
from m3vit.hw.registers import ID_MAGIC, REGISTER_MAP, VERSION, ErrorCode, Schedule
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.ddr_tb import POISONED, DelayedChannel, PoisonedMemory, random_pauses
from m3vit.sim.stream_tb import Bench
from m3vit.sw.bench.programs import (
    Case,
    dense_block_case,
    embedding_head_case,
    moe_routing_case,
    random_gemm_cases,
    vector_case,
)

RAM_BYTES = 1 << 18
PROGRAM_BASE = 0x1000
DATA_BASE = 0x4000
READ_LATENCY = 24
STALL_PROBABILITY = 0.2


class HostBench(Bench):
    """The accelerator with an AXI4-Lite host and an AXI4 RAM."""

    def __init__(self, dut):
        super().__init__(dut)
        self.cfg = bench_config()
        self.memory = PoisonedMemory(RAM_BYTES)
        self.ram = AxiRam(AxiBus.from_prefix(dut, "m_axi", bus_separator="__"), dut.clk,
                          dut.rst, mem=self.memory)
        read_if, write_if = self.ram.read_if, self.ram.write_if
        ar_sink = read_if.ar_channel
        self.ar = read_if.ar_channel = DelayedChannel(ar_sink, self, READ_LATENCY)
        for channel in (ar_sink, read_if.r_channel, write_if.aw_channel, write_if.w_channel,
                        write_if.b_channel):
            channel.set_pause_generator(random_pauses(self.rng(), STALL_PROBABILITY))
        for interface in (read_if, write_if):
            interface.log.setLevel("ERROR")
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil", bus_separator="__"),
                                  dut.clk, dut.rst)
        for interface in (self.axil.write_if, self.axil.read_if):
            interface.log.setLevel("WARNING")

    async def read(self, name: str) -> int:
        response = await self.axil.read(REGISTER_MAP[name].offset, 4)
        return int.from_bytes(response.data, "little")

    async def write(self, name: str, value: int) -> None:
        await self.axil.write(REGISTER_MAP[name].offset, value.to_bytes(4, "little"))

    async def run(self, case: Case, data_base: int = DATA_BASE, limit: int = 1_000_000):
        """Place the case in DDR, program the registers, start, poll; (code, pc, cycles).

        A window on the poisoned page is left as it is (it cannot be written).
        """
        self.memory[PROGRAM_BASE:PROGRAM_BASE + len(case.program)] = case.program
        if data_base != POISONED.start:
            self.memory[data_base:data_base + len(case.ddr)] = case.ddr
        for name, value in (("PROGRAM_BASE", PROGRAM_BASE), ("DATA_BASE", data_base),
                            ("DATA_SIZE", len(case.ddr))):
            await self.write(f"{name}_LO", value & 0xFFFF_FFFF)
            await self.write(f"{name}_HI", value >> 32)
        await self.write("TASK_SELECT", case.task_select)
        await self.write("SCHEDULE", case.schedule)
        self.ar.requests.clear()
        await self.write("CONTROL", REGISTER_MAP["CONTROL"].encode(START=1))
        status = REGISTER_MAP["STATUS"]
        for _ in range(limit // 50):
            await self.cycles(50)
            fields = status.decode(await self.read("STATUS"))
            if fields["DONE"] or fields["ERROR"]:
                assert not fields["BUSY"]
                code = ErrorCode(await self.read("ERROR_CODE")) if fields["ERROR"] \
                    else ErrorCode.NONE
                return code, await self.read("ERROR_PC"), await self.read("CYCLES_LO")
        raise AssertionError(f"{case.name}: not done within {limit} cycles")


@cocotb.test()
async def test_identity_registers(dut):
    """ID, VERSION and CONFIG_HASH read back what the host checks before anything else."""
    tb = HostBench(dut)
    await tb.reset()
    assert await tb.read("ID") == ID_MAGIC
    assert await tb.read("VERSION") == REGISTER_MAP["VERSION"].encode(MAJOR=VERSION[0],
                                                                      MINOR=VERSION[1])
    assert await tb.read("CONFIG_HASH") == tb.cfg.config_hash()


@cocotb.test()
async def test_dense_block_through_axi(dut):
    """The dense ``tiny`` block, driven through the registers, bit-exact; the counters."""
    tb = HostBench(dut)
    await tb.reset()
    case = dense_block_case(tb.cfg)
    code, _, cycles = await tb.run(case)
    assert code == ErrorCode.NONE, code
    case.check(bytes(tb.memory[DATA_BASE:DATA_BASE + len(case.ddr)]))
    instructions = len(case.program) // 32
    assert await tb.read("INSTRUCTIONS") == instructions - 1  # END is not retired
    read_bytes = await tb.read("DMA_READ_BYTES")
    assert read_bytes >= len(case.program) + len(case.ddr) // 2, read_bytes
    assert await tb.read("GEMM_BUSY") > 0 and await tb.read("VECTOR_BUSY") > 0
    tb.log.info("dense tiny block through AXI: %d cycles, %d bytes read, %d written", cycles,
                read_bytes, await tb.read("DMA_WRITE_BYTES"))


@cocotb.test()
async def test_errors_through_the_registers(dut):
    """Out-of-range and SLVERR runs end in ERROR with their code; the next run is right."""
    tb = HostBench(dut)
    await tb.reset()
    good = vector_case(tb.cfg, 3, Opcode.RESIDUAL, 4, tb.cfg.pe_cols)
    bad = vector_case(tb.cfg, 3, Opcode.RESIDUAL, 4, tb.cfg.pe_cols)
    bad.ddr = bad.ddr[:32]  # DATA_SIZE now ends before the STORE's destination (pc 3)
    code, pc, _ = await tb.run(bad)
    assert (code, pc) == (ErrorCode.ADDRESS_OUT_OF_RANGE, 3), (code, pc)
    # A data window on the poisoned page: the first LOAD reads SLVERR beats.
    poisoned = Case("poisoned", good.program, good.ddr)
    code, pc, _ = await tb.run(poisoned, data_base=POISONED.start)
    assert code == ErrorCode.AXI_RESPONSE, code
    code, _, _ = await tb.run(good)
    assert code == ErrorCode.NONE
    assert bytes(tb.memory[DATA_BASE:DATA_BASE + len(good.ddr)]) == good.expected


@cocotb.test()
async def test_programs_through_axi(dut):
    """Random GEMMs (every mode and weight source), the vector instructions, the embedding
    and the head, with DDR behind real AXI bursts under latency and stalls."""
    tb = HostBench(dut)
    await tb.reset()
    seed = tb.rng().getrandbits(32)
    cases = random_gemm_cases(tb.cfg, seed, 6)
    cases += [vector_case(tb.cfg, seed + i, op, rows, length) for i, (op, rows, length) in
              enumerate([(Opcode.LAYERNORM, 3, tb.cfg.max_dim), (Opcode.SOFTMAX, 5, 13),
                         (Opcode.RESIDUAL, 4, 2 * tb.cfg.pe_cols)])]
    cases.append(embedding_head_case(tb.cfg))
    for case in cases:
        code, _, cycles = await tb.run(case)
        assert code == ErrorCode.NONE, (case.name, code)
        after = bytes(tb.memory[DATA_BASE:DATA_BASE + len(case.ddr)])
        if case.check is not None:
            case.check(after)
        else:
            assert after == case.expected, f"{case.name}: DDR differs from the model"
        tb.log.info("%s: %d cycles", case.name, cycles)


@cocotb.test()
async def test_moe_weight_reads_on_the_axi_bus(dut):
    """An AXI read monitor on AR: under ``SCHEDULE.ORDER`` = expert by expert every active
    expert's block is requested exactly once per layer, an unchosen one never; token by
    token, once per choice. Same program, register-selected schedule, bit-exact both."""
    tb = HostBench(dut)
    await tb.reset()
    for routing in ("random", "some_never"):
        for schedule in Schedule:
            case = moe_routing_case(tb.cfg, 21, routing, 16, schedule=schedule.value)
            code, _, cycles = await tb.run(case)
            assert code == ErrorCode.NONE, (case.name, code)
            case.check(bytes(tb.memory[DATA_BASE:DATA_BASE + len(case.ddr)]))
            requested = [0] * len(case.meta["blocks"])
            for ar in tb.ar.requests:
                start = int(ar.araddr) - DATA_BASE
                end = start + (int(ar.arlen) + 1) * (1 << int(ar.arsize))
                for e, (base, length) in enumerate(case.meta["blocks"]):
                    requested[e] += max(0, min(end, base + length) - max(start, base))
            times = [min(c, 1) if schedule == Schedule.EXPERT_BY_EXPERT else c
                     for c in case.meta["counts"]]
            want = [n * length for n, (_, length) in zip(times, case.meta["blocks"],
                                                          strict=True)]
            assert requested == want, f"{routing} {schedule.name}: AR bytes {requested}"
            tb.log.info("%s %s: %d cycles, %d AR bursts", routing, schedule.name, cycles,
                        len(tb.ar.requests))
