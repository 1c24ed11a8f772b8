"""Training and evaluation of NAT/DiNAT: `natjax train`, `natjax eval` and the offline default.

Modules: config (TrainConfig + overrides), data (sources, deterministic loader), augment, mesh
(sharding rules), state (jitted steps), checkpoint (orbax), metrics (JSONL + TensorBoard), plot,
progress, interrupt (signals), init_from, deploy (the model left in the workdir), workdir,
loop (train), evaluate, cli. Import the submodules directly; this package imports nothing heavy.

Training needs the `train` extra (`pip install 'natjax[train]'`): optax, orbax, grain,
tensorflow-datasets, scikit-learn, matplotlib, tqdm. `pip install natjax` alone gives the op,
the models and checkpoint conversion.
"""

from __future__ import annotations

import importlib.util

# Import names of the `train` extra's packages (see pyproject.toml).
TRAINING_MODULES = (
    "optax",
    "orbax.checkpoint",
    "grain",
    "tensorflow_datasets",
    "sklearn",
    "matplotlib",
    "tqdm",
    "tensorboardX",
)


def missing_training_modules() -> list[str]:
    """The `TRAINING_MODULES` that cannot be imported here."""
    missing = []
    for name in TRAINING_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a missing parent package; a module set to None
            found = False
        if not found:
            missing.append(name)
    return missing


def require_training_extra() -> None:
    """Raises a one-line error naming the extra when a training package is missing.

    Raises:
      ValueError: listing the missing packages and the install command.
    """
    missing = missing_training_modules()
    if missing:
        raise ValueError(
            f"training needs the 'train' extra, missing here: {', '.join(missing)}. Install it "
            "with: pip install 'natjax[train]'"
        )
