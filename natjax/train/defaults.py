"""The offline default run: a small NAT on scikit-learn's bundled handwritten digits.

`natjax train` with no arguments trains this: no network, a real dataset (1437 train / 360
validation 8x8 digits upsampled to 32x32), about two minutes on two CPU cores.
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


def digits_config(workdir: str = "runs/digits") -> TrainConfig:
    """Small NAT (embed 32, depths 1-1-2-1, kernel 3, 15 epochs) for the digits default.

    Args:
      workdir: output folder.

    Returns:
      The TrainConfig.
    """
    return TrainConfig(
        model=ModelConfig(
            preset="nat_mini",
            overrides=(
                ("embed_dim", 32),
                ("depths", (1, 1, 2, 1)),
                ("num_heads", (1, 2, 4, 8)),
                ("kernel_size", 3),
                ("mlp_ratio", 2.0),
                ("drop_path_rate", 0.0),
            ),
            dtype="float32",
        ),
        data=DataConfig(
            dataset="digits",
            image_size=32,
            digits_size=32,
            batch_size=64,
            eval_batch_size=120,
            crop_pct=1.0,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        # Digits are not flip-invariant; a mild crop jitter is enough at this size.
        augment=AugmentConfig(
            rrc_scale=(0.7, 1.0), rrc_ratio=(0.85, 1.15), hflip=0.0, label_smoothing=0.1
        ),
        optim=OptimConfig(
            lr=2e-3,
            base_batch_size=64,
            weight_decay=0.05,
            epochs=15,
            warmup_epochs=1,
            warmup_lr=1e-5,
            min_lr=1e-5,
            grad_clip=5.0,
        ),
        run=RunConfig(workdir=workdir, log_every=10, checkpoint_every=100, keep_checkpoints=2),
    )
