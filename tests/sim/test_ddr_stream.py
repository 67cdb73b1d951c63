"""The DDR model's ports and shared caps, streamed by ideal masters (no Verilated design)."""

import dataclasses

import pytest

from m3vit.hw.config import ZCU104
from m3vit.hw.errors import M3VitError
from m3vit.hw.hp_ports import HP_ORDER, hp_ports
from m3vit.sim.ddr_stream import compare_with_measurements, stream
from m3vit.sim.soc import DdrTiming


def test_defaults_reproduce_the_measurements():
    """Every HP-port set the defaults model delivers its published bandwidth within 1 %."""
    rows = compare_with_measurements(ZCU104, cycles=50_000)
    assert [r["ports"] for r in rows] == ["HP0", "HP0+HP1", "HP0+HP1+HP3", "HP0+HP1+HP3+HP2",
                                          "HP1+HP2"]
    for row in rows:
        assert row["model_gbps"] == pytest.approx(row["measured_gbps"], rel=0.01), row
    by_ports = {r["ports"]: r["model_gbps"] for r in rows}
    # Three well-chosen ports beat four; HP1 and HP2 together fall short of two free ports.
    assert by_ports["HP0+HP1+HP3"] > by_ports["HP0+HP1+HP3+HP2"]
    assert by_ports["HP1+HP2"] < by_ports["HP0+HP1"]


def test_port_choice():
    assert hp_ports(3) == (0, 1, 3) and hp_ports(4) == HP_ORDER
    timing = DdrTiming.zcu104(ZCU104, n_masters=3)
    assert timing.hp_ports == (0, 1, 3) and timing.shared_pair_mask == 0b010
    assert DdrTiming.zcu104(ZCU104, n_masters=4).shared_pair_mask == 0b1010
    with pytest.raises(M3VitError, match=r"n_master_ports must be 1\.\.4"):
        hp_ports(5)


def test_shared_caps_bind_and_share_fairly():
    timing = DdrTiming.zcu104(ZCU104, n_masters=4)
    ports = stream(timing, cycles=40_000)
    total = sum(p.read for p in ports)
    assert total == pytest.approx(timing.aggregate_bytes_per_cycle, rel=0.01)
    # No port starves another: each gets a quarter of the aggregate, within 3 %.
    for p in ports:
        assert p.read == pytest.approx(total / 4, rel=0.03)
    # One port alone is held to its own rate, whatever the aggregate allows.
    alone = stream(timing, active=(2,), cycles=40_000)
    assert alone[2].read == pytest.approx(timing.bytes_per_cycle, rel=0.01)
    assert alone[0].read == alone[1].read == alone[3].read == 0


def test_reads_and_writes_share_the_ddr_without_starving():
    timing = DdrTiming.zcu104(ZCU104, n_masters=1)
    (port,) = stream(timing, write=True, cycles=40_000)
    assert port.read + port.write == pytest.approx(timing.aggregate_bytes_per_cycle, rel=0.01)
    assert port.write == pytest.approx(port.read, rel=0.05)
    # Without an aggregate cap R and W are independent channels, each at the port's rate.
    free = dataclasses.replace(timing, aggregate_bytes_per_cycle=None)
    (port,) = stream(free, write=True, cycles=40_000)
    assert port.read == pytest.approx(timing.bytes_per_cycle, rel=0.01)
    assert port.write == pytest.approx(timing.bytes_per_cycle, rel=0.01)


def test_latency_bound_port():
    """One outstanding burst: a burst of B beats every latency + B cycles."""
    timing = dataclasses.replace(DdrTiming.zcu104(ZCU104, n_masters=1), max_outstanding=1)
    (port,) = stream(timing, burst_beats=16, cycles=40_000)
    beats_per_cycle = port.read / 16
    assert beats_per_cycle == pytest.approx(16 / (timing.read_latency + 16), rel=0.05)


def test_bad_stream_arguments():
    with pytest.raises(M3VitError, match="active ports"):
        stream(DdrTiming(), active=(1,))
    with pytest.raises(M3VitError, match="bad stream"):
        stream(DdrTiming(), burst_beats=512)
