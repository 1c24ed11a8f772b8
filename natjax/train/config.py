"""Training configuration: frozen dataclasses, their validation and `--set key=value` overrides.

An experiment is a Python file (see experiments/configs/) whose `get_config()` returns a
`TrainConfig`; `natjax.train.defaults.load_config` loads one (or the built-in default run).
Command-line overrides address nested fields with dots (`--set optim.lr=5e-4 --set
data.batch_size=64`); each value is parsed with the field's type.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from natjax.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ModelConfig:
    """Which network to train.

    Attributes:
      preset: name for `natjax.models.get_config` (e.g. "nat_mini", "dinat_tiny").
      overrides: NatConfig fields replaced on the preset, as `(name, value)` pairs; on the
        command line give a dict literal: `--set "model.overrides={'embed_dim': 32}"`.
      dtype: compute dtype ("bfloat16" or "float32"); parameters stay float32 (master weights).
      attention_implementation: neighborhood-attention backend (None: natjax's default).
      remat: rematerialise each block in the backward pass (saves activation memory).
    """

    preset: str = "nat_mini"
    overrides: tuple[tuple[str, Any], ...] = ()
    dtype: str = "bfloat16"
    attention_implementation: str | None = None
    remat: bool = False


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline.

    Attributes:
      dataset: "digits" (scikit-learn's handwritten digits, offline), "folder:/path" (one
        sub-folder per class, with train/ and validation/ inside), or any tfds name.
      data_dir: tfds data directory (None: tfds default).
      train_split, eval_split: split names.
      image_size: side of the square network input.
      batch_size: GLOBAL batch size (all processes, before gradient accumulation splits it).
      eval_batch_size: global evaluation batch size.
      num_workers: grain worker processes per host (0: produce batches in the main process).
      crop_pct: evaluation centre-crop fraction (resize to image_size / crop_pct, crop).
      mean, std: per-channel normalisation in [0, 1] pixel units.
      digits_size: side the 8x8 digits are upsampled to (dataset "digits" only).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    image_size: int = 224
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0
    crop_pct: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    digits_size: int = 32


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations (DeiT/timm recipe used by the NAT paper, Appendix A).

    Attributes:
      rrc_scale, rrc_ratio: random-resized-crop area and aspect-ratio ranges.
      hflip: probability of a horizontal flip.
      randaugment_n, randaugment_m, randaugment_mstd: RandAugment ops per image, magnitude
        (0-10; 0 disables) and magnitude noise std.
      mixup, cutmix: Beta(alpha, alpha) parameters (0 disables each).
      mixup_switch_prob: chance of cutmix instead of mixup when both are on.
      label_smoothing: target smoothing.
      erase_prob: random-erasing probability per image.
    """

    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaugment_n: int = 2
    randaugment_m: float = 0.0
    randaugment_mstd: float = 0.5
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    erase_prob: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (or SGD) with linear warm-up then cosine decay.

    Attributes:
      optimizer: "adamw" (the papers' recipe) or "sgd" (momentum b1; same decay and schedule).
      lr: peak learning rate at `base_batch_size`; scaled linearly by batch_size/base_batch_size.
      base_batch_size: the batch size `lr` refers to (NAT: 1e-3 at 1024).
      weight_decay: decoupled weight decay, not applied to biases, norms and position biases.
      b1, b2, eps: Adam moments.
      epochs: training length.
      warmup_epochs, warmup_lr: linear warm-up from warmup_lr to the peak.
      min_lr: end of the cosine.
      grad_clip: global-norm clipping (0 disables).
      grad_accum: micro-batches per optimizer step (batch_size must divide by it).
      ema_decay: exponential moving average of the weights (0 disables).
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    base_batch_size: int = 1024
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    epochs: float = 300.0
    warmup_epochs: float = 20.0
    warmup_lr: float = 1e-6
    min_lr: float = 5e-6
    grad_clip: float = 5.0
    grad_accum: int = 1
    ema_decay: float = 0.0


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh. -1 on `data` takes all devices left over by the other axes."""

    data: int = -1
    fsdp: int = 1
    model: int = 1


@dataclass(frozen=True)
class RunConfig:
    """Bookkeeping.

    Attributes:
      workdir: where checkpoints, metrics.jsonl, TensorBoard events and plots go.
      seed: every random choice derives from it (data order, augmentation, init, dropout).
      max_steps: stop after this many optimizer steps (0: the full schedule).
      log_every: steps between progress lines / metric records.
      eval_every: steps between evaluations (0: once per epoch).
      checkpoint_every: steps between checkpoints.
      keep_checkpoints: how many recent checkpoints to keep.
      init_from: a converted checkpoint directory to start from (new head if num_labels differ).
      progress: show the progress line.
    """

    workdir: str = "runs/default"
    seed: int = 0
    max_steps: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    init_from: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """One training run (see the module docstring for overrides)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        validate(self)


# Allowed values of every field: (kind, low, high), both bounds inclusive unless the kind says
# "open" ends. The bounds are sanity limits (no real run comes near them) that keep NaN/inf,
# negative sizes and absurd values (a 2**40 batch) from reaching the loop as a crash.
_PROB = ("float", 0.0, 1.0)
_RULES: dict[str, tuple] = {
    "model.preset": ("str",),
    "model.overrides": ("overrides",),
    "model.dtype": ("choice", ("bfloat16", "float16", "float32")),
    "model.attention_implementation": ("optional_str",),
    "model.remat": ("bool",),
    "data.dataset": ("str",),
    "data.data_dir": ("optional_str",),
    "data.train_split": ("str",),
    "data.eval_split": ("str",),
    "data.image_size": ("int", 1, 8192),
    "data.batch_size": ("int", 1, 2**20),
    "data.eval_batch_size": ("int", 1, 2**20),
    "data.num_workers": ("int", 0, 1024),
    "data.crop_pct": ("float_open_low", 0.0, 1.0),
    "data.mean": ("floats3", 0.0, 1.0),
    "data.std": ("floats3_open_low", 0.0, 10.0),
    "data.digits_size": ("int", 8, 1024),
    "augment.rrc_scale": ("range2", 0.0, 1.0),
    "augment.rrc_ratio": ("range2", 0.0, 100.0),
    "augment.hflip": _PROB,
    "augment.randaugment_n": ("int", 0, 16),
    "augment.randaugment_m": ("float", 0.0, 10.0),
    "augment.randaugment_mstd": ("float", 0.0, 10.0),
    "augment.mixup": ("float", 0.0, 100.0),
    "augment.cutmix": ("float", 0.0, 100.0),
    "augment.mixup_switch_prob": _PROB,
    "augment.label_smoothing": ("float_open_high", 0.0, 1.0),
    "augment.erase_prob": _PROB,
    "optim.optimizer": ("choice", ("adamw", "sgd")),
    "optim.lr": ("float_open_low", 0.0, 1e3),
    "optim.base_batch_size": ("int", 1, 2**24),
    "optim.weight_decay": ("float", 0.0, 10.0),
    "optim.b1": ("float_open_high", 0.0, 1.0),
    "optim.b2": ("float_open_high", 0.0, 1.0),
    "optim.eps": ("float_open_low", 0.0, 1.0),
    "optim.epochs": ("float_open_low", 0.0, 1e6),
    "optim.warmup_epochs": ("float", 0.0, 1e6),
    "optim.warmup_lr": ("float", 0.0, 1e3),
    "optim.min_lr": ("float", 0.0, 1e3),
    "optim.grad_clip": ("float", 0.0, 1e9),
    "optim.grad_accum": ("int", 1, 4096),
    "optim.ema_decay": ("float_open_high", 0.0, 1.0),
    "mesh.data": ("mesh",),
    "mesh.fsdp": ("mesh",),
    "mesh.model": ("mesh",),
    "run.workdir": ("str",),
    "run.seed": ("int", 0, 2**32 - 1),
    "run.max_steps": ("int", 0, 2**40),
    "run.log_every": ("int", 1, 2**40),
    "run.eval_every": ("int", 0, 2**40),
    "run.checkpoint_every": ("int", 1, 2**40),
    "run.keep_checkpoints": ("int", 1, 10_000),
    "run.init_from": ("optional_str",),
    "run.progress": ("bool",),
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _in(value: float, lo: float, hi: float, open_low: bool = False, open_high: bool = False):
    return (
        _number(value)
        and math.isfinite(value)
        and (lo < value if open_low else lo <= value)
        and (value < hi if open_high else value <= hi)
    )


def _interval(lo: float, hi: float, open_low: bool = False, open_high: bool = False) -> str:
    return f"{'(' if open_low else '['}{lo:g}, {hi:g}{')' if open_high else ']'}"


def _check_field(value: Any, rule: tuple) -> str | None:
    """What a field allows when `value` breaks its `rule`, else None."""
    kind = rule[0]
    if kind == "str":
        return None if isinstance(value, str) and value else "a non-empty string"
    if kind == "optional_str":
        return None if value is None or isinstance(value, str) else "a string or none"
    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    if kind == "choice":
        return None if value in rule[1] else f"one of {', '.join(rule[1])}"
    if kind == "int":
        lo, hi = rule[1], rule[2]
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        return None if ok else f"an integer in [{lo}, {hi}]"
    if kind == "mesh":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok and (value == -1 or 1 <= value <= 2**16) else "-1 or a size >= 1"
    if kind.startswith("floats3"):
        open_low = kind.endswith("open_low")
        ok = isinstance(value, tuple) and len(value) == 3
        ok = ok and all(_in(v, rule[1], rule[2], open_low) for v in value)
        return None if ok else f"3 finite numbers in {_interval(rule[1], rule[2], open_low)}"
    if kind.startswith("float"):
        open_low, open_high = kind.endswith("open_low"), kind.endswith("open_high")
        ok = _in(value, rule[1], rule[2], open_low, open_high)
        where = _interval(rule[1], rule[2], open_low, open_high)
        return None if ok else f"a finite number in {where}"
    if kind == "range2":
        lo, hi = rule[1], rule[2]
        ok = isinstance(value, tuple) and len(value) == 2
        ok = ok and all(_in(v, lo, hi, open_low=True) for v in value) and value[0] <= value[1]
        return None if ok else f"two finite numbers lo <= hi in {_interval(lo, hi, True)}"
    if kind == "overrides":
        ok = isinstance(value, tuple) and all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value
        )
        return None if ok else "(name, value) pairs of NatConfig fields, e.g. {'embed_dim': 32}"
    raise AssertionError(kind)


def validate(cfg: TrainConfig) -> None:
    """Checks every field (type, finite, in range) and the relations between fields.

    Raises:
      ValueError: naming the first bad field, its value and what is allowed.
    """

    def bad(name: str, value: Any, allowed: str) -> ValueError:
        return ValueError(f"{name}={_short(value, 80)} is invalid: must be {allowed}.")

    for name, rule in _RULES.items():
        section, field_name = name.split(".")
        value = getattr(getattr(cfg, section), field_name)
        allowed = _check_field(value, rule)
        if allowed is not None:
            raise bad(name, value, allowed)
    d, o = cfg.data, cfg.optim
    if d.batch_size % o.grad_accum:
        raise bad("optim.grad_accum", o.grad_accum, f"a divisor of data.batch_size={d.batch_size}")
    if o.warmup_epochs > o.epochs:
        raise bad("optim.warmup_epochs", o.warmup_epochs, f"<= optim.epochs={o.epochs}")


def _field_paths(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _field_paths(value, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _parse(text: str, annotation: Any, key: str) -> Any:
    """Parses `text` into `annotation` (str, int, float, bool, tuples, Optional thereof)."""
    if len(text) > _MAX_VALUE_CHARS:
        raise ValueError(f"--set {key}: value longer than {_MAX_VALUE_CHARS} characters.")
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Any": Any})  # noqa: S307 (our own types)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        others = [t for t in args if t is not type(None)]
        return _parse(text, others[0], key)
    if annotation is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={_short(text)}: expected a boolean (true/false).")
    if annotation is str:
        return text
    if annotation in (int, float):
        try:
            value = float(text) if annotation is float else _parse_int(text)
        except (ValueError, OverflowError):
            expected = annotation.__name__
            raise ValueError(f"--set {key}={_short(text)}: expected {expected}.") from None
        return value
    if origin is tuple:
        try:
            value = _literal(text, key)
        except (ValueError, SyntaxError):
            value = tuple(s.strip() for s in text.split(",") if s.strip())
        if isinstance(value, dict):
            return tuple(value.items())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if args:
            if len(args) != len(value):
                raise ValueError(f"--set {key}={_short(text)}: expected {len(args)} values.")
            return tuple(_coerce(v, t, key) for v, t in zip(value, args, strict=True))
        return tuple(value)
    try:
        return _literal(text, key)
    except (ValueError, SyntaxError):
        return text


def _short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters (error messages stay one line)."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 4] + "..." + r[-1]


def _parse_int(text: str) -> int:
    """An int from "12", "1e3" or "1_000" (never a rounded fraction or inf/nan)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # "1e3"; raises OverflowError for inf below
        if value != int(value):
            raise ValueError(text) from None
        return int(value)


# Longer values are not plausible overrides; the cap also bounds literal_eval's recursion.
_MAX_VALUE_CHARS = 10_000


def _literal(text: str, key: str) -> Any:
    """`ast.literal_eval` without RecursionError/MemoryError escaping (deeply nested input)."""
    try:
        return ast.literal_eval(text)
    except (RecursionError, MemoryError):
        raise ValueError(f"--set {key}: value nested too deeply.") from None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        return _parse(str(value), annotation, key)
    return value


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Returns `cfg` with `key=value` overrides applied (nested keys separated by dots).

    Raises:
      ValueError: for a malformed item, an unknown key (listing the valid ones) or a value
        that does not parse as the field's type.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. optim.lr=5e-4.")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in valid_keys():
            raise ValueError(
                f"--set {key}: unknown key{_suggest(key)}. Valid keys: {', '.join(valid_keys())}."
            )
        cfg = _replace_path(cfg, key.split("."), text, key)
    validate(cfg)
    return cfg


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _replace_path(obj: Any, parts: list[str], text: str, key: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(obj)}[parts[0]]
    if len(parts) == 1:
        new = _parse(text, typing.get_type_hints(type(obj))[f.name], key)
    else:
        new = _replace_path(getattr(obj, f.name), parts[1:], text, key)
    return _replace_unvalidated(obj, f.name, new)


def _replace_unvalidated(obj: Any, name: str, value: Any) -> Any:
    """dataclasses.replace without `__post_init__` (validation runs once at the end)."""
    new = object.__new__(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(new, f.name, value if f.name == name else getattr(obj, f.name))
    return new


def to_dict(cfg: Any) -> dict:
    """The config as a JSON-friendly dict (stored next to checkpoints)."""
    return dataclasses.asdict(cfg)


def valid_keys() -> list[str]:
    """All dotted override keys."""
    return _field_paths(TrainConfig())


def from_dict(d: dict, cls: type = TrainConfig) -> Any:
    """Inverse of `to_dict` (JSON lists become tuples again)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value, hint = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(value, hint)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)
