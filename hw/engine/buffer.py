"""The activation buffer's port hardware: address walks, the gather stage, read ports.

Every tensor walk of the ISA (slice-major rows, strided heads, transposed tiles) is one
:class:`AddressGenerator` loaded with a :func:`walk_signature` command: a base, three counts
and three strides. Port A's addresses may go through the :class:`GatherStage` (the MoE
dispatcher's tables), and each read port is a :class:`BufferReadPort`: a one-cycle memory
read into a short queue, issued only when the queue has room.
"""

from amaranth.hdl import Cat, Module, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

__all__ = [
    "AddressGenerator",
    "BufferReadPort",
    "GatherMode",
    "GatherStage",
    "address_layout",
    "gathered_layout",
    "walk_signature",
]


def walk_signature(addr_bits: int, count_bits: int) -> wiring.Signature:
    """A walk command for an :class:`AddressGenerator`, seen from the controller.

    ``start`` (one cycle) loads ``base``, ``count`` (three loop counts, outer first) and
    ``stride`` (three strides).
    """
    return wiring.Signature({
        "start": Out(1),
        "base": Out(addr_bits),
        "count": Out(data.ArrayLayout(unsigned(count_bits), 3)),
        "stride": Out(data.ArrayLayout(unsigned(addr_bits), 3)),
    })


def address_layout(addr_bits: int, count_bits: int) -> data.StructLayout:
    """An :class:`AddressGenerator`'s beat: the address, ``last``, for the
    :class:`GatherStage` ``outer`` (the address without its innermost loop) and the
    counters ``i1``, ``i2``, and for the write port the outer counter ``i0`` and the middle
    loop's count ``n1`` (a GEMM's N-tile and tokens: which result words hold no key)."""
    return data.StructLayout({"addr": addr_bits, "last": 1, "outer": addr_bits,
                              "i1": count_bits, "i2": count_bits, "i0": count_bits,
                              "n1": count_bits})


def gathered_layout(addr_bits: int) -> data.StructLayout:
    """A :class:`GatherStage`'s beat: the buffer address, ``last``, and ``tag`` (the
    gathered row's router score, 15 bits)."""
    return data.StructLayout({"addr": addr_bits, "last": 1, "tag": 15})


class AddressGenerator(wiring.Component):
    """Addresses ``base + i0·s0 + i1·s1 + i2·s2`` for i0 < n0, i1 < n1, i2 < n2 (i2 fastest).

    Parameters
    ----------
    addr_bits, count_bits : int
        Widths of the addresses and of the loop counters.

    Attributes
    ----------
    walk : In(walk_signature(addr_bits, count_bits))
        Loaded by ``walk.start`` (one cycle) with ``base``, ``count`` and ``stride``.
        Counts of 0 are not allowed (the controller checks them).
    addr : Out(stream.Signature(address_layout(addr_bits, count_bits)))
        The ``n0·n1·n2`` addresses, one per accepted beat, ``last`` on the final one. Each
        beat also carries ``outer`` = ``base + i0·s0 + i1·s1`` and the counters ``i1``,
        ``i2``, from which :class:`GatherStage` forms indirect addresses.

    Notes
    -----
    Only adders: the running address is kept per loop level.
    """

    def __init__(self, addr_bits: int, count_bits: int):
        self._addr_bits = addr_bits
        self._count_bits = count_bits
        super().__init__({
            "walk": In(walk_signature(addr_bits, count_bits)),
            "addr": Out(stream.Signature(address_layout(addr_bits, count_bits))),
        })

    def elaborate(self, platform):
        m = Module()
        walk = self.walk
        n = Signal(data.ArrayLayout(unsigned(self._count_bits), 3))
        s = Signal(data.ArrayLayout(unsigned(self._addr_bits), 3))
        i = [Signal(self._count_bits, name=f"i{k}") for k in range(3)]
        # a0: start of the current outer iteration, a1: of the current middle one, a2: address.
        a0, a1, a2 = (Signal(self._addr_bits, name=f"a{k}") for k in range(3))
        active = Signal()
        end = [i[k] == n[k] - 1 for k in range(3)]
        m.d.comb += [
            self.addr.valid.eq(active),
            self.addr.payload.addr.eq(a2),
            self.addr.payload.last.eq(end[0] & end[1] & end[2]),
            self.addr.payload.outer.eq(a1),
            self.addr.payload.i1.eq(i[1]),
            self.addr.payload.i2.eq(i[2]),
            self.addr.payload.i0.eq(i[0]),
            self.addr.payload.n1.eq(n[1]),
        ]
        with m.If(walk.start):
            m.d.sync += [n.eq(walk.count), s.eq(walk.stride), a0.eq(walk.base),
                         a1.eq(walk.base), a2.eq(walk.base), active.eq(1)]
            m.d.sync += [counter.eq(0) for counter in i]
        with m.Elif(self.addr.valid & self.addr.ready):
            with m.If(~end[2]):
                m.d.sync += [i[2].eq(i[2] + 1), a2.eq(a2 + s[2])]
            with m.Elif(~end[1]):
                m.d.sync += [i[2].eq(0), i[1].eq(i[1] + 1), a1.eq(a1 + s[1]),
                             a2.eq(a1 + s[1])]
            with m.Elif(~end[0]):
                m.d.sync += [i[2].eq(0), i[1].eq(0), i[0].eq(i[0] + 1), a0.eq(a0 + s[0]),
                             a1.eq(a0 + s[0]), a2.eq(a0 + s[0])]
            with m.Else():
                m.d.sync += active.eq(0)
        return m


class GatherMode(enum.Enum, shape=2):
    """What :class:`GatherStage` does to the addresses passing through it."""

    #: addresses pass unchanged (combinationally)
    NONE = 0
    #: ``outer + queue[offset + i2]``: an expert's tokens (GEMM ``src_rows = GATHER``)
    QUEUE = 1
    #: ``outer + slot[i1][i2].pos``, tagged with ``slot[i1][i2].score`` (``COMBINE``)
    SLOT = 2


class GatherStage(wiring.Component):
    """Indirect buffer addresses through the dispatcher's tables, one per cycle.

    Sits between an :class:`AddressGenerator` and a buffer read port. In mode ``NONE`` it is
    a wire; otherwise each beat reads one table entry (the dispatcher's read ports answer
    one cycle later and hold their data while not enabled) into a one-beat pipeline stage,
    so throughput stays one address per cycle and the table read is registered.

    Parameters
    ----------
    addr_bits, count_bits : int
        Widths of the generator's addresses and counters.
    slot_shape : ArrayLayout
        The dispatcher's ``slot`` output (an array of ``expert``/``score``/``pos`` structs).
    queue_bits, token_bits : int
        Widths of the queue address and of a queue entry.

    Attributes
    ----------
    mode : In(GatherMode)
        What to do with the addresses.
    offset : In(queue_bits)
        The queue position of row 0 (mode ``QUEUE``).
    i : In(stream.Signature(address_layout(addr_bits, count_bits)))
        The generator's addresses.
    o : Out(stream.Signature(gathered_layout(addr_bits)))
        Buffer addresses; ``tag`` is the slot's score (mode ``SLOT``).
    queue_addr, queue_en, queue_token, slot_addr, slot_en, slot
        The dispatcher's queue and slot read ports (:class:`~m3vit.hw.moe.Dispatcher`).
    """

    def __init__(self, addr_bits: int, count_bits: int, slot_shape, queue_bits: int,
                 token_bits: int):
        self._count_bits = count_bits
        self._slots = slot_shape.length
        super().__init__({
            "mode": In(GatherMode),
            "offset": In(queue_bits),
            "i": In(stream.Signature(address_layout(addr_bits, count_bits))),
            "o": Out(stream.Signature(gathered_layout(addr_bits))),
            "queue_addr": Out(queue_bits),
            "queue_en": Out(1),
            "queue_token": In(token_bits),
            "slot_addr": Out(count_bits),
            "slot_en": Out(1),
            "slot": In(slot_shape),
        })

    def elaborate(self, platform):
        m = Module()
        held = Signal()                      # a beat is in the stage
        outer = Signal.like(self.i.payload.outer)
        last = Signal()
        choice = Signal(range(self._slots))
        accept = self.i.valid & (~held | self.o.ready)
        m.d.comb += [
            self.queue_addr.eq(self.offset + self.i.payload.i2),
            self.slot_addr.eq(self.i.payload.i1),
        ]
        with m.If(self.mode == GatherMode.NONE):
            m.d.comb += [self.o.valid.eq(self.i.valid), self.i.ready.eq(self.o.ready),
                         self.o.payload.addr.eq(self.i.payload.addr),
                         self.o.payload.last.eq(self.i.payload.last)]
        with m.Else():
            m.d.comb += [
                self.i.ready.eq(~held | self.o.ready),
                self.queue_en.eq(accept & (self.mode == GatherMode.QUEUE)),
                self.slot_en.eq(accept & (self.mode == GatherMode.SLOT)),
                self.o.valid.eq(held),
                self.o.payload.last.eq(last),
            ]
            slot = self.slot[choice]
            with m.If(self.mode == GatherMode.QUEUE):
                m.d.comb += self.o.payload.addr.eq(outer + self.queue_token)
            with m.Else():
                m.d.comb += [self.o.payload.addr.eq(outer + slot.pos),
                             self.o.payload.tag.eq(slot.score)]
            with m.If(accept):
                m.d.sync += [held.eq(1), outer.eq(self.i.payload.outer),
                             last.eq(self.i.payload.last), choice.eq(self.i.payload.i2)]
            with m.Elif(self.o.ready):
                m.d.sync += held.eq(0)
        return m


class BufferReadPort(wiring.Component):
    """A read port of the activation buffer driven by an address stream, back-pressured.

    The memory answers one cycle after the address; a read is issued only when the queue
    behind it has room for its word, so the port never needs a clock enable and
    back-pressure never reaches the memory.

    Parameters
    ----------
    port : amaranth.lib.memory.ReadPort
        The memory's read port (created by the buffer's owner; this component drives it).
    addr_layout : StructLayout
        The address stream's payload: ``addr``, ``last`` and, with ``tag_bits``, ``tag``.
    tag_bits : int, optional
        Bits of a value that travels with the word (the gathered row's score).

    Attributes
    ----------
    addr : In(stream.Signature(addr_layout))
        Buffer word addresses.
    data : Out(stream.Signature(StructLayout({"word", "last"[, "tag"]})))
        The words read, in order, with their address beat's ``last`` (and ``tag``), from a
        4-entry queue.
    """

    def __init__(self, port, addr_layout: data.StructLayout, tag_bits: int = 0):
        self._port = port
        self._tag_bits = tag_bits
        fields = {"word": len(port.data), "last": 1}
        if tag_bits:
            fields["tag"] = tag_bits
        super().__init__({
            "addr": In(stream.Signature(addr_layout)),
            "data": Out(stream.Signature(data.StructLayout(fields))),
        })

    def elaborate(self, platform):
        m = Module()
        port, tag_bits = self._port, self._tag_bits
        width = len(port.data)
        queue = m.submodules.queue = SyncFIFOBuffered(width=width + 1 + tag_bits, depth=5)
        in_flight = Signal()
        last_in_flight = Signal()
        tag_in_flight = Signal(max(tag_bits, 1))
        room = queue.level + in_flight < 4
        issue = self.addr.valid & room
        m.d.comb += [
            self.addr.ready.eq(room),
            port.addr.eq(self.addr.payload.addr),
            port.en.eq(issue),
            queue.w_en.eq(in_flight),
            queue.w_data.eq(Cat(port.data, last_in_flight, tag_in_flight[:tag_bits])),
        ]
        m.d.sync += [in_flight.eq(issue), last_in_flight.eq(self.addr.payload.last)]
        if tag_bits:
            m.d.sync += tag_in_flight.eq(self.addr.payload.tag)
        m.d.comb += [
            self.data.valid.eq(queue.r_rdy),
            self.data.payload.eq(queue.r_data),
            queue.r_en.eq(self.data.ready),
        ]
        return m
