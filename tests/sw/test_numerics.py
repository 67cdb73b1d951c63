"""The integer operations of ``m3vit.sw.quant.numerics`` against scalar Python-integer references.

Every reference below is written from the docstring's definition with Python ``int`` and
``fractions.Fraction`` (round half up is ``floor(x / 2^s + 1/2)``), one element at a time,
so it shares no trick with the vectorised code. Results must be *equal*, never close.
Inputs are seeded (the seed is in each test id and in every failure message) and always
include the edges: INT8 -128/127, int32 extremes, exact rounding ties of both signs and
saturation on both sides; each test asserts that its inputs really hit those cases.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch

from m3vit.sw.quant.numerics import (
    EXP_BITS,
    INT8_MAX,
    INT8_MIN,
    MAX_SHIFT,
    attention_pv,
    exp_table,
    gemm,
    isqrt,
    layernorm,
    linear,
    matmul,
    moe_combine,
    requantize,
    requantize16,
    residual_add,
    round_shift,
    route,
    router_scores,
    row_scale,
    saturate,
    softmax,
    softmax_exp,
    table_lookup,
    top_k,
)

SEEDS = range(5)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MULT_MAX = 2**16 - 1
SCORE_MAX = 2**15 - 1
INT8_EDGES = [-128, -127, -1, 0, 1, 126, 127]


# --------------------------------------------------------------------------------------
# Scalar references
# --------------------------------------------------------------------------------------


def round_half_up(x: int, shift: int) -> int:
    """``round(x / 2^shift)`` with halves towards +inf, from the definition."""
    return math.floor(Fraction(x, 2**shift) + Fraction(1, 2))


def is_tie(x: int, shift: int) -> bool:
    """Whether ``x / 2^shift`` lies exactly halfway between two integers."""
    q = Fraction(x, 2**shift)
    return q - math.floor(q) == Fraction(1, 2)


def clamp(x: int, lo: int, hi: int) -> int:
    return min(max(x, lo), hi)


@dataclass
class Hits:
    """What a test's inputs exercised, so that a test cannot pass on easy inputs only."""

    ties: int = 0
    negative_ties: int = 0
    below: int = 0
    above: int = 0
    inside: int = 0

    def round_sat(self, x: int, shift: int, lo: int = INT8_MIN, hi: int = INT8_MAX) -> int:
        """``clamp(round_half_up(x / 2^shift), lo, hi)``, counting ties and saturation."""
        if is_tie(x, shift):
            self.ties += 1
            self.negative_ties += x < 0
        y = round_half_up(x, shift)
        self.below += y < lo
        self.above += y > hi
        self.inside += lo <= y <= hi
        return clamp(y, lo, hi)

    def require(self, *, ties: bool = True, negative_ties: bool = False,
                saturation: bool = True, context: str = "") -> None:
        if ties:
            assert self.ties > 0, f"inputs hit no rounding tie {context}: {self}"
        if negative_ties:
            assert self.negative_ties > 0, f"inputs hit no negative tie {context}: {self}"
        if saturation:
            assert self.below > 0 and self.above > 0, (
                f"inputs did not saturate on both sides {context}: {self}")
        assert self.inside > 0, f"every value saturated {context}: {self}"


def ref_gemm(x: list[list[int]], w: list[list[int]], bias: list[int] | None) -> list[list[int]]:
    bias = [0] * len(w) if bias is None else bias
    return [[sum(xk * wk for xk, wk in zip(row, w_row, strict=True)) + b
             for w_row, b in zip(w, bias, strict=True)] for row in x]


def ref_layernorm(row: list[int], gain: list[int], bias: list[int], shift: int, eps_term: int,
                  hits: Hits) -> list[int]:
    """The docstring's five steps, one token, Python integers."""
    dim = len(row)
    total = sum(row)
    d = [dim * xi - total for xi in row]                          # 1
    v = sum(di * di for di in d) + eps_term                       # 2
    r = 2**31 // math.isqrt(v)                                    # 3
    t = [di * r for di in d]                                      # 4
    assert all(abs(ti) <= 2**31 for ti in t), "docstring bound |t_i| <= 2^31 violated"
    return [hits.round_sat(ti * gi + bi, shift)                   # 5
            for ti, gi, bi in zip(t, gain, bias, strict=True)]


def ref_softmax_exp(row: list[int], table: list[int]) -> tuple[list[int], int]:
    top = max(row)
    e = [table[min(top - li, 255)] for li in row]
    return e, sum(e)


def ref_softmax(row: list[int], table: list[int], hits: Hits) -> tuple[list[int], int]:
    """Row-relative probabilities round(127 · e / 2^15) and the row's 2^31 // Σe."""
    e, total = ref_softmax_exp(row, table)
    return [hits.round_sat(ei * 127 * 2**9, 24, 0, 127) for ei in e], 2**31 // total


def ref_row_scale(rcp: int, mult: int, shift: int) -> tuple[int, int]:
    """rcp · mult kept to its 16 leading bits (floor), the shift lowered to match."""
    prod = rcp * mult
    z = max(0, prod.bit_length() - 16)
    return prod >> z, max(0, shift - z)


def ref_router_scores(row: list[int], table: list[int], hits: Hits) -> list[int]:
    """INT16 logits: the table is indexed with (max − l) >> 8."""
    top = max(row)
    e = [table[min((top - li) // 256, 255)] for li in row]
    rcp = 2**31 // sum(e)
    return [hits.round_sat(ei * rcp, 16, 0, SCORE_MAX) for ei in e]


def ref_top_k(scores: list[int], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def assert_equal(got: torch.Tensor, want: list, what: str, seed: int | None = None) -> None:
    """Exact equality with the reference; report the first mismatch and the seed."""
    assert got.dtype == torch.int64, f"{what}: dtype {got.dtype}, want int64"
    want_t = torch.tensor(want, dtype=torch.int64)
    assert got.shape == want_t.shape, f"{what} (seed={seed}): shape {got.shape} != {want_t.shape}"
    bad = (got != want_t).nonzero()
    if len(bad):
        idx = tuple(bad[0].tolist())
        pytest.fail(f"{what} (seed={seed}): {len(bad)} mismatches, first at {idx}: "
                    f"got {got[idx].item()}, want {want_t[idx].item()}")


def int8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(INT8_MIN, INT8_MAX, shape, endpoint=True)


# --------------------------------------------------------------------------------------
# Rounding, saturation, requantization
# --------------------------------------------------------------------------------------


# (x, shift, round_half_up(x / 2^shift)) worked by hand: halves go up, also when negative.
HAND_ROUNDING = [
    (5, 1, 3), (-5, 1, -2), (3, 1, 2), (-3, 1, -1), (1, 1, 1), (-1, 1, 0),
    (6, 2, 2), (-6, 2, -1), (2, 2, 1), (-2, 2, 0), (1, 2, 0), (-1, 2, 0), (3, 2, 1),
    (-3, 2, -1), (7, 0, 7), (-7, 0, -7), (0, 0, 0), (0, 62, 0),
    (2**61, 62, 1), (-(2**61), 62, 0), (2**61 - 1, 62, 0), (-(2**61) - 1, 62, -1),
]


def test_reference_rounding_is_half_up():
    for x, s, want in HAND_ROUNDING:
        assert round_half_up(x, s) == want, (x, s)
    # The rule differs from Python's round (half to even), from half away from zero and from
    # truncation, so a reference or an implementation using any of those would fail.
    assert round_half_up(5, 1) != round(2.5)
    assert round_half_up(-5, 1) != -math.floor(2.5 + 0.5)
    assert round_half_up(-3, 2) != int(-0.75)
    assert is_tie(-5, 1) and is_tie(2**61, 62) and is_tie(6, 2)
    assert not is_tie(7, 2) and not is_tie(3, 0)


@pytest.mark.parametrize(("x", "shift", "want"), HAND_ROUNDING)
def test_round_shift_hand_values(x, shift, want):
    assert round_shift(torch.tensor([x]), shift).tolist() == [want]
    assert round_shift(torch.tensor([x]), torch.tensor([shift])).tolist() == [want]


@pytest.mark.parametrize("seed", SEEDS)
def test_round_shift_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = 600
    shift = rng.integers(0, MAX_SHIFT, n, endpoint=True)
    shift[:4] = [0, 1, MAX_SHIFT, MAX_SHIFT - 1]
    x = rng.integers(-(2**47), 2**47, n, endpoint=True)    # |acc · mult| < 2^47
    # A third are exact ties odd · 2^(s-1), both signs, kept within |x| <= 2^61 so that
    # the rounding increment cannot overflow int64.
    for i in range(n // 3):
        s = max(int(shift[i]), 1)
        shift[i] = s
        bits = max(0, min(20, 61 - s))
        x[i] = (2 * int(rng.integers(-(2**bits), 2**bits)) + 1) << (s - 1)
    pairs = [(int(xi), int(si)) for xi, si in zip(x, shift, strict=True)]
    want = [round_half_up(xi, si) for xi, si in pairs]
    ties = [xi for xi, si in pairs if is_tie(xi, si)]
    assert any(t < 0 for t in ties) and any(t > 0 for t in ties), f"seed={seed}: ties missing"
    assert_equal(round_shift(torch.from_numpy(x), torch.from_numpy(shift)), want,
                 "round_shift per-element shift", seed)
    small = x[n // 3:]               # the random part: |x| <= 2^47, safe for every shift
    for s in (0, 1, 13, MAX_SHIFT):
        assert_equal(round_shift(torch.from_numpy(small), s),
                     [round_half_up(int(xi), s) for xi in small], f"round_shift scalar {s}", seed)


def test_saturate():
    values = [-(2**63), INT32_MIN, -32769, -32768, -129, -128, -127, -1, 0, 1,
              126, 127, 128, 32767, 32768, INT32_MAX, 2**63 - 1]
    x = torch.tensor(values)
    assert_equal(saturate(x), [clamp(v, -128, 127) for v in values], "saturate INT8")
    assert_equal(saturate(x, 0, 127), [clamp(v, 0, 127) for v in values], "saturate [0,127]")
    assert_equal(saturate(x, 0, SCORE_MAX), [clamp(v, 0, SCORE_MAX) for v in values],
                 "saturate [0,32767]")
    assert saturate(torch.tensor([-129, 128])).tolist() == [-128, 127]


@pytest.mark.parametrize("seed", SEEDS)
def test_requantize_per_channel(seed):
    rng = np.random.default_rng(seed)
    channels, rows = 24, 20
    # Odd multipliers so that acc = odd · 2^(s-1) gives an exact tie of acc · mult.
    mult = 2 * rng.integers(0, 2**15, channels) + 1
    mult[:4] = [0, 1, MULT_MAX, 2]
    shift = rng.integers(0, 40, channels, endpoint=True)
    shift[:8] = [0, 1, MAX_SHIFT, 16, 1, 0, 31, MAX_SHIFT]
    shift[8:12] = [1, 2, 3, 4]
    acc = rng.integers(INT32_MIN, INT32_MAX, (rows, channels), endpoint=True)
    acc[0], acc[1] = INT32_MIN, INT32_MAX
    acc[2] = [-1, 1, 0, 5, -5, 3, -3, 2, -2, 7, -7, 1] * 2
    acc[3:7] = rng.integers(-600, 600, (4, channels))      # results inside the INT8 range
    for c in range(channels):                              # a row of exact ties
        s = int(shift[c])
        if 1 <= s <= 31:
            acc[7, c] = (2 * int(rng.integers(-(2 ** (31 - s)), 2 ** (31 - s))) + 1) << (s - 1)
    hits = Hits()
    want = [[hits.round_sat(int(a) * int(mu), int(s))
             for a, mu, s in zip(row, mult, shift, strict=True)] for row in acc]
    hits.require(negative_ties=True, context=f"seed={seed}")
    got = requantize(torch.from_numpy(acc), torch.from_numpy(mult), torch.from_numpy(shift))
    assert_equal(got, want, "requantize per channel", seed)


def test_requantize_scalar_extremes():
    accs = [INT32_MIN, INT32_MIN + 1, -(2**16), -3, -1, 0, 1, 3, 2**16, INT32_MAX]
    hits = Hits()
    for mult in (0, 1, 2, 255, 256, MULT_MAX):
        for shift in (0, 1, 7, 8, 15, 16, 31, 32, 46, 47, 48, MAX_SHIFT):
            want = [hits.round_sat(a * mult, shift) for a in accs]
            assert_equal(requantize(torch.tensor(accs), mult, shift), want,
                         f"requantize mult={mult} shift={shift}")
    hits.require(negative_ties=True)


# --------------------------------------------------------------------------------------
# GEMM and linear
# --------------------------------------------------------------------------------------


def extreme_operands(rng: np.random.Generator, m: int, n: int, k: int):
    x, w = int8(rng, (m, k)), int8(rng, (n, k))
    x[0] = INT8_MIN                              # -128 · -128 = 2^14, the largest product
    w[0] = INT8_MIN
    if m > 1:
        x[-1] = INT8_MAX
    if n > 1:
        w[-1] = INT8_MAX
    bias = rng.integers(INT32_MIN, INT32_MAX, n, endpoint=True)
    bias[0] = INT32_MAX
    if n > 1:
        bias[-1] = INT32_MIN
    return x, w, bias


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 1), (4, 6, 17), (5, 4, 64), (2, 3, 768)],
                         ids=lambda s: "MxNxK={}x{}x{}".format(*s))
@pytest.mark.parametrize("seed", SEEDS)
def test_gemm_matches_reference(seed, shape):
    m, n, k = shape
    rng = np.random.default_rng(seed)
    x, w, bias = extreme_operands(rng, m, n, k)
    xl, wl, bl = x.tolist(), w.tolist(), bias.tolist()
    xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias)
    assert_equal(gemm(xt, wt, bt), ref_gemm(xl, wl, bl), "gemm", seed)
    assert_equal(gemm(xt, wt), ref_gemm(xl, wl, None), "gemm without bias", seed)
    assert_equal(gemm(xt[None], wt, bt), [ref_gemm(xl, wl, bl)], "gemm (1, M, K)", seed)
    assert gemm(xt, wt)[0, 0].item() == k * 2**14                 # all -128 · all -128


def ref_matmul(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    return [[sum(ai * bi for ai, bi in zip(row, col, strict=True)) for col in zip(*b, strict=True)]
            for row in a]


@pytest.mark.parametrize("seed", SEEDS)
def test_matmul_matches_reference(seed):
    rng = np.random.default_rng(seed)
    # Attention shapes: q @ k^T on INT8 (batch, heads, tokens, head_dim) and probs @ v.
    q, k = int8(rng, (2, 3, 5, 16)), int8(rng, (2, 3, 5, 16))
    q[0, 0], k[0, 0] = INT8_MIN, INT8_MIN
    q[1, 2], k[1, 2] = INT8_MAX, INT8_MIN
    probs, v = rng.integers(0, 127, (2, 3, 5, 5), endpoint=True), int8(rng, (2, 3, 5, 16))
    kt = torch.from_numpy(k).transpose(-2, -1)
    got_qk, got_pv = matmul(torch.from_numpy(q), kt), matmul(torch.from_numpy(probs),
                                                             torch.from_numpy(v))
    want_qk = [[ref_matmul(q[i, h].tolist(), k[i, h].T.tolist()) for h in range(3)]
               for i in range(2)]
    want_pv = [[ref_matmul(probs[i, h].tolist(), v[i, h].tolist()) for h in range(3)]
               for i in range(2)]
    assert_equal(got_qk, want_qk, "matmul q @ k^T", seed)
    assert_equal(got_pv, want_pv, "matmul probs @ v", seed)
    # Largest operands the contract allows (|a|·|b|·K < 2^53), odd so no low bit is spare.
    big = 2 * rng.integers(2**24, 2**25, (3, 2)) - 1           # |value| < 2^26, K = 2
    big[0, 0] = big[0, 1] = 2**26 - 1
    a = big * rng.choice([-1, 1], (3, 2))
    b = (2 * rng.integers(2**24, 2**25, (2, 4)) - 1) * rng.choice([-1, 1], (2, 4))
    b[0, 0], b[1, 0] = 2**26 - 1, 2**26 - 3
    assert_equal(matmul(torch.from_numpy(a), torch.from_numpy(b)),
                 ref_matmul(a.tolist(), b.tolist()), "matmul near 2^53", seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_matches_reference(seed):
    m, n, k = 8, 12, 48
    rng = np.random.default_rng(seed)
    x, w, bias = extreme_operands(rng, m, n, k)
    bias[1:-1] = rng.integers(-(2**16), 2**16, n - 2)
    mult = rng.integers(0, MULT_MAX, n, endpoint=True)
    mult[:3] = [1, MULT_MAX, 1]
    shift = rng.integers(10, 28, n)
    shift[:3] = [0, 30, 1]
    acc = ref_gemm(x.tolist(), w.tolist(), bias.tolist())
    hits = Hits()
    want = [[hits.round_sat(a * int(mu), int(s)) for a, mu, s in zip(row, mult, shift, strict=True)]
            for row in acc]
    hits.require(context=f"seed={seed}")
    got = linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias),
                 torch.from_numpy(mult), torch.from_numpy(shift))
    assert_equal(got, want, "linear", seed)


# --------------------------------------------------------------------------------------
# Table lookup and residual add
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_table_lookup_all_256_bytes(seed):
    rng = np.random.default_rng(seed)
    table = rng.permutation(np.arange(-(2**15), 2**15))[:256]      # 256 distinct entries
    q = list(range(INT8_MIN, INT8_MAX + 1))
    rng.shuffle(q)
    # Two's-complement byte of q: q itself for q >= 0, q + 256 for q < 0.
    want = [int(table[v if v >= 0 else v + 256]) for v in q]
    got = table_lookup(torch.tensor(q).reshape(16, 16), torch.from_numpy(table))
    assert_equal(got.flatten(), want, "table_lookup", seed)
    edges = table_lookup(torch.tensor([0, 127, -128, -1]), torch.from_numpy(table))
    assert edges.tolist() == [table[0], table[127], table[128], table[255]]


@pytest.mark.parametrize("mults", [(1, 1), (MULT_MAX, 1), (1, MULT_MAX), (300, 17), (0, 40000),
                                   (MULT_MAX, MULT_MAX)], ids=lambda m: "ma={}_mb={}".format(*m))
@pytest.mark.parametrize("seed", SEEDS)
def test_residual_add_matches_reference(seed, mults):
    mult_a, mult_b = mults
    rng = np.random.default_rng(seed)
    pairs = list(itertools.product(INT8_EDGES, repeat=2)) + [
        (int(a), int(b)) for a, b in int8(rng, (300, 2))]
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    hits = Hits()
    for shift in (0, 1, 9, 16, 17):
        shift_hits = Hits()
        want = [shift_hits.round_sat(pa * mult_a + pb * mult_b, shift) for pa, pb in pairs]
        assert_equal(residual_add(a, b, mult_a, mult_b, shift), want,
                     f"residual_add shift={shift}", seed)
        if shift == 0:
            shift_hits.require(ties=False, context=f"seed={seed} shift=0")
        hits.ties += shift_hits.ties
    assert hits.ties > 0, f"seed={seed}: no rounding tie hit"


def test_residual_add_hand_ties():
    a = torch.tensor([1, -1, 3, -3, 127, -128])
    b = torch.tensor([0, 0, 0, 0, 127, -128])
    # (a + b) / 2: 0.5 -> 1, -0.5 -> 0, 1.5 -> 2, -1.5 -> -1, 127 -> 127, -128 -> -128
    assert residual_add(a, b, 1, 1, 1).tolist() == [1, 0, 2, -1, 127, -128]
    # a · 3 + b: 3, -3, 9, -9, 508 -> 127, -512 -> -128 (shift 0 saturates both sides)
    assert residual_add(a, b, 3, 1, 0).tolist() == [3, -3, 9, -9, 127, -128]


# --------------------------------------------------------------------------------------
# isqrt and LayerNorm
# --------------------------------------------------------------------------------------

# Largest root whose successor's square still fits int64 (3037000499^2 < 2^63 < 3037000500^2).
ISQRT_SAFE_ROOT = 3037000498


def isqrt_cases(seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    roots = [1, 2, 3, 10, 2**26 - 1, 2**26, 2**26 + 1, 94906265, 94906266, 94906267,
             2**31 - 1, 2**31, ISQRT_SAFE_ROOT]
    roots += [int(r) for r in rng.integers(2**26, ISQRT_SAFE_ROOT, 100)]
    roots += [int(r) for r in rng.integers(1, 2**26, 50)]
    near = [r * r + d for r in roots for d in (-1, 0, 1)]
    large = [int(v) for v in rng.integers(2**52, 2**62, 200, endpoint=True)]
    return [0, 1, 2, 3, 4, 2**52, 2**53 - 1, 2**53, 2**53 + 1, 2**62, *near, *large]


@pytest.mark.parametrize("seed", SEEDS)
def test_isqrt_matches_math_isqrt(seed):
    values = isqrt_cases(seed)
    assert max(values) < (ISQRT_SAFE_ROOT + 1) ** 2
    # Squares minus one above 2^53 round up to the square in float64: the fix-up must act.
    assert any(v > 2**53 and float(v) == float(math.isqrt(v) + 1) ** 2 for v in values)
    assert_equal(isqrt(torch.tensor(values)), [math.isqrt(v) for v in values], "isqrt", seed)


def test_isqrt_top_of_int64():
    # (s + 1)^2 would overflow int64 here without the clamp in isqrt.
    values = [(ISQRT_SAFE_ROOT + 1) ** 2 - 1, (ISQRT_SAFE_ROOT + 1) ** 2, 2**63 - 1]
    assert_equal(isqrt(torch.tensor(values)), [math.isqrt(v) for v in values], "isqrt top")


def layernorm_rows(rng: np.random.Generator, dim: int) -> list[list[int]]:
    half = dim // 2
    centre = int(rng.integers(-120, 120))
    one_hot = [INT8_MIN] * dim
    one_hot[int(rng.integers(dim))] = INT8_MAX
    one_cold = [INT8_MAX] * dim
    one_cold[int(rng.integers(dim))] = INT8_MIN
    one_step = [centre] * dim                   # V = D(D-1) + eps_term: eps_term matters
    one_step[int(rng.integers(dim))] = centre + 1
    return [
        [INT8_MIN] * dim, [INT8_MAX] * dim, [0] * dim,          # all equal: d = 0, V = eps
        [int(rng.integers(INT8_MIN, INT8_MAX + 1))] * dim,
        [INT8_MIN, INT8_MAX] * half,                            # alternating extremes
        [INT8_MIN] * half + [INT8_MAX] * half,
        one_hot, one_cold, one_step,
        [int(v) for v in rng.integers(centre - 2, centre + 3, dim)],   # small V: eps matters
        *int8(rng, (4, dim)).tolist(),
    ]


@pytest.mark.parametrize("dim", [4, 64, 192, 384], ids=lambda d: f"D={d}")
@pytest.mark.parametrize("seed", SEEDS)
def test_layernorm_matches_reference(seed, dim):
    rng = np.random.default_rng(seed)
    shift = int(rng.integers(33, 40))
    eps_term = 1 if seed % 2 == 0 else int(rng.integers(2, 2**20))
    gain = rng.integers(-(2**15) + 1, 2**15 - 1, dim, endpoint=True)   # signed, |g| < 2^15
    gain[:4] = [2**15 - 1, -(2**15) + 1, 0, 1]
    bias = rng.integers(-(2 ** (shift + 8)), 2 ** (shift + 8), dim)
    # Even channels get bias = odd · 2^(shift-1): an exact tie in every all-equal row (t = 0).
    bias[::2] = (2 * rng.integers(-140, 140, (dim + 1) // 2) + 1) * 2 ** (shift - 1)
    # ... including 1.5 and -1.5, and biases that saturate the all-equal rows on both sides.
    bias[:4] = [3 * 2 ** (shift - 1), 200 * 2**shift, -3 * 2 ** (shift - 1), -200 * 2**shift]
    rows = layernorm_rows(rng, dim)
    hits = Hits()
    want = [ref_layernorm(row, gain.tolist(), bias.tolist(), shift, eps_term, hits)
            for row in rows]
    hits.require(negative_ties=True, context=f"seed={seed} D={dim}")
    got = layernorm(torch.tensor(rows), torch.from_numpy(gain), torch.from_numpy(bias),
                    shift, eps_term)
    assert_equal(got, want, f"layernorm D={dim}", seed)


def test_layernorm_eps_term_hand_values():
    # x = [1, 0, 0, 0]: d = [3, -1, -1, -1], Σd² = 12, gain 1, bias 0, shift 16.
    # eps_term 1:    V = 13, isqrt 3, r = 715827882, t_0 / 2^16 = 32767.99997 -> 127.
    # eps_term 2^20: V = 1048588, isqrt 1024, r = 2^21, t / 2^16 = [96, -32, -32, -32].
    x, gain, bias = torch.tensor([[1, 0, 0, 0]]), torch.ones(4, dtype=torch.int64), torch.zeros(4)
    assert layernorm(x, gain, bias, 16, 1).tolist() == [[127, -128, -128, -128]]
    assert layernorm(x, gain, bias, 16, 2**20).tolist() == [[96, -32, -32, -32]]


def test_layernorm_constant_row_is_the_bias():
    # d = 0 everywhere, so y = sat8(round_half_up(b / 2^shift)) whatever gain and eps_term.
    shift = 8
    bias = torch.tensor([3 * 128, -3 * 128, 128, -128, 200 * 256, -200 * 256, 0, 255])
    y = layernorm(torch.full((2, 8), -128), torch.full((8,), 12345), bias, shift, 7)
    assert y.tolist() == [[2, -1, 1, 0, 127, -128, 0, 1]] * 2


# --------------------------------------------------------------------------------------
# Exponential table, softmax, router scores
# --------------------------------------------------------------------------------------

EXP_SCALES = [0.0, 0.01, 1 / 32, 0.05, 0.1, 0.25, 1.0, 8.0]


@pytest.mark.parametrize("scale", EXP_SCALES, ids=lambda s: f"scale={s}")
def test_exp_table(scale):
    table = exp_table(scale)
    assert table.dtype == torch.int64 and table.shape == (256,)
    entries = table.tolist()
    assert entries[0] == 2**EXP_BITS == 32768
    assert all(a >= b for a, b in itertools.pairwise(entries)), "not non-increasing"
    assert all(0 <= e <= 32768 for e in entries)
    # Python floats, rounded half up like the table: only away from a tie, since torch.exp
    # may differ from math.exp by an ulp there; these scales have no near-tie.
    near_tie = 0
    for u, e in enumerate(entries):
        real = 2**EXP_BITS * math.exp(-u * scale)
        if abs(real - math.floor(real) - 0.5) < 1e-9:
            near_tie += 1
            continue
        assert e == math.floor(real + 0.5), f"E[{u}] = {e}, want round_half_up({real})"
    assert near_tie == 0


def test_exp_table_known_values():
    assert exp_table(0.0).tolist() == [32768] * 256
    # 2^15 · e^-1 = 12054.64, e^-2 -> 4434.65, e^-8 -> 10.99, e^-16 -> 0.0037
    assert exp_table(1.0)[[0, 1, 2, 8, 16, 255]].tolist() == [32768, 12055, 4435, 11, 0, 0]


def softmax_rows(rng: np.random.Generator, n: int) -> list[list[int]]:
    one_hot = [INT8_MIN] * n
    one_hot[int(rng.integers(n))] = INT8_MAX            # max - min = 255, the last entry
    two_max = int8(rng, (n,)).tolist()
    two_max[0] = two_max[-1] = INT8_MAX
    return [
        [INT8_MIN] * n, [INT8_MAX] * n, [int(rng.integers(INT8_MIN, INT8_MAX + 1))] * n,
        one_hot, two_max,
        *int8(rng, (4, n)).tolist(),
        *rng.integers(-4, 4, (2, n)).tolist(),
    ]


@pytest.mark.parametrize("scale", [0.01, 0.125, 1.0], ids=lambda s: f"scale={s}")
@pytest.mark.parametrize("n", [1, 2, 3, 8, 16, 197], ids=lambda n: f"n={n}")
@pytest.mark.parametrize("seed", SEEDS)
def test_softmax_family_matches_reference(seed, n, scale):
    rng = np.random.default_rng(seed)
    table = exp_table(scale)
    table_l = table.tolist()
    rows = softmax_rows(rng, n)
    logits = torch.tensor(rows)

    e, total = softmax_exp(logits, table)
    ref = [ref_softmax_exp(row, table_l) for row in rows]
    assert_equal(e, [r[0] for r in ref], "softmax_exp numerators", seed)
    assert_equal(total, [[r[1]] for r in ref], "softmax_exp sums", seed)
    assert all(r[1] >= 2**15 for r in ref)

    prob_hits, score_hits = Hits(), Hits()
    p, rcp = softmax(logits, table)
    refs = [ref_softmax(row, table_l, prob_hits) for row in rows]
    assert_equal(p, [r[0] for r in refs], "softmax", seed)
    assert_equal(rcp, [[r[1]] for r in refs], "softmax rcp", seed)
    # INT16 router logits 256 times the INT8 ones index the table alike.
    scores = router_scores(logits * 256, table)
    assert_equal(scores, [ref_router_scores([v * 256 for v in row], table_l, score_hits)
                          for row in rows], "router_scores", seed)

    for i in range(3):                                  # all-equal rows: each the maximum
        assert p[i].tolist() == [127] * n and len(set(scores[i].tolist())) == 1
        assert rcp[i, 0].item() == 65536 // n
    assert (p.amax(dim=-1) == 127).all()                # relative to the row's largest
    if n == 1:                                          # 2^31 / 2^16
        assert p.flatten().tolist() == [127] * len(rows)
        assert rcp.flatten().tolist() == [65536] * len(rows)
        assert scores.flatten().tolist() == [SCORE_MAX] * len(rows)
        assert score_hits.above > 0
    if scale == 1.0 and n > 1:                          # E[255] = 0: the one-hot row is exact
        assert p[3].tolist() == [127 if v == INT8_MAX else 0 for v in rows[3]]
        assert scores[3].tolist() == [SCORE_MAX if v == INT8_MAX else 0 for v in rows[3]]


def test_softmax_exp_clips_differences_beyond_255():
    table = exp_table(0.01)                 # E[255] = 2560: the clipped index is visible
    row = [300, 45, 0, -300, -10000, 299]
    e, total = softmax_exp(torch.tensor([row]), table)
    want = [table[0], table[255], table[255], table[255], table[255], table[1]]
    assert e.tolist() == [[int(v) for v in want]]
    assert total.tolist() == [[sum(int(v) for v in want)]]
    ref_e, ref_total = ref_softmax_exp(row, table.tolist())
    assert_equal(e, [ref_e], "softmax_exp clipped")
    assert_equal(total, [[ref_total]], "softmax_exp clipped sum")


def tie_table(entries: list[int]) -> torch.Tensor:
    return torch.tensor(entries + [0] * (256 - len(entries)))


def test_softmax_rounds_ties_up():
    # p = round_half_up(127 · e / 2^15): e = 2^15 -> 127, and e = 2^14 -> 63.5 -> 64, the
    # one e ≤ 2^15 that lands on a half (127 · e = (2k + 1) · 2^14 needs 127 | 2k + 1).
    table = tie_table([32768, 16384, 0])
    logits = torch.tensor([[0, -1, -2]])
    p, rcp = softmax(logits, table)
    assert p.tolist() == [[127, 64, 0]] and rcp.tolist() == [[2**31 // 49152]]
    hits = Hits()
    assert ref_softmax([0, -1, -2], table.tolist(), hits) == ([127, 64, 0], 2**31 // 49152)
    assert hits.ties == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_row_scale_matches_reference(seed):
    rng = np.random.default_rng(seed)
    rcps = [1, 2, 65535, 65536, 2**31 // (2**15 * 129), *rng.integers(1, 2**16 + 1, 40)]
    for mult in (0, 1, 2**15, 65535, *rng.integers(0, 2**16, 6).tolist()):
        for shift in (0, 5, 16, 17, 40, 62):
            got_m, got_s = row_scale(torch.tensor(rcps), mult, shift)
            want = [ref_row_scale(int(r), int(mult), shift) for r in rcps]
            assert got_m.tolist() == [w[0] for w in want], (seed, mult, shift)
            assert got_s.tolist() == [w[1] for w in want], (seed, mult, shift)
            assert (got_m < 2**16).all()
    # The leading bit is kept: prod ≥ 2^16 gives M in [2^15, 2^16).
    m_, s_ = row_scale(torch.tensor([65536]), 65535, 40)
    assert m_.item() == (65536 * 65535) >> 16 and s_.item() == 24


def test_attention_pv_is_requantize_per_row():
    probs = torch.tensor([[127, 64, 0], [3, 127, 127]])
    v = torch.tensor([[10, -20], [30, 40], [-128, 127]])
    rcp = torch.tensor([[2**31 // 49152], [2**31 // 70000]])
    out = attention_pv(probs, v, rcp, 40000, 40)
    acc = probs @ v
    for m in range(2):
        scale, sh = ref_row_scale(int(rcp[m, 0]), 40000, 40)
        assert out[m].tolist() == [max(-128, min(127, (int(a) * scale + (1 << (sh - 1))) >> sh))
                                   for a in acc[m]]


def test_router_scores_round_ties_up():
    # Σe = 2^16, so scores = round_half_up(e · 2^15 / 2^16) = round_half_up(e / 2):
    # 16384, 384.5 -> 385, 15999.5 -> 16000 (half to even would give 384 and 16000).
    table = tie_table([32768, 769, 31999])
    logits = torch.tensor([[5, 4, 3]]) * 256 + 17
    assert router_scores(logits, table).tolist() == [[16384, 385, 16000]]
    hits = Hits()
    assert ref_router_scores(logits[0].tolist(), table.tolist(), hits) == [16384, 385, 16000]
    assert hits.ties == 2


# --------------------------------------------------------------------------------------
# Top-k and MoE combine
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ek", [(4, 1), (4, 2), (4, 4), (8, 2), (16, 1), (16, 4), (16, 16)],
                         ids=lambda ek: "E={}_k={}".format(*ek))
@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_matches_reference(seed, ek):
    n, k = ek
    rng = np.random.default_rng(seed)
    pairs = [int(v) for v in rng.integers(0, 5, n // 2) for _ in range(2)]
    rows = [
        [0] * n, [SCORE_MAX] * n, [int(rng.integers(0, SCORE_MAX))] * n,   # all equal
        pairs,                                                              # pairwise ties
        *rng.integers(0, 3, (6, n)).tolist(),                               # many ties
        *rng.integers(0, SCORE_MAX, (6, n), endpoint=True).tolist(),
    ]
    assert all(len(set(r)) < n for r in rows[3:6]), f"seed={seed}: tied rows have no tie"
    experts, chosen = top_k(torch.tensor(rows), k)
    want = [ref_top_k(r, k) for r in rows]
    assert_equal(experts, want, "top_k experts", seed)
    want_scores = [[r[i] for i in idx] for r, idx in zip(rows, want, strict=True)]
    assert_equal(chosen, want_scores, "top_k scores", seed)
    for i in range(3):
        assert experts[i].tolist() == list(range(k))


def test_top_k_hand_ties():
    scores = torch.tensor([[7, 7, 7, 7], [1, 2, 1, 2], [5, 1, 5, 5], [0, 0, 0, 32767]])
    experts, chosen = top_k(scores, 2)
    assert experts.tolist() == [[0, 1], [1, 3], [0, 2], [3, 0]]
    assert chosen.tolist() == [[7, 7], [2, 2], [5, 5], [32767, 0]]


@pytest.mark.parametrize("k", [1, 2, 4], ids=lambda k: f"k={k}")
@pytest.mark.parametrize("seed", SEEDS)
def test_moe_combine_matches_reference(seed, k):
    rng = np.random.default_rng(seed)
    m, dim = 10, 16
    scores = rng.integers(0, SCORE_MAX, (m, k), endpoint=True)
    scores[0], scores[1] = SCORE_MAX, 0
    scores[2] = [2**14] + [0] * (k - 1)          # score_0 · y = 2^14 · y: ties at shift 15
    scores[3, 0] = SCORE_MAX
    y = int8(rng, (m, k, dim))
    y[0, :, : dim // 2], y[0, :, dim // 2:] = INT8_MAX, INT8_MIN
    y[1] = INT8_MIN
    y[2, 0] = [-1, 1, -3, 3, -127, 127, 5, -5] * 2
    y[3] = INT8_MIN
    hits = Hits()
    for mult, shift in [(1, 15), (1, 0), (MULT_MAX, 31), (300, 22), (MULT_MAX, MAX_SHIFT),
                        (int(rng.integers(1, MULT_MAX)), int(rng.integers(16, 30)))]:
        acc = [[sum(int(scores[t, j]) * int(y[t, j, c]) for j in range(k)) for c in range(dim)]
               for t in range(m)]
        assert all(abs(a) < k * 2**22 for row in acc for a in row)
        want = [[hits.round_sat(a * mult, shift) for a in row] for row in acc]
        got = moe_combine(torch.from_numpy(y), torch.from_numpy(scores), mult, shift)
        assert_equal(got, want, f"moe_combine mult={mult} shift={shift}", seed)
    hits.require(negative_ties=True, context=f"seed={seed} k={k}")


@pytest.mark.parametrize("seed", SEEDS)
def test_router_on_int16_logits_matches_reference(seed):
    """Full-range and clustered INT16 logits: scores from (max − l) >> 8, the top-k from
    the logits themselves (near-ties one step apart are told apart)."""
    rng = np.random.default_rng(seed)
    table = exp_table(0.05)
    rows = [rng.integers(-2**15, 2**15, 16).tolist(),
            (rng.integers(-300, 300, 16) + 1000).tolist(),
            [7] * 16,
            [2**15 - 1, -2**15] + [0] * 14]
    logits = torch.tensor(rows)
    hits = Hits()
    assert_equal(router_scores(logits, table),
                 [ref_router_scores(row, table.tolist(), hits) for row in rows],
                 "router_scores INT16", seed)
    scores, experts, chosen = route(logits, table, 3)
    assert experts.tolist() == [ref_top_k(row, 3) for row in rows]
    assert torch.equal(chosen, scores.gather(-1, experts))


def test_route_ranks_logits_not_scores():
    """Two logits one INT16 step apart share a score; the top-1 is the larger logit."""
    table = exp_table(0.1)
    logits = torch.tensor([[100, 101, -5000]])
    scores, experts, _ = route(logits, table, 1)
    assert scores[0, 0] == scores[0, 1]
    assert experts.tolist() == [[1]]
    assert requantize16(torch.tensor([2**40, -2**40, 300]), 1, 0).tolist() == [
        2**15 - 1, -2**15, 300]


def test_softmax_clamps_a_table_above_the_contract():
    # Entries above 2^15 (not an exp_table, but a LOAD_TABLE may load anything): the
    # probability saturates at 127, as the unit's output stage does.
    p, rcp = softmax(torch.tensor([[0, -1, -2]]), tie_table([65535, 40000, 16384]))
    assert p.tolist() == [[127, 127, 64]] and rcp.tolist() == [[2**31 // 121919]]
