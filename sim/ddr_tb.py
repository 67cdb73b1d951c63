"""cocotb DDR model pieces for cocotbext-axi's :class:`~cocotbext.axi.AxiRam`.

Two additions turn the RAM into the DDR that the DMA bench (``tests/sim/dma/``) and the
accelerator bench (``tests/sim/top/test_accelerator.py``) need:

* a read latency: AR requests are accepted at once but each burst's data starts a given
  number of cycles after its AR handshake at the earliest (later bursts queue behind it,
  overlapping, as in a DDR controller; :class:`DelayedChannel`);
* a poisoned page (:data:`POISONED`): AxiRam answers SLVERR for any beat read from or
  written to it (:class:`PoisonedMemory` raises, AxiRam turns that into SLVERR).

:func:`random_pauses` makes the pause patterns for random stalls on any AXI channel.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import cocotb
from cocotb.queue import Queue

if TYPE_CHECKING:
    from m3vit.sim.stream_tb import Bench

#: Beats read or written here get SLVERR.
POISONED = range(0x30000, 0x31000)


class PoisonedMemory(bytearray):
    """RAM contents whose :data:`POISONED` bytes cannot be read or written (IndexError)."""

    def _check(self, key) -> None:
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(self))
        else:
            start, stop = key, key + 1
        if start < POISONED.stop and POISONED.start < stop:
            raise IndexError(f"bytes {start:#x}..{stop:#x} touch the poisoned page")

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        self._check(key)
        super().__setitem__(key, value)


class DelayedChannel:
    """Stands in for the AR sink of AxiRam's read process, adding a pipelined latency.

    Takes each AR from the real sink as soon as it is accepted (so ``arready`` depends only
    on the pause generator) and hands it to the read process ``latency`` cycles after its
    handshake at the earliest. The read process serves bursts one after the other, so a
    burst whose AR came early starts right after the previous burst: latency overlaps.

    Parameters
    ----------
    channel : cocotbext-axi AR sink
        The read process's own AR channel (``AxiRam.read_if.ar_channel``).
    bench : Bench
        Gives the clock edge and the cycle count.
    latency : int
        Cycles from an AR handshake to the earliest first beat of its burst.
    """

    def __init__(self, channel, bench: Bench, latency: int):
        self.channel = channel
        self.bench = bench
        self.latency = latency
        self.queue: Queue = Queue()
        self.requests: list = []   # every AR taken, in order: an AXI read monitor
        cocotb.start_soon(self._collect())

    async def _collect(self) -> None:
        while True:
            request = await self.channel.recv()
            self.requests.append(request)
            # The sink samples the handshake at the edge that ends the request's cycle.
            await self.queue.put((self.bench.cycle() + self.latency, request))

    async def recv(self):
        """The next AR request, no earlier than its due cycle."""
        due, request = await self.queue.get()
        while self.bench.cycle() < due:
            await self.bench.edge
        return request

    def clear(self) -> None:
        """Drop every request not yet handed on (AxiRam calls this on reset)."""
        self.channel.clear()
        while not self.queue.empty():
            self.queue.get_nowait()


def random_pauses(rng, probability: float):
    """An endless pause pattern for a cocotbext-axi channel: paused with ``probability``.

    Parameters
    ----------
    rng : random.Random
        The pattern's own random stream.
    probability : float
        Chance that the channel is paused in a cycle.

    Returns
    -------
    generator of bool
        ``True`` pauses the channel for that cycle.
    """
    return (rng.random() < probability for _ in itertools.count())
