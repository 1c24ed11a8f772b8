"""`natjax.linen`: native Linen NA modules equal the NNX ones on the same variables; NAT/DiNAT
from Linen (bridge) reproduce the NNX models and the golden Hugging Face logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import natjax
import natjax.linen
import natjax.nn
from tests.test_models import DATA, _close

CASES = [  # (ndim, input shape, module kwargs)
    (1, (2, 13, 16), dict(kernel_size=5, dilation=2, is_causal=True, rel_pos_bias=True)),
    (2, (2, 7, 9, 16), dict(kernel_size=(3, 5), rel_pos_bias=True, qkv_bias=False)),
    (3, (1, 4, 5, 6, 16), dict(kernel_size=3, is_causal=(True, False, False), qk_scale=0.5)),
]


def _equal(a, b):
    # The same ops on the same values: equal up to float32 rounding of fused/unfused kernels.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ndim, shape, kwargs", CASES)
def test_linen_module_equals_nnx(ndim, shape, kwargs):
    kw = dict(dim=16, num_heads=2, implementation="reference", **kwargs)
    nnx_mod = getattr(natjax.nn, f"NeighborhoodAttention{ndim}D")(**kw, rngs=nnx.Rngs(0))
    linen_mod = getattr(natjax.linen, f"NeighborhoodAttention{ndim}D")(**kw)
    x = jax.random.normal(jax.random.key(1), shape)
    params = nnx.state(nnx_mod, nnx.Param).to_pure_dict()
    init = linen_mod.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    _equal(jax.jit(linen_mod.apply)({"params": params}, x), nnx.jit(lambda m, x: m(x))(nnx_mod, x))
    # And the other way: Linen-initialised variables in the NNX module.
    state = nnx.state(nnx_mod, nnx.Param)
    nnx.replace_by_pure_dict(state, init)
    nnx.update(nnx_mod, state)
    _equal(linen_mod.apply({"params": init}, x), nnx_mod(x))


def test_linen_dropout_uses_the_dropout_rng():
    layer = natjax.linen.NeighborhoodAttention2D(8, 2, 3, proj_drop=0.5)
    x = jnp.ones((1, 5, 5, 8))
    variables = layer.init(jax.random.key(0), x)
    train = lambda seed: layer.apply(  # noqa: E731
        variables, x, deterministic=False, rngs={"dropout": jax.random.key(seed)}
    )
    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), layer.apply(variables, x))
    with pytest.raises(ValueError, match="`num_heads`=3"):
        natjax.linen.NeighborhoodAttention2D(8, 3, 3).init(jax.random.key(0), x)


def test_nat_models_from_linen():
    config = natjax.NatConfig(embed_dim=8, depths=(1, 1), num_heads=(1, 2), kernel_size=3,
                              num_labels=3, drop_path_rate=0.5)  # fmt: skip
    kw = dict(attention_implementation="reference")
    model = natjax.NatForImageClassification(config, rngs=nnx.Rngs(0), **kw)
    module, variables = natjax.linen.to_linen(model, **kw)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    apply = jax.jit(module.apply, static_argnames="deterministic")
    _equal(apply(variables, images).logits, nnx.jit(lambda m, x: m(x).logits)(model, images))
    train = lambda seed: (
        apply(  # noqa: E731
            variables, images, deterministic=False, rngs={"dropout": jax.random.key(seed)}
        ).logits
    )
    np.testing.assert_array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(1))
    with pytest.raises(ValueError, match="nnx_method"):
        module.apply(variables, images, nnx_method="embeddings")


def test_pretrained_from_linen_matches_golden():
    module, variables = natjax.linen.from_pretrained(
        DATA / "nat_rand", attention_implementation="reference"
    )
    expected = np.load(DATA / "nat_rand" / "expected.npz")
    images = jnp.asarray(expected["pixel_values_64x64"].transpose(0, 2, 3, 1))
    _close(jax.jit(module.apply)(variables, images).logits, expected["logits_64x64"], "logits")
