"""Confines NaN and inf inputs to the queries whose neighborhood holds them (NATTEN semantics).

NATTEN <= 0.17 computes each query's attention over its own neighborhood only, so a non-finite
entry can only reach the queries whose neighborhood contains it. The matmul-based backends here
also multiply masked weights (exactly 0) with values outside the neighborhood, and ``0 * NaN``
and ``0 * inf`` are NaN: without this module a NaN or inf in one value token turns whole tiles,
bands or (dense) whole images NaN, and each backend spreads it differently.

`confine_nonfinite` wraps any backend ``fn(q, k, v, rpb, params) -> (out, lse)`` (applied once, in
`api.py`, so every backend gets it):

  * the backend always runs on the inputs with every non-finite entry replaced by 0 (a `where`;
    for finite inputs that is the input itself), outside any conditional. A backend marked with
    `reads_nonfinite_as_zero` (the native `ffi` kernels, and `implementation=None`, which
    substitutes inside its non-ffi branches) does that itself while loading its inputs, so the
    wrapper passes it the raw inputs and no substituted copy is made;
  * a fix-up then adds what NATTEN makes non-finite, computed in a ``lax.cond`` only when some
    entry of `q`, `k` or `v` is non-finite (branch 1, under the name scope `CONFINED_SCOPE`,
    which `experiments/hbm_aot.py` counts apart); for finite inputs branch 0 passes the results
    through. A backend marked `reports_nonfinite` also says whether it read a non-finite entry,
    which is then the predicate (no pass of its own over `q`, `k`, `v`). The
    neighborhood sets come from `spec.axis_windows` (`in_neighborhood`), never from a second
    attention call. Under `jax.vmap` the predicate is batched and the cond becomes a select:
    the fix-up is then computed for every call. The rules:
      - value channel `c` of query `i` is NaN if the neighborhood of `i` holds a NaN in channel
        `c`, or both a +inf and a -inf; else +inf (-inf) if it holds a +inf (-inf). Exactly what
        NATTEN's ``attn @ v`` gives while the weight of that token is > 0 (when it underflows to
        exactly 0, NATTEN gives ``0 * inf = NaN`` where this gives the inf);
      - a query token with a non-finite entry, and every query whose neighborhood holds a key
        token with a non-finite entry, gets NaN in all channels and a NaN lse. NATTEN agrees
        wherever such a logit is NaN or +inf (a NaN row; NATTEN's logsumexp is +inf for a +inf
        logit); where a key's infinity makes the logit exactly -inf NATTEN drops that key and the
        output stays finite, which this does not model.

Gradients: the gradient of the same computation on the zero-substituted inputs, with the
cotangent of every output (overwritten or not) passed on unchanged and the substitution treated
as the identity. So every gradient is finite where `rpb` and the upstream
cotangent are. For a non-finite value, `dv` equals NATTEN's everywhere (it is ``attn^T d_out``,
which does not depend on `v`), and `dq`, `dk`, `drpb` equal NATTEN's wherever NATTEN's are
finite; NATTEN's are NaN for the queries whose neighborhood holds the value, the keys those
queries see and the bias offsets they use, where these are the zero-substituted gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from natjax.ops.na.spec import NAParams, axis_windows


@jax.custom_jvp
def zero_nonfinite(x):
    """`x` with NaN/inf entries replaced by 0; its derivative is taken to be the identity."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


@zero_nonfinite.defjvp
def zero_nonfinite_jvp(primals, tangents):
    # Identity: the cotangent of a substituted entry is kept (for v it is NATTEN's attn^T d_out).
    return zero_nonfinite(primals[0]), tangents[0]


# Attribute of a backend function that substitutes non-finite q, k, v entries by 0 itself.
_READS_NONFINITE_AS_ZERO = "natjax_reads_nonfinite_as_zero"


def reads_nonfinite_as_zero(fn: Callable) -> Callable:
    """Marks a backend `fn(q, k, v, rpb, params)` that reads every NaN/inf entry of `q`, `k` and
    `v` as 0 itself, forward and backward (its results equal those on the zero-substituted
    inputs, with the substitution's derivative the identity): `confine_nonfinite` then passes it
    the raw inputs instead of a substituted copy.

    Args:
      fn: the backend function.

    Returns:
      `fn` itself, marked.
    """
    setattr(fn, _READS_NONFINITE_AS_ZERO, True)
    return fn


# Attribute of a backend pointing at its variant that also reports what it read (see below).
_REPORTS_NONFINITE = "natjax_reports_nonfinite"


def reports_nonfinite(flagged: Callable) -> Callable[[Callable], Callable]:
    """Marks a backend `fn(q, k, v, rpb, params) -> (out, lse)` that reads NaN/inf as 0 itself
    (like `reads_nonfinite_as_zero`) and has a variant `flagged(q, k, v, rpb, params) -> (out,
    lse, seen)` whose `seen` (a boolean scalar) is True whenever a query token or a key/value
    token inside some neighborhood has a non-finite entry (it may also be True otherwise: the
    fix-up is exact either way). `confine_nonfinite` then calls `flagged` and needs no pass of
    its own over `q`, `k`, `v`.

    Args:
      flagged: the reporting variant.

    Returns:
      A decorator marking `fn`.
    """

    def mark(fn: Callable) -> Callable:
        setattr(fn, _READS_NONFINITE_AS_ZERO, True)
        setattr(fn, _REPORTS_NONFINITE, flagged)
        return fn

    return mark


def any_nonfinite(q, k, v):
    """Whether some entry of `q`, `k` or `v` is NaN or +-inf (a scalar boolean)."""
    return ~(jnp.all(jnp.isfinite(q)) & jnp.all(jnp.isfinite(k)) & jnp.all(jnp.isfinite(v)))


def with_zeroed_inputs(fn: Callable) -> Callable:
    """`fn(q, k, v, rpb)` run on `q`, `k`, `v` with NaN/inf entries replaced by 0, as
    `confine_nonfinite` runs unmarked backends (for the branches of a marked dispatcher that
    lead to backends without the in-kernel substitution).

    Args:
      fn: `fn(q, k, v, rpb) -> (out, lse)`.

    Returns:
      The wrapped function, same signature.
    """

    def wrapped(q, k, v, rpb):
        return fn(zero_nonfinite(q), zero_nonfinite(k), zero_nonfinite(v), rpb)

    return wrapped


def in_neighborhood(flags, params: NAParams):
    """For every query, whether its neighborhood holds a flagged token.

    The neighborhood is the Cartesian product of the per-axis windows of `spec.axis_windows`
    (that is how every backend and the dense reference build it), so the "any" is taken one
    spatial axis at a time: along an axis every window is `K` positions `d` apart from its first
    key `f` (which is `< 0` where a causal window runs off the start), so a dilated windowed max
    over the axis padded by `(K - 1) d` in front, read at `f + (K - 1) d`, is the OR over the
    window. Intermediates stay the size of `flags`. A causal axis with a stride is the exception:
    its windows are cut at the query (fewer than `K` keys after the leader's start), so there the
    window slots are gathered (`[L, K]` positions) and OR-ed.

    Args:
      flags: bool `[batch, *spatial, ...]`, True at the flagged key/value positions.
      params: validated window arguments (one entry per spatial axis).

    Returns:
      bool, the shape of `flags`: True where a flagged token is in the query's neighborhood.
    """
    out = flags.astype(jnp.uint8)
    for ax in range(params.ndim):
        axis = 1 + ax
        k, d = params.kernel_size[ax], params.dilation[ax]
        win = axis_windows(out.shape[axis], k, d, params.is_causal[ax], params.stride[ax])
        if params.is_causal[ax] and params.stride[ax] > 1:
            length = out.shape[axis]
            picked = jnp.take(out, win.key.reshape(-1), axis=axis)
            picked = picked.reshape(*out.shape[:axis], length, k, *out.shape[axis + 1 :])
            valid = win.valid.reshape((length, k) + (1,) * (out.ndim - axis - 1))
            out = jnp.max(jnp.where(valid, picked, np.uint8(0)), axis=axis + 1)
            continue
        # First key of each window from any valid slot (every window holds its own query).
        slot = np.argmax(win.valid, axis=1)
        first = win.key[np.arange(len(slot)), slot] - slot * d
        window = [1] * out.ndim
        window[axis] = k
        dilation = [1] * out.ndim
        dilation[axis] = d
        padding = [(0, 0)] * out.ndim
        padding[axis] = ((k - 1) * d, 0)
        windowed = jax.lax.reduce_window(
            out, np.uint8(0), jax.lax.max, window, (1,) * out.ndim, padding,
            window_dilation=dilation,
        )  # fmt: skip
        out = jnp.take(windowed, first + (k - 1) * d, axis=axis)
    return out.astype(bool)


# Name scope of the confined branch: experiments/hbm_aot.py recognises its kernels by this name in
# the HLO metadata and leaves them out of the traffic of finite inputs (reported on their own).
CONFINED_SCOPE = "natjax_nonfinite_confined"


@jax.named_scope(CONFINED_SCOPE)
def _fixes(params: NAParams, q, k, v, out_dtype, lse_dtype):
    """What NATTEN's results add to the zero-substituted ones (module docstring): `(fix, lse_fix)`,
    0 where the result is finite, else the inf/NaN that NATTEN gives there."""
    nan_or_pos = jnp.isnan(v) | jnp.isposinf(v)
    nan_or_neg = jnp.isnan(v) | jnp.isneginf(v)
    bad_key = jnp.any(~jnp.isfinite(k), axis=-1)
    # One neighborhood pass for all three flag sets: [batch, *spatial, heads, 2 * head_dim + 1].
    seen = in_neighborhood(jnp.concatenate([nan_or_pos, nan_or_neg, bad_key[..., None]], -1),
                           params)  # fmt: skip
    # Flags per kv head -> per query head (GQA/MQA: query head h reads kv head h // group).
    # (Skipped without GQA: `jnp.repeat` wants an `out_sharding` on explicit meshes.)
    group = q.shape[-2] // k.shape[-2]
    if group > 1:
        seen = jnp.broadcast_to(seen[..., None, :], (*seen.shape[:-1], group, seen.shape[-1]))
        seen = seen.reshape(*seen.shape[:-3], q.shape[-2], seen.shape[-1])
    d = v.shape[-1]
    pos, neg = seen[..., :d], seen[..., d : 2 * d]
    bad_row = seen[..., 2 * d] | jnp.any(~jnp.isfinite(q), axis=-1)
    inf = jnp.asarray(jnp.inf, out_dtype)
    fix = jnp.where(pos, inf, jnp.where(neg, -inf, jnp.zeros((), out_dtype)))
    fix = jnp.where((pos & neg) | bad_row[..., None], jnp.asarray(jnp.nan, out_dtype), fix)
    return fix, jnp.where(bad_row, jnp.nan, 0.0).astype(lse_dtype)


def confine_nonfinite(fn: Callable, q, k, v, rpb, params: NAParams):
    """Runs a backend with NATTEN's confinement of NaN/inf inputs.

    The backend always runs on the zero-substituted inputs (a `where` that XLA fuses into the
    first reads of the XLA backends; a custom call would read a substituted copy, so the `ffi`
    kernels do the substitution while loading and are marked `reads_nonfinite_as_zero`). Only the
    fix-up sits in a `lax.cond`, outside differentiation (`stop_gradient`): for finite inputs it
    costs the finiteness check of `q`, `k`, `v` (none for a backend marked `reports_nonfinite`,
    whose kernels report what they read), and `out`, `lse` pass through the other branch
    without a copy; the attention itself is not inside a conditional, so XLA still shares work
    between the forward and the backward (measured with `experiments/hbm_aot.py`).

    Args:
      fn: the backend, `fn(q, k, v, rpb, params) -> (out, lse)`.
      q, k, v: `[batch, *spatial, heads, head_dim]`.
      rpb: `[heads, *(2K-1)]` or None (not checked: a non-finite bias is the caller's).
      params: validated window arguments.

    Returns:
      `(out, lse)` as `fn` returns them; identical to `fn` when all of `q`, `k`, `v` are finite.
    """
    flagged = getattr(fn, _REPORTS_NONFINITE, None)
    if flagged is not None:
        # The kernels say whether they read a non-finite entry: no separate pass over q, k, v.
        out, lse, nonfinite = flagged(q, k, v, rpb, params)
    elif getattr(fn, _READS_NONFINITE_AS_ZERO, False):
        out, lse = fn(q, k, v, rpb, params)
        nonfinite = any_nonfinite(q, k, v)
    else:
        out, lse = fn(zero_nonfinite(q), zero_nonfinite(k), zero_nonfinite(v), rpb, params)
        nonfinite = any_nonfinite(q, k, v)
    sg = jax.lax.stop_gradient

    def confined(q, k, v, out, lse):
        # out + fix is out where fix == 0 and fix where it is inf/NaN (out is finite).
        fix, lse_fix = _fixes(params, q, k, v, out.dtype, lse.dtype)
        return out + fix, lse + lse_fix

    # Branch 0 passes `out` and `lse` through (XLA aliases them: no copy, no zeros to add);
    # either way the cotangent of every output reaches the zero-substituted computation
    # unchanged (the fix-up's inputs are stop_gradient).
    return jax.lax.cond(
        nonfinite, confined, lambda q, k, v, out, lse: (out, lse), sg(q), sg(k), sg(v), out, lse
    )
