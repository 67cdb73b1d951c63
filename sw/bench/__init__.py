"""Benchmarks behind ``make bench`` (``python -m m3vit.sw.bench``) and their harnesses.

:mod:`~m3vit.sw.bench.suite` runs the benchmarks and writes their sections of
``docs/benchmarks.md``. The cycle-accurate ones run the Verilated design under cocotb:
:mod:`~m3vit.sw.bench.gemm_utilization` (the GEMM engine),
:mod:`~m3vit.sw.bench.block_latency` (a dense ViT block on the engine) and
:mod:`~m3vit.sw.bench.moe_layer` (one MoE layer under both schedules), each with its cocotb
module (``*_tb``). The benches in ``tests/sim/`` share two of their helpers:
:mod:`~m3vit.sw.bench.programs` (programs and DDR images with the expected result) and
:mod:`~m3vit.sw.bench.gemm_tb` (the GEMM engine's stimulus, golden results and driver).
"""

from pathlib import Path

#: The checkout this package is installed from (``make install`` installs it editable):
#: the benchmarks build under ``REPO_ROOT / "build"``.
REPO_ROOT = Path(__file__).resolve().parents[2]
