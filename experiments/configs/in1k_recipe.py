"""The shared ImageNet-1k recipe of NAT/DiNAT, now packaged as `natjax.train.recipes.in1k`
(re-exported here for experiment files that import it).

Not an experiment by itself; the nat_*/dinat_* files use it. Example:
  natjax train --config nat_mini_in1k --set data.data_dir=/data/tfds
"""

from __future__ import annotations

from natjax.train.config import TrainConfig
from natjax.train.recipes.in1k import DROP_PATH, in1k_config

__all__ = ["DROP_PATH", "get_config", "in1k_config"]


def get_config() -> TrainConfig:
    """NAT-Mini (the recipe's reference variant)."""
    return in1k_config("nat_mini", DROP_PATH["mini"])
