"""DDR access: AXI4 master signatures, read and write DMA engines, a byte-stream width converter.

The accelerator reaches DDR through AXI4 master ports (the ZCU104's 128-bit HP ports). Four
pieces, each a :class:`~amaranth.lib.wiring.Component` built from an
:class:`~m3vit.hw.config.AccelConfig`:

* :func:`axi_read_signature`, :func:`axi_write_signature`, :func:`axi_master_signature` — the
  AXI4 master channels with the AXI signal names as member names, so that a port named
  ``m_axi`` becomes ``m_axi__araddr``, ``m_axi__rdata`` … in Verilog;
* :class:`ReadDma` — commands {addr, beats} in, DDR data out as a stream of beats;
* :class:`WriteDma` — commands {addr, beats} and a stream of beats in, DDR writes out;
* :class:`AxiDmaPort` — one of each sharing one AXI4 master port;
* :class:`StreamResize` — packs or splits a byte stream between two power-of-two widths
  (128-bit DMA beats ↔ 32-byte weight rows, 8-byte parameter records, 4-byte CI rows).

Rules every engine follows
--------------------------
* Addresses are byte addresses of whole beats: the low ``log2(axi_bytes)`` bits of a
  command's ``addr`` are ignored (taken as zero). Every transfer is full width (``AxSIZE`` =
  the bus width, all write strobes set).
* A command is cut into INCR bursts of at most ``max_burst_beats`` beats that never cross a
  ``max_burst_beats``-beat boundary; since ``max_burst_beats × axi_bytes`` divides 4 KiB
  (checked by the config), no burst crosses a 4 KiB boundary. Only a command's first burst is
  short when its address is not so aligned.
* One AXI ID (0) is used, so the slave returns R data and B responses in issue order.
* The next command is taken as soon as the previous one's last burst is issued: address
  bursts of consecutive commands follow each other while earlier data still moves.
* A command of zero beats is consumed and does nothing (no burst, no data, no ``done``).
* ``error`` is sticky: set by any response other than OKAY, cleared by ``clear_error`` (or
  reset). The data still flows; the controller decides what an error means.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Shape, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from .config import AccelConfig

__all__ = [
    "AXCACHE",
    "AXPROT",
    "BEATS_BITS",
    "BOUNDARY_BYTES",
    "BYTE_COUNTER_BITS",
    "ID_BITS",
    "AxiBurst",
    "AxiDmaPort",
    "AxiResp",
    "BurstSplitter",
    "ReadDma",
    "StreamResize",
    "WriteDma",
    "axi_master_signature",
    "axi_read_part",
    "axi_read_signature",
    "axi_write_part",
    "axi_write_signature",
    "byte_beat_layout",
    "dma_cmd_layout",
    "entry_layout",
    "issue_read_burst",
    "read_address_stage",
]

#: Width of a command's ``beats`` field: up to 2^25 − 1 beats (512 MiB at 16 bytes a beat).
BEATS_BITS = 25
#: Width of the wrapping ``bytes_read`` / ``bytes_written`` counters.
BYTE_COUNTER_BITS = 32
#: AXI4's rule: an INCR burst must not cross a 4 KiB address boundary.
BOUNDARY_BYTES = 4096
#: Width of the AXI ID signals (one ID, 0, is ever used; the ports exist for the interconnect).
ID_BITS = 1

#: ``AxCACHE`` of every burst: normal, non-cacheable, bufferable, as Xilinx recommends for
#: the HP ports (0b0000, device non-bufferable, would forbid the interconnect's merging).
AXCACHE = 0b0011
#: ``AxPROT``: unprivileged, secure, data access.
AXPROT = 0b000


class AxiResp(enum.Enum, shape=2):
    """``RRESP`` / ``BRESP`` codes."""

    OKAY = 0
    EXOKAY = 1
    SLVERR = 2
    DECERR = 3


class AxiBurst(enum.Enum, shape=2):
    """``AxBURST`` codes (only INCR is issued)."""

    FIXED = 0
    INCR = 1
    WRAP = 2


def _check_widths(data_width: int, addr_width: int, id_width: int) -> None:
    if data_width not in (32, 64, 128, 256, 512, 1024):
        raise ValueError(f"AXI data width must be a power of two in [32, 1024], got "
                         f"{data_width!r}")
    if not 12 <= addr_width <= 64:
        raise ValueError(f"AXI address width must be in [12, 64], got {addr_width!r}")
    if not 1 <= id_width <= 32:
        raise ValueError(f"AXI ID width must be in [1, 32], got {id_width!r}")


def axi_read_signature(data_width: int, addr_width: int, id_width: int = ID_BITS
                       ) -> wiring.Signature:
    """The read channels (AR, R) of an AXI4 master, members named as the AXI signals.

    Parameters
    ----------
    data_width : int
        ``RDATA`` width in bits (a power of two, 32…1024).
    addr_width : int
        ``ARADDR`` width in bits.
    id_width : int
        ``ARID`` / ``RID`` width.

    Returns
    -------
    wiring.Signature
        From the master's side: ``arid araddr arlen arsize arburst arcache arprot arvalid``
        and ``rready`` are ``Out``; ``arready rid rdata rresp rlast rvalid`` are ``In``.

    Raises
    ------
    ValueError
        If a width is out of range.
    """
    _check_widths(data_width, addr_width, id_width)
    return wiring.Signature({
        "arid": Out(id_width),
        "araddr": Out(addr_width),
        "arlen": Out(8),
        "arsize": Out(3),
        "arburst": Out(2),
        "arcache": Out(4),
        "arprot": Out(3),
        "arvalid": Out(1),
        "arready": In(1),
        "rid": In(id_width),
        "rdata": In(data_width),
        "rresp": In(2),
        "rlast": In(1),
        "rvalid": In(1),
        "rready": Out(1),
    })


def axi_write_signature(data_width: int, addr_width: int, id_width: int = ID_BITS
                        ) -> wiring.Signature:
    """The write channels (AW, W, B) of an AXI4 master, members named as the AXI signals.

    Parameters
    ----------
    data_width : int
        ``WDATA`` width in bits (a power of two, 32…1024).
    addr_width : int
        ``AWADDR`` width in bits.
    id_width : int
        ``AWID`` / ``BID`` width.

    Returns
    -------
    wiring.Signature
        From the master's side: ``awid awaddr awlen awsize awburst awcache awprot awvalid``,
        ``wdata wstrb wlast wvalid`` and ``bready`` are ``Out``; ``awready wready`` and
        ``bid bresp bvalid`` are ``In``.

    Raises
    ------
    ValueError
        If a width is out of range.
    """
    _check_widths(data_width, addr_width, id_width)
    return wiring.Signature({
        "awid": Out(id_width),
        "awaddr": Out(addr_width),
        "awlen": Out(8),
        "awsize": Out(3),
        "awburst": Out(2),
        "awcache": Out(4),
        "awprot": Out(3),
        "awvalid": Out(1),
        "awready": In(1),
        "wdata": Out(data_width),
        "wstrb": Out(data_width // 8),
        "wlast": Out(1),
        "wvalid": Out(1),
        "wready": In(1),
        "bid": In(id_width),
        "bresp": In(2),
        "bvalid": In(1),
        "bready": Out(1),
    })


def axi_master_signature(data_width: int, addr_width: int, id_width: int = ID_BITS
                         ) -> wiring.Signature:
    """A full AXI4 master: the members of :func:`axi_read_signature` and
    :func:`axi_write_signature` side by side (flat, so ports read ``m_axi__araddr``).

    Use :func:`axi_read_part` / :func:`axi_write_part` to connect a read-only or write-only
    engine to such a port with :func:`~amaranth.lib.wiring.connect`.
    """
    return wiring.Signature({
        **axi_read_signature(data_width, addr_width, id_width).members,
        **axi_write_signature(data_width, addr_width, id_width).members,
    })


class _Part:
    """Some members of an interface, seen as an interface of their own signature.

    :func:`~amaranth.lib.wiring.connect` needs equal signatures on both sides; this presents
    the read (or write) half of a full AXI4 master, or the control members of a DMA engine,
    without copying a signal.
    """

    def __init__(self, signature: wiring.Signature, interface) -> None:
        self.signature = signature
        for name in signature.members:
            setattr(self, name, getattr(interface, name))


def _axi_widths(master) -> tuple[int, int, int]:
    members = master.signature.members
    return tuple(Shape.cast(members[name].shape).width for name in ("rdata", "araddr", "arid"))


def axi_read_part(master) -> _Part:
    """The AR and R members of a full AXI4 master interface, as an interface of
    :func:`axi_read_signature` (the same signals, not copies).

    Parameters
    ----------
    master : interface
        An interface whose signature is :func:`axi_master_signature` (unflipped, e.g. a
        component's ``Out`` member); flip the result with :func:`wiring.flipped` as needed.
    """
    return _Part(axi_read_signature(*_axi_widths(master)), master)


def axi_write_part(master) -> _Part:
    """The AW, W and B members of a full AXI4 master interface, as an interface of
    :func:`axi_write_signature` (see :func:`axi_read_part`)."""
    return _Part(axi_write_signature(*_axi_widths(master)), master)


def dma_cmd_layout(config: AccelConfig) -> data.StructLayout:
    """A DMA command: ``addr`` (byte address of the first beat, beat-aligned) and ``beats``
    (:data:`BEATS_BITS` wide; 0 is a no-op)."""
    return data.StructLayout({"addr": unsigned(config.axi_addr_width),
                              "beats": unsigned(BEATS_BITS)})


def byte_beat_layout(n_bytes: int) -> data.StructLayout:
    """A beat of a byte stream: ``data`` (``8 · n_bytes`` bits, byte 0 in bits 0…7, i.e.
    little-endian as in DDR) and ``last``."""
    if n_bytes < 1 or n_bytes & (n_bytes - 1):
        raise ValueError(f"n_bytes must be a power of two, got {n_bytes!r}")
    return data.StructLayout({"data": unsigned(8 * n_bytes), "last": 1})


def entry_layout(axi_bytes: int, entry_beats: int) -> data.StructLayout:
    """An *entry* of up to ``entry_beats`` AXI beats of a byte stream.

    With one beat an entry this is :func:`byte_beat_layout`. Otherwise ``data`` (``8 ·
    axi_bytes · entry_beats`` bits, the first beat in the low bits), ``last`` and ``beats``
    (1 … ``entry_beats``): how many beats of ``data``, from the first, are the stream's; a
    command's entries are full except perhaps its last.
    """
    if entry_beats < 1 or entry_beats & (entry_beats - 1):
        raise ValueError(f"entry_beats must be a power of two, got {entry_beats!r}")
    if entry_beats == 1:
        return byte_beat_layout(axi_bytes)
    return data.StructLayout({"data": unsigned(8 * axi_bytes * entry_beats), "last": 1,
                              "beats": range(1, entry_beats + 1)})


def _check_config(config: AccelConfig) -> AccelConfig:
    if not isinstance(config, AccelConfig):
        raise TypeError(f"expected an AccelConfig, got {config!r}")
    return config


def read_address_stage(m: Module, axi, config: AccelConfig):
    """The constant AR fields of a read master (ID 0, full-width INCR bursts) and whether
    its AR register can take a burst this cycle (empty, or its burst taken now).

    Returns the ``ar_free`` expression; :func:`issue_read_burst` loads the register.
    """
    m.d.comb += [
        axi.arid.eq(0),
        axi.arsize.eq(exact_log2(config.axi_bytes)),
        axi.arburst.eq(AxiBurst.INCR),
        axi.arcache.eq(AXCACHE),
        axi.arprot.eq(AXPROT),
    ]
    # AR is a register stage: a new burst loads when the previous one has been taken.
    return ~axi.arvalid | axi.arready


def issue_read_burst(m: Module, axi, config: AccelConfig, issue, burst) -> None:
    """Load the AR register with ``burst`` (a :class:`BurstSplitter` payload) when ``issue``;
    drop ``arvalid`` once the slave takes it."""
    with m.If(issue):
        m.d.sync += [
            axi.arvalid.eq(1),
            axi.araddr.eq(Cat(Const(0, exact_log2(config.axi_bytes)), burst.beat_addr)),
            axi.arlen.eq(burst.beats - 1),
        ]
    with m.Elif(axi.arready):
        m.d.sync += axi.arvalid.eq(0)


class BurstSplitter(wiring.Component):
    """Cuts commands into INCR bursts that never cross a ``max_burst_beats`` boundary.

    ``burst.payload`` holds the burst's beat address (byte address ≫ log2(bytes per beat)), its
    length in beats (1…``max_burst_beats``) and whether it is the command's last burst. The
    length comes from a register, computed the cycle after the address or remaining count
    changed, so the engine's ``burst.ready`` (which compares the length with its credits)
    does not sit behind the 25-bit comparison: a burst can go out every other cycle, which
    bursts of two or more beats keep up with. A command is taken once no burst of the
    previous one is left to issue.
    """

    def __init__(self, config: AccelConfig):
        self._config = config
        self._beat_shift = (config.axi_bytes - 1).bit_length()
        self._beat_addr_bits = config.axi_addr_width - self._beat_shift
        self.burst_layout = data.StructLayout({
            "beat_addr": unsigned(self._beat_addr_bits),
            "beats": unsigned((config.max_burst_beats).bit_length()),
            "last": 1,
        })
        super().__init__({
            "cmd": In(stream.Signature(dma_cmd_layout(config))),
            "burst": Out(stream.Signature(self.burst_layout)),
            "active": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        max_beats = self._config.max_burst_beats
        beat_addr = Signal(self._beat_addr_bits)
        remaining = Signal(BEATS_BITS)

        # Beats to the next max_burst_beats-aligned boundary: every 4 KiB boundary is one.
        offset = beat_addr[: (max_beats - 1).bit_length()]
        to_boundary = Signal(range(max_beats + 1))
        m.d.comb += to_boundary.eq(max_beats - offset)
        fits = Signal()
        beats = Signal(range(max_beats + 1))
        # Set in the cycle after beat_addr/remaining changed: fits and beats are stale.
        stale = Signal()
        m.d.sync += [
            fits.eq(remaining <= to_boundary),
            beats.eq(Mux(remaining <= to_boundary, remaining, to_boundary)),
            stale.eq(0),
        ]

        m.d.comb += [
            self.active.eq(remaining != 0),
            self.cmd.ready.eq(remaining == 0),
            self.burst.valid.eq((remaining != 0) & ~stale),
            self.burst.p.beat_addr.eq(beat_addr),
            self.burst.p.beats.eq(beats),
            self.burst.p.last.eq(fits),
        ]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [
                beat_addr.eq(self.cmd.p.addr[self._beat_shift:]),
                remaining.eq(self.cmd.p.beats),
                stale.eq(1),
            ]
        with m.If(self.burst.valid & self.burst.ready):
            m.d.sync += [
                beat_addr.eq(beat_addr + beats),
                remaining.eq(remaining - beats),
                stale.eq(1),
            ]
        return m


class ReadDma(wiring.Component):
    """Reads commands' worth of beats from DDR through the AR/R channels of an AXI4 master.

    Each command {``addr``, ``beats``} yields exactly ``beats`` data beats, in address order,
    the command's last one marked ``last``. Bursts (see the module rules) are issued ahead
    while earlier bursts' data still returns: up to ``max_outstanding`` at once, each only
    when the data queue has room for all of its beats (a credit counter reserves them at
    issue and returns one per beat leaving the queue). ``rready`` therefore stays high: the
    interconnect is never held up by a slow consumer, and no consumer can deadlock the port.
    The queue holds ``max_outstanding × max_burst_beats`` beats (8 KiB in block RAM on the
    ZCU104 preset), enough to cover ``(max_outstanding − 1) · max_burst_beats`` cycles of read
    latency at one beat per cycle.

    Parameters
    ----------
    config : AccelConfig
        ``axi_data_width``, ``axi_addr_width``, ``max_burst_beats``, ``max_outstanding``.

    Attributes
    ----------
    axi : Out(axi_read_signature)
        The AR and R channels (ID 0, INCR, full-width beats).
    cmd : In(stream of dma_cmd_layout)
        Taken while no burst of the previous command is still to be issued.
    data : Out(stream of byte_beat_layout(axi_bytes))
        The beats read, ``last`` on each command's final beat; from a registered queue.
    error : Out(1)
        Sticky: an R beat came back with ``RRESP`` ≠ OKAY (its data is passed on as is).
    clear_error : In(1)
        Clears ``error`` (a response in the same cycle sets it again).
    bytes_read : Out(32)
        Bytes received on R since reset, wrapping.
    busy : Out(1)
        A burst is to be issued or outstanding, or data waits in the queue.
    """

    @staticmethod
    def control_signature(config: AccelConfig) -> wiring.Signature:
        """Every member but ``axi``: what a controller drives and watches."""
        return wiring.Signature({
            "cmd": In(stream.Signature(dma_cmd_layout(config))),
            "data": Out(stream.Signature(byte_beat_layout(config.axi_bytes))),
            "error": Out(1),
            "clear_error": In(1),
            "bytes_read": Out(BYTE_COUNTER_BITS),
            "busy": Out(1),
        })

    def __init__(self, config: AccelConfig):
        self._config = _check_config(config)
        super().__init__({
            "axi": Out(axi_read_signature(config.axi_data_width, config.axi_addr_width)),
            **self.control_signature(config).members,
        })

    @property
    def queue_beats(self) -> int:
        """Depth of the data queue in beats (``max_outstanding × max_burst_beats``)."""
        return self._config.max_outstanding * self._config.max_burst_beats

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        axi = self.axi
        depth = self.queue_beats

        m.submodules.splitter = splitter = BurstSplitter(cfg)
        wiring.connect(m, wiring.flipped(self.cmd), splitter.cmd)
        burst = splitter.burst

        layout = byte_beat_layout(cfg.axi_bytes)
        # One entry more than the credits: the buffered FIFO's memory is then 2^k deep.
        m.submodules.queue = queue = SyncFIFOBuffered(width=layout.size, depth=depth + 1)
        # One bit per outstanding burst, in issue order: does it end its command?
        m.submodules.ends_cmd = ends_cmd = SyncFIFO(width=1, depth=cfg.max_outstanding)

        credits = Signal(range(depth + 1), init=depth)
        outstanding = Signal(range(cfg.max_outstanding + 1))

        ar_free = read_address_stage(m, axi, cfg)
        m.d.comb += burst.ready.eq(ar_free & (credits >= burst.p.beats)
                                   & (outstanding != cfg.max_outstanding))
        issue = burst.valid & burst.ready
        issue_read_burst(m, axi, cfg, issue, burst.p)
        m.d.comb += [
            ends_cmd.w_en.eq(issue),
            ends_cmd.w_data.eq(burst.p.last),
        ]

        r_beat = axi.rvalid & axi.rready
        burst_done = r_beat & axi.rlast
        queued = layout(queue.w_data)
        m.d.comb += [
            # Never low while a reserved beat arrives: credits kept room for it.
            axi.rready.eq(queue.w_rdy),
            queue.w_en.eq(axi.rvalid),
            queued.data.eq(axi.rdata),
            queued.last.eq(axi.rlast & ends_cmd.r_data),
            ends_cmd.r_en.eq(burst_done),
        ]

        m.d.comb += [
            self.data.valid.eq(queue.r_rdy),
            self.data.payload.eq(queue.r_data),
            queue.r_en.eq(self.data.ready),
        ]
        popped = self.data.valid & self.data.ready
        m.d.sync += [
            credits.eq(credits - Mux(issue, burst.p.beats, 0) + popped),
            outstanding.eq(outstanding + issue - burst_done),
        ]
        m.d.comb += self.busy.eq(splitter.active | (outstanding != 0) | (queue.level != 0))
        with m.If(r_beat):
            m.d.sync += self.bytes_read.eq(self.bytes_read + cfg.axi_bytes)
        with m.If(self.clear_error):
            m.d.sync += self.error.eq(0)
        with m.If(r_beat & (axi.rresp != AxiResp.OKAY)):
            m.d.sync += self.error.eq(1)
        return m


class WriteDma(wiring.Component):
    """Writes commands' worth of beats to DDR through the AW/W/B channels of an AXI4 master.

    Each command {``addr``, ``beats``} takes exactly ``beats`` beats from ``data`` and writes
    them with full strobes, in bursts as the module rules describe. Address bursts run ahead
    of their data (AXI allows it): up to ``max_outstanding`` bursts may be issued whose B
    response has not come back. W beats follow the issued bursts' lengths; ``wlast`` marks
    each burst's final beat.

    Parameters
    ----------
    config : AccelConfig
        ``axi_data_width``, ``axi_addr_width``, ``max_burst_beats``, ``max_outstanding``.

    Attributes
    ----------
    axi : Out(axi_write_signature)
        The AW, W and B channels (ID 0, INCR, full-width beats, ``bready`` always high).
    cmd : In(stream of dma_cmd_layout)
        Taken while no burst of the previous command is still to be issued.
    data : In(stream of byte_beat_layout(axi_bytes))
        The beats to write. ``last`` is ignored (the commands' beat counts delimit the
        transfers); it is there so that a :class:`ReadDma` or :class:`StreamResize` output
        connects directly.
    done : Out(1)
        A one-cycle pulse when the B response of a command's last burst arrives: every byte
        of that command (and of all before it) has been written.
    pending : Out(range(max_outstanding + 2))
        Commands of one or more beats taken whose ``done`` has not come yet. Zero (and
        ``busy`` low) means every write issued so far is complete.
    error : Out(1)
        Sticky: a B response other than OKAY arrived.
    clear_error : In(1)
        Clears ``error`` (a response in the same cycle sets it again).
    bytes_written : Out(32)
        Bytes sent on W since reset, wrapping.
    busy : Out(1)
        ``pending != 0``.
    """

    @staticmethod
    def control_signature(config: AccelConfig) -> wiring.Signature:
        """Every member but ``axi``: what a controller drives and watches."""
        return wiring.Signature({
            "cmd": In(stream.Signature(dma_cmd_layout(config))),
            "data": In(stream.Signature(byte_beat_layout(config.axi_bytes))),
            "done": Out(1),
            "pending": Out(range(config.max_outstanding + 2)),
            "error": Out(1),
            "clear_error": In(1),
            "bytes_written": Out(BYTE_COUNTER_BITS),
            "busy": Out(1),
        })

    def __init__(self, config: AccelConfig):
        self._config = _check_config(config)
        super().__init__({
            "axi": Out(axi_write_signature(config.axi_data_width, config.axi_addr_width)),
            **self.control_signature(config).members,
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        axi = self.axi
        beat_shift = (cfg.axi_bytes - 1).bit_length()

        m.submodules.splitter = splitter = BurstSplitter(cfg)
        wiring.connect(m, wiring.flipped(self.cmd), splitter.cmd)
        burst = splitter.burst

        # Per issued burst, in order: its AWLEN for the W side, and whether it ends its
        # command for the B side. At most max_outstanding are issued and unanswered.
        m.submodules.w_lengths = w_lengths = SyncFIFO(width=8, depth=cfg.max_outstanding)
        m.submodules.ends_cmd = ends_cmd = SyncFIFO(width=1, depth=cfg.max_outstanding)
        outstanding = Signal(range(cfg.max_outstanding + 1))

        m.d.comb += [
            axi.awid.eq(0),
            axi.awsize.eq(beat_shift),
            axi.awburst.eq(AxiBurst.INCR),
            axi.awcache.eq(AXCACHE),
            axi.awprot.eq(AXPROT),
            axi.wstrb.eq((1 << cfg.axi_bytes) - 1),
            axi.bready.eq(1),
        ]
        aw_free = ~axi.awvalid | axi.awready
        m.d.comb += burst.ready.eq(aw_free & (outstanding != cfg.max_outstanding))
        issue = burst.valid & burst.ready
        with m.If(issue):
            m.d.sync += [
                axi.awvalid.eq(1),
                axi.awaddr.eq(Cat(Const(0, beat_shift), burst.p.beat_addr)),
                axi.awlen.eq(burst.p.beats - 1),
            ]
        with m.Elif(axi.awready):
            m.d.sync += axi.awvalid.eq(0)
        m.d.comb += [
            w_lengths.w_en.eq(issue),
            w_lengths.w_data.eq(burst.p.beats - 1),
            ends_cmd.w_en.eq(issue),
            ends_cmd.w_data.eq(burst.p.last),
        ]

        # W is a register stage too; a beat enters it once its burst has been issued.
        beat_in_burst = Signal(8)
        w_free = ~axi.wvalid | axi.wready
        m.d.comb += self.data.ready.eq(w_lengths.r_rdy & w_free)
        take = self.data.valid & self.data.ready
        closes_burst = beat_in_burst == w_lengths.r_data
        with m.If(take):
            m.d.sync += [
                axi.wvalid.eq(1),
                axi.wdata.eq(self.data.p.data),
                axi.wlast.eq(closes_burst),
                beat_in_burst.eq(Mux(closes_burst, 0, beat_in_burst + 1)),
            ]
            m.d.comb += w_lengths.r_en.eq(closes_burst)
        with m.Elif(axi.wready):
            m.d.sync += axi.wvalid.eq(0)

        response = axi.bvalid & axi.bready
        command_done = response & ends_cmd.r_data
        m.d.comb += ends_cmd.r_en.eq(response)
        accepted = self.cmd.valid & self.cmd.ready & (self.cmd.p.beats != 0)
        m.d.sync += [
            outstanding.eq(outstanding + issue - response),
            self.pending.eq(self.pending + accepted - command_done),
            self.done.eq(command_done),
        ]
        m.d.comb += self.busy.eq(self.pending != 0)
        with m.If(axi.wvalid & axi.wready):
            m.d.sync += self.bytes_written.eq(self.bytes_written + cfg.axi_bytes)
        with m.If(self.clear_error):
            m.d.sync += self.error.eq(0)
        with m.If(response & (axi.bresp != AxiResp.OKAY)):
            m.d.sync += self.error.eq(1)
        return m


class AxiDmaPort(wiring.Component):
    """A :class:`ReadDma` and a :class:`WriteDma` sharing one AXI4 master port.

    Reads and writes are independent (AXI4's read and write channels are), so weights can
    stream in while results stream out.

    Parameters
    ----------
    config : AccelConfig
        As for the two engines.

    Attributes
    ----------
    m_axi : Out(axi_master_signature)
        The port (``m_axi__araddr`` … in Verilog).
    read : Out(ReadDma.control_signature)
        The read engine's ``cmd``, ``data``, ``error``, ``clear_error``, ``bytes_read``,
        ``busy``.
    write : Out(WriteDma.control_signature)
        The write engine's ``cmd``, ``data``, ``done``, ``pending``, ``error``,
        ``clear_error``, ``bytes_written``, ``busy``.
    """

    def __init__(self, config: AccelConfig):
        self._config = _check_config(config)
        super().__init__({
            "m_axi": Out(axi_master_signature(config.axi_data_width, config.axi_addr_width)),
            "read": Out(ReadDma.control_signature(config)),
            "write": Out(WriteDma.control_signature(config)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        m.submodules.read_dma = read_dma = ReadDma(cfg)
        m.submodules.write_dma = write_dma = WriteDma(cfg)
        wiring.connect(m, wiring.flipped(axi_read_part(self.m_axi)), read_dma.axi)
        wiring.connect(m, wiring.flipped(axi_write_part(self.m_axi)), write_dma.axi)
        wiring.connect(m, wiring.flipped(self.read),
                       _Part(ReadDma.control_signature(cfg), read_dma))
        wiring.connect(m, wiring.flipped(self.write),
                       _Part(WriteDma.control_signature(cfg), write_dma))
        return m


class StreamResize(wiring.Component):
    """Converts a byte stream between two power-of-two beat widths, ``last`` passed along.

    Bytes keep their order, little-endian within a beat as in DDR: up-sizing packs
    ``out_bytes / in_bytes`` input beats into one output beat, the first input beat in the
    low bytes; down-sizing splits an input beat into ``in_bytes / out_bytes`` output beats,
    low bytes first. One beat per cycle on the narrower side, full back-pressure; the output
    is a register. Equal widths pass straight through.

    ``last``: down-sizing marks the final piece of an input beat that had ``last``;
    up-sizing marks the output beat completed by an input beat with ``last``. An input beat
    with ``last`` that does not complete an output beat closes it early, the missing upper
    bytes zero (the accelerator always sends whole output beats; this only keeps a ragged
    stream from merging into the next transfer).

    Parameters
    ----------
    in_bytes, out_bytes : int
        Beat widths in bytes, powers of two.

    Attributes
    ----------
    i : In(stream of byte_beat_layout(in_bytes))
    o : Out(stream of byte_beat_layout(out_bytes))
    """

    def __init__(self, in_bytes: int, out_bytes: int):
        for name, value in (("in_bytes", in_bytes), ("out_bytes", out_bytes)):
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value!r}")
        self.in_bytes = in_bytes
        self.out_bytes = out_bytes
        super().__init__({
            "i": In(stream.Signature(byte_beat_layout(in_bytes))),
            "o": Out(stream.Signature(byte_beat_layout(out_bytes))),
        })

    def elaborate(self, platform):
        m = Module()
        if self.in_bytes == self.out_bytes:
            wiring.connect(m, wiring.flipped(self.i), wiring.flipped(self.o))
        elif self.in_bytes < self.out_bytes:
            self._pack(m)
        else:
            self._split(m)
        return m

    def _pack(self, m: Module) -> None:
        ratio = self.out_bytes // self.in_bytes
        width = 8 * self.in_bytes
        # Pieces 0 … ratio−2 of the beat being assembled; the last piece goes straight from
        # the input into the output register.
        pieces = [Signal(width, name=f"piece{k}") for k in range(ratio - 1)]
        index = Signal(range(ratio))
        i, o = self.i, self.o
        completes = (index == ratio - 1) | i.p.last
        m.d.comb += i.ready.eq(~completes | ~o.valid | o.ready)
        with m.If(o.valid & o.ready):
            m.d.sync += o.valid.eq(0)
        with m.If(i.valid & i.ready):
            with m.If(completes):
                # Piece k: already held (k < index), this input (k == index), or zero
                # (k > index: only after an early last).
                out_pieces = [Mux(index == k, i.p.data, Mux(index > k, piece, 0))
                              for k, piece in enumerate(pieces)]
                out_pieces.append(Mux(index == ratio - 1, i.p.data, 0))
                m.d.sync += [
                    o.valid.eq(1),
                    o.p.data.eq(Cat(*out_pieces)),
                    o.p.last.eq(i.p.last),
                    index.eq(0),
                ]
            with m.Else():
                m.d.sync += index.eq(index + 1)
                for k, piece in enumerate(pieces):
                    with m.If(index == k):
                        m.d.sync += piece.eq(i.p.data)

    def _split(self, m: Module) -> None:
        ratio = self.in_bytes // self.out_bytes
        width = 8 * self.out_bytes
        held = Signal(8 * self.in_bytes)
        held_last = Signal()
        index = Signal(range(ratio))
        i, o = self.i, self.o
        final_piece = index == ratio - 1
        m.d.comb += [
            o.p.data.eq(held[:width]),
            o.p.last.eq(held_last & final_piece),
            i.ready.eq(~o.valid | (o.ready & final_piece)),
        ]
        with m.If(o.valid & o.ready):
            # Shifting the held beat down puts the next piece in the low bytes: no wide mux.
            m.d.sync += [held.eq(held[width:]), index.eq(index + 1)]
            with m.If(final_piece):
                m.d.sync += [o.valid.eq(0), index.eq(0)]
        with m.If(i.valid & i.ready):
            m.d.sync += [o.valid.eq(1), held.eq(i.p.data), held_last.eq(i.p.last),
                         index.eq(0)]
