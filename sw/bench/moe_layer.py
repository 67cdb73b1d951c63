"""DDR traffic and cycles of one MoE layer, reordered versus token by token (a benchmark).

``python -m m3vit.sw.bench.moe_layer --preset edge-moe`` builds the engine for the ZCU104
configuration (32 × 64 array, 128-bit DDR ports), compiles the first MoE layer of a
randomly initialised, quantized model (router on chip from the task's router weights,
ROUTE, EXPERTS {FC1 + GELU, FC2}, COMBINE), and runs it twice on the same program:
``SCHEDULE.ORDER`` = expert by expert, then token by token. Both outputs are checked bit-
exactly against the golden model. The DMA engines are played in Python at the DDR model's
ZCU104 rates (the three ports' aggregate bytes a cycle, its first-beat latency, read ahead
of the engine as far as the top's read queues hold) and one read entry per cycle at most
(the engine's intake, 256 bytes on the ZCU104). Printed: cycles, DDR bytes, their ratios
(the paper's claim), and for the reordered run the expert phase (first to last expert-weight
beat): DDR read-bandwidth utilisation, and how much of the weight loading ran while the PE
array computed.
The cocotb side is :mod:`m3vit.sw.bench.moe_layer_tb`.
"""

from __future__ import annotations

import argparse
import sys

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.isa import intake_beats

from .block_latency import run_engine_harness

RESULT_ENV = "M3VIT_MOE_RESULT"
PRESET_ENV = "M3VIT_MOE_PRESET"
CONFIGS = {"zcu104": ZCU104, "ci": CI}


def bench_moe_layer(preset: str = "edge-moe", config_name: str = "zcu104") -> dict:
    """Build, run both schedules and return the figures (see ``moe_layer_tb.py``)."""
    config = CONFIGS[config_name]
    if preset == "edge-moe":
        config = config.replace(max_tokens=max(config.max_tokens, 129))
    # The same engine build as the dense-block benchmark (block_latency).
    result = run_engine_harness(config, config_name, "m3vit.sw.bench.moe_layer_tb",
                                f"moe_{preset}.json", (RESULT_ENV, PRESET_ENV), preset)
    result.update(preset=preset, config=config_name, clock_mhz=config.clock_mhz,
                  array=f"{config.pe_rows}x{config.gemm_cols}",
                  entry_bytes=intake_beats(config) * config.axi_bytes)
    return result


def markdown(r: dict) -> str:
    """The figures as Markdown tables."""
    ebe, tbt = r["EXPERT_BY_EXPERT"], r["TOKEN_BY_TOKEN"]
    mhz = r["clock_mhz"]
    lines = [
        "| schedule | cycles | µs at 300 MHz | DDR bytes read | expert weight bytes | "
        "expert fetches |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, e, fetches in (("expert by expert (reordered)", ebe, ebe["active_experts"]),
                             ("token by token (baseline)", tbt, tbt["entries"])):
        lines.append(f"| {name} | {e['cycles']:,} | {e['cycles'] / mhz:,.1f} | "
                     f"{e['ddr_read_bytes']:,} | {e['expert_read_bytes']:,} | {fetches} |")
    lines += [
        "",
        f"Token by token / reordered: **{tbt['cycles'] / ebe['cycles']:.1f}× the cycles, "
        f"{tbt['ddr_read_bytes'] / ebe['ddr_read_bytes']:.1f}× the DDR bytes** "
        f"({ebe['active_experts']} of {ebe['experts']} experts active, "
        f"{ebe['entries']} token choices).",
        "",
        "Expert phase of the reordered run (first to last expert-weight beat): "
        f"{ebe['expert_phase_cycles']:,} cycles, {ebe['weight_beats']:,} weight entries of "
        f"{r['entry_bytes']} bytes: **read utilisation "
        f"{ebe['ddr_utilization']:.1%}** of the DDR's {r['read_bytes_per_cycle']:.2f} bytes "
        "a cycle; the PE "
        f"array computed in {ebe['array_cycles']:,} of those cycles, "
        f"{ebe['overlap_cycles']:,} of them while a weight beat arrived: "
        f"{ebe['weight_load_hidden']:.1%} of the weight-load cycles overlap compute and "
        f"{ebe['compute_hidden']:.1%} of the compute cycles overlap a weight load.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="edge-moe", choices=["tiny", "edge-moe"])
    parser.add_argument("--config", default="zcu104", choices=sorted(CONFIGS))
    args = parser.parse_args(argv)
    print(markdown(bench_moe_layer(args.preset, args.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
