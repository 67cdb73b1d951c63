"""The GEMM engine: the accelerator's weight-stationary INT8 PE array.

One *pass* computes, bit-exactly as :func:`m3vit.sw.quant.numerics.linear` (and ``gemm``,
``table_lookup``)::

    acc[m, n] = Σ_k X[m, k] · W[n, k] + bias[n]                  (INT8 × INT8 → INT32)
    Y[m, n]   = requantize(acc[m, n], mult[n], shift[n])         (mode INT8)
              = table[requantize(...) & 0xFF]                    (mode INT8_TABLE)
              = acc[m, n]                                        (mode INT32)
              = requantize(acc[m, n], M[m], sh[m])               (INT8, ``row_scale``)

for ``m < M`` tokens (any ``1 ≤ M ≤ max_tokens``), ``K = k_slices · pe_rows`` and
``N = n_tiles · gemm_cols`` (the compiler zero-pads K and N to whole tiles). The dataflow is
the one of ``docs/accelerator.md``: for each tile of ``gemm_cols`` output channels and each
``pe_rows``-deep slice of K, a ``pe_rows × gemm_cols`` weight tile sits in the array while
every token's K-slice streams through it, one token per cycle; the next tile loads into
the other half of a double buffer meanwhile. After the last slice of an N-tile, each
token's accumulator row is split into ``gemm_words`` words of ``pe_cols`` channels, and
bias, requantization and the optional table run on the way out, a word a cycle.

A ``row_scale`` pass (attention's P·V, :func:`m3vit.sw.quant.numerics.attention_pv`) is
requantized per token instead of per channel: its probabilities are relative to their
row's largest, so each row has its own multiplier ``M[m]`` (unsigned 16) and shift
``sh[m]`` (0…63). They ride in the token's last K-slice, in its three top lanes (which the
softmax leaves free past the row's last key, or gives a slice of its own), enter the array
as zeros, travel with the token down the pipeline and take the place of
``mult[n]``/``shift[n]`` in the same requantizer lanes: no cycle of their own.
"""

from types import SimpleNamespace

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from .config import AccelConfig
from .isa import GemmOp
from .packed import PackedArray, packed_latency
from .pipeline import credit_count, delay_like, queue_depth

__all__ = [
    "COUNTER_NAMES",
    "COUNTER_WIDTH",
    "GEMM_PARAM",
    "TABLE_ENTRIES",
    "GemmEngine",
    "Requantizer",
    "command_layout",
    "output_layout",
]

#: Entries of the output table (GELU): indexed by the INT8 value's two's-complement byte.
TABLE_ENTRIES = 256

#: Width of the performance counters; they wrap modulo 2**COUNTER_WIDTH (read twice, subtract).
COUNTER_WIDTH = 32

#: Per-output-channel parameters: INT32 bias, unsigned 16-bit multiplier, shift 0…63.
GEMM_PARAM = data.StructLayout({"bias": signed(32), "mult": unsigned(16), "shift": unsigned(6)})

#: A token's requantization in a ``row_scale`` pass: unsigned 16-bit multiplier, shift 0…63.
_ROW_SCALE = data.StructLayout({"mult": unsigned(16), "shift": unsigned(6)})

# Widths of the command's loop counts: 65,535 slices of K or tiles of N, far beyond any
# layer of the supported models (the compiler checks them against the configuration).
_COUNT_WIDTH = 16


def command_layout(config: AccelConfig) -> data.StructLayout:
    """Payload of one command: the op and, for a pass, its geometry and weight order.

    Fields ``op`` (:class:`GemmOp`), ``tokens`` (M, 1…``max_tokens``), ``k_slices``
    (K / ``pe_rows``, ≥ 1), ``n_tiles`` (N / ``gemm_cols``, ≥ 1), ``transposed``: the
    pass's weight tiles arrive column by column instead of row by row (attention's
    Q·Kᵀ, whose weight matrix K is stored token by token); legal when ``pe_rows ≤
    gemm_cols``, and ``wide``: in mode INT8, INT16 results (the router's logits), two
    words per ``pe_cols`` channels (:func:`output_layout`), and ``row_scale``: requantize
    per token (row) with the multiplier and shift its last K-slice carries in its top
    three lanes instead of the channels' ``mult``/``shift`` (attention's P·V); legal in
    mode INT8 without ``wide``, on arrays with ``pe_rows ≥ 4`` (the scale is three lanes).
    A ``LOAD_TABLE`` command ignores all but ``op``.
    """
    return data.StructLayout({
        "op": GemmOp,
        "tokens": unsigned(bits_for(config.max_tokens)),
        "k_slices": unsigned(_COUNT_WIDTH),
        "n_tiles": unsigned(_COUNT_WIDTH),
        "transposed": 1,
        "wide": 1,
        "row_scale": 1,
    })


def output_layout(config: AccelConfig) -> data.UnionLayout:
    """Payload of one output beat: one word, ``pe_cols`` channels of one token.

    ``int8`` (the low ``8 · pe_cols`` bits, upper bits zero) in the INT8 modes, ``int32`` in
    mode INT32; lane ``c`` of word ``w`` is output channel ``tile · gemm_cols + w · pe_cols +
    c``. A ``wide`` pass (INT16 results) emits ``2 · gemm_words`` words a token and tile in
    the ``int8`` bits: bits ``16c … 16c + 15`` of word ``w`` are channel ``tile · gemm_cols
    + w · pe_cols / 2 + c`` (little-endian INT16, as a buffer word holds them).
    """
    lanes = config.pe_cols
    return data.UnionLayout({
        "int8": data.ArrayLayout(signed(8), lanes),
        "int32": data.ArrayLayout(signed(32), lanes),
    })


def _pipelined_sum(m: Module, terms: list, name: str) -> tuple[Signal, int]:
    """A balanced adder tree with a register after every second level and after the root.

    Returns the registered sum and its latency in cycles. Two 17…21-bit adder levels per
    cycle close comfortably at 300 MHz on UltraScale+ carry chains.
    """
    level, latency = 0, 0
    while len(terms) > 1:
        terms = [a + b for a, b in zip(terms[0::2], terms[1::2], strict=True)]
        level += 1
        if level % 2 == 0 or len(terms) == 1:
            registered = []
            for index, term in enumerate(terms):
                reg = Signal(term.shape(), name=f"{name}_l{level}_{index}")
                m.d.sync += reg.eq(term)
                registered.append(reg)
            terms = registered
            latency += 1
    return terms[0], latency


class Requantizer(wiring.Component):
    """Per-lane bias add and requantization: ``sat8(round_half_up((acc + bias) · mult / 2^shift))``.

    Bit-exact to :func:`m3vit.sw.quant.numerics.requantize` applied to ``acc + bias`` (the sum wraps
    to INT32 as the PE accumulators do; the quantizer keeps it in range). With ``raw`` set the
    lane passes ``acc + bias`` through unchanged (multiplier 1, shift 0, no saturation); with
    ``sat16`` it saturates to INT16 instead (:func:`~m3vit.sw.quant.numerics.requantize16`).

    A fixed-latency pipeline without back-pressure (both streams are ``always_ready``):
    a beat entering on ``i`` leaves on ``o`` exactly :attr:`latency` cycles later.

    Parameters
    ----------
    lanes : int
        Channels per beat.

    Attributes
    ----------
    i : In(stream.Signature(StructLayout, always_ready=True))
        ``acc``, ``bias`` (INT32 per lane), ``mult`` (unsigned 16), ``shift`` (0…63) per
        lane, ``raw`` and ``sat16``.
    o : Out(stream.Signature(ArrayLayout(signed(32), lanes), always_ready=True))
        The INT8 (or INT16) results sign-extended, or the raw INT32 sums.
    latency : int
        Cycles from ``i`` to ``o``.

    Notes
    -----
    Stages (one register each, for 300 MHz): bias add; 32 × 16 multiply and a second
    register (the DSP48E2 M and P registers of a two-DSP cascade); rounding add; the
    variable arithmetic shift; saturation. ``acc · mult`` fits 48 bits and the rounding
    constant is at most 2^62, so the 64-bit sum never overflows.
    """

    latency = 6

    def __init__(self, lanes: int):
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes!r}")
        self.lanes = lanes
        layout = data.StructLayout({
            "acc": data.ArrayLayout(signed(32), lanes),
            "bias": data.ArrayLayout(signed(32), lanes),
            "mult": data.ArrayLayout(unsigned(16), lanes),
            "shift": data.ArrayLayout(unsigned(6), lanes),
            "raw": 1,
            "sat16": 1,
        })
        super().__init__({
            "i": In(stream.Signature(layout, always_ready=True)),
            "o": Out(stream.Signature(data.ArrayLayout(signed(32), lanes), always_ready=True)),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.i.payload
        # valid_at[k] / raw_at[k]: the flags of the beat whose stage-k registers are loaded.
        valid_at, raw_at, sat16_at = [self.i.valid], [p.raw], [p.sat16]
        for stage in range(1, self.latency + 1):
            valid_at.append(delay_like(m, valid_at[-1], 1, f"valid_s{stage}"))
            raw_at.append(delay_like(m, raw_at[-1], 1, f"raw_s{stage}"))
            sat16_at.append(delay_like(m, sat16_at[-1], 1, f"sat16_s{stage}"))
        m.d.comb += self.o.valid.eq(valid_at[self.latency])

        for lane in range(self.lanes):
            # Stage 1: bias add. The raw path reuses the multiplier (× 1, shift 0), so
            # INT32 results need no pipe of their own.
            biased = Signal(signed(32), name=f"biased_{lane}")
            mult = Signal(unsigned(16), name=f"mult_{lane}")
            shift_s1 = Signal(unsigned(6), name=f"shift_{lane}_s1")
            m.d.sync += [
                biased.eq(p.acc[lane] + p.bias[lane]),
                mult.eq(Mux(p.raw, 1, p.mult[lane])),
                shift_s1.eq(Mux(p.raw, 0, p.shift[lane])),
            ]
            # Stages 2 and 3: the product and its second register.
            product = Signal(signed(48), name=f"product_{lane}")
            product_p = Signal(signed(48), name=f"product_{lane}_p")
            m.d.sync += [product.eq(biased * mult), product_p.eq(product)]
            # Stage 4: + 2^(s-1) (0 for s = 0); stage 5: arithmetic shift = floor.
            shift_s3 = delay_like(m, shift_s1, 2, f"shift_{lane}")
            shift_s4 = delay_like(m, shift_s3, 1, f"shift_{lane}_s3")
            rounded = Signal(signed(64), name=f"rounded_{lane}")
            m.d.sync += rounded.eq(product_p + ((Const(1, 1) << shift_s3) >> 1))
            shifted = Signal(signed(49), name=f"shifted_{lane}")
            m.d.sync += shifted.eq(rounded >> shift_s4)
            # Stage 6: saturate to INT8 (INT16 with sat16) unless raw.
            hi = Mux(sat16_at[self.latency - 1], (1 << 15) - 1, 127)
            lo = Mux(sat16_at[self.latency - 1], -(1 << 15), -128)
            saturated = Mux(shifted > hi, hi, Mux(shifted < lo, lo, shifted))
            m.d.sync += self.o.payload[lane].eq(Mux(raw_at[self.latency - 1], shifted, saturated))
        return m


#: The performance counters of :class:`GemmEngine`, in the order of its ``counters`` port.
COUNTER_NAMES = (
    "busy_cycles",
    "weight_stall_cycles",
    "param_stall_cycles",
    "activation_stall_cycles",
    "output_stall_cycles",
    "token_beats",
    "weight_tiles",
)


class GemmEngine(wiring.Component):
    """Weight-stationary ``pe_rows × gemm_cols`` INT8 GEMM engine with requantization.

    One command runs one *pass*, ``Y = f(X · Wᵀ + bias)`` for ``M`` tokens, ``K =
    k_slices · pe_rows`` and ``N = n_tiles · gemm_cols`` (see the module docstring), or
    loads the output table.

    Parameters
    ----------
    config : AccelConfig
        Array shape (``pe_rows`` = K lanes, ``gemm_cols`` = ``gemm_words · pe_cols`` = N
        lanes), the result word (``pe_cols`` lanes) and ``max_tokens``.
    rows_per_beat : int
        Weight rows (or columns) per ``weights`` beat, W: a power of two dividing
        ``pe_rows`` (the ZCU104 top takes four 64-byte rows from each 256-byte read entry).
    params_per_beat : int
        Output channels' parameters per ``params`` beat, P: a power of two dividing
        ``gemm_cols``.
    table_entries : int
        Output-table entries per ``table`` beat, T: a power of two ≤ 256 (the top writes
        one AXI beat's worth, 16 entries a cycle).

    Attributes
    ----------
    command : In(stream.Signature(command_layout(config)))
        One beat per pass or table load (:func:`command_layout`, :class:`GemmOp`).
    weights : In(stream.Signature(ArrayLayout(ArrayLayout(signed(8), gemm_cols), W)))
        W weight rows a beat, ``pe_rows`` per tile, or for a ``transposed`` pass W weight
        columns, ``gemm_cols`` per tile (lane ``r`` = row ``r``); element 0 first.
    activations : In(stream.Signature(ArrayLayout(signed(8), pe_rows)))
        One token's K-slice per beat; in a ``row_scale`` pass the last K-slice's lanes
        R − 3 and R − 2 are the token's multiplier's low and high byte, lane R − 1's low 6
        bits its shift (R = ``pe_rows``), and these three lanes enter the array as 0.
    params : In(stream.Signature(ArrayLayout(GEMM_PARAM, P)))
        P output channels' bias, multiplier and shift per beat, ``gemm_cols`` per N-tile.
    table : In(stream.Signature(signed(8)))
        Table entries, taken only by a ``LOAD_TABLE`` command.
    results : Out(stream.Signature(output_layout(config)))
        One word a beat: ``pe_cols`` outputs of one token (:func:`output_layout`),
        ``gemm_words`` beats per token and N-tile.
    counters : Out(Signature)
        Free-running performance counters (:data:`COUNTER_NAMES`, :data:`COUNTER_WIDTH`
        bits, wrapping): ``busy_cycles`` (``busy`` high), ``weight_stall_cycles`` (the next
        weight tile is not complete), ``param_stall_cycles`` (the N-tile's parameters are
        not complete), ``activation_stall_cycles`` (the array could take a token but none
        is offered), ``output_stall_cycles`` (no room left for results: output
        back-pressure), ``token_beats`` (tokens through the array; each is ``pe_rows ·
        gemm_cols`` MACs) and ``weight_tiles`` (weight tiles used). Stall causes are
        counted independently: one cycle may count in more than one.
    busy : Out(1)
        A command is in progress or a result has not left yet.
    illegal_command : Out(1)
        Sticky (until reset): a pass command with ``tokens`` outside 1…``max_tokens``, a
        zero ``k_slices``/``n_tiles``, ``transposed`` set while ``pe_rows > gemm_cols``, or
        ``row_scale`` set with an op other than INT8, with ``wide``, or while ``pe_rows <
        4`` was taken and dropped. It consumes no data.

    Notes
    -----
    **Stream protocol.** Each stream is independent (its own ``valid``/``ready``); the
    order of beats *within* each stream is, for a pass with M tokens, KS = ``k_slices``,
    NT = ``n_tiles``, R = ``pe_rows``, C = ``gemm_cols``, L = ``pe_cols`` (a word), V =
    ``gemm_words`` = C / L:

    * ``command``: the pass's one beat. Commands run one after the other; a pass's first
      tokens enter the array while the previous pass's last results are still on their way
      out, so passes need no drain between them. Commands are taken ahead of the array:
      the weight loader takes the next one (it then waits in a one-entry queue until the
      array is free) as soon as every weight tile of the one before has loaded, and a
      pass's weights are taken only once its command has been.
    * ``weights``: for ``j`` in 0…NT−1, for ``s`` in 0…KS−1, for ``r`` in 0…R−1: the row
      ``[W[j·C + c, s·R + r] for c in 0…C−1]``; NT·KS·R rows, W to a beat. The tile for
      the next slice (of this pass or, if its command has been given, the next) loads
      while the current one computes: weights may run one tile ahead of the array.
      With ``transposed`` set (arrays with R ≤ C) each tile arrives column by column
      instead: for ``j``, for ``s``, for ``c`` in 0…C−1: the column ``[W[j·C + c, s·R + r]
      for r in 0…R−1]`` in an element's first R lanes (the others are ignored), i.e. row
      ``j·C + c`` of W, K-slice ``s``: one stored token of attention's K when W = K. The
      result is the same ``X · Wᵀ``.
    * ``activations``: for ``j``, for ``s``, for ``m`` in 0…M−1: ``[X[m, s·R + r] for r in
      0…R−1]``; NT·KS·M beats (X is streamed again for every N-tile). In a ``row_scale``
      pass the beats of slice ``s = KS − 1`` carry token ``m``'s scale in place of ``X[m,
      s·R + R − 3 …]``: lane R − 3 ``M[m] & 0xFF``, lane R − 2 ``M[m] >> 8``, lane R − 1
      ``sh[m]``; the array takes those lanes as 0. N-tile ``j``'s results use the scales
      its own last slice brought, so they may differ from tile to tile.
    * ``params``: for ``j``, for ``c`` in 0…C−1: ``bias``, ``mult``, ``shift`` of output
      channel ``j·C + c``; NT·C records, P to a beat, also in mode INT32 (bias only is
      used there) and in a ``row_scale`` pass (``mult`` and ``shift`` are ignored there).
      They may run one N-tile ahead (they are held until the tile's last slice).
    * ``table``: for ``LOAD_TABLE`` only, 256 / T beats of T entries, entry 0 first (in
      beat 0's element 0): entry ``i`` is the output for ``q & 0xFF == i``. It waits until
      every earlier result has left.
    * ``results``: for ``j``, for ``m``, for ``v`` in 0…V−1: lanes ``c`` = ``Y[m, j·C + v·L
      + c]``; NT·M·V beats.

    **Structure.** The array holds two ``R × C`` INT8 weight registers: ``shadow`` (loaded
    row by row, or column by column, from ``weights``: with R ≤ C each element has a
    2:1 mux on its data and on its write enable) and ``active`` (copied from ``shadow`` in
    one cycle when a slice's first token enters, so every multiplier has one fixed weight
    operand, as the B1/B2 registers of a DSP48E2). The loader takes each command before the
    issuer (a one-entry queue between them), so it always knows the weight order and tile
    count of the pass the shadow tile belongs to, also when that tile is the next pass's
    first. ``R · C`` 8 × 8 multipliers (registered), a pipelined adder tree per column (a
    register every two levels), one accumulator memory ``max_tokens × (32 · C)`` bits
    (read-modify-write, two-cycle read). A last-slice token's accumulator row goes into a
    *row queue* (:attr:`row_queue_depth` rows of ``32 · C`` bits, with a credit counter: a
    last-slice token enters the array only if the queue has room for its row, so
    back-pressure never stops the pipeline, no clock enable on wide registers); the N-tile's
    parameters wait in a two-entry queue beside it. A splitter takes a row apart into V
    words, one a cycle, into ``L`` requantizer lanes (:class:`Requantizer`, a 32 × 16
    multiply each: the lanes of one word, not of the array's width, which keeps the DSP
    count of a ``32 × 64`` array within the ZCU104's budget), a 256 × INT8 table per lane
    (``L`` copies written together, each 256 / T words of T entries: a write fills a word;
    one read port each, so each is LUT-RAM), and a word queue (its
    own credit counter in front of the requantizer). With V = 2 the results leave at half
    the array's row rate: the row queue holds the surplus of a last slice (about M / 2 rows)
    while the next N-tile's first slices compute.

    With ``pe_rows ≥ 4``, a ``row_scale`` pass's last-slice token leaves its three scale
    lanes (22 bits) in the token's tag, which travels beside it down the pipeline (22 bits
    more a stage, a few hundred registers), and puts zeros in their place into the array
    (a mask on 24 bits of the activation input). The row queue carries the scale beside
    the row, so the splitter takes it from a register like the parameters, and on to a
    2:1 mux per lane on the requantizer's multiplier and shift inputs: the same
    multipliers (no DSP added), no memory and no cycle of its own.

    **Throughput.** One token per cycle while the streams keep up. A K-slice takes at least
    ``M`` cycles and at least the ``R / W`` weight beats of the next tile plus one (the
    shadow is free again the cycle after the swap), so passes with ``M ≤ R / W`` are bound
    by the weight stream. A token reading its accumulator must enter :attr:`hazard_cycles` (4)
    cycles after its previous slice did; the engine waits for that only when ``M`` is
    below it, which the weight load already covers unless ``R = 2``. Results leave one word
    a cycle: a pass whose N-tiles have fewer than V K-slices is bound by its output. A
    ``row_scale`` pass takes exactly as long as a plain one.
    """

    def __init__(self, config: AccelConfig, rows_per_beat: int = 1, params_per_beat: int = 1,
                 table_entries: int = 1, dsp_products: int = 2):
        if not isinstance(config, AccelConfig):
            raise TypeError(f"config must be an AccelConfig, got {config!r}")
        self.config = config
        rows, cols = config.pe_rows, config.gemm_cols
        for name, value, whole in (("rows_per_beat", rows_per_beat, rows),
                                   ("params_per_beat", params_per_beat, cols),
                                   ("table_entries", table_entries, TABLE_ENTRIES)):
            if value < 1 or value & (value - 1) or whole % value:
                raise ValueError(f"{name} must be a power of two dividing {whole}, got "
                                 f"{value!r}")
        #: Weight rows (or columns) a ``weights`` beat carries; parameters a ``params`` beat.
        self.rows_per_beat = rows_per_beat
        self.params_per_beat = params_per_beat
        #: Output-table entries a ``table`` beat carries.
        self.table_entries = table_entries
        if dsp_products not in (1, 2):
            raise ValueError(f"dsp_products must be 1 or 2, got {dsp_products!r}")
        #: INT8 products per DSP48E2: 2 packs columns c and c + C/2 into one DSP
        #: (:class:`~m3vit.hw.packed.PackedArray`), 1 is a multiplier per PE.
        self.dsp_products = dsp_products
        self.command_layout = command_layout(config)
        self.output_layout = output_layout(config)
        #: Whether ``row_scale`` passes are legal: a token's scale spans three lanes.
        self.row_scale = rows >= 4
        if dsp_products == 2:
            # Chains as long as the loader's row order allows (rows_per_beat rows a cycle;
            # see PackedArray's ``group``), at most 4.
            #: DSPs per cascade chain of the packed array (None: one product per DSP).
            self.chain = next(c for c in (4, 2, 1) if rows % (rows_per_beat * c) == 0)
            #: Cycles of the array after its activation register and products: the chains,
            #: the separation and the trees of the packed array.
            self.tree_latency = packed_latency(rows, self.chain) - 2
        else:
            self.chain = None
            #: Cycles of the column adder trees (a register every two of log2(pe_rows)
            #: levels).
            self.tree_latency = (ceil_log2(rows) + 1) // 2
        # Stages after issue (stage 0): 1 activation register, 2 products, the tree, the
        # accumulate register (into the row queue); then the splitter's register, the
        # requantizer and the table read (into the word queue).
        self._sum_stage = 2 + self.tree_latency
        self._acc_stage = self._sum_stage + 1
        #: Result words a token's row becomes (``gemm_words``).
        self.words = config.gemm_words
        #: Cycles from a token entering the array to its first word entering the word queue
        #: with no back-pressure (the row queue's memory and output register: 2).
        self.result_latency = self._acc_stage + 2 + 1 + Requantizer.latency + 1
        #: Least distance (cycles) between a token's successive slices: the accumulator is
        #: read 2 cycles before the tree's sum and written the cycle after it.
        self.hazard_cycles = self._acc_stage - (self._sum_stage - 2) + 1
        #: Accumulator rows the row queue holds. Its credit loop (issue to the row's last
        #: word) needs about acc_stage + 4 for a token a cycle when rows leave as fast as
        #: they come (one word a row); with several words a row it also holds the surplus
        #: of a last slice, M (1 − 1 / words) rows, for every M up to ``max_tokens``: a
        #: batch's pass over 387 tokens or more then never stops the array for its results
        #: (they leave while the next N-tile's first slices compute). 512 rows of the
        #: ZCU104's 2,048-bit rows are 29 block RAMs, where 64 were ~2.7 k LUTs of LUT-RAM.
        surplus = -(-config.max_tokens * (self.words - 1) // self.words)
        self.row_queue_depth = queue_depth(self._acc_stage + 4 if self.words == 1
                                           else max(64, self._acc_stage + 4, surplus))
        #: Result words the word queue holds: its credit loop, splitter to taken, is about
        #: Requantizer.latency + 5 cycles.
        self.queue_depth = queue_depth(Requantizer.latency + 6)
        counters = wiring.Signature({name: Out(COUNTER_WIDTH) for name in COUNTER_NAMES})
        super().__init__({
            "command": In(stream.Signature(self.command_layout)),
            "weights": In(stream.Signature(data.ArrayLayout(data.ArrayLayout(signed(8), cols),
                                                            rows_per_beat))),
            "activations": In(stream.Signature(data.ArrayLayout(signed(8), rows))),
            "params": In(stream.Signature(data.ArrayLayout(GEMM_PARAM, params_per_beat))),
            "table": In(stream.Signature(data.ArrayLayout(signed(8), table_entries))),
            "results": Out(stream.Signature(self.output_layout)),
            "counters": Out(counters),
            "busy": Out(1),
            "illegal_command": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        s = SimpleNamespace()   # what the sections share; each adds what it declares
        self._take_commands(m, s)
        self._start_passes(m, s)
        self._load_weights(m, s)
        self._load_params(m, s)
        self._issue(m, s)
        self._array(m, s)
        self._output(m, s)
        self._count(m, s)
        return m

    def _take_commands(self, m: Module, s: SimpleNamespace) -> None:
        """Commands: the weight loader takes them, a one-entry queue holds them."""
        cfg = self.config
        # The loader fills the shadow tile up to one tile ahead of the array, so that tile
        # may belong to the next pass, whose weight order it must know: commands reach the
        # loader first (it learns the pass's order and tile count) and wait in `queued`
        # for the issuer. A command is taken once the loader has filled every tile of the
        # previous pass, early enough for the next pass's first tile to load while the
        # previous pass's last one computes.
        # Column order needs a tile column (pe_rows lanes) to fit in a beat's element.
        columns = cfg.pe_rows <= cfg.gemm_cols
        count_shape = unsigned(_COUNT_WIDTH)
        pass_fields = {
            "op": GemmOp,
            "wide": 1,
            "last_token": range(cfg.max_tokens),
            "last_kslice": count_shape,
            "last_ntile": count_shape,
            "slice_gap": range(self.hazard_cycles + 1),
        }
        if self.row_scale:
            pass_fields["row_scale"] = 1
        s.pass_layout = data.StructLayout(pass_fields)
        s.queued = queued = Signal()  # a command waits for the issuer
        s.queued_pass = queued_pass = Signal(s.pass_layout)
        s.loader_busy = loader_busy = Signal()  # tiles of a taken pass are left to load
        s.load_transposed = load_transposed = Signal()  # ... column by column
        # Further K-slices of the loader's N-tile, further N-tiles.
        s.load_slices_left = load_slices_left = Signal(count_shape)
        s.load_tiles_left = load_tiles_left = Signal(count_shape)
        s.load_last_kslice = load_last_kslice = Signal(count_shape)

        cmd = self.command.payload
        m.d.comb += self.command.ready.eq(~loader_busy & ~queued)
        with m.If(self.command.valid & self.command.ready):
            legal = ((cmd.tokens >= 1) & (cmd.tokens <= cfg.max_tokens)
                     & (cmd.k_slices != 0) & (cmd.n_tiles != 0))
            if not columns:
                legal &= ~cmd.transposed
            # Per-token scales replace the INT8 requantization's mult and shift: not the
            # INT16 (router) or INT32 outputs, nor the table's; a token's scale spans three
            # lanes, more than a pe_rows = 2 array's K-slice.
            if self.row_scale:
                legal &= ~cmd.row_scale | ((cmd.op == GemmOp.INT8) & ~cmd.wide)
            else:
                legal &= ~cmd.row_scale
            with m.If(cmd.op == GemmOp.LOAD_TABLE):
                m.d.sync += [queued.eq(1), queued_pass.op.eq(GemmOp.LOAD_TABLE)]
            with m.Elif(legal):
                m.d.sync += [
                    queued.eq(1),
                    queued_pass.op.eq(cmd.op),
                    queued_pass.wide.eq(cmd.wide & (cmd.op == GemmOp.INT8)),
                    queued_pass.last_token.eq(cmd.tokens - 1),
                    queued_pass.last_kslice.eq(cmd.k_slices - 1),
                    queued_pass.last_ntile.eq(cmd.n_tiles - 1),
                    queued_pass.slice_gap.eq(Mux(cmd.tokens >= self.hazard_cycles, 1,
                                                 self.hazard_cycles + 1 - cmd.tokens)),
                    loader_busy.eq(1),
                    load_slices_left.eq(cmd.k_slices - 1),
                    load_tiles_left.eq(cmd.n_tiles - 1),
                    load_last_kslice.eq(cmd.k_slices - 1),
                ]
                if columns:
                    m.d.sync += load_transposed.eq(cmd.transposed)
                if self.row_scale:
                    m.d.sync += queued_pass.row_scale.eq(cmd.row_scale)
            with m.Else():
                m.d.sync += self.illegal_command.eq(1)

    def _start_passes(self, m: Module, s: SimpleNamespace) -> None:
        """The issuer's pass: the queued command becomes the current one."""
        cfg = self.config
        count_shape = unsigned(_COUNT_WIDTH)
        s.issuing = issuing = Signal()  # a pass has tokens left to enter the array
        s.loading_table = loading_table = Signal()
        s.current = current = Signal(s.pass_layout)
        s.token = Signal(range(cfg.max_tokens))
        s.kslice = Signal(count_shape)
        s.ntile = Signal(count_shape)
        # Last-slice tokens whose row has not left the row queue yet; words on their way
        # from the splitter through the word queue (set by _output).
        s.pending = pending = Signal(range(self.row_queue_depth + 1))
        s.words_out = Signal()
        m.d.comb += self.busy.eq(s.queued | issuing | loading_table | (pending != 0)
                                 | s.words_out)
        with m.If(s.queued & ~issuing & ~loading_table):
            m.d.sync += s.queued.eq(0)
            with m.If(s.queued_pass.op == GemmOp.LOAD_TABLE):
                m.d.sync += loading_table.eq(1)
            with m.Else():
                m.d.sync += [issuing.eq(1), current.eq(s.queued_pass)]

    def _load_weights(self, m: Module, s: SimpleNamespace) -> None:
        """The weight double buffer: the loader fills the shadow tile."""
        rows, cols = self.config.pe_rows, self.config.gemm_cols
        tile_layout = data.ArrayLayout(data.ArrayLayout(signed(8), cols), rows)
        s.w_shadow = w_shadow = Signal(tile_layout)
        s.w_active = Signal(tile_layout)
        W = self.rows_per_beat
        # The first row (or column) of the beat within the tile, a multiple of W.
        s.w_row = w_row = Signal(range(max(rows, cols)))
        s.w_full = w_full = Signal()
        # With packed DSPs, chain position k takes the shadow tile k cycles after the swap:
        # row by row the loader never overtakes it (PackedArray's group), but a column
        # load writes every row, so it waits until the last position has taken the tile.
        s.swap_wait = None
        if self.dsp_products == 2 and self.chain > 1:
            s.swap_wait = swap_wait = Signal(range(self.chain))
            with m.If(swap_wait != 0):
                m.d.sync += swap_wait.eq(swap_wait - 1)
            m.d.comb += self.weights.ready.eq(s.loader_busy & ~w_full
                                              & ~(s.load_transposed & (swap_wait != 0)))
        else:
            m.d.comb += self.weights.ready.eq(s.loader_busy & ~w_full)
        beat = self.weights.payload

        def write_rows():
            with m.Switch(w_row):
                for first in range(0, rows, W):
                    with m.Case(first):
                        m.d.sync += [w_shadow[first + k].eq(beat[k]) for k in range(W)]

        with m.If(self.weights.valid & self.weights.ready):
            if rows <= cols:
                # Row r takes element r mod W of the beat whole, or lane r of element c mod W
                # as its element c: per element a 2:1 mux on the data and on the write enable
                # (row or column decode), both selected by a register that changes only
                # between passes. A column is the first pe_rows lanes of an element.
                with m.If(s.load_transposed):
                    with m.Switch(w_row):
                        for first in range(0, cols, W):
                            with m.Case(first):
                                m.d.sync += [w_shadow[row][first + k].eq(beat[k][row])
                                             for row in range(rows) for k in range(W)]
                with m.Else():
                    write_rows()
            else:
                write_rows()
            # A tile is pe_rows rows, or pe_cols columns, W a beat.
            if rows < cols:
                last = w_row == Mux(s.load_transposed, cols - W, rows - W)
                m.d.sync += w_row.eq(Mux(last, 0, w_row + W))
            else:
                last = w_row == rows - W
                m.d.sync += w_row.eq(w_row + W)  # a power of two: wraps to 0
            with m.If(last):
                m.d.sync += w_full.eq(1)
                with m.If(s.load_slices_left != 0):
                    m.d.sync += s.load_slices_left.eq(s.load_slices_left - 1)
                with m.Elif(s.load_tiles_left != 0):
                    m.d.sync += [s.load_slices_left.eq(s.load_last_kslice),
                                 s.load_tiles_left.eq(s.load_tiles_left - 1)]
                with m.Else():
                    m.d.sync += s.loader_busy.eq(0)

    def _load_params(self, m: Module, s: SimpleNamespace) -> None:
        """Per-channel parameters: shadow (filling), then a two-entry queue beside the row
        queue (its head is the N-tile whose rows the splitter takes apart)."""
        cols = self.config.gemm_cols
        s.param_layout = param_layout = data.ArrayLayout(GEMM_PARAM, cols)
        s.p_shadow = p_shadow = Signal(param_layout)
        s.p_queue = [Signal(param_layout, name=f"p_queue{k}") for k in range(2)]
        s.p_count = Signal(range(3))
        P = self.params_per_beat
        s.p_index = p_index = Signal(range(cols))  # the beat's first channel, a multiple of P
        s.p_full = p_full = Signal()
        s.p_claimed = Signal()  # a token in flight will copy the shadow into active
        m.d.comb += self.params.ready.eq(~p_full)
        with m.If(self.params.valid & self.params.ready):
            with m.Switch(p_index):
                for first in range(0, cols, P):
                    with m.Case(first):
                        m.d.sync += [p_shadow[first + k].eq(self.params.payload[k])
                                     for k in range(P)]
            m.d.sync += p_index.eq(p_index + P)
            with m.If(p_index == cols - P):
                m.d.sync += p_full.eq(1)

    def _issue(self, m: Module, s: SimpleNamespace) -> None:
        """Issue: may the offered token enter the array this cycle? Then the pass's counters."""
        token, kslice, ntile, current = s.token, s.kslice, s.ntile, s.current
        s.first_token = first_token = token == 0
        s.last_slice = last_slice = kslice == current.last_kslice
        since_issue = Signal(range(self.hazard_cycles + 1), init=self.hazard_cycles)
        s.weights_ok = weights_ok = ~first_token | s.w_full
        hazard_ok = ~first_token | (kslice == 0) | (since_issue >= current.slice_gap)
        # A tile's parameters are claimed by its first last-slice token and enter the queue
        # when that token reaches the tree's sum; until then only pops happen, so a claim
        # made with at most one tile queued finds room.
        s.params_ok = params_ok = ~(first_token & last_slice) | (s.p_full & ~s.p_claimed
                                                                  & (s.p_count != 2))
        s.output_ok = output_ok = ~last_slice | (s.pending < self.row_queue_depth)
        array_ok = weights_ok & hazard_ok & params_ok & output_ok
        s.issue = issue = Signal()
        m.d.comb += [self.activations.ready.eq(s.issuing & array_ok),
                     issue.eq(self.activations.valid & self.activations.ready)]

        with m.If(issue):
            m.d.sync += since_issue.eq(1)
        with m.Elif(since_issue != self.hazard_cycles):
            m.d.sync += since_issue.eq(since_issue + 1)

        with m.If(issue):
            with m.If(first_token):
                m.d.sync += s.w_full.eq(0)
                if s.swap_wait is not None:
                    m.d.sync += s.swap_wait.eq(self.chain - 1)
                if self.dsp_products == 1:
                    m.d.sync += s.w_active.eq(s.w_shadow)
                with m.If(last_slice):
                    m.d.sync += s.p_claimed.eq(1)
            with m.If(token == current.last_token):
                m.d.sync += token.eq(0)
                with m.If(last_slice):
                    m.d.sync += kslice.eq(0)
                    with m.If(ntile == current.last_ntile):
                        m.d.sync += [ntile.eq(0), s.issuing.eq(0)]
                    with m.Else():
                        m.d.sync += ntile.eq(ntile + 1)
                with m.Else():
                    m.d.sync += kslice.eq(kslice + 1)
            with m.Else():
                m.d.sync += token.eq(token + 1)

    def _array(self, m: Module, s: SimpleNamespace) -> None:
        """The array: tags travel with each token through the pipeline; products, column
        sums, accumulators."""
        cfg = self.config
        rows, cols = cfg.pe_rows, cfg.gemm_cols
        tag_fields = {
            "valid": 1,
            "token": range(cfg.max_tokens),
            "first_slice": 1,
            "last_slice": 1,
            "first_of_last": 1,  # the first token of an N-tile's last slice
            "last_of_tile": 1,   # the last token of an N-tile's last slice
            "op": GemmOp,
            "wide": 1,
        }
        if self.row_scale:
            tag_fields |= {"row_scale": 1, "scale": _ROW_SCALE}  # a last slice's scale lanes
        tag0 = Signal(data.StructLayout(tag_fields))
        m.d.comb += [
            tag0.valid.eq(s.issue),
            tag0.token.eq(s.token),
            tag0.first_slice.eq(s.kslice == 0),
            tag0.last_slice.eq(s.last_slice),
            tag0.first_of_last.eq(s.first_token & s.last_slice),
            tag0.last_of_tile.eq((s.token == s.current.last_token) & s.last_slice),
            tag0.op.eq(s.current.op),
            tag0.wide.eq(s.current.wide),
        ]
        # The activations the array takes: a row_scale pass's last slice keeps its scale
        # lanes in the tag and puts zeros in their place (its keys' values may be anything).
        x_in = self.activations.payload
        if self.row_scale:
            beat = self.activations.payload
            x_in = Signal.like(beat)
            m.d.comb += [
                tag0.row_scale.eq(s.current.row_scale),
                tag0.scale.mult.eq(Cat(beat[rows - 3], beat[rows - 2])),
                tag0.scale.shift.eq(beat[rows - 1][:6]),
                x_in.eq(beat),
            ]
            with m.If(s.current.row_scale & s.last_slice):
                m.d.comb += [x_in[rows - k].eq(0) for k in (1, 2, 3)]
        s.x_in = x_in
        s.tags = tags = [tag0]
        for stage in range(1, self._acc_stage + 1):
            tags.append(delay_like(m, tags[-1], 1, f"tag_s{stage}"))

        if self.dsp_products == 2:
            # Two products per DSP: the packed array takes the tile on a slice's first
            # token (the same cycle the token enters) and has its own activation register.
            packed = m.submodules.packed = PackedArray(rows, cols // 2, self.chain,
                                                       group=self.rows_per_beat)
            m.d.comb += [
                packed.x.eq(x_in),
                packed.x_valid.eq(s.issue),
                packed.w.eq(s.w_shadow),
                packed.load.eq(s.issue & s.first_token),
            ]
            column_sums = [packed.y[col] for col in range(cols)]
        else:
            column_sums = self._products(m, s)

        # Accumulators: read two cycles ahead of the sum, written the cycle after it.
        acc_layout = data.ArrayLayout(signed(32), cols)
        acc_memory = m.submodules.accumulators = Memory(shape=acc_layout,
                                                        depth=cfg.max_tokens, init=[])
        acc_write = acc_memory.write_port()
        acc_read = acc_memory.read_port()
        acc_read_data = Signal(acc_layout)
        s.acc_new = acc_new = Signal(acc_layout)
        sum_tag = tags[self._sum_stage]
        s.acc_tag = acc_tag = tags[self._acc_stage]
        m.d.comb += acc_read.addr.eq(tags[self._sum_stage - 2].token)
        m.d.sync += acc_read_data.eq(acc_read.data)
        for col in range(cols):
            # Truncating the 33-bit sum is the INT32 wrap-around of the accumulators.
            m.d.sync += acc_new[col].eq(Mux(sum_tag.first_slice, 0, acc_read_data[col])
                                        + column_sums[col])
        m.d.comb += [
            acc_write.addr.eq(acc_tag.token),
            acc_write.data.eq(acc_new),
            acc_write.en.eq(acc_tag.valid & ~acc_tag.last_slice),
        ]

        # The N-tile's parameters join the queue as its first row is summed.
        s.p_push = p_push = Signal()
        m.d.comb += p_push.eq(sum_tag.valid & sum_tag.first_of_last)
        with m.If(p_push):
            m.d.sync += [s.p_full.eq(0), s.p_claimed.eq(0)]

    def _products(self, m: Module, s: SimpleNamespace) -> list:
        """One multiplier per PE (``dsp_products=1``): the activation register, registered
        8 × 8 products of the active tile, a pipelined adder tree per column; returns the
        column sums."""
        rows, cols = self.config.pe_rows, self.config.gemm_cols
        x = Signal(data.ArrayLayout(signed(8), rows))
        m.d.sync += x.eq(s.x_in)
        column_sums = []
        for col in range(cols):
            products = []
            for row in range(rows):
                product = Signal(signed(16), name=f"product_r{row}_c{col}")
                m.d.sync += product.eq(x[row] * s.w_active[row][col])
                products.append(product)
            column_sum, latency = _pipelined_sum(m, products, f"sum_c{col}")
            assert latency == self.tree_latency
            column_sums.append(column_sum)
        return column_sums

    def _output(self, m: Module, s: SimpleNamespace) -> None:
        """The row queue and the parameter queue, the splitter, requantization, the table,
        the word queue."""
        cfg = self.config
        lanes, V = cfg.pe_cols, self.words
        acc_tag = s.acc_tag
        # Row queue: a last-slice token's accumulator row, its pass's op and whether it is
        # its N-tile's last row (the splitter then pops the tile's parameters); with
        # row_scale passes also the token's scale, from its tag.
        row_fields = {
            "acc": data.ArrayLayout(signed(32), cfg.gemm_cols),
            "op": GemmOp,
            "wide": 1,
            "last_of_tile": 1,
        }
        if self.row_scale:
            row_fields |= {"row_scale": 1, "scale": _ROW_SCALE}
        row_layout = data.StructLayout(row_fields)
        rows = m.submodules.row_queue = SyncFIFOBuffered(width=row_layout.size,
                                                         depth=self.row_queue_depth)
        row_in, row = Signal(row_layout), row_layout(rows.r_data)
        m.d.comb += [
            row_in.acc.eq(s.acc_new),
            row_in.op.eq(acc_tag.op),
            row_in.wide.eq(acc_tag.wide),
            row_in.last_of_tile.eq(acc_tag.last_of_tile),
            rows.w_data.eq(row_in.as_value()),
            rows.w_en.eq(acc_tag.valid & acc_tag.last_slice),
        ]
        if self.row_scale:
            m.d.comb += [row_in.row_scale.eq(acc_tag.row_scale),
                         row_in.scale.eq(acc_tag.scale)]

        # Splitter: word v of the head row a cycle, while the word queue has credit; a wide
        # row's word v leaves as two halves (half 0: its lanes 0 … C/2 − 1), INT16 each.
        word = Signal(range(V)) if V > 1 else Const(0, 1)
        half = Signal()
        emit = Signal()
        # The word queue's credit counts words from the splitter until they are taken.
        words_in_flight = credit_count(m, "words", self.queue_depth, take=emit,
                                       give=self.results.valid & self.results.ready)
        m.d.comb += [s.words_out.eq(words_in_flight != 0),
                     emit.eq(rows.r_rdy & (words_in_flight != self.queue_depth))]
        word_done = half | ~row.wide
        last_word = (word == V - 1) & word_done
        m.d.comb += rows.r_en.eq(emit & last_word)
        with m.If(emit):
            m.d.sync += half.eq(row.wide & ~half)
        if V > 1:
            with m.If(emit & word_done):
                m.d.sync += word.eq(Mux(last_word, 0, word + 1))
        s.p_pop = p_pop = Signal()
        m.d.comb += p_pop.eq(emit & last_word & row.last_of_tile)
        self._param_queue(m, s)
        # The word's lanes and parameters, registered (a 2:1 mux on a 2,048-bit row).
        split_fields = {
            "acc": data.ArrayLayout(signed(32), lanes),
            "param": data.ArrayLayout(GEMM_PARAM, lanes),
            "op": GemmOp,
            "wide": 1,
        }
        if self.row_scale:
            split_fields |= {"row_scale": 1, "scale": _ROW_SCALE}
        split = Signal(data.StructLayout(split_fields))
        split_valid = Signal()
        m.d.sync += split_valid.eq(emit)
        H = lanes // 2
        with m.Switch(word):
            for v in range(V):
                with m.Case(v):
                    # Lanes below C/2 take the word's upper half on a wide row's half 1.
                    m.d.sync += [split.acc[c].eq(row.acc[v * lanes + c]) for c in range(H, lanes)]
                    m.d.sync += [split.param[c].eq(s.p_queue[0][v * lanes + c])
                                 for c in range(H, lanes)]
                    for c in range(H):
                        m.d.sync += [
                            split.acc[c].eq(Mux(half, row.acc[v * lanes + H + c],
                                                row.acc[v * lanes + c])),
                            split.param[c].eq(Mux(half, s.p_queue[0][v * lanes + H + c],
                                                  s.p_queue[0][v * lanes + c])),
                        ]
        m.d.sync += [split.op.eq(row.op), split.wide.eq(row.wide)]
        if self.row_scale:
            m.d.sync += [split.row_scale.eq(row.row_scale), split.scale.eq(row.scale)]

        requantizer = m.submodules.requantizer = Requantizer(lanes)
        m.d.comb += [
            requantizer.i.valid.eq(split_valid),
            requantizer.i.payload.acc.eq(split.acc),
            requantizer.i.payload.raw.eq(split.op == GemmOp.INT32),
            requantizer.i.payload.sat16.eq(split.wide),
        ]
        for lane in range(lanes):
            mult, shift = split.param[lane].mult, split.param[lane].shift
            if self.row_scale:
                # The token's scale takes the channel's place in the same multiplier.
                mult = Mux(split.row_scale, split.scale.mult, mult)
                shift = Mux(split.row_scale, split.scale.shift, shift)
            m.d.comb += [
                requantizer.i.payload.bias[lane].eq(split.param[lane].bias),
                requantizer.i.payload.mult[lane].eq(mult),
                requantizer.i.payload.shift[lane].eq(shift),
            ]
        op_out = delay_like(m, split.op, Requantizer.latency + 1, "op_out")
        s.wide_out = delay_like(m, split.wide, Requantizer.latency + 1, "wide_out")
        valid_out = delay_like(m, requantizer.o.valid, 1, "valid_out")
        value_out = delay_like(m, requantizer.o.payload, 1, "value_out")
        result = self._table(m, s, requantizer.o.payload, op_out, value_out)

        queue = m.submodules.result_queue = SyncFIFOBuffered(width=self.output_layout.size,
                                                             depth=self.queue_depth)
        # The queue speaks raw bits; the port carries the typed union.
        m.d.comb += [
            queue.w_data.eq(result.as_value()),
            queue.w_en.eq(valid_out),
            self.results.payload.eq(queue.r_data),
            self.results.valid.eq(queue.r_rdy),
            queue.r_en.eq(self.results.ready),
        ]
        m.d.sync += s.pending.eq(s.pending + (s.issue & s.last_slice) - rows.r_en)

    def _param_queue(self, m: Module, s: SimpleNamespace) -> None:
        """Two N-tiles' parameters: pushed from the shadow as a tile's first row is summed,
        popped after its last row's last word; the head is ``p_queue[0]``."""
        q0, q1 = s.p_queue
        count, push, pop = s.p_count, s.p_push, s.p_pop
        m.d.sync += count.eq(count + push - pop)
        # A push finds at most one tile queued (a claim needs count < 2, and only pops come
        # between a claim and its push), so a push beside a pop refills the head.
        with m.If(pop):
            m.d.sync += q0.eq(Mux(push & (count == 1), s.p_shadow, q1))
        with m.Elif(push):
            with m.If(count == 0):
                m.d.sync += q0.eq(s.p_shadow)
            with m.Else():
                m.d.sync += q1.eq(s.p_shadow)

    def _table(self, m: Module, s: SimpleNamespace, index_value, op_out, value_out):
        """The output table (its load, ``L`` lookups) and the result word by op: looked up,
        INT8 or INT32."""
        lanes = self.config.pe_cols
        # One copy of the table per lane, written together: a memory with one read port
        # maps to LUT-RAM (a 256 × 8 table is a few dozen LUTs), where one memory with a
        # read port per lane would be a multiplexer per lane (hundreds of LUTs each).
        # A copy is words of T entries: a table beat writes one; a lookup reads the word
        # and picks the entry with the index's low bits, registered beside the read.
        T = self.table_entries
        low_bits = (T - 1).bit_length()
        words = TABLE_ENTRIES // T
        table_index = Signal(range(words))
        table_write = Signal()
        # The table changes only once every earlier result has left.
        m.d.comb += [
            self.table.ready.eq(s.loading_table & (s.pending == 0) & ~s.words_out),
            table_write.eq(self.table.valid & self.table.ready),
        ]
        with m.If(self.table.valid & self.table.ready):
            m.d.sync += table_index.eq(table_index + 1)
            with m.If(table_index == words - 1):
                m.d.sync += s.loading_table.eq(0)

        result = Signal(self.output_layout)
        for col in range(lanes):
            table = Memory(shape=data.ArrayLayout(signed(8), T), depth=words, init=[])
            m.submodules[f"table{col}"] = table
            write, lookup = table.write_port(), table.read_port()
            m.d.comb += [write.addr.eq(table_index), write.data.eq(self.table.payload),
                         write.en.eq(table_write)]
            # The INT8 result's two's-complement byte is the table index.
            index = index_value[col][:8]
            m.d.comb += lookup.addr.eq(index[low_bits:])
            if T == 1:
                entry = lookup.data[0]
            else:
                low = Signal(low_bits, name=f"table_low{col}")
                m.d.sync += low.eq(index[:low_bits])
                entry = lookup.data[low]
            with m.Switch(op_out):
                with m.Case(GemmOp.INT8_TABLE):
                    m.d.comb += result.int8[col].eq(entry)
                with m.Case(GemmOp.INT32):
                    m.d.comb += result.int32[col].eq(value_out[col])
                with m.Default():
                    with m.If(s.wide_out):
                        if col < lanes // 2:
                            m.d.comb += result.as_value()[16 * col:16 * col + 16].eq(
                                value_out[col][:16])
                    with m.Else():
                        m.d.comb += result.int8[col].eq(value_out[col])
        return result

    def _count(self, m: Module, s: SimpleNamespace) -> None:
        """The performance counters."""
        counters = self.counters
        waiting = s.issuing
        events = [
            (counters.busy_cycles, self.busy),
            (counters.weight_stall_cycles, waiting & ~s.weights_ok),
            (counters.param_stall_cycles, waiting & ~s.params_ok),
            (counters.activation_stall_cycles, self.activations.ready & ~self.activations.valid),
            (counters.output_stall_cycles, waiting & ~s.output_ok),
            (counters.token_beats, s.issue),
            (counters.weight_tiles, s.issue & s.first_token),
        ]
        for counter, event in events:
            with m.If(event):
                m.d.sync += counter.eq(counter + 1)
