"""Integer operations of the accelerator: the bit-exact specification.

Every function here is one unit an RTL block is compared with, exactly as written in
``docs/numerics.md``. They work on integer ``torch`` tensors, vectorised (no per-element
Python loops), and compute in ``int64`` so that no intermediate wraps: the hardware's
narrower widths are stated in the docstrings and asserted by the quantizer's ranges.

Conventions
-----------
* INT8 activations are symmetric: real value = scale · q, zero point 0, q ∈ [-128, 127].
* Rounding is **round half up** everywhere: ``(x + 2^(s-1)) >> s`` with an arithmetic
  shift (floor), so -2.5 → -2 and 2.5 → 3. One rule, one adder and a wire shift in RTL.
* Saturation clamps to the destination range after rounding.
"""

from __future__ import annotations

import torch

INT8_MIN, INT8_MAX = -128, 127
MULT_BITS = 16
"""Requantization multipliers are unsigned 16-bit: acc (int32) x mult fits a 48-bit product."""
MAX_SHIFT = 62
LN_RCP_BITS = 31
"""LayerNorm's reciprocal square root is ``floor(2^31 / isqrt(V))``."""
EXP_BITS = 15
"""Exponential tables hold ``round(2^15 · exp(-u · scale))``, uint16 values ≤ 32768."""
PROB_BITS = 7
"""Attention probabilities are 7-bit, relative to their row's largest (0 … 127)."""
PROB_MULT = 127 << 9
"""``round_half_up(e · PROB_MULT / 2^24)`` is ``round_half_up(127 · e / 2^15)``: the row's
largest exp value, ``E[0] = 2^15``, becomes exactly 127."""
ROW_MULT_BITS = 16
"""The per-row multiplier of P·V (:func:`row_scale`) is unsigned 16-bit, as ``mult``."""
SCORE_BITS = 15
"""Router scores are unsigned with scale 2^-15 (0 … 32767)."""
RCP_BITS = 31
"""Softmax normalisation multiplies by ``floor(2^31 / sum)``."""
INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1
ROUTER_LOGIT_SHIFT = 8
"""Router logits are INT16 at 2^-8 of the exp table's step: the table is indexed with
``(max − l) >> 8``, and the top-k ranks the 16-bit logits themselves."""


def _i64(x: torch.Tensor | int) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.int64)


def round_shift(x: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """``round(x / 2^shift)``, halves rounded up (towards +∞); ``shift`` ≥ 0.

    Computed as ``(x + 2^(shift-1)) >> shift`` (arithmetic shift), and ``x`` for shift 0.
    """
    x, shift = _i64(x), _i64(shift)
    half = torch.where(shift > 0, torch.ones_like(shift) << (shift - 1).clamp(min=0), 0)
    return (x + half) >> shift


def saturate(x: torch.Tensor, lo: int = INT8_MIN, hi: int = INT8_MAX) -> torch.Tensor:
    """Clamp to [lo, hi] (INT8 by default)."""
    return _i64(x).clamp(lo, hi)


def requantize(
    acc: torch.Tensor, mult: torch.Tensor | int, shift: torch.Tensor | int,
    lo: int = INT8_MIN, hi: int = INT8_MAX,
) -> torch.Tensor:
    """INT32 accumulator → INT8: ``sat8(round_half_up(acc · mult / 2^shift))``.

    ``lo``/``hi`` widen the saturation (INT16 router logits: :func:`requantize16`).

    Parameters
    ----------
    acc : torch.Tensor
        Accumulators (int32 range); the last dimension is the channel.
    mult : torch.Tensor or int
        Unsigned 16-bit multipliers, per channel (last dimension) or scalar.
    shift : torch.Tensor or int
        Right shifts in [0, 62], per channel or scalar.
    """
    return saturate(round_shift(_i64(acc) * _i64(mult), shift), lo, hi)


def requantize16(
    acc: torch.Tensor, mult: torch.Tensor | int, shift: torch.Tensor | int
) -> torch.Tensor:
    """INT32 accumulator → INT16: ``sat16(round_half_up(acc · mult / 2^shift))``.

    The router GEMM's output (a ``GEMM`` with ``wide`` set): the same requantization as
    :func:`requantize`, saturated to [−32768, 32767] instead of INT8.
    """
    return requantize(acc, mult, shift, INT16_MIN, INT16_MAX)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer matrix product ``a @ b`` of INT8-range (or score-range) operands.

    Computed with float64 BLAS and converted back: every product and every partial sum is
    an integer of magnitude below 2^53, so each floating-point operation is exact in any
    summation order, and the result equals the int64 product (which torch computes
    without BLAS, ~20x slower). Callers keep |a|·|b|·K < 2^53 (INT8 × INT8 needs K < 2^39).
    """
    return (a.double() @ b.double()).to(torch.int64)


def gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """INT8 × INT8 → INT32 accumulation: ``x @ w.T + bias``.

    Parameters
    ----------
    x : torch.Tensor
        (..., K) INT8 activations.
    w : torch.Tensor
        (N, K) INT8 weights, one row per output channel.
    bias : torch.Tensor, optional
        (N,) INT32 biases at scale ``s_x · s_w[n]``.

    Notes
    -----
    Exact in int64 here; the quantizer guarantees every sum fits int32 (|x·w| ≤ 2^14, so
    K ≤ 2^16 terms plus the bias), which is the width of the PE accumulators.
    """
    acc = matmul(x, w.T)
    return acc if bias is None else acc + _i64(bias)


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    mult: torch.Tensor,
    shift: torch.Tensor,
    wide: bool = False,
) -> torch.Tensor:
    """:func:`gemm` followed by per-output-channel :func:`requantize` (INT16 results,
    :func:`requantize16`, with ``wide``)."""
    acc = gemm(x, w, bias)
    return requantize16(acc, mult, shift) if wide else requantize(acc, mult, shift)


def table_lookup(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Apply a 256-entry table indexed by the INT8 value's two's-complement byte.

    ``table[q & 0xFF]``: entries 0…127 hold q = 0…127, entries 128…255 hold q = -128…-1.
    """
    return _i64(table)[_i64(q) & 0xFF]


def residual_add(
    a: torch.Tensor, b: torch.Tensor, mult_a: int, mult_b: int, shift: int
) -> torch.Tensor:
    """Add two INT8 tensors of different scales into a third scale.

    ``sat8(round_half_up((a · mult_a + b · mult_b) / 2^shift))`` with unsigned 16-bit
    multipliers and one shared shift.
    """
    return saturate(round_shift(_i64(a) * mult_a + _i64(b) * mult_b, shift))


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """Floor of the square root of non-negative int64 values (exact)."""
    v = _i64(v)
    # float64's root is within one of the true root; fix it up exactly. Clamping to
    # isqrt(2^63 - 1) keeps every square below in int64.
    top = 3037000499
    s = torch.sqrt(v.double()).floor().to(torch.int64).clamp(max=top)
    s = torch.where(s * s > v, s - 1, s)
    s = torch.where((s < top) & ((s + 1) * (s + 1) <= v), s + 1, s)
    return s


def layernorm(
    x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, shift: int, eps_term: int
) -> torch.Tensor:
    """Integer LayerNorm over the last dimension (D).

    Steps, exact in integers:

    1. ``d_i = D · x_i − Σ_j x_j``                (the centred value times D, no division)
    2. ``V = Σ_i d_i² + eps_term``                (``eps_term = round(eps · D³ / s_x²)`` ≥ 1)
    3. ``r = floor(2^31 / isqrt(V))``             (one reciprocal square root per token)
    4. ``t_i = d_i · r``                          (|t_i| ≤ 2^31: the normalised value · 2^31/√D)
    5. ``y_i = sat8(round_half_up((t_i · g_i + b_i) / 2^shift))``

    with per-channel ``g_i = round(γ_i · √D / s_y · 2^(shift − 31))`` (signed, |g| < 2^15)
    and ``b_i = round(β_i / s_y · 2^shift)`` computed by the quantizer.
    """
    x = _i64(x)
    dim = x.shape[-1]
    d = dim * x - x.sum(dim=-1, keepdim=True)
    v = (d * d).sum(dim=-1, keepdim=True) + eps_term
    r = (1 << LN_RCP_BITS) // isqrt(v)
    t = d * r
    return saturate(round_shift(t * _i64(gain) + _i64(bias), shift))


def exp_table(scale: float) -> torch.Tensor:
    """The 256-entry softmax table: ``E[u] = round_half_up(2^15 · exp(-u · scale))``, u = 0…255.

    ``scale`` is the real value of one INT8 logit step; u is ``max − logit`` clipped to 255.
    """
    u = torch.arange(256, dtype=torch.float64)
    return torch.floor(torch.exp(-u * scale) * (1 << EXP_BITS) + 0.5).to(torch.int64)


def softmax_exp(logits: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-softmax numerators and their sum: ``E[min(max − l, 255)]`` and ``Σ``.

    ``logits`` are INT8 along the last dimension; the row maximum is subtracted so every
    index is in [0, 255] and the largest logit maps to ``E[0] = 2^15``; the sum is ≥ 2^15.
    """
    logits = _i64(logits)
    u = (logits.amax(dim=-1, keepdim=True) - logits).clamp(max=255)
    e = _i64(table)[u]
    return e, e.sum(dim=-1, keepdim=True)


def softmax(logits: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-relative attention probabilities and each row's reciprocal.

    ``p = min(127, round_half_up(e · 65024 / 2^24)) = round_half_up(127 · e / 2^15)`` (0 …
    127; :data:`PROB_MULT`): 7 bits relative to the row's largest, whose ``E[0] = 2^15`` is
    127 (the ``min`` only acts for a table with entries above 2^15, outside the contract).
    ``rcp = floor(2^31 / Σe)`` is what makes them probabilities: ``e_j / Σe ≈ p_j · rcp /
    (127 · 2^16)``; P·V applies it per row after the sum (:func:`row_scale`).

    Returns
    -------
    probs : like ``logits``, 0 … 127; rcp : (..., 1), 1 … 2^16.
    """
    e, total = softmax_exp(logits, table)
    rcp = (1 << RCP_BITS) // total
    return saturate(round_shift(e * PROB_MULT, RCP_BITS - PROB_BITS), 0, INT8_MAX), rcp


def row_scale(rcp: torch.Tensor, mult: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P·V's per-row multiplier and shift: ``rcp · mult`` normalised to 16 bits.

    ``prod = rcp · mult`` (< 2^33), ``z = max(0, bitlen(prod) − 16)``, ``M = prod >> z``
    (floor), ``sh = max(0, shift − z)``: ``acc · M / 2^sh ≈ acc · rcp · mult / 2^shift``
    with a 16-bit multiplier. ``mult``/``shift`` are the P·V requantization of the ratio
    ``s_v / (127 · 2^16 · s_o)`` (the quantizer keeps ``shift`` ≥ 17, so ``sh`` is exact).
    """
    prod = _i64(rcp) * int(mult)
    # bitlen(prod): how many of 2^0 … 2^33 it reaches (exact integers, no float log).
    bits = (prod[..., None] >= (torch.ones(34, dtype=torch.int64) << torch.arange(34))).sum(-1)
    z = (bits - ROW_MULT_BITS).clamp(min=0)
    return prod >> z, (int(shift) - z).clamp(min=0)


def attention_pv(probs: torch.Tensor, v: torch.Tensor, rcp: torch.Tensor, mult: int,
                 shift: int) -> torch.Tensor:
    """P·V with the per-row scale: ``sat8(round_half_up(acc · M_row / 2^sh_row))``.

    ``acc = probs · v`` (INT32; probs row-relative, :func:`softmax`), ``M_row, sh_row =
    row_scale(rcp, mult, shift)``.
    """
    scale, sh = row_scale(rcp, mult, shift)
    return requantize(matmul(probs, v), scale, sh)


def router_scores(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Router probabilities over all E experts from INT16 logits, scale 2^-15 (0 … 32767).

    ``u = min((max − l) >> 8, 255)`` (:data:`ROUTER_LOGIT_SHIFT`; the table's step is 256
    logit steps), ``e = E[u]``, ``S = Σ e``, ``rcp = floor(2^31 / S)`` and
    ``score = min(32767, round_half_up(e · rcp / 2^16))``. The row's largest logit gets
    ``E[0] = 2^15``, so ``S ≥ 2^15``.
    """
    e, total = router_exp(logits, table)
    rcp = (1 << RCP_BITS) // total
    return saturate(round_shift(e * rcp, RCP_BITS - SCORE_BITS), 0, (1 << SCORE_BITS) - 1)


def router_exp(logits: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's exp numerators ``E[min((max − l) >> 8, 255)]`` of INT16 logits and
    their row sums (:func:`router_scores`' first step)."""
    logits = _i64(logits)
    u = ((logits.amax(dim=-1, keepdim=True) - logits) >> ROUTER_LOGIT_SHIFT).clamp(max=255)
    e = _i64(table)[u]
    return e, e.sum(dim=-1, keepdim=True)


def top_k(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest keys per row, ties to the lower expert index.

    Returns the expert indices (M, k) in descending key order and their keys.
    """
    keys = _i64(keys)
    n = keys.shape[-1]
    # A key that is unique per row and orders by (key desc, index asc); keys are ≥ −2^15.
    unique = (keys - INT16_MIN) * n + (n - 1 - torch.arange(n))
    experts = unique.topk(k, dim=-1, sorted=True).indices
    return experts, keys.gather(-1, experts)


def route(logits: torch.Tensor, table: torch.Tensor, k: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate of ``ROUTE`` on INT16 logits (M, E): scores, chosen experts, their scores.

    The top-k ranks the **logits** (ties to the lower expert index), not the scores: a
    score step is 256 logit steps wide, so nearly tied logits would share a score. The
    scores of the chosen experts (``router_scores``) are what ``COMBINE`` weighs with.

    Returns
    -------
    scores : (M, E) all scores; experts : (M, k) in descending logit order; chosen : (M, k)
    their scores.
    """
    scores = router_scores(logits, table)
    experts, _ = top_k(logits, k)
    return scores, experts, scores.gather(-1, experts)


def moe_combine(
    expert_out: torch.Tensor, scores: torch.Tensor, mult: int, shift: int
) -> torch.Tensor:
    """Score-weighted sum of a token's k expert outputs, requantized to INT8.

    ``sat8(round_half_up((Σ_j score_j · y_j) · mult / 2^shift))`` with y_j INT8 (all
    experts of a layer share one output scale) and score_j at scale 2^-15; the sum is an
    int32 accumulator (|score · y| < 2^22).

    Parameters
    ----------
    expert_out : torch.Tensor
        (M, k, D) INT8 outputs of the chosen experts.
    scores : torch.Tensor
        (M, k) scores of those experts.
    """
    acc = (_i64(scores)[..., None] * _i64(expert_out)).sum(dim=-2)
    return requantize(acc, mult, shift)
