"""Makes a batch/head-parallel kernel call shardable (`custom_partitioning`) and vmappable.

A `pallas_call` is opaque to XLA's SPMD partitioner, which would all-gather its operands. The
neighborhood-attention kernels are independent per (batch, head), so `batch_head_parallel` wraps
an op on the row layout in `jax.experimental.custom_partitioning`: under `jax.jit` with inputs
sharded over batch and/or heads (any mesh axes), every device runs the op on its own shard, and
only the remaining axes (positions, head dim, bias bins) are replicated. This needs no mesh
context manager and works with the plain `jax.jit(..., in_shardings=...)` style.

`custom_partitioning` has no batching rule, so the wrapped op is also a `custom_vmap` whose rule
folds the vmapped axis into the head axis (heads are independent, and the bias is per head).

Array kinds (the op's operands/results):
  * ``"x"``: `[B, N, h, D]`; ``"xv"``: `[B, N, h, Dv]` (a value head_dim of its own);
  * ``"kv"``: `[B, N, hk, D]` and ``"kvv"``: `[B, N, hk, Dv]`, key/value with `hk` kv heads
    (GQA/MQA: query head `i` reads kv head `i // (h // hk)`);
  * ``"row"``: `[B, N, h]`; ``"rpb"``: `[h, R]`;
  * ``"drpb"``: `[B, h, O, X]` (per-batch bias-gradient partials, reduced by the caller);
  * ``"flag"``: `[B, h]` (one value per batch entry and head, e.g. what a kernel saw).

Heads and kv heads are sharded over the same mesh axes: a shard of `h / m` query heads then holds
exactly the `hk / m` kv heads they read (contiguous blocks), and `op` sees the same group size.
When `hk` is not divisible by the head shards `m`, the heads are not split (only the batch is;
XLA gathers the heads first): correct, and the caller's sharding is kept everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

_FACTORS = {
    "x": "b n h d", "xv": "b n h e", "kv": "b n k d", "kvv": "b n k e", "row": "b n h",
    "rpb": "h r", "drpb": "b h o u", "flag": "b h",
}  # fmt: skip
_REPLICATED = ("n", "d", "e", "r", "o", "u")
_HEAD_AXIS = {"x": 2, "xv": 2, "kv": 2, "kvv": 2, "row": 2, "rpb": 0, "drpb": 1, "flag": 1}


def _spec(kind: str, batch, head) -> P:
    return {
        "x": P(batch, None, head, None),
        "xv": P(batch, None, head, None),
        "kv": P(batch, None, head, None),
        "kvv": P(batch, None, head, None),
        "row": P(batch, None, head),
        "rpb": P(head, None),
        "drpb": P(batch, head, None, None),
        "flag": P(batch, head),
    }[kind]


def _batch_head_axes(sharding, ndim: int):
    """Mesh axes of dims 0 (batch) and 2 (heads) of the first operand (an "x")."""
    spec = tuple(getattr(sharding, "spec", ())) + (None,) * ndim
    return spec[0], spec[2]


def _axes_size(mesh, axes) -> int:
    """Number of shards along `axes` (None, one mesh axis name, or a tuple of them)."""
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def _head_axes_for(mesh, head, kinds, shapes):
    """`head`, or None when some kv-head operand's head count is not divisible by its shards."""
    shards = _axes_size(mesh, head)
    for kind, shape in zip(kinds, shapes, strict=True):
        if kind in ("kv", "kvv") and shape[2] % shards:
            return None
    return head


def _explicit_mesh(x):
    """(mesh, batch axes, head axes) when `x`'s type carries an explicit-axes mesh, else None.

    With explicit axes the sharding is part of the type (even when replicated), and
    `pallas_call` cannot take such operands directly: they go through `shard_map`.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    if not any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    batch, head = _batch_head_axes(sharding, x.ndim)
    return mesh, batch, head


def _fold(x, kind: str, size: int, batched: bool):
    """Moves a vmapped leading axis into the head axis: `[V, ..., h, ...] -> [..., V*h, ...]`."""
    if not batched:
        x = jnp.broadcast_to(x[None], (size, *x.shape))
    axis = _HEAD_AXIS[kind]
    x = jnp.moveaxis(x, 0, axis)  # [..., V, h, ...]
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


def _unfold(x, kind: str, size: int):
    axis = _HEAD_AXIS[kind]
    x = x.reshape(x.shape[:axis] + (size, -1) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def explicit_batch_head_map(
    fn: Callable, kinds_in: Sequence[str], kinds_out: Sequence[str], *args
) -> tuple:
    """Runs `fn(*args) -> tuple` per (batch, head) shard when `args[0]` carries an explicit mesh.

    With explicit axes (`jax.make_mesh`'s default) the sharding is part of the array types, and
    neither `pallas_call` nor reshapes that split a sharded array's axes accept that; a
    `shard_map` over the batch/head mesh axes gives `fn` local, unsharded arrays. Without an
    explicit mesh, `fn(*args)` is called as is.

    Args:
      fn: the per-shard computation on arrays of the given kinds (module docstring).
      kinds_in, kinds_out: kind of each operand / result.
      *args: the operands; the first is an "x".

    Returns:
      The tuple of results.
    """
    explicit = _explicit_mesh(args[0])
    if explicit is None:
        return tuple(fn(*args))
    mesh, batch, caller_head = explicit
    head = _head_axes_for(mesh, caller_head, kinds_in, [a.shape for a in args])
    in_specs = tuple(_spec(k, batch, head) for k in kinds_in)
    out_specs = tuple(_spec(k, batch, head) for k in kinds_out)
    args = tuple(
        jax.sharding.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs, strict=True)
    )
    # check_vma=False: pallas_call out_shapes carry no varying-axes annotation.
    mapped = jax.shard_map(
        lambda *a: tuple(fn(*a)), mesh=mesh, in_specs=in_specs, out_specs=out_specs,
        check_vma=False,
    )  # fmt: skip
    outs = mapped(*args)
    if head == caller_head:
        return outs
    # Heads were not split (kv heads not divisible by the head shards): give the query-head
    # results the caller's head sharding back (a local slice of a replicated array).
    return tuple(
        o
        if k in ("kv", "kvv")
        else jax.sharding.reshard(o, NamedSharding(mesh, _spec(k, batch, caller_head)))
        for o, k in zip(outs, kinds_out, strict=True)
    )


def match_sharding(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` resharded to `like`'s sharding when `like`'s type carries an explicit mesh (a custom
    VJP's cotangent must have its primal's type, sharding included); else `x` unchanged.

    Args:
      x: an array of `like`'s shape.
      like: the array whose sharding `x` takes.

    Returns:
      `x`, resharded where needed.
    """
    if _explicit_mesh(like) is None:
        return x
    sharding = jax.typeof(like).sharding
    if jax.typeof(x).sharding == sharding:
        return x
    return jax.sharding.reshard(x, sharding)


def batch_head_parallel(
    op: Callable, static, kinds_in: Sequence[str], kinds_out: Sequence[str]
) -> Callable:
    """Wraps `op(static, *arrays) -> tuple` so it shards over batch/heads and vmaps.

    Args:
      op: the per-shard computation; must be exact when run on any batch/head slice.
      static: hashable first argument of `op` (the kernel geometry).
      kinds_in: kind of each array operand (see the module docstring); the first is an "x".
      kinds_out: kind of each result.

    Returns:
      A function of the array operands returning a tuple of results.
    """
    kinds_in, kinds_out = tuple(kinds_in), tuple(kinds_out)

    def run(*args):
        return tuple(op(static, *args))

    partitioned = custom_partitioning(run)

    def shardings(mesh, arg_shapes):
        batch, head = _batch_head_axes(arg_shapes[0].sharding, len(arg_shapes[0].shape))
        head = _head_axes_for(mesh, head, kinds_in, [a.shape for a in arg_shapes])
        named = lambda kind: NamedSharding(mesh, _spec(kind, batch, head))  # noqa: E731
        return tuple(named(k) for k in kinds_in), tuple(named(k) for k in kinds_out)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        arg_sh, out_sh = shardings(mesh, arg_shapes)
        return mesh, run, out_sh, arg_sh

    def infer(mesh, arg_shapes, result_shape):
        del result_shape
        return shardings(mesh, arg_shapes)[1]

    rule = ", ".join(_FACTORS[k] for k in kinds_in) + " -> "
    rule += ", ".join(_FACTORS[k] for k in kinds_out)
    used = set(rule.replace(",", " ").replace("->", " ").split())
    partitioned.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=tuple(f for f in _REPLICATED if f in used),
    )

    def sharded_call(*args):
        if _explicit_mesh(args[0]) is None:
            return partitioned(*args)
        return explicit_batch_head_map(run, kinds_in, kinds_out, *args)

    @jax.custom_batching.custom_vmap
    def call(*args):
        return sharded_call(*args)

    @call.def_vmap
    def _vmap_rule(axis_size, in_batched, *args):
        folded = [
            _fold(a, k, axis_size, b) for a, k, b in zip(args, kinds_in, in_batched, strict=True)
        ]
        outs = call(*folded)
        unfolded = tuple(_unfold(o, k, axis_size) for o, k in zip(outs, kinds_out, strict=True))
        return unfolded, (True,) * len(kinds_out)

    return call
