"""NAT/DiNAT models against the golden Hugging Face outputs, presets, config I/O and training
features (dropout, drop path, remat, gradients).

Golden forwards use the "reference" neighborhood-attention backend (the spec; it compiles in a
fraction of the time of "xla"), except one golden case run on the default backend; the backends'
agreement with NATTEN is covered by tests/test_na_*.py. Each forward is jitted once per model and
input size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from natjax.convert.hf import hf_to_nnx
from natjax.convert.hf_config import from_hf_config, to_hf_config
from natjax.models import (
    PRESETS,
    NatBackbone,
    NatConfig,
    NatForImageClassification,
    NatModel,
    count_params,
    get_config,
)

DATA = Path(__file__).parent / "data" / "models"
GOLDEN = json.loads((DATA / "models.json").read_text())
CASES = [(m["name"], f"{h}x{w}") for m in GOLDEN for h, w in m["sizes"]]
CLASSES = {"nat": NatForImageClassification, "dinat": NatForImageClassification,
           "nat_backbone": NatBackbone}  # fmt: skip
# float32 against float32 PyTorch: elementwise relative 1e-5, plus an absolute floor of 1e-5 of
# the tensor's largest magnitude for entries near zero. Observed errors are <= 1.2e-6.
RTOL, ATOL_FRACTION = 1e-5, 1e-5


def _load(name: str, implementation: str | None = "reference", **kwargs):
    family = next(m["family"] for m in GOLDEN if m["name"] == name)
    config = from_hf_config(DATA / name / "config.json")
    cls = CLASSES[family]
    model = nnx.eval_shape(
        lambda: cls(config, rngs=nnx.Rngs(0), attention_implementation=implementation, **kwargs)
    )
    hf_to_nnx(model, load_file(str(DATA / name / "model.safetensors")))
    return model


def _close(actual, expected, what):
    actual = np.asarray(actual, np.float32)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    atol = ATOL_FRACTION * float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=what)


@nnx.jit
def _forward(model, images):
    return model(images, output_hidden_states=True)


def _check_golden(model, name, size):
    expected = np.load(DATA / name / "expected.npz")
    images = jnp.asarray(expected[f"pixel_values_{size}"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    out = _forward(model, images)
    if isinstance(model, NatBackbone):
        n = len([k for k in expected.files if k.startswith(f"feature_maps_{size}_")])
        assert len(out.feature_maps) == n == len(model.config.out_features)
        for i, fmap in enumerate(out.feature_maps):
            _close(fmap, expected[f"feature_maps_{size}_{i}"], f"feature_maps[{i}]")
        return
    _close(out.logits, expected[f"logits_{size}"], "logits")
    _close(out.pooler_output, expected[f"pooler_output_{size}"], "pooler_output")
    _close(out.last_hidden_state, expected[f"last_hidden_state_{size}"], "last_hidden_state")
    assert len(out.hidden_states) == len(out.reshaped_hidden_states) == 5
    for i, (hidden, reshaped) in enumerate(
        zip(out.hidden_states, out.reshaped_hidden_states, strict=True)
    ):
        want = expected[f"hidden_states_{size}_{i}"]
        _close(hidden, want, f"hidden_states[{i}]")
        _close(reshaped, want.transpose(0, 3, 1, 2), f"reshaped_hidden_states[{i}]")


@pytest.mark.parametrize("name", sorted({name for name, _ in CASES}))
def test_golden_outputs_every_size(name):
    model = _load(name)
    sizes = [size for n, size in CASES if n == name]
    assert sizes
    for size in sizes:
        _check_golden(model, name, size)


def test_golden_outputs_default_backend():
    # DiNAT at 96x96: dilation 2 on 24x24 / 12x12 maps and a zero-padded 3x3 last stage.
    _check_golden(_load("dinat_rand", implementation=None), "dinat_rand", "96x96")


def test_bfloat16_compute_is_close_to_float32():
    model = _load("nat_rand", dtype=jnp.bfloat16)
    expected = np.load(DATA / "nat_rand" / "expected.npz")
    images = jnp.asarray(expected["pixel_values_64x64"].transpose(0, 2, 3, 1))
    out = nnx.jit(lambda m, x: m(x))(model, images)
    assert out.logits.dtype == jnp.bfloat16
    ref = expected["logits_64x64"]
    # bfloat16 keeps 8 mantissa bits; through 5 layers with random weights the observed error is
    # 1.3% of the largest logit. Documented tolerance: 5%.
    err = np.max(np.abs(np.asarray(out.logits, np.float32) - ref)) / np.max(np.abs(ref))
    assert err < 5e-2, err
    np.testing.assert_array_equal(np.argmax(np.asarray(out.logits, np.float32), -1),
                                  np.argmax(ref, -1))  # fmt: skip


# ------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", ["nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_large"])
def test_preset_parameter_counts(name):
    preset = PRESETS[name]
    count = count_params(get_config(name))  # nnx.eval_shape: nothing allocated
    # Published counts are rounded to whole millions (DiNAT-L: 200.9M published as "200M").
    assert abs(count / 1e6 - preset.params_m) < 1.0, (name, count)
    if name.startswith("nat_"):
        assert round(count / 1e6) == preset.params_m, (name, count)


def test_dinat_presets_match_nat_and_alternate_dilation():
    for size in ("mini", "tiny", "small", "base"):
        nat, dinat = get_config(f"nat_{size}"), get_config(f"dinat_{size}")
        assert dinat.replace(model_type="nat", dilations=None) == nat
        assert PRESETS[f"nat_{size}"].params_m == PRESETS[f"dinat_{size}"].params_m
        assert dinat.dilations[0] == (1, 8, 1) and dinat.dilations[1] == (1, 4, 1, 4)
        assert set(dinat.dilations[2]) == {1, 2} and dinat.dilations[3] == (1,) * 5
    with pytest.raises(ValueError, match="nat_huge"):
        get_config("nat_huge")


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", ["nat_rand", "dinat_rand", "nat_backbone_rand"])
def test_from_hf_config_golden(name):
    raw = json.loads((DATA / name / "config.json").read_text())
    config = from_hf_config(DATA / name)
    spec = next(m["config"] for m in GOLDEN if m["name"] == name)
    assert config.model_type == raw["model_type"]
    for key, value in spec.items():
        got = getattr(config, key)
        want = tuple(map(tuple, value)) if key == "dilations" else value
        assert got == (tuple(want) if isinstance(want, list) else want), key
    assert config.out_features == tuple(raw["out_features"])
    assert config.num_labels == len(raw.get("id2label", {0: 0, 1: 1}))
    exported = to_hf_config(config, "backbone" if "backbone" in name else "classification")
    assert exported["architectures"] == raw["architectures"]
    for key in raw:
        if key not in ("transformers_version",):
            assert exported[key] == raw[key], key
    assert from_hf_config(exported) == config


def test_from_hf_config_rejects_unknown_and_bad_fields():
    raw = json.loads((DATA / "nat_rand" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"unknown keys \['foo', 'window_size'\]"):
        from_hf_config({**raw, "foo": 1, "window_size": 7})
    with pytest.raises(ValueError, match="model_type.*swin"):
        from_hf_config({**raw, "model_type": "swin"})
    with pytest.raises(ValueError, match="hidden_size"):
        from_hf_config({**raw, "hidden_size": 64})
    with pytest.raises(FileNotFoundError):
        from_hf_config(DATA / "missing")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(model_type="vit"), "model_type"),
        (dict(num_heads=(2, 4, 8)), "num_heads"),
        (dict(num_heads=(3, 4, 8, 16)), "num_heads"),
        (dict(kernel_size=6), "kernel_size"),
        (dict(dilations=((1,),) * 4, depths=(1, 1, 1, 1)), "dilations"),
        (dict(model_type="dinat", depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), "dilations"),
        (dict(model_type="dinat", dilations=((1, 2),) * 4), "dilations"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(hidden_act="gelu_fast"), "hidden_act"),
        (dict(patch_size=8), "patch_size"),
        (dict(out_features=("stage9",)), "out_features"),
        (dict(out_features=("stage1",), out_indices=(2,)), "out_indices"),
        (dict(num_labels=3, id2label=("a", "b")), "id2label"),
        # Non-finite and absurd sizes (issue 10 section 2): one ValueError naming the field.
        (dict(layer_norm_eps=float("nan")), "layer_norm_eps"),
        (dict(layer_norm_eps=float("inf")), "layer_norm_eps"),
        (dict(layer_scale_init_value=float("nan")), "layer_scale_init_value"),
        (dict(layer_scale_init_value=float("inf")), "layer_scale_init_value"),
        (dict(mlp_ratio=float("nan")), "mlp_ratio"),
        (dict(mlp_ratio=float("inf")), "mlp_ratio"),
        (dict(drop_path_rate=float("nan")), "drop_path_rate"),
        (dict(kernel_size=10**9 + 1), "kernel_size"),
        (dict(embed_dim=2**40), "embed_dim"),
        (dict(depths=(1,) * 40, num_heads=(1,) * 40), "depths"),
        (dict(depths=(1, 1, 1, 10**6)), "depths"),
        (dict(num_labels=10**12), "num_labels"),
        (dict(num_labels=True), "num_labels"),
        (dict(id2label=("a", {"b": 1})), "id2label"),
        (dict(num_kv_heads=(2, 4, 8)), "num_kv_heads"),
        (dict(num_kv_heads=(2, 3, 8, 16)), "num_kv_heads"),
        (dict(stride=8), "stride"),
        (dict(stride=0), "stride"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        NatConfig(**kwargs)


def test_config_json_errors_name_file_and_field(tmp_path):
    raw = json.loads((DATA / "nat_rand" / "config.json").read_text())
    path = tmp_path / "config.json"
    cases = [
        ({**raw, "kernel_size": 10**9 + 1}, "`kernel_size`=1000000001; expected an int in"),
        ({**raw, "embed_dim": 2**40}, "`embed_dim`=1099511627776"),
        ({**raw, "layer_norm_eps": float("nan")}, "`layer_norm_eps`=nan"),
        ({**raw, "mlp_ratio": float("inf")}, "`mlp_ratio`=inf"),
        ({**raw, "depths": [1] * 40, "num_heads": [1] * 40}, "`depths`="),
    ]
    for data, match in cases:
        path.write_text(json.dumps(data))  # json writes NaN / Infinity, as the files
        with pytest.raises(ValueError, match=f"^{path}: NatConfig: invalid {re.escape(match)}"):
            from_hf_config(path)
    path.write_bytes(b'{"model_type": "nat", "embed_dim": "\xff\xfe"}')
    with pytest.raises(ValueError, match=f"^{path}: not UTF-8 text"):
        from_hf_config(path)
    path.write_text('{"model_type": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=f"^{path}: JSON nested 100001 levels deep"):
        from_hf_config(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        from_hf_config(path)


def test_many_labels_are_lazy_and_bounded():
    """No per-class "LABEL_i" string is built unless asked for (a 1 KB config.json with
    num_labels 10**12 used to exhaust memory building them); the count itself is bounded."""
    config = NatConfig(num_labels=1_000_000, embed_dim=8, depths=(1,), num_heads=(1,))
    assert config.id2label is None and config.label_name(999_999) == "LABEL_999999"
    named = NatConfig(num_labels=2, id2label=("LABEL_0", "LABEL_1"))
    assert named.id2label is None  # placeholders normalised away
    with pytest.raises(ValueError, match=r"`num_labels`=1000000000000; expected an int in \[0, "):
        NatConfig(num_labels=10**12)


def test_build_time_is_linear_in_depth(monkeypatch):
    """Structural check of the fix for quadratic build time: building a model draws one key
    from the caller's nnx.Rngs (an nnx.Rngs draw under tracing costs time proportional to the
    jaxpr so far; natjax.models.nat.InitKeys counts the rest in Python). Timings:
    experiments/bench_build.py."""
    from flax.nnx import rnglib

    from natjax.models.nat import InitKeys

    draws = []
    original = rnglib.RngStream.__call__
    monkeypatch.setattr(
        rnglib.RngStream, "__call__", lambda self: draws.append(1) or original(self)
    )
    config = TINY.replace(depths=(8, 1, 1, 1), num_heads=(1, 1, 1, 1))
    nnx.eval_shape(lambda: NatForImageClassification(config, rngs=nnx.Rngs(0)))
    assert len(draws) == 1
    keys = InitKeys(nnx.Rngs(3))
    a, b = keys.params(), keys.params()
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
    with pytest.raises(ValueError, match="nnx.Rngs"):
        NatModel(TINY, rngs=0)


def test_config_normalises_and_derives():
    config = NatConfig(depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], embed_dim=16,
                       id2label={"1": "dog", "0": "cat"}, out_indices=[1, -1])  # fmt: skip
    assert config.depths == (1, 1, 2, 1) and config.id2label == ("cat", "dog")
    assert config.num_labels == 2 and config.hidden_size == 128
    assert config.out_features == ("stage1", "stage4") and config.out_indices == (1, 4)
    assert hash(config) == hash(config.replace())
    rates = NatConfig(drop_path_rate=0.3).drop_path_rates()
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, 18))


# ---------------------------------------------------------------------------- training features
TINY = NatConfig(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), kernel_size=3,
                 mlp_ratio=2.0, num_labels=3, drop_path_rate=0.5, hidden_dropout_prob=0.1,
                 layer_scale_init_value=0.5)  # fmt: skip
TINY_IMAGES = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


def _key(seed):
    # "rbg" keys compile several times faster than threefry on CPU; the model takes any key.
    return jax.random.key(seed, impl="rbg")


def _tiny(remat=False, seed=0):
    return NatForImageClassification(TINY, rngs=nnx.Rngs(seed), remat=remat,
                                     attention_implementation="reference")  # fmt: skip


def _loss(model, images, labels, rngs):
    logits = model(images, deterministic=False, rngs=rngs).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_dropout_and_drop_path_are_active_only_in_training():
    model = _tiny()
    run = nnx.jit(lambda m, x, key: m(x, deterministic=False, rngs=key).logits)
    eval_logits = nnx.jit(lambda m, x: m(x).logits)(model, TINY_IMAGES)
    a = run(model, TINY_IMAGES, _key(0))
    b = run(model, TINY_IMAGES, _key(0))
    c = run(model, TINY_IMAGES, _key(1))
    np.testing.assert_array_equal(a, b)  # same key, same masks
    assert not np.allclose(a, eval_logits) and not np.allclose(a, c)
    assert np.all(np.isfinite(a))
    with pytest.raises(ValueError, match="rngs"):
        model(TINY_IMAGES, deterministic=False)
    with pytest.raises(ValueError, match="no 'dropout' stream"):
        model(TINY_IMAGES, deterministic=False, rngs=nnx.Rngs(params=0))


def _assert_trees_close(got, want, rel: float) -> None:
    """Leafwise max|got - want| <= rel * scale; scale is the leaf's largest magnitude, at least
    1e-3 of the largest over all leaves (exactly-zero gradients hold only rounding noise)."""
    wants = [np.asarray(b, np.float64) for b in jax.tree.leaves(want)]
    floor = 1e-3 * max(float(np.max(np.abs(b))) for b in wants)
    for a, b in zip(jax.tree.leaves(got), wants, strict=True):
        scale = max(float(np.max(np.abs(b))), floor)
        err = float(np.max(np.abs(np.asarray(a, np.float64) - b)))
        assert err <= rel * scale, (err, rel, scale, b.shape)


def test_gradient_step_changes_parameters_and_remat_matches():
    labels = jnp.array([0, 2])

    @nnx.jit
    def step(model, optimizer, rngs):
        loss, grads = nnx.value_and_grad(_loss)(model, TINY_IMAGES, labels, rngs)
        optimizer.update(model, grads)
        return loss, grads

    plain, remat = _tiny(), _tiny(remat=True, seed=1)
    nnx.update(remat, nnx.state(plain, nnx.Param))
    before = jax.tree.map(np.asarray, nnx.state(plain, nnx.Param))
    results = []
    for model in (plain, remat):
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        results.append(step(model, optimizer, nnx.Rngs(dropout=_key(7))))  # same dropout masks
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert np.isfinite(loss_a)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    # Remat recomputes the same ops (possibly fused differently): rounding-level differences,
    # measured against each tensor's magnitude (a wrong recomputation is O(1) off).
    _assert_trees_close(grad_b, grad_a, 1e-5)
    rpb_grad = grad_a["nat"]["encoder"]["levels"][0]["layers"][0]["attention"]["rpb"]
    assert float(jnp.abs(rpb_grad[...]).sum()) > 0
    after = nnx.state(plain, nnx.Param)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
    nonzero = jax.tree.leaves(jax.tree.map(lambda g: bool(jnp.any(g != 0)), grad_a))
    # SGD moves exactly the parameters with a gradient; drop path (rate up to 0.5, batch 2) may
    # cut a few branches off entirely for this key, the rest must all move.
    assert moved == nonzero
    assert sum(moved) > 0.75 * len(moved), f"only {sum(moved)} of {len(moved)} moved"
    _assert_trees_close(nnx.state(remat, nnx.Param), after, 1e-5)


# ----------------------------------------------------------------------------------- interface
def test_outputs_shapes_any_size_and_input_checks():
    config = NatConfig(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), kernel_size=3,
                       num_labels=0, drop_path_rate=0.0)  # fmt: skip
    kw = dict(rngs=nnx.Rngs(0), attention_implementation="reference")
    trunk = NatModel(config, **kw)
    out = _forward(trunk, jnp.ones((1, 45, 19, 3)))
    assert out.last_hidden_state.shape == (1, 2, 1, 64) and out.pooler_output.shape == (1, 64)
    assert [h.shape[1:3] for h in out.hidden_states] == [(12, 5), (6, 3), (3, 2), (2, 1), (2, 1)]
    assert [h.shape[1] for h in out.reshaped_hidden_states] == [8, 16, 32, 64, 64]
    with pytest.raises(ValueError, match="channels-last"):
        trunk(jnp.ones((1, 3, 32, 32)))
    backbone = NatBackbone(config.replace(out_features=("stem", "stage2")), **kw)
    assert backbone.config.out_indices == (0, 2) and backbone.channels == (8, 16)
    out = _forward(backbone, jnp.ones((1, 32, 32, 3)))
    assert [m.shape for m in out.feature_maps] == [(1, 8, 8, 8), (1, 16, 4, 4)]
    assert [h.shape[1:3] for h in out.hidden_states] == [(8, 8), (8, 8), (4, 4), (2, 2), (1, 1)]
    headless = NatForImageClassification(config, rngs=nnx.Rngs(0))
    assert headless.classifier is None and headless.config is headless.nat.config


def test_parameters_carry_logical_sharding_names():
    model = nnx.eval_shape(lambda: NatForImageClassification(TINY, rngs=nnx.Rngs(0)))
    layer = model.nat.encoder.levels[0].layers[0]
    names = lambda var: var.get_metadata()["out_sharding"]  # noqa: E731
    assert names(layer.intermediate.kernel) == ("embed", "mlp")
    assert names(layer.output.kernel) == ("mlp", "embed")
    assert names(layer.attention.query.kernel) == ("embed", "heads")
    assert names(layer.attention.output.kernel) == ("heads", "embed")
    assert names(layer.attention.rpb) == ("heads", None, None)
    assert names(layer.layer_scale_mlp) == ("embed",)
    assert names(model.nat.embeddings.patch_embeddings.projection_0.kernel) == (
        None, None, None, "embed")  # fmt: skip
    assert names(model.classifier.kernel) == ("embed", "classes")
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert all(
        leaf is not None
        for leaf in jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
    )


def test_constructor_keywords_reach_every_class_and_warnings_name_the_caller():
    """The three classes share one constructor (models/nat.py `_NatModule`): the same keywords
    reach the trunk and the head, and the attention-dropout warning points at this file, not at
    natjax's or flax's construction frames."""
    config = NatConfig(embed_dim=8, depths=(1, 1), num_heads=(1, 1), kernel_size=3, num_labels=3,
                       attention_probs_dropout_prob=0.1)  # fmt: skip
    for cls in (NatModel, NatForImageClassification, NatBackbone):
        with pytest.warns(UserWarning, match="attention_probs_dropout_prob") as record:
            model = nnx.eval_shape(
                lambda cls=cls: cls(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, remat=True)
            )
        assert {w.filename for w in record} == {__file__}, cls
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
        assert dtypes == {jnp.dtype(jnp.bfloat16)}, cls
        trunk = model.nat if cls is NatForImageClassification else model
        assert all(level.remat for level in trunk.encoder.levels), cls
    with pytest.raises(ValueError, match="must be a NatConfig"):
        NatForImageClassification({"embed_dim": 8}, rngs=nnx.Rngs(0))


def test_gqa_and_strided_nat_build_run_and_round_trip_their_config():
    """natjax's extensions of NatConfig (issue 12): per-stage kv heads give k/v projections of
    kv_heads * head_dim outputs, every layer's attention is the strided GQA call (equal to the
    op on the layer's own projections), and the config survives to_hf_config/from_hf_config."""
    import natjax

    config = NatConfig(embed_dim=8, depths=(1, 1), num_heads=(2, 4), kernel_size=3,
                       num_labels=3, drop_path_rate=0.0, num_kv_heads=(1, 2), stride=2)  # fmt: skip
    model = NatForImageClassification(config, rngs=nnx.Rngs(0))
    for stage, (heads, kv) in enumerate(zip(config.num_heads, config.num_kv_heads, strict=True)):
        attn = model.nat.encoder.levels[stage].layers[0].attention
        dim = config.stage_dim(stage)
        assert attn.key.kernel.shape == attn.value.kernel.shape == (dim, kv * dim // heads)
        assert attn.query.kernel.shape == (dim, dim)
    logits = nnx.jit(lambda m, x: m(x).logits)(model, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))
    # The layer runs the strided GQA op: compare with the op on the layer's projections.
    attn = model.nat.encoder.levels[0].layers[0].attention
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8))
    q = attn.query(x).reshape(1, 8, 8, 2, 4)
    k = attn.key(x).reshape(1, 8, 8, 1, 4)
    v = attn.value(x).reshape(1, 8, 8, 1, 4)
    ref = natjax.na2d(q, k, v, 3, stride=2, rpb=attn.rpb[...], implementation="reference")
    want = attn.output(ref.reshape(1, 8, 8, 8))
    np.testing.assert_allclose(attn(x), want, rtol=1e-5, atol=1e-5)
    hf = to_hf_config(config)
    assert hf["num_kv_heads"] == [1, 2] and hf["stride"] == 2
    assert from_hf_config(hf) == config
    assert "num_kv_heads" not in to_hf_config(NatConfig()) and "stride" not in to_hf_config(
        NatConfig()
    )
