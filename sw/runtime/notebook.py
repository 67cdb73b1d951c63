"""What the PYNQ notebooks (``notebooks/``) share: backend choice, package, output folder.

The notebooks run unchanged on the ZCU104 and on the Verilated SoC model::

    backend = choose_backend(BACKEND)           # "auto": pynq where pynq finds a device
    acc = open_accelerator(backend, bitstream=BITSTREAM)
    package = prepare_package(acc, m3x=M3X, m3q=M3Q)
    acc.load(package.compiled)

On the board the accelerator is the overlay of ``BITSTREAM``; off it, the simulated CI
board (a 4 × 4 array, :data:`m3vit.hw.config.CI`). The package is the ``.m3x`` the user
points at, else the ``.m3q`` compiled for whatever hardware answered (compiling ``tiny``
takes milliseconds), else a randomly initialised ``tiny`` model quantized on a few
calibration images, so a fresh clone runs every notebook with nothing trained. The
environment variables below let CI (``tests/e2e/test_notebooks.py``) choose all of this
without editing a notebook.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import M3VitError

if TYPE_CHECKING:
    from m3vit.hw.config import AccelConfig

    from ..compiler.executable import Executable
    from ..quant.package import QuantizedModel
    from .driver import Accelerator

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "OUT_ENV",
    "NotebookPackage",
    "accelerator_config",
    "choose_backend",
    "open_accelerator",
    "output_dir",
    "prepare_package",
    "pynq_device_found",
]

#: What the notebooks' ``BACKEND`` parameter accepts.
BACKENDS = ("auto", "sim", "pynq")
#: Environment variable that sets the notebooks' ``BACKEND`` (default ``auto``).
BACKEND_ENV = "M3VIT_BACKEND"
#: Environment variable of the folder the notebooks save their figures in.
OUT_ENV = "M3VIT_NOTEBOOK_OUT"
DEFAULT_OUT = "build/notebooks"
#: Calibration images of the stand-in model: enough for sane scales, fast on a laptop.
STAND_IN_CALIBRATION_IMAGES = 4


def pynq_device_found() -> bool:
    """Whether PYNQ finds an FPGA device here (the ZCU104 running its PYNQ image).

    Off the board PYNQ's probe finds nothing (or PYNQ is not importable at all); the
    warnings it prints then are not news to a notebook that falls back to the simulator.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pynq

            return len(pynq.Device.devices) > 0
        except Exception:  # any failure to probe means "no board here"
            return False


def choose_backend(requested: str | None = None) -> str:
    """Resolve the notebooks' backend: ``sim`` or ``pynq``.

    Parameters
    ----------
    requested : {"auto", "sim", "pynq"}, optional
        ``auto`` (the default, also when ``None`` and :data:`BACKEND_ENV` is unset) picks
        ``pynq`` when :func:`pynq_device_found`, else ``sim``. ``None`` reads
        :data:`BACKEND_ENV`.

    Returns
    -------
    str
        ``"sim"`` or ``"pynq"``.

    Raises
    ------
    M3VitError
        For any other value.
    """
    if requested is None:
        requested = os.environ.get(BACKEND_ENV, "auto")
    choice = requested.strip().lower()
    if choice not in BACKENDS:
        raise M3VitError(f"unknown backend {requested!r}: choose one of {', '.join(BACKENDS)} "
                         f"(parameter BACKEND or ${BACKEND_ENV})")
    if choice == "auto":
        return "pynq" if pynq_device_found() else "sim"
    return choice


def output_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder figures are saved in, created if needed.

    Parameters
    ----------
    path : path-like, optional
        The folder; by default :data:`OUT_ENV`, else ``build/notebooks``.
    """
    folder = Path(path if path is not None else os.environ.get(OUT_ENV) or DEFAULT_OUT)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_accelerator(backend: str, *, bitstream: str | os.PathLike | None = None,
                     config: str = "ci", **options) -> Accelerator:
    """Open the accelerator on ``backend`` (:func:`choose_backend`'s answer).

    Parameters
    ----------
    backend : {"sim", "pynq"}
        ``sim``: the Verilated SoC model of ``config``, built on first use (minutes) and
        cached under ``build/soc``; ``pynq``: ``bitstream`` loaded with ``pynq.Overlay``.
    bitstream : path-like, optional
        The ``.bit`` with its ``.hwh`` beside it (``pynq`` only).
    config : {"ci", "zcu104"}
        The hardware to simulate (``sim`` only).
    **options
        Passed to :meth:`m3vit.sw.runtime.driver.Accelerator.open` (``watchdog_cycles``, ...).

    Raises
    ------
    M3VitError
        Without a bitstream on ``pynq``, or when the board cannot be opened.
    """
    from .driver import Accelerator

    if backend == "pynq":
        if not bitstream:
            raise M3VitError("the pynq backend needs the bitstream: set BITSTREAM to the "
                             "copied .bit (its .hwh beside it)")
        return Accelerator.open("pynq", bitstream=bitstream, **options)
    if backend == "sim":
        from m3vit.hw.flow.generate import get_config

        return Accelerator.open("sim", config=get_config(config), progress=print, **options)
    raise M3VitError(f"unknown backend {backend!r}: choose sim or pynq")


def accelerator_config(acc: Accelerator) -> AccelConfig:
    """The configuration whose ``config_hash`` the opened bitstream reports.

    Raises
    ------
    M3VitError
        If no configuration this toolkit knows has that hash.
    """
    from m3vit.hw.flow.generate import CONFIGS

    for config in CONFIGS.values():
        if config.config_hash() == acc.config_hash:
            return config
    raise M3VitError(f"the {acc.board.name} bitstream is config {acc.config_hash:#010x}, none "
                     f"of this toolkit's ({', '.join(CONFIGS)}): point M3X at a package "
                     "compiled for it")


@dataclass(frozen=True)
class NotebookPackage:
    """The package a notebook runs and where it came from.

    Attributes
    ----------
    compiled : Executable
        What :meth:`~m3vit.sw.runtime.driver.Accelerator.load` takes.
    reference : QuantizedModel or None
        The quantized model it was compiled from, for bit-exact checks with
        ``golden.forward``; ``None`` when only the ``.m3x`` is at hand.
    source : str
        One line for the notebook to print.
    """

    compiled: Executable
    reference: QuantizedModel | None
    source: str


def _given(path: str | os.PathLike | None) -> Path | None:
    return Path(path) if path not in (None, "") else None


def prepare_package(acc: Accelerator, *, m3x: str | os.PathLike | None = None,
                    m3q: str | os.PathLike | None = None,
                    preset: str = "tiny") -> NotebookPackage:
    """Find or make the compiled package for the opened accelerator.

    In this order: the ``.m3x`` at ``m3x`` (with the ``.m3q`` at ``m3q`` as reference when
    that file exists); the ``.m3q`` compiled for the bitstream's configuration; a stand-in,
    the ``preset`` model randomly initialised (seed 0) and quantized on
    :data:`STAND_IN_CALIBRATION_IMAGES` images — its outputs mean nothing, but it runs every
    instruction a trained model runs.

    Parameters
    ----------
    acc : Accelerator
        The opened driver; its ``config_hash`` selects the configuration to compile for.
    m3x, m3q : path-like, optional
        Package files; ``None``, ``""`` or a path that does not exist count as not given
        (a missing ``m3x`` the user named is an error, a missing ``m3q`` is not).
    preset : str
        Model of the stand-in.

    Raises
    ------
    M3VitError
        If ``m3x`` does not exist or cannot be read, or ``m3q`` is not the model ``m3x``
        was compiled from.
    """
    from ..compiler.executable import compile_executable, load_executable
    from ..quant.package import content_hash, load_package
    from ..quant.quantize import validate_package

    m3x_path, m3q_path = _given(m3x), _given(m3q)
    reference = None
    if m3q_path is not None and m3q_path.is_file():
        reference = load_package(m3q_path, validate=validate_package)
    if m3x_path is not None:
        if not m3x_path.is_file():
            raise M3VitError(f"{m3x_path}: no such file (compile one with `m3vit compile "
                             "PACKAGE.m3q --config zcu104|ci`, or leave M3X empty)")
        compiled = load_executable(m3x_path)
        if reference is not None and content_hash(
                reference.config.to_dict(), reference.tensors,
                reference.params) != compiled.source_hash:
            raise M3VitError(f"{m3q_path} is not the package {m3x_path} was compiled from: "
                             "point M3Q at that one, or leave M3Q empty")
        where = f" (reference {m3q_path})" if reference is not None else \
            " (no .m3q: outputs are not compared with the golden model)"
        return NotebookPackage(compiled, reference, f"{m3x_path}{where}")
    config = accelerator_config(acc)
    if reference is not None:
        source = f"{m3q_path} compiled for the {config.pe_rows}x{config.gemm_cols} array"
    else:
        from ..model.config import get_preset
        from ..model.m3vit import M3ViT
        from ..quant.quantize import quantize

        reference = quantize(M3ViT(get_preset(preset), seed=0),
                             n_calib=STAND_IN_CALIBRATION_IMAGES)
        source = (f"stand-in: {preset} randomly initialised (seed 0), quantized on "
                  f"{STAND_IN_CALIBRATION_IMAGES} images, compiled for the "
                  f"{config.pe_rows}x{config.gemm_cols} array (train one with `make demo`)")
    return NotebookPackage(compile_executable(reference, config), reference, source)
