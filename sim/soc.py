"""The Verilated SoC model: the accelerator top, a DDR model and an AXI4-Lite host, in C++.

Whole programs (and whole images) run at Verilator speed: the clock loop, the DDR (an AXI4
slave with latency, outstanding bursts and bandwidth, ``sim/soc/ddr_model.h``) and the
register host (``sim/soc/soc.cpp``) are C++, compiled with the Verilated top into one shared
library and driven through ctypes. Python is entered once per register access, DDR backdoor
copy or :meth:`SocModel.run`, never once per clock cycle.

The library is built once per configuration, trace kind and set of sources, and cached under
``build/soc/<config hash>-<digest>/``; see ``docs/simulation.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from m3vit.hw.axi import AxiResp
from m3vit.hw.config import AccelConfig
from m3vit.hw.errors import M3VitError
from m3vit.hw.hp_ports import (
    PORT_READ_GBPS,
    SHARED_PAIR,
    SHARED_PAIR_READ_GBPS,
    TOGETHER_READ_GBPS,
    bytes_per_cycle,
    hp_ports,
)
from m3vit.hw.registers import AXIL_ADDR_WIDTH

from .verilator import VERILATOR_ARGS, build_lock, verilator_env

__all__ = ["DdrFaults", "DdrTiming", "SocModel", "build_soc"]

_TOP = "m3vit_accel"
_LIBRARY = "libm3vit_soc.so"
_SOURCES = Path(__file__).resolve().parent / "soc"
_CPP_SOURCES = ("soc.cpp", "ddr_model.h")
_HW_PACKAGE = Path(__file__).resolve().parent.parent / "hw"
_REPO_ROOT = Path(__file__).resolve().parent.parent
#: -O2 for the model and the loop. Measured on the CI top (2-core machine), see
#: docs/simulation.md: -O2 builds in about the same time as -O1 here, and simulates faster.
_OPT = ("OPT_FAST=-O2", "OPT_GLOBAL=-O2", "OPT_SLOW=-O1")
_TRACE_KINDS = {None: (), "vcd": ("--trace-vcd",), "fst": ("--trace-fst",)}
#: Cycles an AXI4-Lite access may wait for its response before the host gives up.
_REGISTER_TIMEOUT = 10_000
_FST_HINT = ("FST traces need the lz4 headers (Debian/Ubuntu: `apt-get install liblz4-dev`); "
             "or ask for a .vcd trace")


@dataclass(frozen=True)
class DdrTiming:
    """Timing of the DDR model behind the accelerator's AXI4 master ports.

    Every port has the latency, outstanding bursts and per-direction bandwidth below; the
    ports share the DDR's aggregate bandwidth and, for the HP1/HP2 pair, one controller
    port's. :meth:`zcu104` gives the defaults every published figure runs under, from the
    measurements in :mod:`m3vit.hw.hp_ports`. All figures are in cycles of the accelerator
    clock.

    Attributes
    ----------
    read_latency : int
        Cycles from an AR handshake to the burst's first R beat (40 ≈ 133 ns at 300 MHz,
        the order of a PL read through the HP port, the FPD interconnect and the DDR
        controller; no public measurement pins it closer). At least 1. Bursts accepted back
        to back overlap their latencies.
    write_latency : int
        Cycles from a burst's last W beat to its B response. At least 1.
    max_outstanding : int
        Bursts accepted in flight per direction and port; AR (AW) ready drops while this
        many reads (writes) are open.
    bytes_per_cycle : float
        Sustained bandwidth of each direction of one port (R and W are independent AXI
        channels, each with its own token bucket). Fractional values are allowed.
    aggregate_bytes_per_cycle : float or None
        The DDR's bandwidth shared by every port, reads and writes together (the PS DDR4 is
        one bus); ``None``: no cap.
    shared_pair_bytes_per_cycle : float or None
        Bandwidth that HP1 and HP2 share (one DDR-controller port); ``None``: no cap.
    hp_ports : tuple of int
        The HP port (0…3) of each DDR port, master 0 first: one entry per AXI4 master of
        the top. Which ports pay :attr:`shared_pair_bytes_per_cycle` follows from it.
    """

    read_latency: int = 40
    write_latency: int = 24
    max_outstanding: int = 8
    bytes_per_cycle: float = 16.0
    aggregate_bytes_per_cycle: float | None = None
    shared_pair_bytes_per_cycle: float | None = None
    hp_ports: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for name in ("read_latency", "write_latency", "max_outstanding"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value < 1 << 31:
                raise M3VitError(f"DdrTiming.{name} must be a positive integer, got {value!r}")
        for name in ("bytes_per_cycle", "aggregate_bytes_per_cycle",
                     "shared_pair_bytes_per_cycle"):
            value = getattr(self, name)
            if value is None and name != "bytes_per_cycle":
                continue
            if not isinstance(value, int | float) or not 0 < value < 1 << 20:
                raise M3VitError(f"DdrTiming.{name} must be a positive number of bytes per "
                                 f"cycle, got {value!r}")
        ports = self.hp_ports
        if (not isinstance(ports, tuple) or not 1 <= len(ports) <= 4
                or len(set(ports)) != len(ports) or not all(p in (0, 1, 2, 3) for p in ports)):
            raise M3VitError(f"DdrTiming.hp_ports must be 1 to 4 distinct HP ports 0..3, one "
                             f"per AXI master, got {ports!r}")

    @property
    def shared_pair_mask(self) -> int:
        """Bit ``p`` set: DDR port ``p`` is on HP1 or HP2 and pays the shared pair's cap."""
        return sum(1 << i for i, hp in enumerate(self.hp_ports) if hp in SHARED_PAIR)

    @classmethod
    def zcu104(cls, config: AccelConfig, n_masters: int | None = None) -> DdrTiming:
        """The ZCU104 default for ``config``: measured HP-port and DDR bandwidths.

        Each master gets an HP port from :func:`~m3vit.hw.hp_ports.hp_ports`; a port moves
        at most one beat of ``min(axi_bytes, 16)`` bytes per cycle (an HP port is 128 bits
        wide) and at most its measured 4.75 GB/s; all ports together at most the measured
        figure for that many ports, HP1 and HP2 together at most theirs
        (:mod:`m3vit.hw.hp_ports`). At 300 MHz: 15.8 bytes per cycle and port, 31.5 for
        two ports, 47.2 for three.

        Parameters
        ----------
        config : AccelConfig
            The accelerator configuration (``axi_data_width``, ``clock_mhz``).
        n_masters : int, optional
            AXI4 master ports of the top; default ``config.n_master_ports`` (as many as
            :class:`~m3vit.hw.top.AcceleratorTop` has).

        Returns
        -------
        DdrTiming
            Latencies and outstanding bursts as the class defaults.
        """
        if n_masters is None:
            n_masters = config.n_master_ports
        ports = hp_ports(n_masters)
        clock = config.clock_mhz
        per_port = min(float(min(config.axi_bytes, 16)), bytes_per_cycle(PORT_READ_GBPS, clock))
        together = bytes_per_cycle(TOGETHER_READ_GBPS[len(ports)], clock)
        pair = bytes_per_cycle(SHARED_PAIR_READ_GBPS, clock)
        return cls(bytes_per_cycle=per_port, aggregate_bytes_per_cycle=together,
                   shared_pair_bytes_per_cycle=pair, hp_ports=ports)


_PROBABILITIES = ("ar_stall", "aw_stall", "w_stall", "r_gap", "b_gap")
_INDICES = ("read_error_beat", "write_error_response", "hang_read_burst")


@dataclass(frozen=True)
class DdrFaults:
    """Faults the DDR model injects on the accelerator's AXI4 master ports, from a seed.

    The default injects nothing, and a model without faults runs exactly as one built before
    faults existed (every published figure). With the same faults set before the same run,
    the run is the same to the cycle. Set on a live model with :attr:`SocModel.faults`.

    Attributes
    ----------
    seed : int
        Seeds the generator behind every random choice below (one stream per DDR port),
        restarted each time the faults are set. In ``[0, 2**64)``.
    read_jitter, write_jitter : int
        Extra latency, uniform in ``0 … read_jitter`` cycles for each read burst (AR → first
        R beat) and ``0 … write_jitter`` for each write response (last W → B).
    ar_stall, aw_stall, w_stall : float
        Probability that ARREADY, AWREADY or WREADY is held low in a cycle where the model
        would have raised it: back-pressure on the channels the master drives. In ``[0, 1)``.
    r_gap, b_gap : float
        Probability that an R beat or a B response that is ready waits one more cycle: idle
        cycles on the channels the model drives (a beat once valid is held, as AXI asks).
    read_error_beat : int or None
        The read beat, counted over all ports from when the faults are set (0 = the next),
        answered with :attr:`error_resp` (its data zeros); ``None``: none.
    write_error_response : int or None
        The write response (B), counted likewise, answered with :attr:`error_resp`; the
        burst's data are written all the same. ``None``: none.
    error_resp : AxiResp
        ``AxiResp.SLVERR`` or ``AxiResp.DECERR`` (2 or 3 are accepted too).
    hang_read_burst : int or None
        The read burst (AR), counted likewise, that is never answered: R beats come back in
        order, so every read behind it waits too, until :meth:`SocModel.reset`. ``None``: none.

    Each indexed fault fires once. The model's AXI IDs are not reordered: the accelerator
    issues every transaction with ID 0 (``m3vit.hw.axi``), and AXI keeps one ID's responses
    in order.
    """

    seed: int = 0
    read_jitter: int = 0
    write_jitter: int = 0
    ar_stall: float = 0.0
    aw_stall: float = 0.0
    w_stall: float = 0.0
    r_gap: float = 0.0
    b_gap: float = 0.0
    read_error_beat: int | None = None
    write_error_response: int | None = None
    error_resp: AxiResp = AxiResp.SLVERR
    hang_read_burst: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 64:
            raise M3VitError(f"DdrFaults.seed must be an integer in [0, 2**64), got "
                             f"{self.seed!r}")
        for name in ("read_jitter", "write_jitter"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 1 << 31:
                raise M3VitError(f"DdrFaults.{name} must be a whole number of cycles >= 0, "
                                 f"got {value!r}")
        for name in _PROBABILITIES:
            value = getattr(self, name)
            # 1 would hold a channel for ever: that is what hang_read_burst is for.
            if not isinstance(value, int | float) or not 0 <= value < 1:
                raise M3VitError(f"DdrFaults.{name} must be a probability in [0, 1), got "
                                 f"{value!r}")
        for name in _INDICES:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value < 1 << 62):
                raise M3VitError(f"DdrFaults.{name} must be None or an index >= 0, got "
                                 f"{value!r}")
        try:
            resp = AxiResp(self.error_resp)
        except ValueError:
            resp = None
        if resp not in (AxiResp.SLVERR, AxiResp.DECERR):
            raise M3VitError(f"DdrFaults.error_resp must be SLVERR or DECERR, got "
                             f"{self.error_resp!r}")
        object.__setattr__(self, "error_resp", resp)

    @classmethod
    def jitter(cls, seed: int, *, latency: int = 64, stall: float = 0.25) -> DdrFaults:
        """Random latency and back-pressure on every channel, no errors.

        Parameters
        ----------
        seed : int
            The generator's seed.
        latency : int, optional
            Extra read and write latency, up to this many cycles a burst.
        stall : float, optional
            Probability of a withheld ready (AR, AW, W) or an idle cycle (R, B) in a cycle.

        Returns
        -------
        DdrFaults
        """
        return cls(seed=seed, read_jitter=latency, write_jitter=latency, ar_stall=stall,
                   aw_stall=stall, w_stall=stall, r_gap=stall, b_gap=stall)

    @property
    def active(self) -> bool:
        """Whether anything is injected (anything but the seed differs from the default)."""
        return any(getattr(self, name) != getattr(DdrFaults, name)
                   for name in self.__dataclass_fields__ if name not in ("seed", "error_resp"))


# --------------------------------------------------------------------------------------------
# Build and cache


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _hw_fingerprint(config: AccelConfig) -> str | None:
    """What determines the Verilog: the ``hw`` sources, Amaranth's version and the config.

    Elaborating the top takes ~10 s for CI (much longer for ZCU104), so a second process
    finds its build through this fingerprint without elaborating. ``None`` when a source
    changed after this process imported the gateware: the files then need not be the
    modules it elaborates, and a build filed under their fingerprint could be another
    version's (so the caller neither looks one up nor files one).
    """
    from m3vit.hw import IMPORTED_AT

    parts = [repr(sorted(config.to_dict().items())).encode(),
             importlib.metadata.version("amaranth").encode()]
    # Every module under hw/, sub-packages included (the engine lives in hw/engine/).
    for path in sorted(_HW_PACKAGE.rglob("*.py")):
        if path.stat().st_mtime > IMPORTED_AT:
            return None
        parts += [path.relative_to(_HW_PACKAGE).as_posix().encode(), path.read_bytes()]
    return _digest(*parts)[:24]


@functools.cache
def _verilog(config: AccelConfig) -> str:
    from m3vit.hw.flow.generate import to_verilog
    from m3vit.hw.top import AcceleratorTop

    return to_verilog(AcceleratorTop(config), _TOP)


def _build_flags(config: AccelConfig, trace: str | None, coverage: bool = False) -> list[str]:
    defines = [f"-DSOC_BUS_BYTES={config.axi_bytes}",
               f"-DSOC_N_PORTS={config.n_master_ports}", "-fPIC"]
    if trace:
        defines.append(f"-DSOC_TRACE_{trace.upper()}")
    if coverage:
        defines.append("-DSOC_COVERAGE")
    return [
        "--cc", "--exe", "--build", "--top-module", _TOP, *VERILATOR_ARGS,
        *_TRACE_KINDS[trace],
        *(("--coverage-line", "--coverage-toggle") if coverage else ()),
        "-CFLAGS", " ".join(defines),
        # -Bsymbolic: two configurations' libraries in one process each keep their own
        # Verilator runtime rather than binding to whichever was loaded first.
        "-LDFLAGS", "-shared -Wl,-Bsymbolic",
        "-o", _LIBRARY,
    ]


def _check_tools(trace: str | None, env: dict[str, str]) -> None:
    for tool in ("c++", "make"):
        if shutil.which(tool, path=env.get("PATH")) is None:
            raise M3VitError(f"building the SoC model needs `{tool}` on PATH (Debian/Ubuntu: "
                             "`apt-get install build-essential`)")
    if trace == "fst":
        probe = subprocess.run(["c++", "-E", "-x", "c++", "-"], input="#include <lz4.h>\n",
                               capture_output=True, text=True, env=env, check=False)
        if probe.returncode != 0:
            raise M3VitError(_FST_HINT)


def build_soc(config: AccelConfig, *, trace: str | None = None, build_root: Path | None = None,
              progress: Callable[[str], None] | None = None, coverage: bool = False) -> Path:
    """Build (or reuse) the SoC model's shared library for ``config``.

    The library is cached under ``<build_root>/soc/<config hash>-<digest>/`` where the
    digest covers the Verilog, the C++ sources, the build flags and Verilator's version, so
    a change to any of them builds a new one. A second index, keyed by the ``hw`` sources,
    Amaranth's version and the configuration, lets a new process skip elaborating the top
    when nothing changed. Concurrent callers (pytest-xdist workers) building the same
    library are serialised by a file lock; the later ones reuse the first one's result.

    Parameters
    ----------
    config : AccelConfig
        The accelerator configuration to build.
    trace : {None, "vcd", "fst"}, optional
        Build with waveform tracing of this kind (a separate cached build). ``"fst"`` needs
        the lz4 headers.
    build_root : Path, optional
        Root of the build tree; defaults to the repository's ``build/``.
    progress : callable, optional
        Called with a short message before each long step (elaborating, Verilating and
        compiling); not called when the library is reused.
    coverage : bool, optional
        Build with Verilator line and toggle coverage (a separate cached build, slower to
        run): :meth:`SocModel.write_coverage` writes the counts.

    Returns
    -------
    Path
        The shared library.

    Raises
    ------
    M3VitError
        If Verilator, a C++ compiler or make is missing, if FST is asked for without the lz4
        headers, or if the build fails (the message names the build log).
    """
    if trace not in _TRACE_KINDS:
        raise M3VitError(f"trace must be None, 'vcd' or 'fst', got {trace!r}")
    root = Path(build_root if build_root is not None else _REPO_ROOT / "build") / "soc"
    say = progress or (lambda message: None)
    env = verilator_env()
    env["MAKEFLAGS"] = " ".join([env.get("MAKEFLAGS", ""), *_OPT]).strip()
    flags = _build_flags(config, trace, coverage)
    sources = [(_SOURCES / name).read_bytes() for name in _CPP_SOURCES]
    tool_id = [importlib.metadata.version("verilator"), *_OPT, *flags]

    tools_digest = _digest(*sources, *map(str.encode, tool_id))
    fingerprint = _hw_fingerprint(config)
    index = root / "index" / f"{fingerprint}-{tools_digest[:12]}" if fingerprint else None
    if index is not None and index.is_file():
        folder = root / index.read_text().strip()
        if (folder / _LIBRARY).is_file():
            return folder / _LIBRARY

    _check_tools(trace, env)
    say(f"elaborating the accelerator top ({config.pe_rows}×{config.gemm_cols} array)")
    verilog = _verilog(config).encode()
    key = f"{config.config_hash():08x}-{_digest(verilog, *sources, *map(str.encode, tool_id))[:16]}"
    folder = root / key
    library = folder / _LIBRARY
    with build_lock(folder / ".lock"):
        if not library.is_file():
            _build(folder, verilog, flags, env, say)
    if index is not None:
        index.parent.mkdir(parents=True, exist_ok=True)
        partial = index.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(key + "\n")
        partial.replace(index)
    return library


def _build(folder: Path, verilog: bytes, flags: list[str], env: dict[str, str],
           say: Callable[[str], None]) -> None:
    obj = folder / "obj"
    shutil.rmtree(obj, ignore_errors=True)
    obj.mkdir(parents=True)
    (folder / f"{_TOP}.v").write_bytes(verilog)
    # The build folder holds its own copy of the C++ so it can be rebuilt by hand.
    for name in _CPP_SOURCES:
        shutil.copyfile(_SOURCES / name, folder / name)
    log_path = folder / "build.log"
    jobs = str(max(1, os.cpu_count() or 1))
    command = ["verilator", *flags, "-j", jobs, "--Mdir", str(obj), f"{_TOP}.v", "soc.cpp"]
    say(f"Verilating and compiling the SoC model (several minutes; log {log_path})")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n" + f"MAKEFLAGS={env['MAKEFLAGS']}\n")
        log.flush()
        result = subprocess.run(command, cwd=folder, env=env, stdout=log,
                                stderr=subprocess.STDOUT, check=False)
        log.write(f"\nbuild time {time.perf_counter() - started:.1f} s\n")
    if result.returncode != 0 or not (obj / _LIBRARY).is_file():
        raise M3VitError(f"the SoC model build failed (exit status {result.returncode}); "
                         f"see {log_path}")
    # Published by rename, so a reader never sees a half-written library.
    (obj / _LIBRARY).replace(folder / _LIBRARY)
    say(f"built the SoC model in {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------------------------
# The binding

_u64, _u32, _vp = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p


@functools.cache
def _load(library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library))
    signatures = {
        "soc_bus_bytes": ([], ctypes.c_int),
        "soc_trace_kind": ([], ctypes.c_int),
        "soc_stat_names": ([], ctypes.c_char_p),
        "soc_n_stats": ([], ctypes.c_int),
        "soc_n_ports": ([], ctypes.c_int),
        "soc_new": ([_u64, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_double,
                     ctypes.c_double, ctypes.c_double, ctypes.c_uint, ctypes.c_char_p], _vp),
        "soc_free": ([_vp], None),
        "soc_reset": ([_vp, ctypes.c_uint], None),
        "soc_reg_write": ([_vp, _u32, _u32, ctypes.c_uint], ctypes.c_int),
        "soc_reg_read": ([_vp, _u32, ctypes.POINTER(_u32), ctypes.c_uint], ctypes.c_int),
        "soc_ddr_write": ([_vp, _u64, ctypes.c_char_p, _u64], ctypes.c_int),
        "soc_ddr_read": ([_vp, _u64, ctypes.c_void_p, _u64], ctypes.c_int),
        "soc_run": ([_vp, _u64], _u64),
        "soc_irq": ([_vp], ctypes.c_int),
        "soc_set_trace_window": ([_vp, _u64, _u64], None),
        "soc_cycle": ([_vp], _u64),
        "soc_set_hang_reads": ([_vp, ctypes.c_int], None),
        "soc_hang_reads": ([_vp], ctypes.c_int),
        "soc_set_faults": ([_vp, _u64, ctypes.c_uint, ctypes.c_uint, *[ctypes.c_double] * 5,
                            ctypes.c_int64, ctypes.c_int64, ctypes.c_uint, ctypes.c_int64],
                           None),
        "soc_fault_cycles": ([_vp, ctypes.POINTER(_u64)], None),
        "soc_stats": ([_vp, ctypes.c_uint, ctypes.POINTER(_u64)], ctypes.c_int),
        "soc_coverage": ([], ctypes.c_int),
        "soc_write_coverage": ([_vp, ctypes.c_char_p], None),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
    return lib


class SocModel:
    """The accelerator, its DDR and a register host, simulated in C++.

    Construction builds (or reuses) the library for ``config`` (:func:`build_soc`), loads
    it and resets the accelerator. Everything the host does goes through the real AXI4-Lite
    slave (:meth:`read_register`, :meth:`write_register`) and takes simulated cycles; the DDR
    can also be read and written directly (:meth:`write_ddr`, :meth:`read_ddr`), in no
    simulated time, as the host's CPU writes its buffers.

    Parameters
    ----------
    config : AccelConfig
        The accelerator configuration.
    ddr_bytes : int, optional
        Size of the DDR at address 0 (default 64 MiB). A burst that touches a byte beyond it
        is answered SLVERR.
    timing : DdrTiming, optional
        The DDR's timing; defaults to :meth:`DdrTiming.zcu104` for ``config``.
    trace_path : str or Path, optional
        Write a waveform here: ``.vcd`` or ``.fst`` (the latter needs the lz4 headers).
        Uses a separate, slower tracing build.
    trace_window : (int, int or None), optional
        Dump only cycles ``start <= cycle < stop`` of the model (:attr:`cycle`; ``None``
        stop = to the end). Default: every cycle. A VCD takes ~11 kB per cycle of the CI
        top, so a whole ``tiny`` image (~1 M cycles) would be ~11 GB.
    build_root : Path, optional
        Root of the build tree (default: the repository's ``build/``).
    progress : callable, optional
        Receives build progress messages (see :func:`build_soc`).
    coverage : bool, optional
        Use the coverage build (:func:`build_soc`); :meth:`write_coverage` writes it.

    Attributes
    ----------
    config : AccelConfig
    ddr_bytes : int
    timing : DdrTiming
    library : Path
        The shared library in use.

    Raises
    ------
    M3VitError
        If the build fails or a tool is missing, or for a bad ``ddr_bytes`` or trace path.

    Examples
    --------
    >>> with SocModel(CI) as soc:                                       # doctest: +SKIP
    ...     soc.read_register(REGISTER_MAP["ID"].offset) == ID_MAGIC
    True
    """

    def __init__(self, config: AccelConfig, *, ddr_bytes: int = 64 << 20,
                 timing: DdrTiming | None = None, trace_path: str | Path | None = None,
                 trace_window: tuple[int, int | None] | None = None,
                 build_root: Path | None = None,
                 progress: Callable[[str], None] | None = None,
                 coverage: bool = False) -> None:
        self._handle = None
        if not isinstance(ddr_bytes, int) or not 0 < ddr_bytes <= 1 << 40:
            raise M3VitError(f"ddr_bytes must be a positive size up to 1 TiB, got {ddr_bytes!r}")
        trace = None
        if trace_path is not None:
            trace_path = Path(trace_path)
            trace = {".vcd": "vcd", ".fst": "fst"}.get(trace_path.suffix.lower())
            if trace is None:
                raise M3VitError(f"a trace file must end in .vcd or .fst, got {trace_path}")
            # Checked here so a bad path is one clear line, not a failure inside the C++ writer.
            try:
                trace_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise M3VitError(f"cannot write the trace {trace_path}: {error}") from error
            if not os.access(trace_path.parent, os.W_OK):
                raise M3VitError(f"cannot write the trace {trace_path}: folder not writable")
        if trace_window is not None:
            start, stop = trace_window
            if trace_path is None:
                raise M3VitError("a trace window needs a trace path (.vcd or .fst)")
            if start < 0 or (stop is not None and stop <= start):
                raise M3VitError(f"trace window must be START:STOP with 0 <= START < STOP, got "
                                 f"{start}:{'' if stop is None else stop}")
        self.config = config
        self.ddr_bytes = ddr_bytes
        self.timing = timing if timing is not None else DdrTiming.zcu104(config)
        self._faults = DdrFaults()
        self.library = build_soc(config, trace=trace, build_root=build_root, progress=progress,
                                 coverage=coverage)
        self._lib = _load(self.library)
        if self._lib.soc_bus_bytes() != config.axi_bytes:
            raise M3VitError(f"{self.library} was built for a {self._lib.soc_bus_bytes()}-byte "
                             f"bus, not {config.axi_bytes}; delete it to rebuild")
        self.n_ports = self._lib.soc_n_ports()
        if len(self.timing.hp_ports) != self.n_ports:
            raise M3VitError(f"the DDR timing names {len(self.timing.hp_ports)} HP port(s) "
                             f"(hp_ports={self.timing.hp_ports}) but the top has "
                             f"{self.n_ports} AXI master port(s): give one HP port per master")
        self._stat_names = self._lib.soc_stat_names().decode().split(",")
        t = self.timing
        self._handle = self._lib.soc_new(ddr_bytes, t.read_latency, t.write_latency,
                                         t.max_outstanding, float(t.bytes_per_cycle),
                                         float(t.aggregate_bytes_per_cycle or 0.0),
                                         float(t.shared_pair_bytes_per_cycle or 0.0),
                                         t.shared_pair_mask,
                                         str(trace_path).encode() if trace_path else None)
        if not self._handle:
            raise M3VitError(f"could not allocate the SoC model ({ddr_bytes} bytes of DDR)")
        if trace_window is not None:
            start, stop = trace_window
            self._lib.soc_set_trace_window(self._handle, start,
                                           (1 << 64) - 1 if stop is None else stop)
        self.reset()

    # -- lifecycle -----------------------------------------------------------------------

    def _live(self) -> int:
        if not self._handle:
            raise M3VitError("the SoC model is closed")
        return self._handle

    def write_coverage(self, path: str | Path) -> Path:
        """Write the line and toggle coverage counted since the model was made (Verilator's
        ``coverage.dat`` format; :mod:`m3vit.sim.coverage` reads it).

        Raises
        ------
        M3VitError
            The model was not built with ``coverage=True``.
        """
        if not self._lib.soc_coverage():
            raise M3VitError("this SoC model was built without coverage: "
                             "SocModel(..., coverage=True)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lib.soc_write_coverage(self._live(), str(path).encode())
        return path

    def close(self) -> None:
        """Flush and close the trace and free the model. Idempotent."""
        handle, self._handle = self._handle, None
        if handle:
            self._lib.soc_free(handle)

    def __enter__(self) -> SocModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A half-constructed model has no handle; at interpreter exit _lib may be gone.
        with contextlib.suppress(Exception):
            self.close()

    def reset(self, cycles: int = 8) -> None:
        """Hold the accelerator in reset for ``cycles`` cycles.

        DDR transactions in flight are dropped; DDR contents are kept.

        Parameters
        ----------
        cycles : int, optional
            Cycles with ``rst`` high (at least 1).
        """
        if not isinstance(cycles, int) or cycles < 1:
            raise M3VitError(f"reset cycles must be a positive integer, got {cycles!r}")
        self._lib.soc_reset(self._live(), cycles)

    # -- registers -------------------------------------------------------------------------

    @staticmethod
    def _check_offset(offset: int) -> None:
        if not isinstance(offset, int) or not 0 <= offset < 1 << AXIL_ADDR_WIDTH:
            raise M3VitError(f"register offset must be in [0, {1 << AXIL_ADDR_WIDTH:#x}), "
                             f"got {offset!r}")

    def read_register(self, offset: int) -> int:
        """Read the 32-bit register at byte ``offset`` through the AXI4-Lite slave.

        Parameters
        ----------
        offset : int
            Byte offset, from ``REGISTER_MAP[name].offset``.

        Returns
        -------
        int
            The register's value.
        """
        self._check_offset(offset)
        value = _u32()
        resp = self._lib.soc_reg_read(self._live(), offset, ctypes.byref(value),
                                      _REGISTER_TIMEOUT)
        if resp != 0:
            raise M3VitError(self._response_message("read of", offset, resp))
        return value.value

    def write_register(self, offset: int, value: int) -> None:
        """Write the 32-bit register at byte ``offset`` through the AXI4-Lite slave.

        Parameters
        ----------
        offset : int
            Byte offset, from ``REGISTER_MAP[name].offset``.
        value : int
            Value in ``[0, 2**32)``; all four byte strobes are set.
        """
        self._check_offset(offset)
        if not isinstance(value, int) or not 0 <= value < 1 << 32:
            raise M3VitError(f"register value must fit in 32 bits, got {value!r}")
        resp = self._lib.soc_reg_write(self._live(), offset, value, _REGISTER_TIMEOUT)
        if resp != 0:
            raise M3VitError(self._response_message("write to", offset, resp))

    @staticmethod
    def _response_message(what: str, offset: int, resp: int) -> str:
        if resp < 0:
            return (f"AXI4-Lite {what} {offset:#05x} got no response within "
                    f"{_REGISTER_TIMEOUT} cycles")
        return f"AXI4-Lite {what} {offset:#05x} answered RESP={resp}"

    # -- DDR backdoor ----------------------------------------------------------------------

    def _check_range(self, address: int, size: int) -> None:
        if not isinstance(address, int) or not isinstance(size, int) or address < 0 \
                or size < 0 or address + size > self.ddr_bytes:
            raise M3VitError(f"DDR range [{address:#x}, +{size:#x}) is outside the model's "
                             f"{self.ddr_bytes:#x} bytes")

    def write_ddr(self, address: int, data: bytes) -> None:
        """Copy ``data`` into DDR at ``address``, in no simulated time.

        Parameters
        ----------
        address : int
            Byte address.
        data : bytes-like
            The bytes to write.
        """
        data = bytes(data)
        self._check_range(address, len(data))
        self._lib.soc_ddr_write(self._live(), address, data, len(data))

    def read_ddr(self, address: int, size: int) -> bytes:
        """Copy ``size`` bytes of DDR from ``address``, in no simulated time.

        Parameters
        ----------
        address : int
            Byte address.
        size : int
            Number of bytes.

        Returns
        -------
        bytes
        """
        self._check_range(address, size)
        buffer = ctypes.create_string_buffer(size)
        self._lib.soc_ddr_read(self._live(), address, buffer, size)
        return buffer.raw

    # -- running ---------------------------------------------------------------------------

    def run(self, max_cycles: int) -> int:
        """Clock until ``irq`` is high or ``max_cycles`` cycles have passed.

        Parameters
        ----------
        max_cycles : int
            The most cycles to step.

        Returns
        -------
        int
            Cycles stepped: 0 if ``irq`` was already high, ``max_cycles`` if it never rose.
        """
        if not isinstance(max_cycles, int) or max_cycles < 0:
            raise M3VitError(f"max_cycles must be a non-negative integer, got {max_cycles!r}")
        return self._lib.soc_run(self._live(), max_cycles)

    @property
    def irq(self) -> bool:
        """The accelerator's interrupt line (high while ``STATUS.DONE`` or ``ERROR``)."""
        return bool(self._lib.soc_irq(self._live()))

    @property
    def cycle(self) -> int:
        """Clock cycles simulated since construction, reset and register accesses included."""
        return self._lib.soc_cycle(self._live())

    @property
    def stats(self) -> dict[str, int]:
        """The DDR model's counters since construction (reset cycles excluded), all ports.

        ``cycles``; ``ddr_read_bytes`` (bytes of R beats accepted), ``ddr_write_bytes``
        (bytes written, by strobe); ``read_bursts``, ``write_bursts``; ``r_beat_cycles``,
        ``w_beat_cycles`` (data handshakes); ``ar_stall_cycles``, ``aw_stall_cycles``
        (address valid, not ready: the slave is full); ``r_backpressure_cycles`` (R valid,
        not ready); ``read_busy_cycles``, ``write_busy_cycles`` (a burst in flight);
        ``max_reads_in_flight``, ``max_writes_in_flight``; ``read_errors`` (R beats answered
        SLVERR or DECERR: out of range or injected), ``write_errors`` (B likewise);
        ``protocol_errors`` (4 KiB crossings, beats wider than the bus, bad WRAP lengths,
        WLAST in the wrong place). What :attr:`faults` injected: ``fault_read_errors``,
        ``fault_write_errors`` (error responses), ``fault_hung_reads`` (bursts never
        answered), ``fault_delay_cycles`` (extra latency drawn, all bursts together),
        ``fault_ar_stalls``, ``fault_aw_stalls``, ``fault_w_stalls`` (cycles a valid
        address or W beat waited on a withheld ready), ``fault_r_gaps``, ``fault_b_gaps``
        (cycles a ready R beat or B was held back). With several ports
        every counter is the sum over ports, but ``cycles`` and the ``max_*`` counters,
        which are the largest of any port (:meth:`port_stats` has them per port).
        """
        per_port = self.port_stats()
        total = {}
        for name in self._stat_names:
            values = [port[name] for port in per_port]
            total[name] = max(values) if name == "cycles" or name.startswith("max_") \
                else sum(values)
        return total

    def port_stats(self) -> list[dict[str, int]]:
        """:attr:`stats` of each DDR port, master 0 first (``timing.hp_ports`` names them)."""
        result = []
        for port in range(self.n_ports):
            values = (_u64 * len(self._stat_names))()
            if self._lib.soc_stats(self._live(), port, values) != 0:
                raise M3VitError(f"the SoC model has no DDR port {port}")
            result.append(dict(zip(self._stat_names, values, strict=True)))
        return result

    @property
    def hang_reads(self) -> bool:
        """Fault injection: accept read addresses but never return data (a hung interconnect)."""
        return bool(self._lib.soc_hang_reads(self._live()))

    @hang_reads.setter
    def hang_reads(self, hang: bool) -> None:
        self._lib.soc_set_hang_reads(self._live(), int(bool(hang)))

    @property
    def faults(self) -> DdrFaults:
        """The faults the DDR injects (:class:`DdrFaults`; none by default).

        Setting them restarts the seeded generator and the count of beats, responses and
        bursts that ``read_error_beat``, ``write_error_response`` and ``hang_read_burst``
        refer to, so the same faults set before the same run give the same run. They stay
        set across :meth:`reset`; set ``DdrFaults()`` to stop injecting. What was injected
        is counted in :attr:`stats` (``fault_*``).
        """
        return self._faults

    @faults.setter
    def faults(self, faults: DdrFaults) -> None:
        if not isinstance(faults, DdrFaults):
            raise M3VitError(f"faults must be a DdrFaults, got {type(faults).__name__}")

        def index(value: int | None) -> int:
            return -1 if value is None else value

        f = faults
        self._lib.soc_set_faults(self._live(), f.seed, f.read_jitter, f.write_jitter,
                                 float(f.ar_stall), float(f.aw_stall), float(f.w_stall),
                                 float(f.r_gap), float(f.b_gap), index(f.read_error_beat),
                                 index(f.write_error_response), f.error_resp.value,
                                 index(f.hang_read_burst))
        self._faults = faults

    @property
    def fault_cycles(self) -> dict[str, int | None]:
        """When the once-only faults reached the master, in model cycles (:attr:`cycle`).

        ``read_error`` (the error beat first presented), ``write_error`` (the error response
        first presented), ``hung_read`` (the never-answered AR accepted); ``None`` for one
        that has not fired since :attr:`faults` were set.
        """
        values = (_u64 * 3)()
        self._lib.soc_fault_cycles(self._live(), values)
        return {name: None if value == (1 << 64) - 1 else value
                for name, value in zip(("read_error", "write_error", "hung_read"), values,
                                       strict=True)}

    def __repr__(self) -> str:
        state = f"cycle {self.cycle}" if self._handle else "closed"
        return (f"SocModel({self.config.pe_rows}×{self.config.gemm_cols}, "
                f"{self.ddr_bytes:#x} bytes of DDR, {state})")

