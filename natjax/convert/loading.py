"""`from_pretrained`: any NAT/DiNAT checkpoint into a natjax model, in five named phases.

1. `locate`: a local folder/file, or a hub id fetched into (or read offline from) the Hugging
   Face cache (`natjax.convert.hub`).
2. `read_checkpoint`: its config (folder config.json, `config=`, or the config.json next to a
   weights file) and its weights in their own key layout (HF, SHI-Labs original, natjax).
3. `target_config`: `num_labels=` and `NatConfig` field overrides applied.
4. `adapt_state`: the weights in Hugging Face keys, matched to the target model: another
   architecture's head is dropped (a classification checkpoint into `NatModel`/`NatBackbone`),
   a new head (`num_labels` changed, or none in the source) or mismatched tensors
   (`ignore_mismatched_sizes=True`, as in transformers) stay freshly initialised, anything else
   that does not fit is one `ValueError` listing it.
5. `fill`: the model is built abstractly (nothing initialised) when every parameter comes from
   the checkpoint, concretely otherwise, and filled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from natjax.convert import checkpoint as ckpt
from natjax.convert import hub, torch_zip
from natjax.convert.hf import hf_to_nnx, key_table, nnx_to_hf, param_variables, strip_base_prefix
from natjax.convert.original import mismatch_error
from natjax.convert.original import original_to_hf as _original_to_hf
from natjax.convert.weights import check_float_weights, read_sharded, read_weights
from natjax.models import NatConfig
from natjax.models.preprocessing import PreprocessConfig
from natjax.models.pretrained import register_checkpoint_io

logger = logging.getLogger(__name__)

# HF key prefixes that belong to one architecture only (heads and final norms).
HEAD_PREFIXES = ("classifier.", "layernorm.", "hidden_states_norms.")
# Model constructor keywords (everything else in **kwargs must be a NatConfig field).
MODEL_KWARGS = ("rngs", "dtype", "param_dtype", "attention_implementation", "remat")
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(NatConfig))


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What `read_checkpoint` found: the source's config, architecture, weights and layout."""

    source: str
    config: NatConfig
    architecture: str
    state: Mapping[str, np.ndarray]
    layout: str
    folder: Path | None


# ------------------------------------------------------------------------------- 1. locate
def locate(
    source: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local path for `source`: itself when it exists, else the hub snapshot of a repo id.

    Raises:
      FileNotFoundError: neither a local path nor a reachable or cached hub repo.
    """
    path = Path(source)
    if path.exists():
        if revision is not None:
            logger.warning("revision=%r ignored: %s is a local path", revision, path)
        return path
    if hub.is_repo_id(source):
        return hub.download_repo(os.fspath(source), revision=revision, cache_dir=cache_dir)
    raise FileNotFoundError(
        f"checkpoint not found: {source} (not a local path; hub ids look like 'owner/name', "
        "e.g. 'shi-labs/nat-mini-in1k-224')"
    )


# ------------------------------------------------------------------------ 2. read_checkpoint
def _find_weights(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """Weights of a checkpoint folder and the file they came from."""
    single = (
        ckpt.NATJAX_WEIGHTS_NAME,
        ckpt.HF_SAFETENSORS_NAME,
        ckpt.HF_TORCH_NAME,
        ckpt.ORIGINAL_NAME,
    )
    for name in single:
        if (folder / name).is_file():
            return read_weights(folder / name), name
    if (folder / ckpt.HF_SAFETENSORS_INDEX).is_file():
        return read_sharded(folder / ckpt.HF_SAFETENSORS_INDEX), ckpt.HF_SAFETENSORS_INDEX
    found = sorted(p.name for p in folder.iterdir())[:10]
    expected = ", ".join(single[:2] + (ckpt.HF_SAFETENSORS_INDEX,) + single[2:])
    raise FileNotFoundError(
        f"{folder}: no weights file; expected one of {expected} (folder holds {found})"
    )


def _select(path: Path, key: str) -> dict[str, np.ndarray]:
    """The state dict under `key` of a torch checkpoint file (or of the one in folder `path`)."""
    if path.is_dir():
        files = [path / n for n in (ckpt.HF_TORCH_NAME, ckpt.ORIGINAL_NAME) if (path / n).is_file()]
        if not files:
            raise FileNotFoundError(
                f"{path}: state_dict_key={key!r} needs a torch checkpoint in the folder "
                f"({ckpt.HF_TORCH_NAME} or {ckpt.ORIGINAL_NAME}); it has none"
            )
        path = files[0]
    return torch_zip.select_state_dict(torch_zip.read_torch_zip(path), key)[0]


def _architecture_from_keys(keys, layout: str) -> str:
    """The architecture a state dict's keys show (heads and final norms differ)."""
    if layout == "original":
        return "classification"
    # First path component: "classifier.weight" (HF) and "classifier/kernel" (natjax) alike.
    roots = {re.split(r"[./]", k, maxsplit=1)[0] for k in keys}
    if "hidden_states_norms" in roots:
        return "backbone"
    if "classifier" in roots:
        return "classification"
    return "model"


def read_checkpoint(
    path: Path, config: Any = None, state_dict_key: str | None = None
) -> Checkpoint:
    """The config, architecture and weights of a local checkpoint folder or weights file."""
    if path.is_dir():
        if config is None:
            if not (path / ckpt.CONFIG_NAME).is_file():
                raise FileNotFoundError(f"{path}: no {ckpt.CONFIG_NAME} (pass config=...)")
            config = path / ckpt.CONFIG_NAME
        if state_dict_key is None:
            state, name = _find_weights(path)
        else:
            state, name = _select(path, state_dict_key), "weights"
        source, folder = str(path / name), path
    else:
        sibling = path.parent / ckpt.CONFIG_NAME
        if config is None and sibling.is_file():
            config = sibling  # a weights file next to its config.json
        if config is None:
            raise ValueError(
                f"{path} is a single weights file with no {ckpt.CONFIG_NAME} beside it: pass "
                "config= (a NatConfig, a preset name or a config.json path)"
            )
        state = _select(path, state_dict_key) if state_dict_key else read_weights(path)
        source, folder = str(path), path.parent
    config, file_arch = ckpt.resolve_config(config)
    layout = ckpt.detect_layout(state)
    arch = file_arch or _architecture_from_keys(state, layout)
    if layout == "original" and arch != "classification":
        raise ValueError(f"{source}: original SHI-Labs checkpoints hold classification models")
    return Checkpoint(source, config, arch, state, layout, folder)


# -------------------------------------------------------------------------- 3. target_config
def split_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`NatConfig` field overrides, model constructor keywords); anything else is an error."""
    unknown = sorted(set(kwargs) - _CONFIG_FIELDS - set(MODEL_KWARGS))
    if unknown:
        raise ValueError(
            f"unknown keyword argument(s) {unknown}: expected NatConfig fields or model "
            f"constructor keywords {MODEL_KWARGS}"
        )
    overrides = {k: v for k, v in kwargs.items() if k in _CONFIG_FIELDS}
    return overrides, {k: v for k, v in kwargs.items() if k in MODEL_KWARGS}


def target_config(config: NatConfig, num_labels: int | None, overrides: Mapping[str, Any]):
    """`config` with `num_labels` (a new head drops `id2label`) and field overrides applied."""
    changes = dict(overrides)
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 0:
            raise ValueError(f"num_labels={num_labels!r}; expected an int >= 0")
        if num_labels != config.num_labels:
            changes["num_labels"] = num_labels
    return config.replace(**changes) if changes else config


# ---------------------------------------------------------------------------- 4. adapt_state
def hf_state(ckp: Checkpoint) -> dict[str, np.ndarray]:
    """The checkpoint's weights in Hugging Face keys and layouts, whatever its layout."""
    if ckp.layout == "original":
        return _original_to_hf(ckp.state, ckp.config.model_type)
    if ckp.layout == "natjax":
        source = ckpt.instantiate_architecture(ckp.config, ckp.architecture, abstract=True)
        ckpt.load_nnx_flat_state(source, ckp.state, f"loading {ckp.source} (natjax layout)")
        return nnx_to_hf(source)
    return dict(ckp.state)


def _hf_reference_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """HF key -> shape the model needs, without materialising (works on abstract models)."""
    params = param_variables(model)
    shapes = {}
    for entry in key_table(model):
        # Zero-stride stand-ins: the hooks only transpose/stack, so shapes come out right.
        views = [
            np.broadcast_to(np.zeros((), np.float32), params[p].get_value().shape)
            for p in entry.nnx_paths
        ]
        shapes[entry.hf_key] = tuple(entry.hook.to_hf(*views).shape)
    return shapes


def _align_prefix(model: nnx.Module, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Base-model keys with the "nat."/"dinat." prefix a classification target expects (and
    without it for NatModel/NatBackbone, as transformers' `base_model_prefix`)."""
    if ckpt.model_architecture(model) != "classification":
        return strip_base_prefix(model, state)
    prefix = f"{model.config.model_type}."
    if any(k.startswith(prefix) for k in state):
        return state
    return {(k if k.startswith("classifier.") else prefix + k): v for k, v in state.items()}


def _is_head(key: str, model_type: str) -> bool:
    return key.removeprefix(f"{model_type}.").startswith(HEAD_PREFIXES)


def adapt_state(
    model: nnx.Module,
    state: dict[str, np.ndarray],
    *,
    heads_differ: bool,
    new_head: bool,
    ignore_mismatched_sizes: bool,
    what: str,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Match HF-keyed `state` to `model` (possibly abstract).

    Args:
      model: the target model.
      state: HF key -> array.
      heads_differ: the source has another architecture (its head/norms may be dropped, the
        target's left fresh).
      new_head: the classifier changed size (`num_labels`): its source tensors are dropped.
      ignore_mismatched_sizes: leave any wrongly shaped tensor freshly initialised.
      what: start of error messages.

    Returns:
      The state to load and the HF keys left freshly initialised.
    """
    model_type = model.config.model_type
    state = _align_prefix(model, state)
    reference = _hf_reference_shapes(model)
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing = set(reference) - set(state)
    unexpected = set(state) - set(reference)
    shapes = {
        k: (tuple(state[k].shape), reference[k])
        for k in set(state) & set(reference)
        if tuple(state[k].shape) != reference[k]
    }
    fresh = {k for k in missing if k.startswith("classifier.") and new_head}
    if heads_differ:
        fresh |= {k for k in missing if _is_head(k, model_type)}
        dropped = {k for k in unexpected if _is_head(k, model_type)}
        unexpected -= dropped
        if dropped:
            logger.info("%s: dropped %d head tensor(s) %s", what, len(dropped), sorted(dropped)[:4])
    if ignore_mismatched_sizes and shapes:
        logger.warning("%s: freshly initialised (ignore_mismatched_sizes): %s", what, shapes)
        fresh |= set(shapes)
        shapes = {}
    err = mismatch_error(what, missing - fresh, unexpected, shapes)
    if err is not None:
        hint = " (pass ignore_mismatched_sizes=True to initialise them afresh)" if shapes else ""
        raise ValueError(str(err) + hint)
    state = {k: v for k, v in state.items() if k in reference and k not in fresh}
    check_float_weights(state, what)  # every Hugging Face NAT/DiNAT tensor is a float parameter
    if fresh:
        logger.warning("%s: newly initialised %s", what, sorted(fresh)[:6])
    return state, sorted(fresh)


# ----------------------------------------------------------------------------------- public
def from_pretrained(
    source: str | os.PathLike,
    config: Any = None,
    *,
    architecture: str | None = None,
    num_labels: int | None = None,
    ignore_mismatched_sizes: bool = False,
    state_dict_key: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nnx.Module:
    """Load a NAT/DiNAT model from a checkpoint folder, a weights file or a hub id.

    Args:
      source: a Hugging Face folder, a natjax checkpoint folder, a weights file (`.safetensors`,
        `.bin`, `.pth`, `.pt`; HF, original SHI-Labs or natjax layout; the config.json next to
        it is used when `config` is None), or a Hugging Face hub id ("shi-labs/nat-mini-in1k-224",
        fetched into the hub cache; `HF_HUB_OFFLINE=1` reads only the cache).
      config: overrides the checkpoint's config: a `NatConfig`, a preset name or a config.json.
      architecture: "classification", "backbone" or "model" (default: the checkpoint's). A
        classification checkpoint loads into "model"/"backbone" with its head dropped.
      num_labels: classifier size; a different size than the checkpoint's gives a freshly
        initialised head (fine-tuning), 0 gives none.
      ignore_mismatched_sizes: leave tensors whose shape differs from the model's freshly
        initialised instead of raising (as in transformers).
      state_dict_key: for torch checkpoints nesting their weights (e.g. "model").
      revision, cache_dir: hub revision and cache folder (hub ids only).
      **kwargs: `NatConfig` field overrides (e.g. `drop_path_rate=0.1`) and model constructor
        keywords (`dtype`, `param_dtype`, `attention_implementation`, `remat`, `rngs`, which
        also seeds fresh heads).

    Returns:
      The nnx model holding the checkpoint's weights.

    Raises:
      FileNotFoundError: missing path, config or weights, or a hub id neither reachable nor
        cached (the message says what to do).
      ValueError: unsupported/corrupt files, unknown presets or keywords, or weights that do not
        fit (missing/unexpected keys and shape mismatches are listed).
    """
    ckp = read_checkpoint(locate(source, revision, cache_dir), config, state_dict_key)
    overrides, model_kwargs = split_kwargs(kwargs)
    config = target_config(ckp.config, num_labels, overrides)
    architecture = architecture or ckp.architecture
    if architecture not in ckpt.ARCHITECTURES:
        raise ValueError(
            f"architecture={architecture!r}; expected one of {sorted(ckpt.ARCHITECTURES)}"
        )
    logger.info("%s: %s layout, %s, %s", ckp.source, ckp.layout, architecture, config.describe())
    if ckp.layout == "natjax" and config == ckp.config and architecture == ckp.architecture:
        # Same model as saved: fill it straight from the natjax layout.
        model = ckpt.instantiate_architecture(config, architecture, abstract=True, **model_kwargs)
        what = f"loading {ckp.source} (natjax layout) into {type(model).__name__}"
        ckpt.load_nnx_flat_state(model, ckp.state, what)
        _check_filled(model, what)
        return _with_preprocessing(model, ckp)
    shell = ckpt.instantiate_architecture(config, architecture, abstract=True, **model_kwargs)
    what = f"loading {ckp.source} ({ckp.layout} layout) into {type(shell).__name__}"
    state, fresh = adapt_state(
        shell,
        hf_state(ckp),
        heads_differ=architecture != ckp.architecture,
        new_head=config.num_labels != ckp.config.num_labels,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        what=what,
    )
    # Fresh tensors need real initial values: only then is the model initialised concretely.
    model = ckpt.instantiate_architecture(config, architecture, **model_kwargs) if fresh else shell
    hf_to_nnx(model, state, strict=not fresh)
    _check_filled(model, what)
    return _with_preprocessing(model, ckp)


def _check_filled(model: nnx.Module, what: str) -> None:
    """Raises when a parameter of `model` is still abstract (a shape without a value)."""
    abstract = [
        "/".join(map(str, path))
        for path, var in nnx.to_flat_state(nnx.state(model))
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise ValueError(f"{what}: weights left unset: {abstract[:5]} ({len(abstract)} in all)")


def _with_preprocessing(model: nnx.Module, ckp: Checkpoint) -> nnx.Module:
    """Attach the checkpoint's `preprocessor_config.json` settings (`natjax.preprocess` and
    `save_pretrained` use them); models without one get timm's default when preprocessing."""
    settings = PreprocessConfig.from_folder(ckp.folder) if ckp.folder is not None else None
    if settings is not None:
        model.preprocessing = settings
    return model


register_checkpoint_io(from_pretrained, ckpt.save_pretrained)
