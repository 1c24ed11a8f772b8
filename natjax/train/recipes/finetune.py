"""Fine-tuning a pretrained NAT/DiNAT on a new label set (fresh classifier head).

  natjax train --config finetune --init-from shi-labs/nat-mini-in1k-224 \
      --set data.dataset=folder:/data/pets --workdir runs/pets

The architecture comes from the `--init-from` checkpoint; tensors other than a resized head
must match it. Defaults meant to work as they are on a small folder dataset (a few hundred
images): global batch 32, at most 4 loader workers and never more than the machine's cores,
AdamW 2e-4 (at batch 32; scaled linearly with data.batch_size) with 1 warm-up epoch and a
cosine over 20 epochs, light augmentation, drop-path 0.1, evaluation and a checkpoint every
epoch-ish (every 50 steps).
"""

from __future__ import annotations

import os

from natjax.train.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)

BATCH_SIZE = 32


def finetune_config() -> TrainConfig:
    """The fine-tuning defaults; set run.init_from (--init-from) and data.dataset."""
    # Only what differs from the dataclass defaults (the ImageNet recipe) is spelled out.
    return TrainConfig(
        model=ModelConfig(preset="nat_mini", overrides=(("drop_path_rate", 0.1),)),
        data=DataConfig(
            dataset="oxford_flowers102",
            batch_size=BATCH_SIZE,
            eval_batch_size=64,
            # Worker processes pay off from a few cores up; never more than the cores.
            num_workers=min(4, max(0, (os.cpu_count() or 1) - 1)),
        ),
        augment=AugmentConfig(randaugment_m=9),
        optim=OptimConfig(
            lr=2e-4, base_batch_size=BATCH_SIZE, epochs=20, warmup_epochs=1, min_lr=1e-6
        ),
        run=RunConfig(workdir="runs/finetune", log_every=10, eval_every=50, checkpoint_every=50),
    )
