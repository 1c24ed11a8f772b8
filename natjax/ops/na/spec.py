"""Neighborhood-attention semantics: argument checking and the per-axis window rules.

This module is the single source of truth for *which* keys a query attends to (NATTEN <= 0.17
semantics, extended with NATTEN >= 0.20's stride and even kernels). Every backend derives its
masks, offsets and bias indices from `axis_windows`; `NAParams` is the validated, hashable
description of the window arguments, and `NACall` (shapes, dtype, params, bias, extra tokens) is
what every backend's `unsupported_reason(call)` receives.

Per spatial axis of length `L`, kernel `K >= 1`, stride `1 <= s <= K`, dilation `d` (NATTEN 0.21
`get_na_flex_mask`; with `s = 1` and odd `K` exactly NATTEN 0.17's `get_window_start`):
  * positions with the same `i % d` form a sub-map ("dilation group") of length
    `L_g = ceil((L - i % d) / d)`; a query only sees keys of its own group;
  * in group coordinates `p = i // d`, the window is split as `left = K // 2` keys before and
    `right = K - 1 - left` after (one more before the query for even `K`);
  * stride: group positions form stride groups `p // s`; every query of a stride group uses the
    window of the group's leader, `lead = min((p // s) * s + s // 2, L_g - 1)` (non-causal) or
    `min((p // s) * s + s - 1, L_g - 1)` (causal); with `s = 1`, `lead = p`;
  * a non-causal query attends the `K` consecutive group positions starting at
    `clamp(lead - left, 0, L_g - K)`: the window is shifted to stay inside the map, never
    zero-padded;
  * a causal query attends group positions `lead - K + 1 ... p` that exist (fewer near the start
    and before the leader; never a key after the query);
  * the relative-position-bias index is `(key - query) / d + K - 1`. NATTEN defines no bias with
    stride; this one reduces to NATTEN's at stride 1 and stays in the `2K - 1` table because a
    query always lies inside its own window (`s <= K`), so `|key - query| / d <= K - 1`.
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


def axis_windows(
    length: int, kernel_size: int, dilation: int, causal: bool, stride: int = 1
) -> AxisWindows:
    """Computes the neighborhood of every query along one axis (module docstring's rules).

    Args:
      length: size `L` of the axis.
      kernel_size: window size `K >= 1` (odd or even).
      dilation: dilation `d`, with `K * d <= L`.
      causal: whether the axis is causal.
      stride: stride `s`, `1 <= s <= K`.

    Returns:
      An `AxisWindows` with `[L, K]` arrays.
    """
    i = np.arange(length)
    group = i % dilation
    pos = i // dilation
    group_len = (length - group + dilation - 1) // dilation
    offsets = np.arange(kernel_size)
    first = (pos // stride) * stride
    if causal:
        lead = np.minimum(first + stride - 1, group_len - 1)
        start = lead - kernel_size + 1
    else:
        lead = np.minimum(first + stride // 2, group_len - 1)
        start = np.clip(lead - kernel_size // 2, 0, group_len - kernel_size)
    key_pos = start[:, None] + offsets[None, :]
    valid = key_pos >= 0
    if causal:  # the leader may lie after the query: never a key after the query itself
        valid &= key_pos <= pos[:, None]
    key = np.where(valid, key_pos * dilation + group[:, None], 0)
    rpb_index = key_pos - pos[:, None] + kernel_size - 1
    return AxisWindows(key=key, valid=valid, rpb_index=rpb_index)


@dataclasses.dataclass(frozen=True)
class NAParams:
    """Validated, hashable arguments of one neighborhood-attention call.

    Attributes:
      kernel_size, dilation, is_causal: one entry per spatial axis.
      scale: factor applied to `q . k` before the bias is added.
      stride: one entry per spatial axis (default: 1 on every axis).
    """

    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    stride: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.stride:  # frozen: set the default through object.__setattr__
            object.__setattr__(self, "stride", (1,) * len(self.kernel_size))

    @property
    def has_stride(self) -> bool:
        """Whether some axis has a stride above 1 (NATTEN >= 0.20 strided NA)."""
        return any(s != 1 for s in self.stride)

    @property
    def has_even_kernel(self) -> bool:
        """Whether some axis has an even kernel size (NATTEN >= 0.20)."""
        return any(k % 2 == 0 for k in self.kernel_size)

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def rpb_shape_tail(self) -> tuple[int, ...]:
        return tuple(2 * k - 1 for k in self.kernel_size)


@dataclasses.dataclass(frozen=True)
class NACall:
    """Static description of one neighborhood-attention call, as backends are asked about it.

    Every backend's `unsupported_reason(call: NACall) -> str | None` receives one; None means the
    backend runs the call. Additional key/value tokens are merged by the public API around the
    backend (`merge_attentions`), so `n_extra` is informative only.

    Attributes:
      q_shape: `[batch, *spatial, heads, head_dim]`.
      k_shape: `[batch, *spatial, kv_heads, head_dim]`.
      v_shape: `[batch, *spatial, kv_heads, value_dim]`.
      dtype: the input dtype (query, key, value and extra tokens share it).
      params: the validated window arguments.
      has_rpb: whether a relative positional bias is given.
      n_extra: number of additional key/value tokens (0 if none).
    """

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dtype: np.dtype
    params: NAParams
    has_rpb: bool = False
    n_extra: int = 0

    @classmethod
    def of(cls, q, k, v, rpb, params: NAParams, n_extra: int = 0) -> NACall:
        """Describes a call from its (possibly traced) arrays.

        Args:
          q, k, v: the query, key and value arrays (anything with `.shape`/`.dtype`).
          rpb: the bias or None.
          params: validated window arguments.
          n_extra: number of additional key/value tokens.

        Returns:
          The `NACall`.
        """
        return cls(
            q_shape=tuple(int(n) for n in q.shape),
            k_shape=tuple(int(n) for n in k.shape),
            v_shape=tuple(int(n) for n in v.shape),
            dtype=np.dtype(q.dtype),
            params=params,
            has_rpb=rpb is not None,
            n_extra=int(n_extra),
        )

    @classmethod
    def for_query(cls, shape, dtype, params: NAParams, has_rpb: bool) -> NACall:
        """Describes a plain multi-head call: key and value shaped like the query `shape`.

        Args:
          shape: `[batch, *spatial, heads, head_dim]`; dtype: the input dtype.
          params: validated window arguments; has_rpb: whether a bias is given.

        Returns:
          The `NACall`.
        """
        shape = tuple(int(n) for n in shape)
        return cls(shape, shape, shape, np.dtype(dtype), params, bool(has_rpb))

    @property
    def batch(self) -> int:
        return self.q_shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.q_shape[1:-2]

    @property
    def heads(self) -> int:
        return self.q_shape[-2]

    @property
    def kv_heads(self) -> int:
        return self.k_shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q_shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v_shape[-1]

    @property
    def is_gqa(self) -> bool:
        """Whether key/value have fewer heads than the query (GQA/MQA)."""
        return self.kv_heads != self.heads


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
    stride=1,
) -> NAParams:
    """Validates the window arguments against the spatial shape.

    Args:
      ndim: number of spatial axes (1, 2 or 3).
      spatial: the spatial shape of the inputs.
      head_dim: size of the last input axis (for the default scale).
      kernel_size, dilation, is_causal, scale, stride: as in `natjax.na2d`.

    Returns:
      The validated `NAParams`.

    Raises:
      ValueError: naming the offending argument, its value and the allowed range.
    """
    ks = _per_axis("kernel_size", kernel_size, ndim, int)
    dil = _per_axis("dilation", dilation, ndim, int)
    causal = _per_axis("is_causal", is_causal, ndim, bool)
    st = _per_axis("stride", stride, ndim, int)
    for ax, k in enumerate(ks):
        if k < 1:
            raise ValueError(
                f"`kernel_size` must be >= 1 on every axis, got {ks} (axis {ax}: {k})."
            )
    for ax, (s, k) in enumerate(zip(st, ks, strict=True)):
        if not 1 <= s <= k:
            raise ValueError(
                f"`stride` must be >= 1 and <= kernel_size on every axis, got stride={st} with "
                f"kernel_size={ks} (axis {ax}: stride {s}, kernel {k})."
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
    return NAParams(kernel_size=ks, dilation=dil, is_causal=causal, scale=scale, stride=st)
