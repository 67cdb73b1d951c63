"""Design-space sweeps (``m3vit sweep``): a small space on a local Ray equals a serial run,
an interrupted sweep resumes, the front and its files, one-line refusals."""

import json

import pytest

from m3vit.sw.cli import main
from m3vit.sw.errors import M3VitError
from m3vit.sw.sweep import check_space, pareto_front, run_sweep, space_points, toolkit_fingerprint

#: Eight points on the CI configuration: 17-token tiny, two arrays, two buffers, two batches.
SPACE = {"config": "ci", "presets": ["tiny"], "task": "semseg",
         "knobs": {"gemm_words": [1, 2], "act_buffer_words": [2048, 16384], "batch": [1, 2]}}


@pytest.fixture(scope="module")
def small_space():
    space = check_space(json.loads(json.dumps(SPACE)))
    # tiny at 16 x 16 (17 tokens an image) lets the CI configuration batch.
    from m3vit.sw import sweep

    original = sweep._packages

    def packages(space):
        from m3vit.sw.model.config import get_preset
        from m3vit.sw.model.m3vit import M3ViT
        from m3vit.sw.quant.quantize import quantize

        return {"tiny": quantize(M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0),
                                 n_calib=4)}

    sweep._packages = packages
    yield space
    sweep._packages = original


def test_ray_sweep_equals_the_serial_run_and_resumes(small_space, tmp_path):
    points = space_points(small_space)
    assert len(points) == 8
    ray_run = run_sweep(small_space, tmp_path / "ray", num_cpus=2)
    serial = run_sweep(small_space, tmp_path / "serial", serial=True)
    key = lambda r: json.dumps({k: r[k] for k in ("preset", *small_space["knobs"])},  # noqa: E731
                               sort_keys=True)
    assert ray_run["new"] == serial["new"] == 8
    assert sorted(ray_run["rows"], key=key) == sorted(serial["rows"], key=key)
    feasible = [r for r in serial["rows"] if r["feasible"]]
    assert len(feasible) == 4 and all("does not fit" in r["why"] for r in serial["rows"]
                                      if not r["feasible"])
    # A batch of two costs fewer cycles an image; the wider array fewer still.
    best = min(feasible, key=lambda r: r["cycles_per_image"])
    assert (best["gemm_words"], best["batch"]) == (2, 2)
    assert best in serial["front"] and pareto_front(serial["rows"]) == serial["front"]
    for path in serial["paths"].values():
        assert path.stat().st_size > 100
    # Run again: every point is in the store already.
    again = run_sweep(small_space, tmp_path / "serial", serial=True)
    assert again["new"] == 0 and len(again["rows"]) == 8
    # Scores stored by another version of the toolkit are never reused: all scored again.
    store = tmp_path / "serial" / "results.jsonl"
    lines = [json.loads(line) for line in store.read_text().splitlines()]
    assert {line["toolkit"] for line in lines} == {toolkit_fingerprint()}
    store.write_text("".join(json.dumps({**line, "toolkit": "0" * 64}) + "\n"
                             for line in lines))
    told = []
    rescored = run_sweep(small_space, tmp_path / "serial", serial=True, progress=told.append)
    assert rescored["new"] == 8 and len(rescored["rows"]) == 8
    assert "8 stored point(s) were scored by another version of the toolkit" in told[0]
    assert sorted(rescored["rows"], key=key) == sorted(serial["rows"], key=key)


def test_a_large_space_is_sampled_by_optuna(small_space, tmp_path):
    """More points than --trials: Optuna picks that many (distinct points are scored once;
    a repeated pick reuses its result), and the front comes from what was scored."""
    r = run_sweep(small_space, tmp_path / "ray", trials=5, num_cpus=2)
    assert 1 <= r["new"] <= 5 and len(r["rows"]) == r["new"]
    assert r["front"] and all(row in r["rows"] for row in r["front"])
    # Seeded: the same waves (two trials at a time here) pick the same points.
    again = run_sweep(small_space, tmp_path / "again", trials=5, num_cpus=2)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, again["rows"])) == sorted(map(key, r["rows"]))


@pytest.mark.xdist_group("soc_ci")   # builds (or reuses) the CI SoC model, as the e2e tests
def test_the_front_checked_on_the_soc_model(small_space, tmp_path):
    """--verify: the front's fastest point run on the Verilated SoC model, the estimate
    within 5 % of it."""
    r = run_sweep(small_space, tmp_path, serial=True, verify=1)
    best = r["front"][0]
    assert best["measured_cycles"] > 0 and abs(best["estimate_error"]) < 0.05


def test_no_yosys_is_one_line(tmp_path, capsys):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(SPACE))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--resources", "yosys",
                 "--yosys", str(tmp_path / "no-yosys")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Yosys executable" in err


def test_a_space_with_no_feasible_point_is_one_line(small_space, tmp_path):
    space = dict(small_space, knobs={"act_buffer_words": [2048]})
    with pytest.raises(M3VitError, match=r"no point of the space is feasible: .*activations need"):
        run_sweep(space, tmp_path, serial=True)


@pytest.mark.parametrize("space, message", [
    ({"presets": ["tiny"], "knobs": {"pe_colz": [4]}}, "unknown knob 'pe_colz'"),
    ({"presets": ["tiny"], "knobs": {"batch": []}}, "give a non-empty list"),
    ({"presets": ["tiny"], "knobs": {"batch": [1.5]}}, "1.5 is not an integer"),
    ({"presets": [], "knobs": {}}, "at least one model preset"),
    ({"presets": ["huge"], "knobs": {}}, "unknown preset 'huge'"),
    ({"presets": ["tiny"], "colour": 1}, "unknown key 'colour'"),
])
def test_bad_spaces_are_one_line(space, message, tmp_path, capsys):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--serial"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
