"""Public neighborhood-attention functions and backend dispatch.

`na1d`, `na2d` and `na3d` validate their arguments (clear `ValueError`s, never a deep XLA trace),
normalise the window arguments into a hashable `NAParams`, and dispatch to one backend:

  * ``"reference"``: dense masked attention (the spec; tests and tiny inputs only);
  * ``"xla"``: the portable path with a hand-written custom VJP: the band formulation on CPU,
    the blocked-halo tiles (``"xla_tiled"``, selectable on any platform) on GPU and TPU;
  * ``"pallas"``: the fused GPU kernel (runs in interpret mode on CPU), where installed.

Every backend has the signature ``fn(q, k, v, rpb, params) -> (out, lse)`` and takes GQA/MQA
(`k`, `v` with fewer heads) and a value head_dim of its own; a backend module may define
``unsupported_reason(call: NACall) -> str | None`` to refuse calls it cannot run (a `ValueError`
when named, a fallback when chosen by ``implementation=None``). Additional key/value tokens never
reach a backend: the neighborhood part `(out, lse)` and a dense part over the extra tokens are
combined here by `merge_attentions`, which is exactly one softmax over both key sets.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from natjax.ops.na.merge import merge_attentions
from natjax.ops.na.nonfinite import confine_nonfinite
from natjax.ops.na.spec import NACall, make_params

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


def unsupported_reason(name: str, call: NACall) -> str | None:
    """Asks a backend whether it can run a call; None means it can.

    Args:
      name: one of `IMPLEMENTATIONS`.
      call: the call's description.

    Returns:
      The backend's reason for refusing, or None.
    """
    try:
        module = importlib.import_module(_BACKENDS[name][0])
    except ImportError as err:
        return f"the {name!r} backend is unavailable in this installation ({err})"
    check = getattr(module, "unsupported_reason", None)
    return None if check is None else check(call)


def _check_array(name: str, arg: str, x, rank: int, axes: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name}: `{arg}` must be an array, got {type(x).__name__}.")
    if x.ndim != rank:
        raise ValueError(
            f"{name}: `{arg}` must have rank {rank} [{axes}], got shape {tuple(x.shape)}."
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name}: `{arg}` must be float16, bfloat16, float32 or float64, got {x.dtype}."
        )
    if 0 in x.shape:
        raise ValueError(f"{name}: `{arg}` must not have empty axes, got {tuple(x.shape)}.")


def _check_inputs(ndim: int, query, key, value, rpb) -> None:
    name = f"na{ndim}d"
    rank = ndim + 3
    for arg, x in (("query", query), ("key", key), ("value", value)):
        heads = "kv_heads" if arg != "query" else "heads"
        dim = "value_dim" if arg == "value" else "head_dim"
        _check_array(name, arg, x, rank, f"batch, {ndim} spatial axes, {heads}, {dim}")
    if key.shape[:-2] != query.shape[:-2] or value.shape[:-2] != query.shape[:-2]:
        raise ValueError(
            f"{name}: `query`, `key` and `value` must have the same batch and spatial shape, "
            f"got {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}."
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"{name}: `key` must have the head_dim of `query` ({query.shape[-1]}), got "
            f"shape {tuple(key.shape)}."
        )
    heads, kv_heads = query.shape[-2], key.shape[-2]
    if value.shape[-2] != kv_heads:
        raise ValueError(
            f"{name}: `key` and `value` must have the same number of heads, got {kv_heads} and "
            f"{value.shape[-2]}."
        )
    if heads % kv_heads:
        raise ValueError(
            f"{name}: the query heads must be a multiple of the key/value heads (GQA/MQA), got "
            f"heads={heads} and kv_heads={kv_heads} (heads % kv_heads = {heads % kv_heads})."
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"{name}: `query`, `key` and `value` must have the same dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}."
        )
    if rpb is not None and (not hasattr(rpb, "dtype") or rpb.dtype not in _FLOAT_DTYPES):
        got = getattr(rpb, "dtype", type(rpb).__name__)
        raise ValueError(
            f"{name}: `rpb` must be a float16/bfloat16/float32/float64 array or None, got {got}."
        )


def _check_extra(ndim: int, query, key, value, extra_k, extra_v) -> int:
    """Validates the additional key/value tokens; returns their number (0 if none)."""
    name = f"na{ndim}d"
    if extra_k is None and extra_v is None:
        return 0
    if extra_k is None or extra_v is None:
        given = "additional_keys" if extra_v is None else "additional_values"
        raise ValueError(
            f"{name}: `additional_keys` and `additional_values` must be given together, got only "
            f"`{given}`."
        )
    batch, kv_heads = query.shape[0], key.shape[-2]
    for arg, x, dim in (
        ("additional_keys", extra_k, key.shape[-1]),
        ("additional_values", extra_v, value.shape[-1]),
    ):
        _check_array(name, arg, x, 4, "batch, n_extra, kv_heads, head_dim")
        if x.shape[0] != batch or x.shape[2] != kv_heads or x.shape[3] != dim:
            what = "value_dim" if arg == "additional_values" else "head_dim"
            raise ValueError(
                f"{name}: `{arg}` must have shape [batch, n_extra, kv_heads, {what}] = "
                f"[{batch}, n_extra, {kv_heads}, {dim}], got {tuple(x.shape)}."
            )
        if x.dtype != query.dtype:
            raise ValueError(
                f"{name}: `{arg}` must have the dtype of `query` ({query.dtype}), got {x.dtype}."
            )
    if extra_k.shape[1] != extra_v.shape[1]:
        raise ValueError(
            f"{name}: `additional_keys` and `additional_values` must have the same number of "
            f"tokens, got {extra_k.shape[1]} and {extra_v.shape[1]}."
        )
    return int(extra_k.shape[1])


def _extra_attention(query, extra_k, extra_v, scale: float):
    """Dense attention of every query over the additional tokens: `(out, lse)`.

    Query heads are split as `[kv_heads, group]` (GQA/MQA without repeating the tokens). No
    bias, no mask: every query attends every extra token (NATTEN 0.17.5's `qk_cross_forward`).
    """
    batch, *spatial, heads, head_dim = query.shape
    kv_heads, value_dim = extra_k.shape[2], extra_v.shape[3]
    acc = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
    q = query.reshape(batch, -1, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum(
        "bncjd,becd->bncje", q, extra_k, preferred_element_type=acc
    ) * scale  # fmt: skip
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bncje,becd->bncjd", probs.astype(query.dtype), extra_v,
                     preferred_element_type=acc)  # fmt: skip
    out = out.reshape(batch, *spatial, heads, value_dim).astype(query.dtype)
    return out, lse.reshape(batch, *spatial, heads)


def _neighborhood_attention(
    ndim, query, key, value, kernel_size, stride, dilation, is_causal, rpb, scale,
    extra_k, extra_v, return_lse, impl,
):  # fmt: skip
    _check_inputs(ndim, query, key, value, rpb)
    n_extra = _check_extra(ndim, query, key, value, extra_k, extra_v)
    _, *spatial, heads, head_dim = query.shape
    params = make_params(
        ndim, tuple(spatial), head_dim, kernel_size, dilation, is_causal, scale, stride
    )
    if rpb is not None:
        want = (heads, *params.rpb_shape_tail)
        if tuple(rpb.shape) != want:
            raise ValueError(
                f"na{ndim}d: `rpb` must have shape [heads, *(2 * kernel_size - 1)] = {want}, "
                f"got {tuple(rpb.shape)}."
            )
    if impl is not None:
        if impl not in _BACKENDS:
            raise ValueError(
                f"na{ndim}d: unknown `implementation` {impl!r}; expected None or one of "
                f"{', '.join(repr(n) for n in IMPLEMENTATIONS)}."
            )
        call = NACall.of(query, key, value, rpb, params, n_extra)
        reason = unsupported_reason(impl, call)
        if reason is not None:
            raise ValueError(f"na{ndim}d: implementation={impl!r} cannot run this call: {reason}")
    if not n_extra:
        extra_k = extra_v = None
    out, lse = _attend(query, key, value, rpb, extra_k, extra_v, params=params, impl=impl)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("params", "impl"))
def _attend(query, key, value, rpb, extra_k, extra_v, *, params, impl):
    """The validated call as one jitted computation: `(out, lse)`.

    Why a jit here: called eagerly (outside any jit), the backends' loops (`lax.scan`,
    `fori_loop`) would each be compiled anew on every call, seconds per call on CPU; one jit
    keyed on the static `NAParams` compiles once per shape. Inside a user's jit it is inlined.
    """
    if impl is None:
        # Chosen per lowering platform (platform.py), never from the host's default backend.
        from natjax.ops.na.platform import na_default

        backend = na_default
    else:
        backend = _backend(impl)
    # NaN/inf stay in the queries whose neighborhood holds them, as in NATTEN (nonfinite.py).
    out, lse = confine_nonfinite(backend, query, key, value, rpb, params)
    if extra_k is not None:
        out_x, lse_x = _extra_attention(query, extra_k, extra_v, params.scale)
        out, lse = merge_attentions([out, out_x], [lse, lse_x.astype(lse.dtype)])
    return out, lse


_DOC = """Neighborhood attention over {n} spatial axis(es): NATTEN <= 0.17 semantics (bias, CPU)
    plus NATTEN 0.21's stride, even kernels, GQA/MQA and additional key/value tokens.

    Each query attends `kernel_size` keys per axis of its dilation group (windows shifted to stay
    inside the map; causal axes see only the past); with `stride`, the queries of each stride
    group share the window of the group's leader (NATTEN's strided NA; `natjax.ops.na.spec` has
    the exact rules). Logits are
    ``scale * q.k + rpb[h, (key - query) / dilation + kernel_size - 1]``; the bias index is
    NATTEN's at stride 1 and stays inside the `2 * kernel_size - 1` table with stride (a query is
    always inside its own window), a definition of natjax's since NATTEN has no bias with stride.

    Args:
      query: `[batch, {axes}, heads, head_dim]`, float16/bfloat16/float32/float64.
      key: `[batch, {axes}, kv_heads, head_dim]`, with `heads % kv_heads == 0` (GQA/MQA: query
        head `h` reads kv head `h // (heads // kv_heads)`); same dtype as `query`.
      value: `[batch, {axes}, kv_heads, value_dim]` (`value_dim` may differ from `head_dim`).
      kernel_size: int >= 1 (odd or even), or one per spatial axis; `kernel_size * dilation <=
        size` per axis. Even kernels see one more key before the query than after it.
      stride: int, or one per axis, `1 <= stride <= kernel_size` (keyword only, like all below).
      dilation: int >= 1, or one per axis.
      is_causal: bool, or one per axis.
      rpb: relative positional bias `[heads, {rpb}]` or None (per query head).
      scale: factor on `q.k`; default `head_dim ** -0.5`.
      additional_keys, additional_values: None, or `[batch, n_extra, kv_heads, head_dim]` and
        `[batch, n_extra, kv_heads, value_dim]` tokens every query attends besides its
        neighborhood, in one softmax with it (no bias, no causal mask or dilation on them).
      return_lse: also return the log-sum-exp of the logits (extra tokens included),
        `[batch, {axes}, heads]`, float32 (float64 for float64 inputs).
      implementation: None (fastest for the platform the program is lowered for), "xla",
        "xla_tiled", "reference", "pallas" or "ffi".

    Returns:
      `[batch, {axes}, heads, value_dim]` in the input dtype, and the lse if `return_lse`.

    Raises:
      ValueError: for bad shapes, dtypes, window arguments, extra tokens, an unknown
        implementation, or a named implementation that cannot run the call (with its reason).
    """


def na1d(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, rpb=None,
         scale=None, additional_keys=None, additional_values=None, return_lse=False,
         implementation=None):  # fmt: skip
    return _neighborhood_attention(
        1, query, key, value, kernel_size, stride, dilation, is_causal, rpb, scale,
        additional_keys, additional_values, return_lse, implementation,
    )  # fmt: skip


def na2d(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, rpb=None,
         scale=None, additional_keys=None, additional_values=None, return_lse=False,
         implementation=None):  # fmt: skip
    return _neighborhood_attention(
        2, query, key, value, kernel_size, stride, dilation, is_causal, rpb, scale,
        additional_keys, additional_values, return_lse, implementation,
    )  # fmt: skip


def na3d(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, rpb=None,
         scale=None, additional_keys=None, additional_values=None, return_lse=False,
         implementation=None):  # fmt: skip
    return _neighborhood_attention(
        3, query, key, value, kernel_size, stride, dilation, is_causal, rpb, scale,
        additional_keys, additional_values, return_lse, implementation,
    )  # fmt: skip


na1d.__doc__ = _DOC.format(n=1, axes="length", rpb="2*k-1")
na2d.__doc__ = _DOC.format(n=2, axes="height, width", rpb="2*kh-1, 2*kw-1")
na3d.__doc__ = _DOC.format(n=3, axes="depth, height, width", rpb="2*kd-1, 2*kh-1, 2*kw-1")
