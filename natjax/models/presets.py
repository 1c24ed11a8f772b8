"""Published NAT and DiNAT variants as a data table.

Architectures are those of the original SHI-Labs code (`classification/nat.py`, `dinat.py`) and
the Hugging Face `shi-labs/*` checkpoints; metadata (parameters, FLOPs at 224x224, ImageNet-1k
top-1) are the numbers published in the papers (NAT arXiv 2204.07143 table 2, DiNAT arXiv
2209.15001 tables 2-3). Entries marked `uncertain` were written from memory of the papers and not
checked against a primary source in this repository; treat them as approximate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from natjax.models.config import NatConfig

# DiNAT at 224x224 with kernel 7 alternates dilation 1 and the stage's largest useful dilation
# (map size // kernel size: 56//7=8, 28//7=4, 14//7=2, 7//7=1), DiNAT sec. 3.2.
_DINAT_224_K7 = {
    6: ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5),
    18: ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """One published variant.

    Attributes:
      config: `NatConfig` keyword arguments (ImageNet-1k head: num_labels=1000).
      params_m: published parameter count, millions.
      flops_g: published FLOPs (multiply-adds) at 224x224, billions.
      top1: published ImageNet-1k top-1 accuracy (%) at 224x224.
      pretraining: "in1k" or "in22k".
      uncertain: which metadata fields were not verified against a primary source.
    """

    config: dict[str, Any]
    params_m: float
    flops_g: float
    top1: float
    pretraining: str = "in1k"
    uncertain: tuple[str, ...] = ()


def _variant(
    family: str,
    embed_dim: int,
    depths: tuple[int, ...],
    heads: tuple[int, ...],
    mlp_ratio: float,
    drop_path_rate: float,
    layer_scale: float,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model_type=family,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        kernel_size=7,
        mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate,
        layer_scale_init_value=layer_scale,
        num_labels=1000,
    )
    if family == "dinat":
        kwargs["dilations"] = _DINAT_224_K7[depths[2]]
    return kwargs


_MINI = ((3, 4, 6, 5), (2, 4, 8, 16), 64, 3.0, 0.2, 0.0)
_TINY = ((3, 4, 18, 5), (2, 4, 8, 16), 64, 3.0, 0.2, 0.0)
_SMALL = ((3, 4, 18, 5), (3, 6, 12, 24), 96, 2.0, 0.3, 1e-5)
_BASE = ((3, 4, 18, 5), (4, 8, 16, 32), 128, 2.0, 0.5, 1e-5)
_LARGE = ((3, 4, 18, 5), (6, 12, 24, 48), 192, 2.0, 0.35, 0.0)


def _make(family: str, spec: tuple) -> dict[str, Any]:
    depths, heads, embed, mlp, dpr, scale = spec
    return _variant(family, embed, depths, heads, mlp, dpr, scale)


PRESETS: dict[str, Preset] = {
    "nat_mini": Preset(_make("nat", _MINI), 20.0, 2.7, 81.8),
    "nat_tiny": Preset(_make("nat", _TINY), 28.0, 4.3, 83.2),
    "nat_small": Preset(_make("nat", _SMALL), 51.0, 7.8, 83.7),
    "nat_base": Preset(_make("nat", _BASE), 90.0, 13.7, 84.3),
    "dinat_mini": Preset(_make("dinat", _MINI), 20.0, 2.7, 81.8),
    "dinat_tiny": Preset(_make("dinat", _TINY), 28.0, 4.3, 82.7),
    "dinat_small": Preset(_make("dinat", _SMALL), 51.0, 7.8, 83.8),
    "dinat_base": Preset(_make("dinat", _BASE), 90.0, 13.7, 84.4),
    # IN-22k pre-trained, fine-tuned on IN-1k at 224x224. Its layer scale and drop-path rate are
    # recalled, not checked against the released config.
    "dinat_large": Preset(
        _make("dinat", _LARGE),
        200.0,
        34.5,
        86.6,
        pretraining="in22k",
        uncertain=("config.layer_scale_init_value", "config.drop_path_rate"),
    ),
}


def list_presets() -> tuple[str, ...]:
    """Names of all presets."""
    return tuple(PRESETS)


def get_preset(name: str) -> Preset:
    """The `Preset` called `name` (config kwargs plus published metadata)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; expected one of {list_presets()}.")
    return PRESETS[name]


def get_config(name: str, **overrides: Any) -> NatConfig:
    """The `NatConfig` of preset `name`, with optional field `overrides` (e.g. num_labels=10).

    Args:
      name: a key of `PRESETS`, e.g. "nat_mini" or "dinat_tiny".
      **overrides: `NatConfig` fields to change.

    Returns:
      The validated config.
    """
    kwargs = {**get_preset(name).config, **overrides}
    return NatConfig(**kwargs)
