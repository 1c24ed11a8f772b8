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
    return TrainConfig(
        model=ModelConfig(preset="nat_mini", overrides=(("drop_path_rate", 0.1),)),
        data=DataConfig(
            dataset="oxford_flowers102",
            train_split="train",
            eval_split="validation",
            image_size=224,
            batch_size=128,
            eval_batch_size=256,
            num_workers=8,
        ),
        augment=AugmentConfig(
            rrc_scale=(0.08, 1.0), randaugment_m=9, mixup=0.0, cutmix=0.0, erase_prob=0.0
        ),
        optim=OptimConfig(
            lr=1e-4,
            base_batch_size=512,
            weight_decay=0.05,
            epochs=30,
            warmup_epochs=2,
            warmup_lr=1e-6,
            min_lr=1e-6,
            grad_clip=5.0,
        ),
        run=RunConfig(workdir="runs/finetune", log_every=20, checkpoint_every=500),
    )
