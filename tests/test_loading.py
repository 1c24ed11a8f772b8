"""Loading as users of Hugging Face and timm expect: hub ids (through a local cache, never the
network), `create_model`, fresh and dropped heads, `ignore_mismatched_sizes`, the class methods,
a weights file next to its config.json, ModelOutput access, integer-image errors and the
ImageNet-1k class names."""

from __future__ import annotations

import hashlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from golden import golden_dir

import natjax
from natjax.convert import hub, zoo
from natjax.convert.checkpoint import nnx_flat_state
from natjax.models.labels import imagenet1k_labels, label_name

REPO = "shi-labs/nat-rand"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def golden():
    """The golden classification model and its weights as natjax paths."""
    model = natjax.from_pretrained(golden_dir("nat_rand"))
    return model, nnx_flat_state(model)


def _hub_cache(root, files=("config.json", "model.safetensors"), commit=COMMIT, ref="main"):
    """A Hugging Face hub cache folder holding REPO at `commit` (as huggingface_hub lays it out)."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(golden_dir("nat_rand") / name, snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return root


def _trunk(state):
    return {k: v for k, v in state.items() if k.startswith("nat/")}


def _same(got, want):
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ------------------------------------------------------------------------------------ hub ids
def test_hub_id_offline_from_the_cache(tmp_path, monkeypatch, golden):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = _hub_cache(tmp_path / "cache")
    _same(nnx_flat_state(natjax.from_pretrained(REPO, cache_dir=cache)), golden[1])
    # revision=: a tag and a commit, here a snapshot holding only the torch file.
    other = "fedcba9876543210fedcba9876543210fedcba98"
    _hub_cache(tmp_path / "cache2", ("config.json", "pytorch_model.bin"), other, "v1")
    for revision in ("v1", other):
        model = natjax.from_pretrained(REPO, revision=revision, cache_dir=tmp_path / "cache2")
        _same(nnx_flat_state(model), golden[1])


def test_hub_id_without_network_or_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        natjax.from_pretrained(REPO, cache_dir=tmp_path / "empty")
    message = str(info.value)
    assert REPO in message and "HF_HUB_OFFLINE is set" in message and "Download it once" in message
    with pytest.raises(FileNotFoundError, match="has none of model.safetensors"):
        natjax.from_pretrained(REPO, cache_dir=_hub_cache(tmp_path / "c", ("config.json",)))
    with pytest.raises(FileNotFoundError, match="not a local path; hub ids look like"):
        natjax.from_pretrained(tmp_path / "a" / "b" / "c")


def test_create_model(tmp_path, monkeypatch, golden):
    small = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), drop_path_rate=0.0)
    model = natjax.create_model("nat_mini", num_labels=7, rngs=nnx.Rngs(1), **small)
    assert model.config.num_labels == 7 and model.config.drop_path_rate == 0.0
    assert model.config.kernel_size == 7 and model.classifier.kernel.shape == (128, 7)
    backbone = natjax.create_model("dinat_mini", architecture="backbone", **small,
                                   dilations=((1,), (1,), (1,), (1,)))  # fmt: skip
    assert type(backbone) is natjax.NatBackbone and backbone.config.model_type == "dinat"
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) \['depth'\]"):
        natjax.create_model("nat_mini", depth=3)
    with pytest.raises(ValueError, match="Unknown preset 'nat_huge'"):
        natjax.create_model("nat_huge")
    # pretrained=True goes through the hub code: here a preset pointed at a local cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(zoo.PRETRAINED, "nat_mini", zoo.Weights(REPO))
    cache = _hub_cache(tmp_path / "cache")
    _same(nnx_flat_state(natjax.create_model("nat_mini", True, cache_dir=cache)), golden[1])
    tuned = natjax.create_model("nat_mini", True, num_labels=3, cache_dir=cache)
    assert tuned.classifier.kernel.shape == (128, 3)
    _same(_trunk(nnx_flat_state(tuned)), _trunk(golden[1]))
    assert set(zoo.PRETRAINED) == set(natjax.list_presets())


def test_url_weights_are_cached_and_checksummed(tmp_path, monkeypatch):
    source = golden_dir("nat_rand") / "original.pth"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    url = source.as_uri()
    path = hub.download_url(url, digest, cache_dir=tmp_path)
    assert path.read_bytes() == source.read_bytes() and path.parent.name == digest
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download_url(url, digest, cache_dir=tmp_path) == path  # cached: no download
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ValueError, match="does not match the expected"):
        hub.download_url(url, "0" * 64, cache_dir=tmp_path)
    assert not any((tmp_path / "natjax" / ("0" * 64)).iterdir())  # discarded
    with pytest.raises(ValueError, match="url together with sha256"):
        zoo.Weights(url=url)


# -------------------------------------------------------------------------------------- heads
def test_fresh_head_and_mismatched_sizes(golden):
    folder = golden_dir("nat_rand")
    model = natjax.from_pretrained(folder, num_labels=4, rngs=nnx.Rngs(3))
    assert model.classifier.kernel.shape == (128, 4) and model.config.id2label is None
    assert float(jnp.abs(model.classifier.kernel[...]).max()) > 0  # initialised, not zeros
    _same(_trunk(nnx_flat_state(model)), _trunk(golden[1]))
    headless = natjax.from_pretrained(folder, num_labels=0)
    assert headless.classifier is None
    with pytest.raises(ValueError, match="shape mismatches.*ignore_mismatched_sizes=True"):
        natjax.from_pretrained(folder, mlp_ratio=2.0)
    wider = natjax.from_pretrained(folder, mlp_ratio=2.0, ignore_mismatched_sizes=True)
    assert wider.nat.encoder.levels[0].layers[0].intermediate.kernel.shape == (16, 32)
    np.testing.assert_array_equal(
        wider.classifier.kernel[...], golden[0].classifier.kernel[...]
    )  # fmt: skip


def test_class_methods_and_heads_dropped(tmp_path, golden):
    folder = golden_dir("nat_rand")
    trunk = natjax.NatModel.from_pretrained(folder)
    assert type(trunk) is natjax.NatModel
    want = {k.removeprefix("nat/"): v for k, v in _trunk(golden[1]).items()}
    _same(nnx_flat_state(trunk), want)
    backbone = natjax.NatBackbone.from_pretrained(folder)  # new norms, classifier dropped
    assert type(backbone) is natjax.NatBackbone
    state = nnx_flat_state(backbone)
    assert all(state[k].shape == want[k].shape for k in state if k in want)
    np.testing.assert_array_equal(state["embeddings/norm/scale"], want["embeddings/norm/scale"])
    model = natjax.NatForImageClassification.from_pretrained(folder)
    model.save_pretrained(tmp_path / "saved")
    _same(nnx_flat_state(natjax.from_pretrained(tmp_path / "saved")), golden[1])
    # A classification model from a natjax NatModel checkpoint: the body loads, the head is new.
    trunk.save_pretrained(tmp_path / "trunk")
    grown = natjax.NatForImageClassification.from_pretrained(tmp_path / "trunk", num_labels=5)
    _same(_trunk(nnx_flat_state(grown)), _trunk(golden[1]))


def test_weights_file_next_to_config_loads_without_config(golden):
    model = natjax.from_pretrained(golden_dir("nat_rand") / "pytorch_model.bin")
    _same(nnx_flat_state(model), golden[1])


# ------------------------------------------------------------------------ outputs and inputs
def test_outputs_behave_like_model_output_and_integer_images_are_refused():
    config = natjax.NatConfig(embed_dim=8, depths=(1, 1), num_heads=(1, 1), kernel_size=3,
                              num_labels=3)  # fmt: skip
    model = natjax.NatForImageClassification(
        config, rngs=nnx.Rngs(0), attention_implementation="reference"
    )
    out = model(jnp.zeros((1, 32, 32, 3)))
    assert out["logits"] is out.logits and out[0] is out.logits and out[-1] is out.pooler_output
    assert out.to_tuple() == (out.logits, out.last_hidden_state, out.pooler_output)
    assert list(out.keys()) == ["logits", "last_hidden_state", "pooler_output"]
    assert "hidden_states" not in out
    with pytest.raises(KeyError, match="hidden_states"):
        out["hidden_states"]
    for images in (np.zeros((1, 32, 32, 3), np.uint8), jnp.zeros((1, 32, 32, 3), jnp.int32)):
        with pytest.raises(ValueError, match=r"dtype (uint8|int32).*natjax\.preprocess"):
            model(images)


def test_imagenet_class_names():
    names = imagenet1k_labels()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench, Tinca tinca" and names[999].startswith("toilet tissue")
    bare = natjax.NatConfig(num_labels=1000)
    placeholders = bare.replace(id2label=tuple(f"LABEL_{i}" for i in range(1000)))
    assert label_name(bare, 281) == label_name(placeholders, 281) == "tabby, tabby cat"
    named = natjax.NatConfig(num_labels=2, id2label=("cat", "dog"))
    assert label_name(named, 1) == "dog"
    assert label_name(natjax.NatConfig(num_labels=10), 3) == "LABEL_3"
