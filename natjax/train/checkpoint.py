"""Orbax checkpoints of the whole training state, restorable onto any mesh.

Each checkpoint step holds two items:
  * "state": {"params", "opt_state", "ema"} (sharded arrays, written asynchronously);
  * "meta": JSON with the step, the loader position (next batch index), the seed and the config.
Orbax writes to a temporary folder and renames it when complete, so a run killed mid-save
leaves no half checkpoint behind. A checkpoint that is nevertheless damaged (files lost or
truncated) fails to restore; `restore_latest` then warns and falls back to the previous one.
Restoring uses the CURRENT run's shardings as the target, so a checkpoint written on 8 devices
restores onto 4 (or 1).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper around `ocp.CheckpointManager`.

    Args:
      directory: the checkpoint folder (created if missing).
      keep: how many recent checkpoints to keep.
      async_save: write in a background thread (the train loop continues).
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, step: int, state: dict, meta: dict, force: bool = True) -> bool:
        """Starts saving `state` and `meta` as checkpoint `step` (async)."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def wait(self) -> None:
        """Blocks until pending saves are committed."""
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def restore(self, step: int, target: dict) -> tuple[dict, dict]:
        """Restores checkpoint `step` into arrays shaped and sharded like `target`."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["meta"]

    def restore_latest(self, target: dict) -> tuple[dict, dict] | None:
        """The newest checkpoint that restores, or None if there is none.

        A checkpoint that fails to restore is reported with a warning and skipped.
        """
        for step in reversed(self.steps()):
            try:
                return self.restore(step, target)
            except Exception as err:  # noqa: BLE001 (any damage: missing/truncated files)
                warnings.warn(
                    f"natjax train: checkpoint step {step} in {self.directory} is incomplete or "
                    f"corrupted ({type(err).__name__}: {str(err)[:200]}); trying an older one.",
                    stacklevel=2,
                )
        return None

    def delete_after(self, step: int) -> list[int]:
        """Deletes the checkpoints newer than `step` (those `restore_latest` had to skip).

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
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
