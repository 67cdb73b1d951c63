"""``make demo``: the main job on the simulator, end to end.

Train (or reuse) the ``tiny`` model, quantize it, generate the accelerator, build its
Verilated SoC model, compile the package, run images for every task with task switches
between them, check every head bit-exactly against the golden model, and print a report
per task with a figure of inputs and outputs. Run ``python -m m3vit.sw.demo --help``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import M3VitError

DEFAULT_OUT = "build/demo"


def _reuse_package(path: Path, validate=None):
    """An earlier demo's package to reuse: ``(package, None)``; ``(None, None)`` when there
    is none; ``(None, new name)`` when it has an older format version (``.m3q`` version 1
    had INT8 router logits, version 2 absolute attention probabilities): it is renamed,
    not overwritten, so the demo quantizes afresh. Any other problem with the file is
    raised (one line)."""
    from .quant.package import PackageVersionError, load_package

    if not path.exists():
        return None, None
    try:
        return load_package(path, validate=validate), None
    except PackageVersionError as e:
        if not (isinstance(e.version, int) and not isinstance(e.version, bool)):
            raise                          # not a version we wrote
        n = 0
        while True:
            kept = path.with_name(f"{path.stem}.v{e.version}{'.' + str(n) if n else ''}"
                                  f"{path.suffix}")
            if not kept.exists():
                break
            n += 1
        path.rename(kept)
        return None, kept


def _step(index: int, total: int, text: str) -> float:
    print(f"[{index}/{total}] {text}", flush=True)
    return time.monotonic()


def _done(start: float, text: str = "") -> None:
    print(f"      {text}{' ' if text else ''}({time.monotonic() - start:.1f} s)", flush=True)


def run_demo(*, preset: str = "tiny", config_name: str = "ci", n_images: int = 4,
             runs_dir: str = "runs", out: str = DEFAULT_OUT, seed: int = 1234) -> dict:
    """The demo; returns the run report. Raises :class:`M3VitError` when a head differs."""

    from m3vit.hw.flow.generate import get_config

    from .compiler.executable import compile_executable
    from .model.config import get_preset
    from .model.train import TrainConfig, load_checkpoint, save_checkpoint, scenes_for, train
    from .quant.package import PACKAGE_SUFFIX, save_package
    from .quant.quantize import quantize, validate_package
    from .runtime.driver import Accelerator
    from .runtime.session import format_report, run_session, save_figure, save_report

    total = 6
    config = get_config(config_name)
    model_cfg = get_preset(preset)
    runs, out_dir = Path(runs_dir), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = runs / f"{preset}.pt"
    package_path = runs / f"{preset}{PACKAGE_SUFFIX}"

    t = _step(1, total, f"model: {preset} ({model_cfg.depth} blocks, D={model_cfg.embed_dim}, "
                        f"{model_cfg.n_experts} experts top-{model_cfg.top_k}, tasks "
                        f"{', '.join(model_cfg.task_names)})")
    if checkpoint.exists():
        model, _ = load_checkpoint(checkpoint, preset=preset)
        _done(t, f"reusing {checkpoint}")
    else:
        model, report = train(model_cfg, TrainConfig(), progress=True)
        save_checkpoint(checkpoint, model, report)
        _done(t, f"trained, written to {checkpoint}")

    t = _step(2, total, "quantize to INT8 (the integer golden model's package)")
    pkg, kept = _reuse_package(package_path, validate=validate_package)
    if pkg is not None:
        if pkg.config.to_dict() != model_cfg.to_dict():
            raise M3VitError(f"{package_path} is not a {preset} package: move it away or "
                             "delete it so the demo can write its own")
        _done(t, f"reusing {package_path}")
    else:
        pkg = quantize(model)
        save_package(package_path, pkg)
        _done(t, f"written to {package_path}"
                 + (f" (the older toolkit's package kept as {kept})" if kept else ""))

    t = _step(3, total, f"generate the accelerator ({config_name}: {config.pe_rows}x"
                        f"{config.pe_cols} PE array, {config.clock_mhz:g} MHz) and build "
                        "its Verilated SoC model (cached after the first build)")
    from m3vit.sim.soc import build_soc

    library = build_soc(config, progress=lambda m: print(f"      {m}", flush=True))
    _done(t, f"Verilog {library.parent / 'm3vit_accel.v'}, model {library.name}")

    t = _step(4, total, "compile: program + DDR image for every task")
    compiled = compile_executable(pkg, config)
    m3x = compiled.save(out_dir / f"{preset}.{config_name}.m3x", overwrite=True)
    _done(t, f"{len(compiled.program) // 32} instructions, {len(compiled.image):,} bytes of "
             f"DDR image, written to {m3x}")

    t = _step(5, total, f"run {n_images} images x {len(compiled.tasks)} tasks on the "
                        "simulated board, switching task before every run, each head vs the "
                        "golden model")
    scenes = scenes_for(model_cfg, n_images, seed=seed)
    with Accelerator.open("sim", config=config) as acc:
        acc.load(m3x)
        report = run_session(acc, scenes, reference=pkg,
                             progress=lambda line: print(f"      {line}", flush=True))
    _done(t)

    t = _step(6, total, "report")
    print(format_report(report))
    json_path = save_report(report, out_dir / "report.json", overwrite=True)
    figure = save_figure(report, out_dir / f"{preset}_tasks.png")
    print(f"report written to {json_path}, figure to {figure} "
          f"(`m3vit report {json_path}` prints it again)")
    bad = [task for task, r in report["tasks"].items() if not r["bit_exact"]]
    if bad or not report["task_switch"]["same_output"]:
        raise M3VitError(f"accelerator output differs from the golden model for "
                         f"{', '.join(bad) or 'the task-switch check'}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m m3vit.sw.demo`` (``make demo``)."""
    p = argparse.ArgumentParser(
        prog="m3vit-demo", description=__doc__.splitlines()[0] + " Reuses runs/<preset>.pt "
        "and runs/<preset>.m3q when they exist; writes the compiled package, report.json and "
        "a figure under --out.")
    p.add_argument("--preset", default="tiny", help="model preset (default: %(default)s)")
    p.add_argument("--config", default="ci", choices=("ci", "zcu104"),
                   help="accelerator configuration to simulate (default: %(default)s, a 4x8 "
                        "array that builds in minutes; zcu104 is the 32x64 board design)")
    p.add_argument("--images", type=int, default=4, help="images per task (default: 4)")
    p.add_argument("--runs", default="runs", help="folder of checkpoints and packages")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    start = time.monotonic()
    try:
        run_demo(preset=args.preset, config_name=args.config, n_images=args.images,
                 runs_dir=args.runs, out=args.out)
    except M3VitError as e:
        print(f"m3vit demo: error: {e}", file=sys.stderr)
        return 2
    print(f"demo finished in {time.monotonic() - start:.0f} s: every output bit-exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
