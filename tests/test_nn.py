"""`natjax.nn.NeighborhoodAttention1D/2D/3D` (NNX): NATTEN's arguments, the computation they
stand for (projections around `natjax.na*d`), dropout, argument errors, the NAT layers' use of
them and the runnable examples of docs/nn.md.

Forwards use the "reference" backend (the spec; backends are covered by tests/test_na_*.py).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import natjax
from natjax.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

DOCS = Path(__file__).parent.parent / "docs" / "nn.md"
# NATTEN 0.17 `NeighborhoodAttention{1,2,3}D.__init__` defaults.
NATTEN_DEFAULTS = dict(dilation=1, is_causal=False, rel_pos_bias=False, qkv_bias=True,
                       qk_scale=None, attn_drop=0.0, proj_drop=0.0)  # fmt: skip
CASES = [  # (class, op, input shape, kernel, dilation, causal)
    (NeighborhoodAttention1D, natjax.na1d, (2, 11, 8), 5, 2, True),
    (NeighborhoodAttention2D, natjax.na2d, (1, 7, 9, 8), (3, 5), (2, 1), (False, True)),
    (NeighborhoodAttention3D, natjax.na3d, (1, 4, 5, 6, 8), 3, 1, False),
]


def test_constructor_matches_natten():
    for cls in (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D):
        params = inspect.signature(cls.__init__).parameters
        names = list(params)[1:11]
        assert names == ["dim", "num_heads", "kernel_size", *NATTEN_DEFAULTS]
        assert {k: params[k].default for k in NATTEN_DEFAULTS} == NATTEN_DEFAULTS
        for extra in ("rngs", "dtype", "param_dtype", "implementation"):
            assert params[extra].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("cls, op, shape, kernel, dilation, causal", CASES)
def test_module_is_projections_around_the_op(cls, op, shape, kernel, dilation, causal):
    dim, heads = shape[-1], 2
    module = cls(dim, heads, kernel, dilation, causal, rel_pos_bias=True, qk_scale=0.3,
                 rngs=nnx.Rngs(0), implementation="reference")  # fmt: skip
    kernels = np.broadcast_to(kernel, len(shape) - 2)
    assert module.rpb.shape == (heads, *(2 * k - 1 for k in kernels))
    x = jax.random.normal(jax.random.key(1), shape)
    split = lambda t: t.reshape(*shape[:-1], heads, dim // heads)  # noqa: E731
    expected = op(split(module.query(x)), split(module.key(x)), split(module.value(x)), kernel,
                  dilation=dilation, is_causal=causal, rpb=module.rpb[...], scale=0.3,
                  implementation="reference")  # fmt: skip
    expected = module.output(expected.reshape(shape))
    np.testing.assert_allclose(module(x), expected, rtol=1e-6, atol=1e-6)


def test_optional_parameters_dropout_and_dtypes():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 16))
    plain = NeighborhoodAttention2D(16, 4, 3, qkv_bias=False, rngs=nnx.Rngs(0))
    assert plain.rpb is None and plain.query.bias is None and plain.output.bias is not None
    half = NeighborhoodAttention2D(16, 4, 3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert half(x).dtype == jnp.bfloat16 and half.query.kernel.dtype == jnp.float32
    drop = NeighborhoodAttention2D(16, 4, 3, proj_drop=0.5, rngs=nnx.Rngs(0))
    eval_out = drop(x)
    np.testing.assert_array_equal(drop(x), eval_out)  # no key: deterministic
    a, b = drop(x, jax.random.key(1)), drop(x, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(a, eval_out) and not np.allclose(a, b)
    assert np.mean(np.asarray(a) == 0) == pytest.approx(0.5, abs=0.05)
    with pytest.warns(UserWarning, match="attn_drop=0.1 is not applied"):
        NeighborhoodAttention2D(16, 4, 3, attn_drop=0.1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=10, num_heads=4), "not divisible by `num_heads`"),
        (dict(kernel_size=0), "`kernel_size`=0; expected ints >= 1"),
        (dict(stride=4), "`stride`=4; expected ints >= 1 and <= kernel_size"),
        (dict(num_kv_heads=3), "`num_kv_heads`=3; expected None or a positive int dividing"),
        (dict(kernel_size=(3, 3, 3)), "`kernel_size`.*one per spatial axis"),
        (dict(dilation=0), "`dilation`=0"),
        (dict(is_causal=1), "`is_causal`=1"),
        (dict(qk_scale=float("nan")), "`qk_scale`=nan"),
        (dict(proj_drop=1.0), "`proj_drop`=1.0"),
        (dict(implementation="cuda"), "`implementation`='cuda'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(dim=8, num_heads=2, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        NeighborhoodAttention2D(**args, rngs=nnx.Rngs(0))


def test_stride_and_gqa_pass_through_to_the_op():
    """`stride` and `num_kv_heads` reach `natjax.na2d`: the module equals the op on its own
    projections (key/value projections of num_kv_heads * head_dim channels)."""
    m = NeighborhoodAttention2D(16, 4, 4, stride=2, num_kv_heads=2, rel_pos_bias=True,
                                rngs=nnx.Rngs(0))  # fmt: skip
    assert m.key.kernel.shape == (16, 8) and m.value.kernel.shape == (16, 8)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, 8, 16)), jnp.float32)
    split = lambda t: t.reshape(*t.shape[:-1], -1, 4)  # noqa: E731
    want = natjax.na2d(split(m.query(x)), split(m.key(x)), split(m.value(x)), 4, stride=2,
                       rpb=m.rpb.get_value(), implementation="reference")  # fmt: skip
    want = m.output(want.reshape(1, 9, 8, 16))
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_bad_input_shape():
    module = NeighborhoodAttention2D(8, 2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, 2 spatial axes, dim=8\]"):
        module(jnp.ones((1, 5, 5, 4)))
    with pytest.raises(ValueError, match="kernel_size"):
        module(jnp.ones((1, 2, 5, 8)))  # the op: window larger than the map


def test_nat_layers_use_the_module():
    config = natjax.NatConfig(embed_dim=8, depths=(1, 1), num_heads=(1, 2), kernel_size=3)
    model = natjax.NatModel(config, rngs=nnx.Rngs(0))
    attn = model.encoder.levels[1].layers[0].attention
    assert isinstance(attn, NeighborhoodAttention2D)
    assert attn.options.rel_pos_bias and attn.options.num_heads == 2
    assert float(jnp.abs(attn.rpb[...]).max()) == 0.0  # HF initialisation: zero bias


def _examples(section: str) -> str:
    text = DOCS.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)[0]


@pytest.mark.parametrize("section", ["NNX", "Linen", "NAT / DiNAT from Linen"])
def test_docs_examples_run(section):
    exec(compile(_examples(section), f"docs/nn.md ({section})", "exec"), {})
