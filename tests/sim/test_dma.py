# amaranth: UnusedElaboratable=no
"""DDR access (:mod:`m3vit.hw.axi`): cocotb + Verilator bench against cocotbext-axi's AxiRam,
ZCU104 elaboration and lint, and the signatures' port names.

One small top, :class:`DmaBenchTop` (an :class:`~m3vit.hw.axi.AxiDmaPort` and four
:class:`~m3vit.hw.axi.StreamResize`), is built once for the CI configuration (128-bit,
16-beat bursts, 4 outstanding) and runs every test of ``tests/sim/dma/``. The ZCU104 engines
(64-beat bursts, 8 outstanding, 40-bit addresses) are elaborated and linted only.
"""

from pathlib import Path

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from m3vit.hw.axi import (
    AxiDmaPort,
    ReadDma,
    StreamResize,
    WriteDma,
    axi_master_signature,
    byte_beat_layout,
)
from m3vit.hw.config import CI, ZCU104, AccelConfig
from m3vit.hw.flow.generate import signature_ports, to_verilog, write_if_changed
from m3vit.sim.verilator import lint

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent / "dma"
BUILD_DIR = REPO_ROOT / "build" / "sim" / "dma"
TOP = "dma_bench"
BENCH_MODULE = "test_dma_engines"
#: Must match dma_tb.RESIZERS (the bench cannot import this module: pytest's copy differs).
RESIZERS = {"up4": (4, 16), "up2": (16, 32), "down2": (16, 8), "down4": (16, 4)}
#: reads, writes, both at once (2 flows each); 2 throughputs; 2 errors; 4 resizers × 2 flows.
EXPECTED_TESTS = 3 * 2 + 2 + 2 + len(RESIZERS) * 2


class DmaBenchTop(wiring.Component):
    """An AXI DMA port and four stream width converters side by side.

    Ports: ``m_axi__*``, ``read__*``, ``write__*`` (the :class:`AxiDmaPort`) and
    ``<name>__i__*`` / ``<name>__o__*`` for each converter in :data:`RESIZERS`. Exists so
    that one Verilator build serves every DMA bench test.

    Parameters
    ----------
    config : AccelConfig
        Configuration of the DMA port.
    """

    def __init__(self, config: AccelConfig):
        self._port = AxiDmaPort(config)
        self._resizers = {name: StreamResize(*widths) for name, widths in RESIZERS.items()}
        super().__init__({
            **self._port.signature.members,
            **{name: Out(resizer.signature) for name, resizer in self._resizers.items()},
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.port = self._port
        wiring.connect(m, wiring.flipped(self.m_axi), self._port.m_axi)
        wiring.connect(m, wiring.flipped(self.read), self._port.read)
        wiring.connect(m, wiring.flipped(self.write), self._port.write)
        for name, resizer in self._resizers.items():
            m.submodules[name] = resizer
            wiring.connect(m, wiring.flipped(getattr(self, name)), resizer)
        return m


def bench_verilog(config: AccelConfig) -> Path:
    """The bench top's Verilog under ``BUILD_DIR``, rewritten only when it changes."""
    path = BUILD_DIR / f"{TOP}.v"
    write_if_changed(path, to_verilog(DmaBenchTop(config), TOP))
    return path


def test_ports_carry_the_axi_names():
    ports = signature_ports(AxiDmaPort(ZCU104))

    axi = {name.removeprefix("m_axi__") for name in ports if name.startswith("m_axi__")}
    assert axi == set(axi_master_signature(128, 40).members)
    assert {"araddr", "arlen", "rdata", "rlast", "awaddr", "wdata", "wstrb", "bresp"} <= axi
    assert len(ports["m_axi__araddr"][0]) == 40 and len(ports["m_axi__rdata"][0]) == 128
    assert len(ports["m_axi__wstrb"][0]) == 16
    assert {"read__cmd__payload", "read__data__payload", "read__error", "read__bytes_read",
            "write__cmd__payload", "write__data__payload", "write__done", "write__pending",
            "write__error", "write__bytes_written"} <= set(ports)


def test_payload_layouts():
    cmd = ReadDma(ZCU104).cmd.payload.shape()
    assert cmd["addr"].shape.width == 40 and cmd["beats"].shape.width == 25
    assert WriteDma(ZCU104).cmd.payload.shape() == cmd
    beat = byte_beat_layout(16)
    assert ReadDma(ZCU104).data.payload.shape() == beat
    assert WriteDma(ZCU104).data.payload.shape() == beat
    assert beat.size == 129 and beat["last"].offset == 128
    assert StreamResize(16, 32).o.payload.shape() == byte_beat_layout(32)
    assert ReadDma(ZCU104).queue_beats == 8 * 64


@pytest.mark.parametrize("widths", [(3, 4), (16, 12), (0, 16)])
def test_stream_resize_refuses_widths_that_are_not_powers_of_two(widths):
    with pytest.raises(ValueError, match="power of two"):
        StreamResize(*widths)


@pytest.mark.parametrize("engine", [ReadDma, WriteDma, AxiDmaPort])
def test_engines_refuse_a_non_config(engine):
    with pytest.raises(TypeError, match="AccelConfig"):
        engine({"axi_data_width": 128})


@pytest.mark.parametrize("engine", [ReadDma, WriteDma, AxiDmaPort])
def test_zcu104_engine_elaborates_and_lints_clean(engine, tmp_path):
    top = engine.__name__.lower()
    path = tmp_path / f"{top}.v"
    path.write_text(to_verilog(engine(ZCU104), top))

    assert lint(path, top) == []


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_dma_bench_passes(cocotb_bench):
    cocotb_bench(module=BENCH_MODULE, bench_dir=BENCH_DIR, top=TOP, verilog=bench_verilog(CI),
                 build_dir=BUILD_DIR / "verilator", config=CI, passes=EXPECTED_TESTS)
