"""cocotb helpers for stream blocks: clock and reset, stream source and sink, the generic
test body of a stream block.

Imported by the cocotb benches of ``tests/sim/`` and by :mod:`m3vit.sim.engine_tb`. A
bench drives a top whose ports are the block's own ports, prefixed with the block's name
in a bench top that holds several blocks (``ln__x__valid``); the configuration it was
generated from comes from :func:`m3vit.sim.cocotb_runner.bench_config`.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence

import cocotb
from cocotb.clock import Clock
from cocotb.simtime import get_sim_time
from cocotb.triggers import ReadOnly, RisingEdge

CLOCK_PERIOD_NS = 10


def pack(layout, value) -> int:
    """Payload bits of ``value`` (dict / list / int) in the hardware's own ``layout``."""
    return layout.const(value).as_bits()


class Bench:
    """Clock, reset, the test's seed and derived random streams, and the cycle count.

    Parameters
    ----------
    dut : cocotb handle
        The top under test; it has a ``clk`` and an active-high ``rst``.
    """

    def __init__(self, dut) -> None:
        self.dut = dut
        self.log = dut._log
        # cocotb derives it from COCOTB_RANDOM_SEED and the test name; logged for reruns.
        self.seed = cocotb.RANDOM_SEED
        self.log.info("test seed %d", self.seed)
        self._seeds = random.Random(self.seed)
        self.edge = RisingEdge(dut.clk)
        Clock(dut.clk, CLOCK_PERIOD_NS, unit="ns").start()

    def rng(self) -> random.Random:
        """A new random stream, derived from the test's seed in call order."""
        return random.Random(self._seeds.getrandbits(64))

    def cycle(self) -> int:
        """Clock cycles since time 0."""
        return int(get_sim_time("ns")) // CLOCK_PERIOD_NS

    async def reset(self) -> None:
        """Hold ``rst`` for two cycles (every block's inputs are idle until driven)."""
        self.dut.rst.value = 1
        for _ in range(2):
            await self.edge
        self.dut.rst.value = 0
        await self.edge

    async def cycles(self, count: int) -> None:
        """Wait ``count`` rising edges."""
        for _ in range(count):
            await self.edge


class StreamSource:
    """Drives the ``valid``/``payload`` of one input stream, optionally with random gaps.

    A payload, once presented, stays unchanged until taken (``valid & ready`` in the settled
    ``ReadOnly`` phase means the DUT takes it at the next edge). ``accepted`` records the
    cycle on which each beat was taken.
    """

    def __init__(self, bench: Bench, prefix: str, *, gaps: bool, gap_probability: float = 0.3):
        self.bench = bench
        self.valid = bench.dut[f"{prefix}__valid"]
        self.ready = bench.dut[f"{prefix}__ready"]
        self.payload = bench.dut[f"{prefix}__payload"]
        self.rng = bench.rng()
        self.gaps = gaps
        self.gap_probability = gap_probability
        self.idle_cycles = 0
        self.accepted: list[int] = []
        self.valid.value = 0

    async def send(self, payloads: list[int]) -> None:
        """Present every payload in order; returns after the last one was taken."""
        position, holding = 0, False
        driven_valid, driven_payload = False, None
        while position < len(payloads):
            await self.bench.edge
            if not holding:
                valid = not (self.gaps and self.rng.random() < self.gap_probability)
                self.idle_cycles += not valid
                if valid != driven_valid:
                    driven_valid = valid
                    self.valid.value = valid
                if valid and driven_payload != payloads[position]:
                    driven_payload = payloads[position]
                    self.payload.value = driven_payload
            await ReadOnly()
            taken = driven_valid and bool(self.ready.value)
            if taken:
                self.accepted.append(self.bench.cycle())
            position += taken
            holding = driven_valid and not taken
        await self.bench.edge
        self.valid.value = 0


class StreamSink:
    """Accepts an output stream, optionally with random back-pressure, checking the rules.

    Every cycle in which ``valid`` is high and ``ready`` low, the payload must still be there,
    unchanged, on the next cycle. ``accepted`` records the cycle each beat was taken.
    """

    def __init__(self, bench: Bench, prefix: str, *, backpressure: bool,
                 stall_probability: float = 0.5):
        self.bench = bench
        self.valid = bench.dut[f"{prefix}__valid"]
        self.ready = bench.dut[f"{prefix}__ready"]
        self.payload = bench.dut[f"{prefix}__payload"]
        self.rng = bench.rng()
        self.backpressure = backpressure
        self.stall_probability = stall_probability
        self.stall_cycles = 0
        self.accepted: list[int] = []
        self.ready.value = 0

    async def receive(self, count: int) -> list[int]:
        """Collect ``count`` raw payloads."""
        beats: list[int] = []
        pending: int | None = None
        driven_ready = None
        while len(beats) < count:
            await self.bench.edge
            ready = not (self.backpressure and self.rng.random() < self.stall_probability)
            if ready != driven_ready:
                driven_ready = ready
                self.ready.value = ready
            await ReadOnly()
            valid = bool(self.valid.value)
            payload = self.payload.value.to_unsigned() if valid else None
            if pending is not None:
                assert valid and payload == pending, (
                    f"output changed before it was accepted: held {pending:#x}, now "
                    f"valid={valid} payload={payload}"
                )
            pending = payload if valid and not ready else None
            self.stall_cycles += valid and not ready
            if valid and ready:
                beats.append(payload)
                self.accepted.append(self.bench.cycle())
        await self.bench.edge
        self.ready.value = 0
        return beats


async def expect_idle(bench: Bench, prefix: str, *, within: int = 8) -> int:
    """Wait until the block's ``busy`` falls (at most ``within`` cycles); its busy count."""
    busy = bench.dut[f"{prefix}__busy"]
    for _ in range(within):
        await ReadOnly()
        if not busy.value:
            break
        await bench.edge
    else:
        raise AssertionError(f"{prefix}: busy still high {within} cycles after the last beat")
    return bench.dut[f"{prefix}__busy_cycles"].value.to_unsigned()


FLOW_OPTIONS = [(gaps, backpressure) for gaps in (False, True) for backpressure in (False, True)]
"""(input_gaps, backpressure) pairs every data case runs under."""


def expand(data_cases: list[str], streaming_only: list[str] = ()) -> list[tuple[str, bool, bool]]:
    """(case, input_gaps, backpressure) for every data case under every flow option;
    ``streaming_only`` cases (throughput measurements) run without gaps or back-pressure."""
    return [(case, gaps, bp) for case in data_cases for gaps, bp in FLOW_OPTIONS] + [
        (case, False, False) for case in streaming_only
    ]


async def check_stream_block(
    bench: Bench,
    prefix: str,
    run: Callable[[], Awaitable[tuple[list, list]]],
    *,
    golden: str,
    sources: Sequence[StreamSource],
    sink: StreamSink,
    input_gaps: bool,
    backpressure: bool,
) -> tuple[int, int]:
    """The test body every stream block shares: reset, run, compare, then the busy counter
    and proof that the flow options happened.

    Parameters
    ----------
    bench : Bench
        The bench of the block's top.
    prefix : str
        The block's port prefix; its ``busy`` and ``busy_cycles`` are checked.
    run : callable
        Drives the stimulus after the reset; returns (DUT beats, expected beats).
    golden : str
        Name of the golden function, for the mismatch message.
    sources : sequence of StreamSource
        The input streams whose idle cycles prove ``input_gaps``.
    sink : StreamSink
        The output stream whose stalls prove ``backpressure``.
    input_gaps, backpressure : bool
        The flow options the test runs under.

    Returns
    -------
    tuple of int
        (beats checked, the block's busy cycle count), for a throughput check.
    """
    await bench.reset()
    got, expected = await run()

    mismatches = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not mismatches, (
        f"{len(mismatches)} of {len(expected)} beats differ; (beat, DUT, {golden}): "
        f"{mismatches[:4]}"
    )
    busy_cycles = await expect_idle(bench, prefix)
    assert len(expected) <= busy_cycles <= bench.cycle(), (busy_cycles, bench.cycle())
    if input_gaps:
        assert all(source.idle_cycles > 0 for source in sources), (
            "input_gaps=True but no idle cycle was inserted")
    if backpressure:
        assert sink.stall_cycles > 0, "backpressure=True but the output was never stalled"
    bench.log.info("%d beats checked; %s idle input cycles, %d stalled output cycles",
                   len(expected), "/".join(str(source.idle_cycles) for source in sources),
                   sink.stall_cycles)
    return len(expected), busy_cycles
