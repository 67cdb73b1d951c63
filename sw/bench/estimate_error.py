"""The cycle model against the SoC model: every preset × configuration × schedule × batch.

``python -m m3vit.sw.bench estimate`` runs each case on the Verilated SoC model under the DDR
model's ZCU104 defaults and estimates it with :func:`m3vit.sw.compiler.estimate.estimate_package`
(the golden model's routing of the same images), and tabulates both and the error.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["CASES", "bench_estimate", "markdown"]

#: (preset, input size override, configuration, batches, schedules): every preset and
#: configuration that fits (``m3vit-s`` fits neither; ``edge-moe`` not the CI one).
CASES = (
    ("tiny", None, "ci", (1,), ("expert", "token")),
    ("tiny", (16, 16), "ci", (1, 2, 3, 4), ("expert", "token")),
    ("tiny", None, "zcu104", (1, 2, 4, 8), ("expert", "token")),
    ("edge-moe", None, "zcu104", (1, 2, 3, 4), ("expert",)),
    ("edge-moe", None, "zcu104", (1,), ("token",)),
)


def bench_estimate() -> dict[str, Any]:
    """Run every case on the SoC model and the estimate; rows with both and the error."""
    from m3vit.hw.flow.generate import get_config
    from m3vit.hw.registers import Schedule

    from ..compiler.estimate import estimate_package
    from ..compiler.executable import compile_executable
    from ..compiler.lower import largest_batch
    from ..model.config import get_preset
    from ..model.m3vit import M3ViT
    from ..model.train import scenes_for
    from ..quant.quantize import quantize
    from ..runtime.driver import Accelerator

    schedules = {"expert": Schedule.EXPERT_BY_EXPERT, "token": Schedule.TOKEN_BY_TOKEN}
    rows = []
    for preset, size, config_name, batches, names in CASES:
        model = get_preset(preset, **({"img_size": size} if size else {}))
        config = get_config(config_name)
        batches = [b for b in batches if b <= largest_batch(model, config)]
        pkg = quantize(M3ViT(model, seed=0), n_calib=4)
        exe = compile_executable(pkg, config, max_batch=max(batches))
        images = scenes_for(model, max(batches), seed=3)["image"]
        label = preset if size is None else f"{preset} {size[0]}x{size[1]}"
        with Accelerator.open("sim", config=config, ddr_bytes=64 << 20) as acc:
            acc.load(exe)
            for task in exe.tasks:
                for name in names:
                    acc.set_schedule(schedules[name])
                    for batch in batches:
                        run = acc.infer(images[:batch], task, batch=batch).runs[0]
                        t0 = time.perf_counter()
                        est = estimate_package(pkg, exe, task=task, batch=batch,
                                               images=images, schedule=schedules[name])
                        took = time.perf_counter() - t0
                        rows.append({"preset": label, "config": config_name, "task": task,
                                     "schedule": name, "batch": batch,
                                     "measured": run.cycles, "estimated": est["cycles"],
                                     "error": est["cycles"] / run.cycles - 1,
                                     "estimate_ms": took * 1e3})
    return {"rows": rows, "worst": max(abs(r["error"]) for r in rows)}


def markdown(r: dict[str, Any]) -> str:
    """The table, then the worst error."""
    lines = ["| preset | config | task | schedule | batch | SoC model (cycles) | estimate | "
             "error | estimate took |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['preset']} | {row['config']} | {row['task']} | "
                     f"{row['schedule']} by {row['schedule']} | {row['batch']} | "
                     f"{row['measured']:,} | {row['estimated']:,.0f} | {row['error']:+.2%} | "
                     f"{row['estimate_ms']:.0f} ms |")
    lines += ["", f"Worst error: **{r['worst']:.2%}** over {len(r['rows'])} runs."]
    return "\n".join(lines)
