"""Checkpoint conversion: original <-> HF key tables, from_pretrained on every golden format,
bit-exact export round trips, natjax checkpoints, and the errors for bad inputs."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from golden import golden_dir, golden_file
from safetensors.numpy import load_file, save_file

import natjax
from natjax.convert.checkpoint import nnx_flat_state
from natjax.convert.original import hf_to_original, is_original_layout, original_to_hf
from natjax.convert.torch_zip import load_torch_state_dict

# name -> (family, input size used here; the models' own tests cover every size)
# The dense reference attention compiles fastest on CPU; the backends are tested elsewhere. Passing
# it also checks that from_pretrained forwards model keywords.
FAST = {"attention_implementation": "reference"}
GOLDEN = {"nat_rand": ("nat", "64x64"), "dinat_rand": ("dinat", "96x96")}


def assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


# --------------------------------------------------------------------- original key tables
@pytest.mark.parametrize("name", list(GOLDEN))
def test_original_to_hf_and_back_is_exact(name):
    family = GOLDEN[name][0]
    original = load_torch_state_dict(golden_file(name, "original.pth"))
    hf = load_file(str(golden_dir(name) / "model.safetensors"))
    assert is_original_layout(original) and not is_original_layout(hf)
    assert_same_state(original_to_hf(original, family), hf)
    back = hf_to_original(hf)
    assert_same_state(back, original)


def test_original_mapping_reports_missing_and_unexpected():
    original = load_torch_state_dict(golden_file("dinat_rand", "original.pth"))
    broken = dict(original)
    del broken["levels.1.blocks.0.gamma2"]  # its partner gamma1 is then incomplete
    for i in range(7):
        broken[f"aux.extra{i}"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as info:
        original_to_hf(broken, "dinat")
    msg = str(info.value)
    assert "1 missing keys ['levels.1.blocks.0.gamma2']" in msg
    assert "7 unexpected keys" in msg and "aux.extra0" in msg and "(7 in all)" in msg

    bad_qkv = dict(original)
    bad_qkv["levels.0.blocks.0.attn.qkv.bias"] = np.zeros(47, np.float32)
    with pytest.raises(ValueError, match="multiple of 3"):
        original_to_hf(bad_qkv, "dinat")
    with pytest.raises(ValueError, match="model_type='swin'"):
        original_to_hf(original, "swin")


def test_backbone_has_no_original_layout():
    backbone = load_file(str(golden_file("nat_backbone_rand", "model.safetensors")))
    with pytest.raises(ValueError, match=r"8 unexpected keys \['hidden_states_norms"):
        hf_to_original(backbone)


# ------------------------------------------------------------------------------- loading
def _images(name: str, size: str) -> tuple[np.ndarray, np.ndarray]:
    expected = np.load(golden_dir(name) / "expected.npz")
    pixels = np.transpose(expected[f"pixel_values_{size}"], (0, 2, 3, 1))  # NCHW -> NHWC
    return pixels, expected


@nnx.jit
def _logits(model, pixels):
    # Jitted: one compile per architecture and size, shared by every load of the same config
    # (eager op-by-op dispatch of a whole model is much slower on CPU).
    return model(pixels).logits


@nnx.jit
def _feature_maps(model, pixels):
    return model(pixels).feature_maps


def _check_logits(model, name: str) -> None:
    size = GOLDEN[name][1]
    pixels, expected = _images(name, size)
    logits = np.asarray(_logits(model, jnp.asarray(pixels)))
    np.testing.assert_allclose(logits, expected[f"logits_{size}"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(GOLDEN))
@pytest.mark.parametrize("source", ["folder", "pytorch_model.bin", "original.pth"])
def test_from_pretrained_every_golden_format(name, source):
    folder = golden_dir(name)
    if source == "folder":
        model = natjax.from_pretrained(folder, **FAST)
    else:
        model = natjax.from_pretrained(
            golden_file(name, source), config=folder / "config.json", **FAST
        )
    assert type(model).__name__ == "NatForImageClassification"
    _check_logits(model, name)


def test_backbone_formats():
    folder = golden_dir("nat_backbone_rand")
    pixels, expected = _images("nat_backbone_rand", "64x64")
    for model in (
        natjax.from_pretrained(folder, **FAST),
        natjax.from_pretrained(
            golden_file("nat_backbone_rand", "pytorch_model.bin"),
            config=folder / "config.json",
            **FAST,
        ),
    ):
        assert type(model).__name__ == "NatBackbone"
        maps = _feature_maps(model, jnp.asarray(pixels))
        assert len(maps) == 4
        for i, fmap in enumerate(maps):
            want = expected[f"feature_maps_64x64_{i}"]
            np.testing.assert_allclose(np.asarray(fmap), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["nat_rand", "dinat_rand", "nat_backbone_rand"])
def test_export_hf_reproduces_source_bit_exactly(tmp_path, name):
    folder = golden_dir(name)
    model = natjax.from_pretrained(folder)
    natjax.export_pretrained(model, tmp_path / "hf", format="hf")
    assert_same_state(
        load_file(str(tmp_path / "hf" / "model.safetensors")),
        load_file(str(folder / "model.safetensors")),
    )
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    for key in ("architectures", "depths", "num_heads", "embed_dim", "id2label", "out_features"):
        if key in source:  # HF leaves id2label out of backbone configs
            assert exported[key] == source[key], key
    if name != "nat_backbone_rand":
        natjax.export_pretrained(model, tmp_path / "orig", format="original")
        assert_same_state(
            load_torch_state_dict(tmp_path / "orig" / "original.pth"),
            load_torch_state_dict(golden_file(name, "original.pth")),
        )
    else:
        with pytest.raises(ValueError, match="classification model"):
            natjax.export_pretrained(model, tmp_path / "orig", format="original")


def test_natjax_checkpoint_round_trip(tmp_path):
    model = natjax.from_pretrained(golden_dir("dinat_rand"))
    natjax.save_pretrained(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["format"] == "natjax" and meta["architecture"] == "classification"
    again = natjax.from_pretrained(tmp_path / "ckpt", **FAST)
    assert again.config == model.config
    assert_same_state(nnx_flat_state(again), nnx_flat_state(model))
    _check_logits(again, "dinat_rand")
    # The same weights file also loads on its own with a config.
    single = natjax.from_pretrained(
        tmp_path / "ckpt" / "natjax_model.safetensors", config=model.config
    )
    assert_same_state(nnx_flat_state(single), nnx_flat_state(model))


# ------------------------------------------------------------------------------- errors
def test_clear_errors(tmp_path):
    folder = golden_dir("nat_rand")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        natjax.from_pretrained(tmp_path / "nope")
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(folder / "config.json", only_config / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        natjax.from_pretrained(only_config)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(folder / "model.safetensors", lone / "model.safetensors")
    with pytest.raises(ValueError, match="no config.json beside it: pass config="):
        natjax.from_pretrained(lone / "model.safetensors")
    with pytest.raises(ValueError, match="Unknown preset 'nat_huge'"):
        natjax.from_pretrained(folder / "model.safetensors", config="nat_huge")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        natjax.from_pretrained(folder / "model.safetensors", config=tmp_path / "c.json")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        natjax.from_pretrained(junk, config=folder / "config.json")
    with pytest.raises(ValueError, match="format="):
        natjax.export_pretrained(natjax.from_pretrained(folder), tmp_path / "x", format="onnx")


def test_wrong_config_lists_keys_and_shapes(tmp_path):
    folder = golden_dir("nat_rand")
    config = json.loads((folder / "config.json").read_text())
    deeper = tmp_path / "deeper.json"
    deeper.write_text(json.dumps({**config, "depths": [1, 1, 3, 1]}))
    with pytest.raises(ValueError) as info:
        natjax.from_pretrained(folder / "model.safetensors", config=deeper)
    msg = str(info.value)
    assert "missing keys" in msg and "nat.encoder.levels.2.layers.2." in msg

    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**config, "mlp_ratio": 2.0}))
    with pytest.raises(ValueError, match=r"shape mismatches .*intermediate\.dense"):
        natjax.from_pretrained(golden_file("nat_rand", "pytorch_model.bin"), config=wider)

    # A state dict that lost a tensor, saved as safetensors.
    state = load_file(str(folder / "model.safetensors"))
    del state["classifier.bias"]
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    with pytest.raises(ValueError, match=r"1 missing keys \['classifier.bias'\]"):
        natjax.from_pretrained(partial, config=folder / "config.json")

    bad = tmp_path / "bad_natjax"
    natjax.save_pretrained(natjax.from_pretrained(folder), bad)
    meta = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99"):
        natjax.from_pretrained(bad)


def test_architecture_inference_and_prefixed_body(tmp_path):
    backbone = natjax.from_pretrained(golden_dir("nat_backbone_rand"))
    natjax.save_pretrained(backbone, tmp_path / "bb")
    # config= given as an object names no architecture: it comes from the natjax keys.
    again = natjax.from_pretrained(tmp_path / "bb", config=backbone.config)
    assert type(again).__name__ == "NatBackbone"
    assert_same_state(nnx_flat_state(again), nnx_flat_state(backbone))

    # A classification checkpoint's "nat."-prefixed body loads as a bare NatModel.
    state = load_file(str(golden_file("nat_rand", "model.safetensors")))
    body = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    save_file(body, str(tmp_path / "body.safetensors"))
    config = golden_file("nat_rand", "config.json")
    with pytest.raises(ValueError, match=r"2 missing keys \['classifier.bias'"):
        natjax.from_pretrained(tmp_path / "body.safetensors", config=config)  # config.json: head
    model = natjax.from_pretrained(
        tmp_path / "body.safetensors", config=config, architecture="model"
    )
    assert type(model).__name__ == "NatModel"
    np.testing.assert_array_equal(
        np.asarray(model.layernorm.scale.get_value()), state["nat.layernorm.weight"]
    )
