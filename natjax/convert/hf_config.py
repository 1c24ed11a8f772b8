"""Hugging Face `config.json` <-> `NatConfig`: the translation, on the converter's side.

`NatConfig` (natjax.models) is the architecture only; this module knows the Hugging Face file:
which keys it may carry (`HF_IGNORED_KEYS`: bookkeeping and derived values, the derived ones
checked for consistency), which `architectures` names map to which model kind, and how a
`config.json` is read safely (`natjax.models.json_file.read_json_object`: bounded size and
nesting, one ValueError).

    config = from_hf_config("path/to/hf_folder")           # or a config.json path, or a dict
    data = to_hf_config(config, "classification")          # what transformers.AutoConfig reads
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from natjax.models.config import MODEL_TYPES, NatConfig, short_repr
from natjax.models.json_file import read_json_object

# Keys a Hugging Face NAT/DiNAT `config.json` may carry that do not change the network: derived
# values (hidden_size, num_layers, stage_names, label2id, checked for consistency where derivable),
# bookkeeping, initialisation-only settings and generic `PretrainedConfig` fields.
HF_IGNORED_KEYS = frozenset(
    {
        "_attn_implementation_autoset",
        "_name_or_path",
        "add_cross_attention",
        "architectures",
        "bad_words_ids",
        "begin_suppress_tokens",
        "bos_token_id",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "diversity_penalty",
        "do_sample",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "eos_token_id",
        "exponential_decay_length_penalty",
        "finetuning_task",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "hidden_size",
        "initializer_range",
        "is_decoder",
        "is_encoder_decoder",
        "label2id",
        "length_penalty",
        "max_length",
        "min_length",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_layers",
        "num_return_sequences",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "pad_token_id",
        "prefix",
        "problem_type",
        "pruned_heads",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict",
        "return_dict_in_generate",
        "sep_token_id",
        "stage_names",
        "suppress_tokens",
        "task_specific_params",
        "temperature",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tie_word_embeddings",
        "tokenizer_class",
        "top_k",
        "top_p",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "typical_p",
        "use_bfloat16",
    }
)

# Hugging Face architecture class names and the natjax model kind each one is.
HF_ARCHITECTURES = {
    "NatForImageClassification": "classification",
    "DinatForImageClassification": "classification",
    "NatModel": "model",
    "DinatModel": "model",
    "NatBackbone": "backbone",
    "DinatBackbone": "backbone",
}
# (model_type, kind) -> the class name `to_hf_config` writes.
_HF_NAMES = {
    ("dinat" if name.startswith("Dinat") else "nat", kind): name
    for name, kind in HF_ARCHITECTURES.items()
}


def kind_from_hf_config(config: Mapping[str, Any]) -> str:
    """The model kind named by a HF `config.json`'s `architectures` ("classification" if absent)."""
    archs = config.get("architectures") or ["NatForImageClassification"]
    if isinstance(archs, str):
        archs = [archs]
    if archs[0] not in HF_ARCHITECTURES:
        raise ValueError(
            f"Unsupported `architectures`={archs!r}; expected one of {sorted(HF_ARCHITECTURES)}."
        )
    return HF_ARCHITECTURES[archs[0]]


def from_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> NatConfig:
    """Reads a Hugging Face NAT/DiNAT `config.json`.

    Args:
      path_or_dict: a `config.json` path, a folder holding one, or the parsed dict.

    Returns:
      The `NatConfig`.

    Raises:
      FileNotFoundError: if the path does not exist.
      ValueError: for a model_type other than nat/dinat, unknown keys (listed), keys that
        contradict each other, or invalid values (a file's errors start with its path).
    """
    if isinstance(path_or_dict, Mapping):
        return _from_hf_dict(dict(path_or_dict))
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_hf_config: no such file: {path}")
    try:
        return _from_hf_dict(read_json_object(path))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _from_hf_dict(data: dict[str, Any]) -> NatConfig:
    model_type = data.pop("model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"from_hf_config: `model_type`={short_repr(model_type)}; expected one of {MODEL_TYPES}."
        )
    fields = {f.name for f in dataclasses.fields(NatConfig)} - {"model_type"}
    unknown = sorted(k for k in data if k not in fields and k not in HF_IGNORED_KEYS)
    if unknown:
        raise ValueError(
            f"from_hf_config: unknown keys {short_repr(unknown)}; known: {sorted(fields)} (plus "
            "ignored Hugging Face bookkeeping keys)."
        )
    config = NatConfig(model_type=model_type, **{k: v for k, v in data.items() if k in fields})
    for key, want in (
        ("hidden_size", config.hidden_size),
        ("num_layers", config.num_stages),
        ("stage_names", list(config.stage_names)),
    ):
        if key in data and data[key] != want:
            raise ValueError(
                f"from_hf_config: `{key}`={short_repr(data[key])} contradicts the other fields, "
                f"which give {want!r}."
            )
    return config


def to_hf_config(config: NatConfig, architecture: str = "classification") -> dict[str, Any]:
    """The Hugging Face `config.json` content for `config`.

    Args:
      config: the architecture.
      architecture: "classification", "model" or "backbone" (sets `architectures`).

    Returns:
      A JSON-serialisable dict that `transformers.AutoConfig` loads as Nat/DinatConfig.
    """
    key = (config.model_type, architecture)
    if key not in _HF_NAMES:
        raise ValueError(
            f"to_hf_config: `architecture`={architecture!r}; expected 'classification', 'model' "
            "or 'backbone'."
        )
    labels = [config.label_name(i) for i in range(config.num_labels)]
    out: dict[str, Any] = {
        "architectures": [_HF_NAMES[key]],
        "model_type": config.model_type,
        "patch_size": config.patch_size,
        "num_channels": config.num_channels,
        "embed_dim": config.embed_dim,
        "depths": list(config.depths),
        "num_heads": list(config.num_heads),
        "kernel_size": config.kernel_size,
        "mlp_ratio": float(config.mlp_ratio),
        "qkv_bias": config.qkv_bias,
        "hidden_dropout_prob": float(config.hidden_dropout_prob),
        "attention_probs_dropout_prob": float(config.attention_probs_dropout_prob),
        "drop_path_rate": float(config.drop_path_rate),
        "hidden_act": config.hidden_act,
        "layer_norm_eps": float(config.layer_norm_eps),
        "layer_scale_init_value": float(config.layer_scale_init_value),
        "initializer_range": 0.02,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_stages,
        "stage_names": list(config.stage_names),
        "out_features": list(config.out_features),
        "out_indices": list(config.out_indices),
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "torch_dtype": "float32",
    }
    if config.dilations is not None:
        out["dilations"] = [list(d) for d in config.dilations]
    # natjax's extensions (GQA/MQA, strided NA) are written only when used: Hugging Face's
    # configs load them as extra attributes, but its models would build multi-head attention.
    if config.num_kv_heads is not None:
        out["num_kv_heads"] = list(config.num_kv_heads)
    if config.stride != 1:
        out["stride"] = config.stride
    return dict(sorted(out.items()))
