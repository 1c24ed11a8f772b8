"""`create_model`: a timm-style entry point over the presets, with their published weights.

`PRETRAINED` maps each preset to where its ImageNet weights are published. Every preset has a
Hugging Face repository under `shi-labs/` (transformers' own NAT/DiNAT checkpoints), so no entry
needs an original SHI-Labs `.pth` URL today; `Weights(url=..., sha256=...)` entries are
supported (downloaded once into the cache, checksum checked) for variants published only there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from natjax.convert import hub
from natjax.convert.checkpoint import instantiate_architecture
from natjax.convert.loading import from_pretrained, split_kwargs, target_config
from natjax.models import get_config, get_preset, list_presets


@dataclasses.dataclass(frozen=True)
class Weights:
    """Where a preset's pretrained weights live: a hub repo, or a URL with its sha256."""

    repo_id: str | None = None
    url: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if (self.repo_id is None) == (self.url is None) or (self.url and not self.sha256):
            raise ValueError("Weights: give repo_id, or url together with sha256")


PRETRAINED: dict[str, Weights] = {
    "nat_mini": Weights("shi-labs/nat-mini-in1k-224"),
    "nat_tiny": Weights("shi-labs/nat-tiny-in1k-224"),
    "nat_small": Weights("shi-labs/nat-small-in1k-224"),
    "nat_base": Weights("shi-labs/nat-base-in1k-224"),
    "dinat_mini": Weights("shi-labs/dinat-mini-in1k-224"),
    "dinat_tiny": Weights("shi-labs/dinat-tiny-in1k-224"),
    "dinat_small": Weights("shi-labs/dinat-small-in1k-224"),
    "dinat_base": Weights("shi-labs/dinat-base-in1k-224"),
    "dinat_large": Weights("shi-labs/dinat-large-in22k-in1k-224"),
}


def create_model(
    name: str,
    pretrained: bool = False,
    num_labels: int | None = None,
    *,
    architecture: str = "classification",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    weights: Weights | None = None,
    **overrides: Any,
) -> nnx.Module:
    """A NAT/DiNAT preset, randomly initialised or with its published ImageNet weights.

    Args:
      name: a preset (`natjax.list_presets()`), e.g. "nat_mini".
      pretrained: load the published weights (`PRETRAINED[name]`, through the same download
        code as `from_pretrained` hub ids; `HF_HUB_OFFLINE=1` uses the cache only).
      num_labels: classifier size; with `pretrained`, a different size gives a fresh head.
      architecture: "classification", "model" or "backbone".
      revision, cache_dir: hub revision and cache (pretrained only).
      weights: where to load from instead of `PRETRAINED[name]`.
      **overrides: `NatConfig` fields (e.g. `drop_path_rate=0.1`) and model constructor
        keywords (`dtype`, `attention_implementation`, `remat`, `rngs`).

    Returns:
      The model.

    Raises:
      ValueError: an unknown preset or keyword, or a preset without published weights.
    """
    get_preset(name)  # unknown names: one ValueError listing the presets
    if not pretrained:
        config_overrides, model_kwargs = split_kwargs(overrides)
        config = target_config(get_config(name), num_labels, config_overrides)
        return instantiate_architecture(config, architecture, **model_kwargs)
    source = weights or PRETRAINED.get(name)
    if source is None:
        have = [n for n in list_presets() if n in PRETRAINED]
        raise ValueError(f"preset {name!r} has no published weights; presets with them: {have}")
    kwargs = dict(num_labels=num_labels, architecture=architecture, **overrides)
    if source.repo_id is not None:
        return from_pretrained(source.repo_id, revision=revision, cache_dir=cache_dir, **kwargs)
    path = hub.download_url(source.url, source.sha256, cache_dir=cache_dir)
    return from_pretrained(path, config=get_config(name), **kwargs)
