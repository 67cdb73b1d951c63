"""Turn components into Verilog with ports named and directed by their signatures.

Every block that goes to Verilator (and later to Vivado) is emitted through
:func:`to_verilog`, so the port names a testbench sees follow one rule:
the signature path joined by ``__`` (``i_stream__valid``, ``o_stream__payload``).
"""

import os
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Const, Signal, ValueCastable

# The direction type `verilog.convert` itself uses for signature-derived ports; Amaranth 0.5
# (pinned in requirements.txt) has no public name for it.
from amaranth.hdl._ir import PortDirection
from amaranth.lib import wiring

__all__ = ["signature_ports", "to_verilog", "write_if_changed"]


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


def to_verilog(component: wiring.Component, name: str) -> str:
    """Convert a component to Verilog text with signature-derived ports.

    Parameters
    ----------
    component : wiring.Component
        The component to convert. Its ``sync`` domain, if used, adds ``clk`` and ``rst``.
    name : str
        Name of the top-level Verilog module (the ``hdl_toplevel`` of a bench).

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
    return verilog.convert(component, name=name, ports=signature_ports(component), emit_src=False)


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
