"""Public neighborhood-attention functions and backend dispatch.

`na1d`, `na2d` and `na3d` validate their arguments (clear `ValueError`s, never a deep XLA trace),
normalise the window arguments into a hashable `NAParams`, and dispatch to one backend:

  * ``"reference"``: dense masked attention (the spec; tests and tiny inputs only);
  * ``"xla"``: the portable path with a hand-written custom VJP: the band formulation on CPU,
    the blocked-halo tiles (``"xla_tiled"``, selectable on any platform) on GPU and TPU;
  * ``"pallas"``: the fused GPU kernel (runs in interpret mode on CPU), where installed.

Every backend has the signature ``fn(q, k, v, rpb, params) -> (out, lse)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax.numpy as jnp

from natjax.ops.na.nonfinite import confine_nonfinite
from natjax.ops.na.spec import NAParams, make_params

# name -> (module, function). Imported lazily so that e.g. Pallas is only loaded when used.
_BACKENDS: dict[str, tuple[str, str]] = {
    "reference": ("natjax.ops.na.reference", "na_reference"),
    "xla": ("natjax.ops.na.platform", "na_xla"),  # band on CPU, tiled on GPU/TPU
    "xla_tiled": ("natjax.ops.na.xla_tiled", "na_xla_tiled"),
    "pallas": ("natjax.ops.na.pallas_triton", "na_pallas"),
    "ffi": ("natjax.ops.na.ffi", "na_ffi"),
}
IMPLEMENTATIONS = tuple(_BACKENDS)
_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _backend(name: str) -> Callable:
    module, fn = _BACKENDS[name]
    return getattr(importlib.import_module(module), fn)


def _unsupported_reason(name: str, q, params: NAParams, has_rpb: bool) -> str | None:
    """Asks an optional backend whether it can run this call; None means it can."""
    module = importlib.import_module(_BACKENDS[name][0])
    check = getattr(module, "unsupported_reason", None)
    return None if check is None else check(q.shape, q.dtype, params, has_rpb)


def _check_inputs(ndim: int, query, key, value, rpb) -> None:
    name = f"na{ndim}d"
    rank = ndim + 3
    for arg, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name}: `{arg}` must be an array, got {type(x).__name__}.")
        if x.ndim != rank:
            raise ValueError(
                f"{name}: `{arg}` must have rank {rank} [batch, {ndim} spatial axes, heads, "
                f"head_dim], got shape {tuple(x.shape)}."
            )
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{name}: `{arg}` must be float16, bfloat16, float32 or float64, got {x.dtype}."
            )
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            f"{name}: `query`, `key` and `value` must have the same shape, got "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}."
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"{name}: `query`, `key` and `value` must have the same dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}."
        )
    if 0 in query.shape:
        raise ValueError(f"{name}: inputs must not have empty axes, got {tuple(query.shape)}.")
    if rpb is not None and (not hasattr(rpb, "dtype") or rpb.dtype not in _FLOAT_DTYPES):
        got = getattr(rpb, "dtype", type(rpb).__name__)
        raise ValueError(
            f"{name}: `rpb` must be a float16/bfloat16/float32/float64 array or None, got {got}."
        )


def _neighborhood_attention(
    ndim, query, key, value, kernel_size, dilation, is_causal, rpb, scale, return_lse, impl
):
    _check_inputs(ndim, query, key, value, rpb)
    _, *spatial, heads, head_dim = query.shape
    params = make_params(ndim, tuple(spatial), head_dim, kernel_size, dilation, is_causal, scale)
    if rpb is not None:
        want = (heads, *params.rpb_shape_tail)
        if tuple(rpb.shape) != want:
            raise ValueError(
                f"na{ndim}d: `rpb` must have shape [heads, *(2 * kernel_size - 1)] = {want}, "
                f"got {tuple(rpb.shape)}."
            )
    if impl is None:
        # Chosen per lowering platform (platform.py), never from the host's default backend.
        from natjax.ops.na.platform import na_default

        out, lse = confine_nonfinite(na_default, query, key, value, rpb, params)
        return (out, lse) if return_lse else out
    if impl not in _BACKENDS:
        raise ValueError(
            f"na{ndim}d: unknown `implementation` {impl!r}; expected None or one of "
            f"{', '.join(repr(n) for n in IMPLEMENTATIONS)}."
        )
    elif impl == "pallas":
        try:
            reason = _unsupported_reason("pallas", query, params, rpb is not None)
        except ImportError as err:
            reason = f"Pallas is unavailable in this installation ({err})"
        if reason is not None:
            raise ValueError(f"na{ndim}d: implementation='pallas' cannot run this call: {reason}")
    # NaN/inf stay in the queries whose neighborhood holds them, as in NATTEN (nonfinite.py).
    out, lse = confine_nonfinite(_backend(impl), query, key, value, rpb, params)
    return (out, lse) if return_lse else out


_DOC = """Neighborhood attention over {n} spatial axis(es) with NATTEN <= 0.17 semantics.

    Each query attends the `kernel_size` nearest keys per axis of its dilation group (windows
    shifted to stay inside the map; causal axes see only the past). Logits are
    ``scale * q.k + rpb[h, (key - query) / dilation + kernel_size - 1]``.

    Args:
      query, key, value: `[batch, {axes}, heads, head_dim]`, float16/bfloat16/float32/float64.
      kernel_size: odd int, or one per spatial axis; `kernel_size * dilation <= size` per axis.
      dilation: int >= 1, or one per axis.
      is_causal: bool, or one per axis.
      rpb: relative positional bias `[heads, {rpb}]` or None.
      scale: factor on `q.k`; default `head_dim ** -0.5`.
      return_lse: also return the log-sum-exp of the logits, `[batch, {axes}, heads]`, float32
        (float64 for float64 inputs).
      implementation: None (fastest for the platform the program is lowered for), "xla",
        "xla_tiled", "reference", "pallas" or "ffi".

    Returns:
      `[batch, {axes}, heads, head_dim]` in the input dtype, and the lse if `return_lse`.

    Raises:
      ValueError: for bad shapes, dtypes, window arguments or an unknown implementation.
    """


def na1d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
         return_lse=False, implementation=None):  # fmt: skip
    return _neighborhood_attention(
        1, query, key, value, kernel_size, dilation, is_causal, rpb, scale, return_lse,
        implementation,
    )  # fmt: skip


def na2d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
         return_lse=False, implementation=None):  # fmt: skip
    return _neighborhood_attention(
        2, query, key, value, kernel_size, dilation, is_causal, rpb, scale, return_lse,
        implementation,
    )  # fmt: skip


def na3d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
         return_lse=False, implementation=None):  # fmt: skip
    return _neighborhood_attention(
        3, query, key, value, kernel_size, dilation, is_causal, rpb, scale, return_lse,
        implementation,
    )  # fmt: skip


na1d.__doc__ = _DOC.format(n=1, axes="length", rpb="2*k-1")
na2d.__doc__ = _DOC.format(n=2, axes="height, width", rpb="2*kh-1, 2*kw-1")
na3d.__doc__ = _DOC.format(n=3, axes="depth, height, width", rpb="2*kd-1, 2*kh-1, 2*kw-1")
