"""A finished build into ``bitstreams/``: ``.bit``, ``.hwh``, reports and ``manifest.json``.

:func:`collect` copies what ``build.tcl`` left in ``out/`` (here or on another machine) next
to the other bitstreams and records it in the manifest with its configuration hash, clock,
Vivado version, timing slack and utilisation; :func:`check_replaceable` is the rule that keeps a
bitstream of another configuration from being overwritten.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

from ...errors import M3VitError
from ..generate import write_if_changed
from .reports import parse_report_number, parse_timing_summary, parse_utilization, read_build_info
from .tcl import OUT_SUBDIR, REPORTS, format_mhz

__all__ = ["MANIFEST_NAME", "check_replaceable", "collect"]

#: Manifest of the built bitstreams, in ``--out``.
MANIFEST_NAME = "manifest.json"


def _load_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return {"bitstreams": {}}
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise M3VitError(f"{path} is not valid JSON ({e}); move it away or pass --force") \
            from None
    except OSError as e:
        raise M3VitError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(manifest, dict):
        raise M3VitError(f"{path} is not a bitstream manifest (not a JSON object); move it "
                         "away or pass --force")
    manifest.setdefault("bitstreams", {})
    entries = manifest["bitstreams"]
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise M3VitError(f"{path}: its \"bitstreams\" are not objects by name; move it away "
                         "or pass --force")
    return manifest


def check_replaceable(out_dir: Path, name: str, config_hash: str, force: bool) -> None:
    """Refuse to replace ``<name>.bit`` built for another configuration hash.

    Parameters
    ----------
    out_dir : Path
        Where the bitstreams live (``bitstreams/``).
    name : str
        Base name of the pair (``m3vit_zcu104``).
    config_hash : str
        The hash of the configuration about to be built (``0xf69b94ba``).
    force : bool
        Allow the replacement.

    Raises
    ------
    M3VitError
        ``<name>.bit`` exists and the manifest records another (or no) configuration hash.
    """
    if force or not (out_dir / f"{name}.bit").exists():
        return
    try:
        recorded = _load_manifest(out_dir)["bitstreams"].get(name, {}).get("config_hash")
    except M3VitError:
        recorded = None
    if recorded != config_hash:
        what = f"config hash {recorded}" if recorded else "an unrecorded configuration"
        raise M3VitError(f"{out_dir / (name + '.bit')} was built for {what}, this build is "
                         f"{config_hash}: pass --force to replace it or choose another --out")


def collect(build_dir: Path, out_dir: Path, *, force: bool = False,
            vivado_version: str | None = None) -> dict:
    """Copy a finished build's ``.bit``, ``.hwh`` and reports into ``out_dir``; record it.

    Parameters
    ----------
    build_dir : Path
        The folder :func:`~m3vit.hw.flow.vivado.flow.write_project` wrote and Vivado ran in
        (results in ``out/``).
    out_dir : Path
        Where the bitstreams live (``bitstreams/``); ``manifest.json`` there gains or
        updates the entry of this base name.
    force : bool
        Replace a bitstream of the same base name built for another configuration hash.
    vivado_version : str, optional
        Version reported by ``vivado -version``, if ``build_info.txt`` lacks it.

    Returns
    -------
    dict
        The manifest entry written.

    Raises
    ------
    M3VitError
        Missing build results, a timing report without a summary, timing not met (nothing is
        copied then), or a bitstream of another configuration in the way.
    """
    build_dir, out_dir = Path(build_dir), Path(out_dir)
    flow_path = build_dir / "flow.json"
    if not flow_path.is_file():
        raise M3VitError(f"{build_dir} holds no generated Vivado flow (flow.json)")
    flow = json.loads(flow_path.read_text())
    name = flow["base_name"]
    results = build_dir / OUT_SUBDIR
    needed = [results / f"{name}.bit", results / f"{name}.hwh", results / REPORTS[0]]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise M3VitError(f"the Vivado build left no {', '.join(missing)}: run "
                         f"`cd {build_dir} && vivado -mode batch -source build.tcl` first")
    timing = parse_timing_summary((results / REPORTS[0]).read_text())
    info = read_build_info(results / "build_info.txt")
    wns = timing.get("wns_ns")
    if wns is None:
        wns = parse_report_number(info.get("wns_ns", "NA"))
    met = all((timing.get(k) is None or timing[k] >= 0) for k in ("wns_ns", "whs_ns", "wpws_ns"))
    if wns is None or not met:
        raise M3VitError(f"timing not met at {format_mhz(flow['clock_mhz'])} MHz (WNS {wns} "
                         f"ns, WHS {timing.get('whs_ns')} ns): the bitstream stays in {results} "
                         f"and is not copied to {out_dir}; see {results / REPORTS[0]}")
    check_replaceable(out_dir, name, flow["config_hash"], force)
    utilization = {}
    if (results / REPORTS[1]).is_file():
        utilization = parse_utilization((results / REPORTS[1]).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    report_dir = out_dir / "reports" / name
    report_dir.mkdir(parents=True, exist_ok=True)
    for suffix in (".bit", ".hwh"):
        shutil.copyfile(results / f"{name}{suffix}", out_dir / f"{name}{suffix}")
    copied_reports = []
    for report in (*REPORTS, "build_info.txt"):
        if (results / report).is_file():
            shutil.copyfile(results / report, report_dir / report)
            copied_reports.append(str(Path("reports") / name / report))
    pl_clk0_hz = parse_report_number(info.get("pl_clk0_hz", "NA"))
    entry = {
        "bit": f"{name}.bit",
        "hwh": f"{name}.hwh",
        "bit_sha256": hashlib.sha256((out_dir / f"{name}.bit").read_bytes()).hexdigest(),
        "config_name": flow["config_name"],
        "config_hash": flow["config_hash"],
        "config": flow["config"],
        "clock_mhz": flow["clock_mhz"],
        "pl_clk0_mhz": round(pl_clk0_hz / 1e6, 6) if pl_clk0_hz else None,
        "vivado_version": info.get("vivado_version") or vivado_version,
        "part": info.get("part", flow["part"]),
        "board_part": info.get("board_part"),
        "pynq_image": flow["pynq_image"],
        "timing": {**timing, "wns_ns": wns, "met": True},
        "utilization": utilization,
        "address_map": flow["address_map"],
        "accelerator_sha256": flow["accelerator_sha256"],
        "reports": copied_reports,
        "collected_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest = _load_manifest(out_dir) if not force else _load_manifest_quiet(out_dir)
    manifest["bitstreams"][name] = entry
    manifest["bitstreams"] = dict(sorted(manifest["bitstreams"].items()))
    write_if_changed(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return entry


def _load_manifest_quiet(out_dir: Path) -> dict:
    # With --force an unreadable manifest is replaced rather than reported.
    try:
        return _load_manifest(out_dir)
    except M3VitError:
        return {"bitstreams": {}}

