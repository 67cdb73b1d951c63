"""The quantized package: one ``.m3q`` file that carries a quantized M³ViT to the board.

A package *is* a safetensors file. Its tensors are the quantized weights (and whatever
else the quantizer stores as tensors); its header's ``__metadata__`` holds one key,
``"m3vit"``, whose value is the JSON manifest::

    {"format": "m3vit-quantized", "version": 3,
     "config": ModelConfig.to_dict(), "tasks": ["semseg", "depth"],
     "params": {...JSON quantization parameters...},
     "tensors": {"name": {"dtype": "I8", "shape": [64, 64]}, ...},
     "hash": "<sha256 hex of content_hash()>"}

``dtype`` is the safetensors dtype code (``"I8"``, ``"I32"``, ``"F32"``, ...), the same
string the safetensors header records for that tensor. Every manifest entry is either
covered by the content hash (config, params, tensor names, dtypes, shapes and bytes) or
must equal something that is (format, version, tasks, the tensor table), so
:func:`load_package` accepts a file only if nothing in it changed since
:func:`save_package` wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from ..errors import M3VitError
from ..model.config import ConfigError, ModelConfig

PACKAGE_FORMAT = "m3vit-quantized"
PACKAGE_VERSION = 3
PACKAGE_SUFFIX = ".m3q"

MANIFEST_KEY = "m3vit"
"""Key of the manifest in the safetensors ``__metadata__`` header (a dict of strings)."""

# The dtypes a package may hold, with their safetensors codes. Narrower than what
# safetensors supports on purpose: float8/complex/unsigned wide types have no use on the
# board, and refusing them keeps the C side's dtype table short.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

_MANIFEST_KEYS = frozenset({"format", "version", "config", "tasks", "params", "tensors", "hash"})
_HASH_DOMAIN = f"{PACKAGE_FORMAT}/{PACKAGE_VERSION}".encode()
_REDO = "the file is corrupted or was edited; re-run `m3vit quantize`"


class PackageVersionError(M3VitError):
    """A package of another format version; ``version`` is what its manifest says."""

    def __init__(self, message: str, version: Any):
        super().__init__(message)
        self.version = version


@dataclass(frozen=True, eq=False)
class QuantizedModel:
    """A quantized model as stored in one ``.m3q`` file.

    ``eq=False``: tensors have no boolean ``==``, so packages compare by identity; compare
    their :func:`content_hash` instead.

    Parameters
    ----------
    config : ModelConfig
        The architecture the tensors belong to.
    tensors : dict of str to torch.Tensor
        Named dense tensors of the dtypes in :data:`DTYPE_CODES` (int8 weights, int32
        biases, ...). Names are non-empty and not ``"__metadata__"`` (safetensors reserves it).
    params : dict
        Quantization parameters as plain JSON (dicts with string keys, lists, str, int,
        finite float, bool, None): per-tensor float scales, calibration settings, ...

    Raises
    ------
    M3VitError
        If a field has the wrong type, a tensor an unsupported dtype or layout, or
        ``params`` does not survive a JSON round trip unchanged (a tuple, a non-string key,
        NaN, a tensor, ...); the message names the offending entry.
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.config, ModelConfig):
            raise M3VitError(f"config must be a ModelConfig, got {type(self.config).__name__}")
        if not isinstance(self.tensors, dict):
            raise M3VitError(f"tensors must be a dict, got {type(self.tensors).__name__}")
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise M3VitError(f"invalid tensor name {name!r}")
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                raise M3VitError(f"tensor {name!r} must be a dense torch.Tensor, got {t!r:.60}")
            _dtype_code(name, t.dtype)
        if not isinstance(self.params, dict):
            raise M3VitError(f"params must be a dict, got {type(self.params).__name__}")
        try:
            plain = json.loads(_canonical_json(self.params))
        except (TypeError, ValueError) as e:
            raise M3VitError(f"params must be plain JSON: {e}") from None
        if plain != self.params:
            raise M3VitError(
                "params must be plain JSON (dicts with string keys, lists, numbers, strings): "
                "they change in a JSON round trip"
            )


# ---- content hash ----------------------------------------------------------------------


def content_hash(
    config_dict: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], params: Any
) -> str:
    """SHA-256 over a canonical encoding of a package's content, as lowercase hex.

    The input to SHA-256 is the concatenation, in this order, of::

        rec(b"m3vit-quantized/3")          # PACKAGE_FORMAT/PACKAGE_VERSION
        rec(canonical_json(config_dict))
        rec(canonical_json(params))
        for name in sorted(tensors):          # by code point = by UTF-8 bytes
            rec(utf8(name))
            rec(ascii(dtype_code))             # "I8", "I32", "F32", ... (DTYPE_CODES)
            u64(ndim) u64(shape[0]) ... u64(shape[ndim - 1])
            rec(data)                          # C-order element bytes, little-endian

    where ``u64(n)`` is ``n`` as 8 little-endian bytes and ``rec(b) = u64(len(b)) b``: every
    field is length-prefixed, so no two different contents encode alike.
    ``canonical_json`` is ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
    ensure_ascii=True, allow_nan=False)`` encoded as ASCII: keys sorted by code point, no
    whitespace, non-ASCII as lowercase ``\\uXXXX`` escapes, integers in decimal and floats
    in Python's shortest round-trip ``repr`` (``0.1``, ``1e-06``, ``4.0``), which a C
    implementation reproduces with a shortest-round-trip formatter (e.g. Ryu) and
    Python's exponent rule (exponent form below 1e-4 and from 1e16; at least two
    exponent digits).

    Parameters
    ----------
    config_dict : mapping
        The model configuration as :meth:`ModelConfig.to_dict` gives it (or as read back
        from a manifest).
    tensors : mapping of str to torch.Tensor
        The package's tensors; dtypes must be in :data:`DTYPE_CODES`.
    params : JSON-able
        The quantization parameters.

    Returns
    -------
    str
        64 lowercase hex digits.

    Raises
    ------
    M3VitError
        If a tensor has an unsupported dtype, or ``config_dict``/``params`` are not JSON
        (non-finite floats included).
    """
    h = hashlib.sha256()

    def rec(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    rec(_HASH_DOMAIN)
    try:
        rec(_canonical_json(config_dict).encode("ascii"))
        rec(_canonical_json(params).encode("ascii"))
    except (TypeError, ValueError) as e:
        raise M3VitError(f"package config and params must be plain JSON: {e}") from None
    for name in sorted(tensors):
        t = tensors[name]
        rec(name.encode("utf-8"))
        rec(_dtype_code(name, t.dtype).encode("ascii"))
        h.update(t.dim().to_bytes(8, "little"))
        for d in t.shape:
            h.update(d.to_bytes(8, "little"))
        rec(_le_bytes(t))
    return h.hexdigest()


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def _dtype_code(name: str, dtype: torch.dtype) -> str:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise M3VitError(
            f"tensor {name!r} has dtype {dtype}, which a package cannot hold "
            f"(supported: {', '.join(str(d).removeprefix('torch.') for d in DTYPE_CODES)})"
        ) from None


def _swap_bytes(raw: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Reverse the byte order of every ``itemsize``-byte element of a flat uint8 tensor."""
    return raw.reshape(-1, itemsize).flip(1).reshape(-1) if itemsize > 1 else raw


def _le_bytes(t: torch.Tensor) -> bytes:
    """The C-order element bytes of ``t``, little-endian whatever the host."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    if sys.byteorder == "big":
        raw = _swap_bytes(raw, t.element_size())
    return raw.numpy().tobytes()


def _tensor_from_le(data: bytes | bytearray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """Inverse of :func:`_le_bytes`: a tensor that owns a copy of ``data``."""
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if sys.byteorder == "big":
        raw = _swap_bytes(raw, dtype.itemsize)
    return raw.view(dtype).reshape(shape)


# ---- save --------------------------------------------------------------------------------


def save_package(
    path: str | os.PathLike, pkg: QuantizedModel, *, overwrite: bool = False
) -> Path:
    """Write ``pkg`` to ``path`` as one ``.m3q`` file, atomically.

    The file is written to a temporary file in the same folder and renamed over ``path``,
    so a crash or a full disk never leaves a half-written package under that name. The
    suffix is not enforced; :data:`PACKAGE_SUFFIX` is the convention.

    Parameters
    ----------
    path : path-like
        Destination file; missing parent folders are created.
    pkg : QuantizedModel
        The package to write.
    overwrite : bool
        Replace an existing file. Without it an existing ``path`` is never touched.

    Returns
    -------
    Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    M3VitError
        If ``path`` exists and ``overwrite`` is false, is a folder, or cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise M3VitError(f"{path} is a folder: choose a file name such as model{PACKAGE_SUFFIX}")
    if path.exists() and not overwrite:
        raise M3VitError(f"{path} exists: pass --force to overwrite it or choose another --out")
    # clone(): safetensors refuses tensors that share storage (views of one buffer).
    tensors = {n: t.detach().cpu().contiguous().clone() for n, t in pkg.tensors.items()}
    config = pkg.config.to_dict()
    manifest = {
        "format": PACKAGE_FORMAT,
        "version": PACKAGE_VERSION,
        "config": config,
        "tasks": list(pkg.config.task_names),
        "params": pkg.params,
        "tensors": {
            n: {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape)}
            for n, t in sorted(tensors.items())
        },
        "hash": content_hash(config, tensors, pkg.params),
    }
    blob = safetensors.torch.save(tensors, metadata={MANIFEST_KEY: _canonical_json(manifest)})
    # Own O_EXCL temp file rather than mkstemp: mkstemp creates it 0600, and the package
    # should get the user's usual permissions (umask) since it is meant to be copied around.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise M3VitError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---- load --------------------------------------------------------------------------------


def load_package(
    path: str | os.PathLike,
    *,
    validate: Callable[[QuantizedModel], None] | None = None,
) -> QuantizedModel:
    """Read and fully check a package written by :func:`save_package`.

    The whole file is read into memory (no file handle or memory map stays open) and
    checked in this order: a readable safetensors file; an ``"m3vit"`` manifest of valid
    JSON; the format and version; a valid model config; the task list; the manifest's
    tensor table against the file's tensors (names, dtypes, shapes); the content hash;
    finally ``validate``. Any failure raises; nothing partially loaded is ever returned.

    Parameters
    ----------
    path : path-like
        The ``.m3q`` file.
    validate : callable, optional
        Called with the checked package as the last step, e.g. by the quantizer to check
        that every tensor its model needs is present with the right shape. It signals a
        problem by raising :class:`M3VitError`, which propagates unchanged.

    Returns
    -------
    QuantizedModel
        Config, tensors (CPU, each owning its memory) and params.

    Raises
    ------
    M3VitError
        One line naming ``path``, what is wrong and what to do: a missing or unreadable
        file, not a safetensors file (or a truncated or corrupted one), no manifest,
        another format or version, an invalid config, a tensor table that disagrees with
        the file, a content hash mismatch, or whatever ``validate`` raises.
    """
    path = Path(path)
    if not path.exists():
        raise M3VitError(f"package {path} not found: create one with `m3vit quantize`")
    if path.is_dir():
        raise M3VitError(f"{path} is a folder, not a package file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise M3VitError(f"cannot read package {path}: {e.strerror or e}") from None

    try:
        entries = safetensors.deserialize(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (safetensors.SafetensorError, OSError, ValueError, RecursionError) as e:
        raise M3VitError(
            f"{path} is not a readable m3vit package ({_one_line(e)}): it is truncated, "
            f"corrupted or another kind of file; re-run `m3vit quantize`"
        ) from None

    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or MANIFEST_KEY not in metadata:
        raise M3VitError(
            f"{path} is a safetensors file but not an m3vit package (no {MANIFEST_KEY!r} "
            f"manifest in its header): create packages with `m3vit quantize`"
        )
    manifest = _parse_manifest(path, metadata[MANIFEST_KEY])

    cfg_dict = manifest["config"]
    if not isinstance(cfg_dict, dict):
        raise M3VitError(f"{path}: the manifest's config is not a JSON object: {_REDO}")
    try:
        config = ModelConfig.from_dict(cfg_dict)
    except ConfigError as e:
        raise M3VitError(
            f"{path}: invalid model config: {_one_line(e)}: re-run `m3vit quantize`"
        ) from None
    except (TypeError, ValueError, AttributeError) as e:  # wrong JSON types in fields
        raise M3VitError(f"{path}: invalid model config ({_one_line(e)}): {_REDO}") from None
    if manifest["tasks"] != list(config.task_names):
        raise M3VitError(
            f"{path}: the manifest's tasks {manifest['tasks']!r} differ from its config's "
            f"{list(config.task_names)!r}: {_REDO}"
        )
    params = manifest["params"]
    if not isinstance(params, dict):
        raise M3VitError(f"{path}: the manifest's params are not a JSON object: {_REDO}")

    tensors = _check_tensors(path, manifest["tensors"], entries)
    if content_hash(cfg_dict, tensors, params) != manifest["hash"]:
        raise M3VitError(f"{path}: content hash mismatch: {_REDO}")
    try:
        pkg = QuantizedModel(config=config, tensors=tensors, params=params)
    except M3VitError as e:
        raise M3VitError(f"{path}: {_one_line(e)}: {_REDO}") from None
    if validate is not None:
        validate(pkg)
    return pkg


def _parse_manifest(path: Path, text: str) -> dict[str, Any]:
    """Decode the manifest and check its keys, format and version."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key in {keys}")
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        manifest = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise M3VitError(
            f"{path}: the package manifest is not valid JSON ({_one_line(e)}): {_REDO}"
        ) from None
    if not isinstance(manifest, dict):
        raise M3VitError(f"{path}: the package manifest is not a JSON object: {_REDO}")
    fmt = manifest.get("format")
    if fmt != PACKAGE_FORMAT:
        raise M3VitError(
            f"{path} is not an m3vit quantized package (format {fmt!r}, expected "
            f"{PACKAGE_FORMAT!r}): create packages with `m3vit quantize`"
        )
    version = manifest.get("version")
    # bool is an int in Python; `true` must not pass for version 1 (or 2).
    if type(version) is not int or version != PACKAGE_VERSION:
        raise PackageVersionError(
            f"{path}: package version {version!r}; this toolkit reads version "
            f"{PACKAGE_VERSION}: re-run `m3vit quantize`", version)
    missing = sorted(_MANIFEST_KEYS - manifest.keys())
    unknown = sorted(manifest.keys() - _MANIFEST_KEYS)
    if missing or unknown:
        what = f"lacks {missing}" if missing else f"has unknown keys {unknown}"
        raise M3VitError(f"{path}: the package manifest {what}: {_REDO}")
    if not isinstance(manifest["hash"], str):
        raise M3VitError(f"{path}: the manifest's hash is not a string: {_REDO}")
    return manifest


def _check_tensors(
    path: Path, table: Any, entries: Iterable[tuple[str, dict[str, Any]]]
) -> dict[str, torch.Tensor]:
    """Check the manifest's tensor table against the file and build the tensors."""
    if not isinstance(table, dict):
        raise M3VitError(f"{path}: the manifest's tensor table is not a JSON object: {_REDO}")
    found = dict(entries)
    absent = sorted(table.keys() - found.keys())
    if absent:
        raise M3VitError(
            f"{path}: the manifest lists tensors the file lacks ({_names(absent)}): {_REDO}"
        )
    unlisted = sorted(found.keys() - table.keys())
    if unlisted:
        raise M3VitError(
            f"{path}: the file holds tensors its manifest does not list ({_names(unlisted)}): "
            f"{_REDO}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(found):
        info = found[name]
        code, shape = info["dtype"], list(info["shape"])
        if code not in _CODE_DTYPES:
            raise M3VitError(
                f"{path}: tensor {name!r} has dtype {code}, which a package cannot hold: {_REDO}"
            )
        if table[name] != {"dtype": code, "shape": shape}:
            raise M3VitError(
                f"{path}: tensor {name!r} is {code} {shape} in the file but {table[name]!r} "
                f"in the manifest: {_REDO}"
            )
        tensors[name] = _tensor_from_le(info["data"], _CODE_DTYPES[code], shape)
    return tensors


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _one_line(e: BaseException) -> str:
    """A foreign exception's message on one line (safetensors/json messages may wrap)."""
    return " ".join(str(e).split()) or type(e).__name__
