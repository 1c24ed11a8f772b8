"""The NAT/DiNAT ImageNet-1k recipe (NAT arXiv 2204.07143 sec. 4.1 + appendix, following
Swin/DeiT): AdamW lr 1e-3 at global batch 1024 (scaled linearly), weight decay 0.05 (none on
biases, norms, relative position biases), 300 epochs, 20 warm-up epochs from 1e-6, cosine to
5e-6, grad clip 5.0, label smoothing 0.1, RandAugment m9 mstd0.5, mixup 0.8, cutmix 1.0,
random erasing 0.25, crop_pct 0.875, bf16 compute with f32 weights.

One recipe per variant: `natjax train --config nat_tiny_in1k --set data.data_dir=/data/tfds`.
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

# Per-variant stochastic depth (NAT table 2 / released configs).
DROP_PATH = {"mini": 0.2, "tiny": 0.2, "small": 0.3, "base": 0.5}


def in1k_config(preset: str, drop_path: float, batch_size: int = 1024) -> TrainConfig:
    """The paper recipe for `preset` ("nat_mini", "dinat_tiny", ...).

    Args:
      preset: a natjax.models preset name.
      drop_path: stochastic-depth rate of the last layer.
      batch_size: global batch (lr scales linearly from 1e-3 at 1024).

    Returns:
      The TrainConfig.
    """
    # Only what differs from the dataclass defaults is spelled out: OptimConfig's defaults are
    # this recipe, ModelConfig's are bf16 compute with f32 weights, DataConfig's crop_pct 0.875
    # at 224 (tests/test_train.py `test_recipe_matches_paper` checks the result).
    return TrainConfig(
        model=ModelConfig(preset=preset, overrides=(("drop_path_rate", drop_path),)),
        data=DataConfig(
            dataset="imagenet2012", batch_size=batch_size, eval_batch_size=1024, num_workers=16
        ),
        augment=AugmentConfig(randaugment_m=9, mixup=0.8, cutmix=1.0, erase_prob=0.25),
        optim=OptimConfig(),
        run=RunConfig(
            workdir=f"runs/{preset}_in1k", log_every=50, eval_every=0, checkpoint_every=2000
        ),
    )
