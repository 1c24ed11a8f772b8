"""The offline default: a small NAT on scikit-learn's bundled handwritten digits (no network).

natjax train                                      # the same thing
natjax train --config experiments/configs/digits.py --set optim.epochs=10
"""

from __future__ import annotations

from natjax.train.config import TrainConfig
from natjax.train.defaults import digits_config


def get_config() -> TrainConfig:
    """See natjax/train/defaults.py."""
    return digits_config()
