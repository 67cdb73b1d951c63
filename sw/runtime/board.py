"""The board the runtime drives: registers, DDR buffers, the interrupt, a reset.

One driver (:class:`m3vit.sw.runtime.driver.Accelerator`) runs on any :class:`Board`:
:class:`m3vit.sw.runtime.board.SimBoard` is the Verilated SoC model (``m3vit.sim.soc``);
:class:`m3vit.sw.runtime.pynq_board.PynqBoard` is ``pynq.Overlay`` + ``pynq.allocate`` + MMIO on the
ZCU104. A board knows nothing about models, programs or tasks: that is the driver's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..errors import M3VitError

__all__ = ["Board", "Buffer", "SimBoard"]


class Buffer(ABC):
    """A physically contiguous DDR buffer the accelerator can reach.

    The host writes and reads it through its own view (a cached mapping on the board);
    :meth:`sync_to_device` / :meth:`sync_from_device` make the two sides agree, as
    ``PynqBuffer.flush()`` / ``invalidate()`` do on the ZCU104.
    """

    @property
    @abstractmethod
    def device_address(self) -> int:
        """Byte address of the buffer's first byte as the accelerator's AXI master sees it."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Size in bytes."""

    @abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` into the host view at ``offset`` (no sync)."""

    @abstractmethod
    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the host view from ``offset`` (no sync)."""

    @abstractmethod
    def sync_to_device(self) -> None:
        """Make the host's writes visible to the accelerator (cache flush)."""

    @abstractmethod
    def sync_from_device(self) -> None:
        """Make the accelerator's writes visible to the host (cache invalidate)."""

    def free(self) -> None:  # noqa: B027 - optional: the simulator's buffers need no freeing
        """Give the buffer back; it must not be used afterwards."""


class Board(ABC):
    """A ZCU104 (or its simulation) with the accelerator's bitstream loaded.

    Attributes
    ----------
    name : str
        ``"sim"`` or ``"pynq"``: what reports print.
    """

    name: str = "board"

    @abstractmethod
    def read_register(self, offset: int) -> int:
        """32-bit read of the accelerator's AXI4-Lite register at byte ``offset``."""

    @abstractmethod
    def write_register(self, offset: int, value: int) -> None:
        """32-bit write of the accelerator's AXI4-Lite register at byte ``offset``."""

    @abstractmethod
    def allocate(self, nbytes: int) -> Buffer:
        """A new zero-filled DDR buffer of ``nbytes`` bytes."""

    @abstractmethod
    def wait_for_interrupt(self, timeout_cycles: int) -> bool:
        """Wait until the accelerator's ``irq`` is high (run done or stopped with an error).

        Parameters
        ----------
        timeout_cycles : int
            Give up after this many accelerator clock cycles (on the board: the equivalent
            wall time at the bitstream's clock).

        Returns
        -------
        bool
            ``True`` when ``irq`` rose, ``False`` on timeout.
        """

    @abstractmethod
    def reset(self) -> None:
        """Reset the programmable logic: stops a hung run. DDR buffers keep their contents."""

    def debug_hint(self, start: int, end: int) -> str:
        """How to look at what happened between two points of a run, for an error message.

        Parameters
        ----------
        start, end : int
            The board's cycle positions (:meth:`position`) around the event.
        """
        return ""

    def position(self) -> int:
        """A cycle count that :meth:`debug_hint` understands (0 where there is none)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional: boards without resources to release
        """Release the board; the object must not be used afterwards."""

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SimBuffer(Buffer):
    """A buffer in the SoC model's DDR: a host copy synced by backdoor copies."""

    def __init__(self, soc, address: int, nbytes: int):
        self._soc, self._address = soc, address
        self._host = bytearray(nbytes)

    @property
    def device_address(self) -> int:
        return self._address

    @property
    def nbytes(self) -> int:
        return len(self._host)

    def write(self, offset: int, data: bytes) -> None:
        _check_span(offset, len(data), self.nbytes)
        self._host[offset:offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        _check_span(offset, size, self.nbytes)
        return bytes(self._host[offset:offset + size])

    def sync_to_device(self) -> None:
        self._soc.write_ddr(self._address, bytes(self._host))

    def sync_from_device(self) -> None:
        self._host[:] = self._soc.read_ddr(self._address, len(self._host))


def _check_span(offset: int, size: int, nbytes: int) -> None:
    if offset < 0 or size < 0 or offset + size > nbytes:
        raise M3VitError(f"bytes {offset}..{offset + size} are outside a {nbytes}-byte buffer")


class SimBoard(Board):
    """The Verilated SoC model (:class:`m3vit.sim.soc.SocModel`) as a board.

    The one simulated board: the runtime drives it directly, and :meth:`pynq_device` shows
    the same board to PYNQ's classes (``pynq.MMIO``, ``pynq.allocate``), so CI runs the
    ZCU104's code path against it. Buffers of both faces come from one allocator
    (:meth:`reserve`): placed one after another in the model's DDR, page aligned, from
    ``0x1000`` so that address 0 is never a valid buffer. Waiting runs the model.

    Parameters
    ----------
    config : AccelConfig
        The accelerator to simulate.
    ddr_bytes : int, optional
        Size of the modelled DDR.
    timing : DdrTiming, optional
        The DDR model's latency, outstanding bursts and bandwidth (default: one ZCU104
        HP port).
    trace_path : path-like, optional
        Write a waveform (``.vcd``, or ``.fst`` where the lz4 headers are installed).
    trace_window : (int, int or None), optional
        Only cycles ``start <= cycle < stop`` of the simulation go into the trace.
    progress : callable, optional
        Told about the model build when one is needed.
    """

    name = "sim"

    def __init__(self, config, *, ddr_bytes: int | None = None, timing=None,
                 trace_path=None, trace_window=None, progress=None):
        from m3vit.sim.soc import SocModel

        kwargs = {} if ddr_bytes is None else {"ddr_bytes": ddr_bytes}
        self._attach(SocModel(config, timing=timing, trace_path=trace_path,
                              trace_window=trace_window, progress=progress, **kwargs))

    @classmethod
    def over(cls, soc) -> SimBoard:
        """The board over an existing SoC model (or a stand-in with the same methods).

        Parameters
        ----------
        soc : m3vit.sim.soc.SocModel
            The model; the board owns it from now on (:meth:`close` closes it).
        """
        board = cls.__new__(cls)
        board._attach(soc)
        return board

    def _attach(self, soc) -> None:
        self.soc = soc
        self._next = _PAGE

    def reserve(self, nbytes: int) -> int:
        """DDR address of ``nbytes`` no other buffer of this board uses (page aligned).

        Raises
        ------
        M3VitError
            If the modelled DDR has no room left (freed buffers are not reused).
        """
        address, end = self._next, self._next + nbytes
        if end > self.soc.ddr_bytes:
            raise M3VitError(f"the simulated DDR holds {self.soc.ddr_bytes:,} bytes, "
                             f"{end:,} are needed: open the board with a larger ddr_bytes")
        self._next = end + -end % _PAGE
        return address

    def pynq_device(self, *, base_address: int = 0):
        """This board as a ``pynq.Device``, for :meth:`PynqBoard.from_device
        <m3vit.sw.runtime.pynq_board.PynqBoard.from_device>`.

        Parameters
        ----------
        base_address : int, optional
            Where the accelerator's register window appears in the device's address space.
        """
        from .pynq_board import SimBoardDevice  # pynq is imported only where it is used

        return SimBoardDevice(self, base_address=base_address)

    def read_register(self, offset: int) -> int:
        return self.soc.read_register(offset)

    def write_register(self, offset: int, value: int) -> None:
        self.soc.write_register(offset, value)

    def allocate(self, nbytes: int) -> Buffer:
        buffer = _SimBuffer(self.soc, self.reserve(nbytes), nbytes)
        buffer.sync_to_device()  # zero-filled, like a fresh allocation
        return buffer

    def wait_for_interrupt(self, timeout_cycles: int) -> bool:
        if not self.soc.irq:
            self.soc.run(timeout_cycles)
        return self.soc.irq

    def reset(self) -> None:
        self.soc.reset()

    def position(self) -> int:
        return self.soc.cycle

    def debug_hint(self, start: int, end: int) -> str:
        # The last 20,000 cycles before the event: enough to see what the engine waits for,
        # ~220 MB of VCD on the CI design.
        begin = max(start, end - 20_000)
        return (f"; to see it, re-run with --trace run.vcd --trace-window {begin}:{end} "
                "(m3vit run) or trace_window=(...) (SimBoard)")

    def close(self) -> None:
        self.soc.close()


#: Buffer alignment: a page, like the CMA allocations XRT makes on the board, and more than
#: any AXI burst alignment the accelerator needs.
_PAGE = 4096
