"""Throughput against batch size: images a second and DDR bytes an image on the SoC model.

``python -m m3vit.sw.bench throughput`` compiles one package with a program for every batch
size that fits (:func:`m3vit.sw.compiler.lower.largest_batch`), runs one batch of each
size per task on the Verilated SoC model under the DDR model's ZCU104 defaults, checks
every image's head against ``golden.forward`` of that image alone, and splits each run's
DDR reads into expert weights (the ``EXPERTS`` bodies, from the instruction trace) and
everything else. Batch sizes that do not fit are listed with the compiler's reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from m3vit.hw.isa import Opcode
from m3vit.hw.registers import TRACE_DEPTH

__all__ = ["bench_throughput", "markdown", "save_figure"]

BATCHES = (1, 2, 4, 8)
"""Batch sizes the issue asks about; the largest that fits is added when not among them."""


def _expert_read_bytes(trace, program: bytes, instructions: int) -> int | None:
    """DDR bytes read during the ``EXPERTS`` loop bodies' GEMMs (drains included), or
    ``None`` when the trace does not hold the whole run (``TRACE_DEPTH`` entries)."""
    from ..compiler.phases import decode_all

    if sum(not e.drain for e in trace) < instructions + 1:
        return None
    ins = decode_all(program)
    total = 0
    for entry in trace:
        op, fields = ins[entry.pc]
        if op == Opcode.GEMM and fields.get("expert"):
            total += sum(entry.read_bytes)
    return total


def _expert_bytes(acc, pkg, exe, task: str, batch: int, images, run) -> tuple[int, str]:
    """The batch's expert weight bytes: from the instruction trace where it holds the whole
    run, else from the program and the batch's routing (the golden model routes as the
    hardware does: each active expert's streams once a layer), which the trace must equal
    wherever both exist, but for the instruction lines fetched in the loop (< 0.01 %)."""
    from ..compiler.estimate import estimate_package

    routed = int(estimate_package(pkg, exe, task=task, batch=batch,
                                  images=images)["expert_read_bytes"])
    traced = _expert_read_bytes(acc.read_trace(), exe.program_for(batch), run.instructions)
    if traced is None:
        return routed, "routing"
    # The trace's also count the instruction lines fetched in the loop (256 bytes a miss).
    if not 0 <= traced - routed <= 1e-4 * routed:
        raise AssertionError(f"{task}, batch {batch}: the trace's expert reads {traced:,} "
                             f"bytes, the program and routing give {routed:,}")
    return traced, "trace"


def bench_throughput(preset: str = "edge-moe", config_name: str = "zcu104",
                     batches: tuple[int, ...] = BATCHES, seed: int = 3) -> dict[str, Any]:
    """Run one batch of each size per task; every head checked bit for bit.

    Returns
    -------
    dict
        ``rows`` (one per batch size and task: cycles, per image, images/s, DDR bytes per
        image, expert weight bytes per image, bit-exact), ``refused`` (batch size → the
        compiler's reason) and what was run.
    """
    from m3vit.hw.flow.generate import get_config
    from m3vit.sim.soc import build_soc

    from ..compiler.executable import compile_executable
    from ..compiler.lower import BatchTooLarge, largest_batch
    from ..model.config import get_preset
    from ..model.m3vit import M3ViT
    from ..model.train import scenes_for
    from ..quant import golden
    from ..quant.quantize import quantize
    from ..runtime.driver import Accelerator

    config, model_cfg = get_config(config_name), get_preset(preset)
    fits = largest_batch(model_cfg, config)
    sizes = sorted(set(batches) | {fits})
    pkg = quantize(M3ViT(model_cfg, seed=0), n_calib=4)
    refused = {}
    for batch in sizes:
        if batch > fits:
            try:
                compile_executable(pkg, config, max_batch=batch)
            except BatchTooLarge as e:
                refused[batch] = str(e)
    exe = compile_executable(pkg, config, max_batch=fits)
    build_soc(config)
    images = scenes_for(model_cfg, fits, seed=seed)["image"]
    x_q = golden.quantize_image(images, pkg.params["scales"]["input"])
    rows = []
    with Accelerator.open("sim", config=config, ddr_bytes=64 << 20) as acc:
        acc.load(exe)
        for task in exe.tasks:
            want = torch.stack([golden.forward(pkg.tensors, model_cfg, x_q[b:b + 1], task)[0][0]
                                for b in range(fits)])
            for batch in (b for b in sizes if b <= fits):
                t0 = time.perf_counter()
                out = acc.infer(images[:batch], task, batch=batch)
                wall = time.perf_counter() - t0
                run = out.runs[0]
                expert, source = _expert_bytes(acc, pkg, exe, task, batch, images, run)
                rows.append({
                    "task": task, "batch": batch, "cycles": run.cycles,
                    "per_image": run.cycles_per_image, "images_per_s": run.images_per_s,
                    "ms_per_image": run.cycles_per_image / run.clock_mhz / 1000,
                    "read_per_image": run.ddr_read_bytes / batch,
                    "expert_per_image": expert / batch, "expert_from": source,
                    "wall_s": wall,
                    "exact": bool(torch.equal(out.heads, want[:batch]))})
        # Every task of the same images, the shared blocks once (`m3vit run --task all`).
        every_task = []
        wants = {task: torch.stack([golden.forward(pkg.tensors, model_cfg, x_q[b:b + 1],
                                                   task)[0][0] for b in range(fits)])
                 for task in exe.tasks}
        for batch in (b for b in sizes if b <= fits):
            out = acc.infer_all(images[:batch], batch=batch)
            alone = sum(row["cycles"] for row in rows if row["batch"] == batch)
            every_task.append({
                "batch": batch, "cycles": out.cycles, "alone": alone,
                "shared": sum(r.cycles for r in out.shared_runs),
                "exact": all(torch.equal(out.tasks[t].heads, wants[t][:batch])
                             for t in exe.tasks)})
    return {"preset": preset, "config": config_name, "array": f"{config.pe_rows}x"
            f"{config.gemm_cols}", "masters": config.n_master_ports, "largest": fits,
            "clock_mhz": config.clock_mhz, "rows": rows, "refused": refused,
            "tasks": list(exe.tasks), "every_task": every_task}


def markdown(r: dict[str, Any]) -> str:
    """The table (one row per batch size and task) and the refused sizes."""
    lines = ["| task | batch | cycles a run | cycles an image | ms an image | images/s | "
             "DDR read an image | of which expert weights | bit-exact |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        lines.append(
            f"| {row['task']} | {row['batch']} | {row['cycles']:,} | {row['per_image']:,.0f} | "
            f"{row['ms_per_image']:.2f} | {row['images_per_s']:,.0f} | "
            f"{row['read_per_image'] / 1e6:.2f} MB | {row['expert_per_image'] / 1e6:.2f} MB"
            f"{'' if row.get('expert_from', 'trace') == 'trace' else ' ¹'} | "
            f"{'yes' if row['exact'] else 'NO'} |")
    if any(row.get("expert_from") == "routing" for row in r["rows"]):
        lines += ["", f"¹ The run's instruction trace holds its first {TRACE_DEPTH:,} "
                      "entries, fewer than this run's: its expert weight bytes come from the "
                      "program and the batch's routing (`m3vit.sw.compiler.estimate`, each "
                      "active expert's streams once a layer), which equal the trace's in "
                      "every run whose trace is whole, but for the instruction lines "
                      "fetched in the loop (checked: under 0.01 %)."]
    if r.get("every_task"):
        lines += ["", f"Every task of the same images ({', '.join(r['tasks'])}; "
                      "`m3vit run --task all`, `Accelerator.infer_all`): the embedding and the "
                      "blocks before the first MoE layer run once a batch for all tasks, then "
                      "each task's program from their stored output.", "",
                      "| batch | all tasks, cycles an image | of which shared | each task's "
                      "whole program, cycles an image | saved | bit-exact |",
                      "|---:|---:|---:|---:|---:|---|"]
        for row in r["every_task"]:
            b = row["batch"]
            lines.append(f"| {b} | {row['cycles'] / b:,.0f} | {row['shared'] / b:,.0f} | "
                         f"{row['alone'] / b:,.0f} | {1 - row['cycles'] / row['alone']:.1%} | "
                         f"{'yes' if row['exact'] else 'NO'} |")
    if r["refused"]:
        sizes = " and ".join(str(b) for b in sorted(r["refused"]))
        why = r["refused"][min(r["refused"])]
        lines += ["", f"Batches of {sizes}: refused by the compiler (`m3vit compile "
                      f"--max-batch {max(r['refused'])}` says: \"{why}\"). Spilling "
                      "activations to DDR for them is not built yet (issue #16)."]
    return "\n".join(lines)


def save_figure(r: dict[str, Any], path: str | Path) -> Path:
    """Images/s and DDR MB an image against the batch size, one line per task."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    rate, ddr = fig.subplots(1, 2)
    for i, task in enumerate(dict.fromkeys(row["task"] for row in r["rows"])):
        rows = [row for row in r["rows"] if row["task"] == task]
        b = [row["batch"] for row in rows]
        colour = f"C{i}"
        rate.plot(b, [row["images_per_s"] for row in rows], "o-", color=colour, label=task)
        ddr.plot(b, [row["read_per_image"] / 1e6 for row in rows], "o-", color=colour,
                 label=f"{task}: all reads")
        ddr.plot(b, [row["expert_per_image"] / 1e6 for row in rows], "s--", color=colour,
                 label=f"{task}: expert weights")
    first = [row for row in r["rows"] if row["task"] == r["rows"][0]["task"]]
    ideal = [first[0]["expert_per_image"] / row["batch"] / 1e6 for row in first]
    ddr.plot([row["batch"] for row in first], ideal, ":", color="grey", label="1/B of batch 1")
    rate.set(xlabel="batch (images a run)", ylabel=f"images/s at {r['clock_mhz']:g} MHz",
             title="throughput")
    ddr.set(xlabel="batch (images a run)", ylabel="MB read from DDR an image",
            title="DDR traffic an image")
    for ax in (rate, ddr):
        ax.set_ylim(bottom=0)
        ax.set_xticks(sorted({row["batch"] for row in r["rows"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    refused = ", ".join(str(b) for b in sorted(r["refused"]))
    fig.suptitle(f"{r['preset']} on the simulated ZCU104 ({r['array']} array, "
                 f"{r['masters']} HP ports, DDR model defaults)"
                 + (f"; batches {refused} do not fit on chip" if refused else ""),
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
