"""Fuzzing the file formats through the CLI (issue #18): damaged files end in one line.

Each *target* is a valid file of one format the toolkit reads — a quantized package
(``.m3q``), a compiled package (``.m3x``), a run report (``m3vit run --json``), a bitstream
manifest (``bitstreams/manifest.json``) and a training checkpoint — with the command that
reads it. Hypothesis draws *mutations* of the file:

- ``truncate``: the first k bytes;
- ``flip``: up to eight bit flips, anywhere or within the header;
- ``splice``: up to 64 random bytes written over the file (or past its end);
- ``field``: one field of the file's header set to a huge, negative, wrong-type or empty
  value (integers near 2⁶³, -1, NaN, strings, lists, objects), or deleted — offsets then
  point outside the file, sizes overflow, types mismatch. Formats with a checksum are
  *re-signed* after the change (the checksum recomputed), so the change reaches the checks
  behind the checksum rather than stopping at it.

Every case runs ``m3vit <command> <file>`` in this process under a time limit and must
end in one of two ways: **rejected** — exit status 2 and exactly one stderr line starting
``m3vit: error:`` — or **accepted**, and then (for the damaged-bytes mutations of a format
with a checksum) with the original content, never a silently different one. A traceback,
a hang past the limit, a second stderr line, or a change to any file of the corpus fails
the case; Hypothesis then shrinks it to the smallest such mutation.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import resource
import shutil
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import short_repr

__all__ = ["FuzzStats", "Target", "fuzz", "make_corpus"]

#: Seconds one case may take before it counts as a hang.
CASE_LIMIT_S = 60.0

#: What a header field is set to: extremes, wrong types, empties.
ODD_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, -(2**31), 2**31, 2**32 + 7, 2**63, -(2**63), 10**30, 1.5,
    -0.0, float("nan"), float("inf"), "", "x", "0x1", "A" * 4096, [], [0], [-1, 2**40],
    {}, {"a": 1},
)


class Hang(BaseException):
    """A case ran past :data:`CASE_LIMIT_S` (a BaseException: no ``except Exception`` in
    the code under test swallows it)."""


@dataclass
class Target:
    """One format: its valid file, the command that reads it, how to re-encode its header.

    Attributes
    ----------
    name : str
        The format (``m3q``, ``m3x``, ``report``, ``manifest``, ``checkpoint``).
    data : bytes
        The valid file.
    filename : str
        The file's name in a case folder.
    argv : callable
        ``argv(file, case_folder)``: the ``m3vit`` arguments that read it.
    header_end : int
        Bytes at the start that hold the header (bit flips aimed there hit the checks).
    tree : object
        The header as JSON-like data (what ``field`` mutations change).
    encode : callable
        ``encode(tree, resign)``: the file with that header (re-signed when ``resign``).
    same_content : callable, optional
        ``same_content(file)``: whether an accepted file holds the original content; a
        format without a checksum has none.
    setup : callable, optional
        ``setup(case_folder)``: what the command needs beside the file.
    """

    name: str
    data: bytes
    filename: str
    argv: Callable[[Path, Path], list[str]]
    header_end: int
    tree: Any
    encode: Callable[[Any, bool], bytes]
    same_content: Callable[[Path], bool] | None = None
    setup: Callable[[Path], None] | None = None


@dataclass
class FuzzStats:
    """What a fuzz run did: cases per target and mutation kind, rejected and accepted."""

    cases: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def total(self) -> int:
        """Cases run."""
        return sum(self.cases.values())


# ---- mutations -------------------------------------------------------------------------


def _paths(tree: Any, limit: int = 600) -> list[tuple]:
    """Every node's path in ``tree`` (dict keys and list indices), breadth first."""
    out: list[tuple] = []
    queue: list[tuple[tuple, Any]] = [((), tree)]
    while queue and len(out) < limit:
        path, node = queue.pop(0)
        items = (node.items() if isinstance(node, dict)
                 else enumerate(node) if isinstance(node, list) else ())
        for k, v in items:
            out.append((*path, k))
            queue.append(((*path, k), v))
    return out


def _set(tree: Any, path: tuple, value: Any, delete: bool) -> Any:
    tree = copy.deepcopy(tree)
    node = tree
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


def mutations(target: Target):
    """The Hypothesis strategy of ``(kind, description, bytes)`` for ``target``."""
    from hypothesis import strategies as st

    data = target.data
    n = len(data)

    def truncate(k):
        return ("truncate", f"truncated to {k} of {n} bytes", data[:k])

    def flip(flips):
        b = bytearray(data)
        for pos, bit in flips:
            b[pos] ^= 1 << bit
        return ("flip", f"bits flipped at {sorted(p for p, _ in flips)}", bytes(b))

    def splice(args):
        pos, chunk = args
        b = bytearray(data)
        b[pos:pos + len(chunk)] = chunk
        return ("splice", f"{len(chunk)} bytes written at {pos}", bytes(b))

    paths = _paths(target.tree)

    def set_field(args):
        path, value, delete = args
        resign = "sha256" not in path and "hash" not in path
        tree = _set(target.tree, path, value, delete)
        what = "deleted" if delete else f"set to {short_repr(value)}"
        return ("field", f"header field {list(path)} {what}", target.encode(tree, resign))

    position = st.one_of(st.integers(0, n - 1), st.integers(0, max(0, target.header_end - 1)))
    values = st.one_of(st.sampled_from(ODD_VALUES), st.integers(), st.text(max_size=12))
    return st.one_of(
        st.integers(0, n - 1).map(truncate),
        st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=8).map(flip),
        st.tuples(position, st.binary(min_size=1, max_size=64)).map(splice),
        st.tuples(st.sampled_from(paths), values, st.booleans()
                  ).map(set_field) if paths else st.nothing(),
    )



# ---- one case ----------------------------------------------------------------------------


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _alarm(_signum, _frame):
    raise Hang


def run_case(target: Target, kind: str, what: str, data: bytes, work: Path,
             protected: Path, stats: FuzzStats) -> None:
    """Run one mutated file through its command; raise AssertionError on a failure."""
    from m3vit.sw.cli import main

    case = work / "case"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    if target.setup is not None:
        target.setup(case)
    path = case / target.filename
    path.write_bytes(data)
    before = _tree_digest(protected)
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(target.argv(path, case))
    except Hang:
        raise AssertionError(f"{target.name}, {what}: no answer within {CASE_LIMIT_S:g} s"
                             ) from None
    except BaseException as e:   # a traceback the user would have seen
        raise AssertionError(f"{target.name}, {what}: {type(e).__name__}: {e}") from e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    stats.cases[(target.name, kind)] += 1
    assert _tree_digest(protected) == before, f"{target.name}, {what}: the corpus changed"
    lines = err.getvalue().strip().splitlines()
    if rc == 0:
        stats.accepted[(target.name, kind)] += 1
        if kind != "field" and target.same_content is not None:
            assert target.same_content(path), \
                f"{target.name}, {what}: accepted with content other than the original"
        return
    stats.rejected[(target.name, kind)] += 1
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("m3vit: error: "), \
        f"{target.name}, {what}: exit status {rc}, stderr {err.getvalue()!r}"


def fuzz(targets: list[Target], examples: int, work: str | Path, protected: str | Path, *,
         seed: int = 0, say: Callable[[str], None] = lambda _m: None) -> FuzzStats:
    """Run ``examples`` Hypothesis-drawn mutations of each target through its command.

    Parameters
    ----------
    targets : list of Target
        From :func:`make_corpus`.
    examples : int
        Cases a target (Hypothesis's ``max_examples``).
    work : path-like
        Where each case's folder goes.
    protected : path-like
        The corpus folder: no case may change a file in it.
    seed : int
        Hypothesis's seed: the same seed draws the same cases.
    say : callable
        Told about each target's figures.

    Returns
    -------
    FuzzStats

    Raises
    ------
    AssertionError
        The first failing case, shrunk by Hypothesis to its smallest mutation.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    stats = FuzzStats()
    start = time.monotonic()
    def cases_of(target: Target):
        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None,
                  phases=(Phase.generate, Phase.shrink), print_blob=False,
                  suppress_health_check=list(HealthCheck))
        @given(mutations(target))
        def case(mutation):
            kind, what, data = mutation
            run_case(target, kind, what, data, Path(work), Path(protected), stats)

        return case

    for target in targets:
        case = cases_of(target)
        t0 = time.monotonic()
        case()
        n = sum(v for (t, _), v in stats.cases.items() if t == target.name)
        bad = sum(v for (t, _), v in stats.rejected.items() if t == target.name)
        say(f"{target.name}: {n} cases, {bad} rejected in one line, {n - bad} accepted "
            f"({time.monotonic() - t0:.0f} s)")
    stats.seconds = time.monotonic() - start
    stats.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return stats


# ---- the corpus --------------------------------------------------------------------------


def make_corpus(folder: str | Path, *, report: Path | None = None) -> list[Target]:
    """Write one valid file of each format into ``folder``; their targets.

    Parameters
    ----------
    folder : path-like
        The corpus folder (created; the bitstream build folder goes there too).
    report : Path, optional
        A run report (``m3vit run --json``) to fuzz; without one the report target is left
        out (making one needs the Verilated SoC model).

    Returns
    -------
    list of Target
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from m3vit.hw.flow.generate import get_config

    from ..compiler.executable import compile_executable
    from ..model.config import get_preset
    from ..model.m3vit import M3ViT
    from ..model.train import save_checkpoint
    from ..quant.package import save_package
    from ..quant.quantize import quantize

    model = M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0)
    ckpt = save_checkpoint(folder / "tiny.pt", model, {"steps": 0}, overwrite=True)
    pkg = quantize(model, n_calib=4)
    m3q = folder / "tiny.m3q"
    save_package(m3q, pkg, overwrite=True)
    exe = compile_executable(pkg, get_config("ci"))
    m3x = exe.save(folder / "tiny.ci.m3x", overwrite=True)
    targets = [_m3q_target(m3q), _m3x_target(m3x), _checkpoint_target(ckpt),
               _manifest_target(folder)]
    if report is not None:
        targets.append(_json_target("report", report.read_bytes(), "run.json",
                                    lambda p, _c: ["report", str(p), "--sequence"]))
    return targets


def _m3q_target(path: Path) -> Target:
    from safetensors.torch import load as st_load

    from ..quant.package import MANIFEST_KEY, content_hash, load_package

    data = path.read_bytes()
    (hl,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + hl])
    body = data[8 + hl:]
    tensors = st_load(data)
    original = load_package(path)
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    tree = {"header": {k: v for k, v in header.items() if k != "__metadata__"},
            "manifest": manifest}

    def encode(tree, resign):
        m = tree.get("manifest")
        if resign and isinstance(m, dict):
            with contextlib.suppress(Exception):
                m["hash"] = content_hash(m["config"], tensors, m["params"])
        head = dict(tree.get("header") or {})
        head["__metadata__"] = {MANIFEST_KEY: json.dumps(m)}
        raw = json.dumps(head).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + body

    def same(p):
        pkg = load_package(p)
        return content_hash(pkg.config.to_dict(), pkg.tensors, pkg.params) == \
            content_hash(original.config.to_dict(), original.tensors, original.params)

    return Target("m3q", data, "x.m3q", lambda p, _c: ["inspect", str(p)], 8 + hl, tree,
                  encode, same)


def _m3x_target(path: Path) -> Target:
    from ..compiler.executable import MAGIC, _digest, load_executable

    data = path.read_bytes()
    (n,) = struct.unpack_from("<I", data, 8)
    head = json.loads(data[12:12 + n])
    tail = data[12 + n:]
    cut = sum(sum(v) for v in head["program_sizes"].values())
    original = load_executable(path)

    def encode(tree, resign):
        if resign and isinstance(tree, dict):
            with contextlib.suppress(Exception):
                tree["sha256"] = _digest(tree, tail[:cut], tail[cut:])
        raw = json.dumps(tree).encode("ascii")
        return MAGIC + struct.pack("<I", len(raw)) + raw + tail

    def same(p):
        exe = load_executable(p)
        return (exe.image, exe.programs) == (original.image, original.programs)

    return Target("m3x", data, "x.m3x", lambda p, _c: ["estimate", str(p)], 12 + n, head,
                  encode, same)


def _checkpoint_target(path: Path) -> Target:
    import torch

    from ..model.train import load_checkpoint

    data = path.read_bytes()
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.pop("state_dict")
    original, _ = load_checkpoint(path)

    def encode(tree, resign):
        from ..model.train import checkpoint_hash

        tree = dict(tree) if isinstance(tree, dict) else {"": tree}
        if resign:
            with contextlib.suppress(Exception):
                tree["hash"] = checkpoint_hash(tree["config"], state)
        buf = io.BytesIO()
        torch.save({**tree, "state_dict": state}, buf)
        return buf.getvalue()

    def same(p):
        model, _ = load_checkpoint(p)
        a, b = model.state_dict(), original.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The pickle (format, version, config, report, hash) sits at the zip's start.
    return Target("checkpoint", data, "x.pt",
                  lambda p, _c: ["evaluate", str(p), "--n-test", "4"], min(len(data), 4096),
                  blob, encode, same)


def _json_target(name: str, data: bytes, filename: str, argv, setup=None) -> Target:
    tree = json.loads(data)

    def encode(tree, _resign):
        return json.dumps(tree, indent=2, allow_nan=True).encode()

    return Target(name, data, filename, argv, len(data), tree, encode, None, setup)


def _manifest_target(folder: Path) -> Target:
    """``m3vit bitstream --collect`` of a finished (fake) build into a folder whose
    ``manifest.json`` is damaged and whose ``.bit`` it would replace."""
    from m3vit.hw.flow.vivado import write_project
    from m3vit.hw.flow.vivado.collect import collect

    build = folder / "vivado"
    shutil.rmtree(build, ignore_errors=True)
    write_project("ci", build)
    base = json.loads((build / "flow.json").read_text())["base_name"]
    results = build / "out"
    results.mkdir(exist_ok=True)
    (results / f"{base}.bit").write_bytes(b"BITSTREAM")
    (results / f"{base}.hwh").write_text("<MODULES/>")
    (results / "timing_summary.rpt").write_text(_TIMING)
    (results / "build_info.txt").write_text("vivado_version 2025.2\npl_clk0_hz 99999001\n")
    landed = folder / "bitstreams"
    shutil.rmtree(landed, ignore_errors=True)
    collect(build, landed)
    data = (landed / "manifest.json").read_bytes()

    def setup(case):
        (case / f"{base}.bit").write_bytes(b"BITSTREAM")

    return _json_target("manifest", data, "manifest.json",
                        lambda _p, c: ["bitstream", "--config", "ci", "--collect",
                                       "--build-dir", str(build), "--out", str(c)], setup)


_TIMING = """\
| Design Timing Summary
| ---------------------

    WNS(ns)      TNS(ns)  TNS Failing Endpoints  TNS Total Endpoints      WHS(ns)      THS(ns)  THS Failing Endpoints  THS Total Endpoints     WPWS(ns)     TPWS(ns)  TPWS Failing Endpoints  TPWS Total Endpoints
    -------      -------  ---------------------  -------------------      -------      -------  ---------------------  -------------------     --------     --------  ----------------------  --------------------
      0.100        0.000                      0                  100        0.010        0.000                      0                  100        0.500        0.000                       0                   100

"""  # noqa: E501



def make_report(folder: str | Path, m3x: Path, m3q: Path) -> Path:
    """A run report of two images on the Verilated CI SoC model (``m3vit run --json``)."""
    from m3vit.sw.cli import main

    path = Path(folder) / "run.json"
    path.unlink(missing_ok=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["run", str(m3x), "--images", "2", "--check", str(m3q), "--json", str(path)])
    if rc != 0:
        raise RuntimeError(f"m3vit run failed: {out.getvalue()[-500:]}")
    return path


#: The address space a fuzz run may use: a case that tries to allocate more fails as a
#: MemoryError (a traceback: a failed case) instead of taking the machine down.
MEMORY_LIMIT = 8 << 30


def main(argv: list[str] | None = None) -> int:
    """``python -m m3vit.sw.bench.fuzz_files``: fuzz every format, print and save figures."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m m3vit.sw.bench.fuzz_files",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="cases a format")
    parser.add_argument("--work", type=Path, default=Path("build/fuzz"),
                        help="corpus and case folders (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed")
    parser.add_argument("--no-report", action="store_true",
                        help="leave out the run report (it needs the Verilated SoC model)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    corpus = args.work / "corpus"
    targets = make_corpus(corpus)
    if not args.no_report:
        report = make_report(corpus, corpus / "tiny.ci.m3x", corpus / "tiny.m3q")
        targets.append(_json_target("report", report.read_bytes(), "run.json",
                                    lambda p, _c: ["report", str(p), "--sequence"]))
    stats = fuzz(targets, args.examples, args.work / "cases", corpus, seed=args.seed,
                 say=print)
    rows = [{"format": t, "mutation": k, "cases": n, "rejected": stats.rejected[(t, k)],
             "accepted": stats.accepted[(t, k)]} for (t, k), n in sorted(stats.cases.items())]
    figures = {"examples": args.examples, "seed": args.seed, "cases": stats.total,
               "failures": 0, "seconds": round(stats.seconds, 1),
               "peak_rss_mb": round(stats.peak_rss_mb), "memory_limit_gib": MEMORY_LIMIT >> 30,
               "rows": rows}
    print(f"{stats.total} cases, 0 failures, {stats.seconds:.0f} s, peak RSS "
          f"{stats.peak_rss_mb:.0f} MB (limit {MEMORY_LIMIT >> 30} GiB)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
