"""Model/optimizer construction and the jitted, sharded train and eval steps.

The model is split once (`nnx.split`) into a static graphdef, the float32 parameters (master
weights) and the rest (RNG streams). The train state is plain pytrees of arrays (pure dicts):
`{"params", "opt_state", "ema"}`; the steps merge the graphdef back inside `jax.jit`, reseed the
model's RNG streams with `fold_in(seed, step)` (so step `s` draws the same dropout / drop-path /
mixup randomness whether or not the run was resumed), and compute in the model's dtype
(bfloat16 by default) while gradients and optimizer updates stay float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from natjax.train import augment
from natjax.train import mesh as mesh_lib
from natjax.train.config import TrainConfig

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
# Parameters whose path contains one of these get no weight decay (timm/NAT: biases, norms and
# relative position biases), in addition to every parameter with ndim <= 1.
NO_DECAY_KEYS = ("rpb", "relative_position_bias", "norm", "bias", "layernorm", "layer_scale")


def nat_config(cfg: TrainConfig, num_labels: int):
    """The NatConfig: the preset, the overrides, the augment-independent drop-path, num_labels."""
    from natjax import models

    base = models.get_config(cfg.model.preset)
    changes = dict(cfg.model.overrides)
    if "depths" in changes:
        # Backbone outputs are derived from the stage count; re-derive them for new depths.
        changes.setdefault("out_features", None)
        changes.setdefault("out_indices", None)
    return dataclasses.replace(base, **changes, num_labels=num_labels, id2label=None)


def build_model(cfg: TrainConfig, num_labels: int, seed: int) -> nnx.Module:
    """Builds the classifier with float32 parameters and `cfg.model.dtype` compute."""
    rngs = nnx.Rngs(params=seed, dropout=jax.random.fold_in(jax.random.key(seed), 1))
    from natjax import models

    return models.NatForImageClassification(
        nat_config(cfg, num_labels),
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
    """AdamW (decoupled decay, masked) after global-norm clipping."""
    o = cfg.optim
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
        )
    )
    return optax.chain(*parts)


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

    def __post_init__(self) -> None:
        cfg, mesh = self.cfg, self.mesh
        rep = mesh_lib.replicated(mesh)

        def init_model():
            model = build_model(cfg, self.num_labels, cfg.run.seed)
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

        # Shapes first (nothing allocated), then one jitted init that writes every parameter
        # straight into its shard: no host copy of the full model, identical on every process.
        if self.model is None:
            abstract = nnx.eval_shape(lambda: build_model(cfg, self.num_labels, cfg.run.seed))
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
    def _forward(self, params, images, key, train: bool):
        model = nnx.merge(self.graphdef, params, self.rest)
        # natjax models hold no RNG state: dropout / drop-path draw from the key given here.
        out = model(images, deterministic=not train, rngs=key if train else None)
        return (out.logits if hasattr(out, "logits") else out).astype(jnp.float32)

    def _build_steps(self) -> None:
        cfg, mesh = self.cfg, self.mesh
        a, d = cfg.augment, cfg.data
        dtype = _DTYPES[cfg.model.dtype]
        accum = cfg.optim.grad_accum
        base_key = jax.random.key(cfg.run.seed)
        ema_decay = cfg.optim.ema_decay

        def loss_fn(params, images, labels, key):
            k_mix, k_erase, k_model = jax.random.split(key, 3)
            x = augment.normalize(images, d.mean, d.std, jnp.float32)
            targets = augment.one_hot_smooth(labels, self.num_labels, a.label_smoothing)
            x, targets = augment.mixup_cutmix(
                k_mix, x, targets, a.mixup, a.cutmix, a.mixup_switch_prob
            )
            x = augment.random_erasing(k_erase, x, a.erase_prob).astype(dtype)
            logits = self._forward(params, x, k_model, train=True)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            acc = jnp.mean(jnp.argmax(logits, -1) == labels)
            return loss, acc

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def train_step(state, images, labels, step):
            key = jax.random.fold_in(base_key, step)
            params = state["params"]
            if accum == 1:
                (loss, acc), grads = grad_fn(params, images, labels, key)
            else:
                # Micro-batch i takes every accum-th example so each stays spread over devices.
                b = images.shape[0] // accum
                imgs = images.reshape(b, accum, *images.shape[1:]).swapaxes(0, 1)
                labs = labels.reshape(b, accum).swapaxes(0, 1)

                def body(carry, xs):
                    g_sum, l_sum, a_sum = carry
                    i, im, lb = xs
                    (lo, ac), g = grad_fn(params, im, lb, jax.random.fold_in(key, i))
                    return (jax.tree.map(jnp.add, g_sum, g), l_sum + lo, a_sum + ac), None

                zeros = jax.tree.map(jnp.zeros_like, params)
                (grads, loss, acc), _ = jax.lax.scan(
                    body, (zeros, 0.0, 0.0), (jnp.arange(accum), imgs, labs)
                )
                grads = jax.tree.map(lambda g: g / accum, grads)
                loss, acc = loss / accum, acc / accum
            updates, opt_state = self.tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            ema = state["ema"]
            if ema is not None:
                ema = jax.tree.map(
                    lambda e, p: e * ema_decay + p * (1 - ema_decay), ema, new_params
                )
            metrics = {
                "loss": loss,
                "accuracy": acc,
                "grad_norm": optax.global_norm(grads),
                "lr": self.schedule(step),
            }
            return {"params": new_params, "opt_state": opt_state, "ema": ema}, metrics

        img_sh = mesh_lib.batch_sharding(mesh, 4)
        lab_sh = mesh_lib.batch_sharding(mesh, 1)
        rep = mesh_lib.replicated(mesh)
        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.shardings, img_sh, lab_sh, rep),
            out_shardings=(self.shardings, rep),
            donate_argnums=(0,),
        )

        def eval_step(params, images, labels, mask):
            x = augment.normalize(images, d.mean, d.std, dtype)
            logits = self._forward(params, x, None, train=False)
            top5 = jax.lax.top_k(logits, min(5, self.num_labels))[1]
            m = mask.astype(jnp.float32)
            return {
                "loss": jnp.sum(
                    optax.softmax_cross_entropy_with_integer_labels(logits, labels) * m
                ),
                "top1": jnp.sum((top5[:, 0] == labels) * m),
                "top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) * m),
                "count": jnp.sum(m),
            }

        self.eval_step = jax.jit(
            eval_step,
            in_shardings=(self.shardings["params"], img_sh, lab_sh, lab_sh),
            out_shardings=rep,
        )

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
        self.state, metrics = self.train_step(self.state, images, labels, jnp.int32(step))
        return metrics

    def evaluate(self, loader, use_ema: bool = False) -> dict[str, float]:
        """Top-1/top-5 accuracy and mean loss over an EvalLoader."""
        params = (
            self.state["ema"] if use_ema and self.state["ema"] is not None else self.state["params"]
        )
        totals: dict[str, float] = {}
        for batch in loader:
            out = self.eval_step(params, *self.global_batch(batch))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        n = max(totals.get("count", 0.0), 1.0)
        return {
            "loss": totals.get("loss", math.nan) / n,
            "top1": totals.get("top1", 0.0) / n,
            "top5": totals.get("top5", 0.0) / n,
            "count": int(totals.get("count", 0)),
        }
