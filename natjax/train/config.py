"""Training configuration: frozen dataclasses, experiment files and `--set key=value` overrides.

An experiment is a Python file (see experiments/configs/) whose `get_config()` returns a
`TrainConfig`. Command-line overrides address nested fields with dots
(`--set optim.lr=5e-4 --set data.batch_size=64`); each value is parsed with the field's type.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """AdamW with linear warm-up then cosine decay.

    Attributes:
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


def validate(cfg: TrainConfig) -> None:
    """Raises ValueError naming the first bad field."""

    def bad(name: str, value: Any, allowed: str) -> ValueError:
        return ValueError(f"{name}={value!r} is invalid: {allowed}.")

    d, o, a, r = cfg.data, cfg.optim, cfg.augment, cfg.run
    if cfg.model.dtype not in ("bfloat16", "float32", "float16"):
        raise bad("model.dtype", cfg.model.dtype, "use bfloat16, float16 or float32")
    for name, value in (
        ("data.image_size", d.image_size),
        ("data.batch_size", d.batch_size),
        ("data.eval_batch_size", d.eval_batch_size),
        ("data.digits_size", d.digits_size),
        ("optim.grad_accum", o.grad_accum),
        ("optim.base_batch_size", o.base_batch_size),
        ("run.log_every", r.log_every),
        ("run.checkpoint_every", r.checkpoint_every),
        ("run.keep_checkpoints", r.keep_checkpoints),
    ):
        if not isinstance(value, int) or value < 1:
            raise bad(name, value, "must be a positive integer")
    if d.batch_size % o.grad_accum:
        raise bad("optim.grad_accum", o.grad_accum, f"must divide data.batch_size={d.batch_size}")
    if d.num_workers < 0:
        raise bad("data.num_workers", d.num_workers, "must be >= 0")
    if not 0 < d.crop_pct <= 1:
        raise bad("data.crop_pct", d.crop_pct, "must be in (0, 1]")
    if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
        raise bad("data.mean/std", (d.mean, d.std), "need 3 values each, std > 0")
    if o.lr <= 0:
        raise bad("optim.lr", o.lr, "must be > 0")
    if o.weight_decay < 0:
        raise bad("optim.weight_decay", o.weight_decay, "must be >= 0")
    if o.epochs <= 0 or o.warmup_epochs < 0 or o.warmup_epochs > o.epochs:
        raise bad(
            "optim.epochs/warmup_epochs", (o.epochs, o.warmup_epochs), "need 0 <= warmup <= epochs"
        )
    if not 0 <= o.ema_decay < 1:
        raise bad("optim.ema_decay", o.ema_decay, "must be in [0, 1)")
    if o.grad_clip < 0:
        raise bad("optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables)")
    for name in ("hflip", "erase_prob", "mixup_switch_prob"):
        v = getattr(a, name)
        if not 0 <= v <= 1:
            raise bad(f"augment.{name}", v, "must be a probability in [0, 1]")
    if not 0 <= a.label_smoothing < 1:
        raise bad("augment.label_smoothing", a.label_smoothing, "must be in [0, 1)")
    if a.mixup < 0 or a.cutmix < 0:
        raise bad("augment.mixup/cutmix", (a.mixup, a.cutmix), "must be >= 0")
    if not 0 <= a.randaugment_m <= 10:
        raise bad("augment.randaugment_m", a.randaugment_m, "must be in [0, 10]")
    if not 0 < a.rrc_scale[0] <= a.rrc_scale[1] <= 1:
        raise bad("augment.rrc_scale", a.rrc_scale, "need 0 < lo <= hi <= 1")
    for name in ("data", "fsdp", "model"):
        v = getattr(cfg.mesh, name)
        if v == 0 or v < -1:
            raise bad(f"mesh.{name}", v, "must be a positive size or -1")
    if r.max_steps < 0 or r.eval_every < 0:
        raise bad("run.max_steps/eval_every", (r.max_steps, r.eval_every), "must be >= 0")


def load_config(path: str | Path | None) -> TrainConfig:
    """Loads `get_config()` from an experiment file (None: the offline digits default).

    Args:
      path: a Python file defining `get_config() -> TrainConfig`.

    Returns:
      The config.
    """
    if path is None:
        from natjax.train.defaults import digits_config

        return digits_config()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such file.")
    spec = importlib.util.spec_from_file_location(f"natjax_exp_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {str(path)!r} defines no get_config().")
    cfg = module.get_config()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"--config {str(path)!r}: get_config() returned {type(cfg).__name__}.")
    return cfg


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
        raise ValueError(f"--set {key}={text!r}: expected a boolean (true/false).")
    if annotation is str:
        return text
    if annotation in (int, float):
        try:
            value = (
                annotation(float(text)) if annotation is int and "e" in text else annotation(text)
            )
        except ValueError:
            raise ValueError(f"--set {key}={text!r}: expected {annotation.__name__}.") from None
        return value
    if origin is tuple:
        try:
            value = ast.literal_eval(text)
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
                raise ValueError(f"--set {key}={text!r}: expected {len(args)} values.")
            return tuple(_coerce(v, t, key) for v, t in zip(value, args, strict=True))
        return tuple(value)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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
            raise ValueError(f"--set {key}: unknown key. Valid keys: {', '.join(valid_keys())}.")
        cfg = _replace_path(cfg, key.split("."), text, key)
    validate(cfg)
    return cfg


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
