"""The training loop: data -> jitted step -> metrics, evaluation, checkpoints, resume, plot.

Fault tolerance: rerunning the same command in the same workdir resumes from the newest
checkpoint that restores (params, optimizer state, EMA, step, loader position); since every
random choice is a function of (seed, step) the resumed run reproduces the uninterrupted one step
for step. SIGTERM (and Ctrl-C) saves a checkpoint at the current step and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from natjax.train import data as data_lib
from natjax.train import mesh as mesh_lib
from natjax.train.checkpoint import Checkpointer
from natjax.train.config import DataConfig, MeshConfig, TrainConfig, from_dict, to_dict
from natjax.train.metrics import MetricsWriter
from natjax.train.state import Trainer


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """One status line (rewritten in place on a terminal, appended otherwise) plus messages.

    Args:
      enabled: show the status line (messages are shown regardless).
      is_main: only process 0 prints anything.
    """

    def __init__(self, enabled: bool, is_main: bool = True) -> None:
        self.enabled, self.is_main = enabled and is_main, is_main
        self.tty = sys.stderr.isatty()

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + text.ljust(110)[:160])
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.tty and self.enabled:
            sys.stderr.write("\r" + " " * 110 + "\r")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def load_pretrained_params(trainer: Trainer, directory: str, log) -> None:
    """Copies parameters from a converted checkpoint (natjax.from_pretrained) into the trainer.

    Every tensor must match by path and shape except the classifier head (a new label set
    keeps its fresh initialisation).

    Raises:
      ValueError: listing the mismatched tensors when anything but the head differs.
    """
    import natjax

    model = natjax.from_pretrained(directory)
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
        lines = [f"{name}: run {shape}, checkpoint {got}" for name, shape, got in trunk[:5]]
        lines += [f"{name}: only in the checkpoint" for name in unused[: max(0, 5 - len(lines))]]
        more = len(trunk) + len(unused) - len(lines)
        raise ValueError(
            f"run.init_from={directory!r}: the architecture differs from this run's model "
            f"({len(trunk)} tensors of the run missing or reshaped, {len(unused)} checkpoint "
            f"tensors unused): "
            + "; ".join(lines)
            + (f"; +{more} more" if more > 0 else "")
            + ". Set model.preset / model.overrides to the checkpoint's architecture."
        )
    trainer.state["params"] = new_params
    if trainer.state["ema"] is not None:
        trainer.state["ema"] = jax.tree.map(lambda x: x.copy(), trainer.state["params"])
    head = "fresh classifier head" if fresh else "classifier copied"
    log(f"init-from {directory}: copied {copied} tensors; {head}")


def _meta(cfg: TrainConfig, step: int, num_labels: int) -> dict:
    return {
        "step": step,
        "loader_step": step,
        "seed": cfg.run.seed,
        "num_labels": num_labels,
        "config": to_dict(cfg),
    }


def _resume_or_init(trainer: Trainer, ckpt: Checkpointer, cfg: TrainConfig, log) -> int:
    """Restores the newest intact checkpoint into `trainer` (else applies run.init_from).

    Returns:
      The step to continue from (0 for a fresh run).

    Raises:
      IncompatibleCheckpointError: the workdir holds another run's (intact) checkpoints.
    """
    restored = ckpt.restore_latest(trainer.state) if ckpt.steps() else None
    if restored is None:
        if cfg.run.init_from:
            load_pretrained_params(trainer, cfg.run.init_from, log)
        return 0
    trainer.state, meta = restored
    start = int(meta["loader_step"])
    log(f"resumed from checkpoint step {start}")
    damaged = ckpt.delete_after(int(meta["step"]))
    if damaged:
        log(f"deleted unrestorable checkpoint step(s) {damaged}")
    return start


def _prepare_workdir(workdir: Path) -> None:
    """Creates the run folder, with a one-line error when that is impossible."""
    for parent in (workdir, *workdir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"run.workdir={str(workdir)!r}: {parent} is a file, not a folder.")
            break
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"run.workdir={str(workdir)!r}: cannot create it ({err.strerror or err})."
        ) from None


class _WorkdirLock:
    """An exclusive `flock` on WORKDIR/.lock for the run's lifetime (released at exit, even on
    SIGKILL, by the kernel), so a second run in the same workdir stops instead of interleaving
    metrics and checkpoints with the first."""

    def __init__(self, workdir: Path) -> None:
        import fcntl

        self.path = workdir / ".lock"
        self._file = open(self.path, "a+")  # noqa: SIM115 (closed in release())
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            owner = self._file.read().strip() or "unknown"
            self._file.close()
            raise ValueError(
                f"run.workdir={str(workdir)!r} is in use by another natjax train (pid {owner}); "
                "wait for it to finish or use another --workdir."
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        self._file.close()


def _check_finite(trainer: Trainer, ckpt: Checkpointer) -> None:
    """Stops the run (ValueError) once a step produced a non-finite loss or gradient norm.

    The train step froze the state at that step, so nothing non-finite was saved.
    """
    bad = trainer.first_bad_step()
    if bad is None:
        return
    kept = ckpt.steps()
    raise ValueError(
        f"the loss or gradient norm became NaN/inf at step {bad + 1}; stopped without saving "
        f"it. The newest checkpoint ({f'step {kept[-1]}' if kept else 'none yet'}) holds finite "
        "weights. Lower optim.lr, set optim.grad_clip > 0 or use model.dtype=float32, then "
        "rerun to resume from it."
    )


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) training as configured.

    Args:
      cfg: the run's config.

    Returns:
      A summary: {"step", "eval": last eval metrics, "workdir", "plot", "interrupted"}.
    """
    workdir = Path(cfg.run.workdir).absolute()
    lock = None
    if jax.process_index() == 0:  # first, before any data or model work: fail fast
        _prepare_workdir(workdir)
        lock = _WorkdirLock(workdir)
    try:
        return _run(cfg, workdir)
    finally:
        if lock is not None:
            lock.release()


def _setup(cfg: TrainConfig, workdir: Path, log):
    """Mesh, data sources and loaders, and the Trainer (parameters initialised on the mesh).

    Returns:
      `(trainer, loader, eval_loader, total_steps)`.
    """
    pidx, pcount = jax.process_index(), jax.process_count()
    mesh = mesh_lib.make_mesh(cfg.mesh)
    train_src = data_lib.make_source(cfg.data, cfg.data.train_split)
    eval_src = data_lib.make_source(cfg.data, cfg.data.eval_split)
    num_labels = train_src.num_classes
    loader = data_lib.BatchLoader(train_src, cfg.data, cfg.augment, cfg.run.seed, pidx, pcount)
    eval_loader = data_lib.EvalLoader(eval_src, cfg.data, pidx, pcount)
    spe = loader.steps_per_epoch
    total = cfg.run.max_steps or max(1, int(round(cfg.optim.epochs * spe)))
    trainer = Trainer(cfg, mesh, num_labels, spe)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state["params"]))
    log(
        f"natjax train: {len(train_src)} train / {len(eval_src)} eval images, {num_labels} "
        f"classes, {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
        f"{total} steps ({spe}/epoch), workdir {workdir}"
    )
    return trainer, loader, eval_loader, total


def _run(cfg: TrainConfig, workdir: Path) -> dict:
    """Set-up, resume (or init), the step loop, evaluation, checkpoints, plot (see `train`)."""
    is_main = jax.process_index() == 0
    progress = _Progress(cfg.run.progress, is_main)
    log = progress.message
    trainer, loader, eval_loader, total = _setup(cfg, workdir, log)
    num_labels, spe = trainer.num_labels, loader.steps_per_epoch
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.run.keep_checkpoints)
    try:
        start = _resume_or_init(trainer, ckpt, cfg, log)
    except BaseException:
        ckpt.close()  # e.g. a bad run.init_from: release orbax's threads before raising
        raise
    if is_main:  # only now: an incompatible workdir keeps its previous run's config
        (workdir / "train_config.json").write_text(json.dumps(_meta(cfg, 0, num_labels), indent=1))

    writer = MetricsWriter(workdir, enabled=is_main)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    # Python only lets the main thread install signal handlers; elsewhere (a training run started
    # from a worker thread) SIGTERM keeps its default behaviour.
    old_handlers = (
        {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    eval_every = cfg.run.eval_every or spe
    last_eval: dict = {}
    step = start
    t_last, n_last = time.perf_counter(), start
    t_start = t_last
    try:
        if start >= total:
            log(f"already trained to step {start} (of {total}); evaluating only.")
            last_eval = trainer.evaluate(eval_loader, use_ema=cfg.optim.ema_decay > 0)
            top1, top5 = last_eval["top1"], last_eval["top5"]
            log(f"eval @ step {start}: top-1 {top1:.4f} top-5 {top5:.4f}")
        batches = loader.iterate(start, max(start, total))
        for step in range(start, total):
            metrics = trainer.step(next(batches), step)
            done = step + 1
            if done % cfg.run.log_every == 0 or done == total:
                _check_finite(trainer, ckpt)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                ips = (done - n_last) * cfg.data.batch_size / max(now - t_last, 1e-9)
                eta = (total - done) * (now - t_start) / max(done - start, 1)
                t_last, n_last = now, done
                writer.write(done, "train", {**m, "images_per_s": ips, "epoch": done / spe})
                progress.update(
                    f"step {done}/{total} [{100 * done / total:3.0f}%] ep {done / spe:.1f} | "
                    f"{ips:6.0f} img/s | loss {m['loss']:.4f} | acc {m['accuracy']:.3f} | "
                    f"lr {m['lr']:.2e} | ETA {_fmt_time(eta)}"
                )
            if done % eval_every == 0 or done == total:
                last_eval = trainer.evaluate(eval_loader, use_ema=cfg.optim.ema_decay > 0)
                writer.write(done, "eval", last_eval)
                log(
                    f"eval @ step {done}: top-1 {last_eval['top1']:.4f} top-5 "
                    f"{last_eval['top5']:.4f} loss {last_eval['loss']:.4f} "
                    f"({last_eval['count']} images)"
                )
            if done % cfg.run.checkpoint_every == 0 or done == total or stop["signal"]:
                _check_finite(trainer, ckpt)
                ckpt.save(done, trainer.state, _meta(cfg, done, num_labels))
            if stop["signal"] is not None:
                log(f"signal {stop['signal']}: checkpoint saved at step {done}; exiting.")
                break
    finally:
        ckpt.close()
        writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    plot_path = None
    if is_main and (workdir / "metrics.jsonl").exists():
        from natjax.train.plot import plot_metrics

        plot_path = plot_metrics(workdir / "metrics.jsonl", workdir / "curves.png")
        log(
            f"wrote {workdir / 'metrics.jsonl'}, {plot_path}, "
            f"TensorBoard events in {workdir / 'tb'}"
        )
    return {
        "step": step + 1 if total > start else start,
        "eval": last_eval,
        "workdir": str(workdir),
        "plot": str(plot_path) if plot_path else None,
        "interrupted": stop["signal"] is not None,
    }


def evaluate_run(workdir: str, dataset: str | None, split: str | None, data_dir: str | None):
    """Evaluates the newest checkpoint of a training run.

    Args:
      workdir: the run folder (holds train_config.json and checkpoints/).
      dataset, split, data_dir: override the run's eval data (None: keep).

    Returns:
      {"top1", "top5", "loss", "count"}.
    """
    meta_path = Path(workdir) / "train_config.json"
    if not meta_path.is_file():
        if (Path(workdir) / "config.json").is_file():
            return evaluate_pretrained(workdir, dataset, split or "validation", data_dir)
        raise FileNotFoundError(
            f"--model {workdir!r}: neither a training run (train_config.json) nor a converted "
            "checkpoint (config.json)."
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
    if src.num_classes != num_labels:
        raise ValueError(
            f"--dataset {cfg.data.dataset!r} has {src.num_classes} classes; "
            f"the model has {num_labels}."
        )
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
    return trainer.evaluate(loader, use_ema=cfg.optim.ema_decay > 0)


def evaluate_pretrained(
    model_dir: str,
    dataset: str | None,
    split: str,
    data_dir: str | None,
    image_size: int = 224,
    crop_pct: float = 0.875,
    batch_size: int = 64,
) -> dict:
    """Evaluates a converted checkpoint (natjax.from_pretrained) with the ImageNet eval transform.

    Returns:
      {"top1", "top5", "loss", "count"}.
    """
    import natjax

    if not dataset:
        raise ValueError("--dataset is required to evaluate a converted checkpoint.")
    model = natjax.from_pretrained(model_dir)
    n = jax.device_count()
    batch_size = -(-batch_size // n) * n
    data_cfg = DataConfig(
        dataset=dataset,
        data_dir=data_dir,
        eval_split=split,
        image_size=image_size,
        crop_pct=crop_pct,
        eval_batch_size=batch_size,
    )
    src = data_lib.make_source(data_cfg, split)
    num_labels = model.config.num_labels
    if src.num_classes != num_labels:
        raise ValueError(
            f"--dataset {dataset!r} has {src.num_classes} classes; the model has {num_labels}."
        )
    cfg = TrainConfig(data=data_cfg)
    trainer = Trainer(cfg, mesh_lib.make_mesh(MeshConfig()), num_labels, 1, model=model)
    loader = data_lib.EvalLoader(src, data_cfg, jax.process_index(), jax.process_count())
    return trainer.evaluate(loader)
