"""Plumbing shared by the cocotb launchers in ``tests/sim/``: the seed, the quicker model
build and the one call that runs a bench and checks its exact pass count."""

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from m3vit.hw.config import AccelConfig
from m3vit.sim.cocotb_runner import DEFAULT_SEED, BenchResult, run_bench


@pytest.fixture(scope="session")
def cocotb_seed() -> int:
    """``COCOTB_RANDOM_SEED`` of every bench: fixed so that CI is reproducible, exported to
    explore others. It is in every failure message of :func:`run_bench` (and printed)."""
    return int(os.environ.get("COCOTB_RANDOM_SEED", DEFAULT_SEED))


@pytest.fixture
def quick_model_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile the Verilated model at -O1 instead of Verilator's -Os.

    Measured on the 2-core machine: the 4-lane vector top then builds in ~43 s instead of
    ~77 s (the 8-lane one in ~55 s instead of ~100 s), the register file in about half the
    time, and these benches simulate as fast. A make variable in MAKEFLAGS reaches
    Verilator's generated makefile; :func:`run_bench` keeps what is there and adds its own
    flag.
    """
    flags = os.environ.get("MAKEFLAGS", "")
    monkeypatch.setenv("MAKEFLAGS", f"{flags} OPT_FAST=-O1 OPT_GLOBAL=-O1".strip())


@pytest.fixture
def cocotb_bench(cocotb_seed: int) -> Callable[..., BenchResult]:
    """Run one cocotb module and assert how many of its tests passed.

    The fixture's value is a function; its keyword arguments are:

    ``module``, ``bench_dir``
        The cocotb module's name and its folder (``tests/sim/<block>/``).
    ``top``, ``verilog``, ``build_dir``
        The top-level module, its Verilog file and the Verilator build folder.
    ``passes``
        Exactly how many tests must pass: a bench that lost tests fails.
    ``config``
        The :class:`AccelConfig` the Verilog was generated from, if the bench reads one.
    ``skipped``
        Names (without the module) of the tests that must be reported skipped; none by
        default.

    It returns the :class:`~m3vit.sim.cocotb_runner.BenchResult`.
    """

    def run(*, module: str, bench_dir: Path, top: str, verilog: Path, build_dir: Path,
            passes: int, config: AccelConfig | None = None,
            skipped: Sequence[str] = ()) -> BenchResult:
        result = run_bench(top=top, verilog_sources=[verilog], test_module=module,
                           test_dir=bench_dir, build_dir=build_dir, seed=cocotb_seed,
                           config=config)
        print(f"{module} ({build_dir}): build {result.build_s:.1f} s, simulation "
              f"{result.test_s:.1f} s, seed {cocotb_seed}")
        assert len(result.passed) == passes, (f"seed {cocotb_seed}", result.passed)
        assert result.skipped == tuple(f"{module}.{name}" for name in skipped), result.skipped
        return result

    return run
