"""NAT/DiNAT building blocks as Flax NNX modules (embeddings, NA layer, stage, encoder).

Semantics follow Hugging Face transformers 4.52 `modeling_nat.py` / `modeling_dinat.py`, which
reproduce the original SHI-Labs code (NAT arXiv 2204.07143 sec. 3, DiNAT arXiv 2209.15001 sec. 3):

* tokenizer: two 3x3 stride-2 convolutions with padding 1 (no activation between), LayerNorm;
* layer: pre-norm neighborhood attention and MLP, each branch optionally multiplied by a learnable
  layer-scale vector and passed through stochastic depth before the residual add;
* a map smaller than `kernel_size * dilation` is zero-padded right/bottom after `layernorm_before`
  (before q/k/v) and the attention output cropped back;
* downsampler: 3x3 stride-2 convolution with padding 1, no bias, LayerNorm.

Images and activations are channels-last `[batch, height, width, channels]`. No module holds RNG
state: dropout and stochastic depth draw from a key passed at call time, so a model built with
`nnx.eval_shape` holds nothing but parameters.

Parameters carry logical sharding names (`out_sharding` metadata, never applied eagerly):
"embed" (model width), "heads" (attention projection width / heads), "mlp" (MLP hidden width),
"classes" (classifier outputs); conv kernels shard only their output channels ("embed").
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from natjax.models.config import NatConfig
from natjax.nn import NeighborhoodAttention2D
from natjax.nn.dropout import drop_path, dropout

# Hugging Face `_init_weights`: normal(0, initializer_range=0.02) for Linear and Conv2d weights,
# zero biases and relative positional biases, LayerNorm ones/zeros.
INIT_STD = 0.02
# Hugging Face builds the embedding, downsampler and backbone LayerNorms with PyTorch's default
# eps, independent of `config.layer_norm_eps`.
TORCH_LAYER_NORM_EPS = 1e-5

Dtype = jnp.dtype | type


def _kernel_init(names: tuple[str | None, ...]):
    return nnx.with_partitioning(nnx.initializers.normal(INIT_STD), names, eager_sharding=False)


def _zeros_init(names: tuple[str | None, ...]):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), names, eager_sharding=False)


def linear(
    din: int,
    dout: int,
    names: tuple[str, str],
    *,
    use_bias: bool = True,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """`nnx.Linear` with HF initialisation and logical sharding names `(in, out)`."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_kernel_init(names),
        bias_init=_zeros_init((names[1],)),
        rngs=rngs,
    )


def layer_norm(
    dim: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
) -> nnx.LayerNorm:
    """PyTorch-exact LayerNorm: two-pass variance (`use_fast_variance=False`), given eps."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(
            nnx.initializers.ones_init(), ("embed",), eager_sharding=False
        ),
        bias_init=_zeros_init(("embed",)),
        rngs=rngs,
    )


def conv3x3_s2(
    din: int, dout: int, *, use_bias: bool, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
) -> nnx.Conv:
    """3x3 stride-2 convolution with explicit padding 1 (PyTorch `padding=1`, not 'SAME')."""
    return nnx.Conv(
        din,
        dout,
        kernel_size=(3, 3),
        strides=(2, 2),
        padding=((1, 1), (1, 1)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_kernel_init((None, None, None, "embed")),
        bias_init=_zeros_init(("embed",)),
        rngs=rngs,
    )


def activation(name: str, x: jax.Array) -> jax.Array:
    """The MLP activation named by `config.hidden_act` (HF `ACT2FN` semantics)."""
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)  # exact erf GELU, as torch.nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    if name in ("silu", "swish"):
        return jax.nn.silu(x)
    raise ValueError(f"activation: unknown `hidden_act` {name!r}.")


class PatchEmbeddings(nnx.Module):
    """Overlapping tokenizer: two 3x3 stride-2 convs (HF `projection.0` / `projection.1`)."""

    def __init__(
        self, num_channels: int, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
    ):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.projection_0 = conv3x3_s2(num_channels, dim // 2, **kw)
        self.projection_1 = conv3x3_s2(dim // 2, dim, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.projection_1(self.projection_0(images))


class Embeddings(nnx.Module):
    """Patch embeddings, LayerNorm, dropout (HF `NatEmbeddings`)."""

    def __init__(
        self,
        num_channels: int,
        dim: int,
        dropout_rate: float,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.patch_embeddings = PatchEmbeddings(
            num_channels, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.norm = layer_norm(
            dim, TORCH_LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dropout_rate = dropout_rate

    def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return dropout(self.norm(self.patch_embeddings(images)), self.dropout_rate, key)


class Downsampler(nnx.Module):
    """3x3 stride-2 conv (no bias) doubling the channels, then LayerNorm (HF `NatDownsampler`)."""

    def __init__(self, dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.reduction = conv3x3_s2(
            dim, 2 * dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.norm = layer_norm(
            2 * dim, TORCH_LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.reduction(x))


class NatLayer(nnx.Module):
    """One pre-norm NA transformer layer (HF `NatLayer` / `DinatLayer`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int,
        *,
        mlp_ratio: float,
        qkv_bias: bool,
        hidden_act: str,
        layer_norm_eps: float,
        layer_scale_init_value: float,
        drop_path_rate: float,
        hidden_dropout_prob: float,
        attention_probs_dropout_prob: float,
        implementation: str | None,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
        num_kv_heads: int | None = None,
        stride: int = 1,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = int(mlp_ratio * dim)
        self.layernorm_before = layer_norm(dim, layer_norm_eps, **kw)
        # HF drops attention probabilities *and* the output projection with the same rate; the
        # fused op exposes no probabilities, so only the projection is dropped (a warning at
        # model construction says so). HF initialises the bias to zeros.
        self.attention = NeighborhoodAttention2D(
            dim,
            num_heads,
            kernel_size,
            dilation,
            rel_pos_bias=True,
            qkv_bias=qkv_bias,
            proj_drop=attention_probs_dropout_prob,
            implementation=implementation,
            rpb_init=None,
            stride=stride,
            num_kv_heads=num_kv_heads,
            **kw,
        )
        self.layernorm_after = layer_norm(dim, layer_norm_eps, **kw)
        self.intermediate = linear(dim, hidden, ("embed", "mlp"), **kw)
        self.output = linear(hidden, dim, ("mlp", "embed"), **kw)
        if layer_scale_init_value > 0:
            scale = lambda: nnx.Param(  # noqa: E731
                jnp.full((dim,), layer_scale_init_value, param_dtype),
                out_sharding=("embed",),
                eager_sharding=False,
            )
            self.layer_scale_attention = scale()
            self.layer_scale_mlp = scale()
        else:
            self.layer_scale_attention = None
            self.layer_scale_mlp = None
        # Static: a map smaller than this is zero-padded before attention (HF `maybe_pad`).
        self.window_size = kernel_size * dilation
        self.hidden_act = hidden_act
        self.drop_path_rate = drop_path_rate
        self.hidden_dropout_prob = hidden_dropout_prob

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          x: `[batch, height, width, dim]`.
          key: PRNG key for dropout / stochastic depth; None means deterministic.

        Returns:
          `[batch, height, width, dim]`.
        """
        keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
        _, height, width, _ = x.shape
        h = self.layernorm_before(x)
        pad_b = max(0, self.window_size - height)
        pad_r = max(0, self.window_size - width)
        if pad_b or pad_r:
            h = jnp.pad(h, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        h = self.attention(h, keys[0])[:, :height, :width, :]
        if self.layer_scale_attention is not None:
            h = h * self.layer_scale_attention.get_value().astype(h.dtype)
        x = x + drop_path(h, self.drop_path_rate, keys[1])
        h = activation(self.hidden_act, self.intermediate(self.layernorm_after(x)))
        h = dropout(self.output(h), self.hidden_dropout_prob, keys[2])
        if self.layer_scale_mlp is not None:
            h = h * self.layer_scale_mlp.get_value().astype(h.dtype)
        return x + drop_path(h, self.drop_path_rate, keys[3])


def _layer_forward(layer: NatLayer, x: jax.Array, key: jax.Array | None) -> jax.Array:
    return layer(x, key)


# Rematerialised layer call: activations inside the layer are recomputed in the backward pass.
_remat_layer_forward = nnx.remat(_layer_forward)


class NatStage(nnx.Module):
    """`depth` NA layers then an optional downsampler (HF `NatStage` / `DinatStage`)."""

    def __init__(self, layers: Sequence[NatLayer], downsample: Downsampler | None, remat: bool):
        self.layers = nnx.List(layers)
        self.downsample = downsample
        self.remat = remat

    def __call__(
        self, x: jax.Array, keys: Sequence[jax.Array | None]
    ) -> tuple[jax.Array, jax.Array]:
        """Returns `(output after downsampling, output before downsampling)`."""
        forward = _remat_layer_forward if self.remat else _layer_forward
        for layer, key in zip(self.layers, keys, strict=True):
            x = forward(layer, x, key)
        before = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, before


class NatEncoder(nnx.Module):
    """All stages (HF `NatEncoder`: `levels[i].layers[j]`, `levels[i].downsample`)."""

    def __init__(
        self,
        config: NatConfig,
        *,
        attention_implementation: str | None,
        remat: bool,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        rates = config.drop_path_rates()
        levels = []
        index = 0
        for stage in range(config.num_stages):
            dim = config.stage_dim(stage)
            layers = []
            for dilation in config.stage_dilations(stage):
                layers.append(
                    NatLayer(
                        dim,
                        config.num_heads[stage],
                        config.kernel_size,
                        dilation,
                        mlp_ratio=config.mlp_ratio,
                        qkv_bias=config.qkv_bias,
                        hidden_act=config.hidden_act,
                        layer_norm_eps=config.layer_norm_eps,
                        layer_scale_init_value=config.layer_scale_init_value,
                        drop_path_rate=rates[index],
                        hidden_dropout_prob=config.hidden_dropout_prob,
                        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
                        implementation=attention_implementation,
                        dtype=dtype,
                        param_dtype=param_dtype,
                        rngs=rngs,
                        num_kv_heads=None
                        if config.num_kv_heads is None
                        else config.num_kv_heads[stage],
                        stride=config.stride,
                    )
                )
                index += 1
            downsample = None
            if stage < config.num_stages - 1:
                downsample = Downsampler(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            levels.append(NatStage(layers, downsample, remat))
        self.levels = nnx.List(levels)

    @property
    def num_layers(self) -> int:
        """Total number of NA layers (one dropout key each)."""
        return sum(len(level.layers) for level in self.levels)

    def __call__(
        self, x: jax.Array, keys: Sequence[jax.Array | None]
    ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
        """Runs every stage.

        Args:
          x: embeddings `[batch, h, w, embed_dim]`.
          keys: one PRNG key (or None) per layer, in order.

        Returns:
          The final output, the per-stage outputs after downsampling and before downsampling.
        """
        after, before = [], []
        start = 0
        for level in self.levels:
            n = len(level.layers)
            x, pre = level(x, keys[start : start + n])
            start += n
            after.append(x)
            before.append(pre)
        return x, after, before
