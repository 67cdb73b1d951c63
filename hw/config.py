"""The one frozen hardware configuration that drives elaboration, the compiler and the runtime.

Capacities are checked at construction; the compiler refuses a model that exceeds them
(later issue), and :meth:`AccelConfig.config_hash` identifies a bitstream so a package
compiled for another configuration is refused by the runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .errors import M3VitError


class AccelConfigError(M3VitError, ValueError):
    """An invalid accelerator configuration (the message names the offending value)."""


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class AccelConfig:
    """Capacities and shape of one generated accelerator.

    Parameters
    ----------
    pe_rows : int
        Reduction (K) width of the PE array: INT8 products summed per column per cycle.
    pe_cols : int
        Output (N) width of the PE array: output channels computed in parallel.
    max_tokens : int
        Tokens per image held on chip (129 for ``edge-moe``).
    max_dim : int
        Largest embedding width D.
    max_hidden : int
        Largest MLP / expert hidden width.
    max_heads : int
        Largest number of attention heads.
    max_experts : int
        Largest number of experts per MoE layer.
    max_top_k : int
        Largest top-k.
    axi_data_width : int
        Data width of the AXI4 master ports in bits (128 for the ZCU104 HP ports).
    axi_addr_width : int
        Address width of the AXI4 master ports.
    n_master_ports : int
        AXI4 master ports, each on its own HP port of the PS (1…4; three by default, on
        HP0, HP1 and HP3: :mod:`m3vit.hw.hp_ports`). Reads are striped across all of them,
        writes use the first.
    max_burst_beats : int
        Longest INCR burst issued (AXI4 allows 256; 4 KiB boundaries are never crossed).
    max_outstanding : int
        Read bursts in flight per port.
    clock_mhz : float
        Target clock of the programmable logic.
    act_buffer_words : int
        Depth of the on-chip activation buffer in words of ``pe_cols`` INT8 lanes, a
        multiple of 256 (every activation of a batch lives there: 16,384 × 32 bytes =
        512 KiB by default, 24,576 words on the ZCU104).
    gemm_words : int
        Buffer words per GEMM N-tile (1, 2 or 4): the PE array is ``pe_rows × gemm_cols``
        with ``gemm_cols = gemm_words · pe_cols`` output channels a pass over a weight tile,
        while the buffer, the vector units and the results stay ``pe_cols`` lanes a word
        (each result row leaves the array as ``gemm_words`` words). The ZCU104 array is
        32 × 64: 2,048 INT8 MACs a cycle on 1,024 DSPs (two products per DSP).
    """

    pe_rows: int = 32
    pe_cols: int = 32
    max_tokens: int = 1024
    max_dim: int = 384
    max_hidden: int = 1536
    max_heads: int = 12
    max_experts: int = 64
    max_top_k: int = 4
    axi_data_width: int = 128
    axi_addr_width: int = 40
    n_master_ports: int = 3
    max_burst_beats: int = 64
    max_outstanding: int = 8
    clock_mhz: float = 300.0
    act_buffer_words: int = 16384
    gemm_words: int = 1

    def __post_init__(self) -> None:
        for name in ("pe_rows", "pe_cols"):
            v = getattr(self, name)
            if not _pow2(v) or not 2 <= v <= 128:
                raise AccelConfigError(f"{name} must be a power of two in [2, 128], got {v!r}")
        for name in ("max_tokens", "max_dim", "max_hidden", "max_heads", "max_experts",
                     "max_top_k", "n_master_ports", "max_outstanding"):
            if getattr(self, name) < 1:
                raise AccelConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.gemm_words not in (1, 2, 4):
            raise AccelConfigError(f"gemm_words must be 1, 2 or 4, got {self.gemm_words!r}")
        if self.gemm_cols > 128:
            raise AccelConfigError(f"the PE array's N width gemm_words · pe_cols must be at "
                                   f"most 128, got {self.gemm_cols!r}")
        for name in ("max_dim", "max_hidden"):
            if getattr(self, name) % self.pe_rows or getattr(self, name) % self.gemm_cols:
                raise AccelConfigError(f"{name} must be a multiple of the PE array "
                                       f"({self.pe_rows}x{self.gemm_cols}), got "
                                       f"{getattr(self, name)!r}")
        if self.n_master_ports > 4:
            raise AccelConfigError(f"n_master_ports must be 1..4 (the PS has four HP ports), "
                                   f"got {self.n_master_ports!r}")
        if self.axi_data_width not in (32, 64, 128, 256, 512):
            raise AccelConfigError(f"axi_data_width must be 32..512 and a power of two, got "
                                   f"{self.axi_data_width!r}")
        if not 32 <= self.axi_addr_width <= 64:
            raise AccelConfigError(f"axi_addr_width must be in [32, 64], got "
                                   f"{self.axi_addr_width!r}")
        if not _pow2(self.max_burst_beats) or self.max_burst_beats > 256:
            raise AccelConfigError(f"max_burst_beats must be a power of two <= 256, got "
                                   f"{self.max_burst_beats!r}")
        if self.max_burst_beats * self.axi_data_width // 8 > 4096:
            raise AccelConfigError("a burst must not exceed 4 KiB (AXI4 boundary rule): lower "
                                   "max_burst_beats or axi_data_width")
        if self.max_top_k > self.max_experts:
            raise AccelConfigError(f"max_top_k must be <= max_experts={self.max_experts}, got "
                                   f"{self.max_top_k!r}")
        if self.act_buffer_words % 256 or not 256 <= self.act_buffer_words <= 65536:
            raise AccelConfigError(f"act_buffer_words must be a multiple of 256 in "
                                   f"[256, 65536], got {self.act_buffer_words!r}")
        if not 10 <= self.clock_mhz <= 800:
            raise AccelConfigError(f"clock_mhz must be in [10, 800], got {self.clock_mhz!r}")

    @property
    def gemm_cols(self) -> int:
        """Output channels of one GEMM N-tile: the PE array's N width (``gemm_words ·
        pe_cols``)."""
        return self.gemm_words * self.pe_cols

    @property
    def n_pe(self) -> int:
        """INT8 products of the PE array a cycle (``pe_rows · gemm_cols``)."""
        return self.pe_rows * self.gemm_cols

    @property
    def axi_bytes(self) -> int:
        """Bytes per AXI data beat."""
        return self.axi_data_width // 8

    @property
    def max_gemm_width(self) -> int:
        """Largest K (``k_slices · pe_rows``) or N (``n_tiles · gemm_cols``) of one GEMM pass.

        The widest the model needs: an MLP's or expert's hidden width, QKV's ``3 · max_dim``
        outputs, or attention over ``max_tokens`` keys rounded up to whole slices (P·V's K)
        or N-tiles (Q·Kᵀ's N). The instruction checks, the ISA model and the compiler all
        bound by it.
        """
        return max(self.max_hidden, 3 * self.max_dim, self.max_tokens + self.gemm_cols)

    @property
    def max_residual_words(self) -> int:
        """Most words one ``RESIDUAL`` adds: a whole ``max_tokens × max_dim`` activation.

        The residual unit's word counter is sized for it, so the instruction checks refuse
        more (``SHAPE_OVER_CAPACITY``) even where the buffer would hold them.
        """
        return self.max_tokens * self.max_dim // self.pe_cols

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    def config_hash(self) -> int:
        """32-bit identifier of this configuration (first 4 bytes of a SHA-256)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")

    def replace(self, **changes: Any) -> AccelConfig:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)


ZCU104 = AccelConfig(gemm_words=2, act_buffer_words=24576)
"""The ZCU104 build: a 32 × 64 array (2,048 INT8 MACs a cycle, two per DSP48E2) on 32-byte
buffer words, at 300 MHz with three 128-bit HP ports, and a 24,576-word (768 KiB) buffer:
three read copies of it are 72 of the XCZU7EV's 96 URAM288, and it holds a batch of four
``edge-moe`` images (16,384 words held three)."""

CI = AccelConfig(pe_rows=4, pe_cols=4, max_tokens=80, max_dim=64, max_hidden=256,
                 max_heads=2, max_experts=64, max_top_k=2, n_master_ports=1,
                 max_burst_beats=16, max_outstanding=4, act_buffer_words=16384,
                 gemm_words=2)
"""A small configuration that simulates quickly in CI and still runs the ``tiny`` preset
(a 4 × 8 array on 4-byte words, the ZCU104's shape in miniature)."""
