"""Cycles of a whole dense ViT block on the generated engine (a benchmark, not CI).

``python -m m3vit.sw.bench.block_latency --preset edge-moe`` builds the engine for the
ZCU104 configuration (32 × 64 array; ``--config ci`` for the 4 × 8 one), runs dense block
0 of a randomly initialised, quantized model on it with the DMA engines played in Python
(no stalls: one read entry per cycle, the engine's intake), checks the output bit-exactly
against the golden model, and prints the cycles next to the MAC-bound ideal
(Σ over the block's GEMMs of tokens · K-slices · N-tiles). The cocotb side is
:mod:`m3vit.sw.bench.block_latency_tb`.
"""

from __future__ import annotations

import argparse
import json
import sys

from m3vit.hw.config import CI, ZCU104, AccelConfig
from m3vit.hw.engine import Engine
from m3vit.hw.flow.generate import to_verilog, write_if_changed
from m3vit.sim.cocotb_runner import DEFAULT_SEED, run_bench

from . import REPO_ROOT

RESULT_ENV = "M3VIT_BLOCK_RESULT"
PRESET_ENV = "M3VIT_BLOCK_PRESET"
CONFIGS = {"zcu104": ZCU104, "ci": CI}


def ideal_cycles(preset: str, config: AccelConfig) -> int:
    """MAC-bound cycles of a dense block: one token per cycle per (K-slice, N-tile)."""
    from ..model.config import get_preset

    m = get_preset(preset)
    n, d, h, dh = m.n_tokens, m.embed_dim, m.mlp_hidden, m.head_dim
    # N-tiles are gemm_cols wide; P·V's K-slices are pe_rows deep.
    R, G = config.pe_rows, config.gemm_cols

    def gemm(k: int, out: int) -> int:
        return n * -(-k // R) * -(-out // G)

    # Q·Kᵀ: K = dh, N = n keys; P·V: K = n keys, N = dh.
    attention = m.num_heads * (gemm(dh, n) + gemm(n, dh))
    return gemm(d, 3 * d) + attention + gemm(d, d) + gemm(d, h) + gemm(h, d)


def run_engine_harness(config: AccelConfig, config_name: str, test_module: str,
                       result_name: str, env: tuple[str, str], preset: str) -> dict:
    """Build the Verilated engine for ``config`` (one build per configuration, shared by
    the engine harnesses) and run the cocotb harness ``test_module`` on it.

    Parameters
    ----------
    config, config_name : AccelConfig, str
        The configuration and the name its build folder carries.
    test_module : str
        The harness (a module of this package) that writes its result as JSON.
    result_name : str
        File name of that JSON in the build folder.
    env : (str, str)
        The harness's environment variables for the result file and the preset.
    preset : str
        The model preset it runs.

    Returns
    -------
    dict
        The harness's result.
    """
    build = REPO_ROOT / "build" / "bench" / f"block_{config_name}"
    verilog = build / "engine.v"
    write_if_changed(verilog, to_verilog(Engine(config), "engine"))
    result_file = build / result_name
    result_file.unlink(missing_ok=True)
    result_env, preset_env = env
    run_bench(top="engine", verilog_sources=[verilog], test_module=test_module,
              build_dir=build / "verilator", seed=DEFAULT_SEED, config=config,
              extra_env={result_env: str(result_file), preset_env: preset})
    return json.loads(result_file.read_text())


def bench_block_latency(preset: str = "edge-moe", config_name: str = "zcu104") -> dict:
    """Build, run and return {preset, config, cycles, ideal, us_at_clock}."""
    config = CONFIGS[config_name]
    cycles = run_engine_harness(config, config_name, "m3vit.sw.bench.block_latency_tb",
                                f"result_{preset}.json", (RESULT_ENV, PRESET_ENV),
                                preset)["cycles"]
    ideal = ideal_cycles(preset, config)
    return {"preset": preset, "config": config_name, "array": f"{config.pe_rows}x"
            f"{config.gemm_cols}", "cycles": cycles, "ideal": ideal,
            "us": cycles / config.clock_mhz}


def main(argv: list[str] | None = None) -> int:
    """Command line: print the figures as a Markdown table row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="edge-moe", choices=["tiny", "edge-moe"])
    parser.add_argument("--config", default="zcu104", choices=sorted(CONFIGS))
    args = parser.parse_args(argv)
    r = bench_block_latency(args.preset, args.config)
    print("| preset | array | cycles | MAC-bound ideal | ideal / cycles | µs at 300 MHz |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| {r['preset']} | {r['array']} | {r['cycles']:,} | {r['ideal']:,} | "
          f"{r['ideal'] / r['cycles']:.1%} | {r['us']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
