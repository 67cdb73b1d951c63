# amaranth: UnusedElaboratable=no
"""The MoE blocks (``m3vit.hw.moe``): elaboration, ZCU104 lint and the cocotb benches.

:class:`~m3vit.hw.moe.Dispatcher` and :class:`~m3vit.hw.moe.Combiner` are verified by two
cocotb modules in ``tests/sim/moe/`` against one Verilated top, :class:`MoeBenchTop`, which
places the blocks side by side with their ports prefixed ``disp`` and ``comb``: one Verilator
build per configuration serves both. The benches run on the CI configuration (4 lanes,
top-2) and on one with 64 experts and top-4 (the ZCU104's MoE capacities at 4 lanes); each
routes E ∈ {4, 16, max_experts}. The ZCU104 configuration itself is elaborated and linted
only.
"""

import functools
from pathlib import Path

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from m3vit.hw.config import CI, ZCU104, AccelConfig
from m3vit.hw.flow.generate import signature_ports, to_verilog, write_if_changed
from m3vit.hw.moe import Combiner, Dispatcher, slot_layout
from m3vit.sim.verilator import lint

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent / "moe"
BUILD_DIR = REPO_ROOT / "build" / "sim" / "moe"
TOP = "moe_bench"

#: 64 experts and top-4 (the ZCU104's MoE capacities) on the 4-lane array.
EXPERTS64 = CI.replace(max_experts=64, max_top_k=4)
#: 32 lanes and top-4: 16 INT16 logits a beat, so the dispatcher walks a beat in two steps
#: of eight (``SCORES_PER_CYCLE``), each merged through three tree levels that keep four.
LANES32 = CI.replace(pe_rows=8, pe_cols=32, max_top_k=4)
CONFIGS = {"ci": CI, "experts64": EXPERTS64, "lanes32": LANES32}
#: cocotb module → tests it must report passed on every configuration.
BENCHES = {"test_dispatcher": 11, "test_combiner": 13}


class MoeBenchTop(wiring.Component):
    """The dispatcher and the combiner side by side, ports prefixed ``disp`` and ``comb``.

    Exists only so that one Verilator build serves both MoE benches; the blocks share
    nothing.

    Parameters
    ----------
    cfg : AccelConfig
        The configuration both blocks are built for.
    """

    def __init__(self, cfg: AccelConfig):
        self._dispatcher = Dispatcher(cfg)
        self._combiner = Combiner(cfg)
        super().__init__({
            "disp": Out(self._dispatcher.signature),
            "comb": Out(self._combiner.signature),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.dispatcher = self._dispatcher
        m.submodules.combiner = self._combiner
        wiring.connect(m, wiring.flipped(self.disp), self._dispatcher)
        wiring.connect(m, wiring.flipped(self.comb), self._combiner)
        return m


@functools.cache
def bench_verilog(name: str) -> Path:
    """The bench top's Verilog for configuration ``name``, rewritten only when it changes."""
    path = BUILD_DIR / name / f"{TOP}.v"
    write_if_changed(path, to_verilog(MoeBenchTop(CONFIGS[name]), TOP))
    return path


def test_ports_are_named_from_the_signatures():
    streams = {"disp": {"cmd", "scores"}, "comb": {"cmd", "y", "out"}}
    wires = {
        "disp": {"busy", "rows", "top_k", "entries", "n_active", "list_index", "list_expert",
                 "list_start", "list_count", "slot_addr", "slot_en", "slot", "queue_addr",
                 "queue_en", "queue_token"},
        "comb": {"busy"},
    }
    ports = set(signature_ports(MoeBenchTop(CI)))

    for prefix in streams:
        names = {f"{prefix}__{s}__{m}" for s in streams[prefix]
                 for m in ("valid", "ready", "payload")}
        names |= {f"{prefix}__{w}" for w in wires[prefix]}
        assert {p for p in ports if p.startswith(f"{prefix}__")} == names


@pytest.mark.parametrize("block", [Dispatcher, Combiner])
def test_blocks_refuse_a_non_config(block):
    with pytest.raises(TypeError, match="AccelConfig"):
        block({"pe_cols": 4})


def test_table_widths_follow_the_config():
    slot = slot_layout(ZCU104)
    assert slot["expert"].shape.width == 6  # 64 experts
    assert slot["pos"].shape.width == 12  # 1024 tokens · top-4 queue positions
    dispatcher = Dispatcher(ZCU104)
    assert dispatcher.slot.shape().length == 4
    assert len(dispatcher.queue_token) == 10 and len(dispatcher.list_start) == 13


@pytest.mark.parametrize("block", [Dispatcher, Combiner])
def test_zcu104_block_elaborates_and_lints_clean(block, tmp_path):
    top = block.__name__.lower()
    path = tmp_path / f"{top}.v"
    path.write_text(to_verilog(block(ZCU104), top))

    assert lint(path, top) == []


@pytest.mark.slow
@pytest.mark.xdist_group("verilator")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("module", BENCHES)
def test_moe_bench_passes(module, config, quick_model_compile, cocotb_bench):
    cocotb_bench(module=module, bench_dir=BENCH_DIR, top=TOP, verilog=bench_verilog(config),
                 build_dir=BUILD_DIR / config / "verilator", config=CONFIGS[config],
                 passes=BENCHES[module])
