"""Run images for every task on a board with task switches between them, check, report.

Shared by ``m3vit run`` and ``make demo`` (:mod:`m3vit.sw.demo`): :func:`run_session`
runs the images, alternating the task order from image to image so that every run but
the first follows a task switch, compares each head with the golden model when the
quantized package is at hand, and measures what a task switch costs. The result is a
plain-JSON report that :func:`format_report` prints and ``m3vit report`` reads back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..compiler.lower import shared_blocks
from ..errors import M3VitError, short_repr
from ..model.metrics import evaluate_predictions
from ..quant import golden
from .driver import Accelerator
from .profile import build_profile, format_profile

__all__ = ["format_report", "load_report", "run_session", "save_figure", "save_report"]

REPORT_FORMAT = "m3vit-run/1"


def run_session(acc: Accelerator, scenes: dict[str, torch.Tensor], *,
                tasks: Sequence[str] | None = None, reference=None,
                progress: Callable[[str], None] | None = None,
                profile: bool = False, batch: int | None = None,
                shared: bool = False) -> dict[str, Any]:
    """Run every image for every task, switching task before each run.

    Images run ``batch`` at a time (one accelerator run computes a batch; the package's
    ``max_batch`` by default), the task order alternating from batch to batch.

    Parameters
    ----------
    acc : Accelerator
        A driver with a package loaded.
    scenes : dict
        :func:`m3vit.sw.model.data.make_scenes` output: ``"image"`` and the targets; a
        task whose target is absent (a user's images: ``{"image": ...}``) has no metric.
    tasks : sequence of str, optional
        Tasks to run (default: all of the package's).
    reference : QuantizedModel, optional
        The package the ``.m3x`` was compiled from: each head is then compared with
        ``golden.forward`` for exact equality.
    progress : callable, optional
        Called with a short description after each run.
    profile : bool
        Read the hardware instruction trace after each task's first run into
        ``report["profiles"][task]`` (:func:`~m3vit.sw.runtime.profile.build_profile`).
    batch : int, optional
        Images a run computes (1 … the package's ``max_batch``, the default).
    shared : bool
        Compute the blocks every task shares once per batch (:meth:`Accelerator.infer_all`,
        ``m3vit run --task all``) instead of each task's whole program; the report then
        has ``"shared"`` (those runs, and every task's cycles an image together). The
        profile is not taken in this mode.

    Returns
    -------
    dict
        The report (:func:`format_report`); ``report["outputs"]`` additionally holds the
        prediction tensors for :func:`save_figure` (not saved by :func:`save_report`).
    """
    pkg = acc.package
    if pkg is None:
        raise M3VitError("load a package before running a session")
    tasks = list(tasks or pkg.tasks)
    for task in tasks:
        pkg.task_select(task)
    if reference is not None and reference.config.to_dict() != pkg.model.to_dict():
        raise M3VitError("the reference .m3q is not the model this .m3x was compiled from")
    batch = pkg.max_batch if batch is None else batch
    pkg.program_for(batch)
    images = scenes["image"]
    n = len(images)
    heads: dict[str, list] = {t: [None] * n for t in tasks}
    runs: dict[str, list] = {t: [] for t in tasks}
    exact: dict[str, list] = {t: [] for t in tasks}
    sequence = []
    profiles: dict[str, Any] = {}
    shared_runs = []
    for first in range(0, n, batch):
        group = range(first, min(first + batch, n))
        order = tasks if first // batch % 2 == 0 else tasks[::-1]
        together = None
        if shared:
            together = acc.infer_all(images[group.start:group.stop], order, batch=batch)
            shared_runs += together.shared_runs
        for task in order:
            if together is None:
                switched = task != acc.task
                out = acc.infer(images[group.start:group.stop], task, batch=batch)
            else:
                # infer_all writes TASK_SELECT before each task's run.
                switched, out = True, together.tasks[task]
            run = out.runs[0]
            runs[task].append(run)
            for j, i in enumerate(group):
                heads[task][i] = out.heads[j]
            if profile and first == 0 and together is None:
                profiles[task] = build_profile(
                    acc.read_trace(), pkg.program_for(len(group)), clock_mhz=run.clock_mhz,
                    cycles=run.cycles, n_ports=acc.n_master_ports,
                    instructions=run.instructions)
            sequence.append({"image": first, "images": len(group), "task": task,
                             "after_switch": switched, "cycles": run.cycles})
            if reference is not None:
                for j, i in enumerate(group):
                    x_q = golden.quantize_image(images[i:i + 1], pkg.input_scale)
                    want, _ = golden.forward(reference.tensors, reference.config, x_q, task)
                    exact[task].append(bool(torch.equal(want[0], out.heads[j])))
            if progress is not None:
                mark = "" if reference is None else (
                    " bit-exact" if all(exact[task][-len(group):]) else " MISMATCH")
                what = (f"image {first}" if len(group) == 1 else
                        f"images {group.start}-{group.stop - 1}")
                progress(f"{what} {task}: {run.cycles:,} cycles{mark}")
    switch = _switch_cost(acc, images[:1], tasks, heads, runs)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "board": acc.board.name, "clock_mhz": acc.clock_mhz,
        "config_hash": f"{pkg.config_hash:#010x}",
        "array": f"{pkg.config.pe_rows}x{pkg.config.gemm_cols}", "model": pkg.model.name,
        "images": n, "batch": batch, "schedule": acc.schedule.name, "sequence": sequence,
        "task_switch": switch, "tasks": {}, "outputs": {},
    }
    if profile and not shared:
        report["profiles"] = profiles
    if shared:
        # The blocks every task shares ran once a batch; each task's runs start after them.
        cycles = sum(r.cycles for r in shared_runs)
        every = cycles + sum(r.cycles for t in tasks for r in runs[t])
        report["shared"] = {
            "blocks": shared_blocks(pkg.model), "runs": [r.to_dict() for r in shared_runs],
            "cycles_per_image": cycles / n, "all_tasks_cycles_per_image": every / n,
        }
    for task in tasks:
        acc_heads = torch.stack(heads[task])
        scale = torch.tensor(pkg.out_scales[task], dtype=torch.float64)
        pred = golden.upsample(golden.dequantize_head(acc_heads, scale), pkg.model)
        spec = pkg.model.task(task)
        metrics = {}
        if spec.kind in scenes:
            metrics = evaluate_predictions({task: pred}, {task: scenes[spec.kind]}, [spec])
        stats = [r.to_dict() for r in runs[task]]
        # Per image: every counter of every run shared out over the images it computed.
        per_image = {k: sum(s[k] for s in stats) / n for k in stats[0]
                     if k not in ("clock_mhz", "images", "cycles_per_image", "images_per_s",
                                  "latency_us")}
        per_image["latency_us"] = per_image["cycles"] / acc.clock_mhz
        per_image["images_per_s"] = n * acc.clock_mhz * 1e6 / sum(s["cycles"] for s in stats)
        report["tasks"][task] = {
            "kind": spec.kind, "n_out": spec.n_out, "metrics": metrics,
            "bit_exact": None if reference is None else all(exact[task]),
            "bit_exact_images": None if reference is None else sum(exact[task]),
            "runs": stats,
            "mean": per_image,
        }
        report["outputs"][task] = pred
    report["outputs"]["image"] = images
    for key in ("semseg", "depth", "edge"):
        if key in scenes:
            report["outputs"][f"target.{key}"] = scenes[key]
    return report


def _switch_cost(acc: Accelerator, image, tasks, heads, runs) -> dict[str, Any]:
    """What a task switch costs: register writes, bytes moved, cycles of the next run.

    The last task that ran is run again on image 0 without a switch; its cycles and head
    must equal its earlier run of image 0, which came right after a switch.
    """
    task = acc.task
    loaded, writes = acc.loaded_bytes, acc.switch_writes
    acc.set_task(tasks[0])
    cost = {"register_writes": acc.switch_writes - writes,
            "bytes_reloaded": acc.loaded_bytes - loaded}
    # tasks[0] ran image 0 first of all (no switch before it); run it again right after a
    # switch from the last task, then once more without a switch.
    acc.set_task(task)
    acc.set_task(tasks[0])
    after = acc.infer(image)
    again = acc.infer(image)
    cost.update({
        "task": tasks[0],
        "cycles_after_switch": after.runs[0].cycles,
        "cycles_without_switch": again.runs[0].cycles,
        "same_output": bool(torch.equal(after.heads[0], again.heads[0])
                            and torch.equal(after.heads[0], heads[tasks[0]][0])),
    })
    cost["extra_cycles"] = cost["cycles_after_switch"] - cost["cycles_without_switch"]
    return cost


def save_report(report: dict[str, Any], path: str | os.PathLike, *,
                overwrite: bool = False) -> Path:
    """Write the report as JSON (without the prediction tensors)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise M3VitError(f"{path} exists: pass --force to overwrite it or choose another "
                         "--json")
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in report.items() if k != "outputs"}
    path.write_text(json.dumps(plain, indent=2) + "\n")
    return path


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a report written by :func:`save_report`."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise M3VitError(f"{path}: no such file (write one with `m3vit run --json`)") from None
    except (OSError, ValueError, RecursionError) as e:
        raise M3VitError(f"{path}: not a readable run report ({e})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise M3VitError(f"{path}: not an m3vit run report")
    problem = _report_problem(report)
    if problem:
        raise M3VitError(f"{path}: a damaged run report ({problem}): write it again with "
                         "`m3vit run --json`")
    return report


# What `m3vit report` reads of a run report, field by field: a type (or a tuple of them),
# "count" (an int >= 0), "number" (a finite int or float), a dict (an object with those
# fields; a key ending in "?" may be absent) or a one-element list (a list of those).
_COUNT, _NUMBER = "count", "number"
_RUN = {"cycles": _COUNT, "images?": _COUNT}
_TASK = {"kind": str, "metrics": "metrics", "bit_exact": (bool, type(None)),
         "bit_exact_images": _COUNT, "runs": [_RUN],
         "mean": {"cycles": _NUMBER, "ddr_read_bytes": _NUMBER, "ddr_write_bytes": _NUMBER}}
_REPORT_SCHEMA = {
    "clock_mhz": _NUMBER, "model": str, "board": str, "array": str, "config_hash": str,
    "images": _COUNT, "batch?": _COUNT, "schedule": str, "tasks": "tasks",
    "task_switch": {"register_writes": _COUNT, "bytes_reloaded": _COUNT, "task": str,
                    "cycles_after_switch": _COUNT, "cycles_without_switch": _COUNT,
                    "extra_cycles": int, "same_output": bool},
    "sequence?": [{"image": _COUNT, "images?": _COUNT, "task": str, "after_switch": bool,
                   "cycles": _COUNT}],
    "shared?": {"all_tasks_cycles_per_image": _NUMBER, "cycles_per_image": _NUMBER,
                "blocks": _COUNT},
    "profiles?": dict,
    "image_files?": [str],
}


def _report_problem(report: dict[str, Any]) -> str | None:
    """The first field of ``report`` that `m3vit report` could not read, or None."""

    def check(value: Any, schema: Any, where: str) -> str | None:
        if schema == _COUNT:
            ok = type(value) is int and value >= 0
        elif schema == _NUMBER:
            ok = type(value) in (int, float) and math.isfinite(value)
        elif schema == "metrics":
            ok = isinstance(value, dict) and all(
                type(v) in (int, float) and math.isfinite(v) for v in value.values())
        elif schema == "tasks":
            if not isinstance(value, dict) or not value:
                return f"{where} is not an object of tasks"
            for name, task in value.items():
                bad = check(task, _TASK, f"{where}.{name}")
                if bad:
                    return bad
                if not task["runs"] or any(r["cycles"] == 0 for r in task["runs"]):
                    return f"{where}.{name}.runs is empty or has a run of 0 cycles"
            return None
        elif isinstance(schema, dict):
            if not isinstance(value, dict):
                return f"{where} is not an object"
            for key, sub in schema.items():
                name = key.rstrip("?")
                if name not in value:
                    if key.endswith("?"):
                        continue
                    return f"{where}.{name} is missing"
                bad = check(value[name], sub, f"{where}.{name}")
                if bad:
                    return bad
            return None
        elif isinstance(schema, list):
            if not isinstance(value, list):
                return f"{where} is not a list"
            for i, item in enumerate(value):
                bad = check(item, schema[0], f"{where}[{i}]")
                if bad:
                    return bad
            return None
        else:
            ok = isinstance(value, schema) and not (schema is int and isinstance(value, bool))
        return None if ok else f"{where} is {short_repr(value)}"

    bad = check(report, _REPORT_SCHEMA, "report")
    if bad is None and not report["clock_mhz"] > 0:
        bad = f"report.clock_mhz is {report['clock_mhz']!r}"
    return bad


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: one row per task, then the task-switch cost."""
    clock = report["clock_mhz"]
    batch = report.get("batch", 1)
    batched = f" in batches of {batch}" if batch > 1 else ""
    per = "; figures per image (a batch's run shared out over its images)" if batch > 1 else ""
    # A user's image files come without targets: the metric column stays empty.
    images = (f"{report['images']} image file(s) (no targets, no metric)"
              if report.get("image_files") else f"{report['images']} image(s)")
    lines = [f"{report['model']} on the {report['board']} board ({report['array']} array, "
             f"config {report['config_hash']}, {clock:g} MHz), {images}"
             f"{batched}, MoE schedule {report['schedule'].lower().replace('_', ' ')}"
             f"{per}",
             f"{'task':<10} {'metric':<32} {'bit-exact':>10} {'cycles':>12} "
             f"{'latency':>11} {'images/s':>9} {'DDR read':>12} {'DDR write':>10}"]
    for task, t in report["tasks"].items():
        metric = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in t["metrics"].items())
        m = t["mean"]
        exact = ("n/a" if t["bit_exact"] is None else
                 f"{t['bit_exact_images']}/{report['images']}")
        rate = report["images"] * clock * 1e6 / sum(r["cycles"] for r in t["runs"])
        lines.append(f"{task:<10} {metric or '-':<32} {exact:>10} {m['cycles']:>12,.0f} "
                     f"{m['cycles'] / clock / 1000:>8.3f} ms {rate:>9,.0f} "
                     f"{m['ddr_read_bytes']:>12,.0f} {m['ddr_write_bytes']:>10,.0f}")
    if "shared" in report:
        sh = report["shared"]
        lines.append(f"all tasks of an image: {sh['all_tasks_cycles_per_image']:,.0f} cycles "
                     f"({sh['all_tasks_cycles_per_image'] / clock / 1000:.3f} ms), of which the "
                     f"embedding and the {sh['blocks']} block(s) before the first MoE layer, "
                     f"computed once for every task: {sh['cycles_per_image']:,.0f}")
    s = report["task_switch"]
    lines.append(f"task switch: {s['register_writes']} register write, "
                 f"{s['bytes_reloaded']} bytes of weights reloaded; {s['task']} right after a "
                 f"switch {s['cycles_after_switch']:,} cycles, without one "
                 f"{s['cycles_without_switch']:,} ({s['extra_cycles']:+,}), same output: "
                 f"{'yes' if s['same_output'] else 'NO'}")
    for task, prof in report.get("profiles", {}).items():
        lines += ["", profile_text(prof, f"profile of {task}, image 0 "
                                         "(the hardware instruction trace):", task)]
    return "\n".join(lines)


def profile_text(prof: Any, title: str, task: str) -> str:
    """:func:`format_profile` of a report's profile; one line if the profile is damaged
    (a profile is the trace's summary, kept as written rather than checked field by
    field)."""
    try:
        return format_profile(prof, title)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError):
        raise M3VitError(f"the run report's profile of {task} is damaged: write it again "
                         "with `m3vit run --profile --json`") from None


def save_figure(report: dict[str, Any], path: str | os.PathLike, n: int = 4) -> Path:
    """A PNG per run: rows of images, each task's target next to the accelerator's output."""
    from matplotlib.figure import Figure

    from ..model.data import FAR_DEPTH, NEAR_DEPTH, class_appearance, denormalize_image

    outputs = report["outputs"]
    images = outputs["image"]
    rows = min(n, len(images))
    tasks = list(report["tasks"])
    columns = ["image"]
    for task in tasks:
        kind = report["tasks"][task]["kind"]
        if f"target.{kind}" in outputs:
            columns.append(f"target.{kind}")
        columns.append(task)
    fig = Figure(figsize=(2.1 * len(columns), 2.1 * rows + 0.4), dpi=100)
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for r in range(rows):
        for c, key in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            kind = key.split(".")[-1] if key.startswith("target.") else (
                report["tasks"][key]["kind"] if key in report["tasks"] else "image")
            x = outputs[key][r].detach().float()
            if r == 0:
                title = ("input" if key == "image" else key.replace("target.", "target ")
                         if key.startswith("target.") else f"{key} (accelerator)")
                ax.set_title(title, fontsize=9)
            if kind == "image":
                ax.imshow(denormalize_image(x).permute(1, 2, 0).numpy())
            elif kind == "semseg":
                n_classes = next(t["n_out"] for t in report["tasks"].values()
                                 if t["kind"] == "semseg")
                labels = x.argmax(0) if x.dim() == 3 else x
                colours = [(0.0, 0.0, 0.0)] + [tuple(class_appearance(k, n_classes)[0])
                                               for k in range(1, n_classes)]
                from matplotlib.colors import ListedColormap

                ax.imshow(labels.numpy(), cmap=ListedColormap(colours), vmin=-0.5,
                          vmax=n_classes - 0.5, interpolation="nearest")
            elif kind == "depth":
                ax.imshow(x[0].numpy(), cmap="viridis_r", vmin=NEAR_DEPTH, vmax=FAR_DEPTH)
            else:
                ax.imshow(x[0].numpy(), cmap="gray", interpolation="nearest")
    fig.suptitle(f"{report['model']} on the {report['board']} board: accelerator outputs "
                 "per task", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(os.fspath(path))
    return path
