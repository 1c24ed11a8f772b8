"""The training loop: data -> jitted step -> metrics, evaluation, checkpoints, resume, model.

`train` reads as its phases (see its docstring). Fault tolerance: rerunning the same command in
the same workdir resumes from the newest checkpoint that restores (params, optimizer state,
EMA, step, loader position); since every random choice is a function of (seed, step) the
resumed run reproduces the uninterrupted one step for step. Ctrl-C / SIGTERM save a checkpoint
at the current step and stop (`natjax.train.interrupt`); the CLI then exits with 130 / 143.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np

from natjax.train import data as data_lib
from natjax.train import deploy, init_from
from natjax.train import mesh as mesh_lib
from natjax.train.checkpoint import Checkpointer
from natjax.train.config import TrainConfig, to_dict
from natjax.train.interrupt import Interrupts
from natjax.train.metrics import MetricsWriter
from natjax.train.progress import Progress
from natjax.train.state import Trainer
from natjax.train.workdir import locked_workdir


@dataclasses.dataclass
class Run:
    """Everything one run works with, built by `_setup`."""

    cfg: TrainConfig
    workdir: Path
    trainer: Trainer
    loader: data_lib.BatchLoader
    eval_loader: data_lib.EvalLoader
    total: int
    ckpt: Checkpointer
    progress: Progress

    @property
    def use_ema(self) -> bool:
        return self.cfg.optim.ema_decay > 0

    def log(self, text: str) -> None:
        self.progress.message(text)


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) training as configured, in named phases:

    1. workdir: created and locked, checkpoint folder checked writable (fail fast);
    2. architecture: `run.init_from`'s model config, when set;
    3. setup: mesh, data, Trainer (parameters initialised on the mesh);
    4. resume or init: the newest intact checkpoint, else `run.init_from`'s weights;
    5. steps: compile (the first step), train, evaluate, checkpoint; a signal saves and stops;
    6. deploy: the trained model (config.json, model.safetensors, preprocessor_config.json);
    7. plot: curves.png from metrics.jsonl.

    Args:
      cfg: the run's config.

    Returns:
      A summary: {"step", "eval": the final evaluation, "workdir", "plot", "interrupted":
      the signal number that stopped the run or None}.
    """
    workdir = Path(cfg.run.workdir).absolute()
    is_main = jax.process_index() == 0
    progress = Progress(cfg.run.progress, is_main)
    with contextlib.ExitStack() as stack:
        stack.enter_context(locked_workdir(workdir, is_main))  # 1
        interrupts = stack.enter_context(Interrupts(progress.message))
        ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.run.keep_checkpoints)
        stack.callback(ckpt.close)  # waits for the last save; releases orbax's threads
        cfg = init_from.with_checkpoint_architecture(cfg, progress.message)  # 2
        run = _setup(cfg, workdir, ckpt, progress)  # 3
        start = _resume_or_init(run)  # 4
        if is_main:  # only now: an incompatible workdir keeps its previous run's config
            meta = _meta(cfg, 0, run.trainer.num_labels)
            (workdir / "train_config.json").write_text(json.dumps(meta, indent=1))
        writer = stack.enter_context(contextlib.closing(MetricsWriter(workdir, enabled=is_main)))
        step, last_eval = _steps(run, start, writer, interrupts)  # 5
        ckpt.wait()
        with interrupts.deferred():
            deployed = deploy.write_deployable(run.trainer, workdir, cfg.data, run.use_ema)  # 6
        progress.close()
    plot = _plot(workdir, is_main)  # 7
    if deployed is not None:
        progress.message(
            f"trained model in {workdir} (config.json, model.safetensors): "
            f"natjax predict --model {workdir} IMAGE"
        )
    return {
        "step": step,
        "eval": last_eval,
        "workdir": str(workdir),
        "plot": str(plot) if plot else None,
        "interrupted": interrupts.signum,
    }


# --------------------------------------------------------------------------------- 3. setup
def _setup(cfg: TrainConfig, workdir: Path, ckpt: Checkpointer, progress: Progress) -> Run:
    """Mesh, data sources and loaders, and the Trainer (parameters initialised on the mesh)."""
    pidx, pcount = jax.process_index(), jax.process_count()
    mesh = mesh_lib.make_mesh(cfg.mesh)
    train_src = data_lib.make_source(cfg.data, cfg.data.train_split)
    eval_src = data_lib.make_source(cfg.data, cfg.data.eval_split)
    num_labels = train_src.num_classes
    loader = data_lib.BatchLoader(train_src, cfg.data, cfg.augment, cfg.run.seed, pidx, pcount)
    eval_loader = data_lib.EvalLoader(eval_src, cfg.data, pidx, pcount)
    spe = loader.steps_per_epoch
    total = cfg.run.max_steps or max(1, int(round(cfg.optim.epochs * spe)))
    names = getattr(train_src, "classes", None)
    trainer = Trainer(cfg, mesh, num_labels, spe, class_names=tuple(names) if names else None)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state["params"]))
    progress.message(
        f"natjax train: {len(train_src)} train / {len(eval_src)} eval images, {num_labels} "
        f"classes, {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
        f"{total} steps ({spe}/epoch), workdir {workdir}"
    )
    return Run(
        cfg=cfg,
        workdir=workdir,
        trainer=trainer,
        loader=loader,
        eval_loader=eval_loader,
        total=total,
        ckpt=ckpt,
        progress=progress,
    )


# ------------------------------------------------------------------------ 4. resume or init
def _meta(cfg: TrainConfig, step: int, num_labels: int) -> dict:
    return {
        "step": step,
        "loader_step": step,
        "seed": cfg.run.seed,
        "num_labels": num_labels,
        "config": to_dict(cfg),
    }


def _resume_or_init(run: Run) -> int:
    """Restores the newest intact checkpoint into the trainer (else applies run.init_from).

    Returns:
      The step to continue from (0 for a fresh run).

    Raises:
      IncompatibleCheckpointError: the workdir holds another run's (intact) checkpoints.
    """
    trainer, ckpt, cfg = run.trainer, run.ckpt, run.cfg
    restored = ckpt.restore_latest(trainer.state) if ckpt.steps() else None
    if restored is None:
        if cfg.run.init_from:
            init_from.load_pretrained_params(trainer, cfg.run.init_from, run.log)
        return 0
    trainer.state, meta = restored
    start = int(meta["loader_step"])
    run.log(f"resumed from checkpoint step {start}")
    damaged = ckpt.delete_after(int(meta["step"]))
    if damaged:
        run.log(f"deleted unrestorable checkpoint step(s) {damaged}")
    return start


# --------------------------------------------------------------------------------- 5. steps
def _check_finite(run: Run) -> None:
    """Stops the run (ValueError) once a step produced a non-finite loss or gradient norm.

    The train step froze the state at that step, so nothing non-finite was saved.
    """
    bad = run.trainer.first_bad_step()
    if bad is None:
        return
    kept = run.ckpt.steps()
    raise ValueError(
        f"the loss or gradient norm became NaN/inf at step {bad + 1}; stopped without saving "
        f"it. The newest checkpoint ({f'step {kept[-1]}' if kept else 'none yet'}) holds finite "
        "weights. Lower optim.lr, set optim.grad_clip > 0 or use model.dtype=float32, then "
        "rerun to resume from it."
    )


def _evaluate(run: Run, step: int, writer: MetricsWriter) -> dict:
    result = run.trainer.evaluate(run.eval_loader, use_ema=run.use_ema)
    writer.write(step, "eval", result)
    top5 = f" top-5 {result['top5']:.4f}" if "top5" in result else ""
    run.log(
        f"eval @ step {step}: top-1 {result['top1']:.4f}{top5} loss {result['loss']:.4f} "
        f"({result['count']} images)"
    )
    return result


def _log_step(run: Run, done: int, metrics: Any, writer: MetricsWriter) -> None:
    _check_finite(run)
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    spe = run.loader.steps_per_epoch
    ips, eta = run.progress.rate(done, run.cfg.data.batch_size, run.total)
    record = {**m, "epoch": done / spe}
    if np.isfinite(ips):
        record["images_per_s"] = ips
    writer.write(done, "train", record)
    run.progress.update(done, run.total, done / spe, m, ips, eta)


def _steps(run: Run, start: int, writer: MetricsWriter, interrupts: Interrupts):
    """Steps `start`..total: train, log, evaluate, checkpoint; stops early on a signal.

    The first step compiles (shown as such; a signal then exits at once, nothing being new);
    from its end on, a signal is acted on after the current step: checkpoint, then return.

    Returns:
      `(last step done, the last evaluation)`.
    """
    cfg, trainer, total = run.cfg, run.trainer, run.total
    if start >= total:
        run.log(f"already trained to step {start} (of {total}); evaluating only.")
        return start, _evaluate(run, start, writer)
    eval_every = cfg.run.eval_every or run.loader.steps_per_epoch
    last_eval: dict = {}
    done = saved = start
    with contextlib.ExitStack() as deferred:
        try:
            batches = run.loader.iterate(start, total)
            for step in range(start, total):
                if step == start:
                    with run.progress.compiling("the train step"):
                        metrics = trainer.step(next(batches), step)
                        jax.block_until_ready(metrics)
                    run.progress.start(step + 1, total)
                    deferred.enter_context(interrupts.deferred())
                else:
                    metrics = trainer.step(next(batches), step)
                done = step + 1
                if done % cfg.run.log_every == 0 or done == total:
                    _log_step(run, done, metrics, writer)
                if done % eval_every == 0 or done == total:
                    last_eval = _evaluate(run, done, writer)
                if done % cfg.run.checkpoint_every == 0 or done == total or interrupts.signum:
                    _check_finite(run)
                    run.ckpt.save(done, trainer.state, _meta(cfg, done, trainer.num_labels))
                    saved = done
                if interrupts.signum is not None:
                    break
        except Exception:
            # A signal also reaches grain's worker processes, whose loss then surfaces here:
            # after a signal that is part of stopping, not an error.
            if interrupts.signum is None:
                raise
            if done != saved:
                _check_finite(run)
                run.ckpt.save(done, trainer.state, _meta(cfg, done, trainer.num_labels))
    if interrupts.signum is not None:
        name = signal.Signals(interrupts.signum).name
        run.log(f"{name}: checkpoint saved at step {done}; rerun the same command to resume.")
    return done, last_eval


# ---------------------------------------------------------------------------------- 7. plot
def _plot(workdir: Path, is_main: bool) -> Path | None:
    if not (is_main and (workdir / "metrics.jsonl").exists()):
        return None
    from natjax.train.plot import plot_metrics

    return plot_metrics(workdir / "metrics.jsonl", workdir / "curves.png")
