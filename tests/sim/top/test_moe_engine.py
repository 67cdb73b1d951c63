"""cocotb bench of the MoE expert scheduler in :class:`m3vit.hw.engine.Engine`, bit-exact.

Run by ``tests/sim/test_top.py`` (its own Verilator build of the engine, so it runs beside
``test_engine.py``); not a pytest module. The DMA engines are played in Python
(:class:`m3vit.sim.engine_tb.DmaModel`), and its read log is the **read monitor**: every DDR
read command the engine issued, so the tests count the bytes read from each expert's block
(:func:`~m3vit.sim.engine_tb.expert_reads`), from each task's block, and from everything
else.
"""

import cocotb
from test_engine import _seed

from m3vit.hw.isa import ExpertOrder
from m3vit.hw.registers import Schedule
from m3vit.sim.engine_tb import DATA_BASE, EngineBench, expert_reads
from m3vit.sw.bench.programs import (
    BATCH_ROUTINGS,
    ROUTINGS,
    model_cases,
    moe_batch_case,
    moe_block_case,
    moe_layer_case,
    moe_routing_case,
)


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


@cocotb.parametrize(flow=["free", "random"])
async def test_moe_queue_over_inputs(dut, flow):
    """FC2's queue rows over the tokens FC1 gathers: each visit's FC1 reads what the FC2s
    before it wrote, so it must not start beside the FC2 before it (its early reads are
    for visits whose FC1 reads nothing that FC2 writes); the ISA model's window, both
    schedules."""
    tb = EngineBench(dut, flow)
    await tb.reset()
    seed = _seed(tb)
    for i, routing in enumerate(("random", "all_same", "some_never")):
        for schedule in Schedule:
            await tb.check(moe_routing_case(tb.cfg, seed + i, routing, 16,
                                            schedule=schedule.value, queue_over_inputs=True))


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


@cocotb.test()
async def test_moe_batch(dut):
    """The MoE layer over a batch of images' tokens (one ROUTE, per-expert queues over the
    batch): every image's output bit-exact against its own golden MoE layer, whether the
    images route to disjoint experts or all to the same two, under both schedules; the
    read monitor sees each active expert's weights read once per batch expert by
    expert."""
    tb = EngineBench(dut, "random")
    await tb.reset()
    for routing in BATCH_ROUTINGS:
        for batch in (2, 4) if routing == "same-two" else (2,):
            for schedule in Schedule:
                case = moe_batch_case(tb.cfg, routing, batch, seed=_seed(tb),
                                      schedule=schedule.value)
                cycles = await tb.check(case)
                counts = case.meta["counts"]
                times = [min(c, 1) if schedule == Schedule.EXPERT_BY_EXPERT else c
                         for c in counts]
                want = [k * size for k, (_, size) in zip(times, case.meta["blocks"],
                                                         strict=True)]
                assert expert_reads(tb, case) == want, (
                    f"{case.name} {schedule.name}: expert reads {expert_reads(tb, case)}")
                tb.log.info("%s %s: %d cycles, experts %s", case.name, schedule.name, cycles,
                            case.meta["chosen"])


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


@cocotb.test()
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
