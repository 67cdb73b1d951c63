"""Turn components into Verilog with ports named and directed by their signatures.

Every block that goes to Verilator (and later to Vivado) is emitted through
:func:`to_verilog`, so the port names a testbench sees follow one rule:
the signature path joined by ``__`` (``i_stream__valid``, ``o_stream__payload``).

:data:`DESIGNS` names every design that can be generated on its own and :func:`generate`
writes the Verilog of some of them for one configuration, with a ``manifest.json`` that
records what was generated from what (``m3vit generate``, ``make verilog``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import amaranth
from amaranth.back import rtlil, verilog
from amaranth.hdl import Const, Signal, ValueCastable

# The direction type `verilog.convert` itself uses for signature-derived ports; Amaranth 0.5
# (pinned in requirements.txt) has no public name for it.
from amaranth.hdl._ir import PortDirection
from amaranth.lib import wiring

from ..config import CI, ZCU104, AccelConfig
from ..errors import M3VitError
from ..target import SYNTHESIS, Target

__all__ = [
    "CONFIGS",
    "DESIGNS",
    "MANIFEST_NAME",
    "TARGETS",
    "Design",
    "GenerateReport",
    "GeneratedFile",
    "generate",
    "get_config",
    "get_design",
    "get_target",
    "signature_ports",
    "to_rtlil",
    "to_verilog",
    "write_if_changed",
]


def signature_ports(component: wiring.Component) -> dict[str, tuple[Signal, PortDirection]]:
    """Name and direct every port of ``component`` from its signature.

    Parameters
    ----------
    component : wiring.Component
        The component whose signature members become top-level ports.

    Returns
    -------
    dict of str to (Signal, PortDirection)
        Port name (signature path joined by ``__``) to the signal and its direction.
        Members that are constants (``always_valid``/``always_ready`` streams) are not ports.

    Raises
    ------
    TypeError
        If ``component`` is not a :class:`~amaranth.lib.wiring.Component`.
    """
    if not isinstance(component, wiring.Component):
        raise TypeError(f"expected an amaranth.lib.wiring.Component, got {component!r}")
    ports = {}
    for path, member, value in component.signature.flatten(component):
        if isinstance(value, ValueCastable):
            value = value.as_value()
        if isinstance(value, Const):
            continue
        direction = PortDirection.Input if member.flow == wiring.In else PortDirection.Output
        ports["__".join(map(str, path))] = (value, direction)
    return ports


def to_verilog(component: wiring.Component, name: str, platform: Target | None = None) -> str:
    """Convert a component to Verilog text with signature-derived ports.

    Parameters
    ----------
    component : wiring.Component
        The component to convert. Its ``sync`` domain, if used, adds ``clk`` and ``rst``.
    name : str
        Name of the top-level Verilog module (the ``hdl_toplevel`` of a bench).
    platform : Target, optional
        What the design is elaborated for (:mod:`m3vit.hw.target`): plain Verilog for
        simulation by default, :data:`~m3vit.hw.target.SYNTHESIS` for vendor primitives.

    Returns
    -------
    str
        Verilog source text, without ``src`` attributes so the output does not depend on
        where the repository is checked out.

    Raises
    ------
    ValueError
        If ``name`` is not a valid Verilog/Python identifier.
    """
    if not name.isidentifier():
        raise ValueError(f"module name must be an identifier, got {name!r}")
    return verilog.convert(component, name=name, platform=platform,
                           ports=signature_ports(component), emit_src=False)


def to_rtlil(component: wiring.Component, name: str, platform: Target | None = None) -> str:
    """Convert a component to RTLIL (Yosys's own netlist text), ports as :func:`to_verilog`.

    The Verilog of :func:`to_verilog` is written by Yosys from this same netlist. Synthesis
    reads the RTLIL: Yosys's Verilog front end imports the initial values of a large memory
    very slowly (the accelerator's activation buffer kept Yosys 0.23 parsing for over ten
    minutes; its RTLIL loads in about a second).

    Parameters
    ----------
    component : wiring.Component
        The component to convert.
    name : str
        Name of the top-level module.
    platform : Target, optional
        As for :func:`to_verilog`.

    Returns
    -------
    str
        RTLIL text without ``src`` attributes.

    Raises
    ------
    ValueError
        If ``name`` is not a valid identifier.
    """
    if not name.isidentifier():
        raise ValueError(f"module name must be an identifier, got {name!r}")
    return rtlil.convert(component, name=name, platform=platform,
                         ports=signature_ports(component), emit_src=False)


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` only when the content differs.

    Keeping the modification time of an unchanged file lets Verilator's
    ``--skip-identical`` and make reuse an existing build.

    Parameters
    ----------
    path : Path
        File to write; parent folders are created.
    text : str
        The full new content.

    Returns
    -------
    bool
        ``True`` if the file was (re)written, ``False`` if it already held ``text``.
    """
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent reader never sees half a file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)
    return True


# ---- generatable designs -------------------------------------------------------------------

#: The named configurations ``m3vit generate --config`` accepts.
CONFIGS: dict[str, AccelConfig] = {"zcu104": ZCU104, "ci": CI}

#: File, next to the generated Verilog, that records what it was generated from.
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Design:
    """One design that can be generated on its own.

    Parameters
    ----------
    name : str
        Registry key and file stem (``<name>.v``).
    summary : str
        One line for ``--help`` and listings.
    factory : callable
        ``factory(config) -> wiring.Component``; imports its module only when called, so that
        naming the designs (``--help``, the registry) elaborates and imports none of them.
    """

    name: str
    summary: str
    factory: Callable[[AccelConfig], wiring.Component]

    @property
    def module(self) -> str:
        """Verilog name of the top module: prefixed so that generic names (``table``,
        ``top``) cannot clash with other modules of a Vivado project."""
        return f"m3vit_{self.name}"

    def elaborate(self, config: AccelConfig) -> wiring.Component:
        """Build the component for ``config``."""
        return self.factory(config)


def _block(module: str, cls: str) -> Callable[[AccelConfig], wiring.Component]:
    def factory(config: AccelConfig) -> wiring.Component:
        target = importlib.import_module(f"m3vit.hw.{module}")
        for part in cls.split("."):
            target = getattr(target, part)
        return target(config)

    return factory


def _gemm_as_in_top(config: AccelConfig) -> wiring.Component:
    """The GEMM engine with the top's intake: weight rows, parameter records and table
    entries a beat as the read router hands them over (two 64-byte rows on the ZCU104)."""
    from m3vit.hw.engine.router import intake_shape
    from m3vit.hw.gemm import GemmEngine

    intake = intake_shape(config)
    return GemmEngine(config, rows_per_beat=intake.rows_per_beat,
                      params_per_beat=intake.params_per_beat,
                      table_entries=intake.gemm_table_entries)


#: Every design ``m3vit generate`` / ``m3vit resources`` know, by name.
DESIGNS: dict[str, Design] = {d.name: d for d in (
    Design("top", "the accelerator: engine, register file and AXI masters (m3vit.hw.top)",
           _block("top", "AcceleratorTop")),
    Design("gemm", "the PE array with requantization, fed as the top feeds it "
           "(m3vit.hw.gemm.GemmEngine)", _gemm_as_in_top),
    Design("layernorm", "integer LayerNorm (m3vit.hw.vector.LayerNormUnit)",
           _block("vector", "LayerNormUnit")),
    Design("softmax", "softmax / router scores (m3vit.hw.vector.SoftmaxUnit)",
           _block("vector", "SoftmaxUnit")),
    Design("residual", "requantizing residual add (m3vit.hw.vector.ResidualAdd)",
           _block("vector", "ResidualAdd")),
    Design("table", "256-entry INT8 table lookup (m3vit.hw.vector.TableLookup)",
           _block("vector", "TableLookup")),
    Design("packed", "the PE array with two INT8 products per DSP48E2 "
           "(m3vit.hw.packed.PackedArray)", _block("packed", "PackedArray.for_config")),
)}


def get_config(name: str) -> AccelConfig:
    """The named configuration (``zcu104``, ``ci``).

    Raises
    ------
    M3VitError
        If ``name`` is not in :data:`CONFIGS`.
    """
    try:
        return CONFIGS[name]
    except KeyError:
        raise M3VitError(f"unknown accelerator config {name!r} (choose from "
                         f"{', '.join(CONFIGS)})") from None


#: What :func:`generate` can elaborate for (:mod:`m3vit.hw.target`): the key is the
#: ``--target`` of ``m3vit generate``, the value the ``platform`` Amaranth is given.
TARGETS: dict[str, Target | None] = {"simulation": None, "synthesis": SYNTHESIS}


def get_target(name: str) -> Target | None:
    """The ``platform`` for a :data:`TARGETS` key; :class:`M3VitError` for an unknown one."""
    try:
        return TARGETS[name]
    except KeyError:
        raise M3VitError(f"unknown target {name!r} (choose from {', '.join(TARGETS)})") from None


def get_design(name: str) -> Design:
    """The registered design ``name``.

    Raises
    ------
    M3VitError
        If ``name`` is not in :data:`DESIGNS`.
    """
    try:
        return DESIGNS[name]
    except KeyError:
        raise M3VitError(f"unknown design {name!r} (choose from {', '.join(DESIGNS)})") from None


@dataclass(frozen=True)
class GeneratedFile:
    """One file :func:`generate` produced.

    Attributes
    ----------
    path : Path
        Where it is.
    written : bool
        ``False`` when the file already held exactly this content (and was left alone).
    design : str or None
        Design name; ``None`` for the manifest.
    """

    path: Path
    written: bool
    design: str | None = None


@dataclass(frozen=True)
class GenerateReport:
    """What :func:`generate` did.

    Attributes
    ----------
    verilog : list of GeneratedFile
        One per generated design, in the order asked.
    manifest : GeneratedFile
        The updated ``manifest.json``.
    """

    verilog: list[GeneratedFile]
    manifest: GeneratedFile


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def generate(
    config_name: str,
    designs: Iterable[str],
    out_dir: Path,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    target: str = "simulation",
) -> GenerateReport:
    """Write ``<out_dir>/<design>.v`` for each design and update ``manifest.json``.

    Every design is elaborated and converted before anything is written, and nothing is
    written if any target holds different content (unless ``force``), so a refused run
    leaves the folder as it was. Identical files are left untouched (their modification
    time too, which keeps Verilator and make from rebuilding).

    The manifest records the configuration (dict and :meth:`AccelConfig.config_hash`), the
    target, the Amaranth version and, per design, its file, top module and SHA-256. Designs
    generated into the same folder by earlier runs for the same configuration and target
    stay listed; a folder generated for another configuration or target is refused unless
    ``force``.

    Parameters
    ----------
    config_name : str
        A key of :data:`CONFIGS`.
    designs : iterable of str
        Keys of :data:`DESIGNS`, in the order to generate them.
    out_dir : Path
        Folder for the Verilog and the manifest (created if needed).
    force : bool
        Overwrite files whose content differs.
    progress : callable, optional
        Called with a short line before each (possibly slow) elaboration.
    target : str
        A key of :data:`TARGETS`: ``"simulation"`` (plain Verilog, what every bench runs) or
        ``"synthesis"`` (the packed array as ``DSP48E2`` instances, what the resource
        estimate and the Vivado flow build; the ``top``, ``gemm`` and ``packed`` designs
        differ, the others are the same text).

    Returns
    -------
    GenerateReport

    Raises
    ------
    M3VitError
        Unknown configuration, target or design, nothing to generate, or a file that would
        be overwritten.
    """
    config = get_config(config_name)
    platform = get_target(target)
    selected = [get_design(name) for name in dict.fromkeys(designs)]
    out_dir = Path(out_dir)
    if not selected:
        raise M3VitError("no design to generate")
    texts: dict[str, str] = {}
    for design in selected:
        if progress is not None:
            progress(f"elaborating {design.name} ({design.module}) for {config_name}")
        texts[design.name] = to_verilog(design.elaborate(config), design.module, platform)

    manifest_path = out_dir / MANIFEST_NAME
    entries: dict[str, dict[str, str]] = {}
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text())
        except ValueError:
            previous = {}
        # Manifests written before targets existed hold simulation Verilog.
        previous_target = previous.get("target", "simulation")
        if previous.get("config") != config.to_dict():
            other = f"another configuration ({previous.get('config_name', 'unknown')})"
        elif previous_target != target:
            other = f"{previous_target}, not {target}"
        else:
            other = None
        if other is None:
            entries = dict(previous.get("designs", {}))
        elif not force:
            raise M3VitError(f"{out_dir} holds Verilog generated for {other}: pass --force "
                             "to replace it or choose another --out")
    for design in selected:
        entries[design.name] = {"file": f"{design.name}.v", "module": design.module,
                                "sha256": _sha256(texts[design.name])}
    manifest = {
        "config_name": config_name,
        "config": config.to_dict(),
        "config_hash": f"0x{config.config_hash():08x}",
        "target": target,
        "amaranth": amaranth.__version__,
        "designs": dict(sorted(entries.items())),
    }
    manifest_text = json.dumps(manifest, indent=2) + "\n"

    targets = [(d.name, out_dir / f"{d.name}.v", texts[d.name]) for d in selected]
    if not force:
        for _, path, text in targets:
            if path.is_file() and path.read_text() != text:
                raise M3VitError(f"{path} exists with different content: pass --force to "
                                 "overwrite it or choose another --out")
    verilog_files = [GeneratedFile(path, write_if_changed(path, text), name)
                     for name, path, text in targets]
    manifest_file = GeneratedFile(manifest_path, write_if_changed(manifest_path, manifest_text))
    return GenerateReport(verilog=verilog_files, manifest=manifest_file)
