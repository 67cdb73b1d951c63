# amaranth: UnusedElaboratable=no
"""The striped read DMA (:mod:`m3vit.hw.striped_read`): cocotb + Verilator bench against
one cocotbext-axi RAM per port, lint of the ZCU104 engine, and its argument checks."""

from pathlib import Path

import pytest

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.flow.generate import signature_ports, to_verilog, write_if_changed
from m3vit.hw.striped_read import StripedReadDma, default_entry_beats
from m3vit.sim.verilator import lint

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent / "striped"
BUILD_DIR = REPO_ROOT / "build" / "sim" / "striped"
TOP = "striped_read"
#: Three ports on the CI configuration (16-beat bursts, 4 outstanding): entries of 4 beats.
BENCH_CONFIG = CI.replace(n_master_ports=3)


def test_entry_beats_and_ports():
    assert [default_entry_beats(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    dma = StripedReadDma(ZCU104.replace(n_master_ports=3))
    assert dma.entry_beats == 4 and dma.entry_bytes == 64 and dma.queue_entries == 128
    ports = signature_ports(dma)
    assert {f"axi__port{p}__araddr" for p in range(3)} <= set(ports)
    assert "axi__port3__araddr" not in ports
    assert len(ports["data__payload"][0]) == 8 * 64 + 1 + 3  # data, last, beats 1…4


@pytest.mark.parametrize("kwargs", [{"n_ports": 0}, {"n_ports": 9}, {"entry_beats": 3},
                                    {"entry_beats": 32}, {"queue_entries": 15}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=r"n_ports|entry_beats|queue_entries"):
        StripedReadDma(CI, **kwargs)


def test_the_top_reads_64_kib_ahead_per_port():
    """The top's read queues: 1,024 entries of 64 bytes a port on the ZCU104."""
    from m3vit.hw.top import READ_QUEUE_BYTES

    dma = StripedReadDma(ZCU104.replace(n_master_ports=3), queue_entries=1024)
    assert dma.queue_entries * dma.entry_bytes == READ_QUEUE_BYTES


def test_zcu104_engine_lints_clean(tmp_path):
    path = tmp_path / f"{TOP}.v"
    path.write_text(to_verilog(StripedReadDma(ZCU104.replace(n_master_ports=3)), TOP))
    assert lint(path, TOP) == []


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
def test_striped_bench_passes(cocotb_bench, quick_model_compile):
    path = BUILD_DIR / f"{TOP}.v"
    write_if_changed(path, to_verilog(StripedReadDma(BENCH_CONFIG), TOP))
    cocotb_bench(module="test_striped_read_dma", bench_dir=BENCH_DIR, top=TOP, verilog=path,
                 build_dir=BUILD_DIR / "verilator", config=BENCH_CONFIG, passes=3)
