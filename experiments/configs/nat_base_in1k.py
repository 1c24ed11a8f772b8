"""NAT-Base on ImageNet-1k from scratch with the paper recipe (natjax/train/recipes/in1k.py).

natjax train --config nat_base_in1k --set data.data_dir=/data/tfds     # the packaged recipe
natjax train --config experiments/configs/nat_base_in1k.py              # this file (edit a copy)
# smaller global batch (lr scales linearly): --set data.batch_size=256
"""

from __future__ import annotations

from natjax.train import recipes
from natjax.train.config import TrainConfig


def get_config() -> TrainConfig:
    """The packaged nat_base_in1k recipe."""
    return recipes.get_config("nat_base_in1k")
