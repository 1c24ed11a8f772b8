"""Per-platform choices of the neighborhood-attention op, made when the program is lowered.

`jax.default_backend()` at trace time describes the host, not the target: a program exported
(`jax.export`) or compiled ahead of time for a GPU or TPU from a CPU host would get the CPU
choices. Everything here uses `jax.lax.platform_dependent`, whose branches are all traced but of
which only the lowering platform's branch is lowered and compiled:

  * `na_xla` (`implementation="xla"`): the band formulation (`xla.py`, fastest on CPU) on CPU,
    the blocked-halo formulation (`xla_tiled.py`) on GPU and TPU. Both share one custom VJP with
    the residual contract of `vjp.py` (`q, k, v, rpb, out, lse`), so the forward and the backward
    each pick their platform's half and nothing is differentiated through a conditional.
  * `na_default` (`implementation=None`): on CPU the native kernels (`ffi.py`, when natjax-ffi
    is installed and supports the call) where they were measured faster, else dense attention
    for small maps (measured faster) and the band path otherwise; on CUDA the Pallas kernel when
    it supports the call, else the tiled path; elsewhere the tiled path.

Programs exported for CPU (`jax.export`) with the native kernels contain their FFI custom calls,
which have no compatibility guarantee: `jax.export` refuses them unless told otherwise with
`natjax.ops.na.ffi.export_disabled_checks()`. Only the lowering platform's branch is lowered, so
programs exported or compiled for GPU/TPU never contain them.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax

from natjax.ops.na import xla as band
from natjax.ops.na import xla_tiled
from natjax.ops.na.nonfinite import any_nonfinite, reports_nonfinite, with_zeroed_inputs
from natjax.ops.na.spec import NACall, NAParams
from natjax.ops.na.vjp import na_custom_vjp

# On CPU, dense attention over a small map beats the neighborhood path's fixed costs:
# experiments/bench_na.py measured dense 3x faster at 14x14 (N=196, kernel 7), equal at 7x7 and
# 2x slower at 28x28 (N=784). Below this size and this ratio to the kernel volume, None -> dense.
DENSE_MAX_TOKENS = 256
DENSE_MAX_TOKENS_PER_KERNEL_ELEMENT = 8
_warned: set[str] = set()


def cpu_prefers_dense(spatial: tuple[int, ...], params: NAParams) -> bool:
    """Whether `implementation=None` uses dense attention on CPU for this map."""
    n = math.prod(spatial)
    return n <= DENSE_MAX_TOKENS and n <= DENSE_MAX_TOKENS_PER_KERNEL_ELEMENT * params.kernel_volume


# On CPU the native kernels (natjax-ffi, when installed) beat xla and dense on every case of
# `python experiments/bench_ffi.py --repeats 5 --skip-model` (batch 8, float32, forward and
# forward+backward, 2-17x) but where one window covers (nearly) all of its dilation group:
# there the attention is dense and XLA's matmuls win. Measured on the 2-core VM (load ~2-3,
# matmul 67 GFLOP/s in the same run): 7x7 map with kernel 7 (NAT's last stage; window = 100%
# of the map) forward ffi 4.09 ms vs xla 2.86 ms (1.64 vs 0.88 idle); DiNAT's dilation 8 at
# 56x56 (7x7 groups, 100%) 0.83x xla idle; 8x8 with kernel 7 (77%) ffi still wins, 0.92 vs
# dense 1.47 ms forward, 1.87 vs 2.34 ms forward+backward. Above this fraction dense/xla stay,
# except where every window is its whole group and the library has the shared-window forward
# (`ffi.takes_shared_window_path`: dense micro-kernels per (batch, head)). With it, same script
# (`--cases 2d-7x7-h16,2d-56x56-h2-d8 --repeats 9`, load 4.4, matmul 92 GFLOP/s): 7x7 kernel 7
# forward ffi 2.70 vs xla 3.18 ms (1.18x; 1.26x in an earlier run at load 4.8), forward+backward
# 1.82x; dilation 8 at 56x56 forward 2.10x, forward+backward 1.80x. Whole-map windows of other
# shapes, batch 8 float32 (interleaved medians of 21, load 3.6-4.3): 1-D 9/kernel 9 1.01x
# (a tie: call overhead), 1-D 64/64 1.70x, 8x8/8 1.41x, 14x14/14 1.54x, 4x4x4/4 1.24x.
FFI_MAX_WINDOW_FRACTION = 0.8


def cpu_choice(call: NACall) -> str:
    """The CPU backend of `implementation=None`: "ffi", "reference" (dense), "xla" (band) or
    "xla_tiled" (calls the band formulation does not take, see `xla.supports`).

    Args:
      call: the call's description.

    Returns:
      The backend name.
    """
    spatial, params = call.spatial, call.params
    group = math.prod(-(-n // d) for n, d in zip(spatial, params.dilation, strict=True))
    from natjax.ops.na import ffi

    if ffi.unsupported_reason(call) is None and (
        params.kernel_volume <= FFI_MAX_WINDOW_FRACTION * group
        or ffi.takes_shared_window_path(call)
    ):
        return "ffi"
    if cpu_prefers_dense(spatial, params):
        return "reference"
    return "xla" if band.supports(call) else "xla_tiled"


def _forward(static, q, k, v, rpb, training: bool = True):
    params, tiles = static
    return jax.lax.platform_dependent(
        q, k, v, rpb,
        cpu=lambda *a: band._forward(params, *a),
        default=lambda *a: xla_tiled._forward((params, tiles), *a, training=training),
    )  # fmt: skip


def _backward(static, res, cts):
    params, tiles = static
    return jax.lax.platform_dependent(
        res, cts,
        cpu=lambda r, c: band._backward(params, r, c),
        default=lambda r, c: xla_tiled._backward((params, tiles), r, c),
    )  # fmt: skip


_na = na_custom_vjp(_forward, _backward, primal=functools.partial(_forward, training=False))


def _tiles(q, params: NAParams) -> tuple[int, ...]:
    spatial = tuple(q.shape[1:-2])
    return xla_tiled.choose_tiles(spatial, params, q.shape[-1], q.dtype.itemsize)


def na_xla(q, k, v, rpb, params: NAParams):
    """`implementation="xla"`: band formulation on CPU, blocked-halo tiles on GPU/TPU.

    Args:
      q, k, v: `[batch, *spatial, heads, head_dim]`; rpb: `[heads, *(2K-1)]` or None;
      params: validated window arguments.

    Returns:
      (out in q's dtype, lse `[batch, *spatial, heads]` float32 / float64).
    """
    if not band.supports(NACall.of(q, k, v, rpb, params)):
        return xla_tiled.na_xla_tiled(q, k, v, rpb, params)  # the tiled path on every platform
    return _na((params, _tiles(q, params)), q, k, v, rpb)


def _pallas_or_tiled(call: NACall):
    """The CUDA branch of `na_default`: Pallas (compiled, not interpreted) when supported."""
    params = call.params
    try:
        from natjax.ops.na import pallas_triton

        reason = pallas_triton.unsupported_reason(call)
    except ImportError as err:  # Pallas/Triton missing from this jaxlib build.
        reason = f"Pallas is unavailable ({err})"
    if reason is None:
        return functools.partial(pallas_triton.na_pallas, params=params, interpret=False)
    # Warn only where the program will run on a GPU (the branch is traced on every host).
    if reason not in _warned and jax.default_backend() == "gpu":
        _warned.add(reason)
        warnings.warn(
            f"natjax: falling back to the 'xla' neighborhood attention: {reason}", stacklevel=5
        )
    return functools.partial(xla_tiled.na_xla_tiled, params=params)


def _checked(fn):
    """A branch without in-kernel substitution: run on zero-substituted inputs, and report
    whether the inputs held a NaN/inf (the check `confine_nonfinite` makes for other backends)."""

    def run(q, k, v, rpb):
        out, lse = with_zeroed_inputs(fn)(q, k, v, rpb)
        return out, lse, any_nonfinite(q, k, v)

    return run


def na_default_reporting(q, k, v, rpb, params: NAParams):
    """`na_default`, plus whether a NaN/inf was read (`nonfinite.reports_nonfinite`): from the
    native kernels on CPU, from a finiteness check in every other branch.

    Args as `na_xla`.

    Returns:
      (out, lse, seen), `seen` a boolean scalar.
    """
    from natjax.ops.na.reference import na_reference

    call = NACall.of(q, k, v, rpb, params)
    choice = cpu_choice(call)
    if choice == "ffi":
        from natjax.ops.na.ffi import na_ffi_reporting

        cpu = functools.partial(na_ffi_reporting, params=params)
    elif choice == "reference":
        cpu = _checked(functools.partial(na_reference, params=params))
    elif choice == "xla":
        cpu = _checked(functools.partial(band.na_xla, params=params))
    else:
        cpu = _checked(functools.partial(xla_tiled.na_xla_tiled, params=params))
    return jax.lax.platform_dependent(
        q, k, v, rpb,
        cpu=cpu,
        cuda=_checked(_pallas_or_tiled(call)),
        default=_checked(functools.partial(xla_tiled.na_xla_tiled, params=params)),
    )  # fmt: skip


@reports_nonfinite(na_default_reporting)
def na_default(q, k, v, rpb, params: NAParams):
    """`implementation=None`: the fastest implementation of the lowering platform.

    NaN/inf inputs: read as 0 (what `nonfinite.confine_nonfinite` asks of a marked backend) by
    the native kernels on CPU, by a zero substitution in front of every other branch, which is
    then the only one that pays for it (`na_default_reporting` also says whether one was read).

    Args and Returns as `na_xla`.
    """
    out, lse, _ = na_default_reporting(q, k, v, rpb, params)
    return out, lse
