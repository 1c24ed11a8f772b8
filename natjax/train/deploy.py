"""The deployable model a training run leaves in its workdir.

Next to its checkpoints, every run writes the trained classifier in the Hugging Face layout,
so the workdir itself is a model folder:
  * `config.json` (Hugging Face NAT/DiNAT config, with the dataset's class names),
  * `model.safetensors` (the EMA weights when `optim.ema_decay > 0`, else the weights),
  * `preprocessor_config.json` (the run's eval transform: size, crop_pct, mean, std).
`natjax.from_pretrained(WORKDIR)`, `natjax predict --model WORKDIR`, `natjax export WORKDIR`
and `transformers` read it; `natjax eval --model WORKDIR` still evaluates the newest checkpoint.
The files are written to a temporary folder and moved into place, so an interrupted write never
leaves a half model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
from flax import nnx

from natjax.models.preprocessing import PreprocessConfig
from natjax.train.config import DataConfig


def preprocessing(data: DataConfig) -> PreprocessConfig:
    """The run's eval transform (what `augment.eval_transform` plus normalisation apply)."""
    return PreprocessConfig(
        size=(data.image_size, data.image_size),
        crop_pct=data.crop_pct,
        mean=data.mean,
        std=data.std,
    )


def _on_host(tree):
    """Numpy copies of (possibly sharded, possibly multi-process) global arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def trained_model(trainer, use_ema: bool) -> nnx.Module:
    """The trainer's classifier as an nnx model holding host copies of its weights.

    Args:
      trainer: a `natjax.train.state.Trainer` (its model config carries the class names).
      use_ema: take the EMA weights (when the run keeps them).
    """
    ema = trainer.state["ema"]
    params = _on_host(ema if use_ema and ema is not None else trainer.state["params"])
    return nnx.merge(trainer.graphdef, params, _on_host(trainer.rest))


def write_deployable(
    trainer, workdir: str | os.PathLike, data: DataConfig, use_ema: bool
) -> Path | None:
    """Writes config.json, model.safetensors and preprocessor_config.json into `workdir`.

    Every process must call it (multi-host runs gather the shards); only process 0 writes.

    Returns:
      The workdir on process 0, None elsewhere.
    """
    from natjax.convert.checkpoint import export_pretrained

    model = trained_model(trainer, use_ema)
    if jax.process_index() != 0:
        return None
    model.preprocessing = preprocessing(data)
    workdir = Path(workdir)
    tmp = Path(tempfile.mkdtemp(prefix=".deploy_", dir=workdir))
    try:
        export_pretrained(model, tmp, format="hf")
        for f in sorted(tmp.iterdir()):
            os.replace(f, workdir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return workdir
