"""Orbax checkpoints of the whole training state, restorable onto any mesh, verified on restore.

Each checkpoint step holds two items:
  * "state": {"params", "opt_state", "ema"} (sharded arrays, written asynchronously);
  * "meta": JSON with the step, the loader position (next batch index), the seed, the config,
    the state's layout (every leaf's path, shape and dtype), a checksum of every array and a
    digest over all of these.
Orbax writes to a temporary folder and renames it when complete, so a run killed mid-save
leaves no half checkpoint behind. On restore three outcomes are told apart:
  * intact and compatible: the arrays' checksums and the meta digest match; restored;
  * intact but INCOMPATIBLE (its layout differs from this run's state: another model, EMA or
    optimizer): `IncompatibleCheckpointError` stops the run; nothing is deleted;
  * damaged (files lost or truncated, a flipped bit, an edited loader position): a warning,
    and the previous checkpoint is tried.
Restoring uses the CURRENT run's shardings as the target, so a checkpoint written on 8 devices
restores onto 4 (or 1).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class IncompatibleCheckpointError(ValueError):
    """An intact checkpoint whose state layout differs from the current run's."""


class CheckpointWriteError(ValueError):
    """The checkpoint folder cannot be written (permissions, full disk, a file in the way)."""


def layout(state: Any) -> list[list[str]]:
    """Every leaf's `[path, shape, dtype]`, in pytree order (None subtrees have no leaves)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return [
        [jax.tree_util.keystr(path), "x".join(map(str, np.shape(x))), str(x.dtype)]
        for path, x in flat
    ]


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums of the array's bit patterns: plain and position-weighted.

    Integer sums wrap exactly (order-independent), so any sharding gives the same value; a
    single flipped bit changes the plain sum, a swap of two values the weighted one.
    """
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(state: Any) -> list[list[int]]:
    """Per-leaf `[sum, weighted sum]` of `state`'s arrays (computed on device, any sharding)."""
    return [[int(v) for v in c] for c in jax.tree.leaves(jax.device_get(_checksums_jit(state)))]


def _digest(meta: dict) -> str:
    body = {k: meta.get(k) for k in ("step", "loader_step", "layout", "checksums")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _layout_diff(saved: list, current: list, limit: int = 4) -> str:
    saved_d = {p: (s, d) for p, s, d in saved}
    current_d = {p: (s, d) for p, s, d in current}
    lines = []
    for p in sorted(set(saved_d) | set(current_d)):
        a, b = saved_d.get(p), current_d.get(p)
        if a != b:
            fmt = lambda v: "absent" if v is None else f"{v[0]} {v[1]}"  # noqa: E731
            lines.append(f"{p}: checkpoint {fmt(a)}, this run {fmt(b)}")
    more = f" (+{len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


class Checkpointer:
    """Thin wrapper around `ocp.CheckpointManager` (see the module docstring).

    Args:
      directory: the checkpoint folder (created if missing).
      keep: how many recent checkpoints to keep.
      async_save: write in a background thread (the train loop continues).

    Raises:
      CheckpointWriteError: `directory` (or a parent) is a file or cannot be written.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        _check_writable(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, step: int, state: dict, meta: dict, force: bool = True) -> bool:
        """Starts saving `state` and `meta` (plus layout, checksums, digest) as `step` (async).

        Raises:
          CheckpointWriteError: the write failed (e.g. the disk is full or the folder became
            unwritable); the run must stop rather than continue without checkpoints.
        """
        meta = {**meta, "layout": layout(state), "checksums": checksums(state)}
        meta["digest"] = _digest(meta)
        try:
            self.manager.check_for_errors()  # a failure of the previous async save
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointWriteError(
                f"cannot write checkpoint step {step} to {self.directory} "
                f"({type(err).__name__}: {str(err)[:300]})."
            ) from None

    def wait(self) -> None:
        """Blocks until pending saves are committed."""
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        """The JSON meta of checkpoint `step` (no arrays are read)."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore(self, step: int, target: dict) -> tuple[dict, dict]:
        """Restores checkpoint `step` into arrays shaped and sharded like `target`, verified.

        Raises:
          IncompatibleCheckpointError: the checkpoint is intact but its layout differs.
          ValueError / OSError: it is damaged (unreadable, checksum or digest mismatch).
        """
        meta = self.read_meta(step)
        saved_layout = meta.get("layout")
        if saved_layout is not None and meta.get("digest") != _digest(meta):
            raise ValueError("the meta digest does not match (step, loader position or sums)")
        if saved_layout is not None and saved_layout != layout(target):
            raise IncompatibleCheckpointError(_layout_diff(saved_layout, layout(target)))
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        state = out["state"]
        if int(meta.get("step", step)) != step:
            raise ValueError(f"its meta says step {meta.get('step')}")
        if "checksums" in meta:
            got = checksums(state)
            bad = [
                row[0]
                for row, want, have in zip(meta["layout"], meta["checksums"], got, strict=True)
                if want != have
            ]
            if bad:
                raise ValueError(f"array checksum mismatch in {bad[:3]}")
        return state, meta

    def restore_latest(self, target: dict) -> tuple[dict, dict] | None:
        """The newest intact checkpoint, or None if there is none.

        A damaged checkpoint is reported with a warning and skipped; an intact but incompatible
        one raises (its run may be continued with its own config; nothing is deleted).

        Raises:
          IncompatibleCheckpointError: naming the step, the folder and the differences.
        """
        for step in reversed(self.steps()):
            try:
                return self.restore(step, target)
            except IncompatibleCheckpointError as err:
                raise IncompatibleCheckpointError(
                    f"checkpoint step {step} in {self.directory} is intact but was written by "
                    f"a run with a different model/optimizer state ({err}). Nothing was "
                    "deleted. To continue that run, rerun with its config (its "
                    "train_config.json); to start a new one, use another --workdir."
                ) from None
            except Exception as err:  # noqa: BLE001 (any damage: missing/truncated/flipped)
                warnings.warn(
                    f"natjax train: checkpoint step {step} in {self.directory} is incomplete or "
                    f"corrupted ({type(err).__name__}: {str(err)[:200]}); trying an older one.",
                    stacklevel=2,
                )
        return None

    def delete_after(self, step: int) -> list[int]:
        """Deletes the checkpoints newer than `step` (those `restore_latest` found damaged).

        A resumed run saves those steps again, which orbax refuses while the damaged ones
        exist (`StepAlreadyExistsError`); every later resume would also retry them first.

        Returns:
          The deleted steps.
        """
        newer = [s for s in self.steps() if s > step]
        for s in newer:
            self.manager.delete(s)
        return newer

    def close(self) -> None:
        """Waits for pending saves and releases the manager (and its threads).

        Raises:
          CheckpointWriteError: the last asynchronous save failed.
        """
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointWriteError(
                f"cannot write checkpoints to {self.directory} "
                f"({type(err).__name__}: {str(err)[:300]})."
            ) from None
        finally:
            self.manager.close()


def _check_writable(directory: Path) -> None:
    """Fails fast (before any training) when checkpoints could not be written."""
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointWriteError(f"{parent} is a file, not a folder for checkpoints.")
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test_{np.random.default_rng().integers(1 << 62)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CheckpointWriteError(
            f"checkpoint folder {directory} is not writable ({err.strerror or err})."
        ) from None
