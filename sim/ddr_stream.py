"""The DDR model alone under ideal masters: the bandwidth it gives each port.

:func:`stream` builds ``sim/soc/ddr_stream.cpp`` with the DDR model's header (no Verilated
design, a second's build, cached under ``build/ddr_stream/``) and keeps some of its ports
busy with back-to-back bursts. :func:`compare_with_measurements` puts what the ZCU104
defaults deliver beside the published measurements they come from
(:mod:`m3vit.hw.hp_ports`); ``python -m m3vit.sim.ddr_stream`` prints that table, and
``docs/simulation.md`` shows it.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from m3vit.hw.config import ZCU104, AccelConfig
from m3vit.hw.errors import M3VitError
from m3vit.hw.hp_ports import (
    MEASURED_CLOCK_MHZ,
    SHARED_PAIR_READ_GBPS,
    TOGETHER_READ_GBPS,
    hp_ports,
)

from .soc import DdrTiming
from .verilator import build_lock

__all__ = ["PortBandwidth", "compare_with_measurements", "format_comparison", "stream"]

_SOURCES = Path(__file__).resolve().parent / "soc"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_U64 = ctypes.c_uint64


@dataclass(frozen=True)
class PortBandwidth:
    """What one DDR port delivered, in bytes per cycle (0 for an idle port)."""

    read: float
    write: float


@functools.cache
def _library(build_root: Path) -> ctypes.CDLL:
    sources = [_SOURCES / "ddr_stream.cpp", _SOURCES / "ddr_model.h"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    folder = build_root / "ddr_stream" / digest
    library = folder / "libddr_stream.so"
    if not library.is_file():
        if shutil.which("c++") is None:
            raise M3VitError("the DDR stream probe needs `c++` on PATH (Debian/Ubuntu: "
                             "`apt-get install build-essential`)")
        with build_lock(folder / ".lock"):
            if not library.is_file():
                partial = folder / f"libddr_stream.{os.getpid()}.tmp"
                result = subprocess.run(
                    ["c++", "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{_SOURCES}",
                     str(sources[0]), "-o", str(partial)],
                    capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise M3VitError(f"building the DDR stream probe failed: "
                                     f"{result.stderr.strip().splitlines()[-1:]}")
                partial.replace(library)
    lib = ctypes.CDLL(str(library))
    lib.ddr_stream.argtypes = [
        ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_int, _U64, ctypes.POINTER(_U64), ctypes.POINTER(_U64)]
    lib.ddr_stream.restype = ctypes.c_int
    return lib


def stream(timing: DdrTiming, *, active: tuple[int, ...] | None = None, bus_bytes: int = 16,
           burst_beats: int = 16, write: bool = False, cycles: int = 200_000,
           build_root: Path | None = None) -> list[PortBandwidth]:
    """Stream reads (and with ``write`` writes) through some ports of the DDR model.

    Parameters
    ----------
    timing : DdrTiming
        The model; it has one port per entry of ``timing.hp_ports``.
    active : tuple of int, optional
        Indices of the ports that stream (default: all).
    bus_bytes : int
        Data width of the ports in bytes.
    burst_beats : int
        Beats per burst (every burst within 4 KiB).
    write : bool
        Also write, as fast as the model accepts.
    cycles : int
        Cycles to simulate.
    build_root : Path, optional
        Root of the build tree (default: the repository's ``build/``).

    Returns
    -------
    list of PortBandwidth
        One per port, in bytes per cycle over the ``cycles`` simulated.

    Raises
    ------
    M3VitError
        For a port index out of range or a bad width or burst, or a failed build.
    """
    n = len(timing.hp_ports)
    active = tuple(range(n)) if active is None else active
    if any(not 0 <= p < n for p in active):
        raise M3VitError(f"active ports must be in 0..{n - 1}, got {active!r}")
    if cycles < 1:
        raise M3VitError(f"cycles must be >= 1, got {cycles!r}")
    lib = _library(Path(build_root or _REPO_ROOT / "build"))
    reads, writes = (_U64 * n)(), (_U64 * n)()
    status = lib.ddr_stream(
        n, bus_bytes, timing.read_latency, timing.write_latency, timing.max_outstanding,
        float(timing.bytes_per_cycle), float(timing.aggregate_bytes_per_cycle or 0.0),
        float(timing.shared_pair_bytes_per_cycle or 0.0), timing.shared_pair_mask,
        sum(1 << p for p in active), burst_beats, int(write), cycles, reads, writes)
    if status != 0:
        raise M3VitError(f"bad stream: {bus_bytes}-byte bus, bursts of {burst_beats} beats "
                         "(a power-of-two bus up to 64 bytes, bursts within 4 KiB)")
    return [PortBandwidth(reads[p] / cycles, writes[p] / cycles) for p in range(n)]


def compare_with_measurements(config: AccelConfig = ZCU104, *,
                              cycles: int = 200_000) -> list[dict]:
    """Model against measurement, one row per HP-port set of :mod:`m3vit.hw.hp_ports`.

    Each row streams reads through the ports that the defaults give that many masters
    (and HP1 + HP2 alone), with :meth:`DdrTiming.zcu104`'s figures.

    Returns
    -------
    list of dict
        ``ports`` (the HP ports, e.g. "HP0+HP1+HP3"), ``measured_gbps`` (the publication's
        figure), ``model_gbps`` and ``model_bytes_per_cycle`` (all ports together).
    """
    rows = []
    sets = [hp_ports(n) for n in range(1, 5)] + [(1, 2)]
    for ports in sets:
        timing = DdrTiming.zcu104(config, n_masters=len(ports))
        if ports == (1, 2):
            timing = dataclasses.replace(timing, hp_ports=ports)
            measured = SHARED_PAIR_READ_GBPS
        else:
            measured = TOGETHER_READ_GBPS[len(ports)]
        delivered = sum(p.read for p in stream(timing, bus_bytes=min(config.axi_bytes, 16),
                                               cycles=cycles))
        rows.append({"ports": "+".join(f"HP{p}" for p in ports), "measured_gbps": measured,
                     "model_gbps": delivered * config.clock_mhz / 1e3,
                     "model_bytes_per_cycle": delivered})
    return rows


def format_comparison(rows: list[dict], config: AccelConfig = ZCU104) -> str:
    """:func:`compare_with_measurements` as a Markdown table."""
    lines = [f"| HP ports reading | measured GB/s ({MEASURED_CLOCK_MHZ:g} MHz) | model GB/s "
             f"({config.clock_mhz:g} MHz) | model B/cycle |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ports']} | {r['measured_gbps']:.2f} | {r['model_gbps']:.2f} | "
                     f"{r['model_bytes_per_cycle']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m m3vit.sim.ddr_stream``: the model's bandwidth beside the measurements."""
    parser = argparse.ArgumentParser(
        prog="python -m m3vit.sim.ddr_stream",
        description="Stream reads through the DDR model's ZCU104 defaults and print the "
                    "bandwidth it delivers beside the published measurements it models.")
    parser.add_argument("--cycles", type=int, default=200_000,
                        help="cycles to simulate per row (default 200000)")
    args = parser.parse_args(argv)
    try:
        print(format_comparison(compare_with_measurements(cycles=args.cycles)))
    except M3VitError as error:
        parser.exit(2, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
