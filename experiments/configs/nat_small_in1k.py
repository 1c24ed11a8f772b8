"""NAT-Small on ImageNet-1k from scratch with the paper recipe (see in1k_recipe.py).

natjax train --config experiments/configs/nat_small_in1k.py --set data.data_dir=/data/tfds
# smaller global batch (lr scales linearly): --set data.batch_size=256
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from in1k_recipe import DROP_PATH, in1k_config  # noqa: E402

from natjax.train.config import TrainConfig  # noqa: E402


def get_config() -> TrainConfig:
    """NAT-Small, drop-path small."""
    return in1k_config("nat_small", DROP_PATH["small"])
