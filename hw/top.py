"""The accelerator top: the engine, the register file and the DMA on one AXI4 master port.

:class:`AcceleratorTop` is the design that goes to Vivado: the AXI4-Lite register file
(:class:`~m3vit.hw.regfile.ControlRegisters`, ``docs/registers.md``), the
:class:`~m3vit.hw.engine.Engine` (instruction fetch, checks, controller, the activation
buffer and the compute units), and a read and a write DMA engine sharing one AXI4 master
port (:class:`~m3vit.hw.axi.AxiDmaPort`)::

                 ┌──────────────┐  ctrl   ┌─────────────────────────────┐
    s_axil  ────►│ registers    │◄───────►│ engine                      │
    irq     ◄────│ (regfile)    │         │  fetch · checks · controller │
                 └──────▲───────┘         │  router · datapath · units  │
                        │ DMA counters    └──────┬──────────────▲───────┘
                 ┌──────┴───────────────────────▼──────────────┴───────┐
    m_axi   ◄───►│ dma: read engine (rd_cmd, rd_data), write engine    │
                 │      (wr_cmd, wr_data)                               │
                 └──────────────────────────────────────────────────────┘
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .axi import AxiDmaPort
from .config import AccelConfig
from .engine import Engine
from .isa import check_top_config
from .regfile import AxiLiteSignature, ControlRegisters

__all__ = ["AcceleratorTop", "master_ports"]


def master_ports(config: AccelConfig) -> int:
    """AXI4 master ports of :class:`AcceleratorTop` for ``config`` (each on its own HP port).

    One today: the read and the write DMA share ``m_axi``. ``config.n_master_ports`` is what
    the configuration asks for; the top does not build more ports yet.
    """
    return 1


class AcceleratorTop(wiring.Component):
    """The generated accelerator: register file, engine and DMA on one AXI4 master port.

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
    irq : Out(1)
        High while ``STATUS.DONE`` or ``STATUS.ERROR`` would read 1 since the last start
        (a level the block design can route to the PS; the runtime polls).
    """

    def __init__(self, config: AccelConfig):
        self.config = check_top_config(config)
        self._dma = AxiDmaPort(config)
        super().__init__({
            "s_axil": In(AxiLiteSignature()),
            "m_axi": Out(self._dma.m_axi.signature),
            "irq": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        regs = m.submodules.registers = ControlRegisters(self.config)
        engine = m.submodules.engine = Engine(self.config)
        dma = m.submodules.dma = self._dma
        wiring.connect(m, wiring.flipped(self.s_axil), regs.s_axil)
        wiring.connect(m, wiring.flipped(self.m_axi), dma.m_axi)
        wiring.connect(m, engine.rd_cmd, dma.read.cmd)
        wiring.connect(m, dma.read.data, engine.rd_data)
        wiring.connect(m, engine.wr_cmd, dma.write.cmd)
        wiring.connect(m, engine.wr_data, dma.write.data)
        wiring.connect(m, engine.ctrl, regs.engine)
        m.d.comb += [
            engine.wr_idle.eq(~dma.write.busy),
            engine.dma_error.eq(dma.read.error | dma.write.error),
            dma.read.clear_error.eq(engine.dma_error_clear),
            dma.write.clear_error.eq(engine.dma_error_clear),
            regs.dma_counters.dma_read_bytes.eq(dma.read.bytes_read),
            regs.dma_counters.dma_write_bytes.eq(dma.write.bytes_written),
        ]
        done_or_error = Signal()
        with m.If(engine.ctrl.start):
            m.d.sync += done_or_error.eq(0)
        with m.Elif(engine.ctrl.done | engine.ctrl.error):
            m.d.sync += done_or_error.eq(1)
        m.d.comb += self.irq.eq(done_or_error)
        return m
