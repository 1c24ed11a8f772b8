"""`NeighborhoodAttention1D/2D/3D` as native Flax Linen modules (the twins of `natjax.nn`).

Same constructor arguments and defaults as NATTEN 0.17 and `natjax.nn` (as Linen fields), same
parameter tree (`query`, `key`, `value`: `{kernel, bias}`; `rpb`; `output`), so
`nnx.state(nnx_module, nnx.Param)` converted with `to_pure_dict()` is a valid `{"params": ...}`
for these modules and both give identical outputs (tested).

Dropout: `proj_drop` is applied when called with `deterministic=False`, drawing from the
"dropout" RNG collection (`module.apply(..., rngs={"dropout": key})`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from natjax.nn.attention import DEFAULT_KERNEL_INIT, DEFAULT_RPB_INIT
from natjax.nn.dropout import dropout
from natjax.nn.options import NAOptions


class _NeighborhoodAttention(nn.Module):
    """Shared implementation; use `NeighborhoodAttention1D/2D/3D`.

    Attributes: as `natjax.nn.NeighborhoodAttention2D`'s arguments (`kernel_size`, `stride`,
    `dilation`, `is_causal`: one value or one per axis; `num_kv_heads` for GQA/MQA);
    `rpb_init=None` gives a zero bias.
    """

    dim: int
    num_heads: int
    kernel_size: int | Sequence[int]
    dilation: int | Sequence[int] = 1
    is_causal: bool | Sequence[bool] = False
    rel_pos_bias: bool = False
    qkv_bias: bool = True
    qk_scale: float | None = None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    kernel_init: Callable[..., jax.Array] = DEFAULT_KERNEL_INIT
    rpb_init: Callable[..., jax.Array] | None = DEFAULT_RPB_INIT
    stride: int | Sequence[int] = 1
    num_kv_heads: int | None = None

    ndim = 0  # set by the subclasses (a plain class attribute, not a dataclass field)

    def _options(self) -> NAOptions:
        return NAOptions.create(
            self.ndim, self.dim, self.num_heads, self.kernel_size, self.dilation,
            self.is_causal, self.rel_pos_bias, self.qkv_bias, self.qk_scale, self.attn_drop,
            self.proj_drop, self.implementation, stride=self.stride,
            num_kv_heads=self.num_kv_heads,
        )  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Applies neighborhood attention.

        Args:
          x: `[batch, *spatial, dim]` (channels-last).
          deterministic: False applies `proj_drop` with the "dropout" RNG.

        Returns:
          `[batch, *spatial, dim]`.
        """
        opts = self._options()
        opts.check_input(x)

        def dense(name: str, use_bias: bool, features: int = self.dim) -> nn.Dense:
            return nn.Dense(
                features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=self.kernel_init, bias_init=nn.initializers.zeros_init(), name=name,
            )  # fmt: skip

        q = dense("query", self.qkv_bias)(x)
        k = dense("key", self.qkv_bias, opts.kv_dim)(x)
        v = dense("value", self.qkv_bias, opts.kv_dim)(x)
        rpb = None
        if self.rel_pos_bias:
            init = self.rpb_init or (lambda _, shape, dtype: jnp.zeros(shape, dtype))
            rpb = self.param("rpb", init, opts.rpb_shape, self.param_dtype)
        out = dense("output", True)(opts.attend(q, k, v, rpb))
        key = None
        if not deterministic and opts.proj_drop > 0:
            key = self.make_rng("dropout")
        return dropout(out, opts.proj_drop, key)


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention over `[batch, length, dim]` (Linen)."""

    ndim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention over `[batch, height, width, dim]` (Linen)."""

    ndim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention over `[batch, depth, height, width, dim]` (Linen)."""

    ndim = 3
