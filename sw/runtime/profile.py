"""Where an image's cycles go: the hardware instruction trace by phase, as a table and a figure.

The accelerator records one entry per instruction (:meth:`Accelerator.read_trace
<m3vit.sw.runtime.driver.Accelerator.read_trace>`, ``docs/registers.md``): its span in
cycles and the bytes it read over each master port. :func:`build_profile` names each
instruction's *phase* from the program itself (:func:`instruction_phases`) and sums the
spans, so the same profile comes from the board and from the simulator;
:func:`format_profile` prints it and :func:`save_profile_figure` draws the timeline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m3vit.hw.hp_ports import TOGETHER_READ_GBPS, hp_ports
from m3vit.hw.isa import Opcode

from ..compiler.phases import PHASES, expert_bodies, instruction_phases
from ..errors import M3VitError
from .driver import TraceEntry

__all__ = [
    "PHASES",
    "build_profile",
    "expert_bodies",
    "expert_visits",
    "format_profile",
    "format_visits",
    "instruction_phases",
    "save_profile_figure",
]

#: The unit lane of the timeline each opcode runs on.
_LANES = {
    Opcode.GEMM: "PE array",
    Opcode.LAYERNORM: "vector", Opcode.SOFTMAX: "vector", Opcode.RESIDUAL: "vector",
    Opcode.ROUTE: "MoE", Opcode.COMBINE: "MoE", Opcode.EXPERTS: "MoE",
    Opcode.LOAD: "DMA", Opcode.STORE: "DMA", Opcode.LOAD_TABLE: "DMA",
}
_LANE_ORDER = ("PE array", "vector", "MoE", "DMA", "control")


def expert_visits(entries: Sequence[TraceEntry], program: bytes) -> list[dict[str, Any]]:
    """Each expert visit of a run: one pass of an ``EXPERTS`` body (FC1 and FC2 of one
    expert, over the tokens queued for it).

    A visit begins with the trace entry of its body's first instruction and takes every
    entry up to the next visit or the end of the loop (the GEMMs' *drain* entries
    included: their tails). Returns per visit ``layer`` (the loop's index), ``start``,
    ``end`` (cycles), ``cycles`` and ``read_bytes`` (all ports).
    """
    visits: list[dict[str, Any]] = []
    bodies = expert_bodies(program)
    current = None
    for e in entries:
        layer = next((i for i, (first, last) in enumerate(bodies) if first <= e.pc <= last),
                     None)
        if layer is None:
            current = None
            continue
        if e.pc == bodies[layer][0] and not e.drain:
            current = {"layer": layer, "start": e.start, "end": e.end, "read_bytes": 0}
            visits.append(current)
        if current is not None:
            current["end"] = max(current["end"], e.end)
            current["read_bytes"] += sum(e.read_bytes)
    for visit in visits:
        visit["cycles"] = visit["end"] - visit["start"]
    return visits


def build_profile(entries: Sequence[TraceEntry], program: bytes, *, clock_mhz: float,
                  cycles: int, n_ports: int, instructions: int | None = None) -> dict[str, Any]:
    """Sum a run's trace by phase.

    Parameters
    ----------
    entries : sequence of TraceEntry
        :meth:`~m3vit.sw.runtime.driver.Accelerator.read_trace` of the run.
    program : bytes
        The program that ran (the package's), to name the phases.
    clock_mhz : float
        The bitstream's clock.
    cycles : int
        The run's ``CYCLES``.
    n_ports : int
        Master ports (for the aggregate bandwidth the ZCU104 measurements give them).
    instructions : int, optional
        The run's ``INSTRUCTIONS``: says when the trace holds fewer instructions than the
        run retired.

    Returns
    -------
    dict
        Plain JSON: ``phases`` (per phase: cycles, share, instructions, read bytes per
        port, write bytes, GB/s per port and together, share of the aggregate DDR
        bandwidth), ``visits`` (:func:`expert_visits`), ``entries`` (the trace),
        ``phase_of`` (per entry), ``clock_mhz``, ``cycles``, ``n_ports``, ``hp_ports``,
        ``peak_gbps``, ``truncated``.
    """
    if not entries:
        raise M3VitError("the trace is empty: profile a run of a bitstream with the "
                         "instruction trace (register map 1.1 or later)")
    names = instruction_phases(program)
    peak = TOGETHER_READ_GBPS.get(n_ports, TOGETHER_READ_GBPS[max(TOGETHER_READ_GBPS)])
    rows: dict[str, dict[str, Any]] = {}
    phase_of = []
    for e in entries:
        phase = names[e.pc] if e.pc < len(names) else "head"
        phase_of.append(phase)
        row = rows.setdefault(phase, {"cycles": 0, "instructions": 0,
                                      "read_bytes": [0] * n_ports, "write_bytes": 0})
        row["cycles"] += e.end - e.start
        row["instructions"] += not e.drain
        row["write_bytes"] += e.write_bytes
        for p in range(n_ports):
            row["read_bytes"][p] += e.read_bytes[p]
    for row in rows.values():
        seconds = row["cycles"] / (clock_mhz * 1e6) if row["cycles"] else float("inf")
        row["share"] = row["cycles"] / cycles if cycles else 0.0
        row["read_gbps"] = [b / seconds / 1e9 for b in row["read_bytes"]]
        row["total_gbps"] = sum(row["read_gbps"])
        row["of_peak"] = row["total_gbps"] / peak
    ordered = {name: rows[name] for name in PHASES if name in rows}
    return {
        "clock_mhz": clock_mhz, "cycles": cycles, "n_ports": n_ports,
        "hp_ports": list(hp_ports(n_ports)), "peak_gbps": peak,
        "traced_cycles": entries[-1].end,
        # Every instruction retired has an entry, and so has the END the run stops on.
        "truncated": instructions is not None
        and sum(not e.drain for e in entries) < instructions + 1,
        "phases": ordered, "visits": expert_visits(entries, program),
        "entries": [e.to_list() for e in entries], "phase_of": phase_of,
    }


def format_visits(profile: dict[str, Any]) -> str:
    """Per MoE layer, what an expert visit costs: how many, their cycles (least, median,
    most) and their DDR floor — the cycles their weight bytes take at the ports' aggregate
    bandwidth; a visit at ``× floor`` 1.0 is bound by DDR alone."""
    visits = profile.get("visits") or []
    if not visits:
        return ""
    bytes_per_cycle = profile["peak_gbps"] * 1e9 / (profile["clock_mhz"] * 1e6)
    lines = [f"{'expert visits':<16} {'visits':>6} {'least':>7} {'median':>7} {'most':>7} "
             f"{'KB/visit':>8} {'× floor':>7}"]
    for layer in sorted({v["layer"] for v in visits}):
        mine = [v for v in visits if v["layer"] == layer]
        cycles = sorted(v["cycles"] for v in mine)
        median = cycles[len(cycles) // 2]
        read = sum(v["read_bytes"] for v in mine) / len(mine)
        ratio = sum(v["cycles"] for v in mine) / max(1.0, sum(v["read_bytes"] for v in mine)
                                                     / bytes_per_cycle)
        lines.append(f"{'MoE layer ' + str(layer):<16} {len(mine):>6} {cycles[0]:>7,} "
                     f"{median:>7,} {cycles[-1]:>7,} {read / 1e3:>8.1f} {ratio:>7.2f}")
    lines.append("(cycles per visit of an EXPERTS body, FC1 and FC2 of one expert; × floor: "
                 "the visits' cycles over their bytes at the aggregate DDR bandwidth)")
    return "\n".join(lines)


def format_profile(profile: dict[str, Any], title: str = "") -> str:
    """The profile as a text table: one row per phase, then the whole run."""
    n = profile["n_ports"]
    hp = profile["hp_ports"]
    port_heads = "".join(f" {'HP' + str(h) + ' GB/s':>10}" for h in hp)
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'phase':<16} {'cycles':>10} {'share':>6} {'instr':>6} {'read MB':>8}"
                 f"{port_heads} {'total':>6} {'of DDR':>6}")
    total = {"cycles": 0, "instructions": 0, "read": 0}
    for name, row in profile["phases"].items():
        read = sum(row["read_bytes"])
        total["cycles"] += row["cycles"]
        total["instructions"] += row["instructions"]
        total["read"] += read
        ports = "".join(f" {g:>10.2f}" for g in row["read_gbps"])
        lines.append(f"{name:<16} {row['cycles']:>10,} {row['share']:>6.1%} "
                     f"{row['instructions']:>6} {read / 1e6:>8.2f}{ports} "
                     f"{row['total_gbps']:>6.2f} {row['of_peak']:>6.0%}")
    seconds = profile["cycles"] / (profile["clock_mhz"] * 1e6)
    gbps = total["read"] / seconds / 1e9
    lines.append(f"{'run':<16} {profile['cycles']:>10,} {'':>6} {total['instructions']:>6} "
                 f"{total['read'] / 1e6:>8.2f}{'':>{11 * n}} {gbps:>6.2f} "
                 f"{gbps / profile['peak_gbps']:>6.0%}")
    lines.append(f"({profile['cycles'] / profile['clock_mhz'] / 1000:.2f} ms at "
                 f"{profile['clock_mhz']:g} MHz; 'of DDR': of the {profile['peak_gbps']:g} GB/s "
                 f"{n} HP port{'s' if n > 1 else ''} read together on the ZCU104, Manev et al. "
                 "FPT 2019)")
    if profile["truncated"]:
        lines.append("(the trace holds only the run's first instructions: the rest is "
                     "not in the table)")
    visits = format_visits(profile)
    if visits:
        lines += ["", visits]
    return "\n".join(lines)


def save_profile_figure(profile: dict[str, Any], path: str | os.PathLike, *,
                        title: str = "", overwrite: bool = False, bins: int = 240) -> Path:
    """Draw the timeline: each instruction on its unit's lane, coloured by phase, over
    the DDR read bandwidth of each master port.

    Raises
    ------
    M3VitError
        If ``path`` exists and ``overwrite`` is false.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.exists() and not overwrite:
        raise M3VitError(f"{path} exists: pass --force to overwrite it")
    entries = [TraceEntry.from_list(row) for row in profile["entries"]]
    mhz = profile["clock_mhz"]
    to_ms = 1 / (mhz * 1000)
    colours = dict(zip(PHASES, plt.get_cmap("tab10").colors, strict=False))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5.2), sharex=True,
                                      gridspec_kw={"height_ratios": [1.1, 1]})
    for entry, phase in zip(entries, profile["phase_of"], strict=True):
        try:
            lane = _LANES.get(Opcode(entry.opcode), "control")
        except ValueError:
            lane = "control"
        y = len(_LANE_ORDER) - 1 - _LANE_ORDER.index(lane)
        top.broken_barh([(entry.start * to_ms, max(entry.end - entry.start, 1) * to_ms)],
                        (y - 0.4, 0.8), color=colours[phase], linewidth=0)
    top.set_yticks(range(len(_LANE_ORDER)), _LANE_ORDER[::-1])
    top.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[p])
                        for p in profile["phases"]], labels=list(profile["phases"]),
               ncols=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.32))
    # Bandwidth: each instruction's bytes spread evenly over its span, in time bins.
    end = max(profile["traced_cycles"], 1)
    width = end / bins
    for p, hp in enumerate(profile["hp_ports"]):
        per_bin = [0.0] * bins
        for e in entries:
            span = max(e.end - e.start, 1)
            rate = e.read_bytes[p] / span
            first, last = int(e.start / width), min(int((e.end - 1) / width), bins - 1)
            for b in range(first, last + 1):
                lo, hi = max(e.start, b * width), min(e.end, (b + 1) * width)
                per_bin[b] += rate * max(hi - lo, 0)
        gbps = [v / (width / (mhz * 1e6)) / 1e9 for v in per_bin]
        bottom.step([b * width * to_ms for b in range(bins)], gbps, where="post",
                    label=f"HP{hp}", linewidth=1)
    bottom.axhline(profile["peak_gbps"] / profile["n_ports"], color="grey", linestyle=":",
                   linewidth=1, label="per-port share of the measured aggregate")
    bottom.set_ylabel("DDR read GB/s")
    bottom.set_xlabel("time (ms)")
    bottom.legend(fontsize=8, ncols=4, loc="upper right")
    fig.suptitle(title or f"{profile['cycles']:,} cycles at {mhz:g} MHz", y=0.995)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
