"""The compiled package (``.m3x``): round trip, corruption, refusals, the ``compile`` CLI."""

import functools

import pytest

from m3vit.hw.config import CI, ZCU104
from m3vit.hw.isa import ExpertOrder
from m3vit.sw.cli import main
from m3vit.sw.compiler.executable import MAGIC, compile_executable, load_executable
from m3vit.sw.compiler.isa_model import execute
from m3vit.sw.compiler.lower import compile_model
from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import get_preset
from m3vit.sw.model.data import make_scenes
from m3vit.sw.model.m3vit import M3ViT
from m3vit.sw.quant import golden
from m3vit.sw.quant.package import save_package
from m3vit.sw.quant.quantize import quantize


@functools.cache
def tiny_package():
    return quantize(M3ViT(get_preset("tiny"), seed=0), n_calib=4)


@pytest.fixture(scope="module")
def m3x(tmp_path_factory):
    path = tmp_path_factory.mktemp("m3x") / "tiny.ci.m3x"
    compile_executable(tiny_package(), CI).save(path)
    return path


def test_round_trip_keeps_everything_the_runtime_needs(m3x):
    pkg = tiny_package()
    loaded = load_executable(m3x)
    direct = compile_model(pkg.tensors, pkg.config, CI)
    assert loaded.program == direct.program
    assert loaded.image == bytes(direct.image.data)
    assert loaded.regions == direct.image.regions
    assert loaded.config == CI and loaded.config_hash == CI.config_hash()
    assert loaded.model.to_dict() == pkg.config.to_dict()
    assert loaded.tasks == pkg.config.task_names
    assert (loaded.input_offset, loaded.output_offset) == (direct.input_offset,
                                                            direct.output_offset)
    assert loaded.input_scale == pkg.params["scales"]["input"]
    for task in loaded.tasks:
        assert loaded.task_select(task) == direct.task_select(task)
        want = pkg.tensors[f"heads.{task}.out_scale"].flatten().tolist()
        assert loaded.out_scales[task] == want
    assert loaded.order is ExpertOrder.REGISTER
    assert any("patches" in line for line in loaded.memory_map())


def test_loaded_package_runs_bit_exactly_on_the_isa_model(m3x):
    """The file's program and image, with one image written in, give golden's head."""
    pkg, loaded = tiny_package(), load_executable(m3x)
    cfg = pkg.config
    image = make_scenes(1, cfg.img_size, n_classes=4, seed=3)["image"]
    x_q = golden.quantize_image(image, loaded.input_scale)
    patches = golden.patchify(x_q, cfg.patch_size)[0]
    task = cfg.task_names[-1]
    direct = compile_model(pkg.tensors, cfg, CI)
    ddr = bytearray(loaded.image)
    ddr[loaded.input_offset:loaded.input_offset + loaded.input_size] = \
        direct.input_bytes(patches)
    machine = execute(CI, loaded.program, ddr, task_select=loaded.task_select(task))
    want, _ = golden.forward(pkg.tensors, cfg, x_q, task)
    assert (direct.head(machine.ddr, task) == want[0]).all()


@pytest.mark.parametrize("damage", ["flip_image", "flip_header", "truncate", "magic",
                                    "version"])
def test_damaged_file_is_one_clear_error(m3x, tmp_path, damage):
    raw = bytearray(m3x.read_bytes())
    if damage == "flip_image":
        raw[-100] ^= 0x01
    elif damage == "flip_header":
        raw[40] ^= 0x20
    elif damage == "truncate":
        raw = raw[:-17]
    elif damage == "magic":
        raw[:4] = b"PK\x03\x04"
    else:
        raw[7] = 9
    bad = tmp_path / "bad.m3x"
    bad.write_bytes(bytes(raw))
    with pytest.raises(M3VitError) as e:
        load_executable(bad)
    message = str(e.value)
    assert "\n" not in message and str(bad) in message
    expected = {"magic": "not a compiled", "version": "version"}.get(damage, "corrupted")
    assert expected in message


def test_quantized_package_given_instead_is_named(tmp_path):
    path = save_package(tmp_path / "tiny.m3q", tiny_package())
    with pytest.raises(M3VitError, match="quantized package: compile it first"):
        load_executable(path)
    with pytest.raises(M3VitError, match="no such file"):
        load_executable(tmp_path / "missing.m3x")


def test_file_starts_with_magic_and_is_not_overwritten_silently(m3x):
    assert m3x.read_bytes()[:8] == MAGIC
    with pytest.raises(M3VitError, match="exists"):
        compile_executable(tiny_package(), CI).save(m3x)


def test_model_that_does_not_fit_names_the_capacity():
    with pytest.raises(M3VitError, match="129 tokens exceed max_tokens=80"):
        compile_executable(quantize(M3ViT(get_preset("edge-moe"), seed=0), n_calib=2), CI)


def test_compile_cli(tmp_path, capsys):
    m3q = save_package(tmp_path / "tiny.m3q", tiny_package())
    assert main(["compile", str(m3q), "--config", "ci", "--map"]) == 0
    out = capsys.readouterr().out
    assert "compiled package written to" in out and "patches" in out
    m3x = tmp_path / "tiny.ci.m3x"
    assert load_executable(m3x).config == CI
    assert main(["compile", str(m3q), "--config", "ci"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["compile", str(m3q), "--config", "zcu104", "--order", "token"]) == 0
    loaded = load_executable(tmp_path / "tiny.zcu104.m3x")
    assert loaded.config == ZCU104 and loaded.order is ExpertOrder.TOKEN_BY_TOKEN
    assert main(["compile", str(tmp_path / "nope.m3q"), "--config", "ci"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m3vit: error:") and err.count("\n") == 1


@functools.cache
def tiny16_package():
    return quantize(M3ViT(get_preset("tiny", img_size=(16, 16)), seed=0), n_calib=4)


def test_batch_programs_round_trip_and_are_chosen_by_size(tmp_path):
    """A package with --max-batch 3 holds a program per batch size over one image, each
    image of a batch in its own input and output slot; the file keeps them all."""
    exe = compile_executable(tiny16_package(), CI, max_batch=3)
    direct = compile_model(tiny16_package().tensors, tiny16_package().config, CI, max_batch=3)
    path = exe.save(tmp_path / "b.m3x")
    loaded = load_executable(path)
    assert loaded.max_batch == 3 and loaded.programs == direct.programs
    assert loaded.shared_programs == direct.shared_programs
    assert loaded.task_programs == direct.task_programs
    assert [(part, b) for part, b, _ in loaded.all_programs()] == [
        (part, b) for part in ("full", "shared", "task") for b in (1, 2, 3)]
    assert loaded.program == loaded.program_for(1) == direct.program
    assert loaded.regions["patches"][1] == 3 * loaded.input_size
    assert loaded.regions["heads.out"][1] == 3 * loaded.output_size
    assert loaded.weight_bytes() == len(loaded.image) - 3 * (loaded.input_size
                                                             + loaded.output_size)
    for bad in (0, 4, "2"):
        with pytest.raises(M3VitError, match=r"is not in 1…3: this package was compiled "
                                             r"with --max-batch 3"):
            loaded.program_for(bad)


def test_compile_cli_max_batch(tmp_path, capsys):
    m3q = save_package(tmp_path / "t16.m3q", tiny16_package())
    assert main(["compile", str(m3q), "--config", "ci"]) == 0
    out = capsys.readouterr().out
    assert "batches of 1…4 images a run (the largest batch that fits: 4)" in out
    assert load_executable(tmp_path / "t16.ci.m3x").max_batch == 4
    assert main(["compile", str(m3q), "--config", "ci", "--max-batch", "2", "--force"]) == 0
    assert load_executable(tmp_path / "t16.ci.m3x").max_batch == 2
    capsys.readouterr()
    assert main(["compile", str(m3q), "--config", "ci", "--max-batch", "5", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs batches of at most 4; use --max-batch 4" in err
    assert main(["compile", str(m3q), "--config", "ci", "--max-batch", "two"]) == 2
    assert "'two' is not a whole number or 'auto'" in capsys.readouterr().err
