"""Model/optimizer construction and the jitted, sharded train and eval steps.

The model is split once (`nnx.split`) into a static graphdef, the float32 parameters (master
weights) and the rest (non-parameter state). The train state is plain pytrees of arrays (pure
dicts): `{"params", "opt_state", "ema"}`. The steps are pure module-level functions
(`loss_and_grads`, `train_step`, `eval_step`) of a static `StepConfig` and that state: they merge
the graphdef back inside `jax.jit`, draw randomness from `fold_in(seed, step)` (so step `s` draws
the same dropout / drop-path / mixup randomness whether or not the run was resumed), and compute
in the model's dtype (bfloat16 by default) while gradients and optimizer updates stay float32.
`Trainer` binds them to one run's settings and shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from natjax import models
from natjax.train import augment
from natjax.train import mesh as mesh_lib
from natjax.train.config import AugmentConfig, DataConfig, TrainConfig

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
# Parameters whose path contains one of these get no weight decay (timm/NAT: biases, norms and
# relative position biases), in addition to every parameter with ndim <= 1.
NO_DECAY_KEYS = ("rpb", "relative_position_bias", "norm", "bias", "layernorm", "layer_scale")


def nat_config(cfg: TrainConfig, num_labels: int, class_names=None):
    """The NatConfig: the preset, then `model.overrides`, `num_labels` and the class names.

    Args:
      cfg: the run's config.
      num_labels: classifier outputs (the dataset's class count).
      class_names: the classes in label order (None: unnamed), carried into the saved model.
    """
    try:
        base = models.get_config(cfg.model.preset)
    except ValueError as err:
        raise ValueError(f"model.preset={cfg.model.preset!r}: {err}") from None
    changes = dict(cfg.model.overrides)
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ValueError(
            f"model.overrides: unknown NatConfig field(s) {unknown}; known: {sorted(fields)}."
        )
    if "depths" in changes:
        # Backbone outputs are derived from the stage count; re-derive them for new depths.
        changes.setdefault("out_features", None)
        changes.setdefault("out_indices", None)
    try:
        names = tuple(class_names) if class_names is not None else None
        return dataclasses.replace(base, **changes, num_labels=num_labels, id2label=names)
    except ValueError as err:
        raise ValueError(f"model.overrides: {err}") from None


def new_classifier(cfg: TrainConfig, num_labels: int, seed: int, class_names=None) -> nnx.Module:
    """A freshly initialised classifier: float32 parameters, `cfg.model.dtype` compute."""
    rngs = nnx.Rngs(params=seed, dropout=jax.random.fold_in(jax.random.key(seed), 1))
    return models.NatForImageClassification(
        nat_config(cfg, num_labels, class_names),
        rngs=rngs,
        dtype=_DTYPES[cfg.model.dtype],
        param_dtype=jnp.float32,
        attention_implementation=cfg.model.attention_implementation,
        remat=cfg.model.remat,
    )


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: ndim >= 2 and no NO_DECAY_KEYS in the path."""

    def one(path, leaf):
        names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
        return bool(np.ndim(leaf) >= 2 and not any(key in names for key in NO_DECAY_KEYS))

    return jax.tree_util.tree_map_with_path(one, params)


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from warmup_lr to lr * batch/base_batch, then cosine to min_lr."""
    o = cfg.optim
    peak = o.lr * cfg.data.batch_size / o.base_batch_size
    total = max(1, int(round(o.epochs * steps_per_epoch)))
    warmup = min(total - 1, int(round(o.warmup_epochs * steps_per_epoch)))
    return optax.warmup_cosine_decay_schedule(
        init_value=o.warmup_lr,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=min(o.min_lr, peak),
    )


def make_optimizer(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled, masked decay) or SGD with momentum `b1`.

    SGD applies the same masked decoupled weight decay (scaled by the learning rate, as AdamW
    does) before the momentum step.
    """
    o = cfg.optim
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    if o.optimizer == "sgd":
        if o.weight_decay > 0:
            parts.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=o.b1 or None))
    else:
        parts.append(
            optax.adamw(
                schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
            )
        )
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static settings of the train and eval steps (hashable; bound before `jax.jit`).

    Attributes:
      graphdef: the model's static structure (`nnx.split`).
      num_labels: classifier outputs.
      dtype: compute dtype name ("bfloat16", "float32", "float16").
      data: normalisation (`mean`, `std`) comes from here.
      augment: device-side augmentations (mixup/cutmix, random erasing, label smoothing).
      grad_accum: micro-batches per optimizer step.
      seed: run seed; step `s` uses `fold_in(key(seed), s)`.
      ema_decay: EMA of the weights (0: none).
    """

    graphdef: Any
    num_labels: int
    dtype: str
    data: DataConfig
    augment: AugmentConfig
    grad_accum: int
    seed: int
    ema_decay: float

    @classmethod
    def from_train_config(cls, cfg: TrainConfig, graphdef: Any, num_labels: int) -> StepConfig:
        """The step settings of a training run."""
        return cls(
            graphdef=graphdef,
            num_labels=num_labels,
            dtype=cfg.model.dtype,
            data=cfg.data,
            augment=cfg.augment,
            grad_accum=cfg.optim.grad_accum,
            seed=cfg.run.seed,
            ema_decay=cfg.optim.ema_decay,
        )


def forward(spec: StepConfig, params, rest, images, key, train: bool) -> jax.Array:
    """float32 logits of the model `spec.graphdef` with `params` (and `rest`) on `images`."""
    model = nnx.merge(spec.graphdef, params, rest)
    # natjax models hold no RNG state: dropout / drop-path draw from the key given here.
    out = model(images, deterministic=not train, rngs=key if train else None)
    return out.logits.astype(jnp.float32)


def loss_fn(spec: StepConfig, params, rest, images, labels, key) -> tuple[jax.Array, jax.Array]:
    """Training loss (device augmentations, smoothed targets) and accuracy of one micro-batch.

    Returns:
      `(loss, accuracy)`, float32 scalars.
    """
    a, d = spec.augment, spec.data
    k_mix, k_erase, k_model = jax.random.split(key, 3)
    x = augment.normalize(images, d.mean, d.std, jnp.float32)
    targets = augment.one_hot_smooth(labels, spec.num_labels, a.label_smoothing)
    x, targets = augment.mixup_cutmix(k_mix, x, targets, a.mixup, a.cutmix, a.mixup_switch_prob)
    x = augment.random_erasing(k_erase, x, a.erase_prob).astype(_DTYPES[spec.dtype])
    logits = forward(spec, params, rest, x, k_model, train=True)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def loss_and_grads(spec: StepConfig, params, rest, images, labels, key):
    """Mean loss, accuracy and gradients over `spec.grad_accum` micro-batches.

    Micro-batch `i` takes every `grad_accum`-th example (so each stays spread over devices) and
    draws its randomness from `fold_in(key, i)`.

    Returns:
      `(loss, accuracy, grads)`; `grads` has the structure of `params`.
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, spec), argnums=0, has_aux=True)
    accum = spec.grad_accum
    if accum == 1:
        (loss, acc), grads = grad_fn(params, rest, images, labels, key)
        return loss, acc, grads
    b = images.shape[0] // accum
    imgs = images.reshape(b, accum, *images.shape[1:]).swapaxes(0, 1)
    labs = labels.reshape(b, accum).swapaxes(0, 1)

    def body(carry, xs):
        g_sum, l_sum, a_sum = carry
        i, im, lb = xs
        (lo, ac), g = grad_fn(params, rest, im, lb, jax.random.fold_in(key, i))
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + lo, a_sum + ac), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss, acc), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (jnp.arange(accum), imgs, labs))
    return loss / accum, acc / accum, jax.tree.map(lambda g: g / accum, grads)


def train_step(
    spec: StepConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state: dict,
    rest,
    images,
    labels,
    step,
    bad_step,
):
    """One optimizer step: gradients, update, EMA; a non-finite step freezes the state.

    Args:
      spec, tx, schedule: static (bound with `functools.partial` before jitting).
      state: `{"params", "opt_state", "ema"}`.
      rest: non-parameter model state.
      images, labels: the global batch (uint8 images, int32 labels).
      step: the 0-based step number (int32 scalar).
      bad_step: -1, or the first step whose loss or gradient norm was not finite.

    Returns:
      `(state, metrics, bad_step)`. Once `bad_step >= 0` the state is returned unchanged, so
      the run never trains on (or saves) NaN/inf weights; the loop reports and stops.
    """
    key = jax.random.fold_in(jax.random.key(spec.seed), step)
    params = state["params"]
    loss, acc, grads = loss_and_grads(spec, params, rest, images, labels, key)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    bad_step = jnp.where((bad_step < 0) & ~finite, step, bad_step)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
    ema = state["ema"]
    if ema is not None:
        d = spec.ema_decay
        new["ema"] = jax.tree.map(lambda e, p: e * d + p * (1 - d), ema, new["params"])
    else:
        new["ema"] = None
    ok = bad_step < 0
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    metrics = {"loss": loss, "accuracy": acc, "grad_norm": grad_norm, "lr": schedule(step)}
    return new, metrics, bad_step


def eval_step(spec: StepConfig, params, rest, images, labels, mask) -> dict[str, jax.Array]:
    """Masked sums of the loss, top-1 and top-5 hits and the example count of one batch."""
    d = spec.data
    x = augment.normalize(images, d.mean, d.std, _DTYPES[spec.dtype])
    logits = forward(spec, params, rest, x, None, train=False)
    top5 = jax.lax.top_k(logits, min(5, spec.num_labels))[1]
    m = mask.astype(jnp.float32)
    return {
        "loss": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * m),
        "top1": jnp.sum((top5[:, 0] == labels) * m),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * m),
        "count": jnp.sum(m),
    }


def _to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array identical on every process -> a global array with `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


@dataclasses.dataclass
class Trainer:
    """Holds the static parts of training and the jitted steps.

    Attributes:
      graphdef: the model's static structure.
      rest: non-parameter model state (RNG streams), replicated.
      state: {"params", "opt_state", "ema"} pytrees of global arrays.
      shardings: the same structure, one NamedSharding per leaf.
    """

    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    num_labels: int
    steps_per_epoch: int
    graphdef: Any = None
    rest: Any = None
    state: dict | None = None
    shardings: dict | None = None
    schedule: optax.Schedule | None = None
    model: nnx.Module | None = None  # an existing model (e.g. from_pretrained) instead of cfg's
    class_names: tuple[str, ...] | None = None  # the dataset's classes, kept in the model config

    def __post_init__(self) -> None:
        cfg, mesh = self.cfg, self.mesh
        rep = mesh_lib.replicated(mesh)

        def init_model():
            model = new_classifier(cfg, self.num_labels, cfg.run.seed, self.class_names)
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

        # Shapes first (nothing allocated), then one jitted init that writes every parameter
        # straight into its shard: no host copy of the full model, identical on every process.
        if self.model is None:
            abstract = nnx.eval_shape(
                lambda: new_classifier(cfg, self.num_labels, cfg.run.seed, self.class_names)
            )
            self.graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
            param_sh = nnx.to_pure_dict(mesh_lib.state_shardings(abs_params, mesh))
            rest_sh = jax.tree.map(lambda _: rep, nnx.to_pure_dict(abs_rest))
            params, self.rest = jax.jit(init_model, out_shardings=(param_sh, rest_sh))()
        else:
            self.graphdef, p_state, r_state = nnx.split(self.model, nnx.Param, ...)
            param_sh = nnx.to_pure_dict(mesh_lib.state_shardings(p_state, mesh))
            params = jax.tree.map(_to_global, nnx.to_pure_dict(p_state), param_sh)
            self.rest = jax.tree.map(lambda x: _to_global(x, rep), nnx.to_pure_dict(r_state))
            self.model = None  # the arrays now live in self.state
        self.schedule = lr_schedule(cfg, self.steps_per_epoch)
        self.tx = make_optimizer(cfg, self.schedule)
        opt_sh = mesh_lib.like_params(jax.eval_shape(self.tx.init, params), params, param_sh, rep)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(params)
        ema = jax.tree.map(jnp.copy, params) if cfg.optim.ema_decay > 0 else None
        self.state = {"params": params, "opt_state": opt_state, "ema": ema}
        self.shardings = {
            "params": param_sh,
            "opt_state": opt_sh,
            "ema": param_sh if ema is not None else None,
        }
        self._build_steps()

    # ------------------------------------------------------------------------------------ steps
    def _build_steps(self) -> None:
        """Jits the module-level steps with this run's static settings and shardings."""
        mesh = self.mesh
        self.spec = StepConfig.from_train_config(self.cfg, self.graphdef, self.num_labels)
        img_sh = mesh_lib.batch_sharding(mesh, 4)
        lab_sh = mesh_lib.batch_sharding(mesh, 1)
        rep = mesh_lib.replicated(mesh)
        rest_sh = jax.tree.map(lambda _: rep, self.rest)
        self.train_step = jax.jit(
            functools.partial(train_step, self.spec, self.tx, self.schedule),
            in_shardings=(self.shardings, rest_sh, img_sh, lab_sh, rep, rep),
            out_shardings=(self.shardings, rep, rep),
            donate_argnums=(0,),
        )
        self.eval_step = jax.jit(
            functools.partial(eval_step, self.spec),
            in_shardings=(self.shardings["params"], rest_sh, img_sh, lab_sh, lab_sh),
            out_shardings=rep,
        )
        self.bad_step = jnp.int32(-1)

    # ----------------------------------------------------------------------------- host helpers
    def global_batch(self, local: dict[str, np.ndarray]) -> tuple[jax.Array, ...]:
        """Process-local numpy batch -> global arrays sharded over ('data', 'fsdp')."""
        out = []
        for name in ("image", "label", "mask"):
            if name not in local:
                continue
            x = local[name]
            sh = mesh_lib.batch_sharding(self.mesh, x.ndim)
            shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            out.append(jax.make_array_from_process_local_data(sh, x, shape))
        return tuple(out)

    def step(self, local_batch: dict[str, np.ndarray], step: int) -> dict[str, jax.Array]:
        """One optimizer step on a process-local batch; updates self.state."""
        images, labels = self.global_batch(local_batch)
        self.state, metrics, self.bad_step = self.train_step(
            self.state, self.rest, images, labels, jnp.int32(step), self.bad_step
        )
        return metrics

    def first_bad_step(self) -> int | None:
        """The first 0-based step with a non-finite loss or gradient norm (None: all finite).

        Reading it waits for the steps dispatched so far.
        """
        bad = int(jax.device_get(self.bad_step))
        return None if bad < 0 else bad

    def evaluate(self, loader, use_ema: bool = False) -> dict[str, float]:
        """Top-1 accuracy, mean loss, image count and (more than 5 classes) top-5 accuracy."""
        params = (
            self.state["ema"] if use_ema and self.state["ema"] is not None else self.state["params"]
        )
        totals: dict[str, float] = {}
        for batch in loader:
            out = self.eval_step(params, self.rest, *self.global_batch(batch))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        n = max(totals.get("count", 0.0), 1.0)
        out = {
            "loss": totals.get("loss", math.nan) / n,
            "top1": totals.get("top1", 0.0) / n,
            "count": int(totals.get("count", 0)),
        }
        if self.num_labels > 5:  # with 5 classes or fewer every label is in the top 5
            out["top5"] = totals.get("top5", 0.0) / n
        return out
