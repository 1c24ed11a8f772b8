"""The training recipes shipped with natjax, by name: `natjax train --config nat_tiny_in1k`.

They are part of the installed package (no clone needed); `experiments/configs/*.py` are thin
files over the same functions for editing a copy. `load` takes a recipe name or the path of an
experiment file defining `get_config()`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from natjax.train.config import TrainConfig
from natjax.train.defaults import digits_config, load_config
from natjax.train.recipes.finetune import finetune_config
from natjax.train.recipes.in1k import DROP_PATH, in1k_config


def _in1k(preset: str) -> Callable[[], TrainConfig]:
    def recipe() -> TrainConfig:
        return in1k_config(preset, DROP_PATH[preset.split("_")[1]])

    recipe.__doc__ = f"{preset} on ImageNet-1k with the paper recipe."
    return recipe


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "digits": digits_config,
    "finetune": finetune_config,
    **{
        f"{preset}_in1k": _in1k(preset)
        for preset in (
            "nat_mini",
            "nat_tiny",
            "nat_small",
            "nat_base",
            "dinat_mini",
            "dinat_tiny",
        )
    },
}


def names() -> list[str]:
    """The recipe names, sorted."""
    return sorted(RECIPES)


def get_config(name: str) -> TrainConfig:
    """The `TrainConfig` of recipe `name`.

    Raises:
      ValueError: naming `--config`, for an unknown name (with the closest one and the list).
    """
    if name not in RECIPES:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(
            f"--config {name!r}: neither an experiment file nor a recipe{hint}; recipes: "
            f"{', '.join(names())}."
        )
    return RECIPES[name]()


def load(config: str | None) -> TrainConfig:
    """A recipe name, an experiment file (`get_config()`), or None for the digits default."""
    if config is None or Path(config).exists() or config.endswith(".py"):
        return load_config(config)
    return get_config(config)
