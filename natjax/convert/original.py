"""Original SHI-Labs NAT/DiNAT checkpoint layout <-> Hugging Face layout, as a table of rules.

The original `classification/nat.py` and `dinat.py` (SHI-Labs/Neighborhood-Attention-Transformer)
name their parameters::

    patch_embed.proj.{0,1}.{weight,bias}           two stride-2 3x3 convolutions (ConvTokenizer)
    patch_embed.norm.*                              LayerNorm after the tokenizer
    levels.i.blocks.j.norm1.* / norm2.*             pre-attention / pre-MLP LayerNorms
    levels.i.blocks.j.attn.qkv.*                    fused [3*C, C] q/k/v projection
    levels.i.blocks.j.attn.rpb                      [heads, 2k-1, 2k-1] relative position bias
    levels.i.blocks.j.attn.proj.*                   attention output projection
    levels.i.blocks.j.mlp.fc1.* / fc2.*             MLP
    levels.i.blocks.j.gamma1 / gamma2               layer scale (only if layer_scale is set)
    levels.i.downsample.reduction.weight / norm.*   ConvDownsampler (no conv bias)
    norm.*, head.*                                  final LayerNorm, classifier

Hugging Face (`modeling_nat.py` / `modeling_dinat.py`) splits `qkv` into query/key/value (the
original reshapes the fused output as (3, heads, head_dim), so the three are consecutive row
blocks) and stacks gamma1/gamma2 as `layer_scale_parameters[0]/[1]`. Every rule below maps a
group of original keys to a group of Hugging Face keys with an inverse, so export to the original
layout uses the same table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Arrays = list[np.ndarray]

# Placeholders in the key templates and what they match.
_FIELDS = {"i": r"\d+", "j": r"\d+", "k": r"\d+", "p": r"weight|bias"}


def _identity(arrays: Arrays) -> Arrays:
    return list(arrays)


def _split_qkv(arrays: Arrays) -> Arrays:
    (qkv,) = arrays
    if qkv.shape[0] % 3:
        raise ValueError(f"fused qkv has leading size {qkv.shape[0]}, not a multiple of 3")
    return [np.ascontiguousarray(a) for a in np.split(qkv, 3, axis=0)]


def _fuse_qkv(arrays: Arrays) -> Arrays:
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"query/key/value shapes differ: {[a.shape for a in arrays]}")
    return [np.concatenate(arrays, axis=0)]


def _stack_gammas(arrays: Arrays) -> Arrays:
    if arrays[0].shape != arrays[1].shape or arrays[0].ndim != 1:
        raise ValueError(f"gamma1/gamma2 shapes {arrays[0].shape}/{arrays[1].shape} differ")
    return [np.stack(arrays, axis=0)]


def _unstack_gammas(arrays: Arrays) -> Arrays:
    (scale,) = arrays
    if scale.ndim != 2 or scale.shape[0] != 2:
        raise ValueError(f"layer_scale_parameters has shape {scale.shape}, expected (2, C)")
    return [np.ascontiguousarray(scale[0]), np.ascontiguousarray(scale[1])]


@dataclass(frozen=True)
class Rule:
    """Maps the original keys `original` to the HF keys `hf` (templates with {i},{j},{k},{p}).

    `to_hf` turns the original arrays (in template order) into the HF arrays; `to_original` is
    its exact inverse. HF templates starting with "@" are the model body and get the
    `nat.`/`dinat.` prefix of the classification model.
    """

    original: tuple[str, ...]
    hf: tuple[str, ...]
    to_hf: Callable[[Arrays], Arrays] = _identity
    to_original: Callable[[Arrays], Arrays] = _identity


_BLOCK = "levels.{i}.blocks.{j}"
_LAYER = "@encoder.levels.{i}.layers.{j}"
_SELF = _LAYER + ".attention.self"

RULES: tuple[Rule, ...] = (
    Rule(("patch_embed.proj.{k}.{p}",), ("@embeddings.patch_embeddings.projection.{k}.{p}",)),
    Rule(("patch_embed.norm.{p}",), ("@embeddings.norm.{p}",)),
    Rule((_BLOCK + ".norm1.{p}",), (_LAYER + ".layernorm_before.{p}",)),
    Rule((_BLOCK + ".attn.rpb",), (_SELF + ".rpb",)),
    Rule(
        (_BLOCK + ".attn.qkv.{p}",),
        (_SELF + ".query.{p}", _SELF + ".key.{p}", _SELF + ".value.{p}"),
        _split_qkv,
        _fuse_qkv,
    ),
    Rule((_BLOCK + ".attn.proj.{p}",), (_LAYER + ".attention.output.dense.{p}",)),
    Rule((_BLOCK + ".norm2.{p}",), (_LAYER + ".layernorm_after.{p}",)),
    Rule((_BLOCK + ".mlp.fc1.{p}",), (_LAYER + ".intermediate.dense.{p}",)),
    Rule((_BLOCK + ".mlp.fc2.{p}",), (_LAYER + ".output.dense.{p}",)),
    Rule(
        (_BLOCK + ".gamma1", _BLOCK + ".gamma2"),
        (_LAYER + ".layer_scale_parameters",),
        _stack_gammas,
        _unstack_gammas,
    ),
    Rule(
        ("levels.{i}.downsample.reduction.{p}",), ("@encoder.levels.{i}.downsample.reduction.{p}",)
    ),
    Rule(("levels.{i}.downsample.norm.{p}",), ("@encoder.levels.{i}.downsample.norm.{p}",)),
    Rule(("norm.{p}",), ("@layernorm.{p}",)),
    Rule(("head.{p}",), ("classifier.{p}",)),
)


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    regex = "".join(
        re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})"
        for n, part in enumerate(parts)
    )
    return re.compile(regex + r"\Z")


def _key_summary(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def mismatch_error(
    what: str,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    shapes: Mapping[str, tuple[tuple, tuple]] | None = None,
) -> ValueError | None:
    """A ValueError describing missing/unexpected keys and wrong shapes, or None if all agree.

    Args:
      what: what was being converted/loaded (start of the message).
      missing: keys the target needs but the source lacks.
      unexpected: source keys nothing uses.
      shapes: key -> (got shape, expected shape) for wrong shapes.
    """
    missing, unexpected = sorted(missing), sorted(unexpected)
    shapes = dict(shapes or {})
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {_key_summary(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {_key_summary(unexpected)}")
    if shapes:
        first = [f"{k}: got {g}, expected {e}" for k, (g, e) in sorted(shapes.items())[:5]]
        more = f" ... ({len(shapes)} in all)" if len(shapes) > 5 else ""
        parts.append(f"{len(shapes)} shape mismatches [{'; '.join(first)}{more}]")
    return ValueError(f"{what}: " + "; ".join(parts) + " (does the config match the weights?)")


def check_state_dict(
    state: Mapping[str, np.ndarray], reference: Mapping[str, Any], what: str
) -> None:
    """Raise a ValueError unless `state` has exactly the keys and shapes of `reference`.

    Args:
      state: name -> array being loaded.
      reference: name -> array (or shape tuple) that the target needs.
      what: start of the error message.
    """

    def shape(v) -> tuple:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    shapes = {
        k: (shape(state[k]), shape(reference[k]))
        for k in state.keys() & reference.keys()
        if shape(state[k]) != shape(reference[k])
    }
    err = mismatch_error(
        what, reference.keys() - state.keys(), state.keys() - reference.keys(), shapes
    )
    if err is not None:
        raise err


def _convert(
    state: Mapping[str, np.ndarray],
    rules: Iterable[tuple[tuple[str, ...], tuple[str, ...], Callable[[Arrays], Arrays]]],
    what: str,
) -> dict[str, np.ndarray]:
    """Apply (source templates, target templates, fn) rules, each source key exactly once."""
    compiled = [(src, dst, fn, _pattern(src[0])) for src, dst, fn in rules]
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    missing: set[str] = set()
    for key in state:
        for src, dst, fn, anchor in compiled:
            match = anchor.match(key)
            if match is None:
                continue
            fields = match.groupdict()
            names = [t.format(**fields) for t in src]
            absent = [n for n in names if n not in state]
            if absent:
                missing.update(absent)
                used.update(n for n in names if n in state)
                break
            arrays = fn([np.asarray(state[n]) for n in names])
            for target, array in zip(dst, arrays, strict=True):
                out[target.format(**fields)] = array
            used.update(names)
            break
    unexpected = set(state) - used
    err = mismatch_error(what, missing, unexpected)
    if err is not None:
        raise err
    return out


def _hf_prefix(model_type: str) -> str:
    if model_type not in ("nat", "dinat"):
        raise ValueError(f"model_type={model_type!r}; expected 'nat' or 'dinat'")
    return f"{model_type}."


def original_to_hf(state: Mapping[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    """Convert an original SHI-Labs state dict to Hugging Face `*ForImageClassification` keys.

    Args:
      state: original keys (`patch_embed.*`, `levels.*`, `norm.*`, `head.*`) -> arrays.
      model_type: "nat" or "dinat" (the HF prefix of the model body, `nat.` / `dinat.`).

    Returns:
      HF key -> array (qkv split into query/key/value, gamma1/gamma2 stacked).

    Raises:
      ValueError: listing keys no rule uses, partners of a group that are absent (e.g. gamma2
        without gamma1), or shapes a hook cannot split.
    """
    prefix = _hf_prefix(model_type)
    rules = [(r.original, tuple(t.replace("@", prefix, 1) for t in r.hf), r.to_hf) for r in RULES]
    return _convert(state, rules, "original -> Hugging Face conversion")


def hf_to_original(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Convert Hugging Face NAT/DiNAT classification (or base model) keys to the original layout.

    Args:
      state: HF keys, with the `nat.`/`dinat.` prefix (classification) or without (base model).

    Returns:
      original key -> array (query/key/value fused into qkv, layer scale split into gammas).

    Raises:
      ValueError: for keys of other layouts (e.g. a backbone's `hidden_states_norms`), listed.
    """
    prefixes = {k.split(".", 1)[0] for k in state if k.split(".", 1)[0] in ("nat", "dinat")}
    if len(prefixes) > 1:
        raise ValueError(f"Hugging Face state mixes prefixes {sorted(prefixes)}")
    prefix = f"{prefixes.pop()}." if prefixes else ""
    rules = [
        (tuple(t.replace("@", prefix, 1) for t in r.hf), r.original, r.to_original) for r in RULES
    ]
    return _convert(state, rules, "Hugging Face -> original conversion")


def is_original_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys look like the original SHI-Labs layout (fused `attn.qkv`)."""
    keys = list(keys)
    return any(k.startswith("patch_embed.") for k in keys) and any(
        re.fullmatch(r"levels\.\d+\.blocks\.\d+\.attn\.qkv\.weight", k) for k in keys
    )
