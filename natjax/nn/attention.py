"""`NeighborhoodAttention1D/2D/3D` as Flax NNX modules with NATTEN 0.17's constructor arguments.

NATTEN's `natten.NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=1,
is_causal=False, rel_pos_bias=False, qkv_bias=True, qk_scale=None, attn_drop=0.0,
proj_drop=0.0)`, channels-last input `[batch, *spatial, dim]`, plus NNX's `rngs`, `dtype`,
`param_dtype`, the backend choice `implementation`, and NATTEN 0.21's `stride` and GQA/MQA's
`num_kv_heads` (key/value projections of `num_kv_heads * head_dim` channels).

Parameters use the layout of every published NAT/DiNAT checkpoint (Hugging Face's): separate
`query`, `key`, `value` projections (NATTEN fuses them into one `qkv`), `rpb` with NATTEN's shape
`[num_heads, 2k-1, ...]`, and `output` (NATTEN's `proj`). `natjax.linen` has the same tree, so
the variables of one load into the other unchanged.

Randomness: no RNG state is stored. Pass `key=` (a PRNG key) or `rngs=` (an `nnx.Rngs` with a
"dropout" stream) at call time to apply `proj_drop`; without either the call is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from natjax.nn.dropout import dropout
from natjax.nn.options import BoolOrSeq, IntOrSeq, NAOptions

Dtype = jnp.dtype | type
Initializer = Callable[..., jax.Array]

# NATTEN initialises the bias with trunc_normal(std=0.02, a=-2, b=2); Hugging Face's NAT
# `_init_weights` uses normal(0.02) projections with zero biases.
DEFAULT_KERNEL_INIT = nnx.initializers.normal(0.02)
DEFAULT_RPB_INIT = nnx.initializers.truncated_normal(0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)


def _sharded(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
    # Logical axis names for mesh sharding rules; applied by the training code, never eagerly.
    return nnx.with_partitioning(init, names, eager_sharding=False)


class _NeighborhoodAttention(nnx.Module):
    """Shared implementation; use `NeighborhoodAttention1D/2D/3D`."""

    ndim: int = 0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: IntOrSeq,
        dilation: IntOrSeq = 1,
        is_causal: BoolOrSeq = False,
        rel_pos_bias: bool = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        implementation: str | None = None,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        rpb_init: Initializer | None = DEFAULT_RPB_INIT,
        stride: IntOrSeq = 1,
        num_kv_heads: int | None = None,
    ):
        """Builds the projections and (with `rel_pos_bias`) the bias.

        Args:
          dim, num_heads, kernel_size, dilation, is_causal, rel_pos_bias, qkv_bias, qk_scale,
            attn_drop, proj_drop: NATTEN's arguments (see `natjax.nn.options.NAOptions`);
            `kernel_size`, `dilation` and `is_causal` take one value or one per axis.
          rngs: parameter initialisation streams.
          dtype: computation dtype; param_dtype: parameter storage dtype.
          implementation: `natjax.na*d` backend (None: the fastest available).
          kernel_init: initialiser of the projection kernels (biases start at zero).
          rpb_init: initialiser of the bias; None gives zeros without drawing a random key
            (Hugging Face's NAT initialisation).
          stride: one value or one per axis, `1 <= stride <= kernel_size` (strided NA).
          num_kv_heads: key/value heads for GQA/MQA (None: `num_heads`).
        """
        self.options = NAOptions.create(
            self.ndim, dim, num_heads, kernel_size, dilation, is_causal, rel_pos_bias,
            qkv_bias, qk_scale, attn_drop, proj_drop, implementation, stride=stride,
            num_kv_heads=num_kv_heads,
        )  # fmt: skip

        def linear(use_bias: bool, names: tuple[str, str], out: int = dim) -> nnx.Linear:
            return nnx.Linear(
                dim, out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                kernel_init=_sharded(kernel_init, names),
                bias_init=_sharded(nnx.initializers.zeros_init(), (names[1],)), rngs=rngs,
            )  # fmt: skip

        self.query = linear(qkv_bias, ("embed", "heads"))
        self.key = linear(qkv_bias, ("embed", "heads"), self.options.kv_dim)
        self.value = linear(qkv_bias, ("embed", "heads"), self.options.kv_dim)
        rpb = None
        if rel_pos_bias:
            shape = self.options.rpb_shape
            value = (
                jnp.zeros(shape, param_dtype)
                if rpb_init is None
                else rpb_init(rngs.params(), shape, param_dtype)
            )
            rpb = nnx.Param(
                value, out_sharding=("heads",) + (None,) * self.ndim, eager_sharding=False
            )
        self.rpb = nnx.data(rpb)
        self.output = linear(True, ("heads", "embed"))

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Applies neighborhood attention.

        Args:
          x: `[batch, *spatial, dim]` (channels-last).
          key: PRNG key for `proj_drop`; None (and no `rngs`) is deterministic.
          rngs: alternatively an `nnx.Rngs` with a "dropout" stream.

        Returns:
          `[batch, *spatial, dim]`.
        """
        opts = self.options
        opts.check_input(x)
        if key is None and rngs is not None and opts.proj_drop > 0:
            key = rngs.dropout()
        rpb = None if self.rpb is None else self.rpb.get_value()
        out = opts.attend(self.query(x), self.key(x), self.value(x), rpb)
        return dropout(self.output(out), opts.proj_drop, key)


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention over `[batch, length, dim]` (NATTEN's arguments)."""

    ndim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention over `[batch, height, width, dim]` (NATTEN's arguments)."""

    ndim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention over `[batch, depth, height, width, dim]` (NATTEN's arguments)."""

    ndim = 3
