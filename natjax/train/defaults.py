"""What a run uses when the command line names no experiment file.

`digits_config` is the offline default run: a small NAT on scikit-learn's bundled handwritten
digits (no network, a real dataset: 1437 train / 360 validation 8x8 digits upsampled to 32x32,
about two minutes on two CPU cores). `load_config` returns it for `--config` unset, else loads
the experiment file's `get_config()`.

It sits above `natjax.train.config` (the schema) and is the only one of the two that knows the
other, so the schema never imports a particular run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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

    Fields left out keep the dataclass defaults (the optimiser's are the NAT ImageNet recipe:
    AdamW, weight decay 0.05, grad clip 5.0).

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
            batch_size=64,
            eval_batch_size=120,
            crop_pct=1.0,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        # Digits are not flip-invariant; a mild crop jitter is enough at this size.
        augment=AugmentConfig(rrc_scale=(0.7, 1.0), rrc_ratio=(0.85, 1.15), hflip=0.0),
        # A short run: a higher peak at a small batch, one warm-up epoch, a higher floor.
        optim=OptimConfig(
            lr=2e-3, base_batch_size=64, epochs=15, warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5
        ),
        run=RunConfig(workdir=workdir, log_every=10, checkpoint_every=100, keep_checkpoints=2),
    )


def load_config(path: str | Path | None) -> TrainConfig:
    """Loads `get_config()` from an experiment file (None: the offline digits default).

    Args:
      path: a Python file defining `get_config() -> TrainConfig`, or None.

    Returns:
      The config.

    Raises:
      FileNotFoundError: `path` is missing or a directory.
      ValueError: the file defines no `get_config()`, it returns something else, or a field is
        out of range (the message names the file and the field).
    """
    if path is None:
        return digits_config()
    path = Path(path)
    if not path.is_file():
        what = "a directory, not an experiment file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"--config {str(path)!r}: {what}.")
    spec = importlib.util.spec_from_file_location(f"natjax_exp_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError("defines no get_config()")
        cfg = module.get_config()
    except ValueError as err:
        # e.g. a TrainConfig field out of range: name the file as well as the field.
        raise ValueError(f"--config {str(path)!r}: {err}") from None
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"--config {str(path)!r}: get_config() returned {type(cfg).__name__}.")
    return cfg
