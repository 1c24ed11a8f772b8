"""`NatConfig`: the one configuration of NAT (arXiv 2204.07143) and DiNAT (arXiv 2209.15001).

Field names and defaults follow Hugging Face `NatConfig` / `DinatConfig` (transformers 4.52), so a
`config.json` maps onto it one to one; the translation (`from_hf_config` / `to_hf_config`) is the
converter's, in `natjax.convert.hf_config`. DiNAT is NAT with per-layer dilations:
`model_type="dinat"` plus `dilations` (one list per stage, one entry per layer); NAT has
`dilations=None`.

The config is a frozen, hashable dataclass (lists are normalised to tuples, `id2label` to a tuple
of names) so that models can keep it as static metadata under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

MODEL_TYPES = ("nat", "dinat")
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")

# Hugging Face `DinatConfig` default dilations (for the default depths (3, 4, 6, 5), 224x224 input).
DINAT_DEFAULT_DILATIONS = ((1, 8, 1), (1, 4, 1, 4), (1, 2, 1, 2, 1, 2), (1, 1, 1, 1, 1))

# Sanity bounds: far beyond every published NAT/DiNAT (and any plausible one), small enough
# that a hostile or mistyped config.json cannot ask for terabytes before a check fails.
MAX_STAGES = 8
MAX_LAYERS_PER_STAGE = 1024
MAX_KERNEL_SIZE = 127
MAX_DILATION = 1024
MAX_CHANNELS = 2**16  # of the widest (last) stage: embed_dim * 2**(num_stages - 1)
MAX_NUM_CHANNELS = 64  # input image channels
MAX_MLP_RATIO = 64.0
MAX_LABELS = 1_000_000
MAX_LABEL_CHARS = 1000

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 8


def short_repr(value: Any) -> str:
    """`repr(value)` cut to about 60 characters and 8 items (error messages stay one line)."""
    return _SHORT.repr(value)


def _bad(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"NatConfig: invalid `{field}`={short_repr(value)}; expected {allowed}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_tuple(field: str, value: Any, high: int, max_len: int | None = None) -> tuple[int, ...]:
    allowed = f"a non-empty sequence of ints in [1, {high}]"
    if max_len is not None:
        allowed += f", at most {max_len} entries"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _bad(field, value, allowed)
    out = tuple(value)
    too_long = max_len is not None and len(out) > max_len
    if not out or too_long or not all(_is_int(v) and 0 < v <= high for v in out):
        raise _bad(field, value, allowed)
    return out


@dataclasses.dataclass(frozen=True)
class NatConfig:
    """Architecture of a NAT or DiNAT model (Hugging Face field names and defaults).

    Attributes:
      model_type: "nat" (no dilation) or "dinat" (per-layer `dilations`).
      patch_size: must be 4 (two stride-2 3x3 convolutions, as in the papers and HF).
      num_channels: input image channels.
      embed_dim: channels of stage 1; stage `i` has `embed_dim * 2**i`.
      depths: layers per stage.
      num_heads: attention heads per stage.
      kernel_size: neighborhood size (odd).
      dilations: None for NAT; for DiNAT one tuple per stage with one dilation per layer.
      mlp_ratio: MLP hidden width / channels.
      qkv_bias: whether query/key/value projections have a bias.
      hidden_dropout_prob: dropout after the embeddings and the MLP.
      attention_probs_dropout_prob: dropout after the attention output projection (the fused
        neighborhood-attention op cannot drop attention probabilities; see the model docs).
      drop_path_rate: stochastic-depth rate of the last layer (linear from 0 over all layers).
      hidden_act: MLP activation; "gelu" is the exact erf GELU.
      layer_norm_eps: epsilon of the per-layer and final LayerNorms (HF keeps the embedding,
        downsampler and backbone norms at PyTorch's default 1e-5).
      layer_scale_init_value: > 0 enables layer scale (one learnable vector per branch).
      out_features, out_indices: backbone outputs, names from `stage_names` ("stem", "stage1",
        ...) and their indices; either may be given, the other is derived (default: last stage).
      num_labels: classifier outputs (0 = no classifier head, pooled features are returned).
      id2label: class names in index order (a `{index: name}` mapping is accepted); None means
        Hugging Face's placeholders "LABEL_0", "LABEL_1", ...
      num_kv_heads: natjax extension, not in Hugging Face's configs: key/value heads per stage
        for GQA/MQA (each dividing that stage's `num_heads`); None is multi-head attention.
      stride: natjax extension: strided neighborhood attention in every layer (NATTEN's
        definition, `natjax.na2d`'s `stride`), `1 <= stride <= kernel_size`; 1 is NAT/DiNAT.
    """

    model_type: str = "nat"
    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 64
    depths: tuple[int, ...] = (3, 4, 6, 5)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    kernel_size: int = 7
    dilations: tuple[tuple[int, ...], ...] | None = None
    mlp_ratio: float = 3.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    layer_scale_init_value: float = 0.0
    out_features: tuple[str, ...] | None = None
    out_indices: tuple[int, ...] | None = None
    num_labels: int | None = None
    id2label: tuple[str, ...] | None = None
    num_kv_heads: tuple[int, ...] | None = None
    stride: int = 1

    def __post_init__(self) -> None:
        setf = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.model_type not in MODEL_TYPES:
            raise _bad("model_type", self.model_type, f"one of {MODEL_TYPES}")
        if self.patch_size != 4:
            raise _bad("patch_size", self.patch_size, "4 (the only patch size NAT/DiNAT define)")
        for name, high in (
            ("num_channels", MAX_NUM_CHANNELS),
            ("embed_dim", MAX_CHANNELS),
            ("kernel_size", MAX_KERNEL_SIZE),
        ):
            value = getattr(self, name)
            if not _is_int(value) or not 0 < value <= high:
                raise _bad(name, value, f"an int in [1, {high}]")
        if self.kernel_size % 2 == 0:
            raise _bad("kernel_size", self.kernel_size, "an odd int (neighborhoods are centred)")
        setf("depths", _int_tuple("depths", self.depths, MAX_LAYERS_PER_STAGE, MAX_STAGES))
        widest = self.embed_dim * 2 ** (len(self.depths) - 1)
        if widest > MAX_CHANNELS:
            raise _bad(
                "embed_dim",
                self.embed_dim,
                f"embed_dim * 2**(stages - 1) <= {MAX_CHANNELS} (the last of "
                f"{len(self.depths)} stages would have {widest} channels)",
            )
        setf("num_heads", _int_tuple("num_heads", self.num_heads, MAX_CHANNELS))
        if len(self.num_heads) != len(self.depths):
            raise _bad("num_heads", self.num_heads, f"{len(self.depths)} entries, one per stage")
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if dim % heads:
                raise _bad("num_heads", self.num_heads, f"stage {i + 1} heads dividing {dim}")
        self._check_dilations()
        self._check_kv_heads_and_stride()
        if not _is_number(self.mlp_ratio) or not 0 < self.mlp_ratio <= MAX_MLP_RATIO:
            raise _bad("mlp_ratio", self.mlp_ratio, f"a finite number in (0, {MAX_MLP_RATIO:g}]")
        if int(self.mlp_ratio * widest) < 1:
            raise _bad("mlp_ratio", self.mlp_ratio, "a ratio giving MLPs at least 1 unit wide")
        if not isinstance(self.qkv_bias, bool):
            raise _bad("qkv_bias", self.qkv_bias, "a bool")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise _bad(name, value, "a probability in [0, 1)")
        if self.hidden_act not in HIDDEN_ACTS:
            raise _bad("hidden_act", self.hidden_act, f"one of {HIDDEN_ACTS}")
        if not _is_number(self.layer_norm_eps) or not 0 < self.layer_norm_eps <= 1:
            raise _bad("layer_norm_eps", self.layer_norm_eps, "a finite number in (0, 1]")
        value = self.layer_scale_init_value
        if not _is_number(value) or not 0 <= value <= 1e3:
            raise _bad(
                "layer_scale_init_value", value, "a finite number in [0, 1000] (0 disables it)"
            )
        self._check_labels()
        self._check_out_features()

    def _check_kv_heads_and_stride(self) -> None:
        # natjax extensions (issue 12): not in Hugging Face's Nat/DinatConfig, which are
        # multi-head attention with stride 1 (the defaults here).
        if self.num_kv_heads is not None:
            kv = _int_tuple("num_kv_heads", self.num_kv_heads, MAX_CHANNELS)
            if len(kv) != len(self.num_heads) or any(
                h % k for h, k in zip(self.num_heads, kv, strict=True)
            ):
                raise _bad(
                    "num_kv_heads",
                    self.num_kv_heads,
                    f"None or one int per stage dividing num_heads {self.num_heads}",
                )
            object.__setattr__(self, "num_kv_heads", kv)
        if not _is_int(self.stride) or not 1 <= self.stride <= self.kernel_size:
            raise _bad("stride", self.stride, f"an int in [1, kernel_size={self.kernel_size}]")

    def _check_dilations(self) -> None:
        if self.model_type == "nat":
            if self.dilations is not None:
                raise _bad("dilations", self.dilations, "None for model_type='nat' (use 'dinat')")
            return
        dilations = self.dilations
        if dilations is None:
            if self.depths != (3, 4, 6, 5):
                raise _bad("dilations", None, "one list per stage (no default for these depths)")
            dilations = DINAT_DEFAULT_DILATIONS
        if isinstance(dilations, str) or not isinstance(dilations, Sequence):
            raise _bad("dilations", dilations, "one sequence of ints per stage")
        if len(dilations) != len(self.depths):
            raise _bad("dilations", dilations, f"{len(self.depths)} lists, one per stage")
        out = tuple(_int_tuple("dilations", stage, MAX_DILATION) for stage in dilations)
        if tuple(len(s) for s in out) != self.depths:
            raise _bad("dilations", dilations, f"per-stage lengths equal to depths {self.depths}")
        object.__setattr__(self, "dilations", out)

    def _check_labels(self) -> None:
        num = self.num_labels
        if num is not None and (not _is_int(num) or not 0 <= num <= MAX_LABELS):
            raise _bad("num_labels", num, f"an int in [0, {MAX_LABELS}]")
        labels = self.id2label
        if isinstance(labels, Mapping):
            if len(labels) > MAX_LABELS:
                raise _bad("id2label", labels, f"at most {MAX_LABELS} names")
            try:
                items = sorted((int(k), v) for k, v in labels.items())
            except (TypeError, ValueError):
                raise _bad("id2label", labels, "a mapping with int-like keys") from None
            if [k for k, _ in items] != list(range(len(items))):
                raise _bad("id2label", labels, "keys 0 .. n-1")
            labels = tuple(v for _, v in items)
        elif labels is not None:
            if isinstance(labels, str) or not isinstance(labels, Sequence):
                raise _bad("id2label", labels, "a sequence of names or an {index: name} mapping")
            if len(labels) > MAX_LABELS:
                raise _bad("id2label", labels, f"at most {MAX_LABELS} names")
            labels = tuple(labels)
        if labels is not None:
            labels = tuple(str(v) if _is_int(v) else v for v in labels)
        if labels is not None and not all(
            isinstance(v, str) and len(v) <= MAX_LABEL_CHARS for v in labels
        ):
            raise _bad("id2label", labels, f"names that are strings of <= {MAX_LABEL_CHARS} chars")
        if num is None:
            # Hugging Face's PretrainedConfig default is two labels.
            num = 2 if labels is None else len(labels)
        if labels is not None and len(labels) != num:
            raise _bad("id2label", labels, f"{num} names (num_labels)")
        if labels is not None and all(v == f"LABEL_{i}" for i, v in enumerate(labels)):
            labels = None  # Hugging Face's placeholder names; None stands for them.
        object.__setattr__(self, "id2label", labels)
        object.__setattr__(self, "num_labels", num)

    def label_name(self, index: int) -> str:
        """The name of class `index`: `id2label[index]`, or Hugging Face's "LABEL_<index>"."""
        if not 0 <= index < self.num_labels:
            raise ValueError(f"label_name: `index`={index}; expected [0, {self.num_labels}).")
        return self.id2label[index] if self.id2label is not None else f"LABEL_{index}"

    def _check_out_features(self) -> None:
        names = self.stage_names
        features, indices = self.out_features, self.out_indices
        if features is not None:
            if isinstance(features, str) or not isinstance(features, Sequence):
                raise _bad("out_features", features, f"a sequence of names from {names}")
            features = tuple(features)
            unknown = [f for f in features if f not in names]
            if unknown or not features:
                raise _bad("out_features", features, f"non-empty names from {names}")
        if indices is not None:
            if isinstance(indices, str) or not isinstance(indices, Sequence):
                raise _bad("out_indices", indices, f"a sequence of ints in [0, {len(names)})")
            indices = tuple(i + len(names) if isinstance(i, int) and i < 0 else i for i in indices)
            if not indices or not all(isinstance(i, int) and 0 <= i < len(names) for i in indices):
                raise _bad("out_indices", self.out_indices, f"ints in [0, {len(names)})")
        if features is None and indices is None:
            features, indices = (names[-1],), (len(names) - 1,)
        elif features is None:
            features = tuple(names[i] for i in indices)
        elif indices is None:
            indices = tuple(names.index(f) for f in features)
        elif tuple(names.index(f) for f in features) != indices:
            raise _bad("out_indices", indices, f"the indices of out_features {features}")
        if list(indices) != sorted(set(indices)):
            raise _bad("out_features", features, f"distinct stages in the order of {names}")
        object.__setattr__(self, "out_features", features)
        object.__setattr__(self, "out_indices", indices)

    # ----------------------------------------------------------------------------- derived values
    @property
    def num_stages(self) -> int:
        """Number of stages (levels)."""
        return len(self.depths)

    @property
    def stage_names(self) -> tuple[str, ...]:
        """Backbone stage names: "stem" (embeddings) then "stage1" ... "stageN"."""
        return ("stem",) + tuple(f"stage{i + 1}" for i in range(len(self.depths)))

    @property
    def hidden_size(self) -> int:
        """Channels of the last stage (width of `pooler_output`)."""
        return self.stage_dim(self.num_stages - 1)

    def stage_dim(self, stage: int) -> int:
        """Channels of stage `stage` (0-based)."""
        return self.embed_dim * 2**stage

    def stage_dilations(self, stage: int) -> tuple[int, ...]:
        """Per-layer dilations of stage `stage` (all 1 for NAT)."""
        if self.dilations is None:
            return (1,) * self.depths[stage]
        return self.dilations[stage]

    def drop_path_rates(self) -> tuple[float, ...]:
        """Stochastic-depth rate of every layer: linear from 0 to `drop_path_rate` (NAT sec. 4)."""
        n = sum(self.depths)
        if n == 1:
            return (0.0,)
        return tuple(self.drop_path_rate * i / (n - 1) for i in range(n))

    def replace(self, **changes: Any) -> NatConfig:
        """A copy with `changes` applied (validated again).

        Changing only one of `out_features` / `out_indices` re-derives the other,
        and changing only `num_labels` drops `id2label`, instead of reporting a conflict.
        """
        if "out_features" in changes:
            changes.setdefault("out_indices", None)
        if "out_indices" in changes and "out_features" not in changes:
            changes["out_features"] = None
        if "num_labels" in changes:
            changes.setdefault("id2label", None)
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line summary, e.g. for logs."""
        dil = "" if self.dilations is None else f" dilations={[list(d) for d in self.dilations]}"
        return (
            f"{self.model_type}: embed_dim={self.embed_dim} depths={list(self.depths)} "
            f"heads={list(self.num_heads)} kernel={self.kernel_size}{dil} "
            f"mlp_ratio={self.mlp_ratio} labels={self.num_labels}"
        )
