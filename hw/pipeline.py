"""Pipeline building blocks shared by the vector unit and the MoE blocks.

Small helpers for streaming datapaths that never stall internally: a registered-output
queue at the end of a pipeline, the credit counter that keeps it from overflowing, and
pipeline registers. ``m3vit.hw.vector`` and ``m3vit.hw.moe`` build on them.
"""

from __future__ import annotations

from amaranth.hdl import Module, Shape, Signal, Value
from amaranth.lib.fifo import SyncFIFOBuffered

from .config import AccelConfig

__all__ = [
    "check_config",
    "credit_count",
    "credit_counter",
    "delay_like",
    "output_queue",
    "pipeline_delay",
    "pipeline_reg",
    "queue_depth",
]


def check_config(cfg: AccelConfig) -> AccelConfig:
    """``cfg`` itself, after checking it is an :class:`AccelConfig` (constructor guard)."""
    if not isinstance(cfg, AccelConfig):
        raise TypeError(f"expected an AccelConfig, got {cfg!r}")
    return cfg


def queue_depth(entries: int) -> int:
    """Smallest SyncFIFOBuffered depth 2^k + 1 holding ``entries`` (power-of-two memory)."""
    return (1 << max(1, (entries - 1).bit_length())) + 1


def output_queue(m: Module, name: str, layout, entries: int):
    """A registered-output FIFO of ``layout`` entries and typed views of its two ends."""
    fifo = SyncFIFOBuffered(width=Shape.cast(layout).width, depth=queue_depth(entries))
    m.submodules[name] = fifo
    return fifo, layout(fifo.w_data), layout(fifo.r_data)


def credit_count(m: Module, name: str, depth: int, take: Value, give: Value) -> Signal:
    """Entries issued into a non-stalling pipeline (``take``) and not yet read out of the
    ``depth`` queue at its end (``give``): the count behind :func:`credit_counter`."""
    used = Signal(range(depth + 1), name=f"{name}_used")
    m.d.sync += used.eq(used + take - give)
    return used


def credit_counter(m: Module, name: str, depth: int, take: Value, give: Value) -> Signal:
    """Admission control in front of a non-stalling pipeline that ends in a ``depth`` queue.

    Counts entries issued into the pipeline and not yet read out of the queue; the returned
    signal is high while one more may be issued, so the queue can never overflow and the
    pipeline never needs to stall.
    """
    used = credit_count(m, name, depth, take, give)
    free = Signal(name=f"{name}_free")
    m.d.comb += free.eq(used != depth)
    return free


def pipeline_reg(m: Module, value, shape=None, name=None):
    """``value`` registered once (a pipeline stage)."""
    reg = Signal(Value.cast(value).shape() if shape is None else shape, name=name)
    m.d.sync += reg.eq(value)
    return reg


def pipeline_delay(m: Module, value, cycles: int, shape=None, name="delay"):
    """``value`` through ``cycles`` pipeline registers."""
    for i in range(cycles):
        value = pipeline_reg(m, value, shape, name=f"{name}_{i}")
    return value


def delay_like(m: Module, value, cycles: int, name: str):
    """``value`` through ``cycles`` registers made with ``Signal.like`` (a view keeps its
    layout), named ``<name>_d1`` …; ``value`` itself for 0."""
    for index in range(cycles):
        reg = Signal.like(value, name=f"{name}_d{index + 1}")
        m.d.sync += reg.eq(value)
        value = reg
    return value
