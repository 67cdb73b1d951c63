"""PE-array utilization of the GEMM engine, measured cycle-accurately (a benchmark, not CI).

``python -m m3vit.sw.bench.gemm_utilization`` builds the engine of the ZCU104 configuration
(32 × 64, results two 32-lane words a row; ``--rows``/``--cols``/``--words`` for another
array) with the top's intake (:func:`m3vit.hw.engine.router.intake_shape`: on the ZCU104 a
256-byte read entry a cycle, i.e. a ``weights`` beat of four 64-byte rows, 32 parameter
records a ``params`` beat, 16 table entries a ``table`` beat), runs one INT8 pass per shape
with the weight stream fed at most one such beat a cycle (one entry's bytes a cycle, as the
read router hands entries over), activations and parameters always available and no output
back-pressure, and prints ``useful MACs / (cycles × PEs)`` per shape. Cycles count from
reset release, when every stream starts, to the last result: they include the first weight
tile's load and the pipeline's fill and drain. The results are checked against the golden
model too. The cocotb side is :mod:`m3vit.sw.bench.gemm_utilization_tb`.
"""

from __future__ import annotations

import argparse
import json
import sys

from m3vit.hw.config import ZCU104, AccelConfig
from m3vit.hw.engine.router import intake_shape
from m3vit.hw.flow.generate import get_design, to_verilog, write_if_changed
from m3vit.hw.gemm import GemmEngine
from m3vit.sim.cocotb_runner import DEFAULT_SEED, run_bench

from . import REPO_ROOT

TOP = "gemm_engine"
#: JSON request for the cocotb side: the shapes, the weight stream's bytes per cycle and the
#: engine's intake (rows and records a beat, checked there against the DUT's ports).
SHAPES_ENV = "M3VIT_GEMM_BENCH_SHAPES"
#: The JSON file the cocotb side writes its figures to.
OUT_ENV = "M3VIT_GEMM_BENCH_OUT"

#: (M, K, N): an edge-moe dense FC1 (129 tokens, 192 → 768), a 192 → 192 projection, and
#: the FC1 shape with the few tokens an expert gets (17) or one token.
DEFAULT_SHAPES = ((129, 192, 768), (129, 192, 192), (17, 192, 768), (1, 192, 768))


def engine_as_in_top(config: AccelConfig) -> GemmEngine:
    """The GEMM engine with the top's intake (:func:`~m3vit.hw.engine.router.intake_shape`),
    as :class:`~m3vit.hw.engine.Engine` builds it: the weight rows, parameter records and
    table entries of one read entry a beat (four 64-byte rows, 32 records and 16 entries on
    the ZCU104). It is the registered ``gemm`` design (``m3vit generate --design gemm``), so
    the bench measures what the resource estimate counts; the default engine (one row a
    beat) would describe an intake the top no longer has."""
    engine = get_design("gemm").elaborate(config)
    assert isinstance(engine, GemmEngine)
    return engine


def bench_gemm_utilization(
    config: AccelConfig = ZCU104,
    shapes: tuple[tuple[int, int, int], ...] = DEFAULT_SHAPES,
    weight_bytes_per_cycle: float | None = None,
    seed: int = DEFAULT_SEED,
) -> list[dict]:
    """Run each shape through the Verilated engine (the top's, :func:`engine_as_in_top`) and
    return its figures.

    Parameters
    ----------
    config : AccelConfig
        The array to build (a separate Verilator build per ``pe_rows × gemm_cols``, result
        word and intake).
    shapes : tuple of (M, K, N)
        Pass geometries; K and N must be multiples of the array's rows and columns.
    weight_bytes_per_cycle : float, optional
        Bandwidth of the weight stream; at most one ``weights`` beat (``rows_per_beat``
        rows) goes in a cycle whatever it is. By default one read entry a cycle (the
        top's intake: 256 bytes, four rows, on the ZCU104).
    seed : int
        ``COCOTB_RANDOM_SEED`` for the operands.

    Returns
    -------
    list of dict
        Per shape: ``tokens``, ``k``, ``n``, ``cycles``, ``utilization`` (useful MACs over
        cycles × PEs), ``counters`` (the engine's performance counters), the engine's
        ``rows_per_beat`` and ``params_per_beat``, and the run's ``build_s`` / ``sim_s``.
    """
    for tokens, k, n in shapes:
        if k % config.pe_rows or n % config.gemm_cols or not 1 <= tokens <= config.max_tokens:
            raise ValueError(f"shape (M={tokens}, K={k}, N={n}) does not fit {config}")
    intake = intake_shape(config)
    if weight_bytes_per_cycle is None:
        weight_bytes_per_cycle = float(intake.entry_bytes)
    # The intake is part of the name: engines fed differently are separate builds.
    name = (f"bench-{config.pe_rows}x{config.gemm_cols}"
            + (f"w{config.gemm_words}" if config.gemm_words > 1 else "")
            + f"-r{intake.rows_per_beat}p{intake.params_per_beat}t{intake.gemm_table_entries}")
    build_dir = REPO_ROOT / "build" / "sim" / "gemm" / name
    verilog = build_dir / f"{TOP}.v"
    write_if_changed(verilog, to_verilog(engine_as_in_top(config), TOP))
    out = build_dir / "utilization.json"
    out.unlink(missing_ok=True)
    request = {"shapes": [list(shape) for shape in shapes],
               "weight_bytes_per_cycle": weight_bytes_per_cycle,
               "rows_per_beat": intake.rows_per_beat,
               "params_per_beat": intake.params_per_beat}
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
    rows_per_beat = figures[0]["rows_per_beat"]
    lines = [
        f"{config.pe_rows}×{config.gemm_cols} array (results {config.gemm_words} word(s) of "
        f"{config.pe_cols} a row), weights at {weight_bytes_per_cycle:g} B/cycle "
        f"({rows_per_beat} row(s) of {config.gemm_cols} B a beat, at most a beat a cycle: "
        f"a tile loads in {config.pe_rows // rows_per_beat} cycles), "
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
    parser.add_argument("--weight-bytes-per-cycle", type=float, default=None,
                        help="the weight stream's bandwidth (default: one read entry a "
                        "cycle, the top's intake)")
    args = parser.parse_args(argv)
    if args.cols % args.words:
        parser.error(f"--cols {args.cols} is not a multiple of --words {args.words}")
    config = ZCU104.replace(pe_rows=args.rows, pe_cols=args.cols // args.words,
                            gemm_words=args.words)
    weight_bytes_per_cycle = args.weight_bytes_per_cycle
    if weight_bytes_per_cycle is None:
        weight_bytes_per_cycle = float(intake_shape(config).entry_bytes)
    figures = bench_gemm_utilization(config, weight_bytes_per_cycle=weight_bytes_per_cycle)
    print(format_table(config, figures, weight_bytes_per_cycle))
    print(f"\nVerilator build {figures[0]['build_s']:.0f} s, simulation "
          f"{figures[0]['sim_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
