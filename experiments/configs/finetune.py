"""Fine-tune a converted NAT/DiNAT checkpoint on a new label set (fresh classifier head).

  natjax convert ...                          # -> converted/nat_mini (natjax.from_pretrained)
  natjax train --config experiments/configs/finetune.py \
      --init-from converted/nat_mini --set data.dataset=oxford_flowers102 \
      --set data.data_dir=/data/tfds --set data.eval_split=validation

The architecture must match the checkpoint (model.preset); tensors whose shape differs (the head
for a new num_labels) keep their fresh initialisation. Recipe: AdamW 1e-4 at batch 512,
weight decay 0.05, 30 epochs with 2 warm-up epochs, light augmentation, drop-path 0.1.
"""

from __future__ import annotations

from natjax.train.config import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)


def get_config() -> TrainConfig:
    """Fine-tuning defaults; set run.init_from (or --init-from) and data.dataset."""
    # Only what differs from the dataclass defaults (the ImageNet recipe) is spelled out.
    return TrainConfig(
        model=ModelConfig(preset="nat_mini", overrides=(("drop_path_rate", 0.1),)),
        data=DataConfig(dataset="oxford_flowers102", num_workers=8),
        augment=AugmentConfig(randaugment_m=9),
        optim=OptimConfig(lr=1e-4, base_batch_size=512, epochs=30, warmup_epochs=2, min_lr=1e-6),
        run=RunConfig(workdir="runs/finetune", log_every=20, checkpoint_every=500),
    )
