"""Hugging Face-style `from_pretrained` / `save_pretrained` methods on the model classes.

The model layer does not import the checkpoint layer (`natjax.convert` sits above it); instead
`natjax.convert.checkpoint` registers its loader and saver here when it is imported, which
`import natjax` always does. The methods are thin: all the work, and its documentation, is in
`natjax.from_pretrained` / `natjax.save_pretrained`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_IO: dict[str, Callable[..., Any]] = {}


def register_checkpoint_io(load: Callable[..., Any], save: Callable[..., Any]) -> None:
    """Install the functions behind the methods (called by `natjax.convert.checkpoint`)."""
    _IO["load"], _IO["save"] = load, save


def _io(name: str) -> Callable[..., Any]:
    if name not in _IO:
        raise RuntimeError(
            "natjax checkpoint I/O is not registered: import natjax (or natjax.convert.checkpoint)"
        )
    return _IO[name]


class PretrainedMixin:
    """`Cls.from_pretrained(source, ...)` and `model.save_pretrained(directory)`.

    Subclasses set `architecture` ("classification", "model" or "backbone").
    """

    architecture: str = ""

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *args: Any, **kwargs: Any):
        """`natjax.from_pretrained(source, ..., architecture=<this class>)`.

        A classification checkpoint loads into `NatModel`/`NatBackbone` with its head dropped;
        every argument is as in `natjax.from_pretrained` (`config=`, `num_labels=`,
        `ignore_mismatched_sizes=`, `revision=`, `cache_dir=`, constructor keywords).
        """
        return _io("load")(source, *args, architecture=cls.architecture, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike):
        """`natjax.save_pretrained(self, directory)`: a natjax checkpoint folder."""
        return _io("save")(self, directory)
