"""Fine-tune a pretrained NAT/DiNAT on a new label set (natjax/train/recipes/finetune.py).

  natjax train --config finetune --init-from shi-labs/nat-mini-in1k-224 \
      --set data.dataset=folder:/data/pets --workdir runs/pets

The architecture comes from the --init-from checkpoint; only a resized head is freshly
initialised. Defaults for small folder datasets: batch 32, AdamW 2e-4, 20 epochs.
"""

from __future__ import annotations

from natjax.train.config import TrainConfig
from natjax.train.recipes.finetune import finetune_config


def get_config() -> TrainConfig:
    """The packaged finetune recipe."""
    return finetune_config()
