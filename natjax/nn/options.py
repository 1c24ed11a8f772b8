"""Constructor arguments of the neighborhood-attention modules, validated once for NNX and Linen.

`NAOptions` holds NATTEN 0.17's `NeighborhoodAttention{1,2,3}D` arguments (plus the backend
choice, NATTEN 0.21's `stride` and GQA's `num_kv_heads`) after checking them, and runs the
attention core shared by `natjax.nn` and `natjax.linen`: split heads, `natjax.na{1,2,3}d` with
the bias and scale, merge heads. The projections live in the modules because NNX and Linen
build parameters differently.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import jax

from natjax.ops.na import IMPLEMENTATIONS, na1d, na2d, na3d

_OPS = {1: na1d, 2: na2d, 3: na3d}
IntOrSeq = int | Sequence[int]
BoolOrSeq = bool | Sequence[bool]


def _per_axis(name: str, value, ndim: int, kind: type, owner: str) -> tuple:
    """`value` as one entry per spatial axis (a scalar is repeated), each of type `kind`."""
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if values is None:
        values = (value,) * ndim
    if len(values) != ndim or not all(
        isinstance(v, kind) and (kind is bool or not isinstance(v, bool)) for v in values
    ):
        raise ValueError(
            f"{owner}: `{name}`={value!r}; expected one {kind.__name__} or {ndim} of them "
            "(one per spatial axis)."
        )
    return values


@dataclasses.dataclass(frozen=True)
class NAOptions:
    """Validated arguments of a `NeighborhoodAttention{ndim}D` module.

    Attributes:
      ndim: number of spatial axes (1, 2 or 3).
      dim: model width (input and output channels).
      num_heads: attention heads; `dim` must be divisible by it.
      kernel_size, dilation: per spatial axis (kernel sizes >= 1, odd or even; dilations >= 1;
        the op checks them against the input size at call time).
      is_causal: per spatial axis.
      rel_pos_bias: learn a relative positional bias `[num_heads, 2k-1, ...]`.
      qkv_bias: biases on the query/key/value projections.
      qk_scale: logit scale; None means `head_dim ** -0.5`.
      attn_drop: NATTEN's attention-probability dropout; the fused op never materialises the
        probabilities, so it is not applied (a warning says so, as NATTEN's fused path does).
      proj_drop: dropout on the output projection.
      implementation: `natjax.na*d` backend (None picks the fastest available).
      stride: per spatial axis, `1 <= stride <= kernel_size` (NATTEN 0.21's strided NA).
      num_kv_heads: key/value heads (GQA/MQA); `num_heads` must be a multiple of it.
    """

    ndim: int
    dim: int
    num_heads: int
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    rel_pos_bias: bool
    qkv_bias: bool
    qk_scale: float | None
    attn_drop: float
    proj_drop: float
    implementation: str | None
    stride: tuple[int, ...] = ()
    num_kv_heads: int = 0

    def __post_init__(self):
        # Defaults for direct construction (frozen: through object.__setattr__).
        if not self.stride:
            object.__setattr__(self, "stride", (1,) * self.ndim)
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)

    @classmethod
    def create(
        cls,
        ndim: int,
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
        implementation: str | None = None,
        *,
        stride: IntOrSeq = 1,
        num_kv_heads: int | None = None,
    ) -> NAOptions:
        """Checks every argument; raises one `ValueError` naming the argument otherwise."""
        owner = f"NeighborhoodAttention{ndim}D"
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{owner}: `{name}`={value!r}; expected a positive int.")
        if dim % num_heads:
            raise ValueError(f"{owner}: `dim`={dim} is not divisible by `num_heads`={num_heads}.")
        kernel = _per_axis("kernel_size", kernel_size, ndim, int, owner)
        if any(k < 1 for k in kernel):
            raise ValueError(f"{owner}: `kernel_size`={kernel_size!r}; expected ints >= 1.")
        strides = _per_axis("stride", stride, ndim, int, owner)
        if any(not 1 <= s <= k for s, k in zip(strides, kernel, strict=True)):
            raise ValueError(
                f"{owner}: `stride`={stride!r}; expected ints >= 1 and <= kernel_size={kernel}."
            )
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if (
            not isinstance(kv_heads, int)
            or isinstance(kv_heads, bool)
            or kv_heads <= 0
            or num_heads % kv_heads
        ):
            raise ValueError(
                f"{owner}: `num_kv_heads`={num_kv_heads!r}; expected None or a positive int "
                f"dividing `num_heads`={num_heads}."
            )
        dil = _per_axis("dilation", dilation, ndim, int, owner)
        if any(d < 1 for d in dil):
            raise ValueError(f"{owner}: `dilation`={dilation!r}; expected ints >= 1.")
        causal = _per_axis("is_causal", is_causal, ndim, bool, owner)
        for name, value in (("rel_pos_bias", rel_pos_bias), ("qkv_bias", qkv_bias)):
            if not isinstance(value, bool):
                raise ValueError(f"{owner}: `{name}`={value!r}; expected a bool.")
        if qk_scale is not None and (
            isinstance(qk_scale, bool)
            or not isinstance(qk_scale, int | float)
            or not math.isfinite(qk_scale)
            or qk_scale <= 0
        ):
            raise ValueError(f"{owner}: `qk_scale`={qk_scale!r}; expected None or a number > 0.")
        for name, value in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ValueError(f"{owner}: `{name}`={value!r}; expected a number in [0, 1).")
        if implementation is not None and implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"{owner}: `implementation`={implementation!r}; expected None or one of "
                f"{tuple(IMPLEMENTATIONS)}."
            )
        if attn_drop > 0:
            warnings.warn(
                f"{owner}: attn_drop={attn_drop} is not applied: the fused neighborhood-attention "
                "op never materialises attention probabilities (NATTEN's fused path behaves the "
                "same); proj_drop is applied.",
                stacklevel=3,
            )
        return cls(
            ndim, dim, num_heads, kernel, dil, causal, rel_pos_bias, qkv_bias,
            None if qk_scale is None else float(qk_scale), float(attn_drop), float(proj_drop),
            implementation, strides, kv_heads,
        )  # fmt: skip

    @property
    def name(self) -> str:
        """The module name, for error messages."""
        return f"NeighborhoodAttention{self.ndim}D"

    @property
    def head_dim(self) -> int:
        """Channels per head."""
        return self.dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key/value projections, `num_kv_heads * head_dim`."""
        return self.num_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        """The logit scale (`qk_scale`, else `head_dim ** -0.5`)."""
        return self.head_dim**-0.5 if self.qk_scale is None else self.qk_scale

    @property
    def rpb_shape(self) -> tuple[int, ...]:
        """Shape of the relative positional bias: `[num_heads, 2k-1 per axis]` (NATTEN's)."""
        return (self.num_heads, *(2 * k - 1 for k in self.kernel_size))

    def check_input(self, x: jax.Array) -> None:
        """Raises a `ValueError` unless `x` is `[batch, *spatial, dim]` with `ndim` spatial axes."""
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != self.ndim + 2 or shape[-1] != self.dim:
            raise ValueError(
                f"{self.name}: input must be [batch, {self.ndim} spatial axes, dim={self.dim}] "
                f"(channels-last), got shape {shape}."
            )

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, rpb: jax.Array | None) -> jax.Array:
        """Neighborhood attention over projected queries `[batch, *spatial, dim]` and keys/values
        `[batch, *spatial, kv_dim]`.

        Returns:
          `[batch, *spatial, dim]`, heads merged back (before the output projection).
        """
        split = lambda t: t.reshape(*t.shape[:-1], -1, self.head_dim)  # noqa: E731
        # NATTEN (and HF NAT) scale q before adding the bias: logits = scale * q.k + rpb.
        out = _OPS[self.ndim](
            split(q),
            split(k),
            split(v),
            self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            is_causal=self.is_causal,
            rpb=None if rpb is None else rpb.astype(q.dtype),
            scale=self.scale,
            implementation=self.implementation,
        )
        return out.reshape(*out.shape[:-2], self.dim)
