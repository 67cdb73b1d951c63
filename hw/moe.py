"""The MoE expert scheduler's blocks: the dispatcher (top-k and per-expert queues) and the
combiner (score-weighted sum of each token's expert outputs).

The engine's controller (:mod:`m3vit.hw.engine.controller`) runs them for the ``ROUTE``
and ``COMBINE`` instructions (``docs/isa.md``); between the two, its ``EXPERTS`` loop walks
the tables the dispatcher built: one iteration per active expert (computation reordering:
each expert's weights are read from DDR once per layer) or, for the baseline, one per token
and choice.

* :class:`Dispatcher` takes the router output of every token from the softmax unit (the
  scores of ``numerics.router_scores`` and each expert's ``max − logit``), picks the top-k
  of the INT16 logits (``numerics.route``: largest logit first, ties to the lower expert
  index), and builds with a counting sort the per-expert token queues, the active list and
  each token's slots (expert, score, queue position).
* :class:`Combiner` computes ``numerics.moe_combine`` on words of ``pe_cols`` lanes.

Both follow the vector unit's conventions (:mod:`m3vit.hw.vector`): ``amaranth.lib.stream``
ports whose ``valid`` never depends on ``ready``, commands taken while idle and ignored when
outside the configuration, a register after every wide adder or comparator level (300 MHz),
and the combiner's output queue guarded by credits, so back-pressure never reaches into its
pipeline.
"""

from __future__ import annotations

import operator
from functools import reduce
from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from .config import AccelConfig
from .pipeline import check_config, credit_counter, output_queue, pipeline_delay, pipeline_reg
from .vector import INT8, SHIFT_BITS, SoftmaxUnit, lane_layout

__all__ = [
    "DISTANCE_BITS", "SCORES_PER_CYCLE", "SCORE_BITS", "Combiner", "Dispatcher", "slot_layout",
]

#: Experts the top-k takes a cycle (a score beat is walked this many experts a step). A
#: step's candidates are first reduced to their own top-k by a registered merge tree
#: (``ceil(log2(SCORES_PER_CYCLE))`` levels), then merged into the token's list: at 8 an
#: ``edge-moe`` token's 16 experts take 2 cycles instead of 8 at 2.
SCORES_PER_CYCLE = 8

#: Router scores are unsigned 15-bit (scale 2^-15, ``numerics.SCORE_BITS``).
SCORE_BITS = 15

#: The rank key of an expert: ``max − logit`` of its INT16 router logit, 0 … 65535.
DISTANCE_BITS = 16


def slot_layout(cfg: AccelConfig) -> data.StructLayout:
    """One choice of one token: its expert, its score and its queue position."""
    return data.StructLayout({
        "expert": unsigned(bits_for(cfg.max_experts - 1)),
        "score": unsigned(SCORE_BITS),
        "pos": unsigned(bits_for(cfg.max_tokens * cfg.max_top_k - 1)),
    })


def _merge(m: Module, first: list, second: list, keep: int, layout, name: str) -> list:
    """The ``keep`` smallest distances of two sorted lists, sorted. Combinational.

    Each list is ascending ``distance`` with its valid entries first (``(valid, entry)``
    pairs of ``layout`` views); every entry of ``first`` comes from a lower expert than any
    of ``second``, so on an equal distance ``first``'s goes ahead (ties to the lower expert
    index, as ``numerics.route``). An entry's place in the result is its own place in its
    list plus how many of the other list go ahead of it; each result place then picks the
    one entry whose place it is (an AND-OR of the candidates: no chain of inserts).
    """
    def place(index, entry, other, ahead_if_equal):
        ahead = [v & ((e.distance <= entry.distance) if ahead_if_equal
                      else (e.distance < entry.distance)) for v, e in other]
        return index + sum(ahead[1:], ahead[0])

    ranked = ([(v, e, place(i, e, second, False)) for i, (v, e) in enumerate(first)]
              + [(v, e, place(j, e, first, True)) for j, (v, e) in enumerate(second)])
    out = []
    for r in range(keep):
        hits = [v & (rank == r) for v, _, rank in ranked]
        valid = Signal(name=f"{name}_valid{r}")
        entry = Signal(layout, name=f"{name}_entry{r}")
        m.d.comb += [valid.eq(Cat(*hits).any()),
                     entry.eq(reduce(operator.or_, [Mux(hit, e.as_value(), 0) for hit, (_, e, _)
                                                    in zip(hits, ranked, strict=True)]))]
        out.append((valid, entry))
    return out


class Dispatcher(wiring.Component):
    """Top-k of each token's router logits and the per-expert token queues (counting sort).

    Bit-exact to ``numerics.route`` (the chosen experts, largest INT16 logit first, ties to
    the lower expert index, and their ``numerics.router_scores``) and to the dispatch
    tables of ``docs/isa.md`` (``ROUTE``).

    Parameters
    ----------
    cfg : AccelConfig
        ``max_tokens``, ``max_experts``, ``max_top_k`` size the tables; ``pe_cols / 2``
        experts per score beat.

    Attributes
    ----------
    cmd : In(stream.Signature(Dispatcher.cmd_layout(cfg)))
        One beat per routing: ``rows`` M (1 … ``max_tokens``), ``experts`` E
        (``top_k`` … ``max_experts``), ``top_k`` k (1 … ``max_top_k``). Taken when idle; a
        command outside these ranges is consumed and ignored (no scores are taken, the
        tables are left as they were).
    scores : In(stream.Signature(SoftmaxUnit.out_layout(cfg)))
        The softmax unit's router-mode output: per token ``ceil(E / H)`` beats of
        ``pe_cols`` unsigned 16-bit lanes, H = ``pe_cols / 2`` experts a beat: expert
        ``b·H + h`` in beat b has its score in lane h (the low 15 bits are used: router
        scores are ≤ 32767) and its distance ``max − logit`` in lane H + h. Experts ≥ E
        of the last beat are ignored. ``last`` on each token's last beat; the block counts
        the beats from E and does not look at it.
    busy : Out(1)
        A command has been taken and its tables are not complete yet.
    rows, top_k : Out
        The last completed command's M and k.
    entries : Out
        ``rows · top_k`` (queue positions in use).
    n_active : Out
        Experts with at least one token.
    list_index : In
        Position in the active list (0 … ``n_active`` − 1), in visit order.
    list_expert, list_start, list_count : Out
        One cycle after ``list_index``: that active expert e, ``start[e]`` and ``count[e]``.
    slot_addr, slot_en : In
        Read port of the slot table: token t.
    slot : Out(ArrayLayout(slot_layout(cfg), max_top_k))
        One cycle after a cycle with ``slot_en``: token t's choices j = 0 … k−1 (descending
        logit), each with its score; held while ``slot_en`` is low.
    queue_addr, queue_en : In
        Read port of the queue: position q.
    queue_token : Out
        One cycle after a cycle with ``queue_en``: the token at queue position q; held while
        ``queue_en`` is low.

    The read ports and the list lookup are valid while ``busy`` is low, after the first
    completed command (the tables are not reset). Choices j ≥ k of a slot are unspecified.

    Notes
    -----
    Three phases, ``M·S + E + M·k + 9 + L`` cycles of ``busy`` when the scores never
    wait, with S = :meth:`steps_per_token` (``ceil(E / 8)`` where ``pe_cols`` ≥ 16) and
    L = :meth:`select_levels` (3; measured; the next command is taken in the first idle
    cycle):

    1. **Top-k**, :data:`SCORES_PER_CYCLE` (8) experts a cycle (S cycles per token): the
       H experts of a score beat are walked eight a step through a shift register. A
       step's candidates are reduced to their own sorted top-k by a tree of merges (L
       register levels, lanes paired lower expert first), and that list is merged into a
       sorted list of ``max_top_k`` registers (ascending distance, i.e. descending logit:
       the distance is ``max − logit`` of one row, and unlike the score it keeps every
       LSB of the INT16 logit). A merge places each entry at its own place plus the
       number of the other list's entries ahead of it, the lower experts' list ahead on an
       equal distance, so ties go to the lower expert index. Each list entry carries its
       expert's score along. The cycle after a token's last expert, its count-so-far of
       each chosen expert (its rank in that expert's queue) is read and the counts
       incremented; the next cycle writes the token's k slots (expert, score, rank) in one
       go — the slot table is one memory per choice. M·S + 4 + L cycles: the first beat's
       take, the steps, the tree, 3 of drain.
    2. **Scan**, one expert per cycle (E + 1 cycles): ``start[e]`` is the running sum of
       the counts, and each expert with a count joins the active list in place, sorted by
       count (descending, ties to the lower expert: an insertion sort, each entry
       comparing its count with the new one). The list lookup reads place v / 2 for an
       even position v and n − 1 − (v − 1) / 2 for an odd one (n active experts): the
       largest and the smallest left in turn, ``docs/isa.md``'s visit order.
    3. **Queue**, one (token, choice) per cycle in token order (M·k + 4 cycles): read the
       slot, look up ``start[e]`` (registered), add the rank, write the queue entry and
       the slot's final position.

    ``count`` is ``max_experts`` registers (a token increments up to k of them at once),
    the active list too (expert, start, count, filled); ``start`` is a ``max_experts``-deep
    memory (LUT-RAM); the slot
    table (``max_top_k`` memories of ``max_tokens`` × 33 bits for the ZCU104) and the queue
    (``max_tokens · max_top_k`` entries) are block RAM. The slot table's read port is shared
    with the queue pass, hence valid only while idle. Between registers there is at most
    one narrow (≤ 16-bit) compare or add and its muxes, except a merge: its compares, a
    sum of up to ``max_top_k`` of their bits and an AND-OR pick; the widest muxes are the
    ``max_experts``-to-1 read of a count for a rank and the list lookup's.
    """

    @staticmethod
    def experts_per_beat(cfg: AccelConfig) -> int:
        """H = ``pe_cols / 2``: the experts of one score beat (a token is ``ceil(E / H)``
        beats)."""
        return cfg.pe_cols // 2

    @staticmethod
    def steps_per_token(cfg: AccelConfig, experts: int) -> int:
        """Cycles the top-k takes per token of ``experts`` experts: each score beat of
        H = ``pe_cols / 2`` experts is walked :data:`SCORES_PER_CYCLE` experts a cycle (one
        a cycle where H = 1)."""
        half = Dispatcher.experts_per_beat(cfg)
        step = min(SCORES_PER_CYCLE, half)
        full, rest = divmod(experts, half)
        return full * (half // step) + -(-rest // step)

    @staticmethod
    def select_levels(cfg: AccelConfig) -> int:
        """Register levels of the merge tree that reduces a step's candidates to their own
        top-k (``ceil(log2(step))``): cycles each routing's top-k takes beyond its steps."""
        return ceil_log2(min(SCORES_PER_CYCLE, Dispatcher.experts_per_beat(cfg)))

    @staticmethod
    def cmd_layout(cfg: AccelConfig) -> data.StructLayout:
        """The ``cmd`` payload."""
        return data.StructLayout({"rows": unsigned(16), "experts": unsigned(8),
                                  "top_k": unsigned(4)})

    def __init__(self, cfg: AccelConfig):
        self._cfg = check_config(cfg)
        entries = cfg.max_tokens * cfg.max_top_k
        super().__init__({
            "cmd": In(stream.Signature(self.cmd_layout(cfg))),
            "scores": In(stream.Signature(SoftmaxUnit.out_layout(cfg))),
            "busy": Out(1),
            "rows": Out(16),
            "top_k": Out(4),
            "entries": Out(range(entries + 1)),
            "n_active": Out(range(cfg.max_experts + 1)),
            "list_index": In(range(cfg.max_experts)),
            "list_expert": Out(range(cfg.max_experts)),
            "list_start": Out(range(entries + 1)),
            "list_count": Out(range(cfg.max_tokens + 1)),
            "slot_addr": In(range(cfg.max_tokens)),
            "slot_en": In(1),
            "slot": Out(data.ArrayLayout(slot_layout(cfg), cfg.max_top_k)),
            "queue_addr": In(range(entries)),
            "queue_en": In(1),
            "queue_token": Out(range(cfg.max_tokens)),
        })

    def elaborate(self, platform):
        m = Module()
        s = self._shapes()
        self._take_command(m, s)
        self._top_k(m, s)
        self._rank(m, s)
        self._scan(m, s)
        self._queue_pass(m, s)
        self._publish(m, s)
        return m

    def _shapes(self) -> SimpleNamespace:
        """The shapes the phases share; each phase adds the signals it declares."""
        cfg = self._cfg
        s = SimpleNamespace()
        s.lanes, s.n_slots, s.n_experts = cfg.pe_cols, cfg.max_top_k, cfg.max_experts
        s.half = self.experts_per_beat(cfg)
        s.step = min(SCORES_PER_CYCLE, s.half)
        s.entries = cfg.max_tokens * s.n_slots
        s.slot_shape = slot_layout(cfg)
        s.token_shape = unsigned(bits_for(cfg.max_tokens - 1))
        s.expert_shape = s.slot_shape["expert"].shape
        s.pos_shape = s.slot_shape["pos"].shape
        s.score_shape = unsigned(SCORE_BITS)
        s.lane_layout = data.StructLayout({"distance": unsigned(DISTANCE_BITS),
                                           "score": s.score_shape})
        s.candidate_layout = data.StructLayout({"distance": unsigned(DISTANCE_BITS),
                                                "score": s.score_shape,
                                                "expert": s.expert_shape})
        s.count_shape = unsigned(bits_for(cfg.max_tokens))
        s.start_shape = unsigned(bits_for(s.entries))
        max_beats = -(-s.n_experts // s.half)
        # At least one bit each, also for one beat or one choice (no zero-width signals).
        s.beat_shape = unsigned(bits_for(max_beats - 1))
        s.choice_shape = unsigned(bits_for(s.n_slots - 1))
        return s

    def _take_command(self, m: Module, s: SimpleNamespace) -> None:
        """Command: taken while idle; an illegal one is consumed and changes nothing."""
        cfg = self._cfg
        half, n_slots, n_experts = s.half, s.n_slots, s.n_experts
        s.rows_m1 = rows_m1 = Signal(s.token_shape)          # M − 1
        s.experts_m1 = experts_m1 = Signal(s.expert_shape)   # E − 1
        s.top_k_m1 = top_k_m1 = Signal(s.choice_shape)       # k − 1
        s.chosen = chosen = Signal(n_slots)                  # choice j < k (counted, queued)
        s.beats_m1 = beats_m1 = Signal(s.beat_shape)         # score beats per token − 1
        s.busy = busy = Signal()
        m.d.comb += [self.busy.eq(busy), self.cmd.ready.eq(~busy)]

        s.taking = taking = Signal()              # score beats of this command still to come
        s.in_beat = in_beat = Signal(s.beat_shape)
        s.in_token = in_token = Signal(s.token_shape)
        s.held = Signal()                         # a score beat is being walked lane by lane
        s.lane = lane = Signal(range(max(2, half)))  # ≥ 1 bit, also for H = 1
        s.lane_entries = Signal(data.ArrayLayout(s.lane_layout, half))
        s.expert = expert = Signal(s.expert_shape)   # expert of lane_entries[0]
        s.token = token = Signal(s.token_shape)      # token of lane_entries[0]
        s.count = count = Signal(data.ArrayLayout(s.count_shape, n_experts))

        with m.If(self.cmd.valid & self.cmd.ready):
            p = self.cmd.payload
            legal = ((p.rows >= 1) & (p.rows <= cfg.max_tokens) & (p.top_k >= 1)
                     & (p.top_k <= n_slots) & (p.experts >= p.top_k)
                     & (p.experts <= n_experts))
            with m.If(legal):
                m.d.sync += [
                    busy.eq(1),
                    rows_m1.eq(p.rows - 1),
                    experts_m1.eq(p.experts - 1),
                    top_k_m1.eq(p.top_k - 1),
                    chosen.eq(Cat(*(p.top_k > j for j in range(n_slots)))),
                    beats_m1.eq((p.experts - 1) >> ceil_log2(half)),
                    taking.eq(1), in_beat.eq(0), in_token.eq(0),
                    lane.eq(0), expert.eq(0), token.eq(0),
                    count.eq(0),
                ]

    def _top_k(self, m: Module, s: SimpleNamespace) -> None:
        """Top-k: :data:`SCORES_PER_CYCLE` experts a cycle through a sorted insertion list."""
        half, n_slots, P = s.half, s.n_slots, s.step
        held, lane, lane_entries = s.held, s.lane, s.lane_entries
        expert, token, in_beat = s.expert, s.token, s.in_beat
        # A beat's H experts are walked P at a time in a shift register (no wide lane mux);
        # the next beat is taken in the cycle the current one's last used lanes are, so a
        # token of E experts takes ceil(E / P) cycles a beat's worth. Framing follows from
        # E: ``last`` on the scores is not needed. (H is a power of two, so P divides it.)
        expert_end = expert + (P - 1) >= s.experts_m1   # the token's last expert is in this step
        lane_end = (lane == half - P) | expert_end
        m.d.comb += self.scores.ready.eq(s.taking & (~held | lane_end))
        with m.If(self.scores.valid & self.scores.ready):
            lanes_in = self.scores.payload.data
            m.d.sync += [lane_entries[h].eq(Cat(lanes_in[half + h], lanes_in[h][:SCORE_BITS]))
                         for h in range(half)]
            m.d.sync += [held.eq(1), in_beat.eq(Mux(in_beat == s.beats_m1, 0, in_beat + 1))]
            with m.If(in_beat == s.beats_m1):
                m.d.sync += s.in_token.eq(s.in_token + 1)
                with m.If(s.in_token == s.rows_m1):
                    m.d.sync += s.taking.eq(0)
        with m.Elif(held & lane_end):
            m.d.sync += held.eq(0)
        with m.If(held):
            m.d.sync += [lane.eq(Mux(lane_end, 0, lane + P)),
                         expert.eq(Mux(expert_end, 0, expert + P))]
            with m.If(~lane_end):
                m.d.sync += [lane_entries[h].eq(lane_entries[h + P]) for h in range(half - P)]
            with m.If(expert_end):
                m.d.sync += token.eq(token + 1)

        s.c_valid = c_valid = pipeline_reg(m, held, name="c_valid")
        # Candidate j of the step: lane j, expert + j; past the token's last expert it is
        # no candidate.
        candidates = []
        for j in range(P):
            candidate = Signal(s.candidate_layout, name=f"c_candidate{j}")
            m.d.sync += [candidate.distance.eq(lane_entries[j].distance),
                         candidate.score.eq(lane_entries[j].score),
                         candidate.expert.eq((expert + j)[:len(expert)])]
            candidates.append(candidate)
        c_takes = [pipeline_reg(m, expert + j <= s.experts_m1, name=f"c_take{j}")
                   for j in range(P)]

        # The step's own top-k: a tree of merges, lanes paired lower expert first, one
        # register level a merge level (the step's first, last, token travel beside it).
        lists = [[(take, candidate)] for take, candidate in zip(c_takes, candidates,
                                                                 strict=True)]
        levels = self.select_levels(self._cfg)
        for level in range(levels):
            merged = []
            for t, (low, high) in enumerate(zip(lists[0::2], lists[1::2], strict=True)):
                keep = min(n_slots, len(low) + len(high))
                out = _merge(m, low, high, keep, s.candidate_layout, f"t{level}_{t}")
                merged.append([(pipeline_reg(m, v, name=f"t{level}_{t}_valid{i}"),
                                pipeline_reg(m, e, s.candidate_layout,
                                            name=f"t{level}_{t}_entry{i}"))
                               for i, (v, e) in enumerate(out)])
            lists = merged
        (step_list,) = lists
        c_valid = pipeline_delay(m, c_valid, levels, name="t_valid")
        s.c_valid = c_valid
        c_first = pipeline_delay(m, pipeline_reg(m, expert == 0, name="c_first"), levels,
                                 name="t_first")
        s.c_last = pipeline_delay(m, pipeline_reg(m, expert_end, name="c_last"), levels,
                                  name="t_last")
        s.c_token = pipeline_delay(m, pipeline_reg(m, token, name="c_token"), levels,
                                   name="t_token")
        s.c_final = pipeline_delay(m, pipeline_reg(m, expert_end & (token == s.rows_m1),
                                                   name="c_final"), levels, name="t_final")

        # best[0 … max_top_k−1]: the token's smallest distances (largest logits) so far,
        # ascending; the step's list merges in behind every equal distance already listed
        # (ties to the lower expert index, which came first). The first step of a token
        # starts a fresh list.
        entry_layout = data.StructLayout({"valid": 1, "entry": s.candidate_layout})
        s.best = best = Signal(data.ArrayLayout(entry_layout, n_slots))
        current = [(best[i].valid & ~c_first, best[i].entry) for i in range(n_slots)]
        current = _merge(m, current, step_list, n_slots, s.candidate_layout, "c_merge")
        with m.If(c_valid):
            for i, (valid, entry) in enumerate(current):
                m.d.sync += [best[i].valid.eq(valid), best[i].entry.eq(entry)]

    def _rank(self, m: Module, s: SimpleNamespace) -> None:
        """The cycle after a token's last expert: each chosen expert's count so far is that
        choice's rank in the expert's queue; then the token's slots are written."""
        n_slots, count = s.n_slots, s.count
        best = [s.best[j].entry for j in range(n_slots)]
        d_valid = pipeline_reg(m, s.c_valid & s.c_last, name="d_valid")
        d_token = pipeline_reg(m, s.c_token, name="d_token")
        d_final = pipeline_reg(m, s.c_valid & s.c_final, name="d_final")
        with m.If(d_valid):
            for e in range(s.n_experts):
                hit = Cat(*((best[j].expert == e) & s.chosen[j] for j in range(n_slots))).any()
                m.d.sync += count[e].eq(count[e] + hit)
        s.r_valid = pipeline_reg(m, d_valid, name="r_valid")
        s.r_token = pipeline_reg(m, d_token, name="r_token")
        s.r_final = pipeline_reg(m, d_final, name="r_final")
        s.r_expert = [pipeline_reg(m, best[j].expert, name=f"r_expert{j}")
                      for j in range(n_slots)]
        s.r_score = [pipeline_reg(m, best[j].score, name=f"r_score{j}") for j in range(n_slots)]
        s.r_rank = [pipeline_reg(m, count[best[j].expert], s.pos_shape, name=f"r_rank{j}")
                    for j in range(n_slots)]

    def _scan(self, m: Module, s: SimpleNamespace) -> None:
        """Scan: start[e] (exclusive prefix sum of count) and the active list, kept sorted
        by count (descending, ties to the lower expert) as it fills."""
        n_experts = s.n_experts
        # start[e] is a small memory (LUT-RAM): the scan writes one entry per cycle and the
        # queue pass reads start[e] through a registered port.
        start = Memory(shape=s.start_shape, depth=n_experts, init=[])
        m.submodules.start = start
        start_write, start_read = start.write_port(), start.read_port()
        s.start_read = start_read
        # The active list: registers, each expert inserted in place as the scan reaches
        # it (an insertion sort, one entry a cycle, like the scan itself).
        entry_layout = data.StructLayout({"expert": s.expert_shape, "start": s.start_shape,
                                          "count": s.count_shape})
        s.active = active = [Signal(entry_layout, name=f"active{i}") for i in range(n_experts)]
        filled = [Signal(name=f"active{i}_filled") for i in range(n_experts)]
        scanning = Signal()
        scan_expert = Signal(s.expert_shape)
        s.total = total = Signal(s.start_shape)
        s.n_active = n_active = Signal(range(n_experts + 1))
        with m.If(s.r_final):
            m.d.sync += [scanning.eq(1), scan_expert.eq(0), total.eq(0), n_active.eq(0)]
            m.d.sync += [f.eq(0) for f in filled]
        with m.If(scanning):
            m.d.sync += scan_expert.eq(scan_expert + 1)
            with m.If(scan_expert == s.experts_m1):
                m.d.sync += scanning.eq(0)
        s_valid = pipeline_reg(m, scanning, name="s_valid")
        s_expert = pipeline_reg(m, scan_expert, name="s_expert")
        s_count = pipeline_reg(m, s.count[scan_expert], name="s_count")
        s.s_final = pipeline_reg(m, scanning & (scan_expert == s.experts_m1), name="s_final")
        m.d.comb += [
            start_write.en.eq(s_valid),
            start_write.addr.eq(s_expert),
            start_write.data.eq(total),
        ]
        new = Signal(entry_layout, name="active_new")
        m.d.comb += [new.expert.eq(s_expert), new.start.eq(total), new.count.eq(s_count)]
        # Entries with at least the new count stay (the filled ones are a sorted prefix, so
        # these are too, and an equal count came from a lower expert); the first other
        # place takes the new entry and the rest move one down.
        stays = [f & (e.count >= s_count) for f, e in zip(filled, active, strict=True)]
        with m.If(s_valid):
            m.d.sync += total.eq(total + s_count)
            with m.If(s_count != 0):
                m.d.sync += n_active.eq(n_active + 1)
                for i in range(n_experts):
                    takes_new = ~stays[i] & (stays[i - 1] if i else 1)
                    with m.If(takes_new):
                        m.d.sync += [active[i].eq(new), filled[i].eq(1)]
                    if i:
                        with m.Elif(~stays[i]):
                            m.d.sync += [active[i].eq(active[i - 1]),
                                         filled[i].eq(filled[i - 1])]

    def _queue_pass(self, m: Module, s: SimpleNamespace) -> None:
        """Queue: every (token, choice) in token order, pos = start[e] + rank."""
        cfg = self._cfg
        n_slots, slot_shape, pos_shape = s.n_slots, s.slot_shape, s.pos_shape
        issuing = Signal()
        queue_token = Signal(s.token_shape)
        queue_choice = Signal(s.choice_shape)
        with m.If(s.s_final):
            m.d.sync += [issuing.eq(1), queue_token.eq(0), queue_choice.eq(0)]
        with m.If(issuing):
            with m.If(queue_choice == s.top_k_m1):
                m.d.sync += [queue_choice.eq(0), queue_token.eq(queue_token + 1)]
                with m.If(queue_token == s.rows_m1):
                    m.d.sync += issuing.eq(0)
            with m.Else():
                m.d.sync += queue_choice.eq(queue_choice + 1)
        q1_valid = pipeline_reg(m, issuing, name="q1_valid")
        q1_token = pipeline_reg(m, queue_token, name="q1_token")
        q1_choice = pipeline_reg(m, queue_choice, name="q1_choice")
        q1_final = pipeline_reg(m, issuing & (queue_choice == s.top_k_m1)
                                & (queue_token == s.rows_m1), name="q1_final")

        # The slot table: one memory per choice, so the first pass writes a token's k
        # choices in one cycle and the queue pass rewrites one choice's position.
        table = Signal(data.ArrayLayout(slot_shape, n_slots))
        q2_slot = pipeline_reg(m, table[q1_choice], slot_shape, name="q2_slot")
        q2_valid, q2_token = pipeline_reg(m, q1_valid), pipeline_reg(m, q1_token)
        q2_choice, q2_final = pipeline_reg(m, q1_choice), pipeline_reg(m, q1_final)
        m.d.comb += s.start_read.addr.eq(q2_slot.expert)
        q3_start = s.start_read.data
        q3_slot = pipeline_reg(m, q2_slot, slot_shape, name="q3_slot")
        q3_valid, q3_token = pipeline_reg(m, q2_valid), pipeline_reg(m, q2_token)
        q3_choice, q3_final = pipeline_reg(m, q2_choice), pipeline_reg(m, q2_final)
        q4_pos = pipeline_reg(m, q3_start + q3_slot.pos, pos_shape, name="q4_pos")
        q4_slot = pipeline_reg(m, q3_slot, slot_shape, name="q4_slot")
        q4_valid, q4_token = pipeline_reg(m, q3_valid), pipeline_reg(m, q3_token)
        q4_choice, s.q4_final = pipeline_reg(m, q3_choice), pipeline_reg(m, q3_final)

        for j in range(n_slots):
            memory = Memory(shape=slot_shape, depth=cfg.max_tokens, init=[])
            m.submodules[f"slot_table{j}"] = memory
            write, read = memory.write_port(), memory.read_port()
            r_valid = s.r_valid
            m.d.comb += [
                write.en.eq(r_valid | (q4_valid & (q4_choice == j))),
                write.addr.eq(Mux(r_valid, s.r_token, q4_token)),
                write.data.expert.eq(Mux(r_valid, s.r_expert[j], q4_slot.expert)),
                write.data.score.eq(Mux(r_valid, s.r_score[j], q4_slot.score)),
                write.data.pos.eq(Mux(r_valid, s.r_rank[j], q4_pos)),
                # Shared with the outside: the tables are only read out while idle.
                read.addr.eq(Mux(s.busy, queue_token, self.slot_addr)),
                read.en.eq(s.busy | self.slot_en),
                table[j].eq(read.data),
                self.slot[j].eq(read.data),
            ]
        queue = Memory(shape=s.token_shape, depth=s.entries, init=[])
        m.submodules.queue = queue
        write, read = queue.write_port(), queue.read_port()
        m.d.comb += [
            write.en.eq(q4_valid),
            write.addr.eq(q4_pos),
            write.data.eq(q4_token),
            read.addr.eq(self.queue_addr),
            read.en.eq(self.queue_en),
            self.queue_token.eq(read.data),
        ]

    def _publish(self, m: Module, s: SimpleNamespace) -> None:
        """The completed command's figures, and the active-list lookup."""
        with m.If(s.q4_final):
            m.d.sync += [
                s.busy.eq(0),
                self.rows.eq(s.rows_m1 + 1),
                self.top_k.eq(s.top_k_m1 + 1),
                self.entries.eq(s.total),
                self.n_active.eq(s.n_active),
            ]
        # Visit v takes the sorted list's place v / 2 (v even: the largest left) or
        # n − 1 − (v − 1) / 2 (v odd: the smallest left), registered.
        half = self.list_index >> 1
        place = Signal(range(s.n_experts), name="list_place")
        m.d.comb += place.eq(Mux(self.list_index[0], s.n_active - 1 - half, half))
        m.d.sync += [
            self.list_expert.eq(Array(e.expert for e in s.active)[place]),
            self.list_start.eq(Array(e.start for e in s.active)[place]),
            self.list_count.eq(Array(e.count for e in s.active)[place]),
        ]


class Combiner(wiring.Component):
    """``numerics.moe_combine`` on words of ``pe_cols`` lanes.

    For each output word: ``out_c = sat8(round_half_up((Σ_j score_j · y_j,c) · mult /
    2^shift))`` over the command's ``top_k`` input beats.

    Parameters
    ----------
    cfg : AccelConfig
        ``pe_cols`` lanes, ``max_top_k`` inputs per output at most.

    Attributes
    ----------
    cmd : In(stream.Signature(Combiner.cmd_layout(cfg)))
        ``words`` outputs (≥ 1), ``top_k`` inputs each (1 … ``max_top_k``), ``mult``
        (uint16) and ``shift`` (0 … 63). A command outside these ranges is consumed and
        ignored.
    y : In(stream.Signature(Combiner.in_layout(cfg)))
        ``words · top_k`` beats: an expert output word (INT8 lanes) and its score.
    out : Out(stream.Signature(lane_layout(cfg)))
        ``words`` beats of INT8 lanes.
    busy : Out(1)
        A command is being taken or a beat is anywhere between ``y`` and ``out``.

    Notes
    -----
    One input beat per cycle, so an output word every k cycles; 12 cycles from a word's
    last beat taken to its output offered (measured). Per beat, w = score · mult is one
    15 × 16 multiply (the block's only DSP, two registers); each lane then forms y · w as
    the sum of the eight partial products of its INT8 y (``y_b · 2^b · w``, the sign bit
    weighted −2^7), three registered adder levels, accumulates the word's k products, adds
    ``2^(shift−1)``, shifts and saturates. Per-lane multipliers would cost 32 DSP48E2 at
    32 lanes (64 for the two-step ``(Σ score·y) · mult``), which the accelerator's DSP
    budget does not have; the adders cost LUTs instead. |Σ score·mult·y| < k·2^38, so every
    shift ≥ ``ceil(log2(k·2^38)) + 1`` (41 for k = 4) gives 0 and the hardware clamps the
    shift there. The output queue has a credit per word, taken with the word's last beat.
    """

    @staticmethod
    def cmd_layout(cfg: AccelConfig) -> data.StructLayout:
        """The ``cmd`` payload."""
        return data.StructLayout({"words": unsigned(20), "top_k": unsigned(4),
                                  "mult": unsigned(16), "shift": unsigned(SHIFT_BITS)})

    @staticmethod
    def in_layout(cfg: AccelConfig) -> data.StructLayout:
        """The ``y`` payload."""
        return data.StructLayout({"data": lane_layout(cfg, INT8), "score": unsigned(SCORE_BITS)})

    def __init__(self, cfg: AccelConfig):
        self._cfg = check_config(cfg)
        super().__init__({
            "cmd": In(stream.Signature(self.cmd_layout(cfg))),
            "y": In(stream.Signature(self.in_layout(cfg))),
            "out": Out(stream.Signature(lane_layout(cfg, INT8))),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        lanes, n_slots = cfg.pe_cols, cfg.max_top_k
        weight_max = ((1 << SCORE_BITS) - 1) * ((1 << 16) - 1)  # score · mult
        # |score·mult·y| ≤ 128·weight_max; |x| ≤ k·128·weight_max < 2^sum_bits, so every
        # shift ≥ sum_bits + 1 gives 0 ((x + 2^(s−1)) >> s with 0 < x + 2^(s−1) < 2^s): the
        # hardware shifts by min(shift, limit), which gives the same result.
        product_shape = signed((128 * weight_max).bit_length() + 1)
        sum_bits = (n_slots * 128 * weight_max).bit_length()
        limit = sum_bits + 1
        sum_shape = signed(sum_bits + 1)
        rounded_shape = signed(sum_bits + 2)
        cmd_layout = self.cmd_layout(cfg)

        active = Signal()
        words_left = Signal(cmd_layout["words"].shape)
        # At least one bit each, also for max_top_k = 1 (no zero-width signals in Verilog).
        top_k_m1 = Signal(unsigned(bits_for(n_slots - 1)))
        choice = Signal(unsigned(bits_for(n_slots - 1)))
        mult = Signal(16)
        shift = Signal(range(limit + 1))
        with m.If(~active):
            m.d.comb += self.cmd.ready.eq(1)
            with m.If(self.cmd.valid):
                p = self.cmd.payload
                m.d.sync += [
                    # Every 6-bit shift is taken (a shift past ``limit`` gives 0 as the
                    # ISA's round_shift does): refusing 63 left the controller waiting for
                    # words that never came, a hang the program fuzzer found.
                    active.eq((p.words != 0) & (p.top_k >= 1) & (p.top_k <= n_slots)),
                    words_left.eq(p.words),
                    top_k_m1.eq(p.top_k - 1),
                    choice.eq(0),
                    mult.eq(p.mult),
                    shift.eq(Mux(p.shift > limit, limit, p.shift)),
                ]

        # One credit per output word, taken with the word's last input beat.
        latency = 10
        oq, oq_w, oq_r = output_queue(m, "out_queue", lane_layout(cfg, INT8), latency + 8)
        word_end = choice == top_k_m1
        issue = Signal()
        out_free = credit_counter(m, "comb_out", oq.depth, issue & word_end, oq.r_en & oq.r_rdy)
        m.d.comb += [
            self.y.ready.eq(active & (~word_end | out_free)),
            issue.eq(self.y.valid & self.y.ready),
        ]
        with m.If(issue):
            m.d.sync += choice.eq(Mux(word_end, 0, choice + 1))
            with m.If(word_end):
                m.d.sync += words_left.eq(words_left - 1)
                with m.If(words_left == 1):
                    m.d.sync += active.eq(0)

        # c1: the beat; c2, c3: its weight w = score · mult (one multiply per beat, two
        # registers); c4: w and −w for every lane.
        c1_valid = pipeline_reg(m, issue, name="c1_valid")
        c1_first = pipeline_reg(m, choice == 0, name="c1_first")
        c1_last = pipeline_reg(m, word_end, name="c1_last")
        c1_score = pipeline_reg(m, self.y.payload.score, name="c1_score")
        c1_mult = pipeline_reg(m, mult, name="c1_mult")
        c1_shift = pipeline_reg(m, shift, name="c1_shift")
        c1_y = [pipeline_reg(m, self.y.payload.data[i], name=f"c1_y{i}") for i in range(lanes)]
        c3_weight = pipeline_delay(m, c1_score * c1_mult, 2, unsigned(2 * 16), name="c_weight")
        c4_plus = pipeline_reg(m, c3_weight, signed(2 * 16 + 1), name="c4_plus")
        c4_minus = pipeline_reg(m, -c3_weight, signed(2 * 16 + 1), name="c4_minus")

        c4_y = [pipeline_delay(m, y, 3, name=f"c_y{i}") for i, y in enumerate(c1_y)]
        # c5 … c7: y · w per lane as a sum of the eight shifted partial products of INT8 y
        # (−2^7·w for the sign bit), three registered adder levels: no DSP per lane.
        products = []
        for i, y in enumerate(c4_y):
            terms = [Mux(y[b], c4_plus << b, 0) for b in range(7)]
            terms.append(Mux(y[7], c4_minus << 7, 0))
            level = 0
            while len(terms) > 1:
                terms = [pipeline_reg(m, a + b, product_shape, name=f"c_prod{i}_l{level}_{t}")
                         for t, (a, b) in enumerate(zip(terms[0::2], terms[1::2],
                                                        strict=True))]
                level += 1
            products.append(terms[0])
        c7_valid = pipeline_delay(m, c1_valid, 6, name="c_valid")
        c7_first = pipeline_delay(m, c1_first, 6, name="c_first")
        c7_last = pipeline_delay(m, c1_last, 6, name="c_last")
        c7_shift = pipeline_delay(m, c1_shift, 6, name="c_shift")

        # c8: the word's running sum; c9: + 2^(shift−1); c10: >> shift, saturated on entry.
        sums = [Signal(sum_shape, name=f"c8_sum{i}") for i in range(lanes)]
        with m.If(c7_valid):
            m.d.sync += [s.eq(Mux(c7_first, 0, s) + p)
                         for s, p in zip(sums, products, strict=True)]
        c8_valid = pipeline_reg(m, c7_valid & c7_last, name="c8_valid")
        c8_shift = pipeline_reg(m, c7_shift, name="c8_shift")
        c8_half = pipeline_reg(m, Cat(*(c7_shift == i + 1 for i in range(limit))), name="c8_half")
        c9_valid, c9_shift = pipeline_reg(m, c8_valid), pipeline_reg(m, c8_shift)
        c9_x = [pipeline_reg(m, s + c8_half, rounded_shape, name=f"c9_x{i}")
                for i, s in enumerate(sums)]
        c10_valid = pipeline_reg(m, c9_valid, name="c10_valid")
        c10_y = [pipeline_reg(m, x >> c9_shift, rounded_shape, name=f"c10_y{i}")
                 for i, x in enumerate(c9_x)]
        m.d.comb += oq.w_en.eq(c10_valid)
        m.d.comb += [oq_w[i].eq(Mux(y > 127, 127, Mux(y < -128, -128, y)))
                     for i, y in enumerate(c10_y)]
        m.d.comb += [
            self.out.valid.eq(oq.r_rdy),
            self.out.payload.eq(oq_r),
            oq.r_en.eq(self.out.ready),
        ]

        in_flight = Signal(range(oq.depth + 1))
        m.d.sync += in_flight.eq(in_flight + (issue & word_end) - (oq.r_en & oq.r_rdy))
        m.d.comb += self.busy.eq(active | (in_flight != 0))
        return m

