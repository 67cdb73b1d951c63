"""PE-array utilization of the GEMM engine, measured cycle-accurately (a benchmark, not CI).

``python -m m3vit.sw.bench.gemm_utilization`` builds the engine for the default 32 × 32 ZCU104
configuration (``--rows``/``--cols`` for another array), runs one INT8 pass per shape with
the weight stream fed at 16 bytes per cycle (one 128-bit AXI beat: a 32-wide INT8 row every
two cycles), activations and parameters always available and no output back-pressure, and
prints ``useful MACs / (cycles × PEs)`` per shape. Cycles count from reset release, when
every stream starts, to the last result: they include the first weight tile's load and
the pipeline's fill and drain. The results are checked against the golden model too. The
cocotb side is :mod:`m3vit.sw.bench.gemm_utilization_tb`.
"""

from __future__ import annotations

import argparse
import json
import sys

from m3vit.hw.config import ZCU104, AccelConfig
from m3vit.hw.flow.generate import to_verilog, write_if_changed
from m3vit.hw.gemm import GemmEngine
from m3vit.sim.cocotb_runner import DEFAULT_SEED, run_bench

from . import REPO_ROOT

TOP = "gemm_engine"
#: JSON request for the cocotb side: the shapes and the weight stream's bytes per cycle.
SHAPES_ENV = "M3VIT_GEMM_BENCH_SHAPES"
#: The JSON file the cocotb side writes its figures to.
OUT_ENV = "M3VIT_GEMM_BENCH_OUT"

#: (M, K, N): an edge-moe dense FC1 (129 tokens, 192 → 768), a 192 → 192 projection, and
#: the FC1 shape with the few tokens an expert gets (17) or one token.
DEFAULT_SHAPES = ((129, 192, 768), (129, 192, 192), (17, 192, 768), (1, 192, 768))


def bench_gemm_utilization(
    config: AccelConfig = ZCU104,
    shapes: tuple[tuple[int, int, int], ...] = DEFAULT_SHAPES,
    weight_bytes_per_cycle: float = 16.0,
    seed: int = DEFAULT_SEED,
) -> list[dict]:
    """Run each shape through the Verilated engine and return its figures.

    Parameters
    ----------
    config : AccelConfig
        The array to build (a separate Verilator build per ``pe_rows × gemm_cols`` and
        result word).
    shapes : tuple of (M, K, N)
        Pass geometries; K and N must be multiples of the array's rows and columns.
    weight_bytes_per_cycle : float
        Bandwidth of the weight stream.
    seed : int
        ``COCOTB_RANDOM_SEED`` for the operands.

    Returns
    -------
    list of dict
        Per shape: ``tokens``, ``k``, ``n``, ``cycles``, ``utilization`` (useful MACs over
        cycles × PEs), ``counters`` (the engine's performance counters), and the run's
        ``build_s`` / ``sim_s``.
    """
    for tokens, k, n in shapes:
        if k % config.pe_rows or n % config.gemm_cols or not 1 <= tokens <= config.max_tokens:
            raise ValueError(f"shape (M={tokens}, K={k}, N={n}) does not fit {config}")
    name = f"bench-{config.pe_rows}x{config.gemm_cols}" + (
        f"w{config.gemm_words}" if config.gemm_words > 1 else "")
    build_dir = REPO_ROOT / "build" / "sim" / "gemm" / name
    verilog = build_dir / f"{TOP}.v"
    write_if_changed(verilog, to_verilog(GemmEngine(config), TOP))
    out = build_dir / "utilization.json"
    out.unlink(missing_ok=True)
    request = {"shapes": [list(shape) for shape in shapes],
               "weight_bytes_per_cycle": weight_bytes_per_cycle}
    result = run_bench(
        top=TOP,
        verilog_sources=[verilog],
        test_module="m3vit.sw.bench.gemm_utilization_tb",
        build_dir=build_dir / "verilator",
        seed=seed,
        config=config,
        extra_env={SHAPES_ENV: json.dumps(request), OUT_ENV: str(out)},
    )
    figures = json.loads(out.read_text())
    for figure in figures:
        macs = figure["tokens"] * figure["k"] * figure["n"]
        figure["utilization"] = macs / (figure["cycles"] * config.n_pe)
        figure["build_s"], figure["sim_s"] = result.build_s, result.test_s
    return figures


def format_table(config: AccelConfig, figures: list[dict], weight_bytes_per_cycle: float) -> str:
    """A Markdown table of the figures."""
    lines = [
        f"{config.pe_rows}×{config.gemm_cols} array (results {config.gemm_words} word(s) of "
        f"{config.pe_cols} a row), weights at {weight_bytes_per_cycle:g} B/cycle, "
        "activations always available, no output back-pressure:",
        "",
        "| M | K | N | cycles | ideal | utilization | weight stall | output stall |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in figures:
        ideal = f["tokens"] * (f["k"] // config.pe_rows) * (f["n"] // config.gemm_cols)
        c = f["counters"]
        lines.append(f"| {f['tokens']} | {f['k']} | {f['n']} | {f['cycles']} | {ideal} | "
                     f"{100 * f['utilization']:.1f} % | {c['weight_stall_cycles']} | "
                     f"{c['output_stall_cycles']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ZCU104.pe_rows)
    parser.add_argument("--cols", type=int, default=ZCU104.gemm_cols,
                        help="the array's N width (gemm_cols)")
    parser.add_argument("--words", type=int, default=ZCU104.gemm_words,
                        help="result words a row (gemm_words)")
    parser.add_argument("--weight-bytes-per-cycle", type=float, default=64.0)
    args = parser.parse_args(argv)
    if args.cols % args.words:
        parser.error(f"--cols {args.cols} is not a multiple of --words {args.words}")
    config = ZCU104.replace(pe_rows=args.rows, pe_cols=args.cols // args.words,
                            gemm_words=args.words)
    figures = bench_gemm_utilization(config, weight_bytes_per_cycle=args.weight_bytes_per_cycle)
    print(format_table(config, figures, args.weight_bytes_per_cycle))
    print(f"\nVerilator build {figures[0]['build_s']:.0f} s, simulation "
          f"{figures[0]['sim_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
