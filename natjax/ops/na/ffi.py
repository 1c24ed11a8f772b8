"""Native CPU neighborhood attention through XLA FFI custom calls (the optional `natjax-ffi`).

The kernels are C++ (`ffi/csrc/cpu`, built and installed as the separate `natjax-ffi`
distribution: `pip install ./ffi`, or `make install`). This module loads that library, registers
its two handlers with `jax.ffi.register_ffi_target`, and calls them with `jax.ffi.ffi_call` inside
the shared custom VJP (`vjp.na_custom_vjp`; residuals `q, k, v, rpb, out, lse`).

The C++ side knows no window rule: every rule of `spec.axis_windows` is evaluated here into
per-axis, per-position tables (first key, key count, first bias index, and the inverse
neighborhood: first query and query count per key), passed as FFI attributes. A new window rule
therefore needs no C++ change, as long as each query's keys along an axis are a run with step
`dilation` whose bias index grows by one per key, which `_axis_tables` checks.

Export: a CPU program that uses these kernels contains their FFI custom calls (`FFI_TARGETS`),
which have no compatibility guarantee, so `jax.export` refuses to serialize it by default (its
error names `@natjax_na_fwd`). `export_disabled_checks()` lifts that for these targets; the
exported program then runs only where natjax-ffi is installed and natjax has registered it
(any natjax call with the kernels, or `available()`, does). Programs lowered for GPU/TPU
never contain the calls (`platform.py`).

Sharding and `vmap` go through `partition.batch_head_parallel` (shared with Pallas): under
`jax.jit` with batch/head-sharded inputs each device runs the kernels on its own shard; `vmap`
folds the mapped axis into the heads.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from natjax.ops.na.nonfinite import any_nonfinite, reports_nonfinite, zero_nonfinite
from natjax.ops.na.partition import batch_head_parallel, match_sharding
from natjax.ops.na.spec import NACall, NAParams, axis_windows
from natjax.ops.na.vjp import na_custom_vjp

_INSTALL_HINT = (
    "install the optional native kernels with `pip install ./ffi` from a natjax checkout "
    "(needs a C++17 compiler and CMake; `make install` does it)"
)
# The custom-call targets of the handlers (registered for the CPU platform).
_FWD, _BWD = "natjax_na_fwd", "natjax_na_bwd"
FFI_TARGETS = (_FWD, _BWD)
_SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Packed keys + values of one work unit (a tile's halo) should stay in a core's L2 cache.
_HALO_BUDGET_BYTES = 192 * 1024
_MIN_UNITS = 16  # batch x kv heads x tiles: enough work items to balance the threads


# --------------------------------------------------------------------------------------------
# Library loading.
# --------------------------------------------------------------------------------------------


@functools.cache
def _load() -> str | None:
    """Loads natjax-ffi and registers its CPU handlers; returns None or why it failed."""
    try:
        import natjax_ffi
    except ImportError:
        return f"natjax-ffi is not installed; {_INSTALL_HINT}"
    try:
        lib = natjax_ffi.load()
        for target, symbol in natjax_ffi.CPU_HANDLERS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (OSError, AttributeError, FileNotFoundError) as err:
        return f"natjax-ffi is installed but its library failed to load ({err}); {_INSTALL_HINT}"
    return None


def available() -> bool:
    """Whether the native kernels are installed and loadable."""
    return _load() is None


@functools.cache
def _features() -> frozenset[str]:
    """The optional kernel paths of the loaded library (`natjax_ffi_features`, natjax-ffi >=
    0.2; empty for older builds or without the library)."""
    if _load() is not None:
        return frozenset()
    import ctypes

    import natjax_ffi

    fn = getattr(natjax_ffi.load(), "natjax_ffi_features", None)
    if fn is None:
        return frozenset()
    fn.restype = ctypes.c_char_p
    return frozenset(fn().decode().split())


# Keys of one shared-window unit, transposed, must fit L1 (kBlockHaloBytes in block_fwd.h).
_SHARED_WINDOW_BYTES = 32 * 1024


def takes_shared_window_path(call: NACall) -> bool:
    """Whether the forward runs as dense attention per (batch, head) (`shared_fwd.h`): every
    window is its whole dilation group (`kernel_size * dilation == size` on every axis, none
    causal), float32 accumulation (float16/bfloat16/float32 inputs), keys within the path's L1
    budget, and a build that has the path (AVX2 or AVX-512).

    Args:
      call: the call's description.

    Returns:
      True when the call's forward takes that path.
    """
    params = call.params
    if "shared_window_forward" not in _features() or jnp.dtype(call.dtype) == jnp.float64:
        return False
    if any(params.is_causal):
        return False
    spatial = tuple(call.q_shape[1:-2])
    per_axis = zip(params.kernel_size, params.dilation, spatial, strict=True)
    if any(k * d != n for k, d, n in per_axis):
        return False
    return params.kernel_volume * call.q_shape[-1] * 4 <= _SHARED_WINDOW_BYTES


@functools.cache
def _kernels_read_nonfinite_as_zero() -> bool:
    """Whether the loaded library reads NaN/inf entries of q, k, v as 0 itself (natjax-ffi >=
    0.2 exports `natjax_ffi_reads_nonfinite_as_zero`); older builds get a substituted copy."""
    import natjax_ffi

    return hasattr(natjax_ffi.load(), "natjax_ffi_reads_nonfinite_as_zero")


def export_disabled_checks() -> list:
    """`disabled_checks` for `jax.export.export` of CPU programs that use these kernels.

    `jax.export` only serializes custom calls with a compatibility guarantee; natjax's have none
    (the handlers and their attributes may change between natjax-ffi versions), so exporting a
    CPU program that calls them needs these checks disabled, knowingly: the program must be
    deserialized and run with the same natjax-ffi version, in a process where natjax has
    registered the handlers (`available()`).

    Returns:
      A list of `jax.export.DisabledSafetyCheck`, one per FFI target.
    """
    from jax import export

    return [export.DisabledSafetyCheck.custom_call(target) for target in FFI_TARGETS]


def build_info() -> str:
    """How the installed library was compiled (for benchmark logs), or why it is unavailable."""
    reason = _load()
    if reason is not None:
        return reason
    import natjax_ffi

    return natjax_ffi.build_info()


# --------------------------------------------------------------------------------------------
# Window tables.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AxisTables:
    """Per-position window tables of one axis (see `ffi/csrc/common/geometry.h`)."""

    win_start: np.ndarray
    win_count: np.ndarray
    rpb_start: np.ndarray
    inv_start: np.ndarray
    inv_count: np.ndarray


class _NotRunLike(ValueError):
    """A window rule whose neighborhoods the table format cannot express."""


def _axis_tables(key: np.ndarray, valid: np.ndarray, rpb_index: np.ndarray, dilation: int):
    """Turns `[L, K]` window arrays (as `spec.axis_windows` returns) into run tables.

    Args:
      key, valid, rpb_index: `[L, K]` key position, validity and bias index per offset.
      dilation: key step along the axis.

    Returns:
      An `AxisTables`.

    Raises:
      _NotRunLike: if some query's keys are not a run with step `dilation` and unit bias step.
    """
    length = key.shape[0]
    count = valid.sum(axis=1)
    if np.any(count < 1):
        raise _NotRunLike("a query with an empty window")
    big = np.iinfo(np.int64).max
    masked = np.where(valid, key, big)
    order = np.argsort(masked, axis=1, kind="stable")
    keys_sorted = np.take_along_axis(masked, order, axis=1)
    bias_sorted = np.take_along_axis(rpb_index, order, axis=1)
    start, bias0 = keys_sorted[:, 0], bias_sorted[:, 0]
    t = np.arange(key.shape[1])[None, :]
    inside = t < count[:, None]
    if not np.all(np.where(inside, keys_sorted == start[:, None] + dilation * t, True)):
        raise _NotRunLike("keys of a window are not evenly spaced by the dilation")
    if not np.all(np.where(inside, bias_sorted == bias0[:, None] + t, True)):
        raise _NotRunLike("bias indices of a window do not grow by one per key")
    if np.any((start - np.arange(length)) % dilation):
        raise _NotRunLike("a window leaves its dilation group")
    # Inverse neighborhood: which queries see key j (a run with step `dilation` as well).
    rows = np.broadcast_to(np.arange(length)[:, None], key.shape)[valid]
    cols = key[valid]
    inv_count = np.bincount(cols, minlength=length)
    inv_start = np.full(length, big)
    np.minimum.at(inv_start, cols, rows)
    inv_end = np.full(length, -1)
    np.maximum.at(inv_end, cols, rows)
    seen = inv_count > 0
    if np.any(seen & (inv_end - inv_start != dilation * (inv_count - 1))):
        raise _NotRunLike("the queries that see a key are not a run")
    inv_start = np.where(seen, inv_start, 0)
    return AxisTables(start, count, bias0, inv_start, inv_count)


def _tiles(length: int, dilation: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits each dilation group of an axis into runs of at most `tile` positions."""
    starts, counts = [], []
    for r in range(min(dilation, length)):
        group = (length - r + dilation - 1) // dilation
        for p in range(0, group, tile):
            starts.append(r + dilation * p)
            counts.append(min(tile, group - p))
    return np.asarray(starts, np.int64), np.asarray(counts, np.int64)


@dataclasses.dataclass(frozen=True)
class FFIGeometry:
    """Static description of one call (hashable): padded to 3 axes, plus the tiling.

    Attributes:
      lengths, kernel_size, dilation, is_causal: per axis, leading axes padded with size 1.
      tile: query positions per tile along each axis (in dilation-group coordinates).
      has_rpb: whether a bias is given; scale: factor on `q . k`.
      stride: per axis (NATTEN >= 0.20 strided windows: the tables carry them, the kernels
        need nothing else).
    """

    lengths: tuple[int, int, int]
    kernel_size: tuple[int, int, int]
    dilation: tuple[int, int, int]
    is_causal: tuple[bool, bool, bool]
    tile: tuple[int, int, int]
    has_rpb: bool
    scale: float
    stride: tuple[int, int, int] = (1, 1, 1)

    @property
    def rpb_dims(self) -> tuple[int, int, int]:
        return tuple(2 * k - 1 for k in self.kernel_size)


@functools.lru_cache(maxsize=256)
def _axis(length: int, kernel: int, dilation: int, causal: bool, stride: int = 1) -> AxisTables:
    win = axis_windows(length, kernel, dilation, causal, stride)
    return _axis_tables(win.key, win.valid, win.rpb_index, dilation)


@functools.lru_cache(maxsize=256)
def _attributes(geo: FFIGeometry, backward: bool) -> dict:
    """The FFI attributes (numpy scalars/arrays) of the forward or backward handler."""
    per_axis = zip(geo.lengths, geo.kernel_size, geo.dilation, geo.is_causal, geo.stride,
                   strict=True)  # fmt: skip
    tables = [_axis(*axis) for axis in per_axis]
    tiles = [_tiles(n, d, t) for n, d, t in zip(geo.lengths, geo.dilation, geo.tile, strict=True)]
    cat = lambda name: np.concatenate([getattr(t, name) for t in tables]).astype(np.int64)  # noqa: E731
    attrs = dict(
        lengths=np.asarray(geo.lengths, np.int64),
        dilation=np.asarray(geo.dilation, np.int64),
        rpb_dims=np.asarray(geo.rpb_dims, np.int64),
        win_start=cat("win_start"),
        win_count=cat("win_count"),
        rpb_start=cat("rpb_start"),
        tiles=np.asarray([len(s) for s, _ in tiles], np.int64),
        tile_start=np.concatenate([s for s, _ in tiles]),
        tile_count=np.concatenate([c for _, c in tiles]),
        has_rpb=np.int64(geo.has_rpb),
        scale=np.float64(geo.scale),
    )
    if backward:
        attrs.update(inv_start=cat("inv_start"), inv_count=cat("inv_count"))
    return attrs


def choose_tile(
    lengths: tuple[int, ...],
    windows: tuple[int, ...],
    dilation: tuple[int, ...],
    row_bytes: int,
    batch_kv: int,
) -> tuple[int, ...]:
    """Tile shape (positions per axis, in dilation-group coordinates) for the work units.

    Halves the outermost splittable axis until a tile's key halo (its queries' windows) fits
    `_HALO_BUDGET_BYTES` and there are at least `_MIN_UNITS` units. Depends on shapes only, so a
    call gives the same (deterministic) result on any machine.

    Args:
      lengths, windows, dilation: per axis (3 entries).
      row_bytes: packed bytes of one key + value row.
      batch_kv: batch * kv heads.

    Returns:
      The tile shape.
    """
    groups = [-(-n // d) for n, d in zip(lengths, dilation, strict=True)]
    tile = list(groups)

    def halo() -> int:
        return math.prod(min(t + w - 1, g) for t, w, g in zip(tile, windows, groups, strict=True))

    def units() -> int:
        per_axis = [d * -(-g // t) for d, g, t in zip(dilation, groups, tile, strict=True)]
        return batch_kv * math.prod(per_axis)

    while halo() * row_bytes > _HALO_BUDGET_BYTES or units() < _MIN_UNITS:
        axis = next((a for a in range(3) if tile[a] > 1), None)
        if axis is None:
            break
        tile[axis] = -(-tile[axis] // 2)
    return tuple(tile)


def make_geometry(q_shape, k_shape, v_shape, dtype, params: NAParams, has_rpb: bool) -> FFIGeometry:
    """The static geometry of a call on `[B, *spatial, heads, dim]` inputs."""
    pad = 3 - params.ndim
    lengths = (1,) * pad + tuple(q_shape[1:-2])
    kernel = (1,) * pad + params.kernel_size
    dilation = (1,) * pad + params.dilation
    causal = (False,) * pad + params.is_causal
    stride = (1,) * pad + params.stride
    per_axis = zip(lengths, kernel, dilation, causal, stride, strict=True)
    windows = tuple(int(_axis(*axis).win_count.max()) for axis in per_axis)
    itemsize = _accum(dtype).itemsize
    row_bytes = itemsize * (-(-k_shape[-1] // 8) * 8 + -(-v_shape[-1] // 8) * 8)
    tile = choose_tile(lengths, windows, dilation, row_bytes, q_shape[0] * k_shape[-2])
    return FFIGeometry(
        lengths, kernel, dilation, causal, tile, has_rpb, float(params.scale), stride
    )


# --------------------------------------------------------------------------------------------
# FFI calls on the [B, N, heads, dim] layout, and the custom VJP.
# --------------------------------------------------------------------------------------------


def _accum(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _kernels_report_nonfinite() -> bool:
    """Whether the forward handler returns `seen` (natjax-ffi >= 0.3, "reports_nonfinite")."""
    return "reports_nonfinite" in _features()


def _rows_forward(geo: FFIGeometry, q, k, v, rpb):
    """`(out, lse, seen)`: seen `[B, heads]` int32, nonzero where (b, h) read a NaN/inf."""
    b, n, h, _ = q.shape
    out_types = [
        jax.ShapeDtypeStruct((b, n, h, v.shape[-1]), q.dtype),
        jax.ShapeDtypeStruct((b, n, h), _accum(q.dtype)),
    ]
    if not _kernels_report_nonfinite():  # older library: na_ffi_reporting checks the inputs
        outs = jax.ffi.ffi_call(_FWD, tuple(out_types))(q, k, v, rpb, **_attributes(geo, False))
        return (*outs, jnp.zeros((b, h), jnp.int32))
    out_types.append(jax.ShapeDtypeStruct((b, h), jnp.int32))
    return jax.ffi.ffi_call(_FWD, tuple(out_types))(q, k, v, rpb, **_attributes(geo, False))


def _rows_backward(geo: FFIGeometry, q, k, v, rpb, out, d_out, lse, d_lse):
    b, _, h, _ = q.shape
    out_types = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct((b, h, rpb.shape[1], 1), _accum(q.dtype)),
    )
    call = jax.ffi.ffi_call(_BWD, out_types)
    return call(q, k, v, rpb, out, d_out, lse, d_lse, **_attributes(geo, True))


def _rows(x):
    """`[B, *S, heads, dim]` -> `[B, N, heads, dim]` (a free reshape)."""
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])


def _rpb_operand(rpb, heads: int, dtype):
    """The bias as `[heads, R]` in the accumulation dtype; `[heads, 1]` zeros without one."""
    if rpb is None:
        return jnp.zeros((heads, 1), dtype)
    return rpb.reshape(heads, -1).astype(dtype)


def _na_forward(geo: FFIGeometry, q, k, v, rpb):
    """`(out, lse, seen)`; seen `[batch, heads]` int32 (not differentiated)."""
    op = batch_head_parallel(_rows_forward, geo, ("x", "kv", "kvv", "rpb"), ("xv", "row", "flag"))
    heads = q.shape[-2]
    out, lse, seen = op(_rows(q), _rows(k), _rows(v), _rpb_operand(rpb, heads, _accum(q.dtype)))
    return out.reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1]), seen


def _na_backward(geo: FFIGeometry, res, cts):
    q, k, v, rpb, out, lse = res
    d_out, d_lse = cts
    acc = _accum(q.dtype)
    heads = q.shape[-2]
    op = batch_head_parallel(
        _rows_backward, geo, ("x", "kv", "kvv", "rpb", "xv", "xv", "row", "row"),
        ("x", "kv", "kvv", "drpb"),
    )  # fmt: skip
    rows = lambda x: x.reshape(x.shape[0], -1, heads)  # noqa: E731
    dq, dk, dv, drpb = op(
        _rows(q), _rows(k), _rows(v), _rpb_operand(rpb, heads, acc), _rows(out),
        _rows(d_out.astype(q.dtype)), rows(lse), rows(d_lse.astype(acc)),
    )  # fmt: skip
    # A cotangent has its primal's sharding (heads may have run unsplit: partition.py).
    dq, dk, dv = (match_sharding(g.reshape(x.shape), x) for g, x in ((dq, q), (dk, k), (dv, v)))
    # Per-batch partials summed here (an all-reduce when the batch is sharded).
    if rpb is not None:
        drpb = _reshape_keeping_heads(jnp.sum(drpb, axis=0), rpb.shape).astype(rpb.dtype)
    return dq, dk, dv, drpb if rpb is not None else None


def _reshape_keeping_heads(x, shape):
    """Reshapes `[heads, ...]`, keeping the head axis's sharding: on explicit-axes meshes JAX
    asks for the output sharding of a reshape that splits an axis."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return x.reshape(shape)
    spec = P(tuple(sharding.spec)[0], *([None] * (len(shape) - 1)))
    return jax.lax.reshape(x, shape, out_sharding=NamedSharding(mesh, spec))


_na = na_custom_vjp(_na_forward, _na_backward)


# --------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------


def unsupported_reason(call: NACall) -> str | None:
    """Why the native kernels cannot run a call, or None when they can.

    Args:
      call: the call's shapes, dtype and window arguments (bias on or off are both supported).

    Returns:
      A human-readable reason, or None.
    """
    shape, dtype, params = call.q_shape, call.dtype, call.params
    reason = _load()
    if reason is not None:
        return reason
    if jnp.dtype(dtype).name not in _SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} is not supported ({', '.join(_SUPPORTED_DTYPES)})"
    if not 1 <= params.ndim <= 3:
        return f"{params.ndim} spatial axes are not supported (1, 2 or 3)"
    spatial = tuple(shape[1:-2])
    if math.prod(spatial) >= 2**31:
        return "2**31 or more spatial positions"
    try:
        for axis in zip(spatial, params.kernel_size, params.dilation, params.is_causal,
                        params.stride, strict=True):  # fmt: skip
            _axis(*axis)
    except _NotRunLike as err:
        return f"the window rule cannot be expressed as run tables ({err})"
    return None


def na_ffi_reporting(q, k, v, rpb, params: NAParams):
    """`na_ffi` that also says whether the kernels read a NaN/inf input entry.

    Args and Raises as `na_ffi`.

    Returns:
      (out, lse, seen): `out` and `lse` as `na_ffi`; `seen` a boolean scalar, True when some
      query row or some key/value row of a neighborhood holds a NaN/inf (what
      `nonfinite.confine_nonfinite` needs to know; the kernels record it while loading).
    """
    reason = unsupported_reason(NACall.of(q, k, v, rpb, params))
    if reason is not None:
        raise ValueError(f"implementation='ffi' cannot run this call: {reason}.")
    geo = make_geometry(q.shape, k.shape, v.shape, q.dtype, params, rpb is not None)
    if not _kernels_report_nonfinite():  # natjax-ffi < 0.3: check the raw inputs here
        seen = any_nonfinite(q, k, v)
        if not _kernels_read_nonfinite_as_zero():
            q, k, v = zero_nonfinite(q), zero_nonfinite(k), zero_nonfinite(v)
        return (*_na(geo, q, k, v, rpb)[:2], seen)
    out, lse, seen = _na(geo, q, k, v, rpb)
    return out, lse, jnp.any(seen != 0)


@reports_nonfinite(na_ffi_reporting)
def na_ffi(q, k, v, rpb, params: NAParams):
    """Neighborhood attention with the native CPU kernels (`natjax-ffi`).

    Every NaN/inf entry of `q`, `k` and `v` is read as 0 (forward and backward; the
    substitution's derivative is the identity), which is what the op's NaN/inf confinement
    (`nonfinite.py`) runs its backends on: it passes this backend the raw inputs. The kernels
    do it while loading, without a copy, and record whether they met one
    (`na_ffi_reporting`, which the confinement calls); a library older than natjax-ffi 0.2
    gets a zero-substituted copy instead.

    Args:
      q: `[batch, *spatial, heads, head_dim]`; k: `[batch, *spatial, kv_heads, head_dim]`;
        v: `[batch, *spatial, kv_heads, value_dim]`, with `heads % kv_heads == 0`;
        float16/bfloat16/float32/float64.
      rpb: `[heads, *(2K-1)]` or None.
      params: validated window arguments.

    Returns:
      (out `[batch, *spatial, heads, value_dim]` in q's dtype, lse `[batch, *spatial, heads]`
      float32, float64 for float64 inputs).

    Raises:
      ValueError: if natjax-ffi is not installed or `unsupported_reason` rejects the call.
    """
    out, lse, _ = na_ffi_reporting(q, k, v, rpb, params)
    return out, lse
