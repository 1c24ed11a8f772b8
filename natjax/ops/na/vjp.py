"""The custom-VJP scaffold that every neighborhood-attention backend shares.

A backend supplies a forward `(static, q, k, v, rpb) -> (out, lse)` and a backward
`(static, residuals, (d_out, d_lse)) -> (dq, dk, dv, drpb)`; `na_custom_vjp` ties them into one
`jax.custom_vjp` whose residuals are exactly `(q, k, v, rpb, out, lse)`, as in FlashAttention-2:
the attention weights are never saved, the backward recomputes them from `lse`. `static` is the
backend's hashable description of the call (window arguments, tile geometry); it is not
differentiated. `rpb` may be None, and then `drpb` must be None too. A forward may return
non-differentiable extras after `(out, lse)` (e.g. integer flags); their cotangents are dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

Forward = Callable[..., tuple[jax.Array, jax.Array]]
Backward = Callable[..., tuple]


def na_custom_vjp(forward: Forward, backward: Backward, primal: Forward | None = None) -> Callable:
    """Builds `op(static, q, k, v, rpb) -> (out, lse)` with the shared residual contract.

    Args:
      forward: `forward(static, q, k, v, rpb) -> (out, lse, *extras)`, the forward of
        differentiated calls (its `out` and `lse` are the residuals; `extras`, if any, are not
        differentiated).
      primal: optionally a forward used when the call is not differentiated (inference), with the
        same results up to rounding; e.g. one that XLA fuses better when `lse` is not needed.
      backward: `backward(static, (q, k, v, rpb, out, lse), (d_out, d_lse))` returning
        `(dq, dk, dv, drpb)`; `d_lse` is the cotangent of the returned log-sum-exp (zeros when
        only `out` is used).

    Returns:
      The differentiable op; `static` (first argument) is a non-differentiable, hashable value.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(static, q, k, v, rpb):
        return (primal or forward)(static, q, k, v, rpb)

    def op_fwd(static, q, k, v, rpb):
        outs = forward(static, q, k, v, rpb)
        return outs, (q, k, v, rpb, *outs[:2])

    def op_bwd(static, res, cts):
        return backward(static, res, tuple(cts[:2]))

    op.defvjp(op_fwd, op_bwd)
    return op
