"""Two INT8 products per DSP48E2: packed weights, cascaded chains, exact separation.

The way vendor INT8 engines double their multipliers (Xilinx WP486, "Deep Learning with
INT8 Optimization on Xilinx Devices"): two INT8 weights ``w_hi``, ``w_lo`` of two output
channels that share an activation ``x`` are packed into one 27-bit operand::

    packed = w_hi · 2^18 + w_lo                       (a signed 27-bit value)
    x · packed = (x · w_hi) · 2^18 + x · w_lo         (one 8 × 27 multiply, 35 bits)

so one DSP48E2 multiplier (27 × 18) makes both products. The DSP's post-adder sums such
packed products along a *chain* of ``chain`` DSPs (the P → PCIN cascade): the sum is
``S_hi · 2^18 + S_lo`` with ``S_hi``, ``S_lo`` the two channels' partial dot products. The
low sum is the sign-extended low 18 bits and the high sum the bits above, corrected by the
low sum's sign (the *sign correction*: an arithmetic shift rounds down, one too low when the
low sum is negative)::

    S_lo = sext(P[0:18])
    S_hi = (P >> 18) + P[17]

This is exact while ``S_lo`` stays in the 18-bit signed range: an INT8 product lies in
[−16,256, 16,384], so ``chain`` products sum to at most ``16,384 · chain`` in magnitude,
below 2^17 for ``chain ≤ 7`` (WP486's limit of seven accumulations); ``chain = 8`` fails
exactly when every lane is −128 × −128. The chain sums then meet in ordinary adder trees,
one per channel.

The array has two forms of one register structure (:mod:`m3vit.hw.target`):

* **plain** (simulation, ``platform=None``): the packed weight is formed in fabric
  (``packed`` has ``w_lo`` sign-extended in its low 18 bits and ``w_hi − w_lo[7]`` above, a
  nine-bit subtraction per DSP done once per weight tile) and the chain is written in the
  inference form (multiply → register → add of the previous position's register →
  register), plain Verilog arithmetic that Verilator simulates;
* **DSP48E2** (synthesis, :data:`~m3vit.hw.target.SYNTHESIS`): one ``DSP48E2`` instance
  per position (:func:`dsp48e2_packed_mac`), whose A2/D registers hold the two weights, the
  pre-adder packs them, M and P are the chain's registers and PCOUT → PCIN its cascade.

Why two: Yosys (0.23, and 0.70 alike) maps each packed multiply of the plain form to one
DSP48E2 but leaves the M and P registers and the post-adders in fabric (its ``xilinx_dsp``
pass packs registers and the PCIN cascade into DSP48E1, ``-family xc7``, only), some 35
LUTs and 70 FFs per DSP that Vivado would fold into the slice; with the instances the
estimate counts what the board has. The cocotb bench runs both forms against the same
integers, the DSP48E2 one on the subset model ``sim/models/dsp48e2.v``.
"""

from __future__ import annotations

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .pipeline import delay_like
from .target import uses_dsp48e2

__all__ = [
    "LOW_BITS",
    "MAX_CHAIN",
    "PackedArray",
    "dsp48e2_packed_mac",
    "pack_weights",
    "packed_chain_sum",
    "packed_latency",
    "packed_value",
    "split_packed",
    "split_value",
]

#: Bits of the low product's field: the high weight sits at bit 18 of the 27-bit operand.
LOW_BITS = 18

#: Longest chain of packed products whose low sum cannot spill into the high field.
MAX_CHAIN = 7

#: Width of a packed operand (the DSP48E2 multiplier's 27-bit port) and of a chain's sum.
PACKED_BITS = 27
_SUM_BITS = 48


def pack_weights(w_hi, w_lo):
    """The 27-bit signed operand ``w_hi · 2^18 + w_lo`` of two signed INT8 weights.

    Parameters
    ----------
    w_hi, w_lo : Value
        Signed 8-bit weights.

    Returns
    -------
    Value
        ``Cat(sext(w_lo, 18), w_hi − w_lo[7])``, signed, 27 bits.
    """
    sign = w_lo[7]
    high = w_hi.as_signed() - sign  # nine bits: −129 … 127
    return Cat(w_lo[:8], sign.replicate(LOW_BITS - 8),
               high[:PACKED_BITS - LOW_BITS]).as_signed()


def packed_value(w_hi: int, w_lo: int) -> int:
    """What :func:`pack_weights` builds, bit by bit, as a Python integer (the reference the
    tests check the separation against)."""
    sign = (w_lo >> 7) & 1
    low = (w_lo & 0xFF) | (((1 << (LOW_BITS - 8)) - 1) << 8 if sign else 0)
    high = (w_hi - sign) & ((1 << (PACKED_BITS - LOW_BITS)) - 1)
    raw = low | high << LOW_BITS
    return raw - (1 << PACKED_BITS) if raw >> (PACKED_BITS - 1) else raw


def split_value(total: int) -> tuple[int, int]:
    """What :func:`split_packed` computes, on a Python integer: ``(S_hi, S_lo)``."""
    raw = total & ((1 << _SUM_BITS) - 1)
    low = raw & ((1 << LOW_BITS) - 1)
    low -= (1 << LOW_BITS) if low >> (LOW_BITS - 1) else 0
    high = raw >> LOW_BITS
    high -= (1 << (_SUM_BITS - LOW_BITS)) if high >> (_SUM_BITS - LOW_BITS - 1) else 0
    return high + ((raw >> (LOW_BITS - 1)) & 1), low


def split_packed(total):
    """The two sums ``(S_hi, S_lo)`` in a packed sum ``S_hi · 2^18 + S_lo``.

    Exact while ``S_lo`` is in [−2^17, 2^17) (at most :data:`MAX_CHAIN` INT8 products).
    """
    low = total[:LOW_BITS].as_signed()
    high = (total[LOW_BITS:].as_signed() + total[LOW_BITS - 1]).as_signed()
    return high, low


def packed_latency(rows: int, chain: int) -> int:
    """Cycles from a vector entering a :class:`PackedArray` of ``rows`` rows in chains of
    ``chain`` to its column sums: the input register, the chain (M and one P per DSP), the
    separation register, one register per level of the tree over ``rows / chain`` chains."""
    return 1 + (chain + 1) + 1 + (rows // chain - 1).bit_length()


def packed_chain_sum(m: Module, x, packed, name: str):
    """A systolic chain of packed multiply-adds, one DSP48E2 each.

    ``x[k]`` and ``packed[k]`` are the activation and packed weight of position ``k``;
    position ``k`` takes its activation ``k`` cycles after position 0 (the caller skews the
    activations) and adds its registered product to position ``k − 1``'s registered sum
    (the cascade), so a token's chain sum leaves ``len(x) + 1`` cycles after its activation
    entered position 0.

    Returns
    -------
    Signal
        The chain's packed sum (the last DSP's P register), as wide as the sum needs.
    """
    total = None
    for k, (xk, wk) in enumerate(zip(x, packed, strict=True)):
        product = Signal(signed(8 + PACKED_BITS), name=f"{name}_m{k}", reset_less=True)  # M
        m.d.sync += product.eq(xk * wk)
        width = 8 + PACKED_BITS + (k + 1).bit_length()
        acc = Signal(signed(width), name=f"{name}_p{k}", reset_less=True)  # P
        m.d.sync += acc.eq(product if total is None else product + total)
        total = acc
    return total


class PackedArray(wiring.Component):
    """A weight-stationary INT8 array of ``rows × 2·pairs`` products on ``rows · pairs``
    DSP48E2s.

    Each cycle a vector ``x`` of ``rows`` INT8 activations enters; ``latency`` cycles later
    ``y[c] = Σ_r x[r] · w[r][c]`` leaves for every column ``c < 2·pairs``, exactly, for any
    INT8 values (−128 × −128 in every lane included). Column ``c < pairs`` is the low
    product of DSP (r, c) and column ``c + pairs`` its high product: the two halves of a
    weight tile share the DSPs.

    Parameters
    ----------
    rows : int
        Dot-product length (the K-slice), a multiple of ``chain``.
    pairs : int
        DSPs per row: the array has ``2 · pairs`` columns.
    chain : int
        DSPs per cascade chain, 1 … :data:`MAX_CHAIN` (the separation's limit).
    group : int
        Rows that share a chain position: row ``r`` is position ``(r // group) % chain``
        of its chain (chains interleave their rows, so that a loader writing ``group`` rows
        a cycle in row order never overwrites a row before its position has taken it).
        ``rows`` must be a multiple of ``group · chain``.

    Attributes
    ----------
    x : In(ArrayLayout(signed(8), rows))
        The activations; ``x_valid`` marks a vector (only the output's ``y_valid`` depends
        on it: the array computes every cycle).
    w : In(ArrayLayout(ArrayLayout(signed(8), 2·pairs), rows))
        The weight tile, ``w[r][c]``, packed into the DSPs' weight registers on ``load``.
        A vector entering the cycle after ``load`` is high sees the new tile; ``w`` must
        hold for up to ``chain − 1`` cycles after that cycle and loads must be ``chain`` or
        more cycles apart (position ``k`` of a chain takes the tile ``k`` cycles late, as it
        does its activation; the GEMM engine swaps tiles at most once per K-slice): row
        ``r`` must hold through cycle ``load + position(r)`` only, so a loader may write
        rows ``b·group … b·group + group − 1`` of the next tile in the ``b + 1``-th cycle
        after the load (it takes effect the cycle after), in row order, without waiting.
    y : Out(ArrayLayout(signed, 2·pairs))
        The column sums; ``y_valid`` marks them.
    """

    def __init__(self, rows: int, pairs: int, chain: int = 4, group: int = 1):
        if not 1 <= chain <= MAX_CHAIN:
            raise ValueError(f"chain must be 1 to {MAX_CHAIN} DSPs (a longer chain's low sum "
                             f"can spill into the high one), got {chain!r}")
        if group < 1 or rows < 1 or rows % (chain * group):
            raise ValueError(f"rows must be a positive multiple of chain × group = {chain} × "
                             f"{group}, got {rows!r}")
        if pairs < 1:
            raise ValueError(f"pairs must be at least 1, got {pairs!r}")
        self.rows, self.pairs, self.chain, self.group = rows, pairs, chain, group
        self.n_chains = rows // chain
        #: Cycles from ``x`` to ``y`` (:func:`packed_latency`).
        self.latency = packed_latency(rows, chain)
        #: Width of a column sum: ``rows`` products of at most 2^14 in magnitude.
        self.sum_bits = 16 + max(1, (rows - 1).bit_length()) + 1
        lanes = data.ArrayLayout(signed(8), rows)
        super().__init__({
            "x": In(lanes), "x_valid": In(1),
            "w": In(data.ArrayLayout(data.ArrayLayout(signed(8), 2 * pairs), rows)),
            "load": In(1),
            "y": Out(data.ArrayLayout(signed(self.sum_bits), 2 * pairs)), "y_valid": Out(1),
        })

    def position(self, row: int) -> int:
        """The chain position of ``row`` (its skew in cycles)."""
        return (row // self.group) % self.chain

    def chain_rows(self, index: int) -> list[int]:
        """The rows of chain ``index``, position 0 first."""
        block, lane = divmod(index, self.group)
        first = block * self.group * self.chain + lane
        return [first + k * self.group for k in range(self.chain)]

    @classmethod
    def for_config(cls, config) -> PackedArray:
        """``config``'s PE array with two products per DSP: ``pe_rows`` rows, ``gemm_cols``
        columns on ``pe_rows · gemm_cols / 2`` DSPs, chains of 4 (the ZCU104's 32 × 64 on
        1,024 DSPs; with ``gemm_words=1`` its columns are ``pe_cols``)."""
        return cls(config.pe_rows, max(1, config.gemm_cols // 2),
                   4 if config.pe_rows % 4 == 0 else 1)

    def elaborate(self, platform):
        m = Module()
        pairs, chain = self.pairs, self.chain
        # Position k of every chain takes its activation k cycles late (one delay line per
        # row, shared by every DSP of the row), so that its product meets the previous
        # position's sum in the cascade; it loads its weights k cycles late too (a delayed
        # load enable, shared by the row), so that a vector sees one tile along the chain.
        valid = Signal()
        m.d.sync += valid.eq(self.x_valid)
        loads = [self.load]
        for d in range(chain - 1):
            reg = Signal(name=f"load_d{d + 1}")
            m.d.sync += reg.eq(loads[-1])
            loads.append(reg)
        # Row r's load enable: its chain position's (as late as its activation).
        row_loads = [loads[self.position(r)] for r in range(self.rows)]
        if uses_dsp48e2(platform):
            chain_sum = self._dsp48e2_chains(m, row_loads)
        else:
            chain_sum = self._plain_chains(m, row_loads)
        for p in range(pairs):
            sums_hi, sums_lo = [], []
            for c in range(self.n_chains):
                high, low = split_packed(chain_sum(p, c))
                bits = 16 + chain.bit_length() + 1
                hi_reg = Signal(signed(bits), name=f"p{p}_chain{c}_hi", reset_less=True)
                lo_reg = Signal(signed(bits), name=f"p{p}_chain{c}_lo", reset_less=True)
                m.d.sync += [hi_reg.eq(high), lo_reg.eq(low)]
                sums_hi.append(hi_reg)
                sums_lo.append(lo_reg)
            m.d.comb += [self.y[p].eq(_tree(m, sums_lo, f"p{p}_lo")),
                         self.y[p + pairs].eq(_tree(m, sums_hi, f"p{p}_hi"))]
        m.d.comb += self.y_valid.eq(delay_like(m, valid, self.latency - 1, "valid"))
        return m

    def _plain_chains(self, m: Module, row_loads: list):
        """The chains in plain arithmetic (simulation): the input register, the skew, the
        packed weights formed and held in fabric, :func:`packed_chain_sum`. Returns
        ``chain_sum(pair, chain)``."""
        x = Signal.like(self.x, reset_less=True)
        m.d.sync += x.eq(self.x)
        skewed = [delay_like(m, x[r], self.position(r), f"x{r}") for r in range(self.rows)]
        packed = []  # packed[r][p]: DSP (r, p)'s weight register
        for r in range(self.rows):
            row = []
            for p in range(self.pairs):
                # Packed once per load: a nine-bit subtraction per DSP, off the multiply
                # path.
                w = Signal(signed(PACKED_BITS), name=f"packed_r{r}_p{p}", reset_less=True)
                with m.If(row_loads[r]):
                    m.d.sync += w.eq(pack_weights(self.w[r][p + self.pairs], self.w[r][p]))
                row.append(w)
            packed.append(row)

        def chain_sum(p: int, c: int):
            lanes = self.chain_rows(c)
            return packed_chain_sum(m, [skewed[r] for r in lanes],
                                    [packed[r][p] for r in lanes], f"p{p}_chain{c}")

        return chain_sum

    def _dsp48e2_chains(self, m: Module, row_loads: list):
        """The chains as ``DSP48E2`` instances (synthesis): the same registers in the
        slice. B2 is the input register (the skew line in fabric is one stage shorter),
        A2 and D hold the two weights and the pre-adder packs them (``w_hi · 2^18 +
        w_lo``, no fabric), M and P are the chain's registers, PCOUT → PCIN its cascade.
        Returns ``chain_sum(pair, chain)``."""
        b_in = [delay_like(m, self.x[r], self.position(r), f"b{r}") for r in range(self.rows)]

        def chain_sum(p: int, c: int):
            total = cascade = None
            for k, r in enumerate(self.chain_rows(c)):
                w_hi, w_lo = self.w[r][p + self.pairs], self.w[r][p]
                total, cascade = dsp48e2_packed_mac(
                    m, f"p{p}_chain{c}_dsp{k}", x=b_in[r], w_hi=w_hi, w_lo=w_lo,
                    load=row_loads[r], pcin=cascade)
            return total

        return chain_sum


def dsp48e2_packed_mac(m: Module, name: str, *, x, w_hi, w_lo, load, pcin=None):
    """One packed multiply-add as a ``DSP48E2`` instance: ``P ← PCIN + x · (w_hi · 2^18 +
    w_lo)``.

    The registers are those of :func:`packed_chain_sum`'s position: B2 takes ``x`` (BREG),
    A2 and D take ``w_hi · 2^18`` and ``w_lo`` while ``load`` is high (AREG, DREG, the
    pre-adder AD = D + A2 combinational, ADREG = 0), M the product (MREG) and P the sum
    (PREG). ``pcin`` is the previous position's P through the dedicated cascade (PCOUT →
    PCIN); without one the ALU's Z input is zero.

    Returns
    -------
    (Signal, Signal)
        The 48-bit P output, signed (a chain's sum, read by fabric), and PCOUT (the next
        position's ``pcin``: a cascade input takes only another slice's PCOUT).
    """
    a = Signal(signed(30), name=f"{name}_a")
    d = Signal(signed(27), name=f"{name}_d")
    b = Signal(signed(18), name=f"{name}_b")
    p = Signal(signed(_SUM_BITS), name=f"{name}_p")
    pcout = Signal(signed(_SUM_BITS), name=f"{name}_pcout")
    m.d.comb += [a.eq(w_hi.as_signed() << LOW_BITS), d.eq(w_lo.as_signed()),
                 b.eq(x.as_signed())]
    # OPMODE: W = 0, Z = PCIN (001) or 0, Y = X = M (01 01): P = Z + M.
    opmode = (0b001 << 4 if pcin is not None else 0) | 0b0101
    m.submodules[name] = Instance(
        "DSP48E2",
        p_AREG=1, p_ACASCREG=1, p_BREG=1, p_BCASCREG=1, p_DREG=1, p_ADREG=0, p_MREG=1,
        p_PREG=1, p_CREG=0, p_INMODEREG=0, p_OPMODEREG=0, p_ALUMODEREG=0, p_CARRYINREG=0,
        p_CARRYINSELREG=0, p_A_INPUT="DIRECT", p_B_INPUT="DIRECT", p_AMULTSEL="AD",
        p_BMULTSEL="B", p_PREADDINSEL="A", p_USE_MULT="MULTIPLY", p_USE_SIMD="ONE48",
        i_CLK=ClockSignal(), i_A=a, i_B=b, i_C=Const(0, 48), i_D=d,
        i_PCIN=Const(0, 48) if pcin is None else pcin, i_ACIN=Const(0, 30),
        i_BCIN=Const(0, 18), i_CARRYIN=0, i_CARRYCASCIN=0, i_MULTSIGNIN=0,
        # INMODE 00100: A2 into the pre-adder, D enabled, add; B2 into the multiplier.
        i_INMODE=Const(0b00100, 5), i_OPMODE=Const(opmode, 9), i_ALUMODE=Const(0, 4),
        i_CARRYINSEL=Const(0, 3),
        i_CEA1=0, i_CEA2=load, i_CEB1=0, i_CEB2=1, i_CEC=0, i_CED=load, i_CEAD=0, i_CEM=1,
        i_CEP=1, i_CEALUMODE=0, i_CECTRL=0, i_CECARRYIN=0, i_CEINMODE=0,
        i_RSTA=0, i_RSTB=0, i_RSTC=0, i_RSTD=0, i_RSTM=0, i_RSTP=0, i_RSTALLCARRYIN=0,
        i_RSTALUMODE=0, i_RSTCTRL=0, i_RSTINMODE=0,
        o_P=p, o_PCOUT=pcout)
    return p, pcout


def _tree(m: Module, terms: list, name: str):
    """A registered balanced adder tree (a register per level)."""
    level = 0
    while len(terms) > 1:
        pairs = [a + b for a, b in zip(terms[0::2], terms[1::2], strict=False)]
        if len(terms) % 2:
            pairs.append(terms[-1])
        level += 1
        regs = []
        for i, term in enumerate(pairs):
            reg = Signal(term.shape(), name=f"{name}_l{level}_{i}", reset_less=True)
            m.d.sync += reg.eq(term)
            regs.append(reg)
        terms = regs
    return terms[0]
