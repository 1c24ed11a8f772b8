"""`run.init_from` (`--init-from DIR`): start a run from a converted or trained checkpoint.

Two steps, in the order the loop needs them:
  1. `with_checkpoint_architecture`: the run's model is the checkpoint's architecture (every
     `NatConfig` field of its config.json), with the run's own `model.overrides` applied on top;
     the label count always comes from the dataset.
  2. `load_pretrained_params`: every tensor of the checkpoint is copied into the freshly built
     run; only a classifier head whose size changed keeps its fresh initialisation. Anything
     else that does not fit is one short error listing the first few mismatches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from natjax.train.config import TrainConfig, validate

# NatConfig fields that describe the head or are derived, never taken from the checkpoint.
_RUN_OWNED = ("num_labels", "id2label", "out_features", "out_indices")
# At most this many mismatched tensors are named in the error (the rest are counted).
_LISTED = 5


def checkpoint_config(source: str):
    """The `NatConfig` of checkpoint `source` (a folder, a weights file beside its config.json,
    or a hub id), read without loading its weights.

    Raises:
      ValueError: naming `run.init_from` when the checkpoint or its config cannot be read.
    """
    from natjax.convert.checkpoint import CONFIG_NAME, resolve_config
    from natjax.convert.loading import locate

    try:
        path = locate(source)
        folder = path if path.is_dir() else path.parent
        return resolve_config(folder / CONFIG_NAME)[0]
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"run.init_from={source!r}: {err}") from None


def with_checkpoint_architecture(cfg: TrainConfig, log: Callable[[str], None]) -> TrainConfig:
    """`cfg` whose model is `run.init_from`'s architecture plus the run's `model.overrides`.

    The overrides become the checkpoint's fields followed by the run's own, so the stored
    `train_config.json` describes the model completely. No-op without `run.init_from`.
    """
    source = cfg.run.init_from
    if not source:
        return cfg
    config = checkpoint_config(source)
    own = dict(cfg.model.overrides)
    fields = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _RUN_OWNED and f.name not in own
    }
    overrides = tuple(fields.items()) + tuple(own.items())
    model = dataclasses.replace(cfg.model, overrides=overrides)
    new = dataclasses.replace(cfg, model=model)
    validate(new)
    if own:
        log(f"init-from {source}: its architecture, with model.overrides {sorted(own)}")
    else:
        log(f"init-from {source}: its architecture ({config.describe()})")
    return new


def load_pretrained_params(trainer, directory: str, log: Callable[[str], None]) -> None:
    """Copies the parameters of checkpoint `directory` (`natjax.from_pretrained`) into `trainer`.

    Every tensor must match by path and shape except the classifier head (a new label set keeps
    its fresh initialisation). The EMA, when on, starts from the copied parameters.

    Raises:
      ValueError: listing the first mismatched tensors when anything but the head differs.
    """
    from natjax.convert.loading import from_pretrained

    model = from_pretrained(directory)
    source = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_src = dict(jax.tree_util.tree_flatten_with_path(source)[0])
    copied, fresh = 0, []

    def one(path, leaf, sharding):
        nonlocal copied
        src = flat_src.pop(path, None)
        if src is None or tuple(np.shape(src)) != tuple(leaf.shape):
            got = "absent" if src is None else f"shape {tuple(np.shape(src))}"
            fresh.append((jax.tree_util.keystr(path), tuple(leaf.shape), got))
            return leaf
        copied += 1
        host = np.asarray(src, np.float32)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda idx: host[idx])

    params = trainer.state["params"]
    new_params = jax.tree_util.tree_map_with_path(one, params, trainer.shardings["params"])
    trunk = [f for f in fresh if not f[0].startswith("['classifier']")]
    unused = [jax.tree_util.keystr(p) for p in flat_src if "classifier" not in str(p[0])]
    if trunk or unused:
        raise ValueError(_mismatch_message(directory, trunk, unused))
    trainer.state["params"] = new_params
    if trainer.state["ema"] is not None:
        trainer.state["ema"] = jax.tree.map(lambda x: x.copy(), trainer.state["params"])
    head = "fresh classifier head" if fresh else "classifier copied"
    log(f"init-from {Path(directory)}: copied {copied} tensors; {head}")


def _mismatch_message(directory: str, trunk: list, unused: list) -> str:
    """One line: the counts, the first `_LISTED` mismatches, and what to do."""
    lines = [f"{name}: run {shape}, checkpoint {got}" for name, shape, got in trunk[:_LISTED]]
    lines += [f"{name}: only in the checkpoint" for name in unused[: max(0, _LISTED - len(lines))]]
    more = len(trunk) + len(unused) - len(lines)
    return (
        f"run.init_from={directory!r}: the architecture differs from this run's model "
        f"({len(trunk)} tensors of the run missing or reshaped, {len(unused)} checkpoint "
        "tensors unused): "
        + "; ".join(lines)
        + (f"; +{more} more" if more > 0 else "")
        + ". Drop the model.overrides that change the architecture (the run takes it from the "
        "checkpoint's config.json)."
    )
