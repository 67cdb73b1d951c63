"""Design-space sweeps: which accelerator for my model, at what cost — on Ray.

A *space* (a JSON file) names a base configuration, the model presets and, per knob, the
values to try::

    {"config": "zcu104", "presets": ["edge-moe"], "task": "semseg",
     "knobs": {"gemm_words": [1, 2], "n_master_ports": [1, 2, 3], "batch": [1, 2, 3]}}

Knobs are :class:`~m3vit.hw.config.AccelConfig` fields (:data:`KNOBS`; ``pe_rows`` sets
``pe_cols`` too, the top needs them equal) and ``batch``, the images a run computes. Each
point — a preset and one value per knob — is scored by the cycle model
(:mod:`m3vit.sw.compiler.estimate`: cycles an image, images a second at the point's clock,
under the golden model's routing of synthetic images) and, with ``resources="yosys"``, by
a Yosys estimate of the top (cached by netlist: no design is synthesised twice), the 80 %
budget a constraint. A point that cannot be built (a configuration the checks refuse, a
model or batch that does not fit) is kept with its reason.

Points are Ray tasks: a local Ray started here by default, a cluster with ``address``;
results go to ``results.jsonl`` in the output folder as they finish, and a sweep run again
skips the points already there that this version of the toolkit scored (an interrupted
sweep resumes; after a change to the hardware, the compiler or the cycle model every point
is scored again: :func:`toolkit_fingerprint`). A space larger than
``trials`` points is searched by Optuna (multi-objective: cycles an image and resources)
instead of enumerated. The Pareto front (fewest cycles an image against the largest share
of any resource — or against MACs a cycle without Yosys) goes to ``pareto.json``,
``points.csv`` and ``pareto.png``.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import M3VitError

__all__ = ["KNOBS", "load_space", "pareto_front", "run_sweep", "save_pareto_figure",
           "score_point", "space_points"]

#: Knobs a space may vary: AccelConfig fields (type) and the compile's ``batch``.
KNOBS: dict[str, type] = {
    "pe_rows": int, "gemm_words": int, "n_master_ports": int, "act_buffer_words": int,
    "max_tokens": int, "max_outstanding": int, "max_burst_beats": int, "clock_mhz": float,
    "batch": int,
}

RESULTS = "results.jsonl"


def load_space(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a space file.

    Raises
    ------
    M3VitError
        One line: a missing or unreadable file, an unknown key or knob, an empty value list,
        a value of the wrong type, an unknown preset or configuration.
    """
    path = Path(path)
    try:
        space = json.loads(path.read_text())
    except FileNotFoundError:
        raise M3VitError(f"{path}: no such space file") from None
    except (OSError, ValueError) as e:
        raise M3VitError(f"{path}: not a readable JSON space ({e})") from None
    return check_space(space, where=f"{path}: ")


def check_space(space: Any, where: str = "") -> dict[str, Any]:
    """Check a space (a dict as :func:`load_space` reads it); the space with defaults."""
    from m3vit.hw.flow.generate import get_config

    from .model.config import get_preset

    if not isinstance(space, dict):
        raise M3VitError(f"{where}a space is a JSON object with config, presets and knobs")
    unknown = set(space) - {"config", "presets", "knobs", "task", "images"}
    if unknown:
        raise M3VitError(f"{where}unknown key {sorted(unknown)[0]!r} (keys: config, presets, "
                         "knobs, task, images)")
    out = {"config": space.get("config", "zcu104"), "presets": space.get("presets", []),
           "knobs": space.get("knobs", {}), "task": space.get("task"),
           "images": space.get("images", 1)}
    get_config(out["config"])
    if not out["presets"] or not isinstance(out["presets"], list):
        raise M3VitError(f"{where}presets: give at least one model preset in a list")
    for preset in out["presets"]:
        get_preset(preset)
    if not isinstance(out["knobs"], dict):
        raise M3VitError(f"{where}knobs: an object of knob → list of values")
    for knob, values in out["knobs"].items():
        if knob not in KNOBS:
            raise M3VitError(f"{where}unknown knob {knob!r} (knobs: {', '.join(KNOBS)})")
        if not isinstance(values, list) or not values:
            raise M3VitError(f"{where}knob {knob!r}: give a non-empty list of values")
        kind = KNOBS[knob]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                    kind is int and not isinstance(v, int)):
                what = "an integer" if kind is int else "a number"
                raise M3VitError(f"{where}knob {knob!r}: {v!r} is not {what}")
    if not isinstance(out["images"], int) or out["images"] < 1:
        raise M3VitError(f"{where}images: a whole number >= 1")
    return out


def space_points(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of a space: a preset and one value per knob, in a fixed order."""
    knobs = sorted(space["knobs"])
    points = []
    for preset in space["presets"]:
        for values in itertools.product(*(space["knobs"][k] for k in knobs)):
            points.append({"preset": preset, **dict(zip(knobs, values, strict=True))})
    return points


def point_config(point: dict[str, Any], space: dict[str, Any]):
    """The :class:`~m3vit.hw.config.AccelConfig` of a point (or a row): the space's base
    with the point's hardware knobs (``pe_rows`` sets ``pe_cols`` too).

    Raises
    ------
    AccelConfigError
        For values the configuration refuses.
    """
    from m3vit.hw.flow.generate import get_config

    changes = {k: v for k, v in point.items() if k in KNOBS and k != "batch"}
    if "pe_rows" in changes:
        changes["pe_cols"] = changes["pe_rows"]
    return get_config(space["config"]).replace(**changes)


def point_key(point: dict[str, Any]) -> str:
    """The canonical text of a point (the results store's key)."""
    return json.dumps(point, sort_keys=True, separators=(",", ":"))


def score_point(point: dict[str, Any], space: dict[str, Any], packages: dict[str, Any], *,
                resources: str = "skip", workdir: str | os.PathLike = "build/sweep",
                yosys: str | None = None) -> dict[str, Any]:
    """Build, estimate and (optionally) synthesise one point; its row.

    Parameters
    ----------
    point : dict
        ``preset`` and knob values (:func:`space_points`).
    space : dict
        The checked space (its base ``config``, ``task``, ``images``).
    packages : dict
        Preset → its quantized model (randomly initialised: the routing is the golden
        model's for it).
    resources : {"skip", "yosys"}
        Whether to run (or reuse) the Yosys estimate of the top.
    workdir : path-like
        Where the Yosys runs go (one folder per configuration hash).
    yosys : str, optional
        The Yosys to run (default: :func:`~m3vit.hw.flow.resources.find_yosys`'s).

    Returns
    -------
    dict
        The point, ``feasible`` (and ``why`` if not), ``config_hash``, ``cycles``,
        ``cycles_per_image``, ``ms_per_image``, ``images_per_s``, ``macs_per_cycle``, and
        with Yosys the resources (``dsp``, ``bram``, ``uram``, ``lut``, ``ff``, each
        ``*_share`` of the XCZU7EV) and ``fits`` (all within 80 %).
    """
    from m3vit.hw.config import AccelConfigError
    from m3vit.hw.flow.generate import get_config
    from m3vit.hw.isa import check_top_config

    from .compiler.estimate import estimate_package
    from .compiler.executable import compile_executable
    from .model.train import scenes_for

    row: dict[str, Any] = dict(point)
    batch = point.get("batch", 1)
    pkg = packages[point["preset"]]
    try:
        config = point_config(point, space)
        check_top_config(config)
        exe = compile_executable(pkg, config, max_batch=batch)
    except (AccelConfigError, M3VitError) as e:
        row.update(feasible=False, why=str(e).splitlines()[0])
        return row
    task = space.get("task") or exe.tasks[0]
    images = scenes_for(exe.model, max(batch, space["images"]), seed=3)["image"]
    est = estimate_package(pkg, exe, task=task, batch=batch, images=images)
    row.update(feasible=True, config_hash=f"{config.config_hash():#010x}",
               cycles=round(est["cycles"]), cycles_per_image=est["per_image"],
               ms_per_image=est["per_image"] / config.clock_mhz / 1000,
               images_per_s=batch * config.clock_mhz * 1e6 / est["cycles"],
               macs_per_cycle=config.n_pe)
    if resources == "yosys":
        from m3vit.hw.flow.resources import estimate, find_yosys

        # The base configuration itself reuses `m3vit resources`'s run (build/resources).
        base = get_config(space["config"])
        folder = (Path("build") / "resources" / space["config"] / "top" if config == base
                  else Path(workdir) / f"{config.config_hash():08x}" / "top")
        folder.mkdir(parents=True, exist_ok=True)
        # Points that differ only in the batch share a design: one synthesises it while the
        # others wait on its lock, then reuse its run.
        with open(folder / ".sweep.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            res = estimate("top", space["config"], find_yosys(yosys), folder, config=config)
        for r in res.rows:
            key = {"DSP48E2": "dsp", "BRAM (RAMB36)": "bram", "URAM288": "uram",
                   "LUT": "lut", "FF": "ff"}.get(r.resource, r.resource.lower())
            row[key] = r.used
            row[f"{key}_share"] = r.fraction
        row["fits"] = res.fits
        row["max_share"] = max(r.fraction for r in res.rows)
    return row


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The feasible rows no other row beats on both cycles an image and cost (the largest
    resource share with Yosys, else MACs a cycle); rows over the budget are out."""
    cost = "max_share" if any("max_share" in r for r in rows) else "macs_per_cycle"
    ok = [r for r in rows if r.get("feasible") and r.get("fits", True) and cost in r]
    front = []
    for r in ok:
        beaten = any(o is not r and o["cycles_per_image"] <= r["cycles_per_image"]
                     and o[cost] <= r[cost] and (o["cycles_per_image"] < r["cycles_per_image"]
                                                 or o[cost] < r[cost]) for o in ok)
        if not beaten:
            front.append(r)
    return sorted(front, key=lambda r: r["cycles_per_image"])


def _packages(space: dict[str, Any]) -> dict[str, Any]:
    from .model.config import get_preset
    from .model.m3vit import M3ViT
    from .quant.quantize import quantize

    return {p: quantize(M3ViT(get_preset(p), seed=0), n_calib=4) for p in space["presets"]}


def toolkit_fingerprint() -> str:
    """SHA-256 of the toolkit's source (every ``.py``, ``.cpp``, ``.h`` of the ``hw``,
    ``sw`` and ``sim`` packages): a stored score is reused only by the code that made it,
    so a sweep after a change to the design, the compiler or the cycle model never
    reports a stale figure."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for package in ("hw", "sw", "sim"):
        files = sorted(f for f in (root / package).rglob("*")
                       if f.suffix in (".py", ".cpp", ".h") and f.is_file())
        for f in files:
            digest.update(f.relative_to(root).as_posix().encode() + b"\0")
            digest.update(f.read_bytes() + b"\0")
    return digest.hexdigest()


def _read_results(path: Path, fingerprint: str | None = None) -> dict[str, dict[str, Any]]:
    """The stored rows by point; with ``fingerprint``, only those that code scored."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if fingerprint is None or row.get("toolkit") == fingerprint:
                    done[point_key(row["point"])] = row
    return done


def run_sweep(space: dict[str, Any], out: str | os.PathLike, *, address: str | None = None,
              serial: bool = False, resources: str = "skip", trials: int = 64,
              progress: Callable[[str], None] | None = None,
              num_cpus: int | None = None, yosys: str | None = None,
              verify: int = 0) -> dict[str, Any]:
    """Score every point of ``space`` (or ``trials`` Optuna picks of a larger one) as Ray
    tasks, keeping each result in ``out/results.jsonl``; write the front and the plot.

    Parameters
    ----------
    space : dict
        A checked space (:func:`check_space`, :func:`load_space`).
    out : path-like
        The results folder (created; a second run resumes from its ``results.jsonl``).
    address : str, optional
        A Ray cluster's address; default: a local Ray on this machine.
    serial : bool
        Score the points here one after the other (no Ray): the reference a Ray run must
        equal.
    resources : {"skip", "yosys"}
        Score resources with Yosys (slow the first time per design; cached).
    trials : int
        Largest space enumerated; a larger one is sampled by Optuna this many times.
    progress : callable, optional
        Told about each finished point.
    num_cpus : int, optional
        CPUs of a local Ray (default: all).
    yosys : str, optional
        The Yosys for ``resources="yosys"`` (default: the one ``m3vit resources`` finds).
    verify : int
        Run this many of the front's fastest points on the Verilated SoC model too (each
        configuration's model built once, then cached) and record their measured cycles.

    Returns
    -------
    dict
        ``rows`` (every point scored, this run's and earlier ones'), ``front``, ``new``
        (points scored in this run), ``paths`` (the files written).

    Raises
    ------
    M3VitError
        When no point is feasible (with the first reasons), or ``resources`` is unknown.
    """
    if resources not in ("skip", "yosys"):
        raise M3VitError(f"resources must be skip or yosys, got {resources!r}")
    if resources == "yosys":
        from m3vit.hw.flow.resources import find_yosys

        find_yosys(yosys)     # one line now if there is none, not one per point
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / RESULTS
    fingerprint = toolkit_fingerprint()
    done = _read_results(store, fingerprint)
    stale = len(_read_results(store)) - len(done)
    points = space_points(space)
    say = progress or (lambda _m: None)
    if stale:
        say(f"{stale} stored point(s) were scored by another version of the toolkit: "
            "scoring them again")
    packages = _packages(space)
    score = dict(resources=resources, workdir=str(out / "yosys"), yosys=yosys)
    with _Runner(serial=serial, address=address, num_cpus=num_cpus) as runner:
        shared = runner.put(packages)
        if len(points) > trials:
            rows_new = _optuna(space, trials, shared, score, done, store, say, runner,
                               fingerprint)
        else:
            todo = [p for p in points if point_key(p) not in done]
            say(f"{len(points)} points, {len(points) - len(todo)} already scored")
            rows_new = []
            for point, row in runner.map(_score_task, todo, space, shared, score):
                _record(store, point, row, fingerprint)
                rows_new.append(row)
                say(f"[{len(rows_new)}/{len(todo)}] {_describe(row)}")
        rows = list(_read_results(store, fingerprint).values())
        flat = [dict(r["row"]) for r in rows]
        feasible = [r for r in flat if r.get("feasible")]
        if not feasible:
            whys = sorted({r.get("why", "") for r in flat})[:3]
            raise M3VitError("no point of the space is feasible: " + "; ".join(whys))
        front = pareto_front(flat)
        # The SoC checks are Ray tasks too: each builds (or reuses) its configuration's
        # Verilated model and runs the point's batch on it.
        for row, measured in runner.map(_measure, front[:verify], space, shared):
            row.update(measured)
            say(f"checked on the SoC model: {_describe(row)}: measured "
                f"{row['measured_cycles']:,} cycles a run ({row['estimate_error']:+.2%})")
    paths = _write_outputs(out, flat, front, space)
    return {"rows": flat, "front": front, "new": len(rows_new), "paths": paths}


class _Runner:
    """Runs a function over items here, one after the other (``serial``), or as Ray tasks
    on a local Ray (started here, stopped on exit) or a cluster (``address``).

    Results come back in the order they finish, each with its item, so a caller records
    a point as soon as it is scored (an interrupted sweep keeps what finished).
    """

    def __init__(self, *, serial: bool, address: str | None, num_cpus: int | None):
        self.serial, self.address, self.num_cpus = serial, address, num_cpus
        self._started = False

    def __enter__(self) -> _Runner:
        if self.serial:
            return self
        import ray

        if not ray.is_initialized():
            options: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR",
                                           log_to_driver=False)
            if self.address:
                options["address"] = self.address
            elif self.num_cpus:
                options["num_cpus"] = self.num_cpus
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise M3VitError(f"cannot start or reach Ray ({self.address or 'local'}): "
                                 f"{str(e).splitlines()[0]}") from None
            self._started = True
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            import ray

            ray.shutdown()

    @property
    def width(self) -> int:
        """How many tasks run at once: 1 here, the cluster's CPUs on Ray."""
        if self.serial:
            return 1
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def put(self, obj: Any) -> Any:
        """``obj`` shared once with every task (Ray's object store), or itself here."""
        if self.serial:
            return obj
        import ray

        return ray.put(obj)

    def map(self, fn: Callable[..., Any], items, *args):
        """``(item, fn(item, *args))`` for every item, as each finishes."""
        items = list(items)
        if self.serial:
            for item in items:
                yield item, fn(item, *args)
            return
        import ray

        remote = ray.remote(fn)
        pending = {remote.remote(item, *args): item for item in items}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(ready[0])
            yield item, ray.get(ready[0])


def _measure(row: dict[str, Any], space: dict[str, Any], packages: dict[str, Any]
             ) -> dict[str, Any]:
    """Run a point on the SoC model: its measured cycles and the estimate's error."""

    from .compiler.executable import compile_executable
    from .model.train import scenes_for
    from .runtime.driver import Accelerator

    config = point_config(row, space)
    batch = row.get("batch", 1)
    exe = compile_executable(packages[row["preset"]], config, max_batch=batch)
    images = scenes_for(exe.model, max(batch, space["images"]), seed=3)["image"]
    task = space.get("task") or exe.tasks[0]
    with Accelerator.open("sim", config=config, ddr_bytes=64 << 20) as acc:
        acc.load(exe)
        run = acc.infer(images[:batch], task, batch=batch).runs[0]
    return {"measured_cycles": run.cycles, "estimate_error": row["cycles"] / run.cycles - 1}


def _record(store: Path, point: dict[str, Any], row: dict[str, Any], fingerprint: str) -> None:
    with open(store, "a") as f:
        f.write(json.dumps({"point": point, "row": row, "toolkit": fingerprint},
                           sort_keys=True) + "\n")


def _score_task(point, space, packages, score):
    """One point's task: :func:`score_point` (on Ray the packages come from the object
    store)."""
    return score_point(point, space, packages, **score)


def _optuna(space, trials, packages, score, done, store, say, runner, fingerprint):
    """Sample ``trials`` points of a large space with Optuna (NSGA-II over cycles an image
    and cost), asked in waves as wide as the runner, each wave's new points scored as
    parallel tasks; earlier results (the store) are told without scoring again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    knobs = sorted(space["knobs"])
    sampler = optuna.samplers.NSGAIISampler(seed=0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    cost = "max_share" if score["resources"] == "yosys" else "macs_per_cycle"
    rows: list[dict[str, Any]] = []
    asked = 0
    while asked < trials:
        wave = []
        for _ in range(min(runner.width, trials - asked)):
            trial = study.ask()
            point = {"preset": trial.suggest_categorical("preset", space["presets"])}
            for k in knobs:
                point[k] = trial.suggest_categorical(k, space["knobs"][k])
            wave.append((trial, point))
        asked += len(wave)
        # A point asked twice (in this wave or before) is scored once.
        todo = list({point_key(p): p for _, p in wave if point_key(p) not in done}.values())
        for point, row in runner.map(_score_task, todo, space, packages, score):
            _record(store, point, row, fingerprint)
            done[point_key(point)] = {"point": point, "row": row}
            rows.append(row)
            say(f"[{asked}/{trials} asked, {len(rows)} scored] {_describe(row)}")
        for trial, point in wave:
            row = done[point_key(point)]["row"]
            if row.get("feasible") and row.get("fits", True):
                study.tell(trial, [row["cycles_per_image"], row[cost]])
            else:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return rows


def _describe(row: dict[str, Any]) -> str:
    knobs = ", ".join(f"{k}={v}" for k, v in row.items() if k in KNOBS or k == "preset")
    if not row.get("feasible"):
        return f"{knobs}: infeasible ({row.get('why')})"
    extra = f", {row['max_share']:.0%} of the largest resource" if "max_share" in row else ""
    return f"{knobs}: {row['cycles_per_image']:,.0f} cycles an image{extra}"


def _write_outputs(out: Path, rows, front, space) -> dict[str, Path]:
    columns = ["preset", *sorted(space["knobs"]), "feasible", "why", "config_hash", "cycles",
               "cycles_per_image", "ms_per_image", "images_per_s", "macs_per_cycle", "dsp",
               "bram", "uram", "lut", "ff", "max_share", "fits", "measured_cycles",
               "estimate_error", "pareto"]
    keys = {point_key({k: r[k] for k in ("preset", *space["knobs"]) if k in r}) for r in front}
    csv_path = out / "points.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: r.get("cycles_per_image", float("inf"))):
            key = point_key({k: r[k] for k in ("preset", *space["knobs"]) if k in r})
            writer.writerow({**r, "pareto": key in keys})
    json_path = out / "pareto.json"
    json_path.write_text(json.dumps({"space": space, "front": front}, indent=2) + "\n")
    png = save_pareto_figure(rows, front, out / "pareto.png")
    return {"csv": csv_path, "json": json_path, "figure": png}


def save_pareto_figure(rows, front, path: str | os.PathLike) -> Path:
    """Every feasible point (over-budget ones hollow) and the front, cycles an image
    against cost."""
    from matplotlib.figure import Figure

    cost = "max_share" if any("max_share" in r for r in rows) else "macs_per_cycle"
    label = ("largest share of any XCZU7EV resource (Yosys)" if cost == "max_share"
             else "MACs a cycle (no Yosys run: the array's size)")
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ok = [r for r in rows if r.get("feasible")]
    for preset in dict.fromkeys(r["preset"] for r in ok):
        pts = [r for r in ok if r["preset"] == preset]
        inside = [r for r in pts if r.get("fits", True)]
        over = [r for r in pts if not r.get("fits", True)]
        ax.scatter([r[cost] for r in inside], [r["cycles_per_image"] for r in inside],
                   label=preset, alpha=0.7)
        if over:
            ax.scatter([r[cost] for r in over], [r["cycles_per_image"] for r in over],
                       facecolors="none", edgecolors="grey", label=f"{preset}: over 80 %")
    ax.plot([r[cost] for r in front], [r["cycles_per_image"] for r in front], "k--",
            label="Pareto front")
    if cost == "max_share":
        ax.axvline(0.8, color="red", linestyle=":", label="80 % budget")
    ax.set(xlabel=label, ylabel="cycles an image (estimate)",
           title=f"{len(ok)} feasible points of {len(rows)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
