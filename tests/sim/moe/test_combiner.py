"""cocotb bench for :class:`m3vit.hw.moe.Combiner` (ports ``comb__*`` of the MoE bench top).

Run by ``tests/sim/test_moe.py`` through :func:`m3vit.sim.cocotb_runner.run_bench`; not a
pytest module. One generic test body is expanded over the data case and the flow options
(random gaps on the command and input streams, random output back-pressure); every output
word is compared with :func:`m3vit.sw.quant.numerics.moe_combine` of its k inputs and command.
"""

import itertools
from dataclasses import dataclass

import cocotb
import torch
from cocotb.triggers import ReadOnly

from m3vit.hw.moe import Combiner
from m3vit.hw.vector import lane_layout
from m3vit.sim.cocotb_runner import bench_config
from m3vit.sim.stream_tb import Bench, StreamSink, StreamSource, expand, pack
from m3vit.sw.quant import numerics

PREFIX = "comb"
INT8_MIN, INT8_MAX = -128, 127
SCORE_MAX = (1 << numerics.SCORE_BITS) - 1
MULT_MAX = (1 << 16) - 1
#: From a word's last input beat taken to its output beat offered (measured; no stall): the
#: beat register, the score·mult product (2), the ±w register, three adder levels, the sum,
#: the rounding add, the shift, the output queue.
LATENCY_CYCLES = 12


@dataclass
class Combine:
    """One command: ``words`` outputs of ``top_k`` inputs each (``y`` None: illegal)."""

    words: int
    top_k: int
    mult: int
    shift: int
    y: torch.Tensor | None = None  # (words, top_k, lanes) int64
    scores: torch.Tensor | None = None  # (words, top_k)

    @property
    def legal(self) -> bool:
        return self.y is not None


def router_like_scores(rng, words: int, k: int) -> torch.Tensor:
    """The chosen scores of ``numerics.route`` on INT16 logits: descending, summing to at
    most 2^15."""
    experts = max(k, rng.choice([4, 16]))
    logits = torch.tensor([[rng.randint(numerics.INT16_MIN, numerics.INT16_MAX)
                            for _ in range(experts)] for _ in range(words)], dtype=torch.int64)
    table = numerics.exp_table(10 ** rng.uniform(-3, 0.3))
    return numerics.route(logits, table, k)[2]


def random_combine(rng, words: int, k: int, lanes: int) -> Combine:
    y = torch.tensor([[[rng.randint(INT8_MIN, INT8_MAX) for _ in range(lanes)]
                       for _ in range(k)] for _ in range(words)], dtype=torch.int64)
    if rng.random() < 0.6:
        scores = router_like_scores(rng, words, k)
    else:
        scores = torch.tensor([[rng.randint(0, SCORE_MAX) for _ in range(k)]
                               for _ in range(words)], dtype=torch.int64)
    # Quantizer-like (Σ score·y ≈ 2^22 → INT8 needs ~22 bits of shift with mult ≈ 2^15 …
    # 2^16), or anything at all (shift 0 included).
    if rng.random() < 0.7:
        mult, shift = rng.randint(2**15, MULT_MAX), rng.randint(26, 34)
    else:
        mult, shift = rng.randint(0, MULT_MAX), rng.choice([0, 1, rng.randint(0, 63)])
    return Combine(words, k, mult, shift, y, scores)


def corner_combines(rng, cfg, limit: int) -> list[Combine]:
    """Saturation both ways, shift 0, rounding ties, and shifts around the hardware's clamp."""
    lanes, top = cfg.pe_cols, cfg.max_top_k
    commands = []
    corners = [INT8_MIN, -3, -1, 0, 1, 3, INT8_MAX]
    for k in range(1, top + 1):
        y = torch.tensor([[[rng.choice(corners) for _ in range(lanes)] for _ in range(k)]
                          for _ in range(12)], dtype=torch.int64)
        y[0], y[1] = INT8_MAX, INT8_MIN  # every lane at either end: saturates both ways
        scores = torch.tensor([[rng.choice([0, 1, 2, SCORE_MAX]) for _ in range(k)]
                               for _ in range(12)], dtype=torch.int64)
        scores[0:2] = SCORE_MAX
        for mult, shift in ((MULT_MAX, 0), (1, 0), (0, 0), (1, 1), (3, 2), (MULT_MAX, 30),
                            (MULT_MAX, limit - 1), (MULT_MAX, limit), (MULT_MAX, limit + 1),
                            (MULT_MAX, 62), (MULT_MAX, 63)):
            commands.append(Combine(12, k, mult, shift, y, scores))
    return commands


def illegal_combines(cfg) -> list[Combine]:
    """Commands outside the ranges: consumed and ignored."""
    # (Shift 63 is legal: a command that refused it left the controller waiting forever.)
    return [Combine(0, 1, 1, 0), Combine(3, 0, 1, 0), Combine(3, cfg.max_top_k + 1, 1, 0)]


def make_commands(case: str, rng, cfg, limit: int) -> list[Combine]:
    """The stimulus of one data case."""
    lanes, top = cfg.pe_cols, cfg.max_top_k
    if case == "random":
        return [random_combine(rng, rng.choice([1, 2, rng.randint(1, 24)]),
                               rng.randint(1, top), lanes) for _ in range(12)]
    if case == "corners":
        return corner_combines(rng, cfg, limit)
    if case == "illegal":
        commands = []
        for bad in illegal_combines(cfg):
            commands += [bad, random_combine(rng, rng.randint(1, 6), rng.randint(1, top), lanes)]
        # Enough legal input for the gap and back-pressure draws to show.
        return [*commands, random_combine(rng, 12, top, lanes)]
    if case == "throughput":
        return [random_combine(rng, 40, k, lanes) for k in range(1, top + 1)]
    raise ValueError(f"unknown data case {case!r}")


def shift_limit(cfg) -> int:
    """The hardware's shift clamp: every shift ≥ it gives 0 (see Combiner)."""
    weight_max = SCORE_MAX * MULT_MAX
    return (cfg.max_top_k * 128 * weight_max).bit_length() + 1


class TB:
    """The combiner's command, input and output streams."""

    def __init__(self, dut, *, input_gaps: bool, backpressure: bool) -> None:
        self.bench = Bench(dut)
        self.dut = dut
        self.cfg = bench_config()
        self.cmd_layout = Combiner.cmd_layout(self.cfg)
        self.in_layout = Combiner.in_layout(self.cfg)
        self.out_layout = lane_layout(self.cfg)
        self.stimulus_rng = self.bench.rng()
        self.cmd = StreamSource(self.bench, f"{PREFIX}__cmd", gaps=input_gaps)
        self.y = StreamSource(self.bench, f"{PREFIX}__y", gaps=input_gaps)
        self.out = StreamSink(self.bench, f"{PREFIX}__out", backpressure=backpressure)

    async def run(self, commands: list[Combine]) -> tuple[list, list]:
        """Drive every command; return (DUT words, golden words) as lists of lanes."""
        beats, expected = [], []
        for c in commands:
            if not c.legal:
                continue
            beats += [pack(self.in_layout, {"data": c.y[w, j].tolist(),
                                            "score": int(c.scores[w, j])})
                      for w in range(c.words) for j in range(c.top_k)]
            expected += numerics.moe_combine(c.y, c.scores, c.mult, c.shift).tolist()
        receiving = cocotb.start_soon(self.out.receive(len(expected)))
        sending = cocotb.start_soon(self.y.send(beats))
        await self.cmd.send([pack(self.cmd_layout, {"words": c.words, "top_k": c.top_k,
                                                    "mult": c.mult, "shift": c.shift})
                             for c in commands])
        await sending
        raw = await receiving
        return [list(self.out_layout.from_bits(word)) for word in raw], expected

    async def wait_idle(self, within: int = 8) -> None:
        busy = self.dut[f"{PREFIX}__busy"]
        for _ in range(within):
            await ReadOnly()
            if not busy.value:
                return
            await self.bench.edge
        raise AssertionError(f"busy still high {within} cycles after the last output")


def check_streaming(tb: TB, commands: list[Combine]) -> None:
    """One input beat per cycle, one output word per k beats, a fixed latency."""
    bubbles = sum(t1 - t0 - 1 for t0, t1 in itertools.pairwise(tb.y.accepted))
    assert bubbles <= len(commands), f"{bubbles} idle input cycles while streaming"
    word_ends = []
    beat = 0
    for c in commands:
        for _ in range(c.words):
            beat += c.top_k
            word_ends.append(tb.y.accepted[beat - 1])
    # accepted[] is the cycle the beat moved; the word is offered LATENCY_CYCLES later.
    latencies = {o - e for o, e in zip(tb.out.accepted, word_ends, strict=True)}
    tb.bench.log.info("latency from a word's last beat to its output: %s cycles", latencies)
    assert latencies == {LATENCY_CYCLES}, latencies
    start = 0
    for c in commands:
        spacing = {t1 - t0 for t0, t1 in itertools.pairwise(tb.out.accepted[start:start
                                                                            + c.words])}
        tb.bench.log.info("k=%d: an output word every %s cycles", c.top_k, spacing)
        assert spacing == {c.top_k}, (c.top_k, spacing)
        start += c.words


CASES = expand(["random", "corners", "illegal"], streaming_only=["throughput"])


@cocotb.test(timeout_time=10, timeout_unit="ms")
@cocotb.parametrize((("case", "input_gaps", "backpressure"), CASES))
async def test_combiner(dut, case: str, input_gaps: bool, backpressure: bool) -> None:
    """Every output word equals numerics.moe_combine of its inputs."""
    tb = TB(dut, input_gaps=input_gaps, backpressure=backpressure)
    commands = make_commands(case, tb.stimulus_rng, tb.cfg, shift_limit(tb.cfg))
    await tb.bench.reset()
    got, expected = await tb.run(commands)

    mismatches = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not mismatches, (
        f"{len(mismatches)} of {len(expected)} words differ; (word, DUT, golden): "
        f"{mismatches[:4]}"
    )
    await tb.wait_idle()
    assert not tb.dut[f"{PREFIX}__out__valid"].value, "an output word beyond the expected ones"
    if input_gaps:
        assert tb.y.idle_cycles > 0, "input_gaps=True but no idle cycle was inserted"
    if backpressure:
        assert tb.out.stall_cycles > 0, "backpressure=True but the output was never stalled"
    if case == "throughput":
        check_streaming(tb, commands)
    tb.bench.log.info("%d words checked; %d idle input cycles, %d stalled output cycles",
                      len(expected), tb.y.idle_cycles, tb.out.stall_cycles)
