"""NAT / DiNAT models: `NatModel`, `NatForImageClassification`, `NatBackbone` (Flax NNX).

One set of classes serves both families; `config.model_type` / `config.dilations` select DiNAT.
The attribute tree mirrors Hugging Face module names so that `natjax.convert.hf` is a readable
key table:

    NatForImageClassification.nat = NatModel, .classifier           (HF "nat."/"dinat." prefix)
    NatModel.embeddings.patch_embeddings.projection_{0,1}, .embeddings.norm
            .encoder.levels[i].layers[j].{layernorm_before, attention.{query,key,value,rpb,output},
                                          layernorm_after, intermediate, output,
                                          layer_scale_attention, layer_scale_mlp}
            .encoder.levels[i].downsample.{reduction, norm}, .layernorm
    NatBackbone.embeddings, .encoder, .hidden_states_norms[stage]   (no prefix, no layernorm)

Calling convention (all three): `model(images, output_hidden_states=False, deterministic=True,
rngs=None)` with channels-last `images` `[B, H, W, num_channels]` of any size. Training mode
(`deterministic=False`) needs `rngs` (an `nnx.Rngs` with a "dropout" stream, or a PRNG key) when
any dropout or drop-path rate is non-zero.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from natjax.models.config import NatConfig
from natjax.models.layers import TORCH_LAYER_NORM_EPS, Dtype, Embeddings, NatEncoder, layer_norm
from natjax.models.outputs import BackboneOutput, NatImageClassifierOutput, NatModelOutput
from natjax.models.pretrained import PretrainedMixin

RngsLike = nnx.Rngs | jax.Array | None


class InitKeys:
    """Parameter-initialisation keys for building one model: `params()` is `fold_in(base, i)`.

    Why not pass the caller's `nnx.Rngs` down to every layer: an `nnx.Rngs` stream counts its
    draws in a JAX array, and under tracing (`nnx.eval_shape`, `jax.jit` init) every draw asks
    the traced count for its `.sharding`; the AttributeError JAX raises for that scans the whole
    jaxpr traced so far to build its message. With ~16 draws per layer, building took time
    quadratic in depth (flax 0.12 / jax 0.10: 4.2 / 13 / 31 s for 10 / 20 / 40 layers under
    `nnx.eval_shape`). Here the count is a Python int, so a draw is one `fold_in` equation.

    Args:
      rngs: the caller's `nnx.Rngs`; one key is drawn from its "params" stream (or "default").
    """

    def __init__(self, rngs: nnx.Rngs) -> None:
        if not isinstance(rngs, nnx.Rngs):
            raise ValueError(
                f"`rngs` must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__}."
            )
        self._base = rngs.params()
        self._count = 0

    def params(self) -> jax.Array:
        """The next parameter key."""
        self._count += 1
        return jax.random.fold_in(self._base, self._count)


def _check_config(config: NatConfig) -> None:
    if not isinstance(config, NatConfig):
        raise ValueError(f"`config` must be a NatConfig, got {type(config).__name__}.")
    if config.attention_probs_dropout_prob > 0:
        warnings.warn(
            "natjax: attention_probs_dropout_prob > 0 drops the attention output projection only; "
            "the fused neighborhood-attention op does not drop attention probabilities.",
            stacklevel=_caller_stacklevel(),
        )


# Frames in these folders are construction plumbing (ours and flax's metaclass), not the caller.
_PLUMBING = (os.path.dirname(__file__), os.path.dirname(flax.__file__))


def _caller_stacklevel() -> int:
    """The `warnings.warn` stacklevel (for a warning raised by our caller) of the first frame
    outside natjax.models and flax: the user's `NatModel(...)` line, however deeply nested."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PLUMBING):
        frame, level = frame.f_back, level + 1
    return level


def _init_keys(rngs: nnx.Rngs | InitKeys) -> InitKeys:
    return rngs if isinstance(rngs, InitKeys) else InitKeys(rngs)


def _check_images(images: jax.Array, config: NatConfig, name: str) -> None:
    if hasattr(images, "dtype") and not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"{name}: `images` has dtype {images.dtype}; the model takes normalised float images. "
            "Convert raw (e.g. uint8) images with natjax.preprocess(images, model) (resize, "
            "centre crop, ImageNet mean/std as the checkpoint expects)."
        )
    if not hasattr(images, "shape") or images.ndim != 4:
        raise ValueError(
            f"{name}: `images` must be [batch, height, width, channels] (channels-last), got "
            f"shape {getattr(images, 'shape', type(images).__name__)}."
        )
    if images.shape[-1] != config.num_channels:
        raise ValueError(
            f"{name}: `images` has {images.shape[-1]} channels in its last axis, expected "
            f"config.num_channels={config.num_channels} (inputs are channels-last [B, H, W, C]; "
            "transpose NCHW arrays with x.transpose(0, 2, 3, 1))."
        )


def _uses_randomness(config: NatConfig) -> bool:
    return (
        config.hidden_dropout_prob > 0
        or config.attention_probs_dropout_prob > 0
        or config.drop_path_rate > 0
    )


def _dropout_keys(
    config: NatConfig, num_layers: int, deterministic: bool, rngs: RngsLike, name: str
) -> tuple[jax.Array | None, list[jax.Array | None]]:
    """One key for the embedding dropout and one per layer, or all None when deterministic."""
    if deterministic or not _uses_randomness(config):
        return None, [None] * num_layers
    if rngs is None:
        raise ValueError(
            f"{name}: `rngs` is required with deterministic=False (dropout/drop-path are active); "
            "pass rngs=nnx.Rngs(dropout=seed) or a jax.random key."
        )
    if isinstance(rngs, nnx.Rngs):
        if "dropout" not in rngs and "default" not in rngs:
            raise ValueError(
                f"{name}: `rngs` has no 'dropout' stream (needed with deterministic=False); "
                "pass rngs=nnx.Rngs(dropout=seed) or a jax.random key."
            )
        key = rngs.dropout()
    else:
        key = rngs
    keys = list(jax.random.split(key, num_layers + 1))
    return keys[0], keys[1:]


def _reshape(states: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return tuple(jnp.transpose(s, (0, 3, 1, 2)) for s in states)


def _feature_channels(config: NatConfig) -> tuple[int, ...]:
    """Channels of the embedding output ("stem") and of each stage, in `stage_names` order."""
    return (config.embed_dim,) + tuple(config.stage_dim(i) for i in range(config.num_stages))


@dataclasses.dataclass(frozen=True)
class _Build:
    """The constructor keywords every model class takes, resolved once (see `_NatModule`)."""

    dtype: Dtype
    param_dtype: Dtype
    keys: InitKeys
    attention_implementation: str | None
    remat: bool

    @property
    def layer_kw(self) -> dict:
        """`dtype`, `param_dtype` and `rngs` for the submodules."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.keys)

    @property
    def model_kw(self) -> dict:
        """All constructor keywords, for a nested model class (the classifier's trunk)."""
        return dict(
            rngs=self.keys,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_implementation=self.attention_implementation,
            remat=self.remat,
        )


class _NatModule(PretrainedMixin, nnx.Module):
    """The constructor shared by the three model classes (arguments: see `NatModel`).

    It resolves the keywords once (`_Build`); each class builds its parts in `_build`.
    """

    def __init__(
        self,
        config: NatConfig,
        *,
        rngs: nnx.Rngs | InitKeys,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        attention_implementation: str | None = None,
        remat: bool = False,
    ):
        keys = _init_keys(rngs)
        self._build(config, _Build(dtype, param_dtype, keys, attention_implementation, remat))

    def _build(self, config: NatConfig, build: _Build) -> None:
        raise NotImplementedError(type(self).__name__)


def _build_trunk(trunk: NatModel | NatBackbone, config: NatConfig, build: _Build) -> None:
    """Sets `trunk.config`, `.embeddings` and `.encoder` (shared by NatModel and NatBackbone)."""
    _check_config(config)
    trunk.config = config
    kw = build.layer_kw
    trunk.embeddings = Embeddings(
        config.num_channels, config.embed_dim, config.hidden_dropout_prob, **kw
    )
    trunk.encoder = NatEncoder(
        config,
        attention_implementation=build.attention_implementation,
        remat=build.remat,
        **kw,
    )


def _embed_and_encode(
    trunk: NatModel | NatBackbone, images: jax.Array, deterministic: bool, rngs: RngsLike
) -> tuple[jax.Array, tuple[jax.Array, list[jax.Array], list[jax.Array]]]:
    """Checks `images`, runs `trunk.embeddings` then `trunk.encoder`.

    Returns:
      The embedding output and the encoder's (output, per-stage outputs after downsampling,
      per-stage outputs before downsampling).
    """
    name = type(trunk).__name__
    _check_images(images, trunk.config, name)
    embed_key, keys = _dropout_keys(
        trunk.config, trunk.encoder.num_layers, deterministic, rngs, name
    )
    x = trunk.embeddings(images, embed_key)
    return x, trunk.encoder(x, keys)


class NatModel(_NatModule):
    """NAT/DiNAT trunk: embeddings, encoder, final LayerNorm and mean pooling (HF `NatModel`).

    Args:
      config: the architecture.
      rngs: parameter initialisation streams.
      dtype: computation dtype (e.g. `jnp.bfloat16`); LayerNorm statistics stay float32.
      param_dtype: parameter storage dtype.
      attention_implementation: passed to `natjax.na2d` (None picks the fastest available).
      remat: recompute each NA layer's activations in the backward pass (`nnx.remat`).
    """

    architecture = "model"

    def _build(self, config: NatConfig, build: _Build) -> None:
        _build_trunk(self, config, build)
        self.layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, **build.layer_kw)

    def __call__(
        self,
        images: jax.Array,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        rngs: RngsLike = None,
    ) -> NatModelOutput:
        """Runs the trunk.

        Args:
          images: `[B, H, W, num_channels]`, any `H, W`.
          output_hidden_states: also return every stage's output.
          deterministic: False enables dropout and stochastic depth.
          rngs: randomness for training mode (`nnx.Rngs` with "dropout", or a key).

        Returns:
          A `NatModelOutput`.
        """
        x, (last, after, _) = _embed_and_encode(self, images, deterministic, rngs)
        last = self.layernorm(last)
        pooled = jnp.mean(last, axis=(1, 2))
        hidden = reshaped = None
        if output_hidden_states:
            hidden = (x, *after)
            reshaped = _reshape(hidden)
        return NatModelOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=hidden,
            reshaped_hidden_states=reshaped,
        )


class NatForImageClassification(_NatModule):
    """`NatModel` plus a linear classifier on the pooled features (HF `NatForImageClassification`).

    Args: as `NatModel`; the head has `config.num_labels` outputs (none when 0).
    """

    architecture = "classification"

    def _build(self, config: NatConfig, build: _Build) -> None:
        self.nat = NatModel(config, **build.model_kw)
        classifier = None
        if config.num_labels > 0:
            classifier = nnx.Linear(
                config.hidden_size,
                config.num_labels,
                kernel_init=nnx.with_partitioning(
                    nnx.initializers.normal(0.02), ("embed", "classes"), eager_sharding=False
                ),
                bias_init=nnx.with_partitioning(
                    nnx.initializers.zeros_init(), ("classes",), eager_sharding=False
                ),
                **build.layer_kw,
            )
        self.classifier = nnx.data(classifier)

    @property
    def config(self) -> NatConfig:
        """The architecture (stored once, on the trunk)."""
        return self.nat.config

    def __call__(
        self,
        images: jax.Array,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        rngs: RngsLike = None,
    ) -> NatImageClassifierOutput:
        """Classifies `images` `[B, H, W, C]`; see `NatModel.__call__` for the arguments."""
        out = self.nat(images, output_hidden_states, deterministic, rngs)
        logits = out.pooler_output
        if self.classifier is not None:
            logits = self.classifier(logits)
        return NatImageClassifierOutput(
            logits=logits,
            last_hidden_state=out.last_hidden_state,
            pooler_output=out.pooler_output,
            hidden_states=out.hidden_states,
            reshaped_hidden_states=out.reshaped_hidden_states,
        )


class NatBackbone(_NatModule):
    """Multi-scale features for detection/segmentation (HF `NatBackbone`).

    Each stage named in `config.out_features` ("stem", "stage1", ...) contributes its output before
    downsampling, normalised by its own LayerNorm `hidden_states_norms[stage]`.

    Args: as `NatModel`.
    """

    architecture = "backbone"

    def _build(self, config: NatConfig, build: _Build) -> None:
        _build_trunk(self, config, build)
        channels = _feature_channels(config)
        self.hidden_states_norms = nnx.Dict(
            {
                name: layer_norm(channels[index], TORCH_LAYER_NORM_EPS, **build.layer_kw)
                for name, index in zip(config.out_features, config.out_indices, strict=True)
            }
        )

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of each feature map, in `config.out_features` order."""
        dims = _feature_channels(self.config)
        return tuple(dims[i] for i in self.config.out_indices)

    def __call__(
        self,
        images: jax.Array,
        output_hidden_states: bool = False,
        deterministic: bool = True,
        rngs: RngsLike = None,
    ) -> BackboneOutput:
        """Feature maps of `images` `[B, H, W, C]`; see `NatModel.__call__` for the arguments."""
        x, (_, _, before) = _embed_and_encode(self, images, deterministic, rngs)
        states = (x, *before)
        maps = tuple(
            jnp.transpose(self.hidden_states_norms[name](states[index]), (0, 3, 1, 2))
            for name, index in zip(self.config.out_features, self.config.out_indices, strict=True)
        )
        return BackboneOutput(
            feature_maps=maps, hidden_states=states if output_hidden_states else None
        )


MODEL_CLASSES = {
    "model": NatModel,
    "classification": NatForImageClassification,
    "backbone": NatBackbone,
}


def count_params(config: NatConfig, kind: str = "classification") -> int:
    """Number of parameters of a model, computed abstractly (`nnx.eval_shape`, no allocation).

    Args:
      config: the architecture.
      kind: "model", "classification" or "backbone".

    Returns:
      The total number of scalar parameters.
    """
    if kind not in MODEL_CLASSES:
        raise ValueError(f"count_params: `kind`={kind!r}; expected one of {tuple(MODEL_CLASSES)}.")
    cls = MODEL_CLASSES[kind]
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    return int(sum(leaf.size for leaf in leaves))
