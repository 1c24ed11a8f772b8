"""Hugging Face key mapping (`natjax.convert.hf`): exact round trips on the golden checkpoints and
clear errors for mismatched state dicts. No forward passes here (see test_models.py)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from natjax.convert.hf import hf_to_nnx, key_table, nnx_to_hf
from natjax.convert.hf_config import from_hf_config, kind_from_hf_config
from natjax.models import NatBackbone, NatForImageClassification, NatModel

DATA = Path(__file__).parent / "data" / "models"
CLASSES = {
    "nat_rand": NatForImageClassification,
    "dinat_rand": NatForImageClassification,
    "nat_backbone_rand": NatBackbone,
}


def _abstract(cls, config, **kwargs):
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **kwargs))


def _golden(name):
    config = from_hf_config(DATA / name / "config.json")
    return config, load_file(str(DATA / name / "model.safetensors"))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_round_trip_is_bit_exact(name):
    config, state = _golden(name)
    model = _abstract(CLASSES[name], config)
    assert hf_to_nnx(model, state).missing_keys == ()
    exported = nnx_to_hf(model)
    assert list(exported) == sorted(state)
    for key, tensor in state.items():
        assert exported[key].dtype == tensor.dtype, key
        assert exported[key].shape == tensor.shape, key
        assert exported[key].flags.c_contiguous, key
        np.testing.assert_array_equal(exported[key], tensor, err_msg=key)


def test_golden_prefixes_and_kinds():
    _, nat = _golden("nat_rand")
    _, dinat = _golden("dinat_rand")
    _, backbone = _golden("nat_backbone_rand")
    assert all(k.startswith(("nat.", "classifier.")) for k in nat)
    assert all(k.startswith(("dinat.", "classifier.")) for k in dinat)
    assert all(k.startswith(("embeddings.", "encoder.", "hidden_states_norms.")) for k in backbone)
    assert kind_from_hf_config({"architectures": ["DinatForImageClassification"]}) == (
        "classification"
    )
    assert kind_from_hf_config({"architectures": ["NatBackbone"]}) == "backbone"
    with pytest.raises(ValueError, match="architectures"):
        kind_from_hf_config({"architectures": ["SwinModel"]})


def test_layer_scale_is_split_into_two_vectors():
    config, state = _golden("dinat_rand")
    model = _abstract(NatForImageClassification, config)
    hf_to_nnx(model, state)
    layer = model.nat.encoder.levels[1].layers[0]
    both = state["dinat.encoder.levels.1.layers.0.layer_scale_parameters"]
    np.testing.assert_array_equal(np.asarray(layer.layer_scale_attention.get_value()), both[0])
    np.testing.assert_array_equal(np.asarray(layer.layer_scale_mlp.get_value()), both[1])
    kernel = state["dinat.encoder.levels.1.downsample.reduction.weight"]  # OIHW
    np.testing.assert_array_equal(
        np.asarray(model.nat.encoder.levels[1].downsample.reduction.kernel.get_value()),
        kernel.transpose(2, 3, 1, 0),
    )
    linear = state["dinat.encoder.levels.1.layers.0.intermediate.dense.weight"]  # [out, in]
    np.testing.assert_array_equal(np.asarray(layer.intermediate.kernel.get_value()), linear.T)


def test_missing_and_unexpected_keys_are_listed():
    config, state = _golden("nat_rand")
    model = _abstract(NatForImageClassification, config)
    state = dict(state)
    del state["nat.layernorm.weight"]
    del state["classifier.bias"]
    state["nat.encoder.levels.9.layers.0.attention.self.rpb"] = np.zeros((1, 13, 13), np.float32)
    with pytest.raises(ValueError) as err:
        hf_to_nnx(model, state)
    message = str(err.value)
    assert "2 missing key(s)" in message and "classifier.bias" in message
    assert "1 unexpected key(s)" in message and "levels.9" in message
    # Nothing was written by the failed load: parameters are still abstract.
    assert isinstance(model.nat.layernorm.bias.get_value(), jax.ShapeDtypeStruct)
    result = hf_to_nnx(model, state, strict=False)
    assert result.missing_keys == ("classifier.bias", "nat.layernorm.weight")
    assert result.unexpected_keys == ("nat.encoder.levels.9.layers.0.attention.self.rpb",)


def test_wrong_prefix_and_shape_are_rejected():
    config, state = _golden("nat_rand")
    with pytest.raises(ValueError, match=r"missing key\(s\).*dinat\."):
        hf_to_nnx(_abstract(NatForImageClassification, config.replace(model_type="dinat",
                                                                       dilations=((1,),) * 4,
                                                                       depths=(1, 1, 1, 1))),
                  state)  # fmt: skip
    wrong = config.replace(kernel_size=5)
    with pytest.raises(ValueError, match=r"rpb.*\(1, 13, 13\).*expected \(1, 9, 9\)"):
        hf_to_nnx(_abstract(NatForImageClassification, wrong), state)
    with pytest.raises(ValueError, match="float"):
        bad = dict(state)
        bad["classifier.bias"] = np.arange(10)
        hf_to_nnx(_abstract(NatForImageClassification, config), bad)


def test_half_precision_sources_are_cast_to_param_dtype():
    config, state = _golden("nat_rand")
    half = {k: v.astype(np.float16) for k, v in state.items()}
    model = _abstract(NatForImageClassification, config)
    hf_to_nnx(model, half)
    kernel = model.classifier.kernel.get_value()
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(kernel), state["classifier.weight"].astype(np.float16).T
    )
    bf16 = _abstract(NatForImageClassification, config, param_dtype=jnp.bfloat16)
    hf_to_nnx(bf16, state)
    assert bf16.classifier.kernel.get_value().dtype == jnp.bfloat16
    exported = nnx_to_hf(bf16, dtype=np.float32)
    np.testing.assert_allclose(exported["classifier.weight"], state["classifier.weight"], rtol=1e-2)


def test_base_model_loads_from_classification_checkpoint():
    config, state = _golden("nat_rand")
    trunk = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    model = _abstract(NatModel, config)
    hf_to_nnx(model, trunk)  # "nat." prefix stripped
    exported = nnx_to_hf(model)
    assert set(exported) == {k[len("nat.") :] for k in trunk}
    np.testing.assert_array_equal(exported["layernorm.weight"], state["nat.layernorm.weight"])
    with pytest.raises(ValueError, match=r"2 unexpected key\(s\): classifier"):
        hf_to_nnx(_abstract(NatModel, config), state)


def test_key_table_covers_every_parameter_once():
    config, _ = _golden("dinat_rand")
    model = _abstract(NatForImageClassification, config)
    table = key_table(model)
    paths = [p for entry in table for p in entry.nnx_paths]
    n_params = len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert len(paths) == len(set(paths)) == n_params
    hooks = {entry.hook.name for entry in table}
    assert hooks == {"identity", "linear", "conv", "layer_scale"}
