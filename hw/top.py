"""The accelerator top: the engine, the register file and the DMA on its AXI4 master ports.

:class:`AcceleratorTop` is the design that goes to Vivado: the AXI4-Lite register file
(:class:`~m3vit.hw.regfile.ControlRegisters`, ``docs/registers.md``), the
:class:`~m3vit.hw.engine.Engine` (instruction fetch, checks, controller, the activation
buffer and the compute units), and the DMA on ``n_master_ports`` AXI4 masters, each on its
own HP port: with one, a read and a write engine share ``m_axi``
(:class:`~m3vit.hw.axi.AxiDmaPort`); with more, reads are striped across every port
(:class:`~m3vit.hw.striped_read.StripedReadDma`) and writes use ``m_axi``::

                 ┌──────────────┐  ctrl   ┌─────────────────────────────┐
    s_axil  ────►│ registers    │◄───────►│ engine                      │
    irq     ◄────│ (regfile)    │         │  fetch · checks · controller │
                 └──────▲───────┘         │  router · datapath · units  │
                        │ DMA counters    └──────┬──────────────▲───────┘
                 ┌──────┴───────────────────────▼──────────────┴───────┐
    m_axi   ◄───►│ dma: read engine (rd_cmd, rd_data), write engine    │
    m_axi1… ◄────│      (wr_cmd, wr_data; on m_axi only)               │
                 └──────────────────────────────────────────────────────┘
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .axi import AxiDmaPort, WriteDma, axi_master_signature, axi_read_part, axi_write_part
from .config import AccelConfig
from .engine import Engine
from .isa import check_top_config, intake_beats
from .regfile import AxiLiteSignature, ControlRegisters
from .striped_read import StripedReadDma, least_queue_entries

__all__ = ["READ_QUEUE_BYTES", "AcceleratorTop", "master_names"]

#: Bytes each master port's read queue holds with several ports: the DDR reads up to this
#: far ahead of the engine, so while the PE array is busy with an expert that has many
#: tokens the ports fetch the next GEMM's weights (64 KiB: a block RAM FIFO per port).
READ_QUEUE_BYTES = 64 << 10


def master_names(config: AccelConfig) -> tuple[str, ...]:
    """The top's AXI4 master members, master 0 first: ``m_axi``, ``m_axi1``, …

    ``config.n_master_ports`` of them, each on its own HP port
    (:func:`m3vit.hw.hp_ports.hp_ports`): ``m_axi`` reads and does all writes, the others read.
    """
    return ("m_axi", *(f"m_axi{p}" for p in range(1, config.n_master_ports)))


class AcceleratorTop(wiring.Component):
    """The generated accelerator: register file, engine and DMA on its AXI4 master ports.

    Parameters
    ----------
    config : AccelConfig
        The configuration (checked by :func:`~m3vit.hw.isa.check_top_config`).

    Attributes
    ----------
    s_axil : In(AxiLiteSignature())
        Control and status (``docs/registers.md``), from the host.
    m_axi : Out(axi_master_signature)
        DDR: program, weights, parameters, tables and activations in; results out.
    m_axi1, m_axi2, … : Out(axi_master_signature)
        With ``n_master_ports`` > 1: more read bursts of the same streams (their write
        channels stay idle).
    irq : Out(1)
        High while ``STATUS.DONE`` or ``STATUS.ERROR`` would read 1 since the last start
        (a level the block design can route to the PS; the runtime polls).
    """

    def __init__(self, config: AccelConfig):
        self.config = check_top_config(config)
        master = axi_master_signature(config.axi_data_width, config.axi_addr_width)
        super().__init__({
            "s_axil": In(AxiLiteSignature()),
            **{name: Out(master) for name in master_names(config)},
            "irq": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        regs = m.submodules.registers = ControlRegisters(self.config)
        engine = m.submodules.engine = Engine(self.config)
        wiring.connect(m, wiring.flipped(self.s_axil), regs.s_axil)
        read, write = self._dma(m)
        wiring.connect(m, engine.rd_cmd, read.cmd)
        wiring.connect(m, read.data, engine.rd_data)
        wiring.connect(m, engine.wr_cmd, write.cmd)
        wiring.connect(m, engine.wr_data, write.data)
        wiring.connect(m, engine.ctrl, regs.engine)
        m.d.comb += [
            engine.wr_idle.eq(~write.busy),
            engine.dma_error.eq(read.error | write.error),
            read.clear_error.eq(engine.dma_error_clear),
            write.clear_error.eq(engine.dma_error_clear),
            regs.dma_counters.dma_read_bytes.eq(read.bytes_read),
            regs.dma_counters.dma_write_bytes.eq(write.bytes_written),
            engine.write_bytes.eq(write.bytes_written),
        ]
        if isinstance(read, StripedReadDma):
            m.d.comb += [engine.port_read_bytes[p].eq(read.port_bytes_read[p])
                         for p in range(read.n_ports)]
        else:   # one port: its read engine's counter is the port's
            m.d.comb += engine.port_read_bytes[0].eq(read.bytes_read)
        done_or_error = Signal()
        with m.If(engine.ctrl.start):
            m.d.sync += done_or_error.eq(0)
        with m.Elif(engine.ctrl.done | engine.ctrl.error):
            m.d.sync += done_or_error.eq(1)
        m.d.comb += self.irq.eq(done_or_error)
        return m

    def _dma(self, m: Module):
        """The read and write DMA on the master ports; returns (read, write) engines.

        One port: :class:`~m3vit.hw.axi.AxiDmaPort` (reads and writes share ``m_axi``).
        Several: a :class:`~m3vit.hw.striped_read.StripedReadDma` reads through every port,
        bursts striped across them, and hands the engine an entry of
        :func:`~m3vit.hw.isa.intake_beats` beats a cycle (256 bytes on the ZCU104); the
        write DMA uses ``m_axi`` alone (results are a few KiB an image); the other ports'
        write channels are idle.
        """
        cfg = self.config
        names = master_names(cfg)
        if len(names) == 1:
            dma = m.submodules.dma = AxiDmaPort(cfg)
            wiring.connect(m, wiring.flipped(self.m_axi), dma.m_axi)
            return dma.read, dma.write
        beats = intake_beats(cfg)
        read = m.submodules.read_dma = StripedReadDma(
            cfg, len(names), entry_beats=beats,
            queue_entries=max(READ_QUEUE_BYTES // (beats * cfg.axi_bytes),
                              least_queue_entries(cfg, beats)))
        write = m.submodules.write_dma = WriteDma(cfg)
        for index, name in enumerate(names):
            port = getattr(self, name)
            wiring.connect(m, wiring.flipped(axi_read_part(port)), read.port(index))
            if index == 0:
                wiring.connect(m, wiring.flipped(axi_write_part(port)), write.axi)
            else:
                m.d.comb += port.bready.eq(1)  # never written: nothing ever answers
        return read, write
