"""Byte layouts shared by the compiler and the runtime, each with its inverse.

The activation buffer holds tensors *slice-major*: for every slice of ``lanes`` columns, the
rows one word each (``docs/isa.md``). The host writes one image's patches in that layout
(:func:`patch_words`) and reads the head's INT32 output tiles back (:func:`head_output`);
the compiler lays out every on-chip tensor the same way (:func:`slice_major`,
:func:`unslice`). The runtime needs only this module, not the lowering
(:mod:`m3vit.sw.compiler.lower`).
"""

from __future__ import annotations

import numpy as np
import torch

from m3vit.hw.config import AccelConfig

from ..errors import M3VitError
from ..model.config import ModelConfig

__all__ = ["head_output", "pad_columns", "patch_words", "slice_major", "unslice"]


def _np(t) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def slice_major(x, lanes: int) -> bytes:
    """(M, D) INT8 → the buffer words of a slice-major tensor: for s, for m, D/lanes·M words."""
    x = _np(x).astype(np.int8)
    m, d = x.shape
    if d % lanes:
        raise M3VitError(f"width {d} is not a multiple of the PE array's {lanes} lanes")
    return np.ascontiguousarray(x.reshape(m, d // lanes, lanes).transpose(1, 0, 2)).tobytes()


def unslice(raw: bytes, tokens: int, dim: int, lanes: int) -> torch.Tensor:
    """Inverse of :func:`slice_major`: words → (tokens, dim) INT8 tensor."""
    words = np.frombuffer(raw, dtype=np.int8)[: tokens * dim]
    return torch.from_numpy(words.reshape(dim // lanes, tokens, lanes).transpose(1, 0, 2)
                            .reshape(tokens, dim).copy())


def pad_columns(x, multiple: int) -> np.ndarray:
    """(M, K) → (M, K rounded up to ``multiple``), zero columns appended."""
    x = _np(x).astype(np.int8)
    k = x.shape[1]
    out = np.zeros((x.shape[0], _ceil(k, multiple) * multiple), np.int8)
    out[:, :k] = x
    return out


def patch_words(patches, model: ModelConfig, config: AccelConfig) -> bytes:
    """The input region's bytes for one image: its (N_patches, C·p·p) INT8 patch rows
    (:func:`m3vit.sw.quant.golden.patchify`), K zero-padded to whole PE-array slices, slice-major.

    Raises
    ------
    M3VitError
        For patches of another shape than ``model``'s.
    """
    shape = (model.n_patches, model.in_chans * model.patch_size ** 2)
    if tuple(_np(patches).shape) != shape:
        raise M3VitError(f"patches must be {shape[0]}x{shape[1]} for {model.name!r}, got "
                         f"{'x'.join(map(str, _np(patches).shape))}")
    return slice_major(pad_columns(patches, config.pe_rows), config.pe_cols)


def head_output(raw: bytes, tokens: int, n_out: int, lanes: int) -> torch.Tensor:
    """The head's DDR output (n_tiles, tokens, lanes) INT32 → (tokens, n_out) int64."""
    n_tiles = _ceil(n_out, lanes)
    acc = np.frombuffer(raw[:n_tiles * tokens * lanes * 4], "<i4").reshape(n_tiles, tokens,
                                                                          lanes)
    return torch.from_numpy(acc.transpose(1, 0, 2).reshape(tokens, -1)[:, :n_out]
                            .astype(np.int64))

