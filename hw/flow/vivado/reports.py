"""Reading what Vivado says: its version, the timing and utilisation reports, build_info.txt.

Plain text in, numbers out; nothing here runs Vivado. The report formats are those of
``report_timing_summary`` and ``report_utilization`` (checked against their layout in the
tests, not against a Vivado run: none is available where this was written).
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import M3VitError

__all__ = [
    "UTILIZATION_ROWS",
    "parse_report_number",
    "parse_timing_summary",
    "parse_utilization",
    "parse_vivado_version",
    "read_build_info",
]


def parse_vivado_version(text: str) -> str | None:
    """The ``major.minor`` version in ``vivado -version`` output (``vivado v2025.2 (64-bit)``).

    Returns
    -------
    str or None
        ``"2025.2"``, or ``None`` if the text names no version.
    """
    match = re.search(r"\bvivado\s+v(\d{4}\.\d+)", text, re.IGNORECASE)
    return match.group(1) if match else None


def parse_report_number(text: str) -> float | None:
    """A number as Vivado reports it, or ``None`` for ``NA`` (no constrained path of that kind).

    Parameters
    ----------
    text : str
        One value of a report or of ``build_info.txt`` (``0.123``, ``NA``).

    Returns
    -------
    float or None
    """
    try:
        return float(text)
    except ValueError:
        return None


def parse_timing_summary(text: str) -> dict[str, float | None]:
    """WNS, TNS, WHS, THS, WPWS, TPWS (ns) from ``report_timing_summary``'s design summary.

    Parameters
    ----------
    text : str
        The report.

    Returns
    -------
    dict of str to float or None
        Keys ``wns_ns``, ``tns_ns``, ``whs_ns``, ``ths_ns``, ``wpws_ns``, ``tpws_ns``; ``None``
        where the report has no number (no constrained path of that kind).

    Raises
    ------
    M3VitError
        If the report has no "Design Timing Summary" table.
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "WNS(ns)" not in line or "TNS(ns)" not in line:
            continue
        headers = re.split(r"\s{2,}", line.strip())
        rows = [r for r in lines[i + 1:i + 4] if r.strip() and not set(r.strip()) <= {"-", " "}]
        if not rows:
            break
        values = rows[0].split()
        if len(values) != len(headers):
            break
        table = dict(zip(headers, values, strict=True))
        return {f"{key.lower()}_ns": parse_report_number(table[f"{key}(ns)"])
                for key in ("WNS", "TNS", "WHS", "THS", "WPWS", "TPWS") if f"{key}(ns)" in table}
    raise M3VitError("the timing report has no Design Timing Summary (WNS/TNS table)")


#: Rows of ``report_utilization`` recorded in the manifest, by site type.
UTILIZATION_ROWS = ("CLB LUTs", "CLB Registers", "Block RAM Tile", "URAM", "DSPs")


def parse_utilization(text: str) -> dict[str, dict[str, float]]:
    """Used, available and percentage of the main resources from ``report_utilization``.

    Parameters
    ----------
    text : str
        The (flat) utilisation report.

    Returns
    -------
    dict of str to dict
        For each of :data:`UTILIZATION_ROWS` found: ``{"used", "available", "percent"}``.
    """
    result: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == "Site Type":
            columns = cells
            continue
        name = cells[0].rstrip("*").strip()
        if not columns or name not in UTILIZATION_ROWS or name in result:
            continue
        row = dict(zip(columns, cells, strict=False))
        try:
            result[name] = {"used": float(row["Used"]), "available": float(row["Available"]),
                            "percent": float(row["Util%"])}
        except (KeyError, ValueError):
            continue
    return result


def read_build_info(path: Path) -> dict[str, str]:
    """The ``key value`` lines ``build.tcl`` writes to ``build_info.txt``.

    Parameters
    ----------
    path : Path
        The file; a build that stopped before writing it gives an empty dict.

    Returns
    -------
    dict of str to str
        ``vivado_version``, ``part``, ``board_part``, ``pl_clk0_hz``, ``control_offset``,
        ``control_range``, ``wns_ns``: those the build got to.
    """
    info = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key:
                info[key] = value.strip()
    return info
