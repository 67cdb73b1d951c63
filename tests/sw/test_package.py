"""The quantized package: round trip, content hash, overwrite safety, and every refusal."""

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from m3vit.sw.errors import M3VitError
from m3vit.sw.model.config import ConfigError, get_preset
from m3vit.sw.quant import package as package_module
from m3vit.sw.quant.package import (
    DTYPE_CODES,
    MANIFEST_KEY,
    PACKAGE_FORMAT,
    PACKAGE_SUFFIX,
    PACKAGE_VERSION,
    QuantizedModel,
    content_hash,
    load_package,
    save_package,
)

SEED = 20240611


def make_package(seed: int = SEED) -> QuantizedModel:
    """A small package of the tiny preset: the dtypes and shapes a quantizer writes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (16, 24), generator=g, dtype=torch.int8)
    tensors = {
        "blocks.0.attn.qkv.weight": w,
        "blocks.0.attn.qkv.bias": torch.randint(-2**31, 2**31 - 1, (24,), generator=g,
                                                dtype=torch.int32),
        "blocks.1.moe.w1": torch.randint(-128, 128, (4, 8, 6), generator=g, dtype=torch.int8),
        "blocks.1.moe.w1.t": w.t(),  # non-contiguous view of another tensor's storage
        "step": torch.tensor(123456789012, dtype=torch.int64),  # 0-dim
        "ln.gamma": torch.randn(3, 5, generator=g),
        "empty": torch.zeros(0, 7, dtype=torch.int8),
    }
    params = {
        "bits": 8,
        "scales": {"blocks.0.attn.qkv.weight": 0.0123, "blocks.1.moe.w1": [0.5, 0.25, 1e-06]},
        "calibration": {"method": "minmax", "images": 16, "percentile": 99.9, "seed": seed},
        "symmetric": True,
        "notes": None,
        "label": "réseau ³",  # non-ASCII survives (escaped in the canonical JSON)
    }
    return QuantizedModel(config=get_preset("tiny"), tensors=tensors, params=params)


@pytest.fixture
def pkg() -> QuantizedModel:
    return make_package()


@pytest.fixture
def saved(tmp_path: Path, pkg: QuantizedModel) -> Path:
    return save_package(tmp_path / f"tiny{PACKAGE_SUFFIX}", pkg)


def assert_same_package(a: QuantizedModel, b: QuantizedModel) -> None:
    assert a.config == b.config
    assert a.params == b.params
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, t in a.tensors.items():
        assert b.tensors[name].dtype == t.dtype, name
        assert torch.equal(b.tensors[name], t), name


def header_span(path: Path) -> tuple[int, int]:
    """(start, end) byte offsets of the safetensors header JSON."""
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return 8, 8 + n


def read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors and manifest, read with plain safetensors (no checks of ours)."""
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as f:
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    return tensors, manifest


def resave(src: Path, dst: Path, edit: Callable[[dict, dict], None], *, rehash: bool = True):
    """Copy ``src`` to ``dst`` with ``edit(manifest, tensors)`` applied.

    The hash is recomputed afterwards (unless ``rehash`` is false or the edit is to the hash
    or removes the params), so only the check the edit aims at can fail.
    """
    tensors, manifest = read_raw(src)
    old_hash = manifest["hash"]
    edit(manifest, tensors)
    if rehash and manifest.get("hash") == old_hash and "params" in manifest:
        manifest["hash"] = content_hash(manifest["config"], tensors, manifest["params"])
    safetensors.torch.save_file(tensors, dst, metadata={MANIFEST_KEY: json.dumps(manifest)})
    return dst


def expect_refusal(path: Path, *fragments: str, **kwargs) -> str:
    """Load ``path``, expect a one-line M3VitError naming it and containing ``fragments``."""
    result = None
    with pytest.raises(M3VitError) as ei:
        result = load_package(path, **kwargs)
    assert result is None  # raised before anything was returned
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---- round trip ------------------------------------------------------------------------


def test_round_trip(saved: Path, pkg: QuantizedModel):
    loaded = load_package(saved)
    assert_same_package(pkg, loaded)
    # Tensors own writable memory: no read-only buffer, no mapping of the file.
    for t in loaded.tensors.values():
        t.bitwise_not_() if t.dtype != torch.float32 else t.neg_()
    assert_same_package(pkg, load_package(saved))


def test_package_is_a_plain_safetensors_file(saved: Path, pkg: QuantizedModel):
    tensors, manifest = read_raw(saved)
    assert sorted(tensors) == sorted(pkg.tensors)
    assert manifest["format"] == PACKAGE_FORMAT
    assert manifest["version"] == PACKAGE_VERSION
    assert manifest["tasks"] == ["semseg", "depth"]
    assert manifest["config"] == pkg.config.to_dict()
    assert manifest["tensors"]["blocks.0.attn.qkv.weight"] == {"dtype": "I8", "shape": [16, 24]}
    assert manifest["tensors"]["step"] == {"dtype": "I64", "shape": []}
    assert manifest["hash"] == content_hash(pkg.config.to_dict(), pkg.tensors, pkg.params)


def test_save_is_deterministic_and_leaves_no_temp_files(tmp_path: Path, pkg: QuantizedModel):
    a = save_package(tmp_path / "a.m3q", pkg)
    b = save_package(tmp_path / "b.m3q", make_package())
    assert a.read_bytes() == b.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.m3q", "b.m3q"]


def test_save_creates_missing_folders(tmp_path: Path, pkg: QuantizedModel):
    path = save_package(tmp_path / "runs" / "q" / "tiny.m3q", pkg)
    assert_same_package(pkg, load_package(path))


# ---- content hash ----------------------------------------------------------------------


def reference_hash(config: dict, tensors: dict[str, torch.Tensor], params) -> str:
    """The encoding documented in content_hash, written out again independently."""

    def rec(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    def canon(obj) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")

    out = rec(b"m3vit-quantized/3") + rec(canon(config)) + rec(canon(params))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.view(torch.uint8) if t.dtype == torch.bool else t
        data = np.ascontiguousarray(raw.numpy()).astype(raw.numpy().dtype.newbyteorder("<"))
        out += rec(name.encode()) + rec(DTYPE_CODES[t.dtype].encode())
        out += struct.pack(f"<{1 + t.dim()}Q", t.dim(), *t.shape) + rec(data.tobytes())
    return hashlib.sha256(out).hexdigest()


def test_content_hash_matches_documented_encoding(pkg: QuantizedModel):
    cfg = pkg.config.to_dict()
    tensors = {k: v for k, v in pkg.tensors.items() if v.dtype != torch.bfloat16}
    tensors["mask"] = torch.tensor([True, False, True])
    assert content_hash(cfg, tensors, pkg.params) == reference_hash(cfg, tensors, pkg.params)


def test_content_hash_is_stable_across_save_and_load(saved: Path, pkg: QuantizedModel):
    before = content_hash(pkg.config.to_dict(), pkg.tensors, pkg.params)
    loaded = load_package(saved)
    assert content_hash(loaded.config.to_dict(), loaded.tensors, loaded.params) == before
    assert read_raw(saved)[1]["hash"] == before


def test_content_hash_ignores_insertion_order_and_memory_layout(pkg: QuantizedModel):
    cfg = pkg.config.to_dict()
    base = content_hash(cfg, pkg.tensors, pkg.params)
    reordered = dict(reversed(list(pkg.tensors.items())))
    reordered["blocks.1.moe.w1.t"] = reordered["blocks.1.moe.w1.t"].contiguous()
    params = dict(reversed(list(pkg.params.items())))
    assert content_hash(dict(reversed(list(cfg.items()))), reordered, params) == base


def _flip_one_tensor_byte(tensors: dict) -> dict:
    t = tensors["blocks.1.moe.w1"].clone()
    t.view(torch.uint8).view(-1)[5] ^= 0x01
    return tensors | {"blocks.1.moe.w1": t}


@pytest.mark.parametrize("change", [
    "tensor_byte", "tensor_name", "tensor_dtype", "tensor_shape", "param", "nested_param",
    "config",
])
def test_content_hash_changes_with_any_content(pkg: QuantizedModel, change: str):
    cfg, tensors, params = pkg.config.to_dict(), dict(pkg.tensors), json.loads(
        json.dumps(pkg.params))
    base = content_hash(cfg, tensors, params)
    w = tensors["blocks.1.moe.w1"]
    if change == "tensor_byte":
        tensors = _flip_one_tensor_byte(tensors)
    elif change == "tensor_name":
        tensors["blocks.1.moe.w2"] = tensors.pop("blocks.1.moe.w1")
    elif change == "tensor_dtype":  # same bytes, other meaning
        tensors["blocks.1.moe.w1"] = w.view(torch.uint8)
    elif change == "tensor_shape":  # same bytes, other layout
        tensors["blocks.1.moe.w1"] = w.reshape(8, 4, 6)
    elif change == "param":
        params["bits"] = 4
    elif change == "nested_param":
        params["scales"]["blocks.1.moe.w1"][2] = 2e-06
    elif change == "config":
        cfg = get_preset("tiny", top_k=1).to_dict()
    assert content_hash(cfg, tensors, params) != base


def test_byte_swap_for_big_endian_hosts(monkeypatch: pytest.MonkeyPatch):
    t = torch.tensor([1, 0x01020304], dtype=torch.int32)
    native = package_module._le_bytes(t)
    assert native == struct.pack("<2i", 1, 0x01020304)
    # Pretend to be big-endian: the bytes handed to the hash are swapped per element, and
    # reading them back swaps again, so the round trip is exact.
    monkeypatch.setattr(package_module.sys, "byteorder", "big")
    swapped = package_module._le_bytes(t)
    assert swapped == struct.pack(">2i", 1, 0x01020304)
    back = package_module._tensor_from_le(swapped, torch.int32, [2])
    assert torch.equal(back, t)


# ---- writing safely --------------------------------------------------------------------


def test_refuses_to_overwrite_unless_asked(saved: Path):
    original = saved.read_bytes()
    other = make_package(seed=SEED + 1)
    with pytest.raises(M3VitError) as ei:
        save_package(saved, other)
    assert str(ei.value) == (
        f"{saved} exists: pass --force to overwrite it or choose another --out"
    )
    assert saved.read_bytes() == original
    save_package(saved, other, overwrite=True)
    assert saved.read_bytes() != original
    assert_same_package(other, load_package(saved))
    assert os.listdir(saved.parent) == [saved.name]


def test_refuses_to_write_over_a_folder(tmp_path: Path, pkg: QuantizedModel):
    (tmp_path / "out.m3q").mkdir()
    for overwrite in (False, True):
        with pytest.raises(M3VitError, match="is a folder"):
            save_package(tmp_path / "out.m3q", pkg, overwrite=overwrite)


# ---- refusing bad files ----------------------------------------------------------------


def test_missing_file(tmp_path: Path):
    expect_refusal(tmp_path / "nope.m3q", "not found", "m3vit quantize")


def test_folder_instead_of_file(tmp_path: Path):
    (tmp_path / "dir.m3q").mkdir()
    expect_refusal(tmp_path / "dir.m3q", "is a folder")


@pytest.mark.parametrize("content", ["empty", "random", "text"])
def test_not_a_safetensors_file(tmp_path: Path, content: str):
    path = tmp_path / "junk.m3q"
    rng = np.random.default_rng(SEED)
    path.write_bytes({"empty": b"", "random": rng.bytes(4096),
                      "text": b"model weights coming soon\n"}[content])
    expect_refusal(path, "not a readable m3vit package")


def test_truncated_file(saved: Path):
    data = saved.read_bytes()
    _, header_end = header_span(saved)
    cuts = {
        "inside the length": 5,
        "just after the length": 8,
        "inside the header": (8 + header_end) // 2,
        "end of the header": header_end,
        "inside the data": (header_end + len(data)) // 2,
        "last byte missing": len(data) - 1,
    }
    for where, cut in cuts.items():
        path = saved.with_name(f"cut-{cut}.m3q")
        path.write_bytes(data[:cut])
        msg = expect_refusal(path, "not a readable m3vit package")
        assert "truncated" in msg, where


def test_flipped_byte_in_tensor_data(saved: Path):
    data = bytearray(saved.read_bytes())
    _, header_end = header_span(saved)
    # Flip a byte of every tensor region in turn (spread over the data section).
    for offset in range(header_end, len(data), 97):
        corrupted = bytearray(data)
        corrupted[offset] ^= 0x10
        path = saved.with_name(f"flip-{offset}.m3q")
        path.write_bytes(corrupted)
        expect_refusal(path, "content hash mismatch", "corrupted or was edited")


@pytest.mark.parametrize("mask", [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80])
def test_flipped_bit_anywhere_in_the_header(tmp_path: Path, mask: int):
    # A small package keeps this exhaustive sweep fast: every header byte, every bit.
    pkg = QuantizedModel(
        config=get_preset("tiny"),
        tensors={"w": torch.arange(-6, 6, dtype=torch.int8).reshape(3, 4),
                 "s": torch.tensor([0.5, 0.25])},
        params={"scales": {"w": 0.0123}, "bits": 8},
    )
    good = save_package(tmp_path / "good.m3q", pkg)
    data = good.read_bytes()
    path = tmp_path / "flipped.m3q"
    for offset in range(0, header_span(good)[1]):
        corrupted = bytearray(data)
        corrupted[offset] ^= mask
        path.write_bytes(corrupted)
        try:
            loaded = load_package(path)
        except M3VitError as e:
            msg = str(e)
            assert "\n" not in msg and str(path) in msg, (offset, mask, msg)
            continue
        # The hash covers content, not spelling: the one flip that survives turns the
        # exponent of 1e-06 into 1E-06, the same JSON number, and must load unchanged.
        assert (data[offset:offset + 1], corrupted[offset:offset + 1]) == (b"e", b"E"), (
            offset, mask)
        assert_same_package(pkg, loaded)


def test_plain_safetensors_file_is_not_a_package(tmp_path: Path):
    for i, metadata in enumerate([None, {"format": "pt"}]):
        path = tmp_path / f"plain{i}.safetensors"
        safetensors.torch.save_file({"w": torch.zeros(2, 2)}, path, metadata=metadata)
        expect_refusal(path, "not an m3vit package", "m3vit quantize")


def _set(key, value):
    def edit(manifest, tensors):
        manifest[key] = value
    return edit


def _edit_config(manifest, tensors):
    manifest["config"]["top_k"] = 9


def _drop_tensor(manifest, tensors):
    del tensors["blocks.1.moe.w1"]  # still listed in the manifest


def _extra_tensor(manifest, tensors):
    tensors["stowaway"] = torch.zeros(3)


def _wrong_shape(manifest, tensors):
    manifest["tensors"]["blocks.1.moe.w1"]["shape"] = [4, 48]


def _wrong_dtype(manifest, tensors):
    manifest["tensors"]["blocks.1.moe.w1"]["dtype"] = "U8"


def _del(key):
    def edit(manifest, tensors):
        del manifest[key]
    return edit


@pytest.mark.parametrize(("edit", "fragments"), [
    # Version 1 stored INT8 router logits' requantization, version 2 P·V's for absolute
    # probabilities: refused, not misread.
    pytest.param(_set("version", 1), ["package version 1; this toolkit reads version 3: "
                                      "re-run `m3vit quantize`"], id="version-1"),
    pytest.param(_set("version", 2), ["package version 2; this toolkit reads version 3"],
                 id="version-2"),
    pytest.param(_set("version", 4), ["package version 4; this toolkit reads version 3"],
                 id="version-4"),
    pytest.param(_set("version", True), ["package version True"], id="version-true"),
    pytest.param(_set("version", "3"), ["package version '3'"], id="version-str"),
    pytest.param(_set("format", "m3vit-checkpoint"),
                 ["not an m3vit quantized package", "'m3vit-checkpoint'"], id="format"),
    pytest.param(_del("format"), ["not an m3vit quantized package"], id="no-format"),
    pytest.param(_del("params"), ["manifest lacks ['params']"], id="no-params"),
    pytest.param(_set("extra", 1), ["unknown keys ['extra']"], id="unknown-key"),
    pytest.param(_set("tasks", ["depth", "semseg"]), ["tasks", "differ"], id="tasks"),
    pytest.param(_set("params", [1, 2]), ["params are not a JSON object"], id="params-list"),
    pytest.param(_set("config", "tiny"), ["config is not a JSON object"], id="config-str"),
    pytest.param(_edit_config, ["invalid model config",
                                "top_k must be between 1 and n_experts=4"], id="config"),
    pytest.param(_set("hash", 42), ["hash is not a string"], id="hash-int"),
    pytest.param(_drop_tensor, ["manifest lists tensors the file lacks", "'blocks.1.moe.w1'"],
                 id="tensor-missing"),
    pytest.param(_extra_tensor, ["does not list", "'stowaway'"], id="tensor-unlisted"),
    pytest.param(_wrong_shape, ["'blocks.1.moe.w1' is I8 [4, 8, 6] in the file",
                                "in the manifest"], id="shape"),
    pytest.param(_wrong_dtype, ["'blocks.1.moe.w1' is I8", "in the manifest"], id="dtype"),
])
def test_manifest_problems(saved: Path, edit, fragments):
    bad = resave(saved, saved.with_name("bad.m3q"), edit)
    expect_refusal(bad, *fragments)


def test_edited_manifest_without_new_hash(saved: Path):
    def bump_scale(manifest, tensors):
        manifest["params"]["scales"]["blocks.0.attn.qkv.weight"] = 0.5

    bad = resave(saved, saved.with_name("bad.m3q"), bump_scale, rehash=False)
    expect_refusal(bad, "content hash mismatch: the file is corrupted or was edited")


@pytest.mark.parametrize("text", ["{not json", '{"format": NaN}', "[1, 2]",
                                  '{"format": "a", "format": "b"}'])
def test_manifest_that_is_not_valid_json(tmp_path: Path, text: str):
    path = tmp_path / "bad.m3q"
    safetensors.torch.save_file({"w": torch.zeros(1)}, path, metadata={MANIFEST_KEY: text})
    expect_refusal(path, "manifest is not")


def test_unsupported_dtype_in_file(saved: Path):
    def complexify(manifest, tensors):
        tensors["z"] = torch.zeros(2, dtype=torch.complex64)
        manifest["tensors"]["z"] = {"dtype": "C64", "shape": [2]}

    tensors, manifest = read_raw(saved)
    complexify(manifest, tensors)
    bad = saved.with_name("bad.m3q")
    safetensors.torch.save_file(tensors, bad, metadata={MANIFEST_KEY: json.dumps(manifest)})
    expect_refusal(bad, "'z' has dtype C64")


# ---- the validate callback -------------------------------------------------------------


def test_validate_runs_last_and_its_error_propagates(saved: Path, pkg: QuantizedModel):
    seen: list[QuantizedModel] = []

    def accept(p: QuantizedModel) -> None:
        seen.append(p)

    loaded = load_package(saved, validate=accept)
    assert seen == [loaded]
    assert_same_package(pkg, seen[0])

    refusal = M3VitError("blocks.3.moe.w2 is missing: re-run `m3vit quantize`")

    def refuse(p: QuantizedModel) -> None:
        raise refusal

    result = None
    with pytest.raises(M3VitError) as ei:
        result = load_package(saved, validate=refuse)
    assert ei.value is refusal and result is None


def test_validate_is_not_called_on_a_bad_file(saved: Path):
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0xFF
    saved.write_bytes(data)
    seen = []
    expect_refusal(saved, "content hash mismatch", validate=seen.append)
    assert seen == []


# ---- constructing a package ------------------------------------------------------------


@pytest.mark.parametrize(("change", "fragment"), [
    ({"params": {"scales": (0.5, 0.25)}}, "plain JSON"),
    ({"params": {"scale": float("nan")}}, "plain JSON"),
    ({"params": {1: 0.5}}, "plain JSON"),
    ({"params": {"t": torch.zeros(2)}}, "plain JSON"),
    ({"params": [0.5]}, "params must be a dict"),
    ({"tensors": {"z": torch.zeros(2, dtype=torch.complex64)}}, "complex64"),
    ({"tensors": {"__metadata__": torch.zeros(2)}}, "invalid tensor name"),
    ({"tensors": {"": torch.zeros(2)}}, "invalid tensor name"),
    ({"tensors": {"w": [1, 2]}}, "dense torch.Tensor"),
    ({"config": get_preset("tiny").to_dict()}, "must be a ModelConfig"),
])
def test_package_validates_at_construction(change: dict, fragment: str):
    fields = {"config": get_preset("tiny"), "tensors": {}, "params": {}} | change
    with pytest.raises(M3VitError, match=fragment):
        QuantizedModel(**fields)


def test_config_error_message_passes_through(saved: Path):
    # The ConfigError's own wording reaches the user, prefixed with the file.
    with pytest.raises(ConfigError) as ei:
        get_preset("tiny", top_k=9)
    bad = resave(saved, saved.with_name("bad.m3q"), _edit_config)
    expect_refusal(bad, str(ei.value))


def test_the_demo_sets_an_older_package_aside_instead_of_overwriting_it(tmp_path: Path, saved):
    """A version-1 package (INT8 router logits) in runs/ is renamed, not lost, so the demo
    can quantize afresh; a current package is reused and a foreign version refused."""
    from m3vit.sw.demo import _reuse_package
    from m3vit.sw.quant.package import PackageVersionError

    runs = tmp_path / "runs"
    runs.mkdir()
    old = runs / "tiny.m3q"
    resave(saved, old, lambda manifest, tensors: manifest.update(version=1))
    with pytest.raises(PackageVersionError) as ei:
        load_package(old)
    assert ei.value.version == 1
    before = old.read_bytes()
    (runs / "tiny.v1.m3q").write_bytes(b"an earlier copy")
    pkg, kept = _reuse_package(old)
    assert pkg is None and kept == runs / "tiny.v1.1.m3q" and kept.read_bytes() == before
    assert not old.exists() and (runs / "tiny.v1.m3q").read_bytes() == b"an earlier copy"
    assert _reuse_package(old) == (None, None)                         # nothing there
    pkg, kept = _reuse_package(saved)                                  # current version
    assert kept is None and saved.exists() and pkg.config == load_package(saved).config
    foreign = tmp_path / "foreign.m3q"
    resave(saved, foreign, lambda manifest, tensors: manifest.update(version="2"))
    with pytest.raises(PackageVersionError):
        _reuse_package(foreign)
    assert foreign.exists()
