"""The host runtime: one driver for the accelerator on any :class:`~m3vit.sw.runtime.board.Board`.

::

    with Accelerator.open("sim", config=CI) as acc:     # or open("pynq", bitstream=...)
        acc.load("runs/tiny.ci.m3x")                   # weights, tables, program: once
        acc.set_task("semseg")                         # one register write
        out = acc.infer(images)                        # (B, C, H, W) float images
        out.heads, out.predictions, out.runs[0].cycles

The data path is the explicit pipeline of ``STYLE.md``: float image → INT8
(``golden.quantize_image``) → patch rows (``golden.patchify``) → the input region's
slice-major words (``compiler.patch_words``) → DMA → run → the head's INT32 words →
(N_patches, n_out) accumulators (``compiler.head_output``) → float predictions
(``golden.dequantize_head`` and ``golden.upsample``). The board holds one buffer with
the program and the data window; a task switch writes ``TASK_SELECT`` and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from m3vit.hw.config import AccelConfig
from m3vit.hw.registers import (
    ID_MAGIC,
    MAX_TRACE_PORTS,
    REGISTER_MAP,
    TRACE_DEPTH,
    VERSION,
    ErrorCode,
    Schedule,
)

from ..compiler.executable import Executable, load_executable
from ..compiler.layout import head_output, patch_words
from ..errors import M3VitError
from ..model.imageio import load_image
from ..quant import golden
from .board import Board, Buffer

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    #: What :meth:`Accelerator.infer` takes: normalised images, or files and PIL images.
    Images = (torch.Tensor | str | os.PathLike | PILImage
              | Sequence[torch.Tensor | str | os.PathLike | PILImage])

__all__ = [
    "Accelerator",
    "AcceleratorError",
    "AllTaskOutputs",
    "RunStats",
    "TaskOutputs",
    "TraceEntry",
    "WatchdogError",
    "as_image_batch",
]

#: Default watchdog: no image of a model that fits the ZCU104 needs more (edge-moe ≈ 1.5 M
#: cycles; a token-by-token run ≈ 30 M); 0.33 s at 300 MHz.
DEFAULT_WATCHDOG_CYCLES = 100_000_000
#: Cycles an ABORT gets to stop the run cleanly before the watchdog resets the logic.
ABORT_GRACE_CYCLES = 100_000
_PROGRAM_ALIGN = 4096  # the program and the data window start on their own pages


def as_image_batch(images: Images, img_size: tuple[int, int]) -> torch.Tensor:
    """The model's input for ``images``: a tensor as it is, files and PIL images loaded.

    Parameters
    ----------
    images : torch.Tensor, path-like, PIL.Image.Image or a sequence of them
        A tensor is returned unchanged. A path or a PIL image, or a list of them, is read,
        fitted to ``img_size`` and normalised by
        :func:`~m3vit.sw.model.imageio.load_image`; (C, H, W) tensors may be mixed in.
    img_size : tuple of int
        The model's (height, width).

    Returns
    -------
    torch.Tensor
        (N, C, H, W), or the tensor given.

    Raises
    ------
    M3VitError
        For a file that cannot be read (one line naming it), an empty list or another type.
    """
    if isinstance(images, torch.Tensor):
        return images
    from PIL import Image

    def is_file_or_picture(item) -> bool:
        return isinstance(item, (str, os.PathLike, Image.Image))

    single = is_file_or_picture(images)
    items = [images] if single else images
    if not isinstance(items, (list, tuple)) or not items:
        raise M3VitError("images must be a torch.Tensor, an image file, a PIL image or a "
                         f"non-empty list of them, got {type(images).__name__}")
    batch = []
    for item in items:
        if isinstance(item, torch.Tensor):
            batch.append(item)
        elif is_file_or_picture(item):
            batch.append(load_image(item, img_size))
        else:
            raise M3VitError("images must be tensors, image files or PIL images, got a "
                             f"{type(item).__name__} in the list")
    shapes = {tuple(x.shape) for x in batch}
    if len(shapes) != 1:
        raise M3VitError(f"the images differ in shape ({', '.join(map(str, sorted(shapes)))})")
    return torch.stack(batch)


class AcceleratorError(M3VitError):
    """A run stopped with ``STATUS.ERROR``: the error code and the failing instruction."""

    def __init__(self, code: ErrorCode, pc: int):
        self.code, self.pc = code, pc
        super().__init__(f"the accelerator stopped with {code.name} at instruction {pc}; "
                         "the package may not match the bitstream (re-run `m3vit compile`)")


class WatchdogError(M3VitError):
    """A run did not finish in time; the accelerator was reset and can run again."""


@dataclass(frozen=True)
class RunStats:
    """Counters of one run, read from the accelerator after it finished.

    Attributes
    ----------
    cycles : int
        Cycles with ``STATUS.BUSY`` high.
    ddr_read_bytes, ddr_write_bytes : int
        Bytes the accelerator's DMA read and wrote.
    gemm_busy, vector_busy, weight_stall, instructions : int
        The other performance counters (``docs/registers.md``).
    clock_mhz : float
        The bitstream's clock, to turn cycles into time.
    images : int
        Images the run computed (its batch).
    """

    cycles: int
    ddr_read_bytes: int
    ddr_write_bytes: int
    gemm_busy: int
    vector_busy: int
    weight_stall: int
    instructions: int
    clock_mhz: float
    images: int = 1

    @property
    def latency_us(self) -> float:
        """Run time in microseconds at the bitstream's clock (the whole batch)."""
        return self.cycles / self.clock_mhz

    @property
    def cycles_per_image(self) -> float:
        """Cycles of the run shared out over its images."""
        return self.cycles / self.images

    @property
    def images_per_s(self) -> float:
        """Throughput of the run at the bitstream's clock."""
        return self.images * self.clock_mhz * 1e6 / self.cycles

    def to_dict(self) -> dict[str, float]:
        """Plain-JSON form (with ``latency_us``, ``cycles_per_image``, ``images_per_s``)."""
        d = dict(self.__dict__)
        d["latency_us"] = self.latency_us
        d["cycles_per_image"] = self.cycles_per_image
        d["images_per_s"] = self.images_per_s
        return d


@dataclass(frozen=True)
class TraceEntry:
    """One instruction of the last run, from the hardware trace (``docs/registers.md``).

    Attributes
    ----------
    pc : int
        The instruction's index in the program.
    opcode : int
        Its opcode (:class:`~m3vit.hw.isa.Opcode` value).
    start, end : int
        Its span in cycles since ``START``: from the previous instruction's end to its own
        (spans partition the run).
    read_bytes : tuple of int
        Bytes read from DDR over each master port during the span.
    write_bytes : int
        Bytes written during the span.
    drain : bool
        The span is the tail of a GEMM that handed over early (it retired when its stream
        was issued), ending when the instruction waiting for it could go on.
    """

    pc: int
    opcode: int
    start: int
    end: int
    read_bytes: tuple[int, ...]
    write_bytes: int
    drain: bool = False

    def to_list(self) -> list[int]:
        """Plain-JSON form: ``[pc, opcode, start, end, write_bytes, drain, *read_bytes]``."""
        return [self.pc, self.opcode, self.start, self.end, self.write_bytes,
                int(self.drain), *self.read_bytes]

    @classmethod
    def from_list(cls, row: list[int]) -> TraceEntry:
        """The inverse of :meth:`to_list`."""
        pc, opcode, start, end, write_bytes, drain, *reads = row
        return cls(pc, opcode, start, end, tuple(reads), write_bytes, bool(drain))


@dataclass
class TaskOutputs:
    """What :meth:`Accelerator.infer` returns for a batch of images and one task.

    Attributes
    ----------
    task : str
        The task that ran.
    heads : torch.Tensor
        (B, N_patches, n_out) int64: the head's INT32 accumulators.
    predictions : torch.Tensor
        (B, n_out, H, W) float: the task's prediction, as the float model gives it.
    runs : list of RunStats
        One per accelerator run (each computes ``RunStats.images`` of the images).
    """

    task: str
    heads: torch.Tensor
    predictions: torch.Tensor
    runs: list[RunStats] = field(default_factory=list)


@dataclass
class AllTaskOutputs:
    """What :meth:`Accelerator.infer_all` returns: every task of the images.

    Attributes
    ----------
    tasks : dict of str to TaskOutputs
        Per task its heads, predictions and the runs of its ``task`` program.
    shared_runs : list of RunStats
        The ``shared`` program's runs, one per batch (computed once for all tasks).
    """

    tasks: dict[str, TaskOutputs]
    shared_runs: list[RunStats]

    @property
    def cycles(self) -> int:
        """Cycles of every run: the shared ones and each task's."""
        return (sum(r.cycles for r in self.shared_runs)
                + sum(r.cycles for out in self.tasks.values() for r in out.runs))


class Accelerator:
    """Drive the M³ViT accelerator on a board: load a package, switch tasks, run images.

    Parameters
    ----------
    board : Board
        The board (``SimBoard`` or ``PynqBoard``); :meth:`open` builds one by name.
    watchdog_cycles : int
        A run still busy after this many cycles is aborted and, if the abort does not
        stop it, the logic is reset (:class:`WatchdogError`).
    schedule : Schedule
        How MoE layers run when the package leaves it to the host (``SCHEDULE``).

    Raises
    ------
    M3VitError
        If the board does not hold an m3vit accelerator of a compatible register map.
    """

    def __init__(self, board: Board, *, watchdog_cycles: int = DEFAULT_WATCHDOG_CYCLES,
                 schedule: Schedule = Schedule.EXPERT_BY_EXPERT):
        self.board = board
        self.watchdog_cycles = int(watchdog_cycles)
        if self.watchdog_cycles < 1:
            raise M3VitError(f"watchdog_cycles must be >= 1, got {watchdog_cycles!r}")
        ident = self._read("ID")
        if ident != ID_MAGIC:
            raise M3VitError(f"no m3vit accelerator on the {board.name} board: ID reads "
                             f"{ident:#010x}, expected {ID_MAGIC:#010x}")
        major = REGISTER_MAP["VERSION"].decode(self._read("VERSION"))["MAJOR"]
        if major != VERSION[0]:
            raise M3VitError(f"the bitstream's register map is version {major}.x, this "
                             f"runtime speaks {VERSION[0]}.x: rebuild the bitstream")
        self.config_hash = self._read("CONFIG_HASH")
        self.clock_mhz = self._read("CLOCK_KHZ") / 1000
        self.schedule = Schedule(schedule)
        self.package: Executable | None = None
        self.task: str | None = None
        self._buffer: Buffer | None = None
        self._program_base = self._data_base = 0
        self._program_bases: dict[tuple[str, int], int] = {}
        #: Bytes written to DDR by :meth:`load` (weights, tables, program) since opening.
        self.loaded_bytes = 0
        #: Register writes made by task switches since opening.
        self.switch_writes = 0

    # ---- construction ---------------------------------------------------------------

    @classmethod
    def open(cls, backend: str = "sim", *, config: AccelConfig | None = None,
             bitstream: str | os.PathLike | None = None, progress: Callable[[str], None]
             | None = None, **options) -> Accelerator:
        """Open a board by name and return its driver.

        Parameters
        ----------
        backend : {"sim", "pynq"}
            ``sim``: the Verilated SoC model of ``config`` (built on first use, then
            cached); ``pynq``: the ZCU104 with ``bitstream`` loaded through PYNQ.
        config : AccelConfig
            The hardware to simulate (``sim`` only).
        bitstream : path-like
            The ``.bit`` file (with its ``.hwh`` beside it) (``pynq`` only).
        progress : callable, optional
            Told about long steps (building the SoC model).
        **options
            ``watchdog_cycles``, ``schedule`` for the driver; the rest go to the board
            (``ddr_bytes``, ``timing``, ``trace_path`` for the simulator).
        """
        driver = {k: options.pop(k) for k in ("watchdog_cycles", "schedule") if k in options}
        if backend == "sim":
            if config is None:
                raise M3VitError("the sim backend needs the accelerator config to simulate")
            from .board import SimBoard

            board: Board = SimBoard(config, progress=progress, **options)
        elif backend == "pynq":
            if bitstream is None:
                raise M3VitError("the pynq backend needs --bitstream (a .bit with its .hwh)")
            from .pynq_board import PynqBoard

            board = PynqBoard(bitstream, **options)
        else:
            raise M3VitError(f"unknown backend {backend!r}: choose sim or pynq")
        try:
            return cls(board, **driver)
        except BaseException:
            board.close()
            raise

    def close(self) -> None:
        """Free the package's buffer and release the board."""
        if self._buffer is not None:
            self._buffer.free()
            self._buffer = None
        self.board.close()

    def __enter__(self) -> Accelerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- registers ------------------------------------------------------------------

    def _read(self, name: str) -> int:
        return self.board.read_register(REGISTER_MAP[name].offset)

    def _write(self, name: str, value: int) -> None:
        self.board.write_register(REGISTER_MAP[name].offset, value)

    def _write64(self, name: str, value: int) -> None:
        self._write(f"{name}_LO", value & 0xFFFF_FFFF)
        self._write(f"{name}_HI", value >> 32)

    # ---- package and task -----------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """The loaded package's tasks (empty before :meth:`load`)."""
        return self.package.tasks if self.package else ()

    def load(self, package: Executable | str | os.PathLike) -> None:
        """Put a compiled package in DDR: program, weights, tables; the first task selected.

        Raises
        ------
        M3VitError
            If the package was compiled for another hardware configuration than the
            bitstream's (``CONFIG_HASH``), or the file is not a valid package.
        """
        pkg = package if isinstance(package, Executable) else load_executable(package)
        where = "" if isinstance(package, Executable) else f"{Path(package)}: "
        pkg.check_hardware(self.config_hash, f"the {self.board.name} bitstream", where)
        if self._buffer is not None:
            self._buffer.free()
            self._buffer = None
        # Every program side by side (each batch size's, whole and split for --task all);
        # PROGRAM_BASE points at the one that runs.
        keys = [(part, batch) for part, batch, _ in pkg.all_programs()]
        programs = [p + bytes(-len(p) % _PROGRAM_ALIGN) for *_, p in pkg.all_programs()]
        starts = [sum(len(p) for p in programs[:i]) for i in range(len(programs))]
        program = b"".join(programs)
        buffer = self.board.allocate(len(program) + len(pkg.image))
        buffer.write(0, program)
        buffer.write(len(program), pkg.image)
        buffer.sync_to_device()
        self._buffer, self.package = buffer, pkg
        self._program_bases = {key: buffer.device_address + s
                               for key, s in zip(keys, starts, strict=True)}
        self._program_base = self._program_bases["full", 1]
        self._data_base = buffer.device_address + len(program)
        self.loaded_bytes += sum(len(p) for *_, p in pkg.all_programs()) + len(pkg.image)
        self._program_registers()
        self.set_task(pkg.tasks[0])

    def _program_registers(self) -> None:
        assert self.package is not None
        self._write64("PROGRAM_BASE", self._program_base)
        self._write64("DATA_BASE", self._data_base)
        self._write64("DATA_SIZE", len(self.package.image))
        self._write("SCHEDULE", REGISTER_MAP["SCHEDULE"].encode(ORDER=self.schedule))
        if self.task is not None:
            self._write("TASK_SELECT", self.package.task_select(self.task))

    def set_task(self, task: str) -> None:
        """Select the task the next runs compute: one ``TASK_SELECT`` write, no weights moved.

        Raises
        ------
        M3VitError
            For a task the loaded package does not have.
        """
        pkg = self._loaded()
        value = pkg.task_select(task)
        self._write("TASK_SELECT", value)
        self.switch_writes += 1
        self.task = task

    def set_schedule(self, schedule: Schedule) -> None:
        """Expert-by-expert (the paper's reordering) or token-by-token MoE layers."""
        self.schedule = Schedule(schedule)
        self._write("SCHEDULE", REGISTER_MAP["SCHEDULE"].encode(ORDER=self.schedule))

    def _loaded(self) -> Executable:
        if self.package is None:
            raise M3VitError("no package loaded: call load() (or pass a .m3x to `m3vit run`)")
        return self.package

    # ---- running --------------------------------------------------------------------

    def quantize(self, images: Images) -> torch.Tensor:
        """Float images (B, C, H, W) → INT8 as the package's input scale gives them.

        ``images`` may also be image files or PIL images (:func:`as_image_batch`).

        Raises
        ------
        M3VitError
            For a shape other than (B, C, H, W) of the model's channels and size.
        """
        pkg = self._loaded()
        m = pkg.model
        want = (m.in_chans, *m.img_size)
        images = as_image_batch(images, m.img_size)
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or tuple(images.shape[1:]) != want or images.shape[0] < 1:
            raise M3VitError(f"wrong input shape {tuple(images.shape)}: {m.name!r} takes "
                             f"(B, {', '.join(map(str, want))}) images")
        return golden.quantize_image(images, pkg.input_scale)

    def infer(self, images: Images, task: str | None = None,
              progress: Callable[[int], None] | None = None, *,
              batch: int | None = None) -> TaskOutputs:
        """Run images for the current (or given) task, ``batch`` of them an accelerator run.

        Parameters
        ----------
        images : torch.Tensor, path-like, PIL.Image.Image or a list of them
            (N, C, H, W) or (C, H, W) float images, normalised like the training data; or
            image files and PIL images, read, fitted to the model's input size and
            normalised (:func:`as_image_batch`).
        task : str, optional
            Switch to this task first (:meth:`set_task`).
        progress : callable, optional
            Called with the index of the last image of each run after it.
        batch : int, optional
            Images a run computes at once (each expert's weights read once for all of
            them): 1 … the package's ``max_batch``, which is the default. The last run
            takes what is left.

        Returns
        -------
        TaskOutputs
            Head accumulators, float predictions and per-run counters.

        Raises
        ------
        M3VitError
            For a batch the package has no program for, or an image file that cannot be
            read (one line naming it).
        """
        pkg = self._loaded()
        batch = pkg.max_batch if batch is None else batch
        pkg.program_for(batch)
        if task is not None and task != self.task:
            self.set_task(task)
        assert self.task is not None
        image_q = self.quantize(images)
        patches = golden.patchify(image_q, pkg.model.patch_size)
        heads, runs = [], []
        for first in range(0, len(patches), batch):
            group = patches[first:first + batch]
            got, stats = self.run_batch(group)
            heads += got
            runs.append(stats)
            if progress is not None:
                progress(first + len(group) - 1)
        return self._outputs(self.task, heads, runs)

    def _outputs(self, task: str, heads: list, runs: list) -> TaskOutputs:
        """Heads of the images (in order) and their runs as :class:`TaskOutputs`."""
        pkg = self._loaded()
        acc = torch.stack(heads)
        scale = torch.tensor(pkg.out_scales[task], dtype=torch.float64)
        predictions = golden.upsample(golden.dequantize_head(acc, scale), pkg.model)
        return TaskOutputs(task, acc, predictions, runs)

    def infer_all(self, images: Images, tasks=None, *, batch: int | None = None,
                  progress: Callable[[int], None] | None = None) -> AllTaskOutputs:
        """Every task (or ``tasks``) of the images, the blocks they share computed once.

        Per batch: one run of the package's ``shared`` program (the embedding and the blocks
        before the first MoE block, where the tasks' routers start), then per task a
        ``TASK_SELECT`` write and one run of its ``task`` program from that result. Each
        head equals the task's own ``infer``.

        Parameters
        ----------
        images : torch.Tensor, path-like, PIL.Image.Image or a list of them
            (N, C, H, W) or (C, H, W) float images, or image files and PIL images
            (:meth:`infer`).
        tasks : sequence of str, optional
            Tasks to compute (default: all of the package's), in this order.
        batch : int, optional
            Images a run computes (default: the package's ``max_batch``).
        progress : callable, optional
            Called with the index of the last image of each batch after its tasks.
        """
        pkg = self._loaded()
        batch = pkg.max_batch if batch is None else batch
        pkg.program_for(batch)
        tasks = list(tasks or pkg.tasks)
        for task in tasks:
            pkg.task_select(task)
        image_q = self.quantize(images)
        patches = golden.patchify(image_q, pkg.model.patch_size)
        heads: dict[str, list] = {task: [] for task in tasks}
        runs: dict[str, list] = {task: [] for task in tasks}
        shared = []
        for first in range(0, len(patches), batch):
            group = patches[first:first + batch]
            shared.append(self.run_batch(group, "shared")[1])
            for task in tasks:
                if task != self.task:
                    self.set_task(task)
                got, stats = self.run_batch(group, "task")
                heads[task] += got
                runs[task].append(stats)
            if progress is not None:
                progress(first + len(group) - 1)
        return AllTaskOutputs({task: self._outputs(task, heads[task], runs[task])
                               for task in tasks}, shared)

    def run_patches(self, patches: torch.Tensor) -> tuple[torch.Tensor, RunStats]:
        """One run on one image's (N_patches, C·p·p) INT8 patch rows; (head, stats)."""
        heads, stats = self.run_batch([patches])
        return heads[0], stats

    def run_batch(self, patches, part: str = "full") -> tuple[list[torch.Tensor], RunStats]:
        """One run on a batch: a sequence of (N_patches, C·p·p) INT8 patch rows, one per
        image (at most the package's ``max_batch``); (one head per image, stats).

        ``part`` picks the program: ``"full"``; ``"shared"`` (the blocks every task shares:
        no heads, ``patches`` written); ``"task"`` (the rest for the current task, from the
        last ``shared`` run: ``patches`` only counts the images).
        """
        pkg = self._loaded()
        assert self._buffer is not None and self.task is not None
        batch = len(patches)
        pkg.program_for(batch)
        base = self._data_base - self._buffer.device_address
        if part != "task":
            for slot, rows in enumerate(patches):
                words = patch_words(rows, pkg.model, pkg.config)
                self._buffer.write(base + pkg.input_offset + slot * pkg.input_size, words)
            self._buffer.sync_to_device()
        address = self._program_bases[part, batch]
        if address != self._program_base:
            self._program_base = address
            self._write64("PROGRAM_BASE", self._program_base)
        self._start()
        if part == "shared":
            return [], self._stats(images=batch)
        self._buffer.sync_from_device()
        lanes = pkg.config.gemm_cols  # the head's INT32 rows are whole N-tiles
        heads = []
        for slot in range(batch):
            raw = self._buffer.read(base + pkg.output_offset + slot * pkg.output_size,
                                    pkg.output_size)
            heads.append(head_output(raw, pkg.model.n_patches,
                                     pkg.model.task(self.task).n_out, lanes))
        return heads, self._stats(images=batch)

    def _start(self) -> None:
        start = self.board.position()
        self._write("CONTROL", REGISTER_MAP["CONTROL"].encode(START=1))
        if not self.board.wait_for_interrupt(self.watchdog_cycles):
            self._recover(start)
        fields = REGISTER_MAP["STATUS"].decode(self._read("STATUS"))
        if fields["ERROR"]:
            raise AcceleratorError(ErrorCode(self._read("ERROR_CODE")), self._read("ERROR_PC"))
        if not fields["DONE"]:
            raise M3VitError("the accelerator raised its interrupt without DONE or ERROR")

    def _recover(self, start: int) -> None:
        """The watchdog fired: abort, else reset the logic; restore the registers; raise."""
        hint = self.board.debug_hint(start, self.board.position())
        state = self._status_line()
        self._write("CONTROL", REGISTER_MAP["CONTROL"].encode(ABORT=1))
        aborted = self.board.wait_for_interrupt(ABORT_GRACE_CYCLES)
        how = "aborted"
        if not aborted:
            self.board.reset()
            self._program_registers()
            how = "reset (the abort did not stop it)"
        raise WatchdogError(f"the run did not finish within {self.watchdog_cycles:,} cycles "
                            f"({state}) and was {how}; the package is still loaded and the "
                            "next run starts clean (raise watchdog_cycles if the model is "
                            f"that slow){hint}")

    def _status_line(self) -> str:
        """The status registers as the watchdog found them, for its one-line error: what
        a user reports when a DMA or an interrupt never arrives."""
        fields = REGISTER_MAP["STATUS"].decode(self._read("STATUS"))
        flags = ", ".join(k for k, v in fields.items() if v) or "idle"
        cycles = self._read("CYCLES_LO") | self._read("CYCLES_HI") << 32
        return (f"STATUS {flags}; CYCLES {cycles:,}; INSTRUCTIONS {self._read('INSTRUCTIONS'):,}; "
                f"DMA_READ_BYTES {self._read('DMA_READ_BYTES'):,}; DMA_WRITE_BYTES "
                f"{self._read('DMA_WRITE_BYTES'):,}; ERROR_CODE {self._read('ERROR_CODE')}")

    @property
    def n_master_ports(self) -> int:
        """AXI4 master ports of the bitstream (``CAPS.N_MASTER_PORTS``)."""
        return REGISTER_MAP["CAPS"].decode(self._read("CAPS"))["N_MASTER_PORTS"]

    def read_trace(self) -> list[TraceEntry]:
        """The last run's instruction trace: one entry per instruction, in order.

        One entry per instruction, plus one per *drain* (:class:`TraceEntry`); holds the
        first ``TRACE_DEPTH`` entries of the run (a batch of four ``edge-moe`` images has
        1,116).
        """
        count = min(self._read("TRACE_COUNT"), TRACE_DEPTH)
        ports = min(self.n_master_ports, MAX_TRACE_PORTS)
        entries = []
        for index in range(count):
            self._write("TRACE_INDEX", index)
            words = [self._read(f"TRACE_WORD{k}") for k in range(3 + MAX_TRACE_PORTS + 1)]
            entries.append(TraceEntry(
                pc=words[0] & 0xFFFF, opcode=(words[0] >> 16) & 0xFF, start=words[1],
                end=words[2], read_bytes=tuple(words[3:3 + ports]),
                write_bytes=words[3 + MAX_TRACE_PORTS], drain=bool(words[0] >> 24 & 1)))
        return entries

    def _stats(self, images: int = 1) -> RunStats:
        cycles = self._read("CYCLES_LO")
        cycles |= self._read("CYCLES_HI") << 32
        return RunStats(
            cycles=cycles, ddr_read_bytes=self._read("DMA_READ_BYTES"),
            ddr_write_bytes=self._read("DMA_WRITE_BYTES"), gemm_busy=self._read("GEMM_BUSY"),
            vector_busy=self._read("VECTOR_BUSY"), weight_stall=self._read("WEIGHT_STALL"),
            instructions=self._read("INSTRUCTIONS"), clock_mhz=self.clock_mhz, images=images)
