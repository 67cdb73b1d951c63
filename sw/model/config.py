"""Model configuration and the presets the toolkit ships.

One frozen :class:`ModelConfig` describes an M³ViT: the ViT backbone, where the MoE layers
sit, the router variant and the per-task heads. It is validated at construction, so every
later stage (training, quantization, compilation) can trust it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from ..errors import M3VitError

TASK_KINDS = ("semseg", "depth", "edge")
GATE_KINDS = ("multi", "task_cond")
HEAD_KINDS = ("linear", "setr_pup")

#: The largest model the toolkit builds: parameters (an analytic count) and tokens an image.
#: Far above every preset (``m3vit-s`` at 480 x 640: ~1.2 k tokens); a config beyond them
#: is a damaged file, refused before anything is allocated.
MAX_PARAMS = 2**31
MAX_TOKENS = 2**16


class ConfigError(M3VitError, ValueError):
    """An invalid model configuration (the message names the offending value)."""


@dataclass(frozen=True)
class TaskSpec:
    """One dense-prediction task.

    Parameters
    ----------
    name : str
        Task name used by the CLI, heads and routers (``"semseg"``, ``"depth"``, ...).
    kind : str
        ``"semseg"`` (per-pixel classes, cross-entropy, mIoU), ``"depth"`` (per-pixel
        regression, L1, RMSE) or ``"edge"`` (per-pixel boundary logit, BCE, F1).
    n_out : int
        Output channels of the head: the class count for ``semseg``, 1 otherwise.
    """

    name: str
    kind: str
    n_out: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.kind, str):
            raise ConfigError(f"task name and kind must be strings, got {self.name!r}, "
                              f"{self.kind!r}")
        if (not isinstance(self.n_out, numbers.Integral) or isinstance(self.n_out, bool)
                or not 1 <= self.n_out <= 1 << 16):
            raise ConfigError(f"task n_out must be an integer from 1 to 65536, got "
                              f"{self.n_out!r}")
        if not self.name.isidentifier():
            raise ConfigError(f"task name must be an identifier, got {self.name!r}")
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"task kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.kind == "semseg" and self.n_out < 2:
            raise ConfigError(f"semseg needs at least 2 classes, got n_out={self.n_out!r}")
        if self.kind != "semseg" and self.n_out != 1:
            raise ConfigError(f"{self.kind} task {self.name!r} has n_out=1, got {self.n_out!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one M³ViT (DESIGN.md, "The M³ViT model, exactly").

    Parameters
    ----------
    name : str
        Preset name, recorded in checkpoints so a checkpoint of another preset is refused.
    img_size : tuple of int
        Input (height, width) in pixels; both divisible by ``patch_size``.
    patch_size : int
        Square patch edge; the token grid is ``img_size // patch_size``.
    embed_dim : int
        Token width D.
    depth : int
        Number of transformer blocks.
    num_heads : int
        Attention heads; must divide ``embed_dim``.
    mlp_ratio : float
        Dense MLP hidden width as a multiple of D.
    n_experts : int
        Experts per MoE layer (E). ``0`` disables MoE: every block is dense (a plain ViT).
    top_k : int
        Experts chosen per token (k <= E).
    moe_mlp_ratio : float
        Expert hidden width H as a multiple of D.
    gate : str
        ``"multi"``: one router per task per MoE layer (M³ViT's multi-gate).
        ``"task_cond"``: one router per MoE layer fed token ⊕ task embedding.
    tasks : tuple of TaskSpec
        The tasks, in head order.
    head : str
        ``"linear"``: per-token linear head + bilinear upsampling (what the accelerator runs).
        ``"setr_pup"``: SETR-PUP style conv decoder (float only).
    decoder_channels : int
        Channels of the SETR-PUP decoder.
    in_chans : int
        Image channels.
    balance_weight : float
        Weight of the load-balancing loss, summed over gates.
    ln_eps : float
        LayerNorm epsilon.
    """

    name: str
    img_size: tuple[int, int]
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    n_experts: int
    top_k: int
    moe_mlp_ratio: float
    tasks: tuple[TaskSpec, ...]
    gate: str = "multi"
    head: str = "linear"
    decoder_channels: int = 64
    in_chans: int = 3
    balance_weight: float = 0.01
    ln_eps: float = 1e-6

    def __post_init__(self) -> None:
        self._check_types()
        h, w = self.img_size
        p = self.patch_size
        if p < 1:
            raise ConfigError(f"patch_size must be >= 1, got {p!r}")
        if h % p or w % p:
            raise ConfigError(
                f"image size {h}x{w} is not divisible by the patch size {p}: "
                f"use a multiple of {p} in each dimension"
            )
        if self.embed_dim < 1 or self.depth < 1:
            raise ConfigError(
                f"embed_dim and depth must be >= 1, got {self.embed_dim}, {self.depth}"
            )
        if self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ConfigError(
                f"num_heads must divide embed_dim={self.embed_dim}, got {self.num_heads!r}"
            )
        if self.n_experts < 0:
            raise ConfigError(f"n_experts must be >= 0, got {self.n_experts!r}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(
                f"top_k must be between 1 and n_experts={self.n_experts}, got {self.top_k!r}"
            )
        if self.gate not in GATE_KINDS:
            raise ConfigError(f"gate must be one of {GATE_KINDS}, got {self.gate!r}")
        if self.head not in HEAD_KINDS:
            raise ConfigError(f"head must be one of {HEAD_KINDS}, got {self.head!r}")
        if not self.tasks:
            raise ConfigError("a model needs at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names!r}")
        for ratio_name in ("mlp_ratio", "moe_mlp_ratio"):
            ratio = getattr(self, ratio_name)
            if ratio <= 0 or (ratio * self.embed_dim) % 1:
                raise ConfigError(
                    f"{ratio_name} x embed_dim must be a positive integer, got {ratio!r}"
                )

        # A damaged or hand-edited file must not make the toolkit build a model that
        # exhausts the memory (depth 10^9, a 10^6-pixel patch grid): bound what is built.
        tokens = (h // p) * (w // p)
        d = self.embed_dim
        params = (self.depth * d * d * (4 + 2 * self.mlp_ratio
                                        + 2 * self.moe_mlp_ratio * max(self.n_experts, 1))
                  + self.in_chans * p * p * d + tokens * d
                  + sum(t.n_out for t in self.tasks) * max(d, self.decoder_channels))
        if params > MAX_PARAMS or tokens > MAX_TOKENS:
            raise ConfigError(
                f"the model would have ~{params:.3g} parameters and {tokens} tokens an image, "
                f"over what this toolkit builds ({MAX_PARAMS:.3g}, {MAX_TOKENS}): a damaged "
                "config?"
            )

    def _check_types(self) -> None:
        """One ConfigError for a field of the wrong type (a config read from a file)."""
        ints = ("patch_size", "embed_dim", "depth", "num_heads", "n_experts", "top_k",
                "decoder_channels", "in_chans")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
        for name in ("mlp_ratio", "moe_mlp_ratio", "balance_weight", "ln_eps"):
            v = getattr(self, name)
            if (not isinstance(v, numbers.Real) or isinstance(v, bool)
                    or not math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
        for name in ("in_chans", "decoder_channels", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.ln_eps <= 0 or self.balance_weight < 0:
            raise ConfigError(f"ln_eps must be > 0 and balance_weight >= 0, got "
                              f"{self.ln_eps!r}, {self.balance_weight!r}")
        size = self.img_size
        if (not isinstance(size, tuple) or len(size) != 2
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                           and v >= 1 for v in size)):
            raise ConfigError(f"img_size must be two positive integers, got {size!r}")
        for name in ("name", "gate", "head"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.tasks, tuple) or not all(isinstance(t, TaskSpec)
                                                        for t in self.tasks):
            raise ConfigError("tasks must be task specs")

    # ---- derived shape -----------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (rows, cols)."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def n_patches(self) -> int:
        """Patch tokens per image."""
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        """Tokens per image including the cls token."""
        return self.n_patches + 1

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the dense MLP."""
        return int(self.mlp_ratio * self.embed_dim)

    @property
    def expert_hidden(self) -> int:
        """Hidden width H of one expert."""
        return int(self.moe_mlp_ratio * self.embed_dim)

    @property
    def moe(self) -> bool:
        """Whether any block is an MoE block."""
        return self.n_experts > 0

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        """Indices of the MoE blocks: the odd ones (1, 3, 5, ...), none if MoE is off."""
        return tuple(range(1, self.depth, 2)) if self.moe else ()

    @property
    def task_names(self) -> tuple[str, ...]:
        """Task names in head order."""
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskSpec:
        """Return the task called ``name``.

        Raises
        ------
        ConfigError
            If the model has no such task; the message lists the tasks it has.
        """
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(
            f"unknown task {name!r} for preset {self.name!r} (tasks: {', '.join(self.task_names)})"
        )

    def replace(self, **changes: Any) -> ModelConfig:
        """Return a copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)

    # ---- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, stored in checkpoints and packages."""
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        d["tasks"] = [dataclasses.asdict(t) for t in self.tasks]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        try:
            fields = dict(d)
            fields["img_size"] = tuple(fields["img_size"])
            fields["tasks"] = tuple(TaskSpec(**t) for t in fields["tasks"])
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"incomplete model config: {e}") from None


def _seg_depth(n_classes: int) -> tuple[TaskSpec, ...]:
    return (TaskSpec("semseg", "semseg", n_classes), TaskSpec("depth", "depth", 1))

PRESETS: dict[str, ModelConfig] = {
    # Unit tests and CI end to end. Patch 4 (not 8) gives an 8x8 token grid, enough for the
    # per-token head to draw recognisable shapes on the 32x32 synthetic scenes.
    "tiny": ModelConfig(
        name="tiny", img_size=(32, 32), patch_size=4, embed_dim=64, depth=4, num_heads=2,
        mlp_ratio=4.0, n_experts=4, top_k=2, moe_mlp_ratio=2.0, tasks=_seg_depth(4),
    ),
    # The model Edge-MoE (ICCAD 2023) runs on a ZCU102: the performance reference.
    # 19 classes as in Cityscapes, the data set its 128x256 input comes from.
    "edge-moe": ModelConfig(
        name="edge-moe", img_size=(128, 256), patch_size=16, embed_dim=192, depth=12,
        num_heads=3, mlp_ratio=4.0, n_experts=16, top_k=2, moe_mlp_ratio=2.0,
        tasks=_seg_depth(19),
    ),
    # ViT-S as in the M³ViT repository's NYUD-v2 configs (top-2, expert hidden 2·D, so
    # top-k x ratio = 4 and the active FFN compute equals the dense MLP's).
    "m3vit-s": ModelConfig(
        name="m3vit-s", img_size=(480, 640), patch_size=16, embed_dim=384, depth=12,
        num_heads=12, mlp_ratio=4.0, n_experts=16, top_k=2, moe_mlp_ratio=2.0,
        tasks=_seg_depth(40),
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Return preset ``name`` with ``overrides`` applied.

    Raises
    ------
    ConfigError
        For an unknown preset (the message lists the known ones) or an invalid override.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg
