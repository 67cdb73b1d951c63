"""One read stream over several AXI4 master ports: bursts striped across HP ports, in order.

:class:`StripedReadDma` takes the same commands as :class:`~m3vit.hw.axi.ReadDma` and
returns the same bytes in the same order, but reads them through ``n_ports`` AXI4 masters
at once (the ZCU104's HP ports each deliver ≈ 4.75 GB/s; three together ≈ 14.2,
:mod:`m3vit.hw.hp_ports`) and delivers them as *entries* of ``entry_beats`` beats, so the
consumer can take up to ``entry_beats`` beats a cycle::

    cmd ─► round out to entries ─► burst splitter ─► burst k to port k mod N ──► AR ─┐
             │ (skip, beats)                 │ (port, entries, last)                │ DDR
             ▼                               ▼                                      ▼
         command queue                   order queue         R beats ─► pack ─► entry queue
             │                               │                                 (port p)
             │                               └──► merger: the head burst's entries from
             ▼                                    its port's queue, one entry a cycle
         realigner ◄─────────────────────────────────────┘
             └─► data (the command's beats, entries from its first beat)

Rules (as :class:`~m3vit.hw.axi.ReadDma`'s, plus):

* A command may start at any beat and have any number of beats. The DMA reads it out to
  whole entries (the address rounded down, the end up) and a *realigner* drops the beats
  before and after: the first entry starts with the command's first beat, every entry is
  full but perhaps the last, whose ``beats`` says how many of its beats are the
  command's. A command at an entry boundary costs nothing; any other reads one entry
  more and passes its data through a ``entry_beats``-way rotation.
* Bursts never cross a ``max_burst_beats`` boundary, which is a multiple of an entry, so
  every burst is whole entries. Burst ``k`` of the stream (counted over all commands since
  reset) goes to port ``k mod n_ports``: consecutive bursts of one weight stream arrive on
  every port at once.
* Each port reserves room in its own entry queue for a burst's entries before issuing it
  (credits), so ``rready`` stays high on every port: no port waits on another, and no
  consumer can hold up the interconnect.
* The merger takes the bursts in issue order, one entry a cycle from the port that holds
  the current burst: the output is the command's bytes in address order.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from .axi import (
    BYTE_COUNTER_BITS,
    AxiResp,
    BurstSplitter,
    axi_read_signature,
    byte_beat_layout,
    dma_cmd_layout,
    entry_layout,
    issue_read_burst,
    read_address_stage,
)
from .config import AccelConfig

__all__ = ["StripedReadDma", "default_entry_beats", "least_queue_entries"]


def default_entry_beats(n_ports: int) -> int:
    """Beats per entry for ``n_ports`` ports: the least power of two ≥ ``n_ports``.

    The merger hands out one entry a cycle, so entries of this many beats let the consumer
    take every port's beat of a cycle.
    """
    return 1 << (n_ports - 1).bit_length()


def least_queue_entries(config: AccelConfig, entry_beats: int) -> int:
    """The shallowest entry queue a port may have: ``max_outstanding`` whole bursts (the
    credits of every burst in flight)."""
    return config.max_outstanding * config.max_burst_beats // entry_beats


class StripedReadDma(wiring.Component):
    """Reads commands' worth of bytes through ``n_ports`` AXI4 masters, bursts striped.

    Parameters
    ----------
    config : AccelConfig
        ``axi_data_width``, ``axi_addr_width``, ``max_burst_beats``, ``max_outstanding``
        (per port).
    n_ports : int
        AXI4 master ports (default ``config.n_master_ports``).
    entry_beats : int
        Beats per output entry, a power of two dividing ``max_burst_beats`` (default
        :func:`default_entry_beats`).
    queue_entries : int
        Depth of each port's entry queue, at least ``max_outstanding`` whole bursts (the
        default). A deeper queue lets the DDR read further ahead of a slow consumer: the
        top's holds 64 KiB a port, so the ports stream the next GEMM's weights while the
        array is still busy with the last's.

    Attributes
    ----------
    axi : Out(Signature of ``port0`` … ``port{n−1}``, each axi_read_signature)
        The AR and R channels of each master (ID 0, INCR, full-width beats).
    cmd : In(stream of dma_cmd_layout)
        ``addr`` beat-aligned, any ``beats`` (0 reads nothing).
    data : Out(stream of entry_layout(axi_bytes, entry_beats))
        The commands' beats in address order, ``entry_beats`` an entry from each command's
        first beat (``beats`` of the last entry may be fewer), ``last`` on each command's
        final entry.
    error : Out(1)
        Sticky: an R beat on any port came back with ``RRESP`` ≠ OKAY.
    clear_error : In(1)
        Clears ``error``.
    bytes_read : Out(32)
        Bytes received on R, all ports, since reset, wrapping.
    port_bytes_read : Out(ArrayLayout(32, n_ports))
        The same, per port.
    busy : Out(1)
        A burst is to be issued or outstanding, or data waits in a queue.
    """

    def __init__(self, config: AccelConfig, n_ports: int | None = None,
                 entry_beats: int | None = None, queue_entries: int | None = None):
        if not isinstance(config, AccelConfig):
            raise TypeError(f"expected an AccelConfig, got {config!r}")
        n_ports = config.n_master_ports if n_ports is None else n_ports
        entry_beats = default_entry_beats(n_ports) if entry_beats is None else entry_beats
        if not 1 <= n_ports <= 8:
            raise ValueError(f"n_ports must be 1..8, got {n_ports!r}")
        if entry_beats < 1 or entry_beats & (entry_beats - 1) \
                or config.max_burst_beats % entry_beats:
            raise ValueError(f"entry_beats must be a power of two dividing max_burst_beats="
                             f"{config.max_burst_beats}, got {entry_beats!r}")
        self._config = config
        self.n_ports = n_ports
        self.entry_beats = entry_beats
        self.entry_bytes = entry_beats * config.axi_bytes
        least = least_queue_entries(config, entry_beats)
        queue_entries = least if queue_entries is None else queue_entries
        if queue_entries < least:
            raise ValueError(f"queue_entries must be at least {least} (max_outstanding whole "
                             f"bursts), got {queue_entries!r}")
        self._queue_entries = queue_entries
        read = axi_read_signature(config.axi_data_width, config.axi_addr_width)
        super().__init__({
            "axi": Out(wiring.Signature({f"port{p}": Out(read) for p in range(n_ports)})),
            "cmd": In(stream.Signature(dma_cmd_layout(config))),
            "data": Out(stream.Signature(entry_layout(config.axi_bytes, entry_beats))),
            "error": Out(1),
            "clear_error": In(1),
            "bytes_read": Out(BYTE_COUNTER_BITS),
            "port_bytes_read": Out(data.ArrayLayout(BYTE_COUNTER_BITS, n_ports)),
            "busy": Out(1),
        })

    @property
    def queue_entries(self) -> int:
        """Depth of each port's entry queue (at least ``max_outstanding`` whole bursts)."""
        return self._queue_entries

    def port(self, index: int):
        """The AXI read interface of master ``index``."""
        return getattr(self.axi, f"port{index}")

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        n, entry_shift = self.n_ports, exact_log2(self.entry_beats)

        # Commands rounded out to whole entries, to the burst splitter; what to drop, to the
        # realigner.
        m.submodules.splitter = splitter = BurstSplitter(cfg)
        beat_shift = exact_log2(cfg.axi_bytes)
        aligned = Signal.like(self.cmd.payload)
        skip = self.cmd.p.addr[beat_shift:beat_shift + entry_shift]  # beats before the start
        end = Signal(len(self.cmd.p.beats) + 1)
        m.d.comb += [
            end.eq(self.cmd.p.beats + skip + self.entry_beats - 1),
            aligned.addr.eq(Cat(Const(0, beat_shift + entry_shift),
                                self.cmd.p.addr[beat_shift + entry_shift:])),
            aligned.beats.eq(Mux(self.cmd.p.beats == 0, 0,
                                 Cat(Const(0, entry_shift), end[entry_shift:]))),
        ]
        info_layout = data.StructLayout({"skip": entry_shift, "beats": len(self.cmd.p.beats)})
        if self.entry_beats == 1:
            m.d.comb += [splitter.cmd.valid.eq(self.cmd.valid),
                         self.cmd.ready.eq(splitter.cmd.ready)]
            info = None
        else:
            # A zero-beat command reads nothing and leaves nothing for the realigner.
            m.submodules.commands = info = SyncFIFOBuffered(width=info_layout.size, depth=4)
            empty = self.cmd.p.beats == 0
            m.d.comb += [
                splitter.cmd.valid.eq(self.cmd.valid & (info.w_rdy | empty)),
                self.cmd.ready.eq(splitter.cmd.ready & (info.w_rdy | empty)),
                info.w_en.eq(self.cmd.valid & self.cmd.ready & ~empty),
                info.w_data.eq(Cat(skip, self.cmd.p.beats)),
            ]
        m.d.comb += splitter.cmd.payload.eq(aligned)
        burst = splitter.burst

        # The order queue: one record per burst issued, in issue order.
        record = data.StructLayout({
            "port": range(n),
            "entries": range(cfg.max_burst_beats // self.entry_beats + 1),
            "last": 1,
        })
        # Room for every burst the entry queues can hold, or they would never fill: the
        # order queue, not the entry queues, would bound how far the ports read ahead.
        order_depth = n * max(cfg.max_outstanding,
                              self.queue_entries * self.entry_beats // cfg.max_burst_beats)
        m.submodules.order = order = SyncFIFOBuffered(width=record.size, depth=order_depth)
        next_port = Signal(range(n))  # the port of the next burst

        ports = [self._port(m, p, burst, next_port, order) for p in range(n)]
        issue = Signal()
        m.d.comb += issue.eq(Cat(*(p.issue for p in ports)).any())
        with m.If(issue):
            m.d.sync += next_port.eq(Mux(next_port == n - 1, 0, next_port + 1))
        written = record(order.w_data)
        m.d.comb += [
            burst.ready.eq(Array(p.can_issue for p in ports)[next_port] & order.w_rdy),
            order.w_en.eq(issue),
            written.port.eq(next_port),
            written.entries.eq(burst.p.beats[entry_shift:]),
            written.last.eq(burst.p.last),
        ]

        merged = stream.Signature(byte_beat_layout(self.entry_bytes)).create(path=("merged",))
        self._merge(m, ports, order, record, merged)
        if info is None:
            wiring.connect(m, merged, wiring.flipped(self.data))
        else:
            self._realign(m, merged, info, info_layout)

        # Status.
        m.d.comb += self.busy.eq(splitter.active | order.r_rdy
                                 | Cat(*(p.outstanding != 0 for p in ports)).any())
        beats_now = sum(p.r_beat for p in ports)
        m.d.sync += self.bytes_read.eq(self.bytes_read + beats_now * cfg.axi_bytes)
        for index, port in enumerate(ports):
            with m.If(port.r_beat):
                m.d.sync += self.port_bytes_read[index].eq(self.port_bytes_read[index]
                                                           + cfg.axi_bytes)
        with m.If(self.clear_error):
            m.d.sync += self.error.eq(0)
        with m.If(Cat(*(p.r_error for p in ports)).any()):
            m.d.sync += self.error.eq(1)
        return m

    def _port(self, m: Module, index: int, burst, next_port: Signal, order):
        """One master: AR register, outstanding count, R beats packed into its entry queue."""
        cfg = self._config
        axi = self.port(index)
        entry_shift = exact_log2(self.entry_beats)
        depth = self.queue_entries
        queue = SyncFIFOBuffered(width=8 * self.entry_bytes, depth=depth + 1)
        m.submodules[f"queue{index}"] = queue
        credits = Signal(range(depth + 1), init=depth, name=f"credits{index}")
        outstanding = Signal(range(cfg.max_outstanding + 1), name=f"outstanding{index}")
        ar_free = read_address_stage(m, axi, cfg)
        entries = burst.p.beats[entry_shift:]
        can_issue = Signal(name=f"can_issue{index}")
        issue = Signal(name=f"issue{index}")
        m.d.comb += [
            can_issue.eq(ar_free & (credits >= entries)
                         & (outstanding != cfg.max_outstanding)),
            issue.eq(burst.valid & burst.ready & (next_port == index)),
        ]
        issue_read_burst(m, axi, cfg, issue, burst.p)

        # R beats into entries: pieces 0 … entry_beats−2 wait here, the last goes straight in.
        r_beat = Signal(name=f"r_beat{index}")
        m.d.comb += [axi.rready.eq(1), r_beat.eq(axi.rvalid)]
        width = cfg.axi_data_width
        if self.entry_beats == 1:
            m.d.comb += [queue.w_en.eq(r_beat), queue.w_data.eq(axi.rdata)]
        else:
            held = Signal(width * (self.entry_beats - 1), name=f"held{index}")
            piece = Signal(entry_shift, name=f"piece{index}")
            with m.If(r_beat):
                m.d.sync += [piece.eq(piece + 1),
                             held.eq(Cat(held[width:], axi.rdata))]
            m.d.comb += [queue.w_en.eq(r_beat & (piece == self.entry_beats - 1)),
                         queue.w_data.eq(Cat(held, axi.rdata))]

        popped = Signal(name=f"popped{index}")
        r_error = Signal(name=f"r_error{index}")
        m.d.comb += r_error.eq(r_beat & (axi.rresp != AxiResp.OKAY))
        m.d.sync += [
            credits.eq(credits - Mux(issue, entries, 0) + popped),
            outstanding.eq(outstanding + issue - (r_beat & axi.rlast)),
        ]

        return SimpleNamespace(queue=queue, can_issue=can_issue, issue=issue,
                               outstanding=outstanding, r_beat=r_beat, r_error=r_error,
                               popped=popped)

    def _merge(self, m: Module, ports, order, record, merged) -> None:
        """The head burst's entries, from its port's queue, one a cycle, to ``merged``."""
        head = record(order.r_data)
        taken = Signal(range(self._config.max_burst_beats // self.entry_beats + 1))
        queue_ready = Array(p.queue.r_rdy for p in ports)[head.port]
        queue_data = Array(p.queue.r_data for p in ports)[head.port]
        final = taken == head.entries - 1
        m.d.comb += [
            merged.valid.eq(order.r_rdy & queue_ready),
            merged.p.data.eq(queue_data),
            merged.p.last.eq(head.last & final),
        ]
        pop = merged.valid & merged.ready
        for index, port in enumerate(ports):
            m.d.comb += [port.popped.eq(pop & (head.port == index)),
                         port.queue.r_en.eq(pop & (head.port == index))]
        m.d.comb += order.r_en.eq(pop & final)
        with m.If(pop):
            m.d.sync += taken.eq(Mux(final, 0, taken + 1))


    def _realign(self, m: Module, merged, info, info_layout) -> None:
        """Whole entries in, the commands' beats out, each command from its first beat.

        With ``skip`` beats before a command's start, output entry ``k`` is beats ``skip …
        entry_beats − 1`` of input entry ``k`` (held) and beats ``0 … skip − 1`` of input
        entry ``k + 1``; a command's last output may need no further input (a flush).
        """
        E = self.entry_beats
        beat_bits = 8 * self._config.axi_bytes
        head = info_layout(info.r_data)
        active = Signal()                       # a command is being realigned
        skip = Signal(exact_log2(E))
        left = Signal(len(head.beats))          # its beats still to go out
        held = Signal(E * beat_bits)            # the input entry before the current one
        have_held = Signal()
        inputs_done = Signal()                  # the command's final input entry has come
        with m.If(~active & info.r_rdy):
            m.d.comb += info.r_en.eq(1)
            m.d.sync += [active.eq(1), skip.eq(head.skip), left.eq(head.beats),
                         have_held.eq(0), inputs_done.eq(0)]

        out = self.data
        following = Mux(inputs_done, 0, merged.p.data)
        rotated = Array(Cat(held[k * beat_bits:], following[:k * beat_bits])
                        for k in range(1, E))
        final = left <= E
        m.d.comb += [out.p.beats.eq(Mux(final, left, E)), out.p.last.eq(final)]
        sent = out.valid & out.ready
        with m.If(active & (skip == 0)):
            # Aligned: entries pass straight through.
            m.d.comb += [out.valid.eq(merged.valid), out.p.data.eq(merged.p.data),
                         merged.ready.eq(out.ready)]
        with m.Elif(active & ~have_held):
            # The first entry only fills `held`.
            m.d.comb += merged.ready.eq(1)
            with m.If(merged.valid):
                m.d.sync += [held.eq(merged.p.data), have_held.eq(1),
                             inputs_done.eq(merged.p.last)]
        with m.Elif(active):
            m.d.comb += [out.valid.eq(inputs_done | merged.valid),
                         out.p.data.eq(rotated[skip - 1]),
                         merged.ready.eq(out.ready & ~inputs_done)]
            with m.If(sent & ~inputs_done):
                m.d.sync += [held.eq(merged.p.data), inputs_done.eq(merged.p.last)]
        with m.If(sent):
            m.d.sync += left.eq(left - Mux(final, left, E))
            with m.If(final):
                m.d.sync += active.eq(0)
