"""The ZCU104 behind the runtime's :class:`~m3vit.sw.runtime.board.Board`: ``pynq.Overlay`` + MMIO.

:class:`PynqBoard` drives the accelerator through PYNQ's own classes: ``pynq.MMIO`` for the
AXI4-Lite registers, ``pynq.allocate`` for physically contiguous DDR buffers
(``PynqBuffer``, whose ``flush()`` / ``invalidate()`` keep the CPU's caches and the
accelerator's non-coherent HP ports in agreement).

On the board, ``PynqBoard(bitfile)`` loads the bitstream with ``pynq.Overlay`` and finds the
accelerator's register window in the overlay's ``ip_dict``. Off the board,
:meth:`PynqBoard.from_device` runs the *same* MMIO and buffer code against any
``pynq.Device``; :meth:`SimBoard.pynq_device <m3vit.sw.runtime.board.SimBoard.pynq_device>`
is such a device: the simulated board the runtime also drives directly, so CI exercises
``pynq.MMIO``, ``pynq.allocate`` and ``PynqBuffer.flush()`` / ``invalidate()`` against the
simulator.

What only the board runs (CI runs everything else, through ``SimBoard.pynq_device()``):

* ``_load_overlay`` past its "no device" check: ``pynq.Overlay(bitfile)``; and
  :class:`PynqBoard`'s ``__init__``, which hands the overlay's ``ip_dict`` to
  ``_find_accelerator`` (itself tested in CI on a made-up ``ip_dict``);
* :meth:`PynqBoard.reset` with an overlay: ``overlay.download()``;
* the ``except`` branches that turn a ``/dev/mem`` permission error (``pynq.MMIO``) and an
  exhausted CMA pool (``pynq.allocate``) into one-line errors.

:meth:`PynqBoard.wait_for_interrupt`'s wall-clock poll of ``STATUS`` is the board's path too;
CI runs it against a device that has registers but no ``wait_for_interrupt``.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3vit.hw.registers import AXIL_ADDR_WIDTH, ID_MAGIC, REGISTER_MAP

from ..errors import M3VitError
from .board import Board, Buffer

# pynq's dependencies import the deprecated ``pkg_resources`` and, off an ARM board, warn that
# the CPU is unsupported; neither is news to a user of this module, and both would be
# errors wherever warnings are.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", ResourceWarning)
    import pynq
    from pynq.buffer import PynqBuffer
    from pynq.pl_server.device import Device

__all__ = ["ACCEL_IP_PREFIX", "PynqBoard", "SimBoardDevice"]

#: Block-design name prefix of the accelerator's IP (``m3vit_accel_0`` in the ZCU104 design).
ACCEL_IP_PREFIX = "m3vit_accel"

#: Size of the accelerator's AXI4-Lite register window.
REGISTER_WINDOW_BYTES = 1 << AXIL_ADDR_WIDTH

#: Sleep between two ``STATUS`` reads while waiting on the board. A run of the model takes
#: milliseconds at least; 100 µs adds little latency and keeps one core from spinning on
#: uncached MMIO reads.
POLL_INTERVAL_S = 100e-6

_NOT_ON_A_BOARD_HINT = "not on a ZCU104 with PYNQ? off the board use `--backend sim`"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _load_overlay(bitfile: Path) -> Any:
    """``pynq.Overlay(bitfile)``, with every failure as one :class:`M3VitError` line.

    Runs only on the board: CI reaches it only through its failures (no device here).
    """
    # pynq probes for devices on first use; off the board it finds none and warns before
    # raising "No Devices Found". Asking first lets the message say what to do instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        devices = pynq.Device.devices
    if not devices:
        raise M3VitError(f"cannot load {bitfile}: pynq finds no FPGA device on this machine "
                         "(on the board: run as root with the XRT environment sourced); "
                         f"{_NOT_ON_A_BOARD_HINT}")
    if not bitfile.is_file():
        raise M3VitError(f"bitstream {bitfile} not found")
    try:
        return pynq.Overlay(str(bitfile))
    except Exception as error:
        # pynq reports a bad .bit, a missing .hwh or an unloadable design with RuntimeError,
        # OSError, ValueError or KeyError depending on the layer that noticed; all of them
        # mean "this file cannot be loaded here".
        raise M3VitError(f"pynq could not load {bitfile} ({_one_line(error)}); is its .hwh "
                         f"beside it? {_NOT_ON_A_BOARD_HINT}") from error


def _find_accelerator(ip_dict: dict, ip_name: str | None) -> tuple[str, dict]:
    """The accelerator's ``ip_dict`` entry: ``ip_name``, or the first ``m3vit_accel*`` IP.

    IP inside a hierarchy is named by its full path (``accel/m3vit_accel_0``); the prefix is
    matched against the last component.
    """
    if ip_name is not None:
        if ip_name in ip_dict:
            return ip_name, ip_dict[ip_name]
    else:
        for name, description in ip_dict.items():
            if name.rpartition("/")[2].startswith(ACCEL_IP_PREFIX):
                return name, description
    wanted = repr(ip_name) if ip_name is not None else f"named {ACCEL_IP_PREFIX}*"
    raise M3VitError(f"the overlay has no IP {wanted}; its IPs: "
                     f"{', '.join(sorted(ip_dict)) or '(none)'}")


class _PynqBoardBuffer(Buffer):
    """A :class:`~m3vit.sw.runtime.board.Buffer` over one ``PynqBuffer`` of bytes.

    Parameters
    ----------
    array : pynq.buffer.PynqBuffer
        A 1-D ``uint8`` buffer from ``pynq.allocate``.
    """

    def __init__(self, array: PynqBuffer):
        self._array: PynqBuffer | None = array

    def _live(self) -> PynqBuffer:
        if self._array is None:
            # On the board a freed PynqBuffer views unmapped memory: using it would segfault.
            raise M3VitError("this DDR buffer was freed")
        return self._array

    def _check_range(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.nbytes:
            raise ValueError(f"bytes {offset}..{offset + size} are outside the "
                             f"{self.nbytes}-byte buffer")

    @property
    def device_address(self) -> int:
        return int(self._live().device_address)

    @property
    def nbytes(self) -> int:
        return int(self._live().nbytes)

    def write(self, offset: int, data: bytes) -> None:
        self._check_range(offset, len(data))
        self._live()[offset:offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def read(self, offset: int, size: int) -> bytes:
        self._check_range(offset, size)
        return self._live()[offset:offset + size].tobytes()

    def sync_to_device(self) -> None:
        self._live().flush()

    def sync_from_device(self) -> None:
        self._live().invalidate()

    def free(self) -> None:
        if self._array is not None:
            self._array.freebuffer()
            self._array = None


class PynqBoard(Board):
    """The accelerator on a ZCU104 through PYNQ (or through any ``pynq.Device``).

    Parameters
    ----------
    bitfile : str or Path
        The ``.bit`` file, with its ``.hwh`` beside it; loaded with ``pynq.Overlay``.
    ip_name : str, optional
        The accelerator's IP in the overlay's ``ip_dict``; by default the first whose name
        starts with ``m3vit_accel``.

    Raises
    ------
    M3VitError
        Off the board (no PYNQ device), if the bitstream cannot be loaded, if the overlay has
        no such IP, or if its ``ID`` register does not read :data:`ID_MAGIC`.

    Notes
    -----
    :meth:`from_device` builds the same board over a given ``pynq.Device`` and register base
    (CI uses ``SimBoard.pynq_device()``). The two differ only where the board's physics do:
    :meth:`reset` and :meth:`wait_for_interrupt` (see there).
    """

    name = "pynq"

    def __init__(self, bitfile: str | os.PathLike, *, ip_name: str | None = None):
        overlay = _load_overlay(Path(bitfile))
        _, ip = _find_accelerator(overlay.ip_dict, ip_name)
        self._attach(overlay.device, int(ip["phys_addr"]), int(ip["addr_range"]), overlay)

    @classmethod
    def from_device(cls, device: Device, *, base_address: int = 0) -> PynqBoard:
        """The board over ``device`` with the accelerator's registers at ``base_address``.

        Parameters
        ----------
        device : pynq.Device
            A device with the ``REGISTER_RW`` or ``MEMORY_MAPPED`` capability whose
            ``allocate`` returns ``PynqBuffer``s, e.g. ``SimBoard.pynq_device()``.
        base_address : int, optional
            Where the accelerator's AXI4-Lite window starts in the device's address space.

        Raises
        ------
        M3VitError
            If the ``ID`` register does not read :data:`ID_MAGIC`.
        """
        if not isinstance(device, Device):
            raise TypeError(f"expected a pynq Device, got {device!r}")
        board = cls.__new__(cls)
        board._attach(device, base_address, REGISTER_WINDOW_BYTES, overlay=None)
        return board

    def _attach(self, device: Device, base_address: int, addr_range: int,
                overlay: Any) -> None:
        self._device = device
        self._overlay = overlay
        self._base_address = base_address
        try:
            self._mmio = pynq.MMIO(base_address, addr_range, device=device)
        except OSError as error:
            # On the board MMIO maps /dev/mem, which only root may open.
            raise M3VitError(f"cannot map the accelerator's registers at {base_address:#x}: "
                             f"{error} (run as root)") from error
        self._check_identity()
        clock_khz = self.read_register(REGISTER_MAP["CLOCK_KHZ"].offset)
        if clock_khz == 0:
            raise M3VitError(f"the accelerator at {base_address:#x} reports a 0 kHz clock")
        self.clock_hz = clock_khz * 1000

    def _check_identity(self) -> None:
        ident = self.read_register(REGISTER_MAP["ID"].offset)
        if ident != ID_MAGIC:
            raise M3VitError(f"no m3vit accelerator at {self._base_address:#x}: ID reads "
                             f"{ident:#010x}, expected {ID_MAGIC:#010x}; is the right "
                             "bitstream loaded?")

    @property
    def device(self) -> Device:
        """The ``pynq.Device`` the registers and buffers live on."""
        return self._device

    def read_register(self, offset: int) -> int:
        return int(self._mmio.read(offset))

    def write_register(self, offset: int, value: int) -> None:
        if not 0 <= value < 1 << 32:
            raise ValueError(f"a register value is 32-bit unsigned, got {value!r}")
        self._mmio.write(offset, int(value))

    def allocate(self, nbytes: int) -> Buffer:
        if nbytes < 1:
            raise ValueError(f"nbytes must be >= 1, got {nbytes!r}")
        # Cacheable: the host packs and unpacks these buffers byte by byte, which is slow
        # through an uncached mapping; Buffer.sync_* are the flush/invalidate that then
        # keep the non-coherent HP ports in agreement.
        try:
            array = pynq.allocate(shape=(nbytes,), dtype=np.uint8, target=self._device,
                                  cacheable=True)
        except RuntimeError as error:
            # XRT's "BO allocation failed": the contiguous (CMA) memory is used up.
            raise M3VitError(f"cannot allocate a {nbytes:,}-byte DDR buffer: {error}") from error
        # Zero and flush now: a dirty line left in the cache could be written back over
        # what the accelerator writes later, even into a buffer the host never syncs.
        array[:] = 0
        array.flush()
        return _PynqBoardBuffer(array)

    def _finished(self) -> bool:
        status = REGISTER_MAP["STATUS"].decode(self.read_register(REGISTER_MAP["STATUS"].offset))
        return bool(status["DONE"] or status["ERROR"])

    def wait_for_interrupt(self, timeout_cycles: int) -> bool:
        """Wait until ``STATUS`` shows ``DONE`` or ``ERROR`` (what drives ``irq``).

        A device that offers ``wait_for_interrupt(cycles)`` (``SimBoard.pynq_device()``) is
        stepped for up to ``timeout_cycles``: simulated time passes only then. On the board
        the PL runs by itself and ``STATUS`` is polled with short sleeps until the wall-clock
        equivalent of ``timeout_cycles`` at the bitstream's ``CLOCK_KHZ`` has passed.
        """
        if timeout_cycles < 0:
            raise ValueError(f"timeout_cycles must be >= 0, got {timeout_cycles!r}")
        if hasattr(self._device, "wait_for_interrupt"):
            self._device.wait_for_interrupt(timeout_cycles)
            return self._finished()
        # The board's path: the PL runs by itself, so poll and sleep.
        deadline = time.monotonic() + timeout_cycles / self.clock_hz
        while not self._finished():
            if time.monotonic() >= deadline:
                # One last look: the run may have ended while we slept past the deadline.
                return self._finished()
            time.sleep(POLL_INTERVAL_S)
        return True

    def reset(self) -> None:
        """Reset the programmable logic; DDR buffers keep their contents.

        On the board the bitstream is downloaded again (``overlay.download()``): PYNQ 3/4
        offers no PL-reset call of its own (its ``Overlay.reset()`` only refreshes
        dictionaries), and reconfiguring the PL drops every AXI transaction the accelerator
        had in flight. PS DDR, and with it every ``PynqBuffer``, is untouched, and XRT keeps
        its buffers because the same design is loaded again. A device without an overlay
        resets through its ``reset_pl()`` (``SimBoard.pynq_device()``: ``SocModel.reset``).
        The accelerator's ``ID`` is checked again afterwards.
        """
        if self._overlay is not None:
            self._overlay.download()  # board only
        elif hasattr(self._device, "reset_pl"):
            self._device.reset_pl()
        else:
            raise M3VitError(f"{type(self._device).__name__} offers no way to reset the logic")
        self._check_identity()

    def close(self) -> None:
        """Forget the device; the overlay stays loaded (the PL keeps running)."""
        self._mmio = None
        self._device = None
        self._overlay = None


@dataclass
class _SimAllocation:
    """What a :class:`SimBoardDevice` buffer's ``bo`` is: its DDR address and host memory."""

    device_address: int
    host: np.ndarray


class SimBoardDevice(Device):
    """A :class:`~m3vit.sw.runtime.board.SimBoard` as a ``pynq.Device``: pynq's classes on
    the simulator (made by :meth:`SimBoard.pynq_device
    <m3vit.sw.runtime.board.SimBoard.pynq_device>`).

    ``pynq.MMIO(base, length, device=this)`` reads and writes the accelerator's registers
    through :meth:`read_registers` / :meth:`write_registers` (the ``REGISTER_RW``
    capability); ``pynq.allocate(..., target=this)`` returns ``PynqBuffer``s whose memory
    is a host numpy array placed in the model's DDR by the board's own allocator, and their
    ``flush()`` / ``invalidate()`` copy that array into and out of the model's DDR, as a
    cache flush and invalidate do on the board.

    Parameters
    ----------
    board : SimBoard
        The simulated board; its DDR holds the buffers.
    base_address : int, optional
        Where the accelerator's register window appears in this device's address space.
    tag : str, optional
        pynq's identifier for the device.
    """

    def __init__(self, board: Any, *, base_address: int = 0, tag: str = "m3vit_sim"):
        super().__init__(tag)
        if base_address < 0 or base_address % 4:
            raise ValueError(f"base_address must be a non-negative multiple of 4, got "
                             f"{base_address!r}")
        self.board = board
        self.soc = board.soc
        self.base_address = base_address
        self.capabilities = {"REGISTER_RW": True, "MEMORY_MAPPED": False, "CALLABLE": False}

    # -- registers (what pynq.MMIO calls for a REGISTER_RW device) --------------------------

    def _register_offsets(self, address: int, length: int) -> range:
        offset = address - self.base_address
        if length <= 0 or length % 4 or offset % 4 or offset < 0 \
                or offset + length > REGISTER_WINDOW_BYTES:
            raise ValueError(f"register access of {length} bytes at {address:#x} is not whole "
                             f"words inside the window at {self.base_address:#x}")
        return range(offset, offset + length, 4)

    def read_registers(self, address: int, length: int) -> bytes:
        """``length`` bytes (whole 32-bit registers, little-endian) from ``address``."""
        return b"".join(self.soc.read_register(offset).to_bytes(4, "little")
                        for offset in self._register_offsets(address, length))

    def write_registers(self, address: int, data: bytes) -> None:
        """Write ``data`` (whole 32-bit registers, little-endian) from ``address`` on."""
        for i, offset in enumerate(self._register_offsets(address, len(data))):
            self.soc.write_register(offset, int.from_bytes(data[4 * i:4 * i + 4], "little"))

    # -- buffers (what pynq.allocate and PynqBuffer.flush / invalidate call) ----------------

    def allocate(self, shape, dtype, **kwargs) -> PynqBuffer:
        """A ``PynqBuffer`` in the model's DDR (``kwargs`` such as ``cacheable`` are moot).

        Raises
        ------
        M3VitError
            If the model's DDR has no room left.
        """
        host = np.zeros(shape, dtype=dtype)
        address = self.board.reserve(host.nbytes)
        return PynqBuffer(host.shape, host.dtype, buffer=host, device=self,
                          device_address=address, bo=_SimAllocation(address, host),
                          coherent=False)

    @staticmethod
    def _span(bo: _SimAllocation, offset: int, size: int) -> np.ndarray:
        raw = bo.host.reshape(-1).view(np.uint8)
        if offset < 0 or offset + size > raw.nbytes:
            raise ValueError(f"bytes {offset}..{offset + size} are outside the "
                             f"{raw.nbytes}-byte buffer")
        return raw[offset:offset + size]

    def flush(self, bo: _SimAllocation, offset: int, ptr: int, size: int) -> None:
        """Copy bytes ``offset .. offset + size`` of the buffer into the model's DDR."""
        self.soc.write_ddr(bo.device_address + offset, self._span(bo, offset, size).tobytes())

    def invalidate(self, bo: _SimAllocation, offset: int, ptr: int, size: int) -> None:
        """Copy bytes ``offset .. offset + size`` of the buffer back from the model's DDR."""
        span = self._span(bo, offset, size)
        span[:] = np.frombuffer(self.soc.read_ddr(bo.device_address + offset, size),
                                dtype=np.uint8)

    # -- what the board does by itself: time passes, the PL can be reset -------------------

    def wait_for_interrupt(self, cycles: int) -> bool:
        """Step the model until its ``irq`` rises or ``cycles`` have passed; ``irq``."""
        self.soc.run(cycles)
        return bool(self.soc.irq)

    def reset_pl(self) -> None:
        """Pulse the model's reset: in-flight DDR transactions dropped, DDR contents kept.

        Not pynq's ``Device.reset``, which refreshes the device's IP dictionaries after a
        download and means something else.
        """
        self.soc.reset()

    def close(self) -> None:
        """Close the board (and its model)."""
        self.board.close()
