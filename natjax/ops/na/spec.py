"""Neighborhood-attention semantics: argument checking and the per-axis window rules.

This module is the single source of truth for *which* keys a query attends to (NATTEN <= 0.17
semantics). Every backend derives its masks, offsets and bias indices from `axis_windows`, and
`NAParams` is the validated, hashable description of one call that backends receive.

Per spatial axis of length `L`, kernel `K`, dilation `d` (NATTEN 0.17 `get_window_start`):
  * positions with the same `i % d` form a sub-map ("dilation group") of length
    `ceil((L - i % d) / d)`; a query only sees keys of its own group;
  * in group coordinates `p = i // d`, a non-causal query attends the `K` consecutive group
    positions starting at `clamp(p - K // 2, 0, L_group - K)`: the window is shifted to stay inside
    the map, never zero-padded;
  * a causal query attends group positions `p - K + 1 ... p` that exist (fewer near the start);
  * the relative-position-bias index is `(key - query) / d + K - 1`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class AxisWindows:
    """Static window description of one spatial axis (numpy, computed at trace time).

    Attributes:
      key: `[L, K]` int, the key position each query attends at each kernel offset (0 where
        invalid).
      valid: `[L, K]` bool, False where a causal window runs off the start of the map.
      rpb_index: `[L, K]` int in `[0, 2K-1)`, the bias index `(key - query) / d + K - 1`.
    """

    key: np.ndarray
    valid: np.ndarray
    rpb_index: np.ndarray


def axis_windows(length: int, kernel_size: int, dilation: int, causal: bool) -> AxisWindows:
    """Computes the neighborhood of every query along one axis (NATTEN 0.17 rules).

    Args:
      length: size `L` of the axis.
      kernel_size: window size `K` (odd).
      dilation: dilation `d`, with `K * d <= L`.
      causal: whether the axis is causal.

    Returns:
      An `AxisWindows` with `[L, K]` arrays.
    """
    i = np.arange(length)
    group = i % dilation
    pos = i // dilation
    group_len = (length - group + dilation - 1) // dilation
    offsets = np.arange(kernel_size)
    if causal:
        start = pos - kernel_size + 1
    else:
        start = np.clip(pos - kernel_size // 2, 0, group_len - kernel_size)
    key_pos = start[:, None] + offsets[None, :]
    valid = key_pos >= 0
    key = np.where(valid, key_pos * dilation + group[:, None], 0)
    rpb_index = key_pos - pos[:, None] + kernel_size - 1
    return AxisWindows(key=key, valid=valid, rpb_index=rpb_index)


@dataclasses.dataclass(frozen=True)
class NAParams:
    """Validated, hashable arguments of one neighborhood-attention call.

    Attributes:
      kernel_size, dilation, is_causal: one entry per spatial axis.
      scale: factor applied to `q . k` before the bias is added.
    """

    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def rpb_shape_tail(self) -> tuple[int, ...]:
        return tuple(2 * k - 1 for k in self.kernel_size)


def _per_axis(name: str, value, ndim: int, kind: type) -> tuple:
    """Expands an int/bool or a per-axis sequence into a tuple of length `ndim`."""
    if isinstance(value, (bool, np.bool_)) and kind is int:
        raise ValueError(f"`{name}` must be an int or {ndim} ints, got {value!r}.")
    if isinstance(value, kind) or (kind is int and isinstance(value, np.integer)):
        return (kind(value),) * ndim
    if kind is bool and isinstance(value, np.bool_):
        return (bool(value),) * ndim
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) != ndim:
            raise ValueError(
                f"`{name}` must have one entry per spatial axis ({ndim}), got {value!r}."
            )
        ok = all(
            (
                isinstance(v, kind)
                or (kind is int and isinstance(v, np.integer))
                or (kind is bool and isinstance(v, np.bool_))
            )
            and not (kind is int and isinstance(v, bool))
            for v in items
        )
        if not ok:
            raise ValueError(f"`{name}` entries must be {kind.__name__}s, got {value!r}.")
        return tuple(kind(v) for v in items)
    raise ValueError(
        f"`{name}` must be {'an' if kind is int else 'a'} {kind.__name__} or a sequence of "
        f"{ndim} {kind.__name__}s, "
        f"got {value!r}."
    )


def make_params(
    ndim: int,
    spatial: tuple[int, ...],
    head_dim: int,
    kernel_size,
    dilation,
    is_causal,
    scale,
) -> NAParams:
    """Validates the window arguments against the spatial shape.

    Args:
      ndim: number of spatial axes (1, 2 or 3).
      spatial: the spatial shape of the inputs.
      head_dim: size of the last input axis (for the default scale).
      kernel_size, dilation, is_causal, scale: as in `natjax.na2d`.

    Returns:
      The validated `NAParams`.

    Raises:
      ValueError: naming the offending argument, its value and the allowed range.
    """
    ks = _per_axis("kernel_size", kernel_size, ndim, int)
    dil = _per_axis("dilation", dilation, ndim, int)
    causal = _per_axis("is_causal", is_causal, ndim, bool)
    for ax, k in enumerate(ks):
        if k < 1 or k % 2 == 0:
            raise ValueError(
                f"`kernel_size` must be odd and >= 1 on every axis, got {ks} (axis {ax}: {k})."
            )
    for ax, d in enumerate(dil):
        if d < 1:
            raise ValueError(f"`dilation` must be >= 1 on every axis, got {dil} (axis {ax}: {d}).")
    for ax, (k, d, n) in enumerate(zip(ks, dil, spatial, strict=True)):
        if k * d > n:
            raise ValueError(
                f"kernel_size * dilation must be <= the spatial size on every axis; axis {ax} "
                f"has kernel_size={k}, dilation={d} (product {k * d}) but size {n}. "
                "Pad the input or use a smaller kernel/dilation."
            )
    if scale is None:
        scale = head_dim**-0.5
    else:
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"`scale` must be a Python float or None, got {scale!r}.") from None
        if not math.isfinite(scale):
            raise ValueError(f"`scale` must be finite, got {scale!r}.")
    return NAParams(kernel_size=ks, dilation=dil, is_causal=causal, scale=scale)
