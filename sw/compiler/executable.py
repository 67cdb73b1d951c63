"""The compiled package (``.m3x``): what the runtime loads onto a board.

``m3vit compile`` turns a quantized package (``.m3q``) and an :class:`AccelConfig` into one
DDR image and one program per batch size (1 … ``max_batch`` images a run) that run every
task (:func:`m3vit.sw.compiler.lower.compile_model`),
plus what the host needs around them: the memory map, each task's ``TASK_SELECT`` value,
the input and output regions, the input scale and each head's output scales. The file is
bound to the hardware configuration by its ``config_hash``, which the runtime compares with
the bitstream's ``CONFIG_HASH`` register before it loads anything.

File layout (``docs/package.md``)::

    b"M3VITX\\0\\4"                      8 bytes: magic and format version
    u32 header length (little-endian)
    header                               UTF-8 JSON (below)
    programs                             header["program_sizes"]: the full programs, batch 1
                                         first, then the shared ones, then the task ones
    image                                header["image_size"] bytes

The header's ``sha256`` is the SHA-256 of the header without that key (canonical JSON),
the programs and the image, in that order: any changed byte is reported as corruption.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3vit.hw.config import AccelConfig
from m3vit.hw.isa import ExpertOrder

from ..errors import M3VitError
from ..model.config import ModelConfig

__all__ = [
    "EXECUTABLE_SUFFIX",
    "Executable",
    "compile_executable",
    "load_executable",
]

EXECUTABLE_SUFFIX = ".m3x"
MAGIC = b"M3VITX\x00\x04"
_REDO = "the file is corrupted or was edited; re-run `m3vit compile`"
_HEADER_KEYS = frozenset({
    "format", "model", "config", "config_hash", "source_hash", "order", "program_sizes",
    "image_size", "regions", "tasks", "input", "output", "head_tiles", "input_scale",
    "out_scales", "act_buffer_peak", "sha256",
})


@dataclass(frozen=True, eq=False)
class Executable:
    """A model compiled for one accelerator configuration, ready to load.

    Attributes
    ----------
    model : ModelConfig
        The model's architecture.
    config : AccelConfig
        The hardware it was compiled for.
    programs : tuple of bytes
        Encoded instructions of each batch size: ``programs[b - 1]`` runs b images at once
        (loaded side by side; ``PROGRAM_BASE`` points at the one that runs).
    shared_programs, task_programs : tuple of bytes
        The same split in two, per batch size: what every task shares (stored in region
        ``shared.x``), and the rest for the selected task (``--task all``:
        :data:`m3vit.sw.compiler.lower.PARTS`).
    image : bytes
        The data window, loaded at ``DATA_BASE`` (``DATA_SIZE = len(image)``).
    regions : dict of str to (offset, size)
        The memory map: every region of the data window.
    tasks : tuple of str
        Task names in ``TASK_SELECT`` order.
    input_offset, input_size : int
        Where image 0 of a batch has its patches (:func:`m3vit.sw.compiler.lower.patch_words`);
        image b's are ``b · input_size`` further.
    output_offset, output_size : int
        Where the head writes image 0's output (``head_tiles`` × N_patches × ``gemm_cols``
        INT32); image b's is ``b · output_size`` further.
    head_tiles : int
        N-tiles of the head GEMM.
    input_scale : float
        Scale of the INT8 input image (``golden.quantize_image``).
    out_scales : dict of str to list of float
        Per task, the per-channel scales that turn head accumulators into predictions.
    source_hash : str
        Content hash of the ``.m3q`` it was compiled from.
    order : ExpertOrder
        Schedule compiled into the ``EXPERTS`` loops (``REGISTER``: the host chooses).
    act_buffer_peak : int
        Activation-buffer words the program uses at most.
    """

    model: ModelConfig
    config: AccelConfig
    programs: tuple[bytes, ...]
    image: bytes
    regions: dict[str, tuple[int, int]]
    tasks: tuple[str, ...]
    input_offset: int
    input_size: int
    output_offset: int
    output_size: int
    head_tiles: int
    input_scale: float
    out_scales: dict[str, list[float]]
    source_hash: str
    order: ExpertOrder = ExpertOrder.REGISTER
    act_buffer_peak: int = 0
    shared_programs: tuple[bytes, ...] = ()
    task_programs: tuple[bytes, ...] = ()

    def all_programs(self) -> list[tuple[str, int, bytes]]:
        """Every program as (part, batch, bytes), in file order."""
        return [(part, b + 1, p) for part, group in (("full", self.programs),
                                                     ("shared", self.shared_programs),
                                                     ("task", self.task_programs))
                for b, p in enumerate(group)]

    @property
    def program(self) -> bytes:
        """The one-image program (``programs[0]``)."""
        return self.programs[0]

    @property
    def max_batch(self) -> int:
        """Most images one run computes (each expert's weights read once for all)."""
        return len(self.programs)

    def program_for(self, batch: int) -> bytes:
        """The program that runs ``batch`` images at once.

        Raises
        ------
        M3VitError
            For a batch outside 1 … :attr:`max_batch`.
        """
        if not isinstance(batch, int) or not 1 <= batch <= self.max_batch:
            raise M3VitError(f"batch {batch!r} is not in 1…{self.max_batch}: this package was "
                             f"compiled with --max-batch {self.max_batch} (re-run `m3vit "
                             "compile` with a larger one)")
        return self.programs[batch - 1]

    @property
    def config_hash(self) -> int:
        """``AccelConfig.config_hash()`` of the hardware this package runs on."""
        return self.config.config_hash()

    def task_select(self, task: str) -> int:
        """``TASK_SELECT`` value of ``task``; an unknown task raises :class:`M3VitError`."""
        if task not in self.tasks:
            raise M3VitError(f"unknown task {task!r}: this package has "
                             f"{', '.join(self.tasks)}")
        return self.tasks.index(task)

    def check_hardware(self, config_hash: int, hardware: str, where: str = "") -> None:
        """Refuse hardware of another configuration than the one compiled for.

        Parameters
        ----------
        config_hash : int
            The hardware's ``CONFIG_HASH``.
        hardware : str
            How the message names it, e.g. ``"the sim bitstream"``.
        where : str
            Prefix of the message (the file's path), if any.

        Raises
        ------
        M3VitError
            One line naming both hashes and what to do.
        """
        if config_hash != self.config_hash:
            raise M3VitError(
                f"{where}compiled for hardware config {self.config_hash:#010x} "
                f"({self.config.pe_rows}x{self.config.gemm_cols} array), but {hardware} is "
                f"config {config_hash:#010x}: re-run `m3vit compile` with its --config")

    def weight_bytes(self) -> int:
        """Bytes of the data window that are not the input or output region."""
        return len(self.image) - self.max_batch * (self.input_size + self.output_size)

    def memory_map(self) -> list[str]:
        """The data window's regions as text lines (offset, size, name), offset order."""
        rows = sorted(self.regions.items(), key=lambda kv: kv[1][0])
        lines = [f"{'offset':>10} {'bytes':>10}  region"]
        for name, (offset, size) in rows:
            lines.append(f"{offset:#10x} {size:>10,}  {name}")
        return lines

    # ---- file ------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        """The JSON header (without ``sha256``)."""
        return {
            "format": "m3vit-compiled/2",
            "model": self.model.to_dict(),
            "config": self.config.to_dict(),
            "config_hash": self.config_hash,
            "source_hash": self.source_hash,
            "order": self.order.name,
            "program_sizes": {"full": [len(p) for p in self.programs],
                              "shared": [len(p) for p in self.shared_programs],
                              "task": [len(p) for p in self.task_programs]},
            "image_size": len(self.image),
            "regions": {k: list(v) for k, v in self.regions.items()},
            "tasks": list(self.tasks),
            "input": [self.input_offset, self.input_size],
            "output": [self.output_offset, self.output_size],
            "head_tiles": self.head_tiles,
            "input_scale": self.input_scale,
            "out_scales": self.out_scales,
            "act_buffer_peak": self.act_buffer_peak,
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the package to ``path`` (atomically); refuse to replace a file unless asked.

        Raises
        ------
        M3VitError
            If ``path`` exists and ``overwrite`` is false.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise M3VitError(f"{path} exists: pass --force to overwrite it or choose another "
                             "--out")
        head = self.header()
        head["sha256"] = _digest(head, b"".join(p for *_, p in self.all_programs()),
                                 self.image)
        text = _canonical(head).encode("ascii")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(text)) + text)
            for *_, program in self.all_programs():
                f.write(program)
            f.write(self.image)
        os.replace(tmp, path)
        return path


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def _digest(head: dict[str, Any], program: bytes, image: bytes) -> str:
    h = hashlib.sha256()
    h.update(_canonical({k: v for k, v in head.items() if k != "sha256"}).encode("ascii"))
    h.update(program)
    h.update(image)
    return h.hexdigest()


def _not_json(name: str) -> Any:
    # json.loads takes NaN and Infinity, which the writer never emits (nor can hash).
    raise ValueError(f"{name} is not JSON")


def _check_head(head: dict[str, Any], image_size: int) -> None:
    """Raise ValueError unless every header field has its type and lies in range: a header
    that passes the checksum may still come from a damaged or hand-edited writer."""

    def count(value: Any, what: str, low: int = 0) -> int:
        if type(value) is not int or not low <= value < 1 << 40:
            raise ValueError(f"{what} is {value!r}, not a count")
        return value

    def span(value: Any, what: str) -> None:
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"{what} is not an (offset, size) pair")
        offset, size = count(value[0], what), count(value[1], what)
        if offset + size > image_size:
            raise ValueError(f"{what} ends past the image ({offset} + {size} > {image_size})")

    for key in ("model", "config", "regions", "out_scales"):
        if not isinstance(head[key], dict):
            raise ValueError(f"{key} is not an object")
    for key in ("source_hash", "order"):
        if not isinstance(head[key], str):
            raise ValueError(f"{key} is not a string")
    count(head["config_hash"], "config_hash")
    count(head["head_tiles"], "head_tiles", 1)
    count(head["act_buffer_peak"], "act_buffer_peak")
    for name, value in head["regions"].items():
        span(value, f"region {name}")
    span(head["input"], "input")
    span(head["output"], "output")
    scale = head["input_scale"]
    if type(scale) not in (int, float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"input_scale is {scale!r}")
    if not isinstance(head["tasks"], list) or not all(isinstance(t, str) for t in head["tasks"]):
        raise ValueError("tasks is not a list of names")
    for task, scales in head["out_scales"].items():
        if (not isinstance(scales, list) or not scales
                or not all(type(v) in (int, float) and math.isfinite(v) and v > 0
                           for v in scales)):
            raise ValueError(f"the output scales of {task} are not positive numbers")


def load_executable(path: str | os.PathLike) -> Executable:
    """Read and check a ``.m3x`` file.

    Raises
    ------
    M3VitError
        One line naming the problem: missing file, not a compiled package (e.g. a ``.m3q``
        given by mistake), truncated or corrupted content, an unreadable header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise M3VitError(f"{path}: no such file (compile one with `m3vit compile`)") from None
    except OSError as e:
        raise M3VitError(f"{path}: cannot read it: {e.strerror}") from None
    if raw[:6] != MAGIC[:6]:
        hint = (" (that is a quantized package: compile it first with `m3vit compile`)"
                if path.suffix == ".m3q" or raw[8:9] == b"{" else "")
        raise M3VitError(f"{path}: not a compiled m3vit package{hint}")
    if raw[:8] != MAGIC:
        raise M3VitError(f"{path}: compiled-package version {raw[6:8].hex()} is not "
                         f"{MAGIC[6:8].hex()}; re-run `m3vit compile` with this toolkit")
    try:
        (n,) = struct.unpack_from("<I", raw, 8)
        head = json.loads(raw[12:12 + n].decode("ascii"), parse_constant=_not_json)
        if not isinstance(head, dict) or set(head) != _HEADER_KEYS:
            raise ValueError("unexpected header keys")
        start = 12 + n
        groups = head["program_sizes"]
        if not isinstance(groups, dict) or set(groups) != {"full", "shared", "task"}:
            raise ValueError("bad program sizes")
        programs: dict[str, list[bytes]] = {}
        for part in ("full", "shared", "task"):
            sizes = groups[part]
            if (not isinstance(sizes, list) or len(sizes) != len(groups["full"])
                    or not all(isinstance(v, int) and v > 0 for v in sizes)):
                raise ValueError("bad program sizes")
            programs[part] = []
            for size in sizes:
                programs[part].append(raw[start:start + size])
                start += size
                if len(programs[part][-1]) != size:
                    raise ValueError("truncated")
        if not programs["full"]:
            raise ValueError("no program")
        image = raw[start:]
        if len(image) != head["image_size"]:
            raise ValueError("truncated")
    except (struct.error, UnicodeDecodeError, ValueError, TypeError, KeyError,
            RecursionError):
        raise M3VitError(f"{path}: {_REDO}") from None
    if _digest(head, b"".join(b"".join(programs[p]) for p in ("full", "shared", "task")),
               image) != head["sha256"]:
        raise M3VitError(f"{path}: checksum mismatch: {_REDO}")
    try:
        _check_head(head, len(image))
        model = ModelConfig.from_dict(head["model"])
        config = AccelConfig(**head["config"])
        order = ExpertOrder[head["order"]]
        if tuple(head["tasks"]) != tuple(model.task_names) or set(head["out_scales"]) != set(
                head["tasks"]):
            raise ValueError("its tasks disagree with its model")
    except (M3VitError, TypeError, KeyError, ValueError, AttributeError) as e:
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise M3VitError(f"{path}: unreadable configuration ({what}); re-run `m3vit compile`"
                         ) from None
    if config.config_hash() != head["config_hash"]:
        raise M3VitError(f"{path}: config hash {head['config_hash']:#010x} does not match its "
                         "configuration; re-run `m3vit compile` with this toolkit")
    return Executable(
        model=model, config=config, programs=tuple(programs["full"]), image=image,
        regions={k: (int(v[0]), int(v[1])) for k, v in head["regions"].items()},
        tasks=tuple(head["tasks"]), input_offset=head["input"][0],
        input_size=head["input"][1], output_offset=head["output"][0],
        output_size=head["output"][1], head_tiles=head["head_tiles"],
        input_scale=float(head["input_scale"]), out_scales=head["out_scales"],
        source_hash=head["source_hash"], order=order,
        act_buffer_peak=head["act_buffer_peak"],
        shared_programs=tuple(programs["shared"]), task_programs=tuple(programs["task"]))


def compile_executable(pkg, config: AccelConfig, *,
                       order: ExpertOrder = ExpertOrder.REGISTER,
                       max_batch: int = 1) -> Executable:
    """Compile a quantized package for ``config``.

    Parameters
    ----------
    pkg : QuantizedModel
        The quantized model (``m3vit quantize``).
    config : AccelConfig
        The accelerator it will run on.
    order : ExpertOrder
        Schedule of the MoE layers; ``REGISTER`` (default) leaves it to the runtime.
    max_batch : int
        Most images one run computes (a program for each batch size up to it);
        :func:`m3vit.sw.compiler.lower.largest_batch` gives the largest that fits.

    Raises
    ------
    M3VitError
        When the model does not fit ``config``; the message names the capacity.
    """
    from ..quant.package import content_hash
    from .lower import compile_model

    compiled = compile_model(pkg.tensors, pkg.config, config, order=order,
                             max_batch=max_batch)
    t = pkg.tensors
    return Executable(
        model=pkg.config, config=config, programs=compiled.programs,
        image=bytes(compiled.image.data), regions=dict(compiled.image.regions),
        tasks=tuple(compiled.tasks.tasks), input_offset=compiled.input_offset,
        input_size=compiled.input_size, output_offset=compiled.output_offset,
        output_size=compiled.output_size, head_tiles=compiled.head_tiles,
        input_scale=float(pkg.params["scales"]["input"]),
        out_scales={task: [float(v) for v in t[f"heads.{task}.out_scale"].flatten()]
                    for task in pkg.config.task_names},
        source_hash=content_hash(pkg.config.to_dict(), pkg.tensors, pkg.params),
        order=order, act_buffer_peak=compiled.plan.peak,
        shared_programs=compiled.shared_programs, task_programs=compiled.task_programs)
