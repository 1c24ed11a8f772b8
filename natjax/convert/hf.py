"""Hugging Face <-> NNX parameter mapping for NAT / DiNAT (transformers 4.52 key layout).

The mapping is a table of `Rule`s: a Hugging Face key template, the NNX parameter path(s) it fills
and a tensor hook. Templates use `{i}` (stage), `{j}` (layer), `{p}` (tokenizer conv 0/1), `{qkv}`
(query/key/value) and `{stage}` (backbone stage name). Paths are relative to the base model; the
prefixes are:

    model class                  Hugging Face keys             NNX paths
    NatForImageClassification    "nat." / "dinat." + base,     "nat." + base, "classifier."
                                 "classifier."
    NatModel                     base (a "nat."/"dinat."       base
                                 prefix is also accepted)
    NatBackbone                  base without "layernorm",     same
                                 "hidden_states_norms.{stage}"

Hooks: `identity`; `linear` (PyTorch `[out, in]` <-> NNX `[in, out]`); `conv` (PyTorch OIHW <->
NNX HWIO); `layer_scale` (HF `layer_scale_parameters` `[2, C]` <-> NNX `layer_scale_attention`,
`layer_scale_mlp` `[C]` each).

`hf_to_nnx` fills a model in place (also one built with `nnx.eval_shape`: abstract parameters are
replaced by real arrays); `nnx_to_hf` is its exact inverse (bit-exact round trip in float32).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from natjax.models.nat import NatBackbone, NatForImageClassification, NatModel


@dataclasses.dataclass(frozen=True)
class Hook:
    """A tensor conversion: `to_nnx(hf) -> tuple of NNX arrays`, `to_hf(*nnx) -> hf array`."""

    name: str
    to_nnx: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


IDENTITY = Hook("identity", lambda a: (a,), lambda a: a)
LINEAR = Hook("linear", lambda a: (a.T,), lambda a: a.T)
CONV = Hook("conv", lambda a: (a.transpose(2, 3, 1, 0),), lambda a: a.transpose(3, 2, 0, 1))
LAYER_SCALE = Hook("layer_scale", lambda a: (a[0], a[1]), lambda a, b: np.stack([a, b]))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of the key table: HF key template -> NNX path template(s) and a hook."""

    hf: str
    nnx: tuple[str, ...]
    hook: Hook


def _rules(*rows: tuple[str, str | tuple[str, ...], Hook]) -> tuple[Rule, ...]:
    return tuple(Rule(hf, (nx,) if isinstance(nx, str) else nx, hook) for hf, nx, hook in rows)


_L = "encoder.levels.{i}.layers.{j}"
_D = "encoder.levels.{i}.downsample"

# Parameters shared by NatModel and NatBackbone (paths relative to the base model).
TRUNK_RULES = _rules(
    (
        "embeddings.patch_embeddings.projection.{p}.weight",
        "embeddings.patch_embeddings.projection_{p}.kernel",
        CONV,
    ),
    (
        "embeddings.patch_embeddings.projection.{p}.bias",
        "embeddings.patch_embeddings.projection_{p}.bias",
        IDENTITY,
    ),
    ("embeddings.norm.weight", "embeddings.norm.scale", IDENTITY),
    ("embeddings.norm.bias", "embeddings.norm.bias", IDENTITY),
    (f"{_D}.reduction.weight", f"{_D}.reduction.kernel", CONV),
    (f"{_D}.norm.weight", f"{_D}.norm.scale", IDENTITY),
    (f"{_D}.norm.bias", f"{_D}.norm.bias", IDENTITY),
    (f"{_L}.layernorm_before.weight", f"{_L}.layernorm_before.scale", IDENTITY),
    (f"{_L}.layernorm_before.bias", f"{_L}.layernorm_before.bias", IDENTITY),
    (f"{_L}.attention.self.{{qkv}}.weight", f"{_L}.attention.{{qkv}}.kernel", LINEAR),
    (f"{_L}.attention.self.{{qkv}}.bias", f"{_L}.attention.{{qkv}}.bias", IDENTITY),
    (f"{_L}.attention.self.rpb", f"{_L}.attention.rpb", IDENTITY),
    (f"{_L}.attention.output.dense.weight", f"{_L}.attention.output.kernel", LINEAR),
    (f"{_L}.attention.output.dense.bias", f"{_L}.attention.output.bias", IDENTITY),
    (f"{_L}.layernorm_after.weight", f"{_L}.layernorm_after.scale", IDENTITY),
    (f"{_L}.layernorm_after.bias", f"{_L}.layernorm_after.bias", IDENTITY),
    (f"{_L}.intermediate.dense.weight", f"{_L}.intermediate.kernel", LINEAR),
    (f"{_L}.intermediate.dense.bias", f"{_L}.intermediate.bias", IDENTITY),
    (f"{_L}.output.dense.weight", f"{_L}.output.kernel", LINEAR),
    (f"{_L}.output.dense.bias", f"{_L}.output.bias", IDENTITY),
    (
        f"{_L}.layer_scale_parameters",
        (f"{_L}.layer_scale_attention", f"{_L}.layer_scale_mlp"),
        LAYER_SCALE,
    ),
)
# NatModel only: the final LayerNorm.
MODEL_RULES = _rules(
    ("layernorm.weight", "layernorm.scale", IDENTITY),
    ("layernorm.bias", "layernorm.bias", IDENTITY),
)
# NatForImageClassification only (no prefix on either side).
CLASSIFIER_RULES = _rules(
    ("classifier.weight", "classifier.kernel", LINEAR),
    ("classifier.bias", "classifier.bias", IDENTITY),
)
# NatBackbone only.
BACKBONE_RULES = _rules(
    ("hidden_states_norms.{stage}.weight", "hidden_states_norms.{stage}.scale", IDENTITY),
    ("hidden_states_norms.{stage}.bias", "hidden_states_norms.{stage}.bias", IDENTITY),
)

_GROUPS = {
    "i": r"\d+",
    "j": r"\d+",
    "p": r"[01]",
    "qkv": r"query|key|value",
    "stage": r"stem|stage\d+",
}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for n, part in enumerate(parts):
        out.append(f"(?P<{part}>{_GROUPS[part]})" if n % 2 else re.escape(part))
    return re.compile("".join(out) + "$")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor of a concrete model: its key, the NNX paths it fills and the hook."""

    hf_key: str
    nnx_paths: tuple[str, ...]
    hook: Hook


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """Keys that did not match in a non-strict `hf_to_nnx` (both empty after a strict load)."""

    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]


def model_kind(model: nnx.Module) -> str:
    """ "classification", "model" or "backbone" for the three model classes."""
    if isinstance(model, NatForImageClassification):
        return "classification"
    if isinstance(model, NatModel):
        return "model"
    if isinstance(model, NatBackbone):
        return "backbone"
    raise ValueError(
        "`model` must be a NatForImageClassification, NatModel or NatBackbone, got "
        f"{type(model).__name__}."
    )


def kind_from_hf_keys(keys) -> str:
    """Guesses the model kind from a HF state dict's keys."""
    keys = list(keys)
    if any(k.startswith("classifier.") for k in keys):
        return "classification"
    if any(k.startswith("hidden_states_norms.") for k in keys):
        return "backbone"
    return "model"


def param_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every `nnx.Param` of `model` by dotted path (abstract models included)."""
    return {
        ".".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Param)
    }


def _scoped_rules(model: nnx.Module) -> list[tuple[str, str, tuple[Rule, ...]]]:
    """(HF prefix, NNX prefix, rules) for each part of `model`."""
    kind = model_kind(model)
    if kind == "classification":
        base = f"{model.config.model_type}."
        return [(base, "nat.", TRUNK_RULES + MODEL_RULES), ("", "", CLASSIFIER_RULES)]
    if kind == "model":
        return [("", "", TRUNK_RULES + MODEL_RULES)]
    return [("", "", TRUNK_RULES + BACKBONE_RULES)]


def key_table(model: nnx.Module) -> list[Entry]:
    """The concrete HF key <-> NNX path table of `model`, sorted by HF key.

    Raises:
      RuntimeError: if a parameter of `model` matches no rule (a bug in the table).
    """
    params = param_variables(model)
    entries: dict[str, tuple[list[str | None], Hook]] = {}
    unmatched = []
    for path in params:
        for hf_prefix, nnx_prefix, rules in _scoped_rules(model):
            if not path.startswith(nnx_prefix):
                continue
            rel = path[len(nnx_prefix) :]
            hit = False
            for rule in rules:
                for slot, template in enumerate(rule.nnx):
                    m = _template_regex(template).match(rel)
                    if m is None:
                        continue
                    key = hf_prefix + rule.hf.format(**m.groupdict())
                    slots, _ = entries.setdefault(key, ([None] * len(rule.nnx), rule.hook))
                    slots[slot] = path
                    hit = True
                    break
                if hit:
                    break
            if hit:
                break
        else:
            unmatched.append(path)
    if unmatched or any(None in slots for slots, _ in entries.values()):
        raise RuntimeError(f"natjax.convert.hf: no complete HF rule for parameters {unmatched}.")
    return [Entry(k, tuple(entries[k][0]), entries[k][1]) for k in sorted(entries)]


def _summary(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:5])
    more = f", ... ({len(keys) - 5} more)" if len(keys) > 5 else ""
    return f"{len(keys)} {kind} key(s): {shown}{more}"


def strip_base_prefix(model: nnx.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """Drops the "nat."/"dinat." body prefix of a classification checkpoint for NatModel and
    NatBackbone (as transformers' `base_model_prefix` does); other states are returned as is."""
    state = dict(state)
    if model_kind(model) == "classification":
        return state
    prefix = f"{model.config.model_type}."
    if any(k.startswith("embeddings.") for k in state) or not any(
        k.startswith(prefix) for k in state
    ):
        return state
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def _as_float_array(key: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise ValueError(f"hf_to_nnx: tensor {key!r} has dtype {arr.dtype}; expected a float type.")
    return arr


def hf_to_nnx(model: nnx.Module, state: Mapping[str, Any], *, strict: bool = True) -> LoadResult:
    """Fills `model`'s parameters, in place, from a Hugging Face state dict.

    Every tensor is converted by its hook, its shape checked against the parameter, and cast to
    the parameter's dtype (float16/bfloat16/float32/float64 sources all accepted). Nothing is
    written unless every present tensor converts cleanly.

    Args:
      model: a `NatForImageClassification`, `NatModel` or `NatBackbone` (possibly abstract, from
        `nnx.eval_shape`).
      state: HF key -> array (e.g. `safetensors.numpy.load_file(...)`).
      strict: raise if any parameter is left unfilled or any source key is unused.

    Returns:
      A `LoadResult` with the missing and unexpected keys (empty when `strict`).

    Raises:
      ValueError: on missing/unexpected keys (when `strict`; the message lists the first few of
        each with counts), a shape mismatch or a non-float tensor.
    """
    table = key_table(model)
    params = param_variables(model)
    state = strip_base_prefix(model, state)
    expected = {e.hf_key for e in table}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if strict and (missing or unexpected):
        parts = [_summary(n, k) for n, k in (("missing", missing), ("unexpected", unexpected)) if k]
        raise ValueError(
            f"hf_to_nnx: the state dict does not match {type(model).__name__} "
            f"({model.config.model_type}): " + "; ".join(parts) + "."
        )
    updates = []
    for entry in table:
        if entry.hf_key not in state:
            continue
        source = _as_float_array(entry.hf_key, state[entry.hf_key])
        arrays = entry.hook.to_nnx(source)
        for path, array in zip(entry.nnx_paths, arrays, strict=True):
            var = params[path]
            want = tuple(var.get_value().shape)
            if tuple(array.shape) != want:
                raise ValueError(
                    f"hf_to_nnx: tensor {entry.hf_key!r} has shape {tuple(source.shape)}, which "
                    f"gives {tuple(array.shape)} for {path!r}; expected {want} "
                    f"(config: {model.config.describe()})."
                )
            updates.append((var, array))
    for var, array in updates:
        var.set_value(jnp.asarray(np.ascontiguousarray(array), dtype=var.get_value().dtype))
    return LoadResult(tuple(missing), tuple(unexpected))


def nnx_to_hf(model: nnx.Module, dtype: Any = None) -> dict[str, np.ndarray]:
    """Exports `model`'s parameters under Hugging Face keys and layouts.

    Args:
      model: a `NatForImageClassification`, `NatModel` or `NatBackbone`.
      dtype: optional numpy dtype to cast to (default: the parameters' dtype).

    Returns:
      HF key -> C-contiguous numpy array, sorted by key: exactly the keys and shapes that the
      matching transformers class saves (`save_pretrained`).
    """
    params = param_variables(model)
    out = {}
    for entry in key_table(model):
        arrays = [np.asarray(params[p].get_value()) for p in entry.nnx_paths]
        tensor = np.ascontiguousarray(entry.hook.to_hf(*arrays))
        out[entry.hf_key] = tensor if dtype is None else tensor.astype(dtype)
    return out
