"""Fused neighborhood attention in Pallas with the Triton lowering (GPU; interpret mode on CPU).

This module holds the `pallas_call`s, the layout, the custom VJP and the public entry points;
the forward/dq kernels and their static tables live in `pallas_kernels`, the dk/dv kernel in
`pallas_dkv` (design: docs/pallas.md).

* Layout: inputs stay in the caller's `[B, *S, h, D]` layout, viewed as `[B, N, h, D]` (a free
  reshape); the head dim (and the value's own head dim) is zero-padded to a power of two >= 16
  only when needed. Each program reads its rows through computed flat indices (Triton pointer
  tensors): no transpose in HBM. k/v may have fewer (kv) heads: GQA/MQA, never repeated.
* Grid `(tiles, heads, batch)` for the forward and dq kernels (k/v index maps read kv head
  `h // group`), `(tiles, kv_heads, batch)` for dk/dv (which sums each kv head's query heads in
  registers), the tile axis fastest. The per-head
  mask/bias table of the query-tile kernels and the dk/dv kernel's bias are passed flat
  (`[h * T]`, read whole) and indexed with the head's offset folded into per-query vectors.
* Every kernel has its own tile (`NAPallasConfig`: forward, dq + d_rpb, dk/dv), chosen by
  `pallas_tuning.default_config` and checked by the compile gate (`experiments/compile_gate.py`).
* Backward (FlashAttention-2 style, from the saved `lse`): `ds = p * (dO.V - delta + dlse)` with
  `delta = sum(dO * O)`; `dq = scale ds K`, `dk = scale ds^T Q`, `dv = p^T dO`; the d_rpb
  partials of the dq kernel are summed over the batch and mapped to bias bins by XLA
  (`drpb_from_partials`): no atomics, deterministic. One `jax.custom_vjp` with residuals
  `q, k, v, rpb, out, lse`.
* Interpret vs compiled is decided when lowering (`lax.platform_dependent`), so a CPU host can
  compile the real Triton kernels for a GPU target.

Sharding: each kernel op goes through `partition.batch_head_parallel` (`shard_map` on
explicit-axes meshes, `custom_partitioning` otherwise, plus a `custom_vmap` rule), so under
`jax.jit` with batch/head-sharded inputs every device runs the kernels on its own shard (no
all-gather; the bias gradient's batch sum is the only collective).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from natjax.ops.na.pallas_dkv import dkv_kernel, dkv_tables
from natjax.ops.na.pallas_kernels import (
    LOG2E,
    Geometry,
    bias_table,
    dq_kernel,
    drpb_from_partials,
    forward_kernel,
    make_geometry,
    tables,
)
from natjax.ops.na.pallas_tuning import NAPallasConfig, NATileConfig, default_config
from natjax.ops.na.partition import batch_head_parallel, match_sharding
from natjax.ops.na.spec import NACall, NAParams
from natjax.ops.na.vjp import na_custom_vjp

_MAX_KERNEL = 13
_MAX_HEAD_DIM = 128
_SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The three kernels' geometries of one call (the custom VJP's static argument)."""

    fwd: Geometry
    dq: Geometry
    dkv: Geometry


# --------------------------------------------------------------------------------------------
# pallas_call wrappers on the [B, N, h, Dp] layout; grid (tiles, heads, batch), tiles fastest.
# --------------------------------------------------------------------------------------------


def _x_spec(geo, dim: int, kv: bool = False):
    """A `[N, dim]` block of one head per program; `kv`: of the query head's kv head (GQA/MQA:
    query head `h` reads kv head `h // group`, no repeat of k/v in memory)."""
    group = geo.group
    if kv and group > 1:
        return pl.BlockSpec(
            (None, geo.n, None, dim), lambda p, h, b: (b, 0, lax.div(h, np.int32(group)), 0)
        )
    return pl.BlockSpec((None, geo.n, None, dim), lambda p, h, b: (b, 0, h, 0))


def _row_spec(geo):
    return pl.BlockSpec((None, geo.n, None), lambda p, h, b: (b, 0, h))


def _head_spec(length: int, per_head: bool):
    """A `[h, length]` operand read whole per head (or the one shared row)."""
    if per_head:
        return pl.BlockSpec((None, length), lambda p, h, b: (h, 0))
    return pl.BlockSpec((None, length), lambda p, h, b: (0, 0))


def _call(kernel, geo, name, in_specs, out_specs, out_shape, grid):
    def build(interpret):
        return pl.pallas_call(
            functools.partial(kernel, geo=geo),
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(
                num_warps=geo.num_warps, num_stages=geo.num_stages
            ),
            interpret=interpret,
            name=name,
        )

    if geo.force_interpret is not None:
        return build(geo.force_interpret)
    # Compiled Triton kernels when lowering for CUDA, interpret mode for any other platform:
    # decided at lowering time (so a CPU host can compile for a GPU target, and vice versa).
    return lambda *args: lax.platform_dependent(*args, cuda=build(False), default=build(True))


def _table_operands(geo: Geometry, rpb_rows, heads: int):
    """The mask/bias table `[h, T]` (float32) and the int32 meta tables `[h, M]` of a query-tile
    kernel, and the dk/dv kernel's window tables `[h, M2]`. Built outside the kernels'
    partitioned op (which may not close over constants) and passed per head like the bias;
    without a bias they are broadcasts of one row."""
    table = bias_table(geo, rpb_rows if geo.has_rpb else None)
    table = jnp.broadcast_to(table, (heads, table.shape[1]))
    meta = np.asarray(tables(geo).meta)
    meta = jnp.broadcast_to(jnp.asarray(meta), (heads, meta.size))
    return table, meta


def _dkv_meta(geo: Geometry, heads: int):
    meta = np.asarray(dkv_tables(geo).meta)
    return jnp.broadcast_to(jnp.asarray(meta), (heads, meta.size))


def _flat_spec(size: int):
    """A 1-D operand read whole by every program. Per-head tables are passed flat (`[h * T]`)
    and the kernel adds the head's offset to its `[rows]` index vectors: a per-head block would
    add it to every score's index (Pallas lowers block offsets elementwise)."""
    return pl.BlockSpec((size,), lambda p, h, b: (0,))


def _table_specs(geo: Geometry, heads: int):
    tab = tables(geo)
    return [_flat_spec(heads * tab.table_len), _head_spec(tab.meta.size, True)]


def _with_group(geo: Geometry, q, k) -> Geometry:
    """The geometry with this shard's GQA group (query heads per kv head) from the shapes."""
    return dataclasses.replace(geo, group=q.shape[2] // k.shape[2])


def _forward_call(geo: Geometry, q, k, v, table, meta):
    b, n, h, dp = q.shape
    geo = _with_group(geo, q, k)
    dv = geo.value_dim
    in_specs = [_x_spec(geo, dp), _x_spec(geo, dp, True), _x_spec(geo, dv, True)]
    out_shapes = [
        jax.ShapeDtypeStruct((b, n, h, dv), q.dtype), jax.ShapeDtypeStruct((b, n, h), jnp.float32)
    ]  # fmt: skip
    out, lse = _call(
        forward_kernel, geo, "na_pallas_fwd", in_specs + _table_specs(geo, h),
        [_x_spec(geo, dv), _row_spec(geo)], out_shapes,
        (geo.programs, h, b),
    )(q, k, v, table.reshape(-1), meta)  # fmt: skip
    return out, lse


def _dq_call(geo: Geometry, q, k, v, table, meta, do, lse, di):
    b, n, h, dp = q.shape
    geo = _with_group(geo, q, k)
    dv = geo.value_dim
    specs = [_x_spec(geo, dp), _x_spec(geo, dp, True), _x_spec(geo, dv, True)]
    specs += _table_specs(geo, h) + [_x_spec(geo, dv), _row_spec(geo), _row_spec(geo)]
    out_specs = [_x_spec(geo, dp)]
    out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if geo.has_rpb:
        eo, ex = geo.drpb_block
        out_specs.append(pl.BlockSpec((None, None, eo, ex), lambda p, h, b: (b, h, p, 0)))
        out_shapes.append(jax.ShapeDtypeStruct((b, h, geo.programs * eo, ex), jnp.float32))
    res = _call(dq_kernel, geo, "na_pallas_dq", specs, out_specs, out_shapes,
                (geo.programs, h, b))(q, k, v, table.reshape(-1), meta, do, lse, di)  # fmt: skip
    return res[0], (res[1] if geo.has_rpb else None)


def _dkv_call(geo: Geometry, q, k, v, rpb_rows, dmeta, do, lse, di):
    """dk, dv on a grid over kv heads: each program reads its group's query heads as one
    `[N, group * D]` block (a free view of `[B, N, h, D]`: a group's heads are adjacent)."""
    b, n, h, dp = q.shape
    hk = k.shape[2]
    geo = _with_group(geo, q, k)
    grp, dv = geo.group, geo.value_dim
    q, do = q.reshape(b, n, hk, grp * dp), do.reshape(b, n, hk, grp * dv)
    if grp > 1:
        lse, di = lse.reshape(b, n, hk, grp), di.reshape(b, n, hk, grp)
        row = pl.BlockSpec((None, n, None, grp), lambda p, h, b: (b, 0, h, 0))
    else:
        row = _row_spec(geo)
    base = [_x_spec(geo, grp * dp), _x_spec(geo, dp), _x_spec(geo, dv)]
    base += [_flat_spec(h * geo.rpb_len)] if geo.has_rpb else []
    specs = base + [_flat_spec(dmeta.size), _x_spec(geo, grp * dv), row, row]
    # The dk/dv kernel reads the bias directly, pre-scaled to log2 units.
    rpb2 = (rpb_rows.astype(jnp.float32).reshape(-1) * LOG2E,) if geo.has_rpb else ()
    args = (q, k, v) + rpb2 + (dmeta.reshape(-1), do, lse, di)
    dk, dv = _call(
        dkv_kernel, geo, "na_pallas_dkv", specs, [_x_spec(geo, dp), _x_spec(geo, dv)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        (geo.programs, hk, b),
    )(*args)  # fmt: skip
    return dk, dv


# --------------------------------------------------------------------------------------------
# Layout + custom VJP.
# --------------------------------------------------------------------------------------------


def _to_rows(x, geo: Geometry, dim: int | None = None):
    """`[B, *S, h, D]` -> `[B, N, h, dim]` (free reshape; zero-pad D to `dim`, by default the
    padded query/key head_dim, only if needed)."""
    b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
    dim = geo.head_dim if dim is None else dim
    x = x.reshape(b, geo.n, h, d)
    if d != dim:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dim - d)))
    return x


def _from_rows(x, shape):
    return x[..., : shape[-1]].reshape(shape)


def _rows_forward(plan: Plan, q, k, v, table, meta):
    return _forward_call(plan.fwd, q, k, v, table, meta)


def _rows_backward(plan: Plan, q, k, v, rpb_rows, table, meta, dmeta, do, lse, di):
    dq, e = _dq_call(plan.dq, q, k, v, table, meta, do, lse, di)
    dk, dv = _dkv_call(plan.dkv, q, k, v, rpb_rows, dmeta, do, lse, di)
    if e is None:  # keep one result structure; a [B, h, 1, 1] zero is free
        e = jnp.zeros((q.shape[0], q.shape[2], 1, 1), jnp.float32)
    return dq, dk, dv, e


def _rpb_operand(rpb, geo: Geometry, heads: int):
    """The bias as `[h, R]`; a `[h, 1]` placeholder without one (keeps the op signature fixed)."""
    if rpb is None:
        return jnp.zeros((heads, 1), jnp.float32)
    return rpb.reshape(rpb.shape[0], geo.rpb_len)


def _na_forward(plan: Plan, q, k, v, rpb):
    kinds = ("x", "kv", "kvv", "rpb", "rpb")
    op = batch_head_parallel(_rows_forward, plan, kinds, ("xv", "row"))
    geo = plan.fwd
    rows = None if rpb is None else _rpb_operand(rpb, geo, q.shape[-2])
    out, lse = op(
        _to_rows(q, geo), _to_rows(k, geo), _to_rows(v, geo, geo.value_dim),
        *_table_operands(geo, rows, q.shape[-2]),
    )  # fmt: skip
    return _from_rows(out, q.shape[:-1] + v.shape[-1:]), lse.reshape(q.shape[:-1])


def _na_bwd(plan: Plan, res, cts):
    q, k, v, rpb, out, lse = res
    d_out, d_lse = cts
    d_out = d_out.astype(q.dtype)
    # delta_i = sum_d dO * O; the lse cotangent enters as ds = p * (dp - delta + dlse).
    di = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    di = di - d_lse.astype(jnp.float32)
    b, h = q.shape[0], q.shape[-2]
    geo = plan.dq
    kinds = ("x", "kv", "kvv", "rpb", "rpb", "rpb", "rpb", "xv", "row", "row")
    op = batch_head_parallel(_rows_backward, plan, kinds, ("x", "kv", "kvv", "drpb"))
    rows = _rpb_operand(rpb, geo, h)
    dv_pad = geo.value_dim
    dq, dk, dv, e = op(
        _to_rows(q, geo), _to_rows(k, geo), _to_rows(v, geo, dv_pad), rows,
        *_table_operands(geo, None if rpb is None else rows, h), _dkv_meta(plan.dkv, h),
        _to_rows(d_out, geo, dv_pad), lse.reshape(b, geo.n, h), di.reshape(b, geo.n, h),
    )  # fmt: skip
    # Explicit meshes: a caller's k/v may be replicated over heads that the kernels split (or
    # the reverse, kv heads not divisible by the head shards); cotangents take the primal's type.
    dq, dk, dv = (match_sharding(_from_rows(g, x.shape), x) for g, x in ((dq, q), (dk, k), (dv, v)))
    drpb = None
    if rpb is not None:
        # Sum the per-batch partials (an all-reduce when the batch is sharded), then map the
        # per-program partials to bias bins.
        drpb = drpb_from_partials(geo, jnp.sum(e, axis=0))
        drpb = drpb.reshape(rpb.shape).astype(rpb.dtype)
    return dq, dk, dv, drpb


_na = na_custom_vjp(_na_forward, _na_bwd)


# --------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------


def unsupported_reason(call: NACall) -> str | None:
    """Why the Pallas kernel cannot run a call, or None when it can.

    Args:
      call: the call's shapes, dtype and window arguments (bias on or off are both supported).

    Returns:
      A human-readable reason, or None.
    """
    shape, dtype, params = call.q_shape, call.dtype, call.params
    if jnp.dtype(dtype).name not in _SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} is not supported (float16, bfloat16, float32)"
    if not 1 <= params.ndim <= 3:
        return f"{params.ndim} spatial axes are not supported (1, 2 or 3)"
    head_dim = shape[-1]
    if head_dim > _MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {_MAX_HEAD_DIM} is not supported"
    if call.value_dim > _MAX_HEAD_DIM:
        return f"value head_dim {call.value_dim} > {_MAX_HEAD_DIM} is not supported"
    if max(params.kernel_size) > _MAX_KERNEL:
        return f"kernel_size {params.kernel_size} has an entry > {_MAX_KERNEL}"
    if math.prod(shape[1:-2]) >= 2**31 // 2:
        return "more than 2**30 spatial positions"
    return None


def na_pallas(
    q, k, v, rpb, params: NAParams, config: NAPallasConfig | NATileConfig | None = None,
    interpret=None,
    check: bool = True,
):  # fmt: skip
    """Fused neighborhood attention (Pallas/Triton; interpret mode off-GPU).

    Args:
      q, k, v: `[batch, *spatial, heads, head_dim]`, float16/bfloat16/float32.
      rpb: `[heads, *(2K-1)]` or None.
      params: validated window arguments.
      config: tiles per kernel (`NAPallasConfig`), one `NATileConfig` for all three, or None
        for `default_config(...)`.
      interpret: force Pallas interpret mode on/off; None = chosen when lowering (compiled
        Triton kernels for `cuda`, interpret mode elsewhere), so a CPU host can compile for a GPU.
      check: False skips `unsupported_reason` (only for `experiments/compile_gate.py
        --ignore-refusals`, which compiles refused calls to re-derive the limits).

    Returns:
      (out in q's dtype, lse `[batch, *spatial, heads]` float32).

    Raises:
      ValueError: if `unsupported_reason` rejects the call or the config does not match it.
    """
    reason = unsupported_reason(NACall.of(q, k, v, rpb, params)) if check else None
    if reason is not None:
        raise ValueError(f"na_pallas: {reason}.")
    if config is None:
        config = default_config(params, q.shape[-1], q.dtype, rpb is not None, v.shape[-1])
    elif isinstance(config, NATileConfig):
        config = NAPallasConfig.same(config)
    if len(config.fwd.block_q) != params.ndim:
        raise ValueError(
            f"na_pallas: `config` tiles must have {params.ndim} entries for a "
            f"{params.ndim}-D call, got {config.fwd.block_q!r}."
        )
    spatial, head_dim, has_rpb = tuple(q.shape[1:-2]), q.shape[-1], rpb is not None
    plan = Plan(*(
        make_geometry(spatial, params, head_dim, has_rpb, c, interpret, v.shape[-1])
        for c in (config.fwd, config.dq, config.dkv)
    ))  # fmt: skip
    plan.dq.check("dq")
    if rpb is not None:
        rpb = rpb.astype(jnp.float32) if rpb.dtype == jnp.float64 else rpb
    return _na(plan, q, k, v, rpb)
