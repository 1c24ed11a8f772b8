"""`natjax eval`: top-1/top-5 of a training run's newest checkpoint or of a model folder.

A workdir with `train_config.json` is evaluated from its newest intact checkpoint with the
run's own settings; any other model folder (`config.json`, e.g. a converted checkpoint or a
training workdir copied without its checkpoints) through `natjax.from_pretrained` with the
model's eval transform. `format_table` renders the result for the terminal; `--json` prints
the dict instead.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import jax

from natjax.train import data as data_lib
from natjax.train import mesh as mesh_lib
from natjax.train.checkpoint import Checkpointer
from natjax.train.config import DataConfig, MeshConfig, TrainConfig, from_dict
from natjax.train.state import Trainer


def evaluate_run(workdir: str, dataset: str | None, split: str | None, data_dir: str | None):
    """Evaluates the newest checkpoint of a training run (or a model folder, see module doc).

    Args:
      workdir: the run folder (holds train_config.json and checkpoints/) or a model folder.
      dataset, split, data_dir: override the run's eval data (None: keep).

    Returns:
      {"top1", "top5" (more than 5 classes only), "loss", "count", "num_classes"}.
    """
    meta_path = Path(workdir) / "train_config.json"
    if not meta_path.is_file():
        if (Path(workdir) / "config.json").is_file():
            return evaluate_pretrained(workdir, dataset, split or "validation", data_dir)
        raise FileNotFoundError(
            f"--model {workdir!r}: neither a training run (train_config.json) nor a model "
            "folder (config.json)."
        )
    meta = json.loads(meta_path.read_text())
    cfg = from_dict(meta["config"])
    changes = {}
    if dataset:
        changes["dataset"] = dataset
    if split:
        changes["eval_split"] = split
    if data_dir:
        changes["data_dir"] = data_dir
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))
    src = data_lib.make_source(cfg.data, cfg.data.eval_split)
    num_labels = int(meta["num_labels"])
    _check_classes(cfg.data.dataset, src.num_classes, num_labels)
    try:
        mesh = mesh_lib.make_mesh(cfg.mesh)
    except ValueError:
        # Trained on another device count: checkpoints restore onto any mesh, so use them all.
        mesh = mesh_lib.make_mesh(MeshConfig())
    trainer = Trainer(cfg, mesh, num_labels, steps_per_epoch=1)
    ckpt = Checkpointer(Path(workdir) / "checkpoints", async_save=False)
    try:
        if not ckpt.steps():
            raise FileNotFoundError(f"--model {workdir!r}: no checkpoints.")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            restored = ckpt.restore_latest(trainer.state)
        if restored is None:
            raise ValueError(f"--model {workdir!r}: no checkpoint could be restored.")
        trainer.state = restored[0]
    finally:
        ckpt.close()
    loader = data_lib.EvalLoader(src, cfg.data, jax.process_index(), jax.process_count())
    out = trainer.evaluate(loader, use_ema=cfg.optim.ema_decay > 0)
    return _with_classes(out, num_labels)


def evaluate_pretrained(
    model_dir: str,
    dataset: str | None,
    split: str,
    data_dir: str | None,
    batch_size: int = 64,
) -> dict:
    """Evaluates a model folder (`natjax.from_pretrained`) with its own eval transform.

    Returns:
      As `evaluate_run`.
    """
    from natjax.convert.loading import from_pretrained
    from natjax.models.preprocessing import resolve

    if not dataset:
        raise ValueError("--dataset is required to evaluate a model folder without a run.")
    model = from_pretrained(model_dir)
    settings = resolve(model)
    if settings.size[0] != settings.size[1] or settings.resize != "shorter":
        raise ValueError(
            f"--model {model_dir!r}: its preprocessing ({settings}) is not a square "
            "resize-shorter-side + centre crop, which evaluation supports."
        )
    n = jax.device_count()
    batch_size = -(-batch_size // n) * n
    data_cfg = DataConfig(
        dataset=dataset,
        data_dir=data_dir,
        eval_split=split,
        image_size=settings.size[0],
        crop_pct=settings.crop_pct,
        mean=settings.mean,
        std=settings.std,
        eval_batch_size=batch_size,
    )
    src = data_lib.make_source(data_cfg, split)
    num_labels = model.config.num_labels
    _check_classes(dataset, src.num_classes, num_labels)
    cfg = TrainConfig(data=data_cfg)
    trainer = Trainer(cfg, mesh_lib.make_mesh(MeshConfig()), num_labels, 1, model=model)
    loader = data_lib.EvalLoader(src, data_cfg, jax.process_index(), jax.process_count())
    return _with_classes(trainer.evaluate(loader), num_labels)


def _check_classes(dataset: str, got: int, want: int) -> None:
    if got != want:
        raise ValueError(f"--dataset {dataset!r} has {got} classes; the model has {want}.")


def _with_classes(out: dict, num_classes: int) -> dict:
    # Trainer.evaluate reports top-5 only with more than 5 classes.
    return {**out, "num_classes": num_classes}


def format_table(result: dict, title: str) -> str:
    """The result as an aligned two-column table (accuracies in percent)."""
    rows = [("images", f"{result['count']}"), ("classes", f"{result['num_classes']}")]
    rows.append(("top-1", f"{100 * result['top1']:.2f} %"))
    if "top5" in result:
        rows.append(("top-5", f"{100 * result['top5']:.2f} %"))
    rows.append(("loss", f"{result['loss']:.4f}"))
    width = max(len(k) for k, _ in rows)
    values = max(len(v) for _, v in rows)
    lines = [title, "-" * max(len(title), width + values + 3)]
    lines += [f"{k.ljust(width)}   {v.rjust(values)}" for k, v in rows]
    return "\n".join(lines)
