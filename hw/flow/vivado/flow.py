"""The flow itself: write the Vivado project, run Vivado if it is here, collect the result.

:func:`write_project` elaborates the accelerator and writes everything Vivado needs to
``build/vivado/<config>/``; :func:`run_flow` is what ``m3vit bitstream`` (``make bitstream``)
does with it: stop after the scripts (with the commands to run elsewhere) when Vivado is not
on ``PATH``, else check its version, run the build with a progress line per step and
:func:`~m3vit.hw.flow.vivado.collect.collect` the bitstream.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from amaranth.lib import wiring

from ...config import AccelConfig
from ...errors import M3VitError
from ...target import SYNTHESIS
from ..generate import get_config, to_verilog, write_if_changed
from .board import (
    ACCEL_CELL,
    ACCEL_MODULE,
    BOARD,
    CONTROL_BASE,
    PART,
    PYNQ_IMAGE,
    VIVADO_VERSION,
    WRAPPER_MODULE,
    base_name,
    master_hp_port,
    register_window_bytes,
)
from .collect import MANIFEST_NAME, check_replaceable, collect
from .reports import parse_vivado_version
from .tcl import OUT_SUBDIR, PROGRESS_MARK, block_design_tcl, build_tcl, format_mhz, run_sh
from .wrapper import bus_interfaces, wrapper_verilog

__all__ = ["FlowFiles", "default_build_dir", "run_flow", "write_project"]


@dataclass(frozen=True)
class FlowFiles:
    """The generated Vivado project folder.

    Attributes
    ----------
    build_dir : Path
        The folder.
    files : dict of str to Path
        ``accelerator``, ``wrapper``, ``block_design``, ``build``, ``run``, ``flow``.
    flow : dict
        Content of ``flow.json``: what the folder was generated from.
    """

    build_dir: Path
    files: dict[str, Path]
    flow: dict


def _accelerator(config: AccelConfig) -> wiring.Component:
    from ...top import AcceleratorTop  # slow to import only once a flow is written

    return AcceleratorTop(config)


def write_project(
    config_name: str,
    build_dir: Path,
    *,
    config: AccelConfig | None = None,
    jobs: int = 4,
    vivado_version: str = VIVADO_VERSION,
    accelerator_verilog: Callable[[wiring.Component], str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> FlowFiles:
    """Elaborate the accelerator and write the Vivado project scripts to ``build_dir``.

    Files whose content is unchanged are left alone (see
    :func:`m3vit.hw.flow.generate.write_if_changed`); nothing in them depends on where the
    folder is, so it can be copied to a machine with Vivado.

    Parameters
    ----------
    config_name : str
        A key of :data:`m3vit.hw.flow.generate.CONFIGS` (``zcu104``, ``ci``).
    build_dir : Path
        Destination folder (created).
    config : AccelConfig, optional
        Use this configuration under ``config_name`` instead of the named one.
    jobs : int
        Default parallel jobs written into ``build.tcl`` and ``run.sh``.
    vivado_version : str
        The Vivado version the build insists on.
    accelerator_verilog : callable, optional
        ``f(component) -> str``; by default :func:`m3vit.hw.flow.generate.to_verilog` with module
        name :data:`ACCEL_MODULE` for :data:`m3vit.hw.target.SYNTHESIS` (DSP48E2 instances
        in the packed array; about a minute for the ZCU104 configuration).
    progress : callable, optional
        Called with a line before the elaboration.

    Returns
    -------
    FlowFiles

    Raises
    ------
    M3VitError
        Unknown configuration, or an accelerator whose ports the wrapper cannot map.
    """
    if jobs < 1:
        raise M3VitError(f"--jobs must be >= 1, got {jobs!r}")
    config = config if config is not None else get_config(config_name)
    build_dir = Path(build_dir)
    component = _accelerator(config)
    buses, interrupts = bus_interfaces(component)
    masters = [b for b in buses if b.mode == "master"]
    if progress is not None:
        progress(f"elaborating the accelerator for {config_name} (the ZCU104 configuration "
                 "takes about a minute)")
    # The synthesis form (m3vit.hw.target): the packed array's chains as DSP48E2 instances.
    convert = accelerator_verilog or (lambda c: to_verilog(c, ACCEL_MODULE, SYNTHESIS))
    accel_text = convert(component)
    texts = {
        "accelerator": (f"{ACCEL_MODULE}.v", accel_text),
        "wrapper": (f"{WRAPPER_MODULE}.v", wrapper_verilog(component, config, config_name)),
        "block_design": ("block_design.tcl",
                         block_design_tcl(buses, interrupts, config, config_name)),
        "build": ("build.tcl", build_tcl(config, config_name, jobs, vivado_version)),
        "run": ("run.sh", run_sh(jobs, vivado_version)),
    }
    flow = {
        "config_name": config_name,
        "config": config.to_dict(),
        "config_hash": f"0x{config.config_hash():08x}",
        "clock_mhz": config.clock_mhz,
        "base_name": base_name(config_name),
        "part": PART,
        "board": BOARD,
        "pynq_image": PYNQ_IMAGE,
        "vivado_version": vivado_version,
        "accelerator_sha256": hashlib.sha256(accel_text.encode()).hexdigest(),
        "address_map": {
            "cell": ACCEL_CELL,
            "control_offset": f"0x{CONTROL_BASE:08x}",
            "control_range": register_window_bytes(),
            "masters": {b.name: master_hp_port(i, len(masters))[0]
                        for i, b in enumerate(masters)},
        },
    }
    texts["flow"] = ("flow.json", json.dumps(flow, indent=2) + "\n")
    files = {}
    for key, (name, text) in texts.items():
        path = build_dir / name
        write_if_changed(path, text)
        files[key] = path
    files["run"].chmod(0o755)
    return FlowFiles(build_dir=build_dir, files=files, flow=flow)


def default_build_dir(config_name: str) -> Path:
    """Where the Vivado project of ``config_name`` is written: ``build/vivado/<config>``."""
    return Path("build") / "vivado" / config_name


def run_flow(
    config_name: str,
    out_dir: Path,
    *,
    build_dir: Path | None = None,
    jobs: int = 4,
    force: bool = False,
    scripts_only: bool = False,
    collect_only: bool = False,
    collect_command: str,
    say: Callable[[str], None],
) -> dict | None:
    """Write the project, then build and collect the bitstream if Vivado is on ``PATH``.

    The steps of ``m3vit bitstream``: a bitstream already in ``out_dir`` for another
    configuration hash stops the flow before the (minute-long) elaboration unless ``force``;
    :func:`write_project` writes the scripts; without Vivado the commands to run on a machine
    that has it are said and the flow fails; with Vivado its version must be
    :data:`~m3vit.hw.flow.vivado.board.VIVADO_VERSION`, the build runs with a line per step,
    and the result is collected into ``out_dir``.

    Parameters
    ----------
    config_name : str
        A key of :data:`m3vit.hw.flow.generate.CONFIGS` (``zcu104``, ``ci``).
    out_dir : Path
        Where the ``.bit``, ``.hwh``, reports and ``manifest.json`` go (``bitstreams``).
    build_dir : Path, optional
        The Vivado project folder (default :func:`default_build_dir`).
    jobs : int
        Parallel Vivado jobs.
    force : bool
        Replace a bitstream of the same base name built for another configuration.
    scripts_only : bool
        Write the project and stop (after saying what to run), even with Vivado on ``PATH``.
    collect_only : bool
        Only collect a build finished in ``build_dir`` (for example run on another machine).
    collect_command : str
        The command that runs the collect step here (``m3vit bitstream ... --collect``), said
        with the instructions for running Vivado elsewhere.
    say : callable
        Called with each progress line.

    Returns
    -------
    dict or None
        The manifest entry of the bitstream collected; ``None`` with ``scripts_only``.

    Raises
    ------
    M3VitError
        Vivado not on ``PATH`` (after the scripts are written) or of another version, a failed
        build, timing not met, a bitstream of another configuration in the way, bad input.
    """
    if scripts_only and collect_only:
        raise M3VitError("--scripts-only and --collect exclude each other")
    config = get_config(config_name)
    build_dir = Path(build_dir) if build_dir is not None else default_build_dir(config_name)
    out_dir = Path(out_dir)
    config_hash = f"0x{config.config_hash():08x}"
    if collect_only:
        entry = collect(build_dir, out_dir, force=force)
        say(f"{_relative(out_dir / entry['bit'])} and {entry['hwh']} collected "
            f"(WNS {entry['timing']['wns_ns']} ns); manifest {_relative(out_dir)}/"
            f"{MANIFEST_NAME}")
        return entry
    # Before a minute of elaboration and hours of Vivado: will the result be allowed in?
    check_replaceable(out_dir, base_name(config_name), config_hash, force)
    project = write_project(config_name, build_dir, config=config, jobs=jobs, progress=say)
    where = _relative(build_dir)
    say(f"Vivado project for {config_name} (config hash {config_hash}, pl_clk0 "
        f"{format_mhz(config.clock_mhz)} MHz) written to {where}/: "
        f"{', '.join(p.name for p in project.files.values())}")
    elsewhere = (f"on a machine with Vivado {VIVADO_VERSION} (PYNQ {PYNQ_IMAGE} images):\n"
                 f"    cd {where} && vivado -mode batch -source build.tcl\n"
                 f"  then copy {where}/{OUT_SUBDIR}/ back here and run:\n"
                 f"    {collect_command}")
    if scripts_only:
        say(elsewhere)
        return None
    vivado = shutil.which("vivado")
    if vivado is None:
        say(elsewhere)
        raise M3VitError(f"Vivado not found on PATH: the project scripts are in {where}/; run "
                         f"them where Vivado {VIVADO_VERSION} is installed (commands above)")
    found = _vivado_version(vivado)
    if found != VIVADO_VERSION:
        raise M3VitError(f"{vivado} is Vivado {found}, but PYNQ {PYNQ_IMAGE} images need "
                         f"Vivado {VIVADO_VERSION} (their pynq reads the .hwh): put Vivado "
                         f"{VIVADO_VERSION} first on PATH")
    say(f"running Vivado {found} in {where} ({jobs} jobs; full log "
        f"{where}/vivado.log; this takes hours for the ZCU104 configuration)")
    _run_vivado(vivado, build_dir, jobs, say)
    entry = collect(build_dir, out_dir, force=force, vivado_version=found)
    say(f"{_relative(out_dir / entry['bit'])} and {entry['hwh']} built: WNS "
        f"{entry['timing']['wns_ns']} ns at {format_mhz(entry['clock_mhz'])} MHz; manifest "
        f"{_relative(out_dir)}/{MANIFEST_NAME}")
    return entry


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _vivado_version(vivado: str) -> str:
    try:
        result = subprocess.run([vivado, "-version"], capture_output=True, text=True,
                                timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise M3VitError(f"cannot run {vivado} -version ({e})") from None
    version = parse_vivado_version(result.stdout + result.stderr)
    if version is None:
        first = (result.stdout + result.stderr).strip().splitlines()[:1]
        raise M3VitError(f"{vivado} -version names no Vivado version "
                         f"(it printed {first[0]!r})" if first else
                         f"{vivado} -version printed nothing")
    return version


def _run_vivado(vivado: str, build_dir: Path, jobs: int,
                say: Callable[[str], None]) -> None:
    """Run ``build.tcl`` in ``build_dir``, echoing its step markers with the elapsed time."""
    shutil.rmtree(build_dir / OUT_SUBDIR, ignore_errors=True)  # never collect a stale result
    command = [vivado, "-mode", "batch", "-notrace", "-source", "build.tcl",
               "-log", "vivado.log", "-journal", "vivado.jou", "-tclargs", str(jobs)]
    start = time.monotonic()
    first_error = None
    with subprocess.Popen(command, cwd=build_dir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line.startswith(PROGRESS_MARK):
                elapsed = int(time.monotonic() - start)
                say(f"vivado [{elapsed // 3600:d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}] "
                    f"{line[len(PROGRESS_MARK):].strip()}")
            elif first_error is None and line.startswith("ERROR:"):
                first_error = line
        code = process.wait()
    if code != 0:
        raise M3VitError(f"Vivado failed (exit status {code}): "
                         f"{first_error or 'no ERROR line'}; see {build_dir / 'vivado.log'}")

